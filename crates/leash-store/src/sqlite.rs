//! The embedded SQLite backend. Writes go through a single-connection pool so that write
//! transactions never race for SQLite's one write lock; reads use a separate pool. WAL with
//! `synchronous = NORMAL`: a commit is in the WAL before it returns, so it survives the process
//! being killed (`kill -9`); only a power cut may lose the last commits.

use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use leash_core::audit::{Checkpoint, Draft, GENESIS_HASH, Outcome};
use leash_core::dpop::ReplayKey;
use leash_core::grant::Grant;
use leash_core::secret::SecretDigest;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};
use tokio::sync::oneshot;

use crate::common::{Memo, SignerSlot, draft_of, outcome_name, unavailable, unix_of, vault_key};
use crate::{
    ActionUse, Agent, Approval, AuditQuery, CHECKPOINT_EVERY_EVENTS, CheckpointSigner, GrantEnd,
    RequestUse, Store, StoreError, StoreResult, UseVerdict, User, VaultEntry,
};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    uses: flume::Sender<WriteJob>,
    signer: Arc<SignerSlot>,
    grants: Arc<Memo<Arc<Grant>>>,
    vault: Arc<Memo<Option<Arc<VaultEntry>>>>,
    /// Revoked token `jti`s with their expiry: every revocation of this database goes through
    /// this process, so the set is complete (loaded at open, added to before the write).
    revoked: Arc<RwLock<HashMap<String, i64>>>,
}

/// Work for the writer thread.
enum WriteJob {
    /// One request's use and where to send the verdict.
    Use(Box<Prepared>, oneshot::Sender<Answer>),
    /// Sign the head now (if it moved) and send back the latest checkpoint.
    Checkpoint(oneshot::Sender<StoreResult<Option<Checkpoint>>>),
}

/// A request's use with its audit event already in canonical form (done by the calling task,
/// so the single writer only splices in the chain members and hashes).
struct Prepared {
    request: RequestUse,
    /// The event's draft and Unix time, if it has an event.
    draft: Option<(Draft, i64)>,
}

/// The writer's answer to one use. It hands the request back so that it is freed by the
/// caller's thread, which allocated it: glibc frees another thread's memory under that arena's
/// lock, and those frees were a sixth of the writer's time.
type Answer = (StoreResult<UseVerdict>, Box<Prepared>);

/// Most requests committed in one transaction. Below the concurrency a loaded server sees, so
/// that the next batch fills while this one commits instead of every caller waiting in lockstep
/// (with 64 callers, batches of 64 left the writer idle a third of the time).
const MAX_USE_BATCH: usize = 32;

/// The longest the writer holds a batch open for callers it expects.
const BATCH_LINGER: Duration = Duration::from_micros(300);
/// How long it sleeps between looks; a sleeping writer is woken by no send.
const LINGER_STEP: Duration = Duration::from_micros(30);

/// The end of the audit chain as committed; owned by the writer thread, the only appender.
#[derive(Debug, Clone)]
struct ChainHead {
    seq: u64,
    hash: String,
    checkpointed: u64,
}

impl ChainHead {
    fn load(conn: &rusqlite::Connection) -> rusqlite::Result<Self> {
        use rusqlite::OptionalExtension as _;
        let last = conn
            .query_row(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()?;
        let checkpointed: Option<i64> =
            conn.query_row("SELECT max(seq) FROM audit_checkpoints", [], |row| {
                row.get(0)
            })?;
        let (seq, hash) = last.unwrap_or((0, GENESIS_HASH.to_owned()));
        Ok(Self {
            seq: seq.max(0) as u64,
            hash,
            checkpointed: checkpointed.unwrap_or(0).max(0) as u64,
        })
    }
}

/// What the writer thread shares with the store.
struct Writer {
    conn: rusqlite::Connection,
    head: ChainHead,
    grants: Arc<Memo<Arc<Grant>>>,
    signer: Arc<SignerSlot>,
    wal: WalBound,
}

/// The write-ahead log's file, its size limit, and when the writer last looked.
struct WalBound {
    path: std::path::PathBuf,
    restart_at: u64,
    checked: std::time::Instant,
}

/// Group commit: one thread owns these writes (request uses and the audit chain) and commits
/// whatever requests are waiting in one transaction, so concurrent token and gateway calls
/// share a commit. It has its own connection (rusqlite, same SQLite library as sqlx) and runs a
/// whole batch in one synchronous call: through sqlx every statement is a hand-off to its
/// worker thread and back, which under load cost ≈ 300 µs per commit of four statements.
fn writer_thread(mut writer: Writer, jobs: flume::Receiver<WriteJob>) {
    let mut waiting = None;
    let mut last_batch = 1;
    loop {
        let first = match waiting.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let WriteJob::Use(request, reply) = first else {
            if let WriteJob::Checkpoint(reply) = first {
                let _ = reply.send(writer.checkpoint_now());
            }
            continue;
        };
        let mut batch = vec![(request, reply)];
        waiting = gather(&jobs, &mut batch, last_batch);
        last_batch = batch.len();
        writer.commit_batch(batch);
        writer.bound_wal();
    }
}

/// Adds the uses waiting behind the batch's first; returns a job of another kind that stopped
/// the gathering. Under steady load the last batch's callers are on their way back with their
/// next request: while fewer than that are here, the writer naps and looks again, for as long
/// as each nap brought more and within `BATCH_LINGER`. A commit's fixed cost is then shared by
/// the whole load; when the load drops, one short linger finds nobody and the next batch
/// expects fewer.
fn gather(
    jobs: &flume::Receiver<WriteJob>,
    batch: &mut Vec<(Box<Prepared>, oneshot::Sender<Answer>)>,
    last_batch: usize,
) -> Option<WriteJob> {
    let linger_until = std::time::Instant::now() + BATCH_LINGER;
    let mut arrived = true;
    while batch.len() < MAX_USE_BATCH {
        match jobs.try_recv() {
            Ok(WriteJob::Use(request, reply)) => {
                batch.push((request, reply));
                arrived = true;
            }
            Ok(other) => return Some(other),
            Err(_) => {
                let expecting = batch.len() < last_batch && arrived;
                if !expecting || std::time::Instant::now() >= linger_until {
                    return None;
                }
                arrived = false;
                std::thread::sleep(LINGER_STEP);
            }
        }
    }
    None
}

impl Writer {
    /// Keeps the write-ahead log bounded. The log only starts over when a write finds every
    /// frame copied back and no reader in it, a moment that unbroken load never leaves, so the
    /// passive checkpointer alone lets it (and the shared-memory index every connection maps)
    /// grow without end: a soak run reached 37 GB in six minutes. Past the limit, the writer
    /// itself, between two commits, runs a `TRUNCATE` checkpoint: it waits (busy timeout) for
    /// readers to leave the log, copies what the passive rounds left, and empties the file. The
    /// commits waiting meanwhile pay that pause; it is the price of a bounded log.
    fn bound_wal(&mut self) {
        if self.wal.checked.elapsed() < WAL_CHECK_EVERY {
            return;
        }
        self.wal.checked = std::time::Instant::now();
        let size = std::fs::metadata(&self.wal.path).map_or(0, |m| m.len());
        if size <= self.wal.restart_at {
            return;
        }
        let started = std::time::Instant::now();
        let busy = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            });
        match busy {
            Ok(0) => tracing::debug!(bytes = size, took = ?started.elapsed(), "WAL started over"),
            Ok(_) => tracing::warn!(
                bytes = size,
                "WAL restart found readers still in the log; will retry"
            ),
            Err(e) => tracing::warn!(error = %e, bytes = size, "WAL restart failed; will retry"),
        }
    }

    fn commit_batch(&mut self, batch: Vec<(Box<Prepared>, oneshot::Sender<Answer>)>) {
        let (mut uses, replies): (Vec<Box<Prepared>>, Vec<_>) = batch.into_iter().unzip();
        let started = std::time::Instant::now();
        let result = record_batch(&mut self.conn, &mut uses, &self.head, self.signer.0.get());
        let took = started.elapsed();
        if took > SLOW_COMMIT {
            tracing::warn!(
                ms = took.as_millis() as u64,
                requests = uses.len(),
                "slow commit: the disk held up every request waiting on it"
            );
        }
        match result {
            Ok(committed) => {
                self.head = committed.head;
                // A grant whose budget ran out must not stay live in memory.
                for id in committed.spent {
                    self.grants.invalidate(&id);
                }
                for ((reply, verdict), used) in
                    replies.into_iter().zip(committed.verdicts).zip(uses)
                {
                    let _ = reply.send((Ok(verdict), used));
                }
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "commit failed: the requests are refused");
                for (reply, used) in replies.into_iter().zip(uses) {
                    let _ = reply.send((Err(StoreError::Unavailable(message.clone())), used));
                }
            }
        }
    }

    fn checkpoint_now(&mut self) -> StoreResult<Option<Checkpoint>> {
        let fail = |e: rusqlite::Error| StoreError::Unavailable(e.to_string());
        if self.head.seq > self.head.checkpointed
            && let Some(signer) = self.signer.0.get()
        {
            let tx = self.conn.transaction().map_err(fail)?;
            let checkpoint = insert_checkpoint(&tx, signer, &self.head).map_err(fail)?;
            tx.commit().map_err(fail)?;
            if checkpoint.is_some() {
                self.head.checkpointed = self.head.seq;
            }
        }
        latest_checkpoint(&self.conn).map_err(fail)
    }
}

fn insert_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    signer: &CheckpointSigner,
    head: &ChainHead,
) -> rusqlite::Result<Option<Checkpoint>> {
    let Some(checkpoint) = signer(head.seq, &head.hash) else {
        return Ok(None);
    };
    tx.prepare_cached(
        "INSERT INTO audit_checkpoints (seq, hash, ts, kid, sig) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(rusqlite::params![
        checkpoint.seq as i64,
        checkpoint.hash,
        checkpoint.ts,
        checkpoint.kid,
        checkpoint.sig
    ])?;
    Ok(Some(checkpoint))
}

fn latest_checkpoint(conn: &rusqlite::Connection) -> rusqlite::Result<Option<Checkpoint>> {
    use rusqlite::OptionalExtension as _;
    conn.query_row(
        "SELECT seq, hash, ts, kid, sig FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
        [],
        |row| {
            Ok(Checkpoint {
                seq: row.get::<_, i64>(0)?.max(0) as u64,
                hash: row.get(1)?,
                ts: row.get(2)?,
                kid: row.get(3)?,
                sig: row.get(4)?,
            })
        },
    )
    .optional()
}

/// A commit slower than this is logged: every waiting request sat through it.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// The writer's connection: the same durability as the pools, and no checkpoints.
fn open_writer_connection(path: &str) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// What a committed batch produced.
struct Committed {
    verdicts: Vec<UseVerdict>,
    /// Grants whose budget this batch used up.
    spent: Vec<String>,
    /// The chain head after the batch's events.
    head: ChainHead,
}

/// Records each request's use, in one transaction for the whole batch: its one-time values
/// all-or-nothing, then one count against its grant, then its audit event (a deny when the
/// use was refused). Within a batch the earlier of two requests sharing a value claims it, even
/// if that request then fails on another of its values: the later one is refused (fail closed).
fn record_batch(
    conn: &mut rusqlite::Connection,
    uses: &mut [Box<Prepared>],
    head: &ChainHead,
    signer: Option<&CheckpointSigner>,
) -> rusqlite::Result<Committed> {
    use rusqlite::OptionalExtension as _;
    let mut verdicts = vec![UseVerdict::Recorded; uses.len()];
    let mut claimed: HashSet<&ReplayKey> = HashSet::new();
    let mut candidates = Vec::new();
    for (index, request) in uses.iter().map(|used| &used.request).enumerate() {
        let mut own = HashSet::new();
        let seen = request
            .once
            .iter()
            .position(|(key, _)| claimed.contains(key) || !own.insert(key));
        match seen {
            Some(position) => verdicts[index] = UseVerdict::Replayed(position),
            None => {
                claimed.extend(own);
                candidates.push(index);
            }
        }
    }
    let mut spent = Vec::new();
    let mut head = head.clone();
    let has_events = uses.iter().any(|used| used.request.audit.is_some());
    if candidates.is_empty() && !has_events {
        return Ok(Committed {
            verdicts,
            spent,
            head,
        });
    }
    // IMMEDIATE: take the write lock up front (waiting on the busy timeout), so the transaction
    // never has to upgrade a read snapshot that another writer moved past.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO replay (key, until) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM replay WHERE key = ?1")?;
        let mut count = tx.prepare_cached(
            "UPDATE grants SET requests_used = requests_used + 1 \
             WHERE id = ?1 AND status = 'active' AND expires_at > ?2 \
             AND (max_requests IS NULL OR requests_used < max_requests) \
             RETURNING requests_used, max_requests",
        )?;
        // The approval's single use: a compare-and-set, so of N parallel retries one wins.
        let mut use_approval = tx.prepare_cached(
            "UPDATE approvals SET status = 'used', used_at = ?1 \
             WHERE id = ?2 AND status = 'approved' AND expires_at > ?1",
        )?;
        for &index in &candidates {
            let request = &uses[index].request;
            let mut inserted = Vec::new();
            let mut replayed = None;
            for (position, (key, until)) in request.once.iter().enumerate() {
                if insert.execute(rusqlite::params![key.as_slice(), until])? == 1 {
                    inserted.push(key);
                } else {
                    replayed = Some(position);
                    break;
                }
            }
            if let Some(position) = replayed {
                verdicts[index] = UseVerdict::Replayed(position);
                for key in inserted {
                    delete.execute([key.as_slice()])?;
                }
                continue;
            }
            if let Some(approval) = &request.approval
                && use_approval.execute(rusqlite::params![request.now, approval])? == 0
            {
                verdicts[index] = UseVerdict::ApprovalSpent;
                continue;
            }
            let Some(grant) = &request.grant else {
                continue;
            };
            let counted = count
                .query_row(rusqlite::params![grant, request.now], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, Option<i64>>(1)?))
                })
                .optional()?;
            match counted {
                None => {
                    verdicts[index] = UseVerdict::GrantSpent;
                    spent.push(grant.clone());
                }
                Some((used, max)) => {
                    if max.is_some_and(|max| used >= max) {
                        spent.push(grant.clone());
                    }
                }
            }
        }
        let mut append = tx.prepare_cached(
            "INSERT INTO audit_events \
             (seq, kind, subject, actor, grant_id, action, decision, at, hash, line) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let unsealable = |e| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
        for (used, verdict) in uses.iter_mut().zip(&verdicts) {
            let Prepared { request, draft } = &mut **used;
            let Some(event) = request.audit.as_mut() else {
                continue;
            };
            let seq = head.seq + 1;
            let (line, at) = match (verdict.reason(), draft) {
                (None, Some((draft, at))) => {
                    let (line, hash) = draft.seal(seq, &head.hash);
                    event.hash = hash;
                    (line, *at)
                }
                // Refused here: the event changes to a deny and is canonicalised anew.
                (reason, _) => {
                    if let Some(reason) = reason {
                        event.decision = Some(Outcome::Deny);
                        event.reason = Some(reason.to_owned());
                    }
                    (
                        event.seal(seq, &head.hash).map_err(unsealable)?,
                        unix_of(&event.ts),
                    )
                }
            };
            let decision = event.decision.map(outcome_name);
            append.execute(rusqlite::params![
                seq as i64,
                event.kind,
                event.subject,
                event.actor,
                event.grant_id,
                event.action,
                decision,
                at,
                event.hash,
                line
            ])?;
            head.seq = seq;
            head.hash = event.hash.clone();
            if head.seq - head.checkpointed >= CHECKPOINT_EVERY_EVENTS
                && let Some(signer) = signer
                && insert_checkpoint(&tx, signer, &head)?.is_some()
            {
                head.checkpointed = head.seq;
            }
        }
    }
    tx.commit()?;
    Ok(Committed {
        verdicts,
        spent,
        head,
    })
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the writer has stopped".into())
}

/// How often the write-ahead log is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Size of the write-ahead log past which the writer starts it over (see `Writer::bound_wal`).
pub(crate) const WAL_RESTART_BYTES: u64 = 64 << 20;

/// How often the writer looks at the size of the write-ahead log.
const WAL_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Copies the WAL into the database file off the write path. `PASSIVE` never blocks the writer
/// or readers; pages a reader still needs wait for the next round.
async fn checkpointer(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and applies migrations.
    pub async fn open(path: &str) -> StoreResult<Self> {
        Self::open_with_wal_limit(path, WAL_RESTART_BYTES).await
    }

    /// The same, with the WAL started over past `restart_at` bytes (tests use a small one).
    pub(crate) async fn open_with_wal_limit(path: &str, restart_at: u64) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // The writer never checkpoints: a checkpoint syncs the database file, and on the
        // writer that stall would land on every request waiting for the group commit. A
        // separate connection checkpoints in the background instead (see `checkpointer`).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(unavailable)?;
        let checkpoints = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.read_only(true))
            .await
            .map_err(unavailable)?;
        let revoked = sqlx::query("SELECT jti, expires_at FROM revoked_tokens")
            .fetch_all(&reader)
            .await
            .map_err(unavailable)?
            .iter()
            .map(|row| Ok((row.try_get("jti")?, row.try_get("expires_at")?)))
            .collect::<Result<HashMap<String, i64>, sqlx::Error>>()
            .map_err(unavailable)?;
        let grants = Arc::new(Memo::new());
        let (uses, jobs) = flume::bounded(1024);
        let conn =
            open_writer_connection(path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let head = ChainHead::load(&conn).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let signer = Arc::new(SignerSlot::default());
        let chain_writer = Writer {
            conn,
            head,
            grants: grants.clone(),
            signer: signer.clone(),
            wal: WalBound {
                path: format!("{path}-wal").into(),
                restart_at,
                checked: std::time::Instant::now(),
            },
        };
        std::thread::Builder::new()
            .name("leash-writer".into())
            .spawn(move || writer_thread(chain_writer, jobs))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer: {e}")))?;
        tokio::spawn(checkpointer(checkpoints));
        Ok(Self {
            writer,
            reader,
            uses,
            signer,
            grants,
            vault: Arc::new(Memo::new()),
            revoked: Arc::new(RwLock::new(revoked)),
        })
    }
}

/// The statements shared with the PostgreSQL backend.
mod q {
    crate::queries::shared_queries!(sqlx::Sqlite);
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        q::ping(&self.reader).await
    }

    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        q::setting(&self.reader, name).await
    }

    async fn init_setting(&self, name: &str, value: &[u8]) -> StoreResult<Vec<u8>> {
        q::insert_setting(&self.writer, name, value).await?;
        q::setting(&self.writer, name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("setting {name} vanished")))
    }

    async fn create_user(&self, user: &User, key: &SecretDigest) -> StoreResult<()> {
        q::create_user(&self.writer, user, key).await
    }

    async fn user_by_key(&self, key: &SecretDigest) -> StoreResult<Option<User>> {
        q::user_by_key(&self.reader, key).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        q::list_users(&self.reader).await
    }

    async fn create_agent(&self, agent: &Agent) -> StoreResult<()> {
        q::create_agent(&self.writer, agent).await
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        q::agent(&self.reader, id).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        q::list_agents(&self.reader).await
    }

    async fn disable_agent(&self, id: &str, now: i64) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let found = q::disable_agent_row(&mut *tx, id).await?;
        q::revoke_agent_grants(&mut *tx, id, now).await?;
        tx.commit().await.map_err(unavailable)?;
        self.grants.invalidate_all();
        Ok(found)
    }

    async fn create_grant(&self, grant: &Grant, handle: &SecretDigest) -> StoreResult<()> {
        q::create_grant(&self.writer, grant, handle).await
    }

    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        q::grant(&self.reader, id).await
    }

    async fn grant_by_handle(&self, handle: &SecretDigest) -> StoreResult<Option<(Grant, Agent)>> {
        q::grant_by_handle(&self.reader, handle).await
    }

    async fn list_grants(&self, subject: Option<&str>) -> StoreResult<Vec<Grant>> {
        q::list_grants(&self.reader, subject).await
    }

    async fn end_grant(
        &self,
        id: &str,
        end: GrantEnd,
        reason: Option<&str>,
        now: i64,
    ) -> StoreResult<Option<Grant>> {
        let ended = q::end_grant(&self.writer, id, end, reason, now).await;
        self.grants.invalidate(id);
        ended
    }

    async fn live_grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        if let Some(grant) = self.grants.get(id) {
            return Ok(Some(Grant::clone(&grant)));
        }
        let read_at = self.grants.epoch();
        let grant = self.grant(id).await?;
        if let Some(grant) = &grant {
            self.grants
                .fill(grant.id.clone(), Arc::new(grant.clone()), read_at);
        }
        Ok(grant)
    }

    async fn record_use(&self, request: RequestUse) -> StoreResult<UseVerdict> {
        if request.once.is_empty() && request.grant.is_none() && request.audit.is_none() {
            return Ok(UseVerdict::Recorded);
        }
        let draft = draft_of(&request)?;
        let (reply, answer) = oneshot::channel();
        self.uses
            .send_async(WriteJob::Use(Box::new(Prepared { request, draft }), reply))
            .await
            .map_err(|_| stopped())?;
        let (verdict, _request) = answer.await.map_err(|_| stopped())?;
        verdict
    }

    fn set_checkpoint_signer(&self, signer: CheckpointSigner) {
        let _ = self.signer.0.set(signer);
    }

    async fn checkpoint_now(&self) -> StoreResult<Option<Checkpoint>> {
        let (reply, answer) = oneshot::channel();
        self.uses
            .send_async(WriteJob::Checkpoint(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>> {
        q::audit_lines(&self.reader, query).await
    }

    async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>> {
        q::checkpoints(&self.reader, since_seq).await
    }

    async fn action_uses(&self, subject: Option<&str>) -> StoreResult<Vec<ActionUse>> {
        q::action_uses(&self.reader, subject).await
    }

    async fn create_approval(&self, approval: &Approval) -> StoreResult<()> {
        q::create_approval(&self.writer, approval).await
    }

    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        q::approval(&self.reader, id).await
    }

    async fn list_approvals(&self, subject: Option<&str>) -> StoreResult<Vec<Approval>> {
        q::list_approvals(&self.reader, subject).await
    }

    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        approver: &str,
        now: i64,
    ) -> StoreResult<Option<Approval>> {
        q::decide_approval(&self.writer, id, approve, approver, now).await
    }

    async fn put_credential(&self, entry: &VaultEntry) -> StoreResult<()> {
        q::put_credential(&self.writer, entry).await?;
        self.vault
            .invalidate(&vault_key(&entry.subject, &entry.upstream));
        Ok(())
    }

    async fn credential(&self, subject: &str, upstream: &str) -> StoreResult<Option<VaultEntry>> {
        let key = vault_key(subject, upstream);
        if let Some(entry) = self.vault.get(&key) {
            return Ok(entry.as_deref().cloned());
        }
        let read_at = self.vault.epoch();
        let entry = q::credential(&self.reader, subject, upstream).await?;
        self.vault.fill(key, entry.clone().map(Arc::new), read_at);
        Ok(entry)
    }

    async fn list_credentials(&self, subject: &str) -> StoreResult<Vec<VaultEntry>> {
        q::list_credentials(&self.reader, subject).await
    }

    async fn delete_credential(&self, subject: &str, upstream: &str) -> StoreResult<bool> {
        let deleted = q::delete_credential(&self.writer, subject, upstream).await;
        self.vault.invalidate(&vault_key(subject, upstream));
        deleted
    }

    async fn revoke_token(&self, jti: &str, grant_id: &str, expires_at: i64) -> StoreResult<()> {
        // In memory first: if the write fails the token is refused here anyway (fail closed).
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(jti.to_owned(), expires_at);
        q::revoke_token(&self.writer, jti, grant_id, expires_at).await
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        Ok(self
            .revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(jti))
    }

    async fn prune(&self, now: i64) -> StoreResult<u64> {
        let replay = q::prune_replay(&self.writer, now).await?;
        let tokens = q::prune_revoked(&self.writer, now).await?;
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, expires_at| *expires_at >= now);
        Ok(replay + tokens)
    }
}
