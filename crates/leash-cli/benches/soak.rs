//! Soak (issue: hardening): mixed traffic on loopback for `SOAK_SECONDS` (default 600) against
//! the release binary on its embedded store with the default limits (but a gateway rate above
//! what the loops ask; the token endpoint's rate is met by waiting out `Retry-After`): several
//! agents, each in a loop of one task — a grant, a token exchange, reads through the gateway, a
//! request outside
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

mod common;

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

struct Agent {
    id: String,
    key: AgentKey,
    user_key: String,
}

/// An agent's token and DPoP key on one task, and where its answers are tallied.
struct Caller<'a> {
    leash: &'a Leash,
    client: &'a reqwest::Client,
    token: String,
    dpop: AgentKey,
    tally: &'a Mutex<Tally>,
}

impl Caller<'_> {
    /// A gateway request with a fresh proof (and `token` in place of the caller's own, if
    /// given); tallies the answer against `expected`.
    async fn gateway(
        &self,
        what: &'static str,
        expected: u16,
        (method, path): (Method, &str),
        approval: Option<&str>,
        token: Option<&str>,
    ) -> Value {
        let token = token.unwrap_or(&self.token);
        let url = format!("{}{path}", self.leash.url);
        let proof = self
            .dpop
            .dpop_proof(method.as_str(), &url, Some(token), None, now());
        let mut request = self
            .client
            .request(method, &url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof);
        if let Some(id) = approval {
            request = request.header("Leash-Approval", id);
        }
        let (status, _, body) = read(request.body("{\"to\":\"bob\"}").send().await.unwrap()).await;
        self.tally
            .lock()
            .unwrap()
            .record(what, status, expected, &body);
        body
    }

    /// A management call as the human; tallied the same way.
    async fn human(&self, what: &'static str, key: &str, path: &str) {
        let (status, body) = self.leash.call(Method::POST, path, key, None).await;
        self.tally.lock().unwrap().record(what, status, 200, &body);
    }
}

const READ: (Method, &str) = (Method::GET, "/gw/mail/messages/1");
const SEND: (Method, &str) = (Method::POST, "/gw/mail/messages/9/send");

/// One task, start to end.
async fn task(
    leash: &Leash,
    client: &reqwest::Client,
    agent: &Agent,
    round: u64,
    tally: &Mutex<Tally>,
) {
    let grant = leash
        .create_grant(
            &agent.user_key,
            json!({"agent": agent.id, "purpose": "Soak", "upstreams": ["mail"],
                   "actions": ["mail:read", "mail:send"], "ttl_seconds": 600}),
        )
        .await;
    let dpop = AgentKey::generate(Alg::EdDsa);
    // The token endpoint's default rate (10 a second per agent) is below what these loops ask
    // for: like a real agent, wait as long as Retry-After says, then try again.
    let answer = loop {
        let assertion = agent
            .key
            .client_assertion(&agent.id, &leash.token_url(), now());
        let body = form(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", grant["handle"].as_str().unwrap()),
            ("subject_token_type", GRANT_TOKEN_TYPE),
            ("client_assertion_type", leash_core::assertion::JWT_BEARER),
            ("client_assertion", &assertion),
        ]);
        let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
        let (status, headers, answer) = leash
            .post_form("/oauth2/token", body, &[("DPoP", proof)])
            .await;
        let wait = headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match (status, wait) {
            (429, Some(seconds)) => {
                tally
                    .lock()
                    .unwrap()
                    .record("token exchange over the rate", 429, 429, &answer);
                tokio::time::sleep(Duration::from_secs(seconds)).await;
            }
            _ => {
                tally
                    .lock()
                    .unwrap()
                    .record("token exchange", status, 200, &answer);
                break answer;
            }
        }
    };
    let Some(token) = answer["access_token"].as_str().map(str::to_owned) else {
        return;
    };
    let caller = Caller {
        leash,
        client,
        token,
        dpop,
        tally,
    };

    for _ in 0..READS {
        caller.gateway("allowed read", 200, READ, None, None).await;
    }
    let export = (Method::GET, "/gw/mail/export");
    caller
        .gateway("action outside the grant", 403, export, None, None)
        .await;
    let nowhere = (Method::GET, "/gw/mail/nowhere");
    caller
        .gateway("unmapped route", 403, nowhere, None, None)
        .await;

    let asked = caller
        .gateway("high-risk send", 403, SEND, None, None)
        .await;
    if let Some(id) = asked["approval_id"].as_str() {
        let path = format!("/v1/approvals/{id}/approve");
        caller.human("approve", &agent.user_key, &path).await;
        caller
            .gateway("approved send", 200, SEND, Some(id), None)
            .await;
        caller
            .gateway("approval reused", 403, SEND, Some(id), None)
            .await;
    }

    let forged = format!("{}x", &caller.token[..caller.token.len() - 1]);
    caller
        .gateway("forged token", 401, READ, None, Some(&forged))
        .await;

    let id = grant["id"].as_str().unwrap();
    let verb = if round.is_multiple_of(2) {
        "revoke"
    } else {
        "complete"
    };
    let path = format!("/v1/grants/{id}/{verb}");
    caller.human("end the grant", &agent.user_key, &path).await;
    caller.gateway("after the end", 401, READ, None, None).await;
}

async fn run() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let upstream = leash_testkit::fixed_upstream(&[b'x'; 1024]);
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
    common::bench_main(run);
}
