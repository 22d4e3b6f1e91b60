//! The forward proxy under load on loopback (issue: browser agents): requests/s through the
//! proxy's tunnels against the gateway's on the same Leash, same upstream (1 KiB answers),
//! same checks (grant liveness, route, scope, Cedar, the durable commit with its audit event, the
//! vaulted credential injected), measured in alternation so that both see the same machine.
//! The gateway also verifies a DPoP proof per request; the proxy instead terminates TLS, reads
//! the grant's cookie jar and guards the answer for the session. Target: proxy ≥ 0.8× gateway,
//! leaf certificate cached; the cost of a new tunnel (CONNECT + TLS handshake per request) is
//! reported on its own.
//! Run: cargo bench -p leash-cli --bench proxy_load

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{Leash, Scenario, now};
use serde_json::json;

mod common;

const SECONDS: u64 = 5;
const CONCURRENCY: usize = 32;
const BODY: usize = 1024;
const ROUNDS: usize = 3;
/// More than a run sends (about 6,000 requests/s here).
const PROOFS_PER_RUN: usize = 80_000;
const PROXY_CREDENTIAL: &str = "urn:leash:params:oauth:token-type:proxy-credential";

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How one request is made.
#[derive(Clone)]
enum Target {
    /// Through the gateway: the token and the next fresh proof.
    Gateway {
        url: String,
        authorization: String,
        proofs: Arc<Vec<String>>,
        next: Arc<AtomicUsize>,
    },
    /// Through the proxy, by a client configured with it.
    Proxy { url: String },
}

impl Target {
    fn request(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        match self {
            Self::Gateway {
                url,
                authorization,
                proofs,
                next,
            } => {
                let at = next.fetch_add(1, Ordering::Relaxed);
                client
                    .get(url)
                    .header("authorization", authorization)
                    .header("dpop", &proofs[at % proofs.len()])
            }
            Self::Proxy { url } => client.get(url),
        }
    }
}

/// Requests/s of `CONCURRENCY` clients sending back to back for `seconds`, and how many failed.
async fn peak(target: &Target, client: &reqwest::Client, seconds: u64) -> (f64, usize) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (target, client) = (target.clone(), client.clone());
            tokio::spawn(async move {
                let (mut done, mut failed) = (0usize, 0usize);
                while Instant::now() < deadline {
                    let ok = match target.request(&client).send().await {
                        Ok(response) => {
                            response.status() == 200
                                && response.bytes().await.is_ok_and(|b| b.len() == BODY)
                        }
                        Err(_) => false,
                    };
                    if ok {
                        done += 1;
                    } else {
                        failed += 1;
                    }
                }
                (done, failed)
            })
        })
        .collect();
    let (mut done, mut failed) = (0, 0);
    for task in tasks {
        let (d, f) = task.await.expect("task");
        done += d;
        failed += f;
    }
    (done as f64 / start.elapsed().as_secs_f64(), failed)
}

fn config(upstream: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
[[upstream]]
name = "portal"
url = "{upstream}"
hosts = ["portal.test"]
[[upstream.route]]
method = "GET"
path = "/**"
action = "portal:read"
"#
    )
}

async fn run() {
    let upstream = leash_testkit::fixed_upstream(&[b'x'; BODY]);
    let leash = Leash::start_quiet(
        Path::new(env!("CARGO_BIN_EXE_leash")),
        &config(&upstream),
        &upstream,
    )
    .await;
    let grant = json!({
        "agent": leash_testkit::AGENT, "purpose": "Load", "upstreams": ["mail", "portal"],
        "actions": ["mail:read", "portal:read"], "ttl_seconds": 3600,
    });
    let s = Scenario::with_grant(&leash, Alg::EdDsa, grant).await;
    for (upstream, credential) in [
        (
            "mail",
            json!({"kind": "cookie", "secret": "session=alice-mail-session"}),
        ),
        (
            "portal",
            json!({"kind": "cookie", "secret": "sid=alice-portal-session"}),
        ),
    ] {
        let (status, body) = leash
            .call(
                reqwest::Method::PUT,
                &format!("/v1/vault/{upstream}"),
                &s.user_key,
                Some(credential),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (token, dpop) = s.token(&leash).await;
    let credential = proxy_credential(&leash, &s).await;
    let ca = leash
        .http()
        .get(format!("{}/v1/proxy/ca", leash.url))
        .send()
        .await
        .expect("ca")
        .text()
        .await
        .expect("ca");
    let proxy = leash.proxy_addr().await;

    let gateway_url = format!("{}/gw/mail/messages/1", leash.url);
    // Fresh proofs for each gateway run, made before it: Leash refuses a proof seen before.
    let gateway = || {
        let proofs: Vec<String> = (0..PROOFS_PER_RUN)
            .map(|_| dpop.dpop_proof("GET", &gateway_url, Some(&token), None, now()))
            .collect();
        Target::Gateway {
            url: gateway_url.clone(),
            authorization: format!("DPoP {token}"),
            proofs: Arc::new(proofs),
            next: Arc::new(AtomicUsize::new(0)),
        }
    };
    let through_proxy = Target::Proxy {
        url: "https://portal.test/messages/1".into(),
    };
    let direct_client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .http1_only()
        .build()
        .expect("client");
    let proxied = |pool: usize| {
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(format!("http://{proxy}"))
                    .expect("proxy")
                    .basic_auth("leash", &credential),
            )
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("pem"))
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(pool)
            .http1_only()
            .build()
            .expect("client")
    };
    let tunnels = proxied(256);
    let fresh_tunnels = proxied(0);

    // Warm both paths (connections, tunnels, the leaf, caches).
    peak(&gateway(), &direct_client, 1).await;
    peak(&through_proxy, &tunnels, 1).await;

    println!(
        "peak, {CONCURRENCY} connections, {SECONDS} s each, HTTP/1.1, {ROUNDS} rounds alternating"
    );
    println!("{:<34} {:>10} {:>8}", "path", "req/s", "failed");
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let (gateway_rate, gateway_failed) = peak(&gateway(), &direct_client, SECONDS).await;
        let (proxy_rate, proxy_failed) = peak(&through_proxy, &tunnels, SECONDS).await;
        println!(
            "{:<34} {gateway_rate:>10.0} {gateway_failed:>8}",
            format!("round {round}: gateway (DPoP)")
        );
        println!(
            "{:<34} {proxy_rate:>10.0} {proxy_failed:>8}",
            format!("round {round}: proxy (kept tunnels)")
        );
        ratios.push(proxy_rate / gateway_rate);
    }
    let (handshake_rate, handshake_failed) = peak(&through_proxy, &fresh_tunnels, SECONDS).await;
    println!(
        "{:<34} {handshake_rate:>10.0} {handshake_failed:>8}",
        "proxy, a new tunnel per request"
    );
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "proxy / gateway: median {median:.2} (rounds: {}); target ≥ 0.80: {}",
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        if median >= 0.8 { "met" } else { "not met" }
    );
}

/// The agent's proxy credential for its grant.
async fn proxy_credential(leash: &Leash, s: &Scenario) -> String {
    let mut form = s.exchange_form(leash);
    form.push(("requested_token_type".into(), PROXY_CREDENTIAL.into()));
    let key = AgentKey::generate(Alg::EdDsa);
    let proof = key.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, _, body) = s.exchange_raw(leash, &form, Some(proof)).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"]
        .as_str()
        .expect("credential")
        .to_owned()
}

fn main() {
    common::bench_main(run);
}
