//! Upkeep of SQLite's write-ahead log for the embedded store: a background thread copies the
//! log into the database file, and the writer starts the log over once it is large. Public so
//! that the audit benchmark holds its bare SQLite insert to exactly the store's upkeep.
//!
//! The store runs SQLite in WAL mode with `synchronous = NORMAL`: a commit is in the log before
//! it returns, so it survives `kill -9` of the process. Copying the log back into the database
//! file (a checkpoint) syncs that file, so it is kept off the writer's time, where every request
//! waiting for the group commit would wait with it:
//! - a thread with its own connection ([`Checkpointer`]) runs `wal_checkpoint(PASSIVE)` every
//!   [`CHECKPOINT_EVERY`], at a CPU priority below the process's: the copying can wait (the log
//!   holds the pages meanwhile), the writer and the request handlers cannot;
//! - passive checkpoints alone never let the log start over under unbroken load (that needs a
//!   moment with every frame copied and no reader in the log), so the log, and the shared-memory
//!   index every connection maps, would grow without end. Once the log passes
//!   [`WAL_RESTART_BYTES`], the writer ([`WalBound`]) asks that thread to copy round after round
//!   until a round finds little left (a few pages, or rounds that stopped shrinking) and to
//!   flush the pages it copied to the database file (SQLite syncs that file only after a round
//!   that copied the whole log, which under load is the restart alone); then the writer itself,
//!   between two commits, runs `wal_checkpoint(RESTART)`: a pause of about one small copy and a
//!   sync, where copying and syncing a whole log on the writer's time would hold every waiting
//!   request up for as long. If the thread cannot catch up within `CATCH_UP_WAIT` (a reader
//!   pinning old pages), the writer restarts the log anyway;
//! - the log's length is the thread's count at each round, not the file's size: the file is
//!   written again from its start after a restart and trimmed only past twice the limit
//!   (`journal_size_limit`), and after each round the thread asks the kernel to read back the
//!   pages it dropped from its cache of the part of the file the log has not reached since its
//!   restart (`POSIX_FADV_WILLNEED`): frames are not block aligned, so a frame written over a
//!   dropped block would first read it, synchronously, on the writer's time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the background thread copies the log into the database file.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Size of the write-ahead log past which the writer starts it over.
pub const WAL_RESTART_BYTES: u64 = 64 << 20;

/// How often the writer looks at the size of the log: at a few hundred MB/s of commits the log
/// overshoots its limit by what this interval writes.
const WAL_CHECK_EVERY: Duration = Duration::from_millis(25);

/// A round of the background thread that copied at most this many pages found the log caught
/// up: what is left for the writer's restart is about one round of writes, which the restart
/// copies and syncs while every request waits on the writer, so the fewer the better. Rounds
/// shrink fast (the next copies what was written during a shorter round), so going on until one
/// copies this few costs a round or two.
const CAUGHT_UP_PAGES: i64 = 32;

/// Under heavy writes the rounds stop shrinking above [`CAUGHT_UP_PAGES`]: one that copied at
/// most this many pages and no fewer than three quarters of the round before counts as caught
/// up too, as further rounds would not shorten the restart.
const CONVERGED_PAGES: i64 = 256;

/// Whether a catch-up round that copied `this_round` pages, after one that copied
/// `previous_round`, leaves little enough for the writer's restart.
fn caught_up(this_round: i64, previous_round: i64) -> bool {
    this_round <= CAUGHT_UP_PAGES
        || (this_round <= CONVERGED_PAGES && 4 * this_round >= 3 * previous_round)
}

/// Pages a round copied, from the log's copied count after it and after the round before;
/// a log restarted in between counts from its start.
fn copied_this_round(copied: i64, copied_before: i64) -> i64 {
    if copied >= copied_before {
        copied - copied_before
    } else {
        copied
    }
}

/// The longest the writer lets the log run past its limit waiting for the background thread to
/// catch up (a reader pinning old pages can hold it back); then it restarts the log itself.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// A pause of the writer (a commit or a restart of the log) longer than this is logged: every
/// request waiting on the writer sat through it.
pub(crate) const SLOW_WRITER_PAUSE: Duration = Duration::from_millis(100);

/// What the background thread and the writer tell each other.
#[derive(Debug, Default)]
struct Signals {
    stop: AtomicBool,
    /// Set by the writer: the log passed its limit; copy without pause until caught up.
    restart_wanted: AtomicBool,
    /// Set by the background thread: little is left to copy, restart now.
    caught_up: AtomicBool,
    /// Set by the background thread after each round: the log's length in bytes then.
    log_bytes: AtomicU64,
}

/// A thread that copies the write-ahead log into the database file with `PASSIVE` checkpoints,
/// which never wait for the writer or readers (pages a reader still needs wait for the next
/// round): every [`CHECKPOINT_EVERY`], and round after round while the writer waits to restart
/// the log. Dropping the handle stops it and waits for a round in progress to end, so that
/// nothing of it touches the database afterwards.
#[derive(Debug)]
pub struct Checkpointer {
    signals: Arc<Signals>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts copying the log of the database at `db_path`.
    ///
    /// # Errors
    /// When the database cannot be opened or the thread cannot start.
    pub fn start(db_path: &str) -> rusqlite::Result<Self> {
        let conn = rusqlite::Connection::open(db_path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let signals = Arc::new(Signals::default());
        let shared = Arc::clone(&signals);
        let files = LogFiles {
            db: PathBuf::from(db_path),
            wal: wal_path(db_path),
        };
        let thread = std::thread::Builder::new()
            .name("leash-checkpoint".into())
            .spawn(move || {
                crate::batch_thread::run_as_batch();
                copy_rounds(&conn, &files, &shared);
            })
            .map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("cannot start the checkpointer: {e}").into(),
                )
            })?;
        Ok(Self {
            signals,
            thread: Some(thread),
        })
    }

    fn wake(&self) {
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.signals.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How far below the process's CPU priority the copying thread runs (a nice increment).
const COPY_NICENESS: i32 = 10;

/// Lowers the calling thread's CPU priority by [`COPY_NICENESS`], so that on a busy machine the
/// copying (which can wait: the log holds the pages meanwhile) yields the CPU to the writer and
/// the request handlers it would otherwise take turns with on a machine of few cores. It still
/// gets a share under full load, and past the log's limit the writer restarts the log itself
/// after [`CATCH_UP_WAIT`]. Lowering one's own priority needs no privilege; if refused anyway (a
/// seccomp filter), the thread runs at the normal priority.
fn yield_to_requests() {
    #[cfg(target_os = "linux")]
    {
        // On Linux the "process" priority calls take a thread id and act on that thread only.
        let me = Some(rustix::thread::gettid());
        let lowered = rustix::process::getpriority_process(me).and_then(|now| {
            rustix::process::setpriority_process(me, (now + COPY_NICENESS).min(19))
        });
        if let Err(e) = lowered {
            tracing::debug!(error = %e, "cannot lower the WAL copier's priority");
        }
    }
}

/// SQLite's WAL header, before the first frame.
const WAL_HEADER_BYTES: u64 = 32;
/// Each frame's header, before its page.
const FRAME_HEADER_BYTES: u64 = 24;

/// The length in bytes of a log of `log_frames` frames of `page_size` (a round that could not
/// count it says -1: the header alone).
fn log_length(log_frames: i64, page_size: u64) -> u64 {
    u64::try_from(log_frames)
        .unwrap_or(0)
        .saturating_mul(FRAME_HEADER_BYTES + page_size)
        .saturating_add(WAL_HEADER_BYTES)
}

/// Asks the kernel to read back, in the background, the pages it dropped from its cache of the
/// part of a reused log file that the writer has yet to write over (`log_frames` frames of
/// `page_size` are written since the last restart).
///
/// The writer reuses the file after each restart, and SQLite's frames (24 bytes + a page) are
/// not block aligned, so every frame partly overwrites a block written one pass earlier. When
/// the kernel has dropped that block from its cache (memory pressure, or a reclaim policy that
/// drops page cache it deems cold), the write first reads it from disk, synchronously, while
/// every request of the batch waits: a disk read on the gateway's path. Pages still cached cost
/// a lookup; a log that has not restarted yet (the file ends where the log does) costs nothing.
#[cfg(target_os = "linux")]
fn keep_log_cached(wal: &std::path::Path, log_frames: i64, page_size: u64) {
    let Ok(file) = std::fs::File::open(wal) else {
        return;
    };
    let Ok(size) = file.metadata().map(|m| m.len()) else {
        return;
    };
    let Some((written, ahead)) = not_yet_overwritten(size, log_frames, page_size) else {
        return;
    };
    if let Err(e) = rustix::fs::fadvise(&file, written, Some(ahead), rustix::fs::Advice::WillNeed) {
        tracing::debug!(error = %e, "cannot ask for the WAL's pages to be read ahead");
    }
}

#[cfg(not(target_os = "linux"))]
fn keep_log_cached(_wal: &std::path::Path, _log_frames: i64, _page_size: u64) {}

/// Where the part of a log file of `size` bytes that the log of `log_frames` frames has not
/// reached begins, and its length; `None` when the log reaches the end of the file.
#[cfg(target_os = "linux")]
fn not_yet_overwritten(
    size: u64,
    log_frames: i64,
    page_size: u64,
) -> Option<(u64, std::num::NonZeroU64)> {
    let written = log_length(log_frames, page_size);
    let ahead = std::num::NonZeroU64::new(size.checked_sub(written)?)?;
    Some((written, ahead))
}

/// Where SQLite keeps the write-ahead log of the database at `db_path`.
fn wal_path(db_path: &str) -> PathBuf {
    format!("{db_path}-wal").into()
}

/// The database file and its write-ahead log.
struct LogFiles {
    db: PathBuf,
    wal: PathBuf,
}

/// Flushes to disk the pages the background thread copied into the database file.
///
/// SQLite syncs the database file only after a round that copied the whole log, which under
/// unbroken load is the writer's restart alone: that restart would flush every page copied
/// since the previous one on the writer's time; flushed here first, it has a few pages' worth
/// left. Only a head start: SQLite's own sync in the restart still makes the copy durable
/// before the log is written over, so a failure here costs time only.
fn flush_copied_pages(db: &std::path::Path) {
    if let Err(e) = std::fs::File::open(db).and_then(|file| file.sync_data()) {
        tracing::debug!(error = %e, "cannot flush the copied pages ahead of the WAL restart");
    }
}

fn copy_rounds(conn: &rusqlite::Connection, files: &LogFiles, signals: &Signals) {
    yield_to_requests();
    // Fixed for a database in WAL mode; 4096 is SQLite's default.
    let page_size = conn
        .query_row("PRAGMA page_size", [], |row| row.get::<_, i64>(0))
        .ok()
        .and_then(|size| u64::try_from(size).ok())
        .unwrap_or(4096);
    // Pages of the log already copied after the previous round, and copied by it.
    let mut copied_before = 0;
    let mut previous_round = 0;
    loop {
        if !signals.restart_wanted.load(Ordering::Acquire) {
            std::thread::park_timeout(CHECKPOINT_EVERY);
        }
        if signals.stop.load(Ordering::Acquire) {
            return;
        }
        let round = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        });
        match round {
            Ok((busy, log, copied)) => {
                signals
                    .log_bytes
                    .store(log_length(log, page_size), Ordering::Release);
                keep_log_cached(&files.wal, log, page_size);
                let this_round = copied_this_round(copied, copied_before);
                copied_before = copied;
                if busy == 0
                    && copied == log
                    && signals.restart_wanted.load(Ordering::Acquire)
                    && caught_up(this_round, previous_round)
                {
                    flush_copied_pages(&files.db);
                    signals.caught_up.store(true, Ordering::Release);
                    // The writer restarts the log at its next look; nap meanwhile.
                    std::thread::park_timeout(WAL_CHECK_EVERY);
                } else if this_round == 0 {
                    // Nothing could be copied (a reader still needs the old pages): look again
                    // later instead of spinning.
                    std::thread::park_timeout(WAL_CHECK_EVERY);
                }
                previous_round = this_round;
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                std::thread::park_timeout(CHECKPOINT_EVERY);
            }
        }
    }
}

/// Keeps the write-ahead log bounded; owned by the one writing connection.
///
/// The log only starts over when a write finds every frame copied back and no reader in it, a
/// moment that unbroken load never leaves, so background checkpoints alone let it (and the
/// shared-memory index every connection maps) grow without end. Past the limit, the writer asks
/// the background thread to copy round after round until a round finds little to copy, to flush
/// what it copied to disk, and only then, between two commits, runs a `RESTART` checkpoint
/// itself: it waits (busy timeout) for readers to leave the log, copies the pages of the last
/// round or so, syncs, and the next commit writes the log from its start again. The copying and
/// flushing of the whole log is thus done beside the writer, not on its time, where every
/// waiting request would sit through it. The log's length comes from the background thread's
/// count at each round, since the file is reused: its existing blocks are written over (cheaper
/// than growing a truncated file anew; the background thread keeps them cached, see
/// `keep_log_cached`), and `journal_size_limit` trims it only past twice the limit.
#[derive(Debug)]
pub struct WalBound {
    path: PathBuf,
    restart_at: u64,
    /// Past this size the file is trimmed at a restart, and holds a log past the limit even
    /// when the background thread's count is behind.
    file_kept: u64,
    checked: Instant,
    /// When the writer asked the background thread to catch up, if it is waiting for that.
    asked: Option<Instant>,
    signals: Arc<Signals>,
    background: std::thread::Thread,
}

impl WalBound {
    /// Bounds the log of the database at `db_path`, written through `conn` and copied by
    /// `checkpointer`, to about `restart_at` bytes.
    ///
    /// # Errors
    /// When the connection refuses the size limit, or the checkpointer has stopped.
    pub fn attach(
        conn: &rusqlite::Connection,
        db_path: &str,
        restart_at: u64,
        checkpointer: &Checkpointer,
    ) -> rusqlite::Result<Self> {
        // The file is reused across restarts, not trimmed back to the limit at each (a trim
        // takes the writer's time, and the next pass grows the file again past the limit);
        // twice the limit bounds what a long catch-up left behind.
        let file_kept = restart_at.saturating_mul(2);
        let kept = i64::try_from(file_kept).unwrap_or(i64::MAX);
        conn.pragma_update(None, "journal_size_limit", kept)?;
        let background = checkpointer
            .thread
            .as_ref()
            .map(|thread| thread.thread().clone())
            .ok_or_else(|| {
                rusqlite::Error::ToSqlConversionFailure("the checkpointer has stopped".into())
            })?;
        Ok(Self {
            path: wal_path(db_path),
            restart_at,
            file_kept,
            checked: Instant::now(),
            asked: None,
            signals: Arc::clone(&checkpointer.signals),
            background,
        })
    }

    /// Whether [`Self::keep`] has work to do now: a look at the log's size, or a restart.
    pub fn upkeep_due(&self) -> bool {
        self.asked.is_some() || self.checked.elapsed() >= WAL_CHECK_EVERY
    }

    /// As if the log's size had just been looked at (tests that need no upkeep due).
    #[cfg(test)]
    pub(crate) fn checked_just_now(&mut self) {
        self.checked = Instant::now();
    }

    /// Starts the log over once it has passed its limit and the background thread has caught
    /// up (or has not within `CATCH_UP_WAIT`); called by the writer between commits.
    pub fn keep(&mut self, conn: &rusqlite::Connection) {
        if let Some(asked) = self.asked {
            if self.signals.caught_up.load(Ordering::Acquire) || asked.elapsed() > CATCH_UP_WAIT {
                self.restart(conn);
            }
            return;
        }
        if self.checked.elapsed() < WAL_CHECK_EVERY {
            return;
        }
        self.checked = Instant::now();
        let counted = self.signals.log_bytes.load(Ordering::Acquire);
        let file = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if counted > self.restart_at || file > self.file_kept {
            self.signals.caught_up.store(false, Ordering::Release);
            self.signals.restart_wanted.store(true, Ordering::Release);
            self.background.unpark();
            self.asked = Some(Instant::now());
        }
    }

    fn restart(&mut self, conn: &rusqlite::Connection) {
        let started = Instant::now();
        let busy = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
            row.get::<_, i64>(0)
        });
        let took = started.elapsed();
        match busy {
            Ok(0) if took > SLOW_WRITER_PAUSE => tracing::warn!(
                ms = took.as_millis() as u64,
                "slow WAL restart: every request waiting on the writer sat through it"
            ),
            Ok(0) => tracing::debug!(us = took.as_micros() as u64, "WAL started over"),
            Ok(_) => tracing::warn!("WAL restart found readers still in the log; will retry"),
            Err(e) => tracing::warn!(error = %e, "WAL restart failed; will retry"),
        }
        self.signals.restart_wanted.store(false, Ordering::Release);
        self.signals.caught_up.store(false, Ordering::Release);
        // Until the background thread counts the new log.
        self.signals.log_bytes.store(0, Ordering::Release);
        self.asked = None;
        self.checked = Instant::now();
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests abort loudly on failure")]

    fn own_niceness() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    #[test]
    fn only_the_part_of_a_reused_file_ahead_of_the_log_is_read_back() {
        let frame = 24 + 4096;
        // A log that has not restarted ends where the file does: nothing to read.
        assert_eq!(super::not_yet_overwritten(32 + 10 * frame, 10, 4096), None);
        assert_eq!(super::not_yet_overwritten(32, 0, 4096), None);
        // Restarted: three frames written over a file of a hundred.
        let (from, len) = super::not_yet_overwritten(32 + 100 * frame, 3, 4096).unwrap();
        assert_eq!((from, len.get()), (32 + 3 * frame, 97 * frame));
        // A round that could not count the log (-1): everything after the header.
        let (from, len) = super::not_yet_overwritten(32 + 5 * frame, -1, 4096).unwrap();
        assert_eq!((from, len.get()), (32, 5 * frame));
        // A log longer than the file says (a racing append): nothing.
        assert_eq!(super::not_yet_overwritten(32 + frame, 2, 4096), None);
    }

    /// The handshake, driven by hand: past the limit the writer asks the copier to catch up,
    /// the copier says when it has (the writer stands still meanwhile, as a quiet writer
    /// would), and on its word the writer starts the log over.
    #[test]
    fn the_writer_restarts_the_log_once_the_copier_has_caught_up() {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let path = path.to_str().unwrap();
        let conn = crate::sqlite::writer::open_writer_connection(path).unwrap();
        conn.execute_batch("CREATE TABLE t (payload BLOB NOT NULL)")
            .unwrap();
        let checkpointer = super::Checkpointer::start(path).unwrap();
        const LIMIT: u64 = 512 * 1024;
        let mut bound = super::WalBound::attach(&conn, path, LIMIT, &checkpointer).unwrap();
        let insert = || {
            conn.execute("INSERT INTO t (payload) VALUES (zeroblob(3000))", [])
                .unwrap();
        };
        let log_frames = || -> i64 {
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
                .unwrap()
        };
        let file_len = || std::fs::metadata(super::wal_path(path)).unwrap().len();
        // Paced: the log stops a little past the limit until the copier has counted it, so the
        // file is kept whole; unpaced: the file runs past twice the limit, and is trimmed.
        for paced in [true, false] {
            let started = Instant::now();
            while bound.asked.is_none() {
                assert!(started.elapsed() < Duration::from_secs(20), "never asked");
                let len = file_len();
                if paced && len > LIMIT + LIMIT / 4 {
                    std::thread::sleep(Duration::from_millis(5));
                } else {
                    insert();
                    if !paced && len <= 2 * LIMIT {
                        continue;
                    }
                }
                bound.keep(&conn);
            }
            assert!(!bound.signals.caught_up.load(Ordering::Acquire));
            let asked = Instant::now();
            while !bound.signals.caught_up.load(Ordering::Acquire) {
                assert!(
                    asked.elapsed() < Duration::from_secs(20),
                    "the copier never caught up"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            let file_before = file_len();
            assert_eq!(
                paced,
                file_before < 2 * LIMIT,
                "the pacing did not hold: {file_before}"
            );
            bound.keep(&conn);
            assert!(bound.asked.is_none(), "caught up, yet no restart");
            assert!(
                !bound.signals.caught_up.load(Ordering::Acquire),
                "the restart clears the copier's word for the next time"
            );
            // Over the limit the log held more than 120 frames; one insert writes a few.
            insert();
            let log = log_frames();
            assert!(log < 32, "the log did not start over: {log} frames");
            assert_eq!(
                std::fs::metadata(&bound.path).unwrap().len(),
                file_before.min(2 * LIMIT),
                "the file is written over from its start, trimmed only past twice the limit"
            );
            // The copier's count of the old log is not taken for the new one's.
            std::thread::sleep(super::WAL_CHECK_EVERY + Duration::from_millis(5));
            bound.keep(&conn);
            assert!(bound.asked.is_none(), "asked again right after a restart");
        }
    }

    #[test]
    fn catch_up_rounds_go_on_while_they_shrink() {
        use super::caught_up;
        assert!(caught_up(32, 1000), "few pages left: caught up");
        assert!(
            !caught_up(100, 1000),
            "still shrinking fast: one more round"
        );
        assert!(
            caught_up(100, 120),
            "no longer shrinking: more rounds would not help"
        );
        assert!(!caught_up(300, 300), "too much left, however it shrinks");
        assert!(caught_up(0, 0));
    }

    #[test]
    fn a_round_after_a_restart_counts_the_new_log_from_its_start() {
        assert_eq!(super::copied_this_round(150, 100), 50);
        assert_eq!(super::copied_this_round(100, 100), 0);
        assert_eq!(super::copied_this_round(7, 16_000), 7);
    }

    #[test]
    fn the_copier_lowers_only_its_own_priority() {
        let before = own_niceness();
        let (copier, after) = std::thread::spawn(|| {
            let start = own_niceness();
            super::yield_to_requests();
            (start, own_niceness())
        })
        .join()
        .unwrap();
        assert_eq!(
            copier, before,
            "a new thread starts at its creator's priority"
        );
        assert_eq!(after, (before + super::COPY_NICENESS).min(19));
        assert_eq!(own_niceness(), before, "the calling thread is untouched");
    }
}
