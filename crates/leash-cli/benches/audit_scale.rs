//! Cost flat as the audit trail grows (issue #34, target 3), both as ratios from one run:
//! 1. `leash audit verify --database` of 10 million events against the same of the first
//!    100,000: events/s within 1.2× (linear).
//! 2. Gateway requests/s (every check on) of a server whose database already holds 10 million
//!    events against one whose database is empty: within 0.9×.
//!
//! The events are `gateway.request`-shaped, spread over 10,000 grants and 1,000 humans, and go
//! through the store's own writer (`Store::append_audit`: JCS, SHA-256 chain, group commit,
//! signed checkpoints), onto the chain of a real server's database while it is stopped.
//!
//! Run: cargo bench -p leash-cli --bench audit_scale   (AUDIT_SCALE_EVENTS=… for fewer; about
//! 11 GB of disk for 10 million)

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use leash_core::audit::{AuditEvent, Mode, Outcome};
use leash_store::{SqliteStore, Store as _};
use leash_testkit::{Leash, Scenario, now};
use serde_json::{Value, json};

mod common;

const SMALL: u64 = 100_000;
const CONCURRENCY: u64 = 64;
const CONNECTIONS: usize = 32;
const SECONDS: u64 = 5;
const ROUNDS: usize = 4;
const BODY: usize = 1024;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn gateway_event(n: u64) -> AuditEvent {
    let mut event = AuditEvent::new("gateway.request", Mode::Delegated, 1_800_000_000);
    event.subject = Some(format!("usr_{:024x}", n % 1_000));
    event.actor = Some("spiffe://example.org/agent/mailbot".into());
    event.grant_id = Some(format!("grt_{:024x}", n % 10_000));
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

/// Appends events `from..to` through the store's writer from `CONCURRENCY` tasks, with a
/// line of progress every million.
async fn append(store: &SqliteStore, from: u64, to: u64) -> Duration {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(from));
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= to {
                        return;
                    }
                    store.append_audit(gateway_event(n)).await.unwrap();
                    if n % 1_000_000 == 0 && n > from {
                        eprintln!("  {n} events appended");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// Empties the kernel's page cache (root only; `false` otherwise), so that a verification reads
/// the database from disk whatever its size: this machine keeps little in its cache, so a
/// database of 10 million events is read from disk while one of 100,000 stays cached.
fn drop_page_cache() -> bool {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// `leash audit verify --database` of `leash`'s database with `jwks`, first from disk (the page
/// cache emptied, where allowed), then again at once: events verified and the two times.
fn verify_twice(leash: &Leash, jwks: &Path) -> (u64, Duration, Duration) {
    let cold = drop_page_cache();
    let (events, first) = verify(leash, jwks);
    let (_, second) = verify(leash, jwks);
    if !cold {
        println!("(the page cache could not be emptied: not root)");
    }
    (events, first, second)
}

/// The size of `leash`'s database file and its write-ahead log, in bytes.
fn database_bytes(leash: &Leash) -> u64 {
    ["leash.db", "leash.db-wal"]
        .iter()
        .filter_map(|name| std::fs::metadata(leash.data_dir().join(name)).ok())
        .map(|meta| meta.len())
        .sum()
}

/// `leash audit verify --database` of `leash`'s database with `jwks`: events verified and the
/// time taken.
fn verify(leash: &Leash, jwks: &Path) -> (u64, Duration) {
    let started = Instant::now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_leash"))
        .args([
            "audit",
            "verify",
            "--database",
            &leash.database_url(),
            "--jwks",
        ])
        .arg(jwks)
        .output()
        .expect("leash audit verify");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // "audit chain verified: N events, …"
    let events = stdout
        .split("verified: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .expect("the verified count");
    (events, elapsed)
}

/// Closed loop: `CONNECTIONS` keep-alive connections send gateway requests with fresh proofs
/// for `SECONDS`; returns requests/s. Any answer but 200 with the whole body fails the run.
async fn gateway_rate(leash: &Leash, s: &Scenario, client: &reqwest::Client) -> f64 {
    let url = format!("{}/gw/mail/messages/1", leash.url);
    let (token, dpop) = s.token(leash).await;
    let issued_at = now();
    let proofs: Arc<Vec<String>> = Arc::new(
        (0..60_000)
            .map(|_| dpop.dpop_proof("GET", &url, Some(&token), None, issued_at))
            .collect(),
    );
    let authorization = Arc::new(format!("DPoP {token}"));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(SECONDS);
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (client, url, proofs, authorization, next) = (
                client.clone(),
                url.clone(),
                proofs.clone(),
                authorization.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let proof = proofs.get(n).expect("enough proofs for a run");
                    let response = client
                        .get(&url)
                        .header("Authorization", authorization.as_str())
                        .header("DPoP", proof)
                        .send()
                        .await
                        .expect("send");
                    assert_eq!(response.status(), 200);
                    assert_eq!(response.bytes().await.expect("body").len(), BODY);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = 0;
    for task in tasks {
        sent += task.await.expect("task");
    }
    sent as f64 / started.elapsed().as_secs_f64()
}

async fn run() {
    let total: u64 = std::env::var("AUDIT_SCALE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    assert!(total > SMALL, "AUDIT_SCALE_EVENTS must be over {SMALL}");
    let upstream = leash_testkit::fixed_upstream(&[b'x'; BODY]);
    let (mut big, big_s) = common::start_with_mail_credential(&upstream).await;
    let (empty, empty_s) = common::start_with_mail_credential(&upstream).await;

    // The server's own keys and the bench's, for `audit verify --jwks`.
    let jwks: Value = big
        .http()
        .get(format!("{}/.well-known/jwks.json", big.url))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("jwks JSON");
    let mut keys = jwks["keys"].as_array().expect("keys").clone();
    keys.push(common::audit_signer().jwks_entry());
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, json!({ "keys": keys }).to_string()).expect("jwks file");

    // The trail grows while the server is stopped, through the store's own writer.
    assert!(big.terminate().await.success());
    let store = SqliteStore::open(big.data_dir().join("leash.db").to_str().expect("UTF-8"))
        .await
        .unwrap();
    let key = common::audit_signer();
    store.set_checkpoint_signer(Arc::new(move |seq, hash| {
        leash_core::audit::Checkpoint::sign(&key, seq, hash, 1_800_000_000).ok()
    }));
    let appended = append(&store, 0, SMALL).await;
    println!("appended {SMALL} events in {:.1} s", appended.as_secs_f64());
    let small_bytes = database_bytes(&big);
    let (small_events, small_cold, small_warm) = verify_twice(&big, &jwks_file);
    let appended = append(&store, SMALL, total).await;
    println!(
        "appended {} more events in {:.1} s ({:.0} events/s)",
        total - SMALL,
        appended.as_secs_f64(),
        (total - SMALL) as f64 / appended.as_secs_f64()
    );
    drop(store);
    let big_bytes = database_bytes(&big);
    let (big_events, big_cold, big_warm) = verify_twice(&big, &jwks_file);
    let rate = |events: u64, time: Duration| events as f64 / time.as_secs_f64();
    println!();
    println!(
        "| leash audit verify --database | events | database MB | from disk: s, events/s | \
         again at once: s, events/s |"
    );
    println!("|---|---|---|---|---|");
    for (name, events, bytes, cold, warm) in [
        (
            "first events",
            small_events,
            small_bytes,
            small_cold,
            small_warm,
        ),
        ("all", big_events, big_bytes, big_cold, big_warm),
    ] {
        println!(
            "| {name} | {events} | {} | {:.2}, {:.0} | {:.2}, {:.0} |",
            bytes / 1_000_000,
            cold.as_secs_f64(),
            rate(events, cold),
            warm.as_secs_f64(),
            rate(events, warm)
        );
    }
    println!(
        "verify events/s, {big_events} against {small_events}: {:.3}× slower from disk, {:.3}× \
         slower again at once (target <= 1.2×)",
        rate(small_events, small_cold) / rate(big_events, big_cold),
        rate(small_events, small_warm) / rate(big_events, big_warm)
    );

    big.start_again().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    println!();
    println!("gateway, closed loop, {CONNECTIONS} connections, {SECONDS} s per run, alternating");
    println!("| round | empty database /s | {big_events} events /s | ratio |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    // A first run of each warms pools and caches; it is not counted.
    gateway_rate(&empty, &empty_s, &client).await;
    gateway_rate(&big, &big_s, &client).await;
    for round in 1..=ROUNDS {
        let (empty_rate, big_rate) = if round % 2 == 1 {
            let e = gateway_rate(&empty, &empty_s, &client).await;
            (e, gateway_rate(&big, &big_s, &client).await)
        } else {
            let b = gateway_rate(&big, &big_s, &client).await;
            (gateway_rate(&empty, &empty_s, &client).await, b)
        };
        let ratio = big_rate / empty_rate;
        println!("| {round} | {empty_rate:.0} | {big_rate:.0} | {ratio:.3} |");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let median = (ratios[ROUNDS / 2 - 1] + ratios[ROUNDS / 2]) / 2.0;
    println!(
        "gateway requests/s with {big_events} events against empty (median): {median:.3}× (target >= 0.9×)"
    );
}

fn main() {
    common::bench_main(run);
}
