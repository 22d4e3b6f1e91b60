//! The SQLite group-commit writer: one thread, on its own connection, records the request
//! uses and appends the audit chain, and records every use that arrives while its transaction
//! is open in that transaction, so that concurrent token and gateway calls share a commit. It
//! uses rusqlite (the same SQLite library as sqlx) and works synchronously: through sqlx every
//! statement would be a hand-off to a worker thread and back. What a batch decides is decided
//! by the shared rules (`rules`); this module asks the database and writes what they decided.
//! A use that finds the writer idle is committed by the same code on its caller's thread
//! ([`Shared::commit_if_idle`]), under the mutex the thread takes for each of its jobs.
//!
//! The writer owns what single use rests on here: its copy of the `replay` table
//! ([`ReplaySet`]) is complete because every consumption and every prune is its work, and the
//! store holds the database's lock, so no other process writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use leash_core::audit::Checkpoint;
use leash_core::dpop::ReplayKey;
use rusqlite::OptionalExtension as _;
use tokio::sync::oneshot;

use crate::chain::ChainHead;
use crate::common::{
    APPROVAL_COLUMNS, SignerSlot, headers_json, log_unflushed, outcome_name, staged_event,
};
use crate::repo::{Answer, Memos, Prepared};
use crate::rules::{Batch, Budget, Facts};
use crate::wal::{Checkpointer, SLOW_WRITER_PAUSE, WalBound};
use crate::{CheckpointSigner, RequestUse, StoreError, StoreResult, UseVerdict};

/// Work for the writer thread.
pub(crate) enum WriteJob {
    /// One request's use and where to send the verdict.
    Use(Box<Prepared>, oneshot::Sender<Answer>),
    /// Sign the head now (if it moved) and send back the latest checkpoint.
    Checkpoint(oneshot::Sender<StoreResult<Option<Checkpoint>>>),
    /// Delete the one-time values kept until before `now`; answers how many were deleted.
    Prune(i64, oneshot::Sender<StoreResult<u64>>),
    /// Move the management events waiting in the outbox into the chain; answers how many.
    Flush(oneshot::Sender<StoreResult<usize>>),
}

impl std::fmt::Debug for WriteJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Use(..) => "Use",
            Self::Checkpoint(_) => "Checkpoint",
            Self::Prune(..) => "Prune",
            Self::Flush(_) => "Flush",
        })
    }
}

/// One-time values deleted per transaction while pruning. A prune holds SQLite's write lock
/// while it deletes, and every request waits behind it: in steps of this many (about a
/// millisecond each with its commit), the requests that arrived meanwhile are committed between
/// two steps.
pub(crate) const PRUNE_STEP: usize = 1024;

/// Most requests committed in one transaction. Below the concurrency a loaded server sees, so
/// that callers are already waiting when a batch commits: with as many callers as a batch
/// holds, every commit would wake them all and leave the writer idle until the first is back.
const MAX_USE_BATCH: usize = 48;

/// The longest the writer waits, per transaction, for callers it expects.
const BATCH_LINGER: Duration = Duration::from_micros(300);
/// The longest one wait lasts; an arrival ends it at once.
const LINGER_STEP: Duration = Duration::from_micros(30);

/// How long the writer's connection waits for SQLite's write lock (held by a management change).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A use whose caller finds the writer idle, with no other use arrived for this long, is
/// committed on the caller's own thread ([`Shared::commit_if_idle`]) if the writer thread's
/// last transaction held one use too. Under load, uses arrive closer than this (a request's own
/// work is about 0.1 ms of CPU), the writer thread's transactions hold several, and uses keep
/// going through it, whose group commit shares one transaction among them. The gap alone is not
/// enough: a pinned server at its peak finishes a whole batch's requests before the next use
/// arrives, and would commit that one alone after every batch.
const IDLE_AFTER: Duration = Duration::from_micros(200);

/// The chain's head as stored.
fn load_head(conn: &rusqlite::Connection) -> rusqlite::Result<ChainHead> {
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
    let mut head = ChainHead::default();
    if let Some((seq, hash)) = last {
        head.seq = seq.max(0) as u64;
        head.hash = hash;
    }
    head.checkpointed = checkpointed.unwrap_or(0).max(0) as u64;
    Ok(head)
}

/// The one-time values consumed and not yet pruned, as the `replay` table holds them: every
/// consumption of this database goes through the writer, so the copy is complete (loaded at
/// open, added to when a transaction that consumed values commits). Checking here instead of
/// through a unique key keeps each consumption an append (see migration 0005).
///
/// Keys are kept by their first 16 bytes (of a SHA-256): half the memory, and two distinct
/// values sharing them (a 2^-128 chance per pair) would only refuse a request, never admit one.
#[derive(Debug, Default)]
pub(crate) struct ReplaySet {
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

/// What the writer thread owns, and what it shares with the store.
pub(crate) struct Writer {
    conn: rusqlite::Connection,
    head: ChainHead,
    /// Only the writer reads and changes it: every consumption and every prune is its work.
    replay: ReplaySet,
    memos: Arc<Memos>,
    /// The store's revoked tokens: a use naming one is refused at its commit. Added to before a
    /// revocation is written, and that write waits for the writer's open transaction (SQLite has
    /// one write lock), so a revocation that has returned is seen by every later commit.
    revoked: Arc<RwLock<HashMap<String, i64>>>,
    signer: Arc<SignerSlot>,
    wal: WalBound,
}

impl Writer {
    /// The writer of the database at `path`, with its log bounded to about `restart_at` bytes
    /// and copied by `checkpointer`.
    pub(crate) fn open(
        path: &str,
        restart_at: u64,
        checkpointer: &Checkpointer,
        memos: Arc<Memos>,
        revoked: Arc<RwLock<HashMap<String, i64>>>,
        signer: Arc<SignerSlot>,
    ) -> rusqlite::Result<Self> {
        let conn = open_writer_connection(path)?;
        let head = load_head(&conn)?;
        let replay = ReplaySet::load(&conn)?;
        let wal = WalBound::attach(&conn, path, restart_at, checkpointer)?;
        Ok(Self {
            conn,
            head,
            replay,
            memos,
            revoked,
            signer,
            wal,
        })
    }
}

/// The writer and what tells whether it is idle, shared by its thread and the store, which
/// commits a lone use on the caller's thread when the writer is idle: at a fleet's load (a
/// request every millisecond or so) each use is alone in its transaction anyway, and handing it
/// to the writer thread and back is two thread wake-ups, on an idle machine each a core woken
/// from sleep, on the request's time.
pub(crate) struct Shared {
    writer: Mutex<Writer>,
    /// When the last use arrived, in microseconds since `started`.
    last_arrival: AtomicU64,
    /// How many uses the writer thread's last transaction held: as many are expected to join
    /// its next (see `Arrivals`), and only after one alone may a caller commit.
    last_batch: AtomicUsize,
    started: Instant,
    /// Uses committed on their caller's thread (tests look).
    pub(crate) committed_by_callers: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared(writer)")
    }
}

impl Shared {
    pub(crate) fn new(writer: Writer) -> Self {
        Self {
            writer: Mutex::new(writer),
            last_arrival: AtomicU64::new(0),
            last_batch: AtomicUsize::new(1),
            started: Instant::now(),
            committed_by_callers: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// No upkeep of the log due for a while (tests of the caller's-thread commit).
    #[cfg(test)]
    pub(crate) fn upkeep_checked_just_now(&self) {
        self.lock().wal.checked_just_now();
    }

    fn now_micros(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Commits `used` alone on the calling thread if the writer is idle: no job queued, its
    /// thread not at work (the lock free) and its last transaction of one use, no other use
    /// arrived within [`IDLE_AFTER`], no upkeep of the log due (that stays on the writer
    /// thread), and SQLite's write lock free at once (a management change holding it may need
    /// this very thread to finish, so the caller never waits for it here). Otherwise hands
    /// `used` back, for the writer thread.
    ///
    /// The commit is the writer thread's, made under the same lock: one transaction, the same
    /// rules, chain and copies of the consumed values and revoked tokens.
    pub(crate) fn commit_if_idle(
        &self,
        used: Box<Prepared>,
        queue_empty: bool,
    ) -> Result<Answer, Box<Prepared>> {
        let now = self.now_micros();
        let gap = now.saturating_sub(self.last_arrival.swap(now, Ordering::Relaxed));
        let quiet =
            gap >= IDLE_AFTER.as_micros() as u64 && self.last_batch.load(Ordering::Relaxed) == 1;
        if !(queue_empty && quiet) {
            return Err(used);
        }
        let Ok(mut writer) = self.writer.try_lock() else {
            return Err(used);
        };
        if writer.wal.upkeep_due() {
            return Err(used);
        }
        let answer = writer.commit_batch(used, None, None, Lock::NowOrNever);
        drop(writer);
        match answer {
            Committed::Alone(answer) => {
                self.committed_by_callers.fetch_add(1, Ordering::Relaxed);
                Ok(answer)
            }
            Committed::NotBegun(used) => Err(used),
            Committed::Answered(_) => {
                unreachable!("a use committed alone has no reply channel")
            }
        }
    }
}

/// The writer thread: takes jobs until the store is dropped (its queue closes).
pub(crate) fn run(shared: Arc<Shared>, jobs: flume::Receiver<WriteJob>) {
    let mut waiting = None;
    let mut pruning: Option<Pruning> = None;
    loop {
        let job = match (waiting.take(), &pruning) {
            (Some(job), _) => job,
            // A prune goes on only while nothing else waits.
            (None, Some(_)) => match jobs.try_recv() {
                Ok(job) => job,
                Err(flume::TryRecvError::Empty) => {
                    shared.lock().prune_step(&mut pruning);
                    continue;
                }
                Err(flume::TryRecvError::Disconnected) => return,
            },
            (None, None) => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut writer = shared.lock();
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
                    expected: shared.last_batch.load(Ordering::Relaxed),
                    waited: Duration::ZERO,
                    interrupted: None,
                };
                if let Committed::Answered(count) =
                    writer.commit_batch(used, Some(reply), Some(&mut arrivals), Lock::Wait)
                {
                    shared.last_batch.store(count, Ordering::Relaxed);
                }
                waiting = arrivals.interrupted;
                let writer = &mut *writer;
                writer.wal.keep(&writer.conn);
                // Under unbroken load the queue is never empty: one step per batch.
                writer.prune_step(&mut pruning);
            }
        }
    }
}

/// The uses that join an open transaction. Each is recorded as soon as it is taken, so the
/// writer works while its batch fills instead of waiting for the batch first. Under steady load
/// the last batch's callers are on their way back: while fewer than that have joined and none
/// is waiting, the writer waits for the next (up to `LINGER_STEP`), for as long as each wait
/// brought one and within `BATCH_LINGER` of waiting per transaction. A commit's fixed cost is
/// then shared by the whole load; when the load drops, one short wait finds nobody and the next
/// batch expects fewer. The wait is a receive with a timeout, not a sleep, so an arrival wakes
/// the writer at once: a sleeping thread waits for a core when it wakes, on a busy machine far
/// longer than it slept, and every request already in the transaction waits with it.
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
    /// `None` for a use committed on its caller's thread: answered by the return value.
    reply: Option<oneshot::Sender<Answer>>,
    verdict: UseVerdict,
}

/// How a transaction of uses takes SQLite's write lock.
#[derive(Debug, Clone, Copy)]
enum Lock {
    /// Waiting up to [`BUSY_TIMEOUT`] for a management change that holds it (the writer thread).
    Wait,
    /// Only if it is free now (a caller's thread, see [`Shared::commit_if_idle`]).
    NowOrNever,
}

/// What [`Writer::commit_batch`] did.
enum Committed {
    /// Committed (or failed) and answered every caller through its reply; how many there were.
    Answered(usize),
    /// The one use without a reply channel, with its answer.
    Alone(Answer),
    /// The write lock was not free at once: nothing was done.
    NotBegun(Box<Prepared>),
}

impl Writer {
    /// Records `first` and the uses that join it (from `arrivals`) in one transaction, commits,
    /// and answers each caller: through its reply, or, for a `first` without one, in the
    /// return value.
    fn commit_batch(
        &mut self,
        first: Box<Prepared>,
        reply: Option<oneshot::Sender<Answer>>,
        arrivals: Option<&mut Arrivals<'_>>,
        lock: Lock,
    ) -> Committed {
        let tx = match begin(&self.conn, lock) {
            Ok(tx) => tx,
            Err(_) if matches!(lock, Lock::NowOrNever) => return Committed::NotBegun(first),
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "commit failed: the requests are refused");
                let failed = (Err(StoreError::Unavailable(message)), first);
                return match reply {
                    Some(reply) => {
                        let _ = reply.send(failed);
                        Committed::Answered(1)
                    }
                    None => Committed::Alone(failed),
                };
            }
        };
        let mut joined = Vec::with_capacity(if arrivals.is_some() { MAX_USE_BATCH } else { 1 });
        joined.push(Joined {
            used: first,
            reply,
            verdict: UseVerdict::Recorded,
        });
        let started = std::time::Instant::now();
        let result = record_batch(
            tx,
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
        let result = match result {
            Ok((batch, head)) => {
                self.head = head;
                for (key, until) in batch.claims() {
                    self.replay.insert(key, *until);
                }
                self.replay.next_seq += batch.claims().len() as i64;
                // A grant whose budget ran out must not stay live in memory.
                for id in batch.spent() {
                    self.memos.grants.invalidate(id);
                }
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "commit failed: the requests are refused");
                Err(message)
            }
        };
        let mut alone = None;
        for Joined {
            used,
            reply,
            verdict,
        } in joined
        {
            let answer = match &result {
                Ok(()) => (Ok(verdict), used),
                Err(message) => (Err(StoreError::Unavailable(message.clone())), used),
            };
            match reply {
                Some(reply) => {
                    let _ = reply.send(answer);
                }
                None => alone = Some(answer),
            }
        }
        match alone {
            Some(answer) => Committed::Alone(answer),
            None => Committed::Answered(count),
        }
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
            // Exactly the rows read (the write lock held since the read makes a range right
            // too, but not on PostgreSQL, which deletes the same way).
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
    pub(crate) fn flush_or_log(&mut self) {
        if let Err(e) = self.flush_outbox() {
            log_unflushed(&e);
        }
    }

    fn checkpoint_now(&mut self) -> StoreResult<Option<Checkpoint>> {
        let fail = |e: rusqlite::Error| StoreError::Unavailable(e.to_string());
        if let Some(checkpoint) = self.head.new_checkpoint(self.signer.0.get()) {
            let tx = self.conn.transaction().map_err(fail)?;
            insert_checkpoint(&tx, &checkpoint).map_err(fail)?;
            tx.commit().map_err(fail)?;
            self.head.checkpointed = self.head.seq;
        }
        latest_checkpoint(&self.conn).map_err(fail)
    }
}

fn insert_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    checkpoint: &Checkpoint,
) -> rusqlite::Result<()> {
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
    Ok(())
}

/// Signs and stores the checkpoint due at `head`, if any ([`ChainHead::due_checkpoint`]).
fn checkpoint_if_due(
    tx: &rusqlite::Transaction<'_>,
    signer: Option<&CheckpointSigner>,
    head: &mut ChainHead,
) -> rusqlite::Result<()> {
    if let Some(checkpoint) = head.due_checkpoint(signer) {
        insert_checkpoint(tx, &checkpoint)?;
        head.checkpointed = head.seq;
    }
    Ok(())
}

fn latest_checkpoint(conn: &rusqlite::Connection) -> rusqlite::Result<Option<Checkpoint>> {
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
/// row it deletes and deletes the range up to it, one stretch at the start of the table (which
/// costs less than an `IN (SELECT …)` of the same rows).
fn delete_expired(conn: &mut rusqlite::Connection, now: i64) -> rusqlite::Result<Vec<ReplayKey>> {
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
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// A transaction of uses, begun `IMMEDIATE`: it takes the write lock up front, so it never has
/// to upgrade a read snapshot that another writer moved past. With [`Lock::NowOrNever`] SQLite
/// is told not to wait for the lock (and to wait again afterwards).
fn begin(conn: &rusqlite::Connection, lock: Lock) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    let immediate = rusqlite::TransactionBehavior::Immediate;
    match lock {
        Lock::Wait => rusqlite::Transaction::new_unchecked(conn, immediate),
        Lock::NowOrNever => {
            conn.busy_timeout(Duration::ZERO)?;
            let begun = rusqlite::Transaction::new_unchecked(conn, immediate);
            conn.busy_timeout(BUSY_TIMEOUT)?;
            begun
        }
    }
}

/// Records each use in one transaction: the first of `joined`, then each arrival as it is
/// taken. The rules judge each request as it comes; its one-time values and its audit event
/// (a deny when the use was refused) are written at once, so the writer works while the batch
/// fills, and what the batch spends, counts and stores once all have joined. Returns the
/// batch's decisions and the chain's head after it.
fn record_batch(
    tx: rusqlite::Transaction<'_>,
    joined: &mut Vec<Joined>,
    mut arrivals: Option<&mut Arrivals<'_>>,
    head: &ChainHead,
    signer: Option<&CheckpointSigner>,
    replay: &ReplaySet,
    revoked: &RwLock<HashMap<String, i64>>,
) -> rusqlite::Result<(Batch, ChainHead)> {
    let mut batch = Batch::default();
    let mut head = head.clone();
    {
        let mut statements = UseStatements::prepare(&tx)?;
        let mut facts = Known {
            tx: &tx,
            replay,
            revoked,
        };
        let mut index = 0;
        loop {
            let Joined { used, verdict, .. } = &mut joined[index];
            let written = batch.claims().len();
            *verdict = batch.judge(&used.request, &mut facts)?;
            for (offset, (key, until)) in batch.claims().iter().enumerate().skip(written) {
                statements.remember(replay.next_seq + offset as i64, key, *until)?;
            }
            statements.append_event(used, *verdict, &mut head)?;
            checkpoint_if_due(&tx, signer, &mut head)?;
            index += 1;
            let next = arrivals
                .as_deref_mut()
                .and_then(|arrivals| arrivals.next(joined.len()));
            match next {
                Some((used, reply)) => joined.push(Joined {
                    used,
                    reply: Some(reply),
                    verdict: UseVerdict::Recorded,
                }),
                None => break,
            }
        }
        write_spending(&tx, &batch)?;
    }
    tx.commit()?;
    Ok((batch, head))
}

/// What the database held before the batch, for the rules: the writer's copies of the
/// consumed values and the revoked tokens, and statements in the batch's transaction (which
/// writes what it spends and counts only after the last request is judged).
struct Known<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    replay: &'a ReplaySet,
    revoked: &'a RwLock<HashMap<String, i64>>,
}

impl Facts for Known<'_> {
    type Error = rusqlite::Error;

    fn consumed(&mut self, key: &ReplayKey) -> rusqlite::Result<bool> {
        Ok(self.replay.contains(key))
    }

    fn revoked(&mut self, jti: &str) -> rusqlite::Result<bool> {
        Ok(self
            .revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(jti))
    }

    fn approved_until(&mut self, id: &str) -> rusqlite::Result<Option<i64>> {
        self.tx
            .prepare_cached(
                "SELECT expires_at FROM approvals WHERE id = ?1 AND status = 'approved'",
            )?
            .query_row([id], |row| row.get(0))
            .optional()
    }

    fn budget(&mut self, grant: &str) -> rusqlite::Result<Option<Budget>> {
        self.tx
            .prepare_cached(
                "SELECT requests_used, max_requests, expires_at FROM grants \
                 WHERE id = ?1 AND status = 'active'",
            )?
            .query_row([grant], |row| {
                Ok(Budget {
                    used: row.get(0)?,
                    max: row.get(1)?,
                    expires_at: row.get(2)?,
                })
            })
            .optional()
    }

    fn pending_approvals(&mut self, grant: &str, at: i64) -> rusqlite::Result<u64> {
        let count: i64 = self
            .tx
            .prepare_cached(
                "SELECT count(*) FROM approvals \
                 WHERE grant_id = ?1 AND status = 'pending' AND expires_at > ?2",
            )?
            .query_row(rusqlite::params![grant, at], |row| row.get(0))?;
        Ok(count.max(0) as u64)
    }
}

/// Writes what the batch spends, counts and stores: the approvals used, the grants' counts and
/// the new pending approvals (statements prepared only when a batch has some).
fn write_spending(tx: &rusqlite::Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    for (id, at) in batch.approvals_used() {
        tx.prepare_cached("UPDATE approvals SET status = 'used', used_at = ?1 WHERE id = ?2")?
            .execute(rusqlite::params![at, id])?;
    }
    for (id, added) in batch.counts() {
        tx.prepare_cached("UPDATE grants SET requests_used = requests_used + ?1 WHERE id = ?2")?
            .execute(rusqlite::params![added, id])?;
    }
    for a in batch.approvals_new() {
        tx.prepare_cached(&format!(
            "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
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
            headers_json(&a.headers),
            a.headers_sha256,
            a.previewed,
        ])?;
    }
    for (id, sealed) in batch.previews_new() {
        tx.prepare_cached("INSERT INTO approval_previews (id, sealed) VALUES (?1, ?2)")?
            .execute(rusqlite::params![id, sealed])?;
    }
    Ok(())
}

/// The writer's statements for every use, prepared once per transaction.
struct UseStatements<'tx> {
    remember: rusqlite::CachedStatement<'tx>,
    append: rusqlite::CachedStatement<'tx>,
    /// The stored line of the event being appended, reused from one event to the next.
    line: String,
}

impl<'tx> UseStatements<'tx> {
    fn prepare(tx: &'tx rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            remember: tx
                .prepare_cached("INSERT INTO replay (until, seq, key) VALUES (?1, ?2, ?3)")?,
            append: tx.prepare_cached(
                "INSERT INTO audit_events \
                 (seq, kind, subject, actor, grant_id, action, decision, at, hash, line) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?,
            line: String::new(),
        })
    }

    /// Stores one consumed value as row `seq`: after the stored ones and those claimed before
    /// it in this transaction, so that rows of one `until` are appended in order.
    fn remember(&mut self, seq: i64, key: &ReplayKey, until: i64) -> rusqlite::Result<()> {
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
        let (seq, at) = head
            .append(event, draft.as_ref(), verdict, &mut self.line)
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
        Ok(())
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
            include_str!("../../migrations/sqlite/0001_foundation.sql"),
            include_str!("../../migrations/sqlite/0002_gateway.sql"),
            include_str!("../../migrations/sqlite/0003_approvals.sql"),
            include_str!("../../migrations/sqlite/0004_audit.sql"),
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
            "../../migrations/sqlite/0005_replay_in_arrival_order.sql"
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
