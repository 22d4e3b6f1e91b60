//! Token-exchange throughput over loopback HTTP against its bare crypto floor (verify the
//! assertion, verify the proof, sign the token, in a loop on the same cores), measured in one run.
//! Target (issue: foundation): HTTP ≥ 25 % of the floor, on SQLite.
//! Run: cargo bench -p leash-cli --bench exchange

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leash_core::assertion::verify_assertion;
use leash_core::client::AgentKey;
use leash_core::dpop::{ProofContext, verify_proof};
use leash_core::jws::Alg;
use leash_core::token::{AccessClaims, Actor, Confirmation, SigningKey};
use leash_testkit::{AGENT, Leash, Scenario, now};

const SECONDS: u64 = 5;
const CONCURRENCY: usize = 32;

fn floor_ops_per_sec(threads: usize) -> f64 {
    let agent = AgentKey::generate(Alg::EdDsa);
    let dpop = AgentKey::generate(Alg::EdDsa);
    let signing = Arc::new(SigningKey::new(ed25519_dalek::SigningKey::from_bytes(
        &[7; 32],
    )));
    let token_url = url::Url::parse("http://127.0.0.1:8470/oauth2/token").expect("url");
    let t = now();
    let pairs: Arc<Vec<(String, String)>> = Arc::new(
        (0..2000)
            .map(|_| {
                (
                    agent.client_assertion(AGENT, token_url.as_str(), t),
                    dpop.dpop_proof("POST", token_url.as_str(), None, None, t),
                )
            })
            .collect(),
    );
    let keys = Arc::new(vec![agent.public()]);
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pairs, keys, signing, token_url) = (
                pairs.clone(),
                keys.clone(),
                signing.clone(),
                token_url.clone(),
            );
            std::thread::spawn(move || {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let (assertion, proof) = &pairs[done as usize % pairs.len()];
                    let a = verify_assertion(assertion, AGENT, &keys, &[token_url.as_str()], t)
                        .expect("assertion");
                    let cx = ProofContext {
                        method: "POST",
                        url: token_url.as_str(),
                        access_token: None,
                        now: t,
                        nonces: None,
                    };
                    let p = verify_proof(proof, &cx).expect("proof");
                    let claims = AccessClaims {
                        iss: "http://127.0.0.1:8470".into(),
                        sub: "usr_x".into(),
                        aud: "http://127.0.0.1:8470".into(),
                        iat: t,
                        exp: t + 300,
                        jti: a.jti,
                        client_id: AGENT.into(),
                        act: Actor { sub: AGENT.into() },
                        scope: "mail:read mail:draft".into(),
                        cnf: Confirmation { jkt: p.jkt },
                        grant_id: "grt_x".into(),
                        purpose: "Summarise my inbox".into(),
                    };
                    std::hint::black_box(signing.sign(&claims));
                    done += 1;
                }
                done
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    total as f64 / SECONDS as f64
}

async fn http_ops_per_sec() -> (f64, u64) {
    let leash = Leash::start(Path::new(env!("CARGO_BIN_EXE_leash")), "").await;
    let s = Arc::new(Scenario::new(&leash).await);
    let token_url = leash.token_url();
    let dpop = AgentKey::generate(Alg::EdDsa);
    // Pre-generate every assertion and proof so the client spends no CPU signing while measured.
    let n = 60_000;
    let t = now();
    let bodies: Vec<(String, String)> = (0..n)
        .map(|_| {
            let mut form = s.exchange_form(&leash);
            form.retain(|(k, _)| k != "client_assertion");
            form.push((
                "client_assertion".into(),
                s.agent_key.client_assertion(AGENT, &token_url, t),
            ));
            let pairs: Vec<(&str, &str)> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            (
                leash_testkit::form(&pairs),
                dpop.dpop_proof("POST", &token_url, None, None, t),
            )
        })
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(SECONDS);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (bodies, next, errors, client, url) = (
                bodies.clone(),
                next.clone(),
                errors.clone(),
                client.clone(),
                token_url.clone(),
            );
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((body, proof)) = bodies.get(i) else {
                        break;
                    };
                    let response = client
                        .post(&url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("DPoP", proof)
                        .body(body.clone())
                        .send()
                        .await
                        .expect("request");
                    if response.status() != 200 {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    let elapsed = start.elapsed().as_secs_f64();
    (
        total as f64 / elapsed,
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then only check it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let floor = floor_ops_per_sec(threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (http, errors) = runtime.block_on(http_ops_per_sec());
    println!("crypto floor ({threads} threads): {floor:.0} exchanges/s");
    println!(
        "HTTP token exchange on SQLite (concurrency {CONCURRENCY}): {http:.0} exchanges/s, {errors} non-200"
    );
    println!(
        "ratio: {:.1} % of the floor (target >= 25 %)",
        100.0 * http / floor
    );
}
