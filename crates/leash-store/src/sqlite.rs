//! The embedded SQLite backend. One store owns the database: opening it takes an exclusive
//! lock on `<database>.lock` for the store's life ([`own_database`]), so a second server on the
//! same file fails at start, and what the writer keeps in memory (the one-time values consumed,
//! the revoked tokens) is complete. Two connections write and take turns at SQLite's one write
//! lock: the group-commit writer's (request uses and the audit chain, [`writer`]; its thread,
//! or a caller that finds it idle) and a one-connection pool for management changes; the
//! log's copier (`wal`) has a third. Reads use a pool of read-only connections. WAL with
//! `synchronous = NORMAL`: a commit is in the WAL before it returns, so it survives the process
//! being killed (`kill -9`); only a power cut may lose the last commits.

pub(crate) mod writer;

use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};

use self::writer::{Shared, WriteJob, Writer};
use crate::common::{SignerSlot, unavailable};
use crate::repo::{Backend, Change, Connection, Memos, Prepared, Repo, ask};
use crate::wal::{Checkpointer, WAL_RESTART_BYTES};
use crate::{StoreError, StoreResult, UseVerdict};

/// SQLite-backed [`Store`](crate::Store).
pub type SqliteStore = Repo<Sqlite>;

/// What the SQLite backend holds: its pools, the revoked tokens, and its writer.
#[derive(Debug)]
pub struct Sqlite {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Revoked token `jti`s with their expiry: every revocation of this database goes through
    /// this store (it holds the database's lock), so the set is complete (loaded at open, added
    /// to before the write). The writer refuses a use naming one at its commit.
    revoked: Arc<RwLock<HashMap<String, i64>>>,
    owner: Owner,
}

/// What the store's end ends: the writer thread (through its queue), the copier of the log,
/// and the lock that makes the store the database's one owner. Dropping it closes the queue,
/// waits for the writer to finish what it holds, stops the copier, and only then releases the
/// lock, so that a store opened next never meets a writer still running.
#[derive(Debug)]
struct Owner {
    /// The writer, also used by a caller that finds it idle; dropped (its connection closed)
    /// after its thread has ended and before the lock is released.
    shared: Arc<Shared>,
    jobs: flume::Sender<WriteJob>,
    writer: Option<std::thread::JoinHandle<()>>,
    _checkpointer: Checkpointer,
    /// Held (`flock`) while the store is open; the kernel releases it when the file is closed
    /// or the process dies, `kill -9` included.
    _lock: std::fs::File,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // The writer ends when its queue has no sender left: this was the last one.
        drop(std::mem::replace(&mut self.jobs, flume::bounded(1).0));
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

impl Repo<Sqlite> {
    /// Opens (creating if missing) the database file at `path` and applies migrations.
    pub async fn open(path: &str) -> StoreResult<Self> {
        Self::open_with_wal_limit(path, WAL_RESTART_BYTES).await
    }

    /// The same, with the WAL started over past `restart_at` bytes (tests and the `wal_bound`
    /// benchmark use a small one; `u64::MAX` never starts it over).
    pub async fn open_with_wal_limit(path: &str, restart_at: u64) -> StoreResult<Self> {
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
        let revoked = Arc::new(RwLock::new(revoked));
        let memos = Arc::new(Memos::new());
        let signer = Arc::new(SignerSlot::default());
        let sqlite_error = |e: rusqlite::Error| StoreError::Unavailable(e.to_string());
        let checkpointer = Checkpointer::start(path).map_err(sqlite_error)?;
        let mut chain_writer = Writer::open(
            path,
            restart_at,
            &checkpointer,
            memos.clone(),
            revoked.clone(),
            signer.clone(),
        )
        .map_err(sqlite_error)?;
        // Events whose change committed but whose move into the chain did not (the process
        // died in between) join the chain now.
        chain_writer.flush_or_log();
        let shared = Arc::new(Shared::new(chain_writer));
        let (jobs, queue) = flume::bounded(1024);
        let thread_shared = Arc::clone(&shared);
        let writer_thread = std::thread::Builder::new()
            .name("leash-writer".into())
            .spawn(move || {
                crate::batch_thread::run_as_batch();
                writer::run(thread_shared, queue);
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer: {e}")))?;
        let backend = Sqlite {
            writer,
            reader,
            revoked,
            owner: Owner {
                shared,
                jobs,
                writer: Some(writer_thread),
                _checkpointer: checkpointer,
                _lock: lock,
            },
        };
        Ok(Self::new(backend, memos, signer))
    }
}

impl Repo<Sqlite> {
    /// How many uses were committed on their caller's thread, the writer being idle.
    #[cfg(test)]
    pub(crate) fn uses_committed_by_callers(&self) -> u64 {
        self.backend()
            .owner
            .shared
            .committed_by_callers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// No upkeep of the log due for a while: a lone use is then sure to try its caller's thread.
    #[cfg(test)]
    pub(crate) fn upkeep_checked_just_now(&self) {
        self.backend().owner.shared.upkeep_checked_just_now();
    }
}

impl Backend for Sqlite {
    type Db = sqlx::Sqlite;

    /// The write lock up front (waiting on the busy timeout). A deferred transaction that reads
    /// first (a login looking its human up before creating one) reads a snapshot; if the
    /// writer thread commits before its first write, SQLite refuses that write at once
    /// (`SQLITE_BUSY_SNAPSHOT`, no busy wait), and the change failed as "storage unavailable".
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";

    fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// No other node holds this database.
    async fn announce(&self, _tx: &mut Connection<Self>, _change: &Change<'_>) -> StoreResult<()> {
        Ok(())
    }

    async fn record(&self, used: Box<Prepared>) -> StoreResult<UseVerdict> {
        let used = match self
            .owner
            .shared
            .commit_if_idle(used, self.owner.jobs.is_empty())
        {
            Ok((verdict, _request)) => return verdict,
            Err(used) => used,
        };
        let (verdict, _request) = ask(&self.owner.jobs, |reply| WriteJob::Use(used, reply)).await?;
        verdict
    }

    async fn checkpoint_now(&self) -> StoreResult<Option<leash_core::audit::Checkpoint>> {
        ask(&self.owner.jobs, WriteJob::Checkpoint).await?
    }

    async fn flush_outbox(&self) -> StoreResult<usize> {
        ask(&self.owner.jobs, WriteJob::Flush).await?
    }

    /// `VACUUM INTO`: one read transaction, so the copy holds every commit before it began
    /// (every write the server acknowledged by then) and nothing after; writers go on.
    async fn backup_to(&self, path: &std::path::Path) -> StoreResult<()> {
        let target = path
            .to_str()
            .ok_or_else(|| StoreError::Unavailable("the backup path is not UTF-8".into()))?;
        sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn remember_revoked(&self, jti: &str, expires_at: i64) {
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(jti.to_owned(), expires_at);
    }

    /// SQLite's one write lock orders it: the revocation's write waits for the writer's open
    /// transaction, and the writer's next one sees the token in the set.
    async fn order_revocation(&self, _tx: &mut Connection<Self>, _grant: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        Ok(self
            .revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(jti))
    }

    /// Through the writer, in steps between its commits (see [`writer::PRUNE_STEP`]).
    async fn prune_one_time(&self, now: i64) -> StoreResult<u64> {
        ask(&self.owner.jobs, |reply| WriteJob::Prune(now, reply)).await?
    }

    fn forget_revoked(&self, now: i64) {
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, expires_at| *expires_at >= now);
    }
}
