//! Audit speed (issue: audit), both as ratios measured in one run:
//! 1. durable append through the store's writer (64 concurrent requests, JCS + SHA-256 chain,
//!    group commit) against a bare batched SQLite insert of the same rows, same table, same
//!    durability (WAL, synchronous=NORMAL, 64 rows per transaction). Target ≥ 70 %.
//! 2. `leash audit verify` of an export against `sha256sum` of the same file. Target ≥ 50 %.
//!
//! Run: cargo bench -p leash-cli --bench audit

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leash_core::audit::{AuditEvent, Mode, Outcome};
use leash_store::{AuditQuery, SqliteStore, Store as _, wal};

mod common;

const APPEND_EVENTS: usize = 50_000;
const CONCURRENCY: usize = 64;
const BATCH: usize = 64;
const EXPORT_EVENTS: usize = 200_000;
const ROUNDS: usize = 5;

fn gateway_event(n: usize) -> AuditEvent {
    let mut event = AuditEvent::new("gateway.request", Mode::Delegated, 1_800_000_000);
    event.subject = Some("usr_8f3a0c2b9d4e5f60718293a4".into());
    event.actor = Some("spiffe://example.org/agent/mailbot".into());
    event.grant_id = Some("grt_5d1c9e0a7b3f4e2d8c6a1b0f".into());
    event.purpose = Some("Summarise my inbox and draft replies".into());
    event.action = Some("mail:read".into());
    event.upstream = Some("mail".into());
    event.method = Some("GET".into());
    event.path = Some(format!("/messages/{n}"));
    event.decision = Some(Outcome::Allow);
    event.policies = Some(vec!["leash-default-permit".into()]);
    event.request_id = Some(format!("req_{n:024}"));
    event
}

async fn open(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
    let key = common::audit_signer();
    store.set_checkpoint_signer(Arc::new(move |seq, hash| {
        leash_core::audit::Checkpoint::sign(&key, seq, hash, 1_800_000_000).ok()
    }));
    store
}

async fn append(store: &SqliteStore, events: usize) -> Duration {
    let started = Instant::now();
    let per_task = events / CONCURRENCY;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..per_task {
                    store
                        .append_audit(gateway_event(task * per_task + n))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

async fn stored_rows(store: &SqliteStore) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let query = AuditQuery {
            since_seq: lines.len() as u64,
            limit: 10_000,
            ..AuditQuery::default()
        };
        let page = store.audit_lines(&query).await.unwrap();
        if page.is_empty() {
            return lines;
        }
        lines.extend(page);
    }
}

/// How the bare insert keeps its write-ahead log.
#[derive(Clone, Copy)]
enum Upkeep {
    /// The store's own: a background `PASSIVE` checkpoint every `wal::CHECKPOINT_EVERY`, and
    /// the log started over past `wal::WAL_RESTART_BYTES`.
    Store,
    /// The background checkpoints only: the log is never started over, so under unbroken
    /// writes it grows without end (shown for comparison; not a way to run a server).
    Unbounded,
}

/// The same rows, inserted by one connection in transactions of `BATCH`, with no checkpoint on
/// the inserting connection and the given upkeep of the write-ahead log.
fn bare_insert(path: &Path, lines: &[String], upkeep: Upkeep) -> Duration {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let path = path.to_str().unwrap();
    let checkpointer = wal::Checkpointer::start(path).unwrap();
    let mut bound =
        wal::WalBound::attach(&conn, path, wal::WAL_RESTART_BYTES, &checkpointer).unwrap();
    let rows: Vec<(AuditEvent, &String)> = lines
        .iter()
        .map(|l| (serde_json::from_str(l).unwrap(), l))
        .collect();
    let started = Instant::now();
    let mut conn = conn;
    for chunk in rows.chunks(BATCH) {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO audit_events \
                     (seq, kind, subject, actor, grant_id, action, decision, at, hash, line) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .unwrap();
            for (event, line) in chunk {
                insert
                    .execute(rusqlite::params![
                        event.seq as i64,
                        event.kind,
                        event.subject,
                        event.actor,
                        event.grant_id,
                        event.action,
                        "allow",
                        1_800_000_000i64,
                        event.hash,
                        line
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        if let Upkeep::Store = upkeep {
            bound.keep(&conn);
        }
    }
    let took = started.elapsed();
    drop(checkpointer);
    took
}

/// Deletes a measured database, so that its pages neither fill the page cache nor wait for
/// write-back while the next round is measured.
fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        if let Err(e) = std::fs::remove_file(&file) {
            assert!(e.kind() == std::io::ErrorKind::NotFound, "{file}: {e}");
        }
    }
}

/// Writes every dirty page out before a measurement, so that neither side pays for the
/// write-back of what the rounds before it left in the page cache.
fn quiesce() {
    let status = std::process::Command::new("sync").status().unwrap();
    assert!(status.success(), "sync failed");
}

fn best_of_3(mut run: impl FnMut() -> Duration) -> Duration {
    (0..3).map(|_| run()).min().unwrap()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Stores are dropped outside `block_on`: their pools close on this runtime.
    let _entered = runtime.enter();
    let dir = tempfile::tempdir().unwrap();

    // 1. Append: alternating rounds into fresh databases, the best round of each (the disk's
    // write-back makes single rounds on this VM vary by a third).
    let lines = runtime.block_on(async {
        let store = open(&dir.path().join("rows.db")).await;
        append(&store, APPEND_EVENTS).await;
        stored_rows(&store).await
    });
    let mut best = [Duration::MAX; 3];
    for round in 0..ROUNDS {
        for (side, best) in best.iter_mut().enumerate() {
            let db = dir.path().join(format!("round-{round}-{side}.db"));
            // The schema, made by the store (and closed again for the bare inserts).
            let store = runtime.block_on(open(&db));
            let took = match side {
                0 => {
                    quiesce();
                    let took = runtime.block_on(append(&store, APPEND_EVENTS));
                    drop(store);
                    took
                }
                _ => {
                    drop(store);
                    quiesce();
                    let upkeep = if side == 1 {
                        Upkeep::Store
                    } else {
                        Upkeep::Unbounded
                    };
                    bare_insert(&db, &lines, upkeep)
                }
            };
            *best = (*best).min(took);
            remove_database(&db);
        }
    }
    let rate = |d: Duration| lines.len() as f64 / d.as_secs_f64();
    let [leash, bare, unbounded] = best.map(rate);
    println!("append: {} events, best of {ROUNDS}", lines.len());
    println!("  bare batched insert ({BATCH}/tx):        {bare:>10.0} rows/s");
    println!("  leash append ({CONCURRENCY} concurrent):       {leash:>10.0} events/s");
    println!("  ratio: {:.1} % (target >= 70 %)", 100.0 * leash / bare);
    println!(
        "  bare insert whose log is never started over: {unbounded:>10.0} rows/s \
         (leash: {:.1} % of it)",
        100.0 * leash / unbounded
    );

    // 2. Verify an export against sha256sum.
    let export = dir.path().join("export.jsonl");
    let jwks = dir.path().join("jwks.json");
    runtime.block_on(async {
        let store = open(&dir.path().join("export.db")).await;
        append(&store, EXPORT_EVENTS).await;
        store.checkpoint_now().await.unwrap();
        let mut out = std::io::BufWriter::new(std::fs::File::create(&export).unwrap());
        for checkpoint in store.checkpoints(0).await.unwrap() {
            writeln!(out, "{}", serde_json::json!({ "checkpoint": checkpoint })).unwrap();
        }
        for line in stored_rows(&store).await {
            writeln!(out, "{line}").unwrap();
        }
        out.flush().unwrap();
    });
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [common::audit_signer().jwks_entry()]}).to_string(),
    )
    .unwrap();
    let size = std::fs::metadata(&export).unwrap().len();
    let run = |program: &str, args: &[&str]| {
        best_of_3(|| {
            let started = Instant::now();
            let out = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{program}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed()
        })
    };
    let file = export.to_str().unwrap();
    let sha = run("sha256sum", &[file]);
    let verify = run(
        env!("CARGO_BIN_EXE_leash"),
        &["audit", "verify", file, "--jwks", jwks.to_str().unwrap()],
    );
    let mb = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
    println!(
        "verify: {EXPORT_EVENTS} events, {:.1} MB",
        size as f64 / 1e6
    );
    println!("  sha256sum:          {:>8.1} MB/s", mb(sha));
    println!("  leash audit verify: {:>8.1} MB/s", mb(verify));
    println!(
        "  ratio: {:.1} % (target >= 50 %)",
        100.0 * mb(verify) / mb(sha)
    );
}
