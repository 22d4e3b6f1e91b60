//! Upkeep of SQLite's write-ahead log for the embedded store: a background thread copies the
//! log into the database file, and the writer starts the log over once it is large. Public so
//! that the audit benchmark holds its bare SQLite insert to exactly the store's upkeep.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often the background thread copies the log into the database file. Short, so that the
/// log's restart (see [`WalBound`]) finds little left to copy on the writer's time: under load
/// the copying is done here, beside the writer, not by it.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Size of the write-ahead log past which the writer starts it over.
pub const WAL_RESTART_BYTES: u64 = 64 << 20;

/// How often the writer looks at the size of the log: at a few hundred MB/s of commits the log
/// overshoots its limit by what this interval writes.
const WAL_CHECK_EVERY: Duration = Duration::from_millis(25);

/// A thread that copies the write-ahead log into the database file with `PASSIVE` checkpoints,
/// which never wait for the writer or readers (pages a reader still needs wait for the next
/// round). Dropping the handle stops it and waits for a round in progress to end, so that
/// nothing of it touches the database afterwards.
#[derive(Debug)]
pub struct Checkpointer {
    stop: Option<flume::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts copying the log of the database at `db_path` every [`CHECKPOINT_EVERY`].
    ///
    /// # Errors
    /// When the database cannot be opened or the thread cannot start.
    pub fn start(db_path: &str) -> rusqlite::Result<Self> {
        let conn = rusqlite::Connection::open(db_path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let (stop, stopped) = flume::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("leash-checkpoint".into())
            .spawn(move || {
                // Nothing is ever sent: the wait ends in a timeout, or in disconnection when
                // the handle is dropped.
                while let Err(flume::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                    }
                }
            })
            .map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("cannot start the checkpointer: {e}").into(),
                )
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Keeps the write-ahead log bounded; owned by the one writing connection.
///
/// The log only starts over when a write finds every frame copied back and no reader in it, a
/// moment that unbroken load never leaves, so the passive checkpointer alone lets it (and the
/// shared-memory index every connection maps) grow without end: a soak run reached 37 GB in
/// six minutes. Past the limit, the writer itself, between two commits, runs a `RESTART`
/// checkpoint: it waits (busy timeout) for readers to leave the log, copies what the background
/// rounds have not (at most [`CHECKPOINT_EVERY`] of writes) and syncs. The next commit writes
/// the log from its start again, over the file's existing blocks (cheaper than growing a
/// truncated file anew), and `journal_size_limit` trims the file to the limit, so the file only
/// grows past the limit when the log in it does.
#[derive(Debug)]
pub struct WalBound {
    path: PathBuf,
    restart_at: u64,
    checked: Instant,
}

impl WalBound {
    /// Bounds the log of the database at `db_path`, written through `conn`, to about
    /// `restart_at` bytes.
    ///
    /// # Errors
    /// When the connection refuses the size limit.
    pub fn attach(
        conn: &rusqlite::Connection,
        db_path: &str,
        restart_at: u64,
    ) -> rusqlite::Result<Self> {
        let kept = i64::try_from(restart_at).unwrap_or(i64::MAX);
        conn.pragma_update(None, "journal_size_limit", kept)?;
        Ok(Self {
            path: format!("{db_path}-wal").into(),
            restart_at,
            checked: Instant::now(),
        })
    }

    /// Starts the log over if it has passed its limit; called by the writer between commits.
    /// The commits waiting meanwhile pay that pause: it is the price of a bounded log.
    pub fn keep(&mut self, conn: &rusqlite::Connection) {
        if self.checked.elapsed() < WAL_CHECK_EVERY {
            return;
        }
        self.checked = Instant::now();
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size <= self.restart_at {
            return;
        }
        let started = Instant::now();
        let busy = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
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
}
