//! The PostgreSQL backend, for a cluster of Leash nodes on one database. Every node takes any
//! call; what must hold across nodes is held by the database:
//! - one-time values (`replay`), grant budgets and an approval's single use are claimed by
//!   conditional writes in the request's transaction, so a value used on one node is refused on
//!   every other;
//! - the audit chain has one head row (`audit_head`) that each appending transaction locks
//!   first, so the events of all nodes form one chain in commit order;
//! - the rows each node holds in memory (live grants, vault entries, revoked tokens) are dropped
//!   on every node when they change: the writing transaction sends a notification
//!   (`pg_notify`, delivered on commit), every node listens, and a node that lost its listening
//!   connection drops everything, as it also does every [`RESYNC_EVERY`] in case a
//!   notification was missed.
//!
//! Like the SQLite writer thread, one task per node commits the request uses waiting at that
//! moment in one transaction (group commit).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use leash_core::audit::{AuditEvent, Checkpoint, Draft};
use leash_core::dpop::ReplayKey;
use leash_core::grant::Grant;
use leash_core::secret::SecretDigest;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::oneshot;

use crate::common::{
    APPROVAL_COLUMNS, Columns as _, Memo, SignerSlot, draft_of, log_unflushed, outcome_name,
    seal_use_event, staged_event, unavailable, vault_key,
};
use crate::{
    ActionUse, Agent, Approval, AuditQuery, CHECKPOINT_EVERY_EVENTS, CheckpointSigner, GrantEnd,
    OneTimeKind, RequestUse, Store, StoreError, StoreResult, UseVerdict, User, VaultEntry,
};

/// The notification channel of row changes.
const CHANGES: &str = "leash_changes";
/// How often a node drops every memo regardless of notifications (the bound on how long a
/// missed notification can leave a dead grant alive in memory).
const RESYNC_EVERY: Duration = Duration::from_millis(500);
/// Most request uses committed in one transaction.
const MAX_USE_BATCH: usize = 64;
/// How often a transaction that lost a deadlock or serialisation race is tried again.
const RETRIES: usize = 3;

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    uses: flume::Sender<UseJob>,
    signer: Arc<SignerSlot>,
    memos: Arc<Memos>,
}

/// The rows this node holds in memory.
#[derive(Debug)]
struct Memos {
    grants: Memo<Arc<Grant>>,
    vault: Memo<Option<Arc<VaultEntry>>>,
    /// Whether a token `jti` is revoked.
    revoked: Memo<bool>,
}

impl Memos {
    fn clear(&self) {
        self.grants.invalidate_all();
        self.vault.invalidate_all();
        self.revoked.invalidate_all();
    }

    /// Applies one change notification (see [`Change`]).
    fn apply(&self, payload: &str) {
        match payload.split_once(':') {
            Some(("grant", id)) => self.grants.invalidate(id),
            Some(("vault", key)) => self.vault.invalidate(key),
            Some(("token", jti)) => self.revoked.invalidate(jti),
            _ => self.clear(),
        }
    }
}

/// What changed, as sent on [`CHANGES`].
enum Change<'a> {
    Grant(&'a str),
    AllGrants,
    Vault(&'a str, &'a str),
    Token(&'a str),
}

impl Change<'_> {
    fn payload(&self) -> String {
        match self {
            Self::Grant(id) => format!("grant:{id}"),
            Self::AllGrants => "grants".into(),
            Self::Vault(subject, upstream) => format!("vault:{}", vault_key(subject, upstream)),
            Self::Token(jti) => format!("token:{jti}"),
        }
    }

    /// Queues the notification in `tx`: PostgreSQL delivers it on commit, to every node.
    async fn send(&self, tx: &mut Transaction<'_, Postgres>) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES)
            .bind(self.payload())
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// A request's use with its audit event drafted by the caller.
struct Prepared {
    request: RequestUse,
    draft: Option<(Draft, i64)>,
}

enum UseJob {
    Use(Box<Prepared>, oneshot::Sender<StoreResult<UseVerdict>>),
    Checkpoint(oneshot::Sender<StoreResult<Option<Checkpoint>>>),
}

impl PgStore {
    /// Connects to the database at `url` and applies migrations (nodes starting together
    /// take turns: the migrator holds an advisory lock).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Unavailable(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        let memos = Arc::new(Memos {
            grants: Memo::new(),
            vault: Memo::new(),
            revoked: Memo::new(),
        });
        let signer = Arc::new(SignerSlot::default());
        let (uses, jobs) = flume::bounded(1024);
        tokio::spawn(follow_changes(pool.clone(), Arc::downgrade(&memos)));
        tokio::spawn(writer(pool.clone(), jobs, memos.clone(), signer.clone()));
        let store = Self {
            pool,
            uses,
            signer,
            memos,
        };
        // Events whose change committed but whose move into the chain did not (a node died
        // in between) join the chain now.
        store.flush_outbox().await;
        Ok(store)
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(unavailable)
    }

    /// Ends a management change that nothing in memory holds (see `queries::commit_change`).
    async fn commit_change(
        &self,
        tx: Transaction<'static, Postgres>,
        event: Option<&AuditEvent>,
    ) -> StoreResult<()> {
        self.commit_change_then(tx, event, || ()).await
    }

    /// Ends a management change, running `committed` right after the commit.
    async fn commit_change_then(
        &self,
        tx: Transaction<'static, Postgres>,
        event: Option<&AuditEvent>,
        committed: impl FnOnce() + Send,
    ) -> StoreResult<()> {
        q::commit_change(tx, event, committed, async || self.flush_outbox().await).await
    }

    /// Moves the outbox's events (of every node) into the chain. A failure leaves them there
    /// for the next flush (see `Store`), so it is logged, not returned.
    async fn flush_outbox(&self) {
        if let Err(e) = flush_outbox(&self.pool, self.signer.0.get()).await {
            log_unflushed(&e);
        }
    }
}

/// Appends the events waiting in the outbox to the chain, in their order, and deletes them from
/// it, in one transaction that locks the head first (as every appender does); returns how many
/// moved. A node that waited for the lock sees the rows another node moved meanwhile as gone.
async fn flush_outbox(pool: &PgPool, signer: Option<&CheckpointSigner>) -> StoreResult<usize> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let mut head = lock_head(&mut tx).await?;
    let staged = sqlx::query("SELECT id, event FROM audit_outbox ORDER BY id")
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
    let mut moved = Vec::with_capacity(staged.len());
    let mut rows = AuditRows::default();
    for row in &staged {
        let id = row.int("id")?;
        let mut event = staged_event(id, &row.column::<String>("event")?)?;
        let seq = head.seq + 1;
        let mut line = String::new();
        let at = seal_use_event(
            &mut event,
            None,
            UseVerdict::Recorded,
            seq,
            &head.hash,
            &mut line,
        )
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        head.seq = seq;
        head.hash.clone_from(&event.hash);
        rows.push(seq, event, at, line);
        checkpoint_if_due(&mut tx, signer, &mut head, &mut rows).await?;
        moved.push(id);
    }
    if moved.is_empty() {
        return Ok(0);
    }
    rows.insert(&mut tx).await?;
    // Exactly the rows read: another node's change may commit a lower id after this read (ids
    // are handed out before commit), and a range delete would drop its event unchained.
    sqlx::query("DELETE FROM audit_outbox WHERE id = ANY($1::BIGINT[])")
        .bind(&moved)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    save_head(&mut tx, &head).await?;
    tx.commit().await.map_err(unavailable)?;
    Ok(moved.len())
}

/// Signs a checkpoint in `tx` once [`CHECKPOINT_EVERY_EVENTS`] events passed since the last,
/// inserting the events waiting in `rows` first (a checkpoint's events are in before it).
async fn checkpoint_if_due(
    tx: &mut Transaction<'_, Postgres>,
    signer: Option<&CheckpointSigner>,
    head: &mut Head,
    rows: &mut AuditRows,
) -> StoreResult<()> {
    if head.seq - head.checkpointed >= CHECKPOINT_EVERY_EVENTS
        && let Some(signer) = signer
    {
        rows.insert(tx).await?;
        if insert_checkpoint(tx, signer, head).await? {
            head.checkpointed = head.seq;
        }
    }
    Ok(())
}

/// Listens for other nodes' (and this node's) changes and drops the memos they name. Ends when
/// the store is dropped.
async fn follow_changes(pool: PgPool, memos: std::sync::Weak<Memos>) {
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(CHANGES).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let Some(held) = memos.upgrade() else { return };
        // Whatever changed while not listening is unknown: start from nothing.
        held.clear();
        drop(held);
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for changes; retrying");
                resync.tick().await;
                continue;
            }
        };
        loop {
            tokio::select! {
                received = listener.try_recv() => {
                    let Some(held) = memos.upgrade() else { return };
                    match received {
                        Ok(Some(notification)) => held.apply(notification.payload()),
                        // The connection was lost and will be re-established by the next call;
                        // notifications in between are lost.
                        Ok(None) => held.clear(),
                        Err(e) => {
                            tracing::warn!(error = %e, "change notifications lost; reconnecting");
                            held.clear();
                            break;
                        }
                    }
                }
                _ = resync.tick() => {
                    let Some(held) = memos.upgrade() else { return };
                    held.clear();
                }
            }
        }
    }
}

/// The group-commit task: commits the uses waiting at each moment in one transaction.
async fn writer(
    pool: PgPool,
    jobs: flume::Receiver<UseJob>,
    memos: Arc<Memos>,
    signer: Arc<SignerSlot>,
) {
    while let Ok(first) = jobs.recv_async().await {
        let mut batch = Vec::new();
        let mut pending = Some(first);
        while let Some(job) = pending.take() {
            match job {
                UseJob::Use(request, reply) => batch.push((request, reply)),
                UseJob::Checkpoint(reply) => {
                    // The timer's checkpoint also retries events an earlier flush left behind.
                    if let Err(e) = flush_outbox(&pool, signer.0.get()).await {
                        log_unflushed(&e);
                    }
                    let _ = reply.send(checkpoint_now(&pool, signer.0.get()).await);
                }
            }
            if batch.len() < MAX_USE_BATCH {
                pending = jobs.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let (uses, replies): (Vec<Box<Prepared>>, Vec<_>) = batch.into_iter().unzip();
        let mut result = Err(StoreError::Unavailable("not tried".into()));
        for _ in 0..RETRIES {
            result = record_batch(&pool, &uses, signer.0.get()).await;
            match &result {
                Err(StoreError::Unavailable(message)) if is_retryable(message) => continue,
                _ => break,
            }
        }
        match result {
            Ok(committed) => {
                for id in &committed.spent {
                    memos.grants.invalidate(id);
                }
                for (reply, verdict) in replies.into_iter().zip(committed.verdicts) {
                    let _ = reply.send(Ok(verdict));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed: the requests are refused");
                let message = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
    }
}

/// Deadlocks (40P01) and serialisation failures (40001) are lost races, not failures.
fn is_retryable(message: &str) -> bool {
    message.contains("40P01") || message.contains("40001") || message.contains("deadlock")
}

struct Committed {
    verdicts: Vec<UseVerdict>,
    spent: Vec<String>,
}

/// The chain head, locked for the rest of the transaction.
struct Head {
    seq: u64,
    hash: String,
    checkpointed: u64,
}

async fn lock_head(tx: &mut Transaction<'_, Postgres>) -> StoreResult<Head> {
    let row = sqlx::query("SELECT seq, hash, checkpointed FROM audit_head WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(Head {
        seq: row.int("seq")?.max(0) as u64,
        hash: row.column("hash")?,
        checkpointed: row.int("checkpointed")?.max(0) as u64,
    })
}

async fn save_head(tx: &mut Transaction<'_, Postgres>, head: &Head) -> StoreResult<()> {
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2, checkpointed = $3 WHERE id = 1")
        .bind(head.seq as i64)
        .bind(&head.hash)
        .bind(head.checkpointed as i64)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

async fn insert_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    signer: &CheckpointSigner,
    head: &Head,
) -> StoreResult<bool> {
    let Some(checkpoint) = signer(head.seq, &head.hash) else {
        return Ok(false);
    };
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, ts, kid, sig) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(checkpoint.seq as i64)
    .bind(&checkpoint.hash)
    .bind(&checkpoint.ts)
    .bind(&checkpoint.kid)
    .bind(&checkpoint.sig)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(true)
}

async fn checkpoint_now(
    pool: &PgPool,
    signer: Option<&CheckpointSigner>,
) -> StoreResult<Option<Checkpoint>> {
    if let Some(signer) = signer {
        let mut tx = pool.begin().await.map_err(unavailable)?;
        let mut head = lock_head(&mut tx).await?;
        if head.seq > head.checkpointed && insert_checkpoint(&mut tx, signer, &head).await? {
            head.checkpointed = head.seq;
            save_head(&mut tx, &head).await?;
        }
        tx.commit().await.map_err(unavailable)?;
    }
    let row = sqlx::query(
        "SELECT seq, hash, ts, kid, sig FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .map_err(unavailable)?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

fn checkpoint_from_row(row: &sqlx::postgres::PgRow) -> StoreResult<Checkpoint> {
    Ok(Checkpoint {
        seq: row.int("seq")?.max(0) as u64,
        hash: row.column("hash")?,
        ts: row.column("ts")?,
        kid: row.column("kid")?,
        sig: row.column("sig")?,
    })
}

/// The same rules as the SQLite writer's `record_batch`: per request its one-time values
/// all-or-nothing, its token not revoked, its approval's single use, the grant it exchanges
/// live, one count against its grant, its single use of an action, then its audit event (a deny
/// when the use was refused). Within a batch the earlier of two requests sharing a value claims
/// it. The chain head is locked first, so audited batches of all nodes take turns and never
/// deadlock on each other's rows.
///
/// Each step is one statement for the whole batch (arrays bound with `unnest`): a round trip to
/// the server costs more than the work of a row, so a batch costs the same nine round trips
/// whether it holds one request or sixty-four.
async fn record_batch(
    pool: &PgPool,
    uses: &[Box<Prepared>],
    signer: Option<&CheckpointSigner>,
) -> StoreResult<Committed> {
    use UseVerdict::Recorded;
    let mut verdicts = vec![Recorded; uses.len()];
    let mut claimed: HashSet<&ReplayKey> = HashSet::new();
    let mut candidates = Vec::new();
    for (index, used) in uses.iter().enumerate() {
        let request = &used.request;
        let mut own = HashSet::new();
        let seen = request
            .one_time_values()
            .find(|value| claimed.contains(&value.key) || !own.insert(&value.key));
        match seen {
            Some(value) => verdicts[index] = UseVerdict::Replayed(value.kind),
            None => {
                // A single use only checked claims nothing.
                if let Some(single) = request.single_use.as_ref().filter(|s| !s.spend) {
                    own.remove(&single.value.key);
                }
                claimed.extend(own);
                candidates.push(index);
            }
        }
    }
    let mut spent = Vec::new();
    let has_events = uses.iter().any(|used| used.request.audit.is_some());
    if candidates.is_empty() && !has_events {
        return Ok(Committed { verdicts, spent });
    }
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let mut head = if has_events {
        Some(lock_head(&mut tx).await?)
    } else {
        None
    };

    // One-time values: those already stored come back missing from RETURNING. A single use
    // that is spent goes in with them (of two nodes, one wins) and is deleted again at the end
    // if its request is refused for another reason.
    let (keys, untils): (Vec<&[u8]>, Vec<i64>) = candidates
        .iter()
        .flat_map(|&index| uses[index].request.consumed())
        .map(|value| (value.key.as_slice(), value.keep_until))
        .unzip();
    let inserted: HashSet<Vec<u8>> = if keys.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar(
            "INSERT INTO replay (key, until) SELECT * FROM unnest($1::BYTEA[], $2::BIGINT[]) \
             ON CONFLICT DO NOTHING RETURNING key",
        )
        .bind(&keys)
        .bind(&untils)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?
        .into_iter()
        .collect()
    };
    let mut release: Vec<&[u8]> = Vec::new();
    candidates.retain(|&index| {
        let request = &uses[index].request;
        match request
            .consumed()
            .find(|value| !inserted.contains(value.key.as_slice()))
        {
            None => true,
            Some(value) => {
                verdicts[index] = UseVerdict::Replayed(value.kind);
                release.extend(
                    request
                        .consumed()
                        .map(|value| value.key.as_slice())
                        .filter(|key| inserted.contains(*key)),
                );
                false
            }
        }
    });
    if !release.is_empty() {
        sqlx::query("DELETE FROM replay WHERE key = ANY($1::BYTEA[])")
            .bind(&release)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }

    // Single uses only checked (requests asking for an approval; rare): used → refused.
    let checked: Vec<&[u8]> = candidates
        .iter()
        .filter_map(|&index| uses[index].request.single_use.as_ref())
        .filter(|single| !single.spend)
        .map(|single| single.value.key.as_slice())
        .collect();
    if !checked.is_empty() {
        let used: HashSet<Vec<u8>> =
            sqlx::query_scalar("SELECT key FROM replay WHERE key = ANY($1::BYTEA[])")
                .bind(&checked)
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?
                .into_iter()
                .collect();
        for &index in &candidates {
            if let Some(single) = &uses[index].request.single_use
                && !single.spend
                && used.contains(single.value.key.as_slice())
            {
                verdicts[index] = UseVerdict::Replayed(OneTimeKind::SingleUse);
            }
        }
    }

    // Lock the batch's grants (to count, or to check for an exchange) before anything is
    // spent. A token's revocation locks its grant's row too (`revoke_token`), so the revoked
    // tokens read next, in a statement that starts after this lock was granted, include every
    // revocation of these grants committed before, and a later one waits for this commit.
    let ids: Vec<&str> = candidates
        .iter()
        .filter(|&&index| verdicts[index] == Recorded)
        .flat_map(|&index| {
            let request = &uses[index].request;
            // A new pending approval's grant too: its pending count is read under the lock.
            let pending = request.pending_approval.as_ref().map(|a| &a.grant_id);
            request
                .grant
                .iter()
                .chain(&request.exchanged_grant)
                .chain(pending)
        })
        .map(String::as_str)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // Grant → (requests used, its max), of the grants active and unexpired.
    let mut budgets: HashMap<String, (i64, Option<i64>)> = HashMap::new();
    if !ids.is_empty() {
        let latest = candidates
            .iter()
            .map(|&index| uses[index].request.now)
            .max()
            .unwrap_or(0);
        let rows = sqlx::query(
            "SELECT id, requests_used, max_requests FROM grants \
             WHERE id = ANY($1::TEXT[]) AND status = 'active' AND expires_at > $2 FOR UPDATE",
        )
        .bind(&ids)
        .bind(latest)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        for row in &rows {
            budgets.insert(
                row.column("id")?,
                (row.int("requests_used")?, row.column("max_requests")?),
            );
        }
    }

    // Revoked tokens: one indexed lookup per token, in one statement.
    let tokens: Vec<&str> = candidates
        .iter()
        .filter(|&&index| verdicts[index] == Recorded)
        .filter_map(|&index| uses[index].request.token.as_deref())
        .collect();
    if !tokens.is_empty() {
        let revoked: HashSet<String> =
            sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE jti = ANY($1::TEXT[])")
                .bind(&tokens)
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?
                .into_iter()
                .collect();
        for &index in &candidates {
            if let Some(jti) = &uses[index].request.token
                && revoked.contains(jti)
                && verdicts[index] == Recorded
            {
                verdicts[index] = UseVerdict::TokenRevoked;
            }
        }
    }

    // An approval's single use (rare: one statement each).
    for &index in &candidates {
        let request = &uses[index].request;
        if verdicts[index] != Recorded {
            continue;
        }
        if let Some(approval) = &request.approval {
            let done = sqlx::query(
                "UPDATE approvals SET status = 'used', used_at = $1 \
                 WHERE id = $2 AND status = 'approved' AND expires_at > $1",
            )
            .bind(request.now)
            .bind(approval)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if done.rows_affected() == 0 {
                verdicts[index] = UseVerdict::ApprovalSpent;
            }
        }
    }

    // Budgets: give each request a count in batch order while its grant is active, unexpired
    // and under its max (a grant exchanged must be so too, and is not counted), then add the
    // counts.
    let before: HashMap<String, i64> = budgets
        .iter()
        .map(|(id, (used, _))| (id.clone(), *used))
        .collect();
    let under_max = |budget: Option<&(i64, Option<i64>)>| {
        budget.is_some_and(|(used, max)| max.is_none_or(|max| *used < max))
    };
    for &index in &candidates {
        let request = &uses[index].request;
        if verdicts[index] != Recorded {
            continue;
        }
        if let Some(grant) = request.exchanged_grant.as_deref()
            && !under_max(budgets.get(grant))
        {
            verdicts[index] = UseVerdict::GrantSpent;
            continue;
        }
        let Some(grant) = request.grant.as_deref() else {
            continue;
        };
        match budgets.get_mut(grant) {
            Some((used, max)) if max.is_none_or(|max| *used < max) => *used += 1,
            _ => {
                verdicts[index] = UseVerdict::GrantSpent;
                spent.push(grant.to_owned());
            }
        }
    }
    let (grown, counts): (Vec<&str>, Vec<i64>) = budgets
        .iter()
        .filter_map(|(id, (used, _))| {
            let added = used - before.get(id).copied().unwrap_or(*used);
            (added > 0).then_some((id.as_str(), added))
        })
        .unzip();
    if !grown.is_empty() {
        sqlx::query(
            "UPDATE grants SET requests_used = requests_used + c.added \
             FROM unnest($1::TEXT[], $2::BIGINT[]) AS c(id, added) WHERE grants.id = c.id",
        )
        .bind(&grown)
        .bind(&counts)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    }
    for (id, (used, max)) in &budgets {
        if max.is_some_and(|max| *used >= max) {
            spent.push(id.clone());
        }
    }
    spent.sort();
    spent.dedup();
    for id in &spent {
        Change::Grant(id).send(&mut tx).await?;
    }

    // A single use is consumed only by a use that is recorded.
    let unused: Vec<&[u8]> = candidates
        .iter()
        .filter(|&&index| verdicts[index] != Recorded)
        .filter_map(|&index| uses[index].request.single_use.as_ref())
        .filter(|single| single.spend)
        .map(|single| single.value.key.as_slice())
        .collect();
    if !unused.is_empty() {
        sqlx::query("DELETE FROM replay WHERE key = ANY($1::BYTEA[])")
            .bind(&unused)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }

    // New pending approvals, of the requests recorded (rare: one statement each).
    for &index in &candidates {
        if let (UseVerdict::Recorded, Some(pending)) =
            (verdicts[index], &uses[index].request.pending_approval)
        {
            if pending_limit_reached(&mut tx, pending, uses[index].request.max_pending_approvals)
                .await?
            {
                verdicts[index] = UseVerdict::TooManyPending;
            } else {
                insert_approval(&mut tx, pending).await?;
            }
        }
    }

    if let Some(head) = &mut head {
        let mut rows = AuditRows::default();
        for (used, verdict) in uses.iter().zip(&verdicts) {
            let Some(event) = &used.request.audit else {
                continue;
            };
            let seq = head.seq + 1;
            let mut event = event.clone();
            let mut line = String::new();
            let at = seal_use_event(
                &mut event,
                used.draft.as_ref(),
                *verdict,
                seq,
                &head.hash,
                &mut line,
            )
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            head.seq = seq;
            head.hash = event.hash.clone();
            rows.push(seq, event, at, line);
            checkpoint_if_due(&mut tx, signer, head, &mut rows).await?;
        }
        rows.insert(&mut tx).await?;
        save_head(&mut tx, head).await?;
    }
    tx.commit().await.map_err(unavailable)?;
    Ok(Committed { verdicts, spent })
}

/// Whether `pending`'s grant has `limit` approvals pending already (the SQLite writer's
/// `pending_limit_reached`). The batch locked the grant's row before, so two nodes asking for
/// the same grant at once take turns.
async fn pending_limit_reached(
    tx: &mut Transaction<'_, Postgres>,
    pending: &Approval,
    limit: Option<u32>,
) -> StoreResult<bool> {
    let Some(limit) = limit else {
        return Ok(false);
    };
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM approvals \
         WHERE grant_id = $1 AND status = 'pending' AND expires_at > $2",
    )
    .bind(&pending.grant_id)
    .bind(pending.requested_at)
    .fetch_one(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(count >= i64::from(limit))
}

/// Stores a new pending approval (the SQLite writer's `insert_approval`).
async fn insert_approval(tx: &mut Transaction<'_, Postgres>, a: &Approval) -> StoreResult<()> {
    sqlx::query(&format!(
        "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
    ))
    .bind(&a.id)
    .bind(&a.grant_id)
    .bind(&a.subject)
    .bind(&a.agent)
    .bind(&a.action)
    .bind(&a.upstream)
    .bind(&a.method)
    .bind(&a.path)
    .bind(&a.query)
    .bind(&a.body_sha256)
    .bind(a.body_size)
    .bind(a.status.as_str())
    .bind(a.requested_at)
    .bind(a.expires_at)
    .bind(a.decided_at)
    .bind(&a.approver)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// Audit events waiting to be inserted, as columns.
#[derive(Default)]
struct AuditRows {
    seq: Vec<i64>,
    kind: Vec<String>,
    subject: Vec<Option<String>>,
    actor: Vec<Option<String>>,
    grant_id: Vec<Option<String>>,
    action: Vec<Option<String>>,
    decision: Vec<Option<&'static str>>,
    at: Vec<i64>,
    hash: Vec<String>,
    line: Vec<String>,
}

impl AuditRows {
    fn push(&mut self, seq: u64, event: leash_core::audit::AuditEvent, at: i64, line: String) {
        self.seq.push(seq as i64);
        self.decision.push(event.decision.map(outcome_name));
        self.kind.push(event.kind);
        self.subject.push(event.subject);
        self.actor.push(event.actor);
        self.grant_id.push(event.grant_id);
        self.action.push(event.action);
        self.at.push(at);
        self.hash.push(event.hash);
        self.line.push(line);
    }

    /// Inserts the waiting rows in one statement and empties the buffer.
    async fn insert(&mut self, tx: &mut Transaction<'_, Postgres>) -> StoreResult<()> {
        if self.seq.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(self);
        sqlx::query(
            "INSERT INTO audit_events \
             (seq, kind, subject, actor, grant_id, action, decision, at, hash, line) \
             SELECT * FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
             $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::TEXT[], $10::TEXT[])",
        )
        .bind(rows.seq)
        .bind(rows.kind)
        .bind(rows.subject)
        .bind(rows.actor)
        .bind(rows.grant_id)
        .bind(rows.action)
        .bind(rows.decision)
        .bind(rows.at)
        .bind(rows.hash)
        .bind(rows.line)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the writer has stopped".into())
}

/// The statements shared with the SQLite backend.
pub(crate) mod q {
    crate::queries::shared_queries!(sqlx::Postgres);
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> StoreResult<()> {
        q::ping(&self.pool).await
    }

    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        q::setting(&self.pool, name).await
    }

    async fn init_setting(&self, name: &str, value: &[u8]) -> StoreResult<Vec<u8>> {
        q::insert_setting(&self.pool, name, value).await?;
        q::setting(&self.pool, name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("setting {name} vanished")))
    }

    async fn create_user(
        &self,
        user: &User,
        key: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        q::create_user(&mut *tx, user, key).await?;
        self.commit_change(tx, Some(event)).await
    }

    async fn user_by_key(&self, key: &SecretDigest) -> StoreResult<Option<User>> {
        q::user_by_key(&self.pool, key).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        q::list_users(&self.pool).await
    }

    async fn create_agent(&self, agent: &Agent, event: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        q::create_agent(&mut *tx, agent).await?;
        self.commit_change(tx, Some(event)).await
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        q::agent(&self.pool, id).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        q::list_agents(&self.pool).await
    }

    async fn disable_agent(&self, id: &str, now: i64, event: &AuditEvent) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let found = q::disable_agent_row(&mut *tx, id).await?;
        q::revoke_agent_grants(&mut *tx, id, now).await?;
        Change::AllGrants.send(&mut tx).await?;
        self.commit_change_then(tx, found.then_some(event), || {
            self.memos.grants.invalidate_all();
        })
        .await
        .map(|()| found)
    }

    async fn create_grant(
        &self,
        grant: &Grant,
        handle: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        q::create_grant(&mut *tx, grant, handle).await?;
        self.commit_change(tx, Some(event)).await
    }

    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        q::grant(&self.pool, id).await
    }

    async fn grant_by_handle(&self, handle: &SecretDigest) -> StoreResult<Option<(Grant, Agent)>> {
        q::grant_by_handle(&self.pool, handle).await
    }

    async fn list_grants(&self, subject: Option<&str>) -> StoreResult<Vec<Grant>> {
        q::list_grants(&self.pool, subject).await
    }

    async fn end_grant(
        &self,
        id: &str,
        end: GrantEnd,
        reason: Option<&str>,
        now: i64,
        event: &AuditEvent,
    ) -> StoreResult<Option<Grant>> {
        let mut tx = self.begin().await?;
        let ended = q::end_grant(&mut *tx, id, end, reason, now).await?;
        Change::Grant(id).send(&mut tx).await?;
        self.commit_change_then(tx, ended.is_some().then_some(event), || {
            self.memos.grants.invalidate(id);
        })
        .await
        .map(|()| ended)
    }

    async fn live_grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        if let Some(grant) = self.memos.grants.get(id) {
            return Ok(Some(Grant::clone(&grant)));
        }
        let read_at = self.memos.grants.epoch();
        let grant = self.grant(id).await?;
        if let Some(grant) = &grant {
            self.memos
                .grants
                .fill(grant.id.clone(), Arc::new(grant.clone()), read_at);
        }
        Ok(grant)
    }

    async fn record_use(&self, request: RequestUse) -> StoreResult<UseVerdict> {
        if request.is_empty() {
            return Ok(UseVerdict::Recorded);
        }
        let draft = draft_of(&request)?;
        let (reply, answer) = oneshot::channel();
        self.uses
            .send_async(UseJob::Use(Box::new(Prepared { request, draft }), reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    fn set_checkpoint_signer(&self, signer: CheckpointSigner) {
        let _ = self.signer.0.set(signer);
    }

    async fn checkpoint_now(&self) -> StoreResult<Option<Checkpoint>> {
        let (reply, answer) = oneshot::channel();
        self.uses
            .send_async(UseJob::Checkpoint(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>> {
        q::audit_lines(&self.pool, query).await
    }

    async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>> {
        q::checkpoints(&self.pool, since_seq).await
    }

    async fn action_uses(&self, subject: Option<&str>) -> StoreResult<Vec<ActionUse>> {
        q::action_uses(&self.pool, subject).await
    }

    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        q::approval(&self.pool, id).await
    }

    async fn list_approvals(&self, subject: Option<&str>) -> StoreResult<Vec<Approval>> {
        q::list_approvals(&self.pool, subject).await
    }

    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        approver: &str,
        now: i64,
        event: &AuditEvent,
    ) -> StoreResult<Option<Approval>> {
        let mut tx = self.begin().await?;
        let decided = q::decide_approval(&mut *tx, id, approve, approver, now).await?;
        self.commit_change(tx, decided.is_some().then_some(event))
            .await
            .map(|()| decided)
    }

    async fn put_credential(&self, entry: &VaultEntry, event: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        q::put_credential(&mut *tx, entry).await?;
        Change::Vault(&entry.subject, &entry.upstream)
            .send(&mut tx)
            .await?;
        self.commit_change_then(tx, Some(event), || {
            self.memos
                .vault
                .invalidate(&vault_key(&entry.subject, &entry.upstream));
        })
        .await
    }

    async fn credential(&self, subject: &str, upstream: &str) -> StoreResult<Option<VaultEntry>> {
        let key = vault_key(subject, upstream);
        if let Some(entry) = self.memos.vault.get(&key) {
            return Ok(entry.as_deref().cloned());
        }
        let read_at = self.memos.vault.epoch();
        let entry = q::credential(&self.pool, subject, upstream).await?;
        self.memos
            .vault
            .fill(key, entry.clone().map(Arc::new), read_at);
        Ok(entry)
    }

    async fn list_credentials(&self, subject: &str) -> StoreResult<Vec<VaultEntry>> {
        q::list_credentials(&self.pool, subject).await
    }

    async fn delete_credential(
        &self,
        subject: &str,
        upstream: &str,
        event: &AuditEvent,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let deleted = q::delete_credential(&mut *tx, subject, upstream).await?;
        Change::Vault(subject, upstream).send(&mut tx).await?;
        self.commit_change_then(tx, deleted.then_some(event), || {
            self.memos.vault.invalidate(&vault_key(subject, upstream));
        })
        .await
        .map(|()| deleted)
    }

    async fn revoke_token(
        &self,
        jti: &str,
        grant_id: &str,
        expires_at: i64,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        // In memory first: if the write fails the token is refused here anyway (fail closed).
        self.memos.revoked.invalidate(jti);
        self.memos
            .revoked
            .fill(jti.to_owned(), true, self.memos.revoked.epoch());
        let mut tx = self.begin().await?;
        // The grant's row lock orders the revocation against the commits of the token's
        // requests, which lock it too (`record_batch`): one that locked it first commits
        // before this one; one that waits reads the revocation.
        sqlx::query("SELECT 1 FROM grants WHERE id = $1 FOR SHARE")
            .bind(grant_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        q::revoke_token(&mut *tx, jti, grant_id, expires_at).await?;
        Change::Token(jti).send(&mut tx).await?;
        self.commit_change(tx, Some(event)).await
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        if let Some(revoked) = self.memos.revoked.get(jti) {
            return Ok(revoked);
        }
        let read_at = self.memos.revoked.epoch();
        let revoked = sqlx::query("SELECT 1 FROM revoked_tokens WHERE jti = $1")
            .bind(jti)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .is_some();
        self.memos.revoked.fill(jti.to_owned(), revoked, read_at);
        Ok(revoked)
    }

    async fn prune(&self, now: i64) -> StoreResult<u64> {
        // One statement: PostgreSQL locks only the rows it deletes, so no other write waits.
        let replay = sqlx::query("DELETE FROM replay WHERE until < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
        Ok(replay + q::prune_revoked(&self.pool, now).await?)
    }
}
