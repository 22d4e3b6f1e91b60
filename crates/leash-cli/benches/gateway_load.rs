//! Gateway load on loopback, with the proxy under test pinned to one core (issue #34).
//!
//! `own-cost` (target 1): core 0 runs only the proxy under test; core 1 runs the load client
//! (`wrk`, one thread, 32 keep-alive connections, closed loop) and the upstream (nginx, one
//! worker, answering 1 KiB). Every proxy gets the same request bytes (`Authorization: DPoP …`
//! and a proof): nginx as a plain reverse proxy (one worker), three floor proxies built from
//! Leash's own HTTP stack (one only relays; one relays and verifies each proof's Ed25519
//! signature; one relays and checks each proof as RFC 9449 §4.3 asks, all but `jti` replay,
//! with Leash's own `verify_proof`) and the real `leash` binary on SQLite with every check on
//! (token, grant, a fresh proof per request made before the clock starts, route, scope, Cedar,
//! the durable commit of `jti` + budget + audit event, the vaulted credential). For each: requests/s and the proxy's
//! own CPU time per request, from `/proc/<pid>/stat` over the run. Rounds interleave the
//! proxies; the medians are compared. Targets: Leash's CPU per request within 1/0.8 of the
//! floor's that verifies the proof and within 1/0.2 of nginx's.
//!
//! `latency` (target 2): the same pinning; an open loop at 1,000 requests/s over 32
//! connections for 60 s, direct and through Leash, three times; latency counts from when each
//! request was due. Target: Leash adds ≤ 0.3 ms p50 and ≤ 1 ms p99 over direct.
//!
//! Run: cargo bench -p leash-cli --bench gateway_load [-- own-cost | latency]
//! (needs nginx, wrk and taskset: apt-get install nginx-light wrk util-linux).
//! With `GATEWAY_LOAD_PROFILE_RATE=<requests/s>` it runs only Leash at that rate, unpinned, for
//! a profiler. `GATEWAY_LOAD_PROXIES=leash` (any of nginx, relay, verify, proof, leash)
//! measures only those in `own-cost`; `GATEWAY_LOAD_PIN=0` pins nothing;
//! `GATEWAY_LOAD_SECONDS=20` shortens each latency run; `LEASH_BENCH_BIN=<path>` runs another
//! build of `leash` (the floors stay this build's).

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use leash_core::jwk::PublicJwk;
use leash_core::jws::Alg;
use leash_testkit::{Leash, Scenario, now};

mod common;

const NGINX: &str = "/usr/sbin/nginx";
const WRK: &str = "/usr/bin/wrk";
const TASKSET: &str = "/usr/bin/taskset";
const PROXY_CORE: &str = "0";
const LOAD_CORE: &str = "1";
const CONNECTIONS: usize = 32;
const BODY: usize = 1024;
const OWN_COST_SECONDS: u64 = 10;
const OWN_COST_ROUNDS: usize = 3;
/// Fresh proofs made for each of Leash's own-cost runs; more than one core can use in
/// `OWN_COST_SECONDS` (a shortfall shows as refused requests, which fail the run).
const OWN_COST_PROOFS: usize = 150_000;
const LATENCY_RATE: u64 = 1_000;
/// How long each latency run lasts: 60 s, the target's; `GATEWAY_LOAD_SECONDS` shortens it
/// for comparing two builds.
fn latency_seconds() -> u64 {
    std::env::var("GATEWAY_LOAD_SECONDS")
        .ok()
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or(60)
}
const LATENCY_ROUNDS: usize = 3;
/// The environment variable that makes this binary a floor proxy (`relay`, `verify` or
/// `proof`), so that the floor runs as a process of its own, pinned and measured like the
/// others.
const FLOOR_ENV: &str = "GATEWAY_LOAD_FLOOR";

// A floor proxy runs in this binary: allocate as the `leash` binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The `wrk` script: every request carries the token and the next proof of a file made before
/// the run. Past the file's end it starts over; Leash refuses a proof seen before, so a
/// shortfall of proofs shows as failed requests.
const WRK_SCRIPT: &str = r#"
local proofs, index, authorization = {}, 0, nil
function init(args)
  authorization = args[2]
  for line in io.lines(args[1]) do proofs[#proofs + 1] = line end
end
function request()
  index = index + 1
  if index > #proofs then index = 1 end
  return wrk.format(nil, nil, { ["Authorization"] = authorization, ["DPoP"] = proofs[index] })
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LEASH_WRK requests=%d duration_us=%d failed=%d\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

/// Runs `program` pinned to `core`.
fn pinned(core: &str, program: &str) -> tokio::process::Command {
    let mut command = if pinning() {
        let mut command = tokio::process::Command::new(TASKSET);
        command.args(["-c", core, program]);
        command
    } else {
        tokio::process::Command::new(program)
    };
    command.kill_on_drop(true);
    command
}

/// `GATEWAY_LOAD_PIN=0` leaves every process free to run on any core (the latency run, as a
/// deployment would run it); pinning is the default.
fn pinning() -> bool {
    std::env::var("GATEWAY_LOAD_PIN").map_or(true, |v| v != "0")
}

/// Moves every thread of `pid` to `core`; the threads it starts later inherit it.
fn pin(pid: u32, core: &str) {
    if !pinning() {
        return;
    }
    let status = std::process::Command::new(TASKSET)
        .args(["-a", "-p", "-c", core, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset");
    assert!(status.success(), "taskset -a -p -c {core} {pid}");
}

/// The kernel's clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `/proc/<pid>/stat` after the command name: the fields from `state` (field 3) on.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU ticks of `pid`, all its threads.
fn cpu_ticks(pid: u32) -> u64 {
    let fields = stat_fields(pid).expect("the process under test is running");
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// `pid` and its children (nginx's master and workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let parent = stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// Busy and total time of each core (`/proc/stat`'s `cpuN` lines).
fn core_times() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: idle and iowait are idle.
            let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
            let total: u64 = fields.iter().take(8).sum();
            (total - idle, total)
        })
        .collect()
}

/// How busy each core was between two `core_times` readings, in per cent.
fn core_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((busy0, total0), (busy1, total1))| {
            let total = total1.saturating_sub(*total0).max(1);
            100.0 * busy1.saturating_sub(*busy0) as f64 / total as f64
        })
        .collect()
}

/// A proxy under test: where to send, and whose CPU time is its own.
struct Proxy {
    /// What `GATEWAY_LOAD_PROXIES` calls it.
    key: &'static str,
    name: &'static str,
    url: String,
    pids: Vec<u32>,
}

/// One measured run of one proxy.
struct OwnCost {
    per_second: f64,
    cpu_us_per_request: f64,
    failed: u64,
    busy: Vec<f64>,
}

/// Drives `url` with `wrk` from the load core for `seconds`, sending `proofs` in turn, and
/// reads the CPU time `pids` spent meanwhile.
async fn wrk_run(
    dir: &Path,
    url: &str,
    authorization: &str,
    proofs: &[String],
    pids: &[u32],
) -> OwnCost {
    let script = dir.join("proofs.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("wrk script");
    let proof_file = dir.join("proofs.txt");
    std::fs::write(&proof_file, proofs.join("\n")).expect("proof file");
    let ticks_before: u64 = pids.iter().map(|pid| cpu_ticks(*pid)).sum();
    let cores_before = core_times();
    let output = pinned(LOAD_CORE, WRK)
        .args([
            "-t1",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{OWN_COST_SECONDS}s"),
        ])
        .args(["--timeout", "5s", "-s"])
        .arg(&script)
        .arg(url)
        .arg("--")
        .arg(&proof_file)
        .arg(authorization)
        .output()
        .await
        .expect("run wrk");
    let ticks_after: u64 = pids.iter().map(|pid| cpu_ticks(*pid)).sum();
    let busy = core_busy(&cores_before, &core_times());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .find_map(|line| line.strip_prefix("LEASH_WRK "))
        .unwrap_or_else(|| panic!("wrk printed no summary: {stdout}"));
    let value = |name: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .expect("wrk summary field")
    };
    let (requests, duration_us, failed) =
        (value("requests"), value("duration_us"), value("failed"));
    let cpu_seconds = ticks_after.saturating_sub(ticks_before) as f64 / clock_ticks_per_second();
    OwnCost {
        per_second: requests as f64 * 1e6 / duration_us.max(1) as f64,
        cpu_us_per_request: cpu_seconds * 1e6 / requests.max(1) as f64,
        failed,
        busy,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Starts nginx pinned to `core` with one worker, `http` added to its `http {}` block and
/// `location` as its one server's. Returns the process and its port.
async fn start_nginx(
    prefix: &Path,
    core: &str,
    http: &str,
    location: &str,
) -> (tokio::process::Child, u16) {
    std::fs::create_dir_all(prefix).expect("nginx prefix");
    let port = free_port();
    let p = prefix.display();
    let config = format!(
        "worker_processes 1;\ndaemon off;\nerror_log stderr warn;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/cb;\n  proxy_temp_path {p}/px;\n\
           fastcgi_temp_path {p}/fc;\n  uwsgi_temp_path {p}/uw;\n  scgi_temp_path {p}/sc;\n\
           keepalive_requests 1000000;\n\
           {http}\n  server {{\n    listen 127.0.0.1:{port};\n    {location}\n  }}\n}}\n"
    );
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, config).expect("nginx.conf");
    let child = pinned(core, NGINX)
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start nginx");
    wait_until_up(&format!("http://127.0.0.1:{port}/ping")).await;
    (child, port)
}

/// Stops nginx with its workers (a kill of the master alone would orphan them).
async fn stop_nginx(prefix: &Path, mut child: tokio::process::Child) {
    let _ = tokio::process::Command::new(NGINX)
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(prefix.join("nginx.conf"))
        .args(["-s", "stop"])
        .status()
        .await;
    let _ = child.wait().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn wait_until_up(url: &str) {
    for _ in 0..200 {
        if reqwest::get(url).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not answer");
}

/// What any gateway built like Leash pays before its own checks: Leash's HTTP stack (axum
/// serving the agent, `leash_server::upstream_client` forwarding, a runtime of one worker per
/// core, mimalloc) relaying to the upstream with no checks, and for `verify`, also the one
/// check the issue forbids skipping: the proof's Ed25519 signature, verified strictly against
/// a decoded key (nothing else of the proof is looked at); for `proof`, instead, the whole
/// proof check a resource server owes (RFC 9449 §4.3: its key from the header, signature,
/// `typ`, `htm`, `htu`, `iat`, `ath` against the request's token; `leash_core::dpop::
/// verify_proof`), all but the replay check of its `jti`, which needs a store. Serves until
/// killed; prints its URL.
fn floor_main(kind: &str) {
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;

    struct Floor {
        upstream: String,
        key: Option<PublicJwk>,
        /// For `proof`: the URL the proofs name.
        proof_url: Option<String>,
        client: leash_server::upstream_client::UpstreamClient,
    }
    async fn relay(State(floor): State<Arc<Floor>>, request: Request) -> Response {
        if let Some(url) = &floor.proof_url {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
            };
            let token_hash = header("authorization")
                .and_then(|value| value.strip_prefix("DPoP "))
                .map(leash_core::dpop::AccessTokenHash::of);
            let verified = header("dpop")
                .zip(token_hash)
                .and_then(|(proof, token_hash)| {
                    let cx = leash_core::dpop::ProofContext {
                        method: request.method().as_str(),
                        url,
                        access_token: Some(&token_hash),
                        now: now(),
                        nonces: None,
                    };
                    leash_core::dpop::verify_proof(proof, &cx).ok()
                });
            if verified.is_none() {
                return axum::http::StatusCode::UNAUTHORIZED.into_response();
            }
        }
        if let Some(key) = &floor.key {
            let verified = request
                .headers()
                .get("dpop")
                .and_then(|proof| proof.to_str().ok())
                .and_then(|proof| proof.rsplit_once('.'))
                .and_then(|(input, signature)| {
                    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(signature)
                        .ok()?;
                    key.verify(Alg::EdDsa, input.as_bytes(), &signature).ok()
                });
            if verified.is_none() {
                return axum::http::StatusCode::UNAUTHORIZED.into_response();
            }
        }
        let (parts, body) = request.into_parts();
        let mut forwarded = axum::http::Request::new(body);
        *forwarded.method_mut() = parts.method;
        *forwarded.uri_mut() = format!("{}{}", floor.upstream, parts.uri.path())
            .parse()
            .expect("target");
        match floor.client.request(forwarded).await {
            Ok(response) => response.map(axum::body::Body::new),
            Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
        }
    }

    let upstream = std::env::var("GATEWAY_LOAD_UPSTREAM").expect("the floor's upstream");
    let key = (kind == "verify").then(|| {
        let jwk = std::env::var("GATEWAY_LOAD_KEY").expect("the floor's key");
        PublicJwk::from_value(&serde_json::from_str(&jwk).expect("key JSON")).expect("key")
    });
    let proof_url = (kind == "proof")
        .then(|| std::env::var("GATEWAY_LOAD_PROOF_URL").expect("the URL the proofs name"));
    let floor = Arc::new(Floor {
        upstream,
        key,
        proof_url,
        client: leash_server::upstream_client::build(),
    });
    let url = leash_testkit::serve_apart(axum::Router::new().fallback(relay).with_state(floor));
    println!("{url}");
    loop {
        std::thread::park();
    }
}

/// Starts this binary as the floor proxy `kind` on `core`; returns it and its URL.
async fn start_floor(
    kind: &str,
    upstream: &str,
    key: &PublicJwk,
    proof_url: &str,
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt as _;
    let exe = std::env::current_exe().expect("this benchmark's path");
    let mut child = pinned(PROXY_CORE, exe.to_str().expect("UTF-8 path"))
        .env(FLOOR_ENV, kind)
        .env("GATEWAY_LOAD_UPSTREAM", upstream)
        .env("GATEWAY_LOAD_KEY", key.to_value().to_string())
        .env("GATEWAY_LOAD_PROOF_URL", proof_url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the floor");
    let stdout = child.stdout.take().expect("piped");
    let url = tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .expect("read the floor's URL")
        .expect("the floor printed its URL");
    (child, url)
}

/// A fresh token for the scenario's grant, and `count` fresh proofs for `url`; proof `i` says
/// it was made `i / per_second` seconds from now (all now when `per_second` is `None`), so that
/// the proofs of a long open-loop run are as fresh as an agent's when each is sent.
async fn token_and_proofs(
    leash: &Leash,
    s: &Scenario,
    url: &str,
    count: usize,
    per_second: Option<u64>,
) -> (String, Vec<String>, PublicJwk) {
    let (token, dpop) = s.token(leash).await;
    let first_iat = now();
    let proofs = (0..count)
        .map(|i| {
            let iat = first_iat + per_second.map_or(0, |rate| i as i64 / rate as i64);
            dpop.dpop_proof("GET", url, Some(&token), None, iat)
        })
        .collect();
    (format!("DPoP {token}"), proofs, dpop.public())
}

/// The gateway URL every Leash request (and every floor's proof) names.
fn leash_url(leash: &Leash) -> String {
    format!("{}/gw/mail/messages/1", leash.url)
}

/// The upstream: nginx on the load core answering 1 KiB to everything.
async fn start_upstream(prefix: &Path) -> (tokio::process::Child, String) {
    let body = "x".repeat(BODY);
    let (child, port) = start_nginx(
        prefix,
        LOAD_CORE,
        "",
        &format!("location / {{ default_type text/plain; return 200 \"{body}\"; }}"),
    )
    .await;
    (child, format!("http://127.0.0.1:{port}"))
}

/// One request through `url`, checked: the path answers 200 with the whole body.
async fn check_path(url: &str, authorization: &str, proof: &str) {
    let response = reqwest::Client::new()
        .get(url)
        .header("Authorization", authorization)
        .header("DPoP", proof)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200, "{url}");
    assert_eq!(response.bytes().await.expect("body").len(), BODY, "{url}");
}

/// Target 1: each proxy's own CPU per request, pinned.
async fn own_cost(dir: &Path) {
    let (upstream_process, upstream) = start_upstream(&dir.join("upstream")).await;
    let (leash, s) = common::start_with_mail_credential(&upstream).await;
    pin(leash.pid(), PROXY_CORE);
    let gateway_url = leash_url(&leash);
    // nginx and the floors read the same request bytes as Leash: a token and proofs for
    // Leash's URL, reused in turn (they do not look at `jti`); the verify floor checks them
    // against the key the token is bound to.
    let (floor_authorization, floor_proofs, floor_key) =
        token_and_proofs(&leash, &s, &gateway_url, 1_000, None).await;
    let nginx_prefix = dir.join("proxy");
    let (nginx_process, nginx_port) = start_nginx(
        &nginx_prefix,
        PROXY_CORE,
        &format!(
            "upstream app {{ server {}; keepalive 64; keepalive_requests 1000000; }}",
            upstream.trim_start_matches("http://")
        ),
        "location / { proxy_pass http://app; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }",
    )
    .await;
    let (relay_process, relay_url) =
        start_floor("relay", &upstream, &floor_key, &gateway_url).await;
    let (verify_process, verify_url) =
        start_floor("verify", &upstream, &floor_key, &gateway_url).await;
    let (proof_process, proof_url) =
        start_floor("proof", &upstream, &floor_key, &gateway_url).await;
    let pid = |child: &tokio::process::Child| child.id().expect("running");
    let proxies = [
        Proxy {
            key: "nginx",
            name: "nginx reverse proxy (1 worker)",
            url: format!("http://127.0.0.1:{nginx_port}/messages/1"),
            pids: with_children(pid(&nginx_process)),
        },
        Proxy {
            key: "relay",
            name: "floor: relay only",
            url: format!("{relay_url}/messages/1"),
            pids: vec![pid(&relay_process)],
        },
        Proxy {
            key: "verify",
            name: "floor: relay + Ed25519 verify",
            url: format!("{verify_url}/messages/1"),
            pids: vec![pid(&verify_process)],
        },
        Proxy {
            key: "proof",
            name: "floor: relay + DPoP proof check",
            url: format!("{proof_url}/messages/1"),
            pids: vec![pid(&proof_process)],
        },
        Proxy {
            key: "leash",
            name: "Leash gateway",
            url: gateway_url.clone(),
            pids: vec![leash.pid()],
        },
    ];
    for proxy in &proxies[..4] {
        check_path(&proxy.url, &floor_authorization, &floor_proofs[0]).await;
    }
    // `GATEWAY_LOAD_PROXIES=leash` (or `nginx,relay,verify,proof,leash`, any of them): measure
    // only those, for a profiler attached to one (the comparisons need all five).
    let chosen = std::env::var("GATEWAY_LOAD_PROXIES").unwrap_or_default();
    let measured = |proxy: &Proxy| chosen.is_empty() || chosen.split(',').any(|k| k == proxy.key);

    println!("(leash pid {})", leash.pid());
    println!(
        "own cost: the proxy alone on core {PROXY_CORE}; wrk (1 thread, {CONNECTIONS} \
         connections) and the upstream on core {LOAD_CORE}; {OWN_COST_SECONDS} s per run"
    );
    println!(
        "| round | proxy | requests/s | CPU µs per request | failed | core 0 busy | core 1 busy |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut runs: Vec<Vec<OwnCost>> = proxies.iter().map(|_| Vec::new()).collect();
    for round in 1..=OWN_COST_ROUNDS {
        for (proxy, runs) in proxies.iter().zip(&mut runs) {
            if !measured(proxy) {
                continue;
            }
            let run = if proxy.key == "leash" {
                let (authorization, proofs, _) =
                    token_and_proofs(&leash, &s, &gateway_url, OWN_COST_PROOFS, None).await;
                check_path(&proxy.url, &authorization, &proofs[0]).await;
                wrk_run(dir, &proxy.url, &authorization, &proofs[1..], &proxy.pids).await
            } else if proxy.key == "proof" {
                // Proofs made now: this floor checks `iat` against its clock.
                let (authorization, proofs, _) =
                    token_and_proofs(&leash, &s, &gateway_url, 1_000, None).await;
                wrk_run(dir, &proxy.url, &authorization, &proofs, &proxy.pids).await
            } else {
                wrk_run(
                    dir,
                    &proxy.url,
                    &floor_authorization,
                    &floor_proofs,
                    &proxy.pids,
                )
                .await
            };
            let busy = |core: usize| {
                run.busy
                    .get(core)
                    .map_or("?".into(), |b| format!("{b:.0} %"))
            };
            println!(
                "| {round} | {} | {:.0} | {:.1} | {} | {} | {} |",
                proxy.name,
                run.per_second,
                run.cpu_us_per_request,
                run.failed,
                busy(0),
                busy(1)
            );
            assert_eq!(run.failed, 0, "{}: failed requests", proxy.name);
            runs.push(run);
        }
    }

    println!();
    println!("| proxy | requests/s (median) | CPU µs per request (median) |");
    println!("|---|---|---|");
    let mut medians = Vec::new();
    for (proxy, runs) in proxies.iter().zip(&runs) {
        let per_second = median(&mut runs.iter().map(|r| r.per_second).collect::<Vec<_>>());
        let cpu = median(
            &mut runs
                .iter()
                .map(|r| r.cpu_us_per_request)
                .collect::<Vec<_>>(),
        );
        println!("| {} | {per_second:.0} | {cpu:.1} |", proxy.name);
        medians.push((per_second, cpu));
    }
    if chosen.is_empty() {
        let [nginx, _, verify, proof, leash_cost] =
            [medians[0], medians[1], medians[2], medians[3], medians[4]];
        println!();
        println!(
            "Leash against the proof floor: {:.1} % of its CPU efficiency (floor µs / Leash µs; \
             target >= 80 %), {:.1} % of its requests/s",
            100.0 * proof.1 / leash_cost.1,
            100.0 * leash_cost.0 / proof.0
        );
        println!(
            "Leash against the verify floor: {:.1} % of its CPU efficiency (floor µs / Leash µs; \
             target >= 80 %), {:.1} % of its requests/s",
            100.0 * verify.1 / leash_cost.1,
            100.0 * leash_cost.0 / verify.0
        );
        println!(
            "Leash against nginx: {:.1} % of its CPU efficiency (target >= 20 %), {:.1} % of its \
             requests/s",
            100.0 * nginx.1 / leash_cost.1,
            100.0 * leash_cost.0 / nginx.0
        );
        println!(
            "the verify floor against nginx: {:.1} % of its CPU efficiency",
            100.0 * nginx.1 / verify.1
        );
    }
    stop_nginx(&nginx_prefix, nginx_process).await;
    stop_nginx(&dir.join("upstream"), upstream_process).await;
    drop((relay_process, verify_process, proof_process));
}

/// What a reqwest request needs: a URL and, for Leash, the token and the next proof.
#[derive(Clone)]
struct Target {
    url: String,
    authorization: String,
    proofs: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
}

impl Target {
    fn plain(url: String) -> Self {
        Self {
            url,
            authorization: String::new(),
            proofs: Arc::default(),
            next: Arc::default(),
        }
    }

    fn request(&self, client: &reqwest::Client) -> Option<reqwest::RequestBuilder> {
        if self.proofs.is_empty() {
            return Some(client.get(&self.url));
        }
        let proof = self.proofs.get(self.next.fetch_add(1, Ordering::Relaxed))?;
        Some(
            client
                .get(&self.url)
                .header("Authorization", &self.authorization)
                .header("DPoP", proof),
        )
    }
}

struct Run {
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    failures: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn send(target: &Target, client: &reqwest::Client) -> Option<bool> {
    let response = target.request(client)?.send().await.ok()?;
    let ok = response.status() == 200;
    let body = response.bytes().await.ok()?;
    Some(ok && body.len() == BODY)
}

/// Opens `CONNECTIONS` connections to `target` and sends 256 requests over them, so that a
/// measured run starts with the pools (the client's, and a proxy's to the upstream) as full as
/// the run keeps them.
async fn warm(target: &Target, client: &reqwest::Client) {
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (target, client) = (target.clone(), client.clone());
            tokio::spawn(async move {
                for _ in 0..256 / CONNECTIONS {
                    send(&target, &client).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("warm-up");
    }
}

/// Open loop at `rate` requests/s for `seconds`; latency counts from when each request was
/// due, so a stalled server cannot hide its queueing (no coordinated omission). At most
/// `CONNECTIONS` requests are in flight, over the connections the warm-up opened, as wrk2 does
/// with its fixed connections; a request due while all are busy waits for one, and that wait
/// counts in its latency. The pace is kept by a thread of its own: the runtime's timer ticks
/// in milliseconds, which at 1,000 requests/s would add up to a millisecond to each latency,
/// differently from run to run.
async fn at_rate(target: &Target, client: &reqwest::Client, rate: u64, seconds: u64) -> Run {
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if due_tx.send(due).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(total);
    while let Some(due) = due_rx.recv().await {
        let (target, client, failures) = (target.clone(), client.clone(), failures.clone());
        let connections = connections.clone();
        tasks.push(tokio::spawn(async move {
            let _connection = connections.acquire().await.expect("never closed");
            match send(&target, &client).await {
                Some(true) => Some(due.elapsed().as_micros() as u64),
                _ => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        }));
    }
    pacer.join().expect("pacer");
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await.expect("task"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Run {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        failures: failures.load(Ordering::Relaxed),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

/// A Leash target with `count` proofs, the i-th made for the second it will be sent in at
/// `rate`.
async fn leash_target(leash: &Leash, s: &Scenario, count: usize, rate: Option<u64>) -> Target {
    let url = leash_url(leash);
    let (authorization, proofs, _) = token_and_proofs(leash, s, &url, count, rate).await;
    Target {
        url,
        authorization,
        proofs: Arc::new(proofs),
        next: Arc::default(),
    }
}

/// Target 2: latency added at a fleet's load, pinned as in `own_cost`.
async fn latency(dir: &Path) {
    let (upstream_process, upstream) = start_upstream(&dir.join("upstream")).await;
    let (leash, s) = common::start_with_mail_credential(&upstream).await;
    pin(leash.pid(), PROXY_CORE);
    let client = client();
    let direct = Target::plain(format!("{upstream}/messages/1"));
    // The proof-check floor of `own_cost`, for what any proxy that checks proofs adds.
    let gateway_url = leash_url(&leash);
    let (_, _, key) = token_and_proofs(&leash, &s, &gateway_url, 1, None).await;
    let (floor_process, floor_url) = start_floor("proof", &upstream, &key, &gateway_url).await;
    let seconds = latency_seconds();
    println!(
        "latency: open loop at {LATENCY_RATE} requests/s, at most {CONNECTIONS} in flight, \
         {seconds} s per run; Leash alone on core {PROXY_CORE}, client and upstream on \
         core {LOAD_CORE}"
    );
    println!("| round | path | requests/s | p50 µs | p99 µs | failures |");
    println!("|---|---|---|---|---|---|");
    let (mut added, mut floor_added) = (Vec::new(), Vec::new());
    for round in 1..=LATENCY_ROUNDS {
        warm(&direct, &client).await;
        let direct_run = at_rate(&direct, &client, LATENCY_RATE, seconds).await;
        let warm_up = leash_target(&leash, &s, 256, None).await;
        warm(&warm_up, &client).await;
        let total = (LATENCY_RATE * seconds) as usize;
        let gateway = leash_target(&leash, &s, total, Some(LATENCY_RATE)).await;
        let leash_run = at_rate(&gateway, &client, LATENCY_RATE, seconds).await;
        let floor = Target {
            url: format!("{floor_url}/messages/1"),
            ..leash_target(&leash, &s, total, Some(LATENCY_RATE)).await
        };
        let floor_run = at_rate(&floor, &client, LATENCY_RATE, seconds).await;
        for (name, run) in [
            ("direct", &direct_run),
            ("floor: relay + DPoP proof check", &floor_run),
            ("Leash gateway", &leash_run),
        ] {
            println!(
                "| {round} | {name} | {:.0} | {} | {} | {} |",
                run.per_second, run.p50_us, run.p99_us, run.failures
            );
            assert_eq!(run.failures, 0, "{name}: failed requests");
        }
        // What a path adds over direct, p50 and p99, in ms.
        let over_direct = |run: &Run| {
            (
                (run.p50_us as f64 - direct_run.p50_us as f64) / 1000.0,
                (run.p99_us as f64 - direct_run.p99_us as f64) / 1000.0,
            )
        };
        added.push(over_direct(&leash_run));
        floor_added.push(over_direct(&floor_run));
    }
    let spread = |values: Vec<f64>| {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{low:.3}–{high:.3} ms")
    };
    println!();
    println!(
        "Leash adds p50 {} (target <= 0.3 ms), p99 {} (target <= 1 ms) over direct",
        spread(added.iter().map(|a| a.0).collect()),
        spread(added.iter().map(|a| a.1).collect())
    );
    println!(
        "the proof-check floor adds p50 {}, p99 {} over direct",
        spread(floor_added.iter().map(|a| a.0).collect()),
        spread(floor_added.iter().map(|a| a.1).collect())
    );
    drop(floor_process);
    stop_nginx(&dir.join("upstream"), upstream_process).await;
}

/// `GATEWAY_LOAD_PROFILE_RATE=<requests/s>`: only Leash, unpinned, open loop at that rate for
/// 20 s, for attaching a profiler (`perf record -p`) to the server, whose pid it prints first.
fn profile_rate() -> Option<u64> {
    std::env::var("GATEWAY_LOAD_PROFILE_RATE")
        .ok()?
        .parse()
        .ok()
}

async fn profile(dir: &Path, rate: u64) {
    const PROFILE_SECONDS: u64 = 20;
    let (upstream_process, upstream) = start_upstream(&dir.join("upstream")).await;
    let (leash, s) = common::start_with_mail_credential(&upstream).await;
    let client = client();
    let warm_up = leash_target(&leash, &s, 256, None).await;
    warm(&warm_up, &client).await;
    let count = (rate * PROFILE_SECONDS) as usize;
    let gateway = leash_target(&leash, &s, count, Some(rate)).await;
    println!(
        "leash pid {}: {rate} requests/s for {PROFILE_SECONDS} s",
        leash.pid()
    );
    let run = at_rate(&gateway, &client, rate, PROFILE_SECONDS).await;
    println!(
        "{:.0} requests/s, p50 {} µs, p99 {} µs, {} failures",
        run.per_second, run.p50_us, run.p99_us, run.failures
    );
    stop_nginx(&dir.join("upstream"), upstream_process).await;
}

fn main() {
    if let Ok(kind) = std::env::var(FLOOR_ENV) {
        return floor_main(&kind);
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not: then only check it builds.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    for tool in [NGINX, WRK, TASKSET] {
        assert!(
            Path::new(tool).exists(),
            "this benchmark needs {tool}: apt-get install nginx-light wrk util-linux"
        );
    }
    let only = |name: &str| {
        !args.iter().any(|a| a == "own-cost" || a == "latency") || args.iter().any(|a| a == name)
    };
    let temp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = temp.path().to_owned();
    let profiling = profile_rate();
    if profiling.is_none() {
        // The load client and everything this process starts stay on the load core; each
        // proxy under test is moved to the other.
        pin(std::process::id(), LOAD_CORE);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(rate) = profiling {
        return runtime.block_on(profile(&dir, rate));
    }
    if only("own-cost") {
        runtime.block_on(own_cost(&dir));
    }
    if only("latency") {
        runtime.block_on(latency(&dir));
    }
}
