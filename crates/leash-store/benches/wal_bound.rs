//! The write-ahead log stays bounded under unbroken load: four writers appending audit events
//! and four readers always in the database, for `WAL_SECONDS` (default 10) on a store whose log
//! starts over past `WAL_LIMIT_KIB` (default 256), against the same load on a log that never
//! starts over. A passive checkpointer alone lets the log grow without end under such load (it
//! needs a moment with no reader in the log to start over); the store's bound must hold it to
//! about its limit plus what a second of writes adds (the longest the writer waits for the
//! copier before restarting the log itself). Fails if the bounded log reaches half of what the
//! unbounded one would hold for the same events, or if the chain does not verify afterwards.
//!
//! A load run, not a unit test: how far the log overshoots its limit depends on how busy the
//! machine is, so it is measured here and recorded in BENCHMARKS.md; the handshake itself is
//! unit-tested deterministically in `wal`.
//!
//! Run: cargo bench -p leash-store --bench wal_bound

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::sync::Arc;
use std::time::Duration;

use leash_core::audit::{AuditEvent, ChainVerifier, Mode, Outcome};
use leash_store::{AuditQuery, SqliteStore, Store};

struct Run {
    events: u64,
    largest_wal: u64,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

fn event(n: u64) -> AuditEvent {
    let mut event = AuditEvent::new("gateway.request", Mode::Delegated, 1_800_000_000 + n as i64);
    event.subject = Some(format!("usr_{}", n % 2));
    event.decision = Some(Outcome::Allow);
    event
}

/// Every stored event, checked link by link; the number verified.
async fn verify_chain(store: &dyn Store) -> u64 {
    let mut verifier = ChainVerifier::new(&[], |_| None).unwrap();
    let query = AuditQuery {
        limit: u32::MAX,
        ..AuditQuery::default()
    };
    for line in store.audit_lines(&query).await.unwrap() {
        verifier.push(&line).unwrap();
    }
    verifier.finish().unwrap()
}

async fn under_load(restart_at: u64, seconds: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db").display().to_string();
    let wal = format!("{path}-wal");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with_wal_limit(&path, restart_at)
            .await
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut load = Vec::new();
    for writer in 0..4u64 {
        let store = store.clone();
        load.push(tokio::spawn(async move {
            let mut n = writer;
            while tokio::time::Instant::now() < deadline {
                store.append_audit(event(n)).await.unwrap();
                n += 4;
            }
        }));
    }
    for _ in 0..4 {
        let store = store.clone();
        load.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let query = AuditQuery {
                    limit: 50,
                    ..AuditQuery::default()
                };
                store.audit_lines(&query).await.unwrap();
            }
        }));
    }
    let mut largest_wal = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        largest_wal = largest_wal.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    for task in load {
        task.await.unwrap();
    }
    Run {
        events: verify_chain(store.as_ref()).await,
        largest_wal,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and then this only
    // builds.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let seconds = env_or("WAL_SECONDS", 10);
    let limit = env_or("WAL_LIMIT_KIB", 256) * 1024;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let unbounded = runtime.block_on(under_load(u64::MAX, seconds));
    let bounded = runtime.block_on(under_load(limit, seconds));
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let per_event = unbounded.largest_wal as f64 / unbounded.events as f64;
    let unbounded_for_same = per_event * bounded.events as f64;
    println!(
        "wal_bound: {seconds} s each, 4 writers + 4 readers, limit {} KiB",
        limit / 1024
    );
    println!(
        "  unbounded: {} events, log reached {:.1} MiB ({per_event:.0} B/event)",
        unbounded.events,
        mib(unbounded.largest_wal)
    );
    println!(
        "  bounded:   {} events, log reached {:.2} MiB = {:.1} % of the unbounded log for as many events",
        bounded.events,
        mib(bounded.largest_wal),
        100.0 * bounded.largest_wal as f64 / unbounded_for_same
    );
    assert!(
        unbounded.events > 1_000 && bounded.events > 1_000,
        "too little load to tell"
    );
    assert!(
        (bounded.largest_wal as f64) < 0.5 * unbounded_for_same,
        "the bounded log is not bounded"
    );
}
