//! Soak (issue: hardening): mixed traffic on loopback for `SOAK_SECONDS` (default 600) against
//! the release binary on its embedded store with the default limits: several agents, each in a
//! loop of one task — a grant, a token exchange, reads through the gateway, a request outside
//! the grant (denied), a high-risk send that waits for an approval, is approved by the human
//! and then goes through, a forged token (refused), and the grant revoked or completed, after
//! which its token is refused. Reports the server's resident memory over time and every status
//! seen; fails if any answer is 5xx or not the expected one, or if memory grows past the bound.
//! Run: cargo bench -p leash-cli --bench soak   (SOAK_SECONDS=60 for a short run)

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_core::token::{GRANT_TOKEN_TYPE, TOKEN_EXCHANGE};
use leash_testkit::{Leash, form, now, read};
use reqwest::Method;
use serde_json::{Value, json};

/// Agents working at once, each its own loop.
const AGENTS: usize = 6;
/// Reads per task.
const READS: usize = 40;
/// Memory may grow by at most this much between the first sample after warm-up and the end:
/// the bounded caches (verified tokens, memos, rate tables) fill in the first minutes.
const GROWTH_BOUND_KIB: u64 = 64 * 1024;

/// Leash's config: the defaults but a gateway rate the loops stay under (each agent runs
/// a few hundred requests a second; 429s are not what this run is about).
const CONFIG: &str = "[limits]\ngateway_rate = 5000\ngateway_burst = 5000\n";

#[derive(Default)]
struct Tally {
    /// (what was asked, status) → count.
    seen: BTreeMap<(&'static str, u16), u64>,
    /// Answers that were not the expected ones, first few kept.
    unexpected: Vec<String>,
    unexpected_count: u64,
}

impl Tally {
    fn record(&mut self, what: &'static str, status: u16, expected: u16, body: &Value) {
        *self.seen.entry((what, status)).or_default() += 1;
        if status != expected {
            self.unexpected_count += 1;
            if self.unexpected.len() < 10 {
                self.unexpected
                    .push(format!("{what}: {status} (expected {expected}) {body}"));
            }
        }
    }
}

fn start_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let body = axum::body::Bytes::from(vec![b'x'; 1024]);
            let app = axum::Router::new().fallback(move || {
                let body = body.clone();
                async move { body }
            });
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    format!("http://{addr}")
}

struct Agent {
    id: String,
    key: AgentKey,
    user_key: String,
}

async fn gateway(
    leash: &Leash,
    client: &reqwest::Client,
    token: &str,
    dpop: &AgentKey,
    method: Method,
    path: &str,
    approval: Option<&str>,
) -> (u16, Value) {
    let url = format!("{}{path}", leash.url);
    let proof = dpop.dpop_proof(method.as_str(), &url, Some(token), None, now());
    let mut request = client
        .request(method, &url)
        .header("Authorization", format!("DPoP {token}"))
        .header("DPoP", proof);
    if let Some(id) = approval {
        request = request.header("Leash-Approval", id);
    }
    let (status, _, body) = read(request.body("{\"to\":\"bob\"}").send().await.unwrap()).await;
    (status, body)
}

/// One task, start to end.
async fn task(
    leash: &Leash,
    client: &reqwest::Client,
    agent: &Agent,
    round: u64,
    tally: &Mutex<Tally>,
) {
    let record = |what, status, expected, body: &Value| {
        tally.lock().unwrap().record(what, status, expected, body);
    };
    let grant = leash
        .create_grant(
            &agent.user_key,
            json!({"agent": agent.id, "purpose": "Soak", "upstreams": ["mail"],
                   "actions": ["mail:read", "mail:send"], "ttl_seconds": 600}),
        )
        .await;
    let dpop = AgentKey::generate(Alg::EdDsa);
    let body = form(&[
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", grant["handle"].as_str().unwrap()),
        ("subject_token_type", GRANT_TOKEN_TYPE),
        ("client_assertion_type", leash_core::assertion::JWT_BEARER),
        (
            "client_assertion",
            &agent
                .key
                .client_assertion(&agent.id, &leash.token_url(), now()),
        ),
    ]);
    let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, _, answer) = leash
        .post_form("/oauth2/token", body, &[("DPoP", proof)])
        .await;
    record("token exchange", status, 200, &answer);
    let Some(token) = answer["access_token"].as_str().map(str::to_owned) else {
        return;
    };

    for _ in 0..READS {
        let (status, body) = gateway(
            leash,
            client,
            &token,
            &dpop,
            Method::GET,
            "/gw/mail/messages/1",
            None,
        )
        .await;
        record("allowed read", status, 200, &body);
    }
    let (status, body) = gateway(
        leash,
        client,
        &token,
        &dpop,
        Method::GET,
        "/gw/mail/export",
        None,
    )
    .await;
    record("action outside the grant", status, 403, &body);
    let (status, body) = gateway(
        leash,
        client,
        &token,
        &dpop,
        Method::GET,
        "/gw/mail/nowhere",
        None,
    )
    .await;
    record("unmapped route", status, 403, &body);

    let (status, body) = gateway(
        leash,
        client,
        &token,
        &dpop,
        Method::POST,
        "/gw/mail/messages/9/send",
        None,
    )
    .await;
    record("high-risk send", status, 403, &body);
    if let Some(id) = body["approval_id"].as_str() {
        let (status, answer) = leash
            .call(
                Method::POST,
                &format!("/v1/approvals/{id}/approve"),
                &agent.user_key,
                None,
            )
            .await;
        record("approve", status, 200, &answer);
        let (status, body) = gateway(
            leash,
            client,
            &token,
            &dpop,
            Method::POST,
            "/gw/mail/messages/9/send",
            Some(id),
        )
        .await;
        record("approved send", status, 200, &body);
        let (status, body) = gateway(
            leash,
            client,
            &token,
            &dpop,
            Method::POST,
            "/gw/mail/messages/9/send",
            Some(id),
        )
        .await;
        record("approval reused", status, 403, &body);
    }

    let forged = format!("{}x", &token[..token.len() - 1]);
    let (status, body) = gateway(
        leash,
        client,
        &forged,
        &dpop,
        Method::GET,
        "/gw/mail/messages/1",
        None,
    )
    .await;
    record("forged token", status, 401, &body);

    let id = grant["id"].as_str().unwrap();
    let verb = if round.is_multiple_of(2) { "revoke" } else { "complete" };
    let (status, answer) = leash
        .call(
            Method::POST,
            &format!("/v1/grants/{id}/{verb}"),
            &agent.user_key,
            None,
        )
        .await;
    record("end the grant", status, 200, &answer);
    let (status, body) = gateway(
        leash,
        client,
        &token,
        &dpop,
        Method::GET,
        "/gw/mail/messages/1",
        None,
    )
    .await;
    record("after the end", status, 401, &body);
}

async fn run() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let upstream = start_upstream();
    let leash = Arc::new(
        Leash::start_quiet(Path::new(env!("CARGO_BIN_EXE_leash")), CONFIG, &upstream).await,
    );
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (_, user_key) = leash.create_user(&format!("human-{i}")).await;
        let (status, body) = leash
            .call(
                Method::PUT,
                "/v1/vault/mail",
                &user_key,
                Some(json!({"kind": "bearer", "secret": format!("mail-token-{i}")})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let key = AgentKey::generate(Alg::EdDsa);
        let id = format!("spiffe://example.org/agent/soak-{i}");
        leash.register_agent(&id, &key).await;
        agents.push(Arc::new(Agent { id, key, user_key }));
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let client = reqwest::Client::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let workers: Vec<_> = agents
        .iter()
        .map(|agent| {
            let (leash, agent, tally, client) =
                (leash.clone(), agent.clone(), tally.clone(), client.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while Instant::now() < deadline {
                    task(&leash, &client, &agent, round, &tally).await;
                    round += 1;
                }
            })
        })
        .collect();

    println!("| minute | server RSS MiB | requests so far |");
    println!("|---|---|---|");
    let sample_every = Duration::from_secs(seconds.clamp(10, 600) / 10);
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(sample_every.min(deadline.saturating_duration_since(Instant::now())))
            .await;
        let rss = leash.rss_kib();
        let total: u64 = tally.lock().unwrap().seen.values().sum();
        println!(
            "| {:.1} | {:.1} | {total} |",
            start.elapsed().as_secs_f64() / 60.0,
            rss as f64 / 1024.0
        );
        samples.push(rss);
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let tally = tally.lock().unwrap();
    println!();
    println!("| request | status | count |");
    println!("|---|---|---|");
    for ((what, status), count) in &tally.seen {
        println!("| {what} | {status} | {count} |");
    }
    let total: u64 = tally.seen.values().sum();
    let server_errors: u64 = tally
        .seen
        .iter()
        .filter(|((_, status), _)| *status >= 500)
        .map(|(_, count)| count)
        .sum();
    let (first, last) = (samples[0], *samples.last().unwrap());
    let max = samples.iter().max().copied().unwrap_or(0);
    println!();
    println!(
        "{total} requests in {:.0} s ({:.0}/s); 5xx: {server_errors}; unexpected: {}",
        start.elapsed().as_secs_f64(),
        total as f64 / start.elapsed().as_secs_f64(),
        tally.unexpected_count
    );
    println!(
        "server RSS: first sample {:.1} MiB, last {:.1} MiB, max {:.1} MiB (bound: first + {} MiB)",
        first as f64 / 1024.0,
        last as f64 / 1024.0,
        max as f64 / 1024.0,
        GROWTH_BOUND_KIB / 1024
    );
    for line in &tally.unexpected {
        println!("  unexpected: {line}");
    }
    assert_eq!(server_errors, 0, "5xx answers during the soak");
    assert_eq!(
        tally.unexpected_count, 0,
        "unexpected answers during the soak"
    );
    assert!(
        last <= first + GROWTH_BOUND_KIB,
        "memory grew from {first} KiB to {last} KiB"
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then only check it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}
