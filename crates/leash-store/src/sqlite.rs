//! The embedded SQLite backend. One store owns the database: opening it takes an exclusive
//! lock on `<database>.lock` for the store's life ([`own_database`]), so a second server on the
//! same file fails at start, and what the writer keeps in memory (the one-time values consumed,
//! the revoked tokens) is complete. Two connections write and take turns at SQLite's one write
//! lock: the group-commit writer thread's (request uses and the audit chain, [`writer_thread`])
//! and a one-connection pool for management changes; the log's copier (`wal`) has a third.
//! Reads use a pool of read-only connections. WAL with `synchronous = NORMAL`: a commit is in
//! the WAL before it returns, so it survives the process being killed (`kill -9`); only a power
//! cut may lose the last commits.

use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use leash_core::audit::{AuditEvent, Checkpoint, Draft, GENESIS_HASH};
use leash_core::dpop::ReplayKey;
use leash_core::grant::Grant;
use leash_core::secret::SecretDigest;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};
use tokio::sync::oneshot;

use crate::common::{
    APPROVAL_COLUMNS, Memo, SignerSlot, draft_of, log_unflushed, outcome_name, seal_use_event,
    staged_event, unavailable, vault_key,
};
use crate::wal::{Checkpointer, SLOW_WRITER_PAUSE, WAL_RESTART_BYTES, WalBound};
use crate::{
    ActionUse, Agent, Approval, AuditQuery, CHECKPOINT_EVERY_EVENTS, CheckpointSigner, GrantEnd,
    RequestUse, Store, StoreError, StoreResult, UseVerdict, User, VaultEntry,
};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    signer: Arc<SignerSlot>,
    grants: Arc<Memo<Arc<Grant>>>,
    vault: Arc<Memo<Option<Arc<VaultEntry>>>>,
    /// Revoked token `jti`s with their expiry: every revocation of this database goes through
    /// this process (it holds the database's lock), so the set is complete (loaded at open,
    /// added to before the write).
    revoked: Arc<RwLock<HashMap<String, i64>>>,
    /// The writer's queue, its thread, the log's copier and the lock: alive while any handle
    /// to the store is.
    owner: Arc<Owner>,
}

/// What the last handle to a store ends: the writer thread (through its queue), the copier of
/// the log, and the lock that makes this store the database's one owner. Dropping it closes the
/// queue, waits for the writer to finish what it holds, stops the copier, and only then
/// releases the lock, so that a store opened next never meets a writer still running.
#[derive(Debug)]
struct Owner {
    uses: flume::Sender<WriteJob>,
    writer: Option<std::thread::JoinHandle<()>>,
    _checkpointer: Checkpointer,
    /// Held (`flock`) while the store is open; the kernel releases it when the file is closed
    /// or the process dies, `kill -9` included.
    _lock: std::fs::File,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // The writer ends when its queue has no sender left: this was the last one.
        drop(std::mem::replace(&mut self.uses, flume::bounded(1).0));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Takes the lock that makes the caller the one owner of the SQLite database at `path`: an
/// exclusive `flock` on `<path>.lock` (created 0600), or [`StoreError::InUse`] at once if
/// another store holds it, in this process or another.
///
/// One owner is what single use rests on: the writer checks one-time values against its
/// in-memory copy of the `replay` table and revoked tokens against an in-memory set, both
/// complete only because every write to the database goes through this store.
fn own_database(path: &str) -> StoreResult<std::fs::File> {
    let lock = format!("{path}.lock");
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&lock)
        .map_err(|e| StoreError::Unavailable(format!("cannot open the lock file {lock}: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            database: path.to_owned(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("cannot lock {lock}: {e}")))
        }
    }
}

/// Work for the writer thread.
enum WriteJob {
    /// One request's use and where to send the verdict.
    Use(Box<Prepared>, oneshot::Sender<Answer>),
    /// Sign the head now (if it moved) and send back the latest checkpoint.
    Checkpoint(oneshot::Sender<StoreResult<Option<Checkpoint>>>),
    /// Delete the one-time values kept until before `now`; answers how many were deleted.
    Prune(i64, oneshot::Sender<StoreResult<u64>>),
    /// Move the management events waiting in the outbox into the chain; answers how many.
    Flush(oneshot::Sender<StoreResult<usize>>),
}

/// One-time values deleted per transaction while pruning. Deleting a minute of them at a few
/// thousand requests a second in one statement held SQLite's write lock for ≈ 85 ms, and every
/// request waited behind it; a step of this many took about a millisecond with its commit, and
/// the writer commits the requests that arrived before taking the next step.
pub(crate) const PRUNE_STEP: usize = 1024;

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
/// that callers are already waiting when a batch commits: with as many callers as a batch
/// holds, every commit woke them all and the writer sat idle until the first was back (a sixth
/// of its time with 64 callers and batches of 64).
const MAX_USE_BATCH: usize = 48;

/// The longest the writer waits, per transaction, for callers it expects.
const BATCH_LINGER: Duration = Duration::from_micros(300);
/// The longest one wait lasts; an arrival ends it at once.
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

/// The one-time values consumed and not yet pruned, as the `replay` table holds them: every
/// consumption of this database goes through the writer, so the copy is complete (loaded at
/// open, added to when a transaction that consumed values commits). Checking here instead of
/// through a unique key keeps each consumption an append (see migration 0005).
///
/// Keys are kept by their first 16 bytes (of a SHA-256): half the memory, and two distinct
/// values sharing them (a 2^-128 chance per pair) would only refuse a request, never admit one.
#[derive(Debug, Default)]
struct ReplaySet {
    until: HashMap<[u8; 16], i64>,
    /// The `seq` of the next row: above every stored one, so rows never collide.
    next_seq: i64,
}

impl ReplaySet {
    fn load(conn: &rusqlite::Connection) -> rusqlite::Result<Self> {
        let mut set = Self::default();
        let mut statement = conn.prepare("SELECT key, until, seq FROM replay")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            // A key of another length is not one Leash wrote: refuse to start on it rather than
            // leave that value unprotected.
            let key = stored_key(row)?;
            set.insert(&key, row.get(1)?);
            set.next_seq = set.next_seq.max(row.get::<_, i64>(2)?.saturating_add(1));
        }
        Ok(set)
    }

    fn short(key: &ReplayKey) -> [u8; 16] {
        let mut short = [0; 16];
        short.copy_from_slice(&key[..16]);
        short
    }

    fn contains(&self, key: &ReplayKey) -> bool {
        self.until.contains_key(&Self::short(key))
    }

    fn insert(&mut self, key: &ReplayKey, until: i64) {
        let kept = self.until.entry(Self::short(key)).or_insert(until);
        *kept = (*kept).max(until);
    }

    /// Forgets a value whose row a prune at `now` deleted, unless a value sharing its short
    /// key is kept past `now` (that one's row is still stored).
    fn forget(&mut self, key: &ReplayKey, now: i64) {
        let short = Self::short(key);
        if self.until.get(&short).is_some_and(|until| *until < now) {
            self.until.remove(&short);
        }
    }

    /// Gives back the memory of a burst that has passed.
    fn shrink(&mut self) {
        if self.until.capacity() > 4 * self.until.len().max(1024) {
            self.until.shrink_to_fit();
        }
    }
}

/// A prune under way: it goes on in steps between the writer's other work.
struct Pruning {
    now: i64,
    deleted: u64,
    /// Every caller waiting for it (a prune asked for while one runs joins it, with the later
    /// time).
    replies: Vec<oneshot::Sender<StoreResult<u64>>>,
}

impl Pruning {
    /// `Err` carries the failure's message, given to every caller.
    fn answer(self, result: Result<u64, &str>) {
        for reply in self.replies {
            let _ = reply.send(result.map_err(|e| StoreError::Unavailable(e.to_owned())));
        }
    }
}

/// What the writer thread shares with the store.
struct Writer {
    conn: rusqlite::Connection,
    head: ChainHead,
    /// Only the writer reads and changes it: every consumption and every prune is its work.
    replay: ReplaySet,
    grants: Arc<Memo<Arc<Grant>>>,
    /// The store's revoked tokens: a use naming one is refused at its commit. Added to before a
    /// revocation is written, and that write waits for the writer's open transaction (SQLite has
    /// one write lock), so a revocation that has returned is seen by every later commit.
    revoked: Arc<RwLock<HashMap<String, i64>>>,
    signer: Arc<SignerSlot>,
    wal: WalBound,
}

/// Group commit: one thread owns these writes (request uses and the audit chain) and records
/// every request that arrives while its transaction is open in that transaction, so concurrent
/// token and gateway calls share a commit. It has its own connection (rusqlite, same SQLite
/// library as sqlx) and works synchronously: through sqlx every statement is a hand-off to its
/// worker thread and back, which under load cost ≈ 300 µs per commit of four statements.
fn writer_thread(mut writer: Writer, jobs: flume::Receiver<WriteJob>) {
    let mut waiting = None;
    let mut last_batch = 1;
    let mut pruning: Option<Pruning> = None;
    loop {
        let job = match (waiting.take(), &pruning) {
            (Some(job), _) => job,
            // A prune goes on only while nothing else waits.
            (None, Some(_)) => match jobs.try_recv() {
                Ok(job) => job,
                Err(flume::TryRecvError::Empty) => {
                    writer.prune_step(&mut pruning);
                    continue;
                }
                Err(flume::TryRecvError::Disconnected) => return,
            },
            (None, None) => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        match job {
            WriteJob::Checkpoint(reply) => {
                // The timer's checkpoint also retries events an earlier flush left behind.
                writer.flush_or_log();
                let _ = reply.send(writer.checkpoint_now());
            }
            WriteJob::Flush(reply) => {
                let _ = reply.send(writer.flush_outbox());
            }
            WriteJob::Prune(now, reply) => match &mut pruning {
                Some(under_way) => {
                    under_way.now = under_way.now.max(now);
                    under_way.replies.push(reply);
                }
                None => {
                    pruning = Some(Pruning {
                        now,
                        deleted: 0,
                        replies: vec![reply],
                    });
                }
            },
            WriteJob::Use(used, reply) => {
                let mut arrivals = Arrivals {
                    jobs: &jobs,
                    expected: last_batch,
                    waited: Duration::ZERO,
                    interrupted: None,
                };
                last_batch = writer.commit_batch(used, reply, &mut arrivals);
                waiting = arrivals.interrupted;
                writer.wal.keep(&writer.conn);
                // Under unbroken load the queue is never empty: one step per batch.
                writer.prune_step(&mut pruning);
            }
        }
    }
}

/// The uses that join an open transaction. Each is recorded as soon as it is taken, so the
/// writer works while its batch fills instead of waiting for the batch first (which, with as
/// many callers as the batch holds, left it idle while they made their next requests). Under
/// steady load the last batch's callers are on their way back: while fewer than that have
/// joined and none is waiting, the writer waits for the next (up to `LINGER_STEP`), for as long
/// as each wait brought one and within `BATCH_LINGER` of waiting per transaction. A commit's
/// fixed cost is then shared by the whole load; when the load drops, one short wait finds
/// nobody and the next batch expects fewer. The wait is a receive with a timeout, not a sleep:
/// under load, 30 µs sleeps were seen to last 2–7 ms (the thread waited for a core), and
/// every request already in the transaction waited with it; an arrival now wakes the writer.
struct Arrivals<'a> {
    jobs: &'a flume::Receiver<WriteJob>,
    expected: usize,
    waited: Duration,
    /// A job of another kind that ended the batch; handled after the commit.
    interrupted: Option<WriteJob>,
}

impl Arrivals<'_> {
    /// The next use for a transaction that holds `joined` already; `None` to commit.
    fn next(&mut self, joined: usize) -> Option<(Box<Prepared>, oneshot::Sender<Answer>)> {
        if joined >= MAX_USE_BATCH || self.interrupted.is_some() {
            return None;
        }
        let job = match self.jobs.try_recv() {
            Ok(job) => job,
            Err(_) if joined >= self.expected || self.waited >= BATCH_LINGER => return None,
            Err(_) => {
                let started = std::time::Instant::now();
                let arrived = self.jobs.recv_timeout(LINGER_STEP);
                self.waited += started.elapsed();
                arrived.ok()?
            }
        };
        match job {
            WriteJob::Use(used, reply) => Some((used, reply)),
            other => {
                self.interrupted = Some(other);
                None
            }
        }
    }
}

/// A use in the open transaction, with its caller and (once recorded) its verdict.
struct Joined {
    used: Box<Prepared>,
    reply: oneshot::Sender<Answer>,
    verdict: UseVerdict,
}

impl Writer {
    /// Records `first` and the uses that join it in one transaction, commits, and answers each
    /// caller. Returns how many uses the transaction held.
    fn commit_batch(
        &mut self,
        first: Box<Prepared>,
        reply: oneshot::Sender<Answer>,
        arrivals: &mut Arrivals<'_>,
    ) -> usize {
        let mut joined = Vec::with_capacity(MAX_USE_BATCH);
        joined.push(Joined {
            used: first,
            reply,
            verdict: UseVerdict::Recorded,
        });
        let started = std::time::Instant::now();
        let result = record_batch(
            &mut self.conn,
            &mut joined,
            arrivals,
            &self.head,
            self.signer.0.get(),
            &self.replay,
            &self.revoked,
        );
        let took = started.elapsed();
        if took > SLOW_WRITER_PAUSE {
            tracing::warn!(
                ms = took.as_millis() as u64,
                requests = joined.len(),
                "slow commit: the disk held up every request waiting on it"
            );
        }
        let count = joined.len();
        match result {
            Ok(committed) => {
                self.head = committed.head;
                for (key, until) in &committed.consumed {
                    self.replay.insert(key, *until);
                }
                self.replay.next_seq += committed.consumed.len() as i64;
                // A grant whose budget ran out must not stay live in memory.
                for id in committed.spent {
                    self.grants.invalidate(&id);
                }
                for Joined {
                    used,
                    reply,
                    verdict,
                } in joined
                {
                    let _ = reply.send((Ok(verdict), used));
                }
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "commit failed: the requests are refused");
                for Joined { used, reply, .. } in joined {
                    let _ = reply.send((Err(StoreError::Unavailable(message.clone())), used));
                }
            }
        }
        count
    }

    /// Deletes up to [`PRUNE_STEP`] expired one-time values of the prune under way, if any, in
    /// one transaction, and forgets them; answers its callers once a step finds fewer.
    fn prune_step(&mut self, pruning: &mut Option<Pruning>) {
        let Some(under_way) = pruning.as_mut() else {
            return;
        };
        let now = under_way.now;
        match delete_expired(&mut self.conn, now) {
            Ok(keys) => {
                for key in &keys {
                    self.replay.forget(key, now);
                }
                under_way.deleted += keys.len() as u64;
                if keys.len() < PRUNE_STEP
                    && let Some(done) = pruning.take()
                {
                    self.replay.shrink();
                    let deleted = done.deleted;
                    done.answer(Ok(deleted));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "pruning one-time values failed");
                if let Some(failed) = pruning.take() {
                    failed.answer(Err(&e.to_string()));
                }
            }
        }
    }

    /// Appends the events waiting in the outbox to the chain, in their order, and deletes them
    /// from it, in one transaction; returns how many moved.
    fn flush_outbox(&mut self) -> StoreResult<usize> {
        let fail = |e: rusqlite::Error| StoreError::Unavailable(e.to_string());
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(fail)?;
        let mut head = self.head.clone();
        let moved = {
            let staged = tx
                .prepare_cached("SELECT id, event FROM audit_outbox ORDER BY id")
                .map_err(fail)?
                .query_map([], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(fail)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(fail)?;
            if staged.is_empty() {
                return Ok(0);
            }
            let mut statements = UseStatements::prepare(&tx).map_err(fail)?;
            // Exactly the rows read (as on PostgreSQL, where a range would be wrong; here the
            // write lock held since the read makes either right).
            let mut taken = tx
                .prepare_cached("DELETE FROM audit_outbox WHERE id = ?1")
                .map_err(fail)?;
            for (id, text) in &staged {
                let mut used = Prepared {
                    request: RequestUse {
                        audit: Some(staged_event(*id, text)?),
                        ..RequestUse::default()
                    },
                    draft: None,
                };
                statements
                    .append_event(&mut used, UseVerdict::Recorded, &mut head)
                    .map_err(fail)?;
                checkpoint_if_due(&tx, self.signer.0.get(), &mut head).map_err(fail)?;
                taken.execute([id]).map_err(fail)?;
            }
            staged.len()
        };
        tx.commit().map_err(fail)?;
        self.head = head;
        Ok(moved)
    }

    /// [`Self::flush_outbox`] where nobody waits for the answer: a failure is logged, and the
    /// events stay in the outbox for the next try.
    fn flush_or_log(&mut self) {
        if let Err(e) = self.flush_outbox() {
            log_unflushed(&e);
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

/// Signs a checkpoint in `tx` once [`CHECKPOINT_EVERY_EVENTS`] events passed since the last.
fn checkpoint_if_due(
    tx: &rusqlite::Transaction<'_>,
    signer: Option<&CheckpointSigner>,
    head: &mut ChainHead,
) -> rusqlite::Result<()> {
    if head.seq - head.checkpointed >= CHECKPOINT_EVERY_EVENTS
        && let Some(signer) = signer
        && insert_checkpoint(tx, signer, head)?.is_some()
    {
        head.checkpointed = head.seq;
    }
    Ok(())
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

/// A stored one-time value's key, the row's first column; one of another length is an error.
fn stored_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReplayKey> {
    let key: Vec<u8> = row.get(0)?;
    ReplayKey::try_from(key.as_slice()).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, e.into())
    })
}

/// Deletes the oldest [`PRUNE_STEP`] (at most) one-time values kept until before `now`, in one
/// transaction; returns their keys. Rows are ordered by `(until, seq)`: a step finds the last
/// row it deletes and deletes the range up to it, one stretch at the start of the table (an
/// `IN (SELECT …)` of the same rows took a third longer).
fn delete_expired(conn: &mut rusqlite::Connection, now: i64) -> rusqlite::Result<Vec<ReplayKey>> {
    use rusqlite::OptionalExtension as _;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let keys = {
        let last: Option<(i64, i64)> = tx
            .prepare_cached(
                "SELECT until, seq FROM replay WHERE until < ?1 ORDER BY until, seq \
                 LIMIT 1 OFFSET ?2",
            )?
            .query_row(rusqlite::params![now, PRUNE_STEP as i64 - 1], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        let (statement, bounds) = match last {
            Some((until, seq)) => (
                "DELETE FROM replay WHERE (until, seq) <= (?1, ?2) RETURNING key",
                vec![until, seq],
            ),
            None => (
                "DELETE FROM replay WHERE until < ?1 RETURNING key",
                vec![now],
            ),
        };
        let mut delete = tx.prepare_cached(statement)?;
        let rows = delete.query_map(rusqlite::params_from_iter(bounds), stored_key)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    tx.commit()?;
    Ok(keys)
}

/// The writer's connection: the same durability as the pools, and no checkpoints.
pub(crate) fn open_writer_connection(path: &str) -> rusqlite::Result<rusqlite::Connection> {
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
    /// Grants whose budget this batch used up.
    spent: Vec<String>,
    /// The chain head after the batch's events.
    head: ChainHead,
    /// The one-time values the batch consumed (each stored as a row), with the time until
    /// which each is kept.
    consumed: HashMap<ReplayKey, i64>,
}

/// Records each use in one transaction: the first of `joined`, then each arrival as it is
/// taken. Per request: its one-time values all-or-nothing, then one count against its grant,
/// then its audit event (a deny when the use was refused). Within a transaction the earlier of
/// two requests sharing a value claims it, even if that request then fails on another of its
/// values: the later one is refused (fail closed).
fn record_batch(
    conn: &mut rusqlite::Connection,
    joined: &mut Vec<Joined>,
    arrivals: &mut Arrivals<'_>,
    head: &ChainHead,
    signer: Option<&CheckpointSigner>,
    replay: &ReplaySet,
    revoked: &RwLock<HashMap<String, i64>>,
) -> rusqlite::Result<Committed> {
    // IMMEDIATE: take the write lock up front (waiting on the busy timeout), so the transaction
    // never has to upgrade a read snapshot that another writer moved past.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut spent = Vec::new();
    let mut consumed = HashMap::new();
    let mut head = head.clone();
    {
        let mut statements = UseStatements::prepare(&tx)?;
        let mut index = 0;
        loop {
            let Joined { used, verdict, .. } = &mut joined[index];
            *verdict =
                statements.record_use(&used.request, replay, revoked, &mut consumed, &mut spent)?;
            if let (UseVerdict::Recorded, Some(pending)) =
                (*verdict, &used.request.pending_approval)
            {
                if pending_limit_reached(&tx, pending, used.request.max_pending_approvals)? {
                    *verdict = UseVerdict::TooManyPending;
                } else {
                    insert_approval(&tx, pending)?;
                }
            }
            statements.append_event(used, *verdict, &mut head)?;
            checkpoint_if_due(&tx, signer, &mut head)?;
            index += 1;
            match arrivals.next(joined.len()) {
                Some((used, reply)) => joined.push(Joined {
                    used,
                    reply,
                    verdict: UseVerdict::Recorded,
                }),
                None => break,
            }
        }
    }
    tx.commit()?;
    Ok(Committed {
        spent,
        head,
        consumed,
    })
}

/// The writer's statements, prepared once per transaction.
struct UseStatements<'tx> {
    remember: rusqlite::CachedStatement<'tx>,
    count: rusqlite::CachedStatement<'tx>,
    exchanged: rusqlite::CachedStatement<'tx>,
    use_approval: rusqlite::CachedStatement<'tx>,
    append: rusqlite::CachedStatement<'tx>,
    /// The stored line of the event being appended, reused from one event to the next.
    line: String,
}

impl<'tx> UseStatements<'tx> {
    fn prepare(tx: &'tx rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            remember: tx
                .prepare_cached("INSERT INTO replay (until, seq, key) VALUES (?1, ?2, ?3)")?,
            count: tx.prepare_cached(
                "UPDATE grants SET requests_used = requests_used + 1 \
                 WHERE id = ?1 AND status = 'active' AND expires_at > ?2 \
                 AND (max_requests IS NULL OR requests_used < max_requests) \
                 RETURNING requests_used, max_requests",
            )?,
            // The same conditions as `count`, without counting.
            exchanged: tx.prepare_cached(
                "SELECT 1 FROM grants WHERE id = ?1 AND status = 'active' AND expires_at > ?2 \
                 AND (max_requests IS NULL OR requests_used < max_requests)",
            )?,
            // The approval's single use: a compare-and-set, so of N parallel retries one wins.
            use_approval: tx.prepare_cached(
                "UPDATE approvals SET status = 'used', used_at = ?1 \
                 WHERE id = ?2 AND status = 'approved' AND expires_at > ?1",
            )?,
            append: tx.prepare_cached(
                "INSERT INTO audit_events \
                 (seq, kind, subject, actor, grant_id, action, decision, at, hash, line) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?,
            line: String::new(),
        })
    }

    /// One request's one-time values, token, approval, grant count and single use; `replay`
    /// holds the values committed before this transaction and `claimed` those of the requests
    /// before it in it. A request with any value seen before consumes none of its values; one
    /// refused later on (a revoked token, a spent grant or approval) has consumed those of
    /// `once` but not its single use, and nothing else.
    fn record_use(
        &mut self,
        request: &RequestUse,
        replay: &ReplaySet,
        revoked: &RwLock<HashMap<String, i64>>,
        claimed: &mut HashMap<ReplayKey, i64>,
        spent: &mut Vec<String>,
    ) -> rusqlite::Result<UseVerdict> {
        use rusqlite::OptionalExtension as _;
        let mut own = HashSet::new();
        let seen = request.one_time_values().find(|value| {
            replay.contains(&value.key)
                || claimed.contains_key(&value.key)
                || !own.insert(value.key)
        });
        if let Some(value) = seen {
            return Ok(UseVerdict::Replayed(value.kind));
        }
        for value in &request.once {
            self.claim(claimed, replay, &value.key, value.keep_until)?;
        }
        if let Some(jti) = &request.token
            && revoked
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(jti)
        {
            return Ok(UseVerdict::TokenRevoked);
        }
        if let Some(approval) = &request.approval
            && self
                .use_approval
                .execute(rusqlite::params![request.now, approval])?
                == 0
        {
            return Ok(UseVerdict::ApprovalSpent);
        }
        if let Some(grant) = &request.exchanged_grant
            && !self
                .exchanged
                .exists(rusqlite::params![grant, request.now])?
        {
            return Ok(UseVerdict::GrantSpent);
        }
        if let Some(grant) = &request.grant {
            let counted = self
                .count
                .query_row(rusqlite::params![grant, request.now], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, Option<i64>>(1)?))
                })
                .optional()?;
            match counted {
                None => {
                    spent.push(grant.clone());
                    return Ok(UseVerdict::GrantSpent);
                }
                Some((used, max)) => {
                    if max.is_some_and(|max| used >= max) {
                        spent.push(grant.clone());
                    }
                }
            }
        }
        if let Some(single) = request.single_use.filter(|single| single.spend) {
            self.claim(claimed, replay, &single.value.key, single.value.keep_until)?;
        }
        Ok(UseVerdict::Recorded)
    }

    /// Stores one consumed value as the next row after the stored ones and those claimed in
    /// this transaction.
    fn claim(
        &mut self,
        claimed: &mut HashMap<ReplayKey, i64>,
        replay: &ReplaySet,
        key: &ReplayKey,
        until: i64,
    ) -> rusqlite::Result<()> {
        let seq = replay.next_seq + claimed.len() as i64;
        claimed.insert(*key, until);
        self.remember
            .execute(rusqlite::params![until, seq, key.as_slice()])?;
        Ok(())
    }

    /// Appends the request's audit event, if it has one, after `head`.
    fn append_event(
        &mut self,
        used: &mut Prepared,
        verdict: UseVerdict,
        head: &mut ChainHead,
    ) -> rusqlite::Result<()> {
        let Prepared { request, draft } = used;
        let Some(event) = request.audit.as_mut() else {
            return Ok(());
        };
        let seq = head.seq + 1;
        let at = seal_use_event(
            event,
            draft.as_ref(),
            verdict,
            seq,
            &head.hash,
            &mut self.line,
        )
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let decision = event.decision.map(outcome_name);
        self.append.execute(rusqlite::params![
            seq as i64,
            event.kind,
            event.subject,
            event.actor,
            event.grant_id,
            event.action,
            decision,
            at,
            event.hash,
            self.line
        ])?;
        head.seq = seq;
        head.hash.clone_from(&event.hash);
        Ok(())
    }
}

/// Whether `pending`'s grant has `limit` approvals pending already (asked rarely: prepared only
/// when one comes).
fn pending_limit_reached(
    conn: &rusqlite::Connection,
    pending: &Approval,
    limit: Option<u32>,
) -> rusqlite::Result<bool> {
    let Some(limit) = limit else {
        return Ok(false);
    };
    let count: i64 = conn.prepare_cached(PENDING_OF_GRANT_SQLITE)?.query_row(
        rusqlite::params![pending.grant_id, pending.requested_at],
        |row| row.get(0),
    )?;
    Ok(count >= i64::from(limit))
}

/// Approvals of a grant still pending (not decided, not expired) at a time.
const PENDING_OF_GRANT_SQLITE: &str = "SELECT count(*) FROM approvals \
     WHERE grant_id = ?1 AND status = 'pending' AND expires_at > ?2";

/// Stores a new pending approval (rare: its statement is prepared only when one comes).
fn insert_approval(conn: &rusqlite::Connection, a: &Approval) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
    ))?
    .execute(rusqlite::params![
        a.id,
        a.grant_id,
        a.subject,
        a.agent,
        a.action,
        a.upstream,
        a.method,
        a.path,
        a.query,
        a.body_sha256,
        a.body_size,
        a.status.as_str(),
        a.requested_at,
        a.expires_at,
        a.decided_at,
        a.approver,
    ])?;
    Ok(())
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the writer has stopped".into())
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and applies migrations.
    pub async fn open(path: &str) -> StoreResult<Self> {
        Self::open_with_wal_limit(path, WAL_RESTART_BYTES).await
    }

    /// The same, with the WAL started over past `restart_at` bytes (tests use a small one).
    pub(crate) async fn open_with_wal_limit(path: &str, restart_at: u64) -> StoreResult<Self> {
        let lock = own_database(path)?;
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // The writers never checkpoint on their own: a checkpoint syncs the database file, and
        // on the writer that stall would land on every request waiting for the group commit. A
        // separate connection checkpoints in the background instead (see `wal`).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
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
        let sqlite_error = |e: rusqlite::Error| StoreError::Unavailable(e.to_string());
        let conn = open_writer_connection(path).map_err(sqlite_error)?;
        let head = ChainHead::load(&conn).map_err(sqlite_error)?;
        let replay = ReplaySet::load(&conn).map_err(sqlite_error)?;
        let checkpointer = Checkpointer::start(path).map_err(sqlite_error)?;
        let wal = WalBound::attach(&conn, path, restart_at, &checkpointer).map_err(sqlite_error)?;
        let signer = Arc::new(SignerSlot::default());
        let revoked = Arc::new(RwLock::new(revoked));
        let mut chain_writer = Writer {
            conn,
            head,
            replay,
            grants: grants.clone(),
            revoked: revoked.clone(),
            signer: signer.clone(),
            wal,
        };
        // Events whose change committed but whose move into the chain did not (the process
        // died in between) join the chain now.
        chain_writer.flush_or_log();
        let writer_thread = std::thread::Builder::new()
            .name("leash-writer".into())
            .spawn(move || writer_thread(chain_writer, jobs))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            writer,
            owner: Arc::new(Owner {
                uses,
                writer: Some(writer_thread),
                _checkpointer: checkpointer,
                _lock: lock,
            }),
            reader,
            signer,
            grants,
            vault: Arc::new(Memo::new()),
            revoked,
        })
    }
}

impl SqliteStore {
    async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.writer.begin().await.map_err(unavailable)
    }

    /// Ends a management change that nothing in memory holds (see `queries::commit_change`).
    async fn commit_change(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        event: Option<&AuditEvent>,
    ) -> StoreResult<()> {
        self.commit_change_then(tx, event, || ()).await
    }

    /// Ends a management change, running `committed` right after the commit.
    async fn commit_change_then(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        event: Option<&AuditEvent>,
        committed: impl FnOnce() + Send,
    ) -> StoreResult<()> {
        q::commit_change(tx, event, committed, async || self.flush_outbox().await).await
    }

    /// Asks the writer to move the outbox's events into the chain. A failure leaves them there
    /// for the next flush (see `Store`), so it is logged, not returned.
    async fn flush_outbox(&self) {
        let (reply, answer) = oneshot::channel();
        let moved = match self.owner.uses.send_async(WriteJob::Flush(reply)).await {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        if let Err(e) = moved {
            log_unflushed(&e);
        }
    }
}

/// The statements shared with the PostgreSQL backend.
pub(crate) mod q {
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
        q::user_by_key(&self.reader, key).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        q::list_users(&self.reader).await
    }

    async fn create_agent(&self, agent: &Agent, event: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        q::create_agent(&mut *tx, agent).await?;
        self.commit_change(tx, Some(event)).await
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        q::agent(&self.reader, id).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        q::list_agents(&self.reader).await
    }

    async fn disable_agent(&self, id: &str, now: i64, event: &AuditEvent) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let found = q::disable_agent_row(&mut *tx, id).await?;
        q::revoke_agent_grants(&mut *tx, id, now).await?;
        self.commit_change_then(tx, found.then_some(event), || self.grants.invalidate_all())
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
        event: &AuditEvent,
    ) -> StoreResult<Option<Grant>> {
        let mut tx = self.begin().await?;
        let ended = q::end_grant(&mut *tx, id, end, reason, now).await?;
        self.commit_change_then(tx, ended.is_some().then_some(event), || {
            self.grants.invalidate(id);
        })
        .await
        .map(|()| ended)
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

    async fn record_use(&self, mut request: RequestUse) -> StoreResult<UseVerdict> {
        if request.is_empty() {
            return Ok(UseVerdict::Recorded);
        }
        let draft = draft_of(&request)?;
        if let Some(event) = &mut request.audit {
            // The writer writes the hash into this; the request comes back to be freed here.
            event.hash.reserve(GENESIS_HASH.len());
        }
        let (reply, answer) = oneshot::channel();
        self.owner
            .uses
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
        self.owner
            .uses
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
        self.commit_change_then(tx, Some(event), || {
            self.vault
                .invalidate(&vault_key(&entry.subject, &entry.upstream));
        })
        .await
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

    async fn delete_credential(
        &self,
        subject: &str,
        upstream: &str,
        event: &AuditEvent,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let deleted = q::delete_credential(&mut *tx, subject, upstream).await?;
        self.commit_change_then(tx, deleted.then_some(event), || {
            self.vault.invalidate(&vault_key(subject, upstream));
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
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(jti.to_owned(), expires_at);
        let mut tx = self.begin().await?;
        q::revoke_token(&mut *tx, jti, grant_id, expires_at).await?;
        self.commit_change(tx, Some(event)).await
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        Ok(self
            .revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(jti))
    }

    async fn prune(&self, now: i64) -> StoreResult<u64> {
        // Through the writer, in steps between its commits (see `PRUNE_STEP`).
        let (reply, answer) = oneshot::channel();
        self.owner
            .uses
            .send_async(WriteJob::Prune(now, reply))
            .await
            .map_err(|_| stopped())?;
        let replay = answer.await.map_err(|_| stopped())??;
        let tokens = q::prune_revoked(&self.writer, now).await?;
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, expires_at| *expires_at >= now);
        Ok(replay + tokens)
    }
}

#[cfg(test)]
mod replay_tests {
    #![allow(clippy::unwrap_used, reason = "tests abort loudly on failure")]

    use leash_core::dpop::ReplayKey;

    use super::ReplaySet;

    /// Migration 0005 keeps the values consumed before it, and the writer's copy loads them.
    #[test]
    fn values_consumed_before_the_migration_stay_consumed() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        for migration in [
            include_str!("../migrations/sqlite/0001_foundation.sql"),
            include_str!("../migrations/sqlite/0002_gateway.sql"),
            include_str!("../migrations/sqlite/0003_approvals.sql"),
            include_str!("../migrations/sqlite/0004_audit.sql"),
        ] {
            conn.execute_batch(migration).unwrap();
        }
        let old = leash_core::dpop::replay_key("dpop", "jkt", "before");
        conn.execute(
            "INSERT INTO replay (key, until) VALUES (?1, 500)",
            [old.as_slice()],
        )
        .unwrap();
        conn.execute_batch(include_str!(
            "../migrations/sqlite/0005_replay_in_arrival_order.sql"
        ))
        .unwrap();

        let mut set = ReplaySet::load(&conn).unwrap();
        assert!(set.contains(&old));
        let new = leash_core::dpop::replay_key("dpop", "jkt", "after");
        assert!(!set.contains(&new));
        assert_eq!(set.next_seq, 2, "new rows come after the migrated one");
        // A prune deletes what is kept until before its time, and the copy forgets that.
        assert!(super::delete_expired(&mut conn, 500).unwrap().is_empty());
        assert_eq!(super::delete_expired(&mut conn, 501).unwrap(), vec![old]);
        set.forget(&old, 501);
        assert!(!set.contains(&old));
        for step in [
            "SELECT until, seq FROM replay WHERE until < 1 ORDER BY until, seq LIMIT 1 OFFSET 9",
            "DELETE FROM replay WHERE (until, seq) <= (1, 2)",
            "DELETE FROM replay WHERE until < 1",
        ] {
            let plan: String = conn
                .query_row(&format!("EXPLAIN QUERY PLAN {step}"), [], |row| row.get(3))
                .unwrap();
            assert!(
                plan.contains("SEARCH") && plan.contains("PRIMARY KEY"),
                "a prune step scans the table: {step}: {plan}"
            );
        }
    }

    /// Two values sharing their short key: pruning the one that expired must not forget the
    /// one still kept (its row is still stored, and a replay of it must still be refused).
    #[test]
    fn pruning_one_value_keeps_another_with_the_same_short_key() {
        let expired: ReplayKey = [1; 32];
        let mut kept: ReplayKey = [1; 32];
        kept[31] = 2;
        let mut set = ReplaySet::default();
        set.insert(&expired, 10);
        set.insert(&kept, 50);
        set.forget(&expired, 20);
        assert!(set.contains(&kept));
        set.forget(&kept, 51);
        assert!(!set.contains(&kept));
    }

    /// A stored key Leash cannot have written is refused, not skipped: skipping would leave
    /// that value unprotected.
    #[test]
    fn a_malformed_stored_key_is_refused_at_open() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE replay (until INTEGER NOT NULL, seq INTEGER NOT NULL, key BLOB NOT NULL, \
             PRIMARY KEY (until, seq)) WITHOUT ROWID;
             INSERT INTO replay VALUES (10, 0, x'0102');",
        )
        .unwrap();
        assert!(ReplaySet::load(&conn).is_err());
    }
}
