//! SQLite against PostgreSQL, in one run on one machine: token exchanges/s and gateway
//! requests/s (every check on, a fresh proof per request, the vaulted credential injected)
//! through the real server over loopback, closed loop. Rounds alternate between the backends
//! and the best round of each counts, so that neither gets the quieter moment of a shared
//! machine. Target (cluster issue): PostgreSQL ≥ 60 % of SQLite on both.
//! Run: cargo bench -p leash-cli --bench backends   (needs PostgreSQL, see README "Test it")

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{AGENT, Leash, Scenario, now};
use serde_json::json;

mod common;

const SECONDS: u64 = 4;
const CONCURRENCY: usize = 32;
const ROUNDS: usize = 2;
/// Requests prepared per measured round (more than a round can send).
const PREPARED: usize = 40_000;

/// One request, made (and signed) before the clock starts.
struct Prepared {
    method: reqwest::Method,
    url: String,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

/// Closed loop over `requests` for `SECONDS`: (requests/s, answers other than 2xx).
async fn drive(requests: Vec<Prepared>) -> (f64, u64) {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(SECONDS);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (requests, next, failures, client) = (
                requests.clone(),
                next.clone(),
                failures.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let Some(prepared) = requests.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let mut request = client.request(prepared.method.clone(), &prepared.url);
                    for (name, value) in &prepared.headers {
                        request = request.header(*name, value);
                    }
                    if let Some(body) = &prepared.body {
                        request = request.body(body.clone());
                    }
                    let response = request.send().await.expect("request");
                    if !response.status().is_success() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = response.bytes().await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    (
        total as f64 / start.elapsed().as_secs_f64(),
        failures.load(Ordering::Relaxed),
    )
}

/// A server on one backend with alice, the agent, a grant and a vaulted credential.
struct Setup {
    leash: Leash,
    s: Scenario,
}

async fn setup(postgres: bool, upstream: &str) -> Setup {
    let bin = Path::new(env!("CARGO_BIN_EXE_leash"));
    let leash = Leash::start_quiet_on(bin, "", upstream, postgres).await;
    let s = Scenario::new(&leash).await;
    s.vault(
        &leash,
        "mail",
        json!({"kind": "bearer", "secret": "alice-mail-token"}),
    )
    .await;
    Setup { leash, s }
}

fn exchanges(setup: &Setup) -> Vec<Prepared> {
    let token_url = setup.leash.token_url();
    let dpop = AgentKey::generate(Alg::EdDsa);
    let t = now();
    (0..PREPARED)
        .map(|_| {
            let mut form = setup.s.exchange_form(&setup.leash);
            form.retain(|(k, _)| k != "client_assertion");
            form.push((
                "client_assertion".into(),
                setup.s.agent_key.client_assertion(AGENT, &token_url, t),
            ));
            let pairs: Vec<(&str, &str)> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Prepared {
                method: reqwest::Method::POST,
                url: format!("{}/oauth2/token", setup.leash.url),
                headers: vec![
                    ("content-type", "application/x-www-form-urlencoded".into()),
                    ("DPoP", dpop.dpop_proof("POST", &token_url, None, None, t)),
                ],
                body: Some(leash_testkit::form(&pairs)),
            }
        })
        .collect()
}

async fn gateway_requests(setup: &Setup) -> Vec<Prepared> {
    let (token, dpop) = setup.s.token(&setup.leash).await;
    let url = format!("{}/gw/mail/messages/1", setup.leash.url);
    (0..PREPARED)
        .map(|_| Prepared {
            method: reqwest::Method::GET,
            url: url.clone(),
            headers: vec![
                ("Authorization", format!("DPoP {token}")),
                (
                    "DPoP",
                    dpop.dpop_proof("GET", &url, Some(&token), None, now()),
                ),
            ],
            body: None,
        })
        .collect()
}

async fn run() {
    let upstream = leash_testkit::fixed_upstream(br#"{"ok":true}"#);
    let backends = [("SQLite", false), ("PostgreSQL", true)];
    let mut setups = Vec::new();
    for (_, postgres) in backends {
        setups.push(setup(postgres, &upstream).await);
    }
    // Best of the alternating rounds: [backend][workload] = (per second, failures).
    let mut best = [[(0.0f64, 0u64); 2]; 2];
    for round in 0..ROUNDS {
        for (b, setup) in setups.iter().enumerate() {
            for (w, workload) in [exchanges(setup), gateway_requests(setup).await]
                .into_iter()
                .enumerate()
            {
                let (rate, failures) = drive(workload).await;
                eprintln!(
                    "round {round}: {} {}: {rate:.0}/s, {failures} failed",
                    backends[b].0,
                    ["token exchange", "gateway"][w]
                );
                if rate > best[b][w].0 {
                    best[b][w] = (rate, failures);
                }
            }
        }
    }
    println!("best of {ROUNDS} alternating rounds, {CONCURRENCY} connections, {SECONDS} s each");
    println!("| workload | SQLite /s | PostgreSQL /s | PostgreSQL / SQLite | failures |");
    println!("|---|---|---|---|---|");
    for (w, name) in ["token exchange", "gateway request"].iter().enumerate() {
        let (sqlite, pg) = (best[0][w], best[1][w]);
        println!(
            "| {name} | {:.0} | {:.0} | {:.1} % (target >= 60 %) | {} |",
            sqlite.0,
            pg.0,
            100.0 * pg.0 / sqlite.0,
            sqlite.1 + pg.1
        );
    }
}

fn main() {
    common::bench_main(run);
}
