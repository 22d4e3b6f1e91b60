//! Gateway load on loopback: an upstream answering 1 KiB, measured direct, through nginx as a
//! plain reverse proxy, and through the Leash gateway with every check on (DPoP-bound token, a
//! fresh proof per request, grant liveness, route, scope, Cedar policy, the durable commit of the
//! proof's `jti` and the budget count, the vaulted credential injected).
//! Targets (issue: gateway): Leash ≥ 50 % of nginx's requests/s, and ≤ 1 ms added p99 over
//! direct at half of Leash's own peak rate. Each run also shows how busy the machine was, and
//! direct and Leash are measured once more at a quarter of Leash's peak. nginx and the floor
//! proxy that verifies each proof are measured at half of their own peaks too: the p99 target
//! applied to them.
//! Run: cargo bench -p leash-cli --bench gateway_load   (needs nginx: apt-get install nginx)
//! With `GATEWAY_LOAD_PROFILE_RATE=<requests/s>` it runs only Leash at that rate, for a profiler.

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use leash_core::client::AgentKey;
use leash_core::jwk::PublicJwk;
use leash_core::jws::Alg;
use leash_testkit::{Leash, Scenario, now};
use serde_json::json;

const NGINX: &str = "/usr/sbin/nginx";
const SECONDS: u64 = 5;
const CONCURRENCY: usize = 32;
const BODY: usize = 1024;

// The floor proxies run in this process: allocate as the `leash` binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What a target needs per request: a URL and, for Leash and the floors, the token and the
/// next proof.
#[derive(Clone)]
enum Target {
    Plain(String),
    Proofs(Arc<ProofTarget>),
}

struct ProofTarget {
    url: String,
    authorization: String,
    proofs: Arc<Vec<String>>,
    next: AtomicUsize,
    /// Leash refuses a proof seen before; the floors do not look.
    each_once: bool,
}

impl Target {
    fn request(&self, client: &reqwest::Client) -> Option<reqwest::RequestBuilder> {
        match self {
            Self::Plain(url) => Some(client.get(url)),
            Self::Proofs(target) => {
                let mut next = target.next.fetch_add(1, Ordering::Relaxed);
                if !target.each_once {
                    next %= target.proofs.len();
                }
                let proof = target.proofs.get(next)?;
                Some(
                    client
                        .get(&target.url)
                        .header("Authorization", &target.authorization)
                        .header("DPoP", proof),
                )
            }
        }
    }
}

struct Run {
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    failures: u64,
    /// How busy the whole machine was (client, upstream and proxy share it).
    machine_busy: Option<f64>,
}

/// The machine's CPU time counters (`/proc/stat`, all cores): busy and in all.
#[derive(Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// `None` where `/proc/stat` is not there to read.
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …: idle and iowait are the idle time;
        // steal (the host ran something else on the core) counts as busy, for this machine.
        let idle = fields.get(3)? + fields.get(4)?;
        let total: u64 = fields.iter().take(8).sum();
        Some(Self {
            busy: total - idle,
            total,
        })
    }

    /// The share of the machine's CPU time spent busy since `self`.
    fn busy_since(self) -> Option<f64> {
        let now = Self::now()?;
        let total = now.total.checked_sub(self.total)?;
        // Linux's iowait count can step back, so busy time can too.
        (total > 0).then(|| now.busy.saturating_sub(self.busy) as f64 / total as f64)
    }
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

fn summarise(
    mut latencies: Vec<u64>,
    elapsed: Duration,
    failures: u64,
    cpu_before: Option<CpuTimes>,
) -> Run {
    latencies.sort_unstable();
    Run {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        failures,
        machine_busy: cpu_before.and_then(CpuTimes::busy_since),
    }
}

/// Opens `CONCURRENCY` connections to `target` and sends 256 requests over them, right before
/// a measured run, so that the run starts with the client's pool (and a proxy's pool to the
/// upstream) as full as the run keeps it. Leash closes connections idle for its
/// `header_read_timeout` (10 s), and the runs of the other paths take longer than that; a run
/// that began by opening its connections under full load would measure connecting, which is
/// not the gateway's steady state (the first few hundred requests of such a run are its p99).
async fn warm(target: &Target, client: &reqwest::Client) {
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (target, client) = (target.clone(), client.clone());
            tokio::spawn(async move {
                for _ in 0..256 / CONCURRENCY {
                    send(&target, &client).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("warm-up");
    }
}

/// Closed loop: `CONCURRENCY` keep-alive connections send back to back for `SECONDS`.
async fn peak(target: &Target, client: &reqwest::Client) -> Run {
    let failures = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuTimes::now();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(SECONDS);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (target, client, failures) = (target.clone(), client.clone(), failures.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match send(&target, &client).await {
                        Some(true) => latencies.push(sent.elapsed().as_micros() as u64),
                        Some(false) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        None => break,
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("task"));
    }
    summarise(
        latencies,
        start.elapsed(),
        failures.load(Ordering::Relaxed),
        cpu_before,
    )
}

/// Open loop at `rate` requests/s for `SECONDS`; latency counts from when each request was due,
/// so a stalled server cannot hide its queueing (no coordinated omission). At most
/// `CONCURRENCY` requests are in flight, over the connections the warm-up opened, as wrk2 does
/// with its fixed connections; a request due while all are busy waits for one, and that wait
/// counts in its latency. Without the cap, every request due during a pause of a few
/// milliseconds would open a connection of its own, and the proxy paying for each connect
/// turns a pause into a storm of them.
async fn at_rate(target: &Target, client: &reqwest::Client, rate: f64) -> Run {
    at_rate_for(target, client, rate, SECONDS).await
}

async fn at_rate_for(target: &Target, client: &reqwest::Client, rate: f64, seconds: u64) -> Run {
    let total = (rate * seconds as f64) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let connections = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let failures = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuTimes::now();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
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
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("task"));
    }
    summarise(
        latencies,
        start.elapsed(),
        failures.load(Ordering::Relaxed),
        cpu_before,
    )
}

/// nginx as a plain reverse proxy to `upstream`, with keep-alive both ways, as many workers
/// as cores, and no access log (Leash runs with per-request logging off too).
async fn start_nginx(prefix: &Path, upstream: &str) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let p = prefix.display();
    let config = format!(
        "worker_processes auto;\ndaemon off;\nerror_log stderr warn;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/cb;\n  proxy_temp_path {p}/px;\n\
           fastcgi_temp_path {p}/fc;\n  uwsgi_temp_path {p}/uw;\n  scgi_temp_path {p}/sc;\n\
           upstream app {{ server {}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://app;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        upstream.trim_start_matches("http://")
    );
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, config).expect("nginx.conf");
    let child = tokio::process::Command::new(NGINX)
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start nginx");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{url}/ping")).await.is_ok() {
            return (child, url);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nginx did not start");
}

fn print_header() {
    println!("| path | requests/s | p50 µs | p99 µs | failures | machine busy |");
    println!("|---|---|---|---|---|---|");
}

/// The table of an open-loop run at `rate`, which is `what` (of whose peak).
fn print_open_loop_header(rate: f64, what: &str) {
    println!();
    println!(
        "open loop at {rate:.0} requests/s ({what}), at most {CONCURRENCY} in flight, {SECONDS} s \
         each"
    );
    print_header();
}

fn print_row(name: &str, run: &Run) {
    let busy = run
        .machine_busy
        .map_or_else(|| "?".to_owned(), |busy| format!("{:.0} %", 100.0 * busy));
    println!(
        "| {name} | {:.0} | {} | {} | {} | {busy} |",
        run.per_second, run.p50_us, run.p99_us, run.failures
    );
}

/// What `run` adds to the direct path's p99, in ms.
fn added_p99_ms(run: &Run, direct: &Run) -> f64 {
    (run.p99_us as f64 - direct.p99_us as f64) / 1000.0
}

/// The gateway URL every Leash request (and every floor's proof) names.
fn leash_url(leash: &Leash) -> String {
    format!("{}/gw/mail/messages/1", leash.url)
}

fn leash_target(leash: &Leash, token: &str, dpop: &AgentKey) -> Target {
    let url = leash_url(leash);
    // Enough fresh proofs for a peak run and a rate run, made before measuring.
    let proofs: Vec<String> = (0..60_000)
        .map(|_| dpop.dpop_proof("GET", &url, Some(token), None, now()))
        .collect();
    Target::Proofs(Arc::new(ProofTarget {
        url,
        authorization: format!("DPoP {token}"),
        proofs: Arc::new(proofs),
        next: AtomicUsize::new(0),
        each_once: true,
    }))
}

/// A floor proxy gets the same request bytes as Leash (token and a proof, reused in turn).
fn floor_target(url: &str, token: &str, proofs: &Arc<Vec<String>>) -> Target {
    Target::Proofs(Arc::new(ProofTarget {
        url: format!("{url}/messages/1"),
        authorization: format!("DPoP {token}"),
        proofs: proofs.clone(),
        next: AtomicUsize::new(0),
        each_once: false,
    }))
}

/// What any gateway built like Leash pays before its own checks: Leash's HTTP stack (axum
/// serving the agent, `leash_server::upstream_client` forwarding, the same 2-worker
/// runtime, mimalloc) relaying to the upstream with no checks, and with `key`, also the one
/// check the issue forbids skipping: the proof's Ed25519 signature, verified strictly against a
/// decoded key (nothing else of the proof is looked at). Runs on its own runtime, as the
/// upstream does (`leash_testkit::serve_apart`); returns its base URL.
fn floor_proxy(upstream: &str, key: Option<PublicJwk>) -> String {
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;

    struct Floor {
        upstream: String,
        key: Option<PublicJwk>,
        client: leash_server::upstream_client::UpstreamClient,
    }
    async fn relay(State(floor): State<Arc<Floor>>, request: Request) -> Response {
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

    let floor = Arc::new(Floor {
        upstream: upstream.to_owned(),
        key,
        client: leash_server::upstream_client::build(),
    });
    leash_testkit::serve_apart(axum::Router::new().fallback(relay).with_state(floor))
}

async fn run() {
    let upstream = leash_testkit::fixed_upstream(&[b'x'; BODY]);
    let leash = Leash::start_quiet(Path::new(env!("CARGO_BIN_EXE_leash")), "", &upstream).await;
    let s = Scenario::new(&leash).await;
    let (status, body) = leash
        .call(
            reqwest::Method::PUT,
            "/v1/vault/mail",
            &s.user_key,
            Some(json!({"kind": "bearer", "secret": "alice-mail-token"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (token, dpop) = s.token(&leash).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");

    if let Some(rate) = profile_rate() {
        return profile(&leash, &token, &dpop, &client, rate).await;
    }
    let prefix = tempfile::tempdir().expect("tempdir");
    let (mut nginx_process, nginx_url) = start_nginx(prefix.path(), &upstream).await;

    let direct = Target::Plain(format!("{upstream}/messages/1"));
    let nginx = Target::Plain(format!("{nginx_url}/messages/1"));
    // Proofs for Leash's URL, so that the floors read requests of the same size.
    let leash_url = leash_url(&leash);
    let floor_proofs = Arc::new(
        (0..1_000)
            .map(|_| dpop.dpop_proof("GET", &leash_url, Some(&token), None, now()))
            .collect::<Vec<_>>(),
    );
    let relay = floor_target(&floor_proxy(&upstream, None), &token, &floor_proofs);
    let verify = floor_target(
        &floor_proxy(&upstream, Some(dpop.public())),
        &token,
        &floor_proofs,
    );
    let floors = [
        ("floor: relay only", &relay),
        ("floor: relay + Ed25519 verify", &verify),
    ];

    // Warm every path (connections, caches) before measuring.
    for target in [&direct, &nginx, &relay, &verify] {
        warm(target, &client).await;
    }

    println!("peak, {CONCURRENCY} connections, {SECONDS} s each");
    print_header();
    let direct_peak = peak(&direct, &client).await;
    print_row("direct", &direct_peak);
    let nginx_peak = peak(&nginx, &client).await;
    print_row("nginx reverse proxy", &nginx_peak);
    let mut floor_peaks = [0.0; 2];
    for (floor_peak, (name, target)) in floor_peaks.iter_mut().zip(floors) {
        warm(target, &client).await;
        let run = peak(target, &client).await;
        print_row(name, &run);
        *floor_peak = run.per_second;
    }
    let gateway = leash_target(&leash, &token, &dpop);
    warm(&gateway, &client).await;
    let leash_peak = peak(&gateway, &client).await;
    print_row("Leash gateway", &leash_peak);

    let rate = leash_peak.per_second / 2.0;
    print_open_loop_header(rate, "half of Leash's peak");
    let direct_rate = at_rate(&direct, &client, rate).await;
    print_row("direct", &direct_rate);
    let nginx_rate = at_rate(&nginx, &client, rate).await;
    print_row("nginx reverse proxy", &nginx_rate);
    let mut floor_rates = Vec::new();
    for (name, target) in floors {
        warm(target, &client).await;
        let run = at_rate(target, &client, rate).await;
        print_row(name, &run);
        floor_rates.push(run);
    }
    let gateway = leash_target(&leash, &token, &dpop);
    warm(&gateway, &client).await;
    let logged_before = leash.logs().len();
    let leash_rate = at_rate(&gateway, &client, rate).await;
    print_row("Leash gateway", &leash_rate);
    let restarts = log_restart_pauses(&leash.logs()[logged_before..]);

    // Direct and Leash again at half that rate: how the added p99 falls as the machine, which
    // the client and upstream share with the proxy, gets room to spare.
    let quarter = rate / 2.0;
    print_open_loop_header(quarter, "a quarter of Leash's peak");
    warm(&direct, &client).await;
    let direct_quarter = at_rate(&direct, &client, quarter).await;
    print_row("direct", &direct_quarter);
    warm(&gateway, &client).await;
    let leash_quarter = at_rate(&gateway, &client, quarter).await;
    print_row("Leash gateway", &leash_quarter);

    // nginx and the verify floor at half of their own peaks, each against direct at the same
    // rate: whether a plain proxy, and a proxy that only verifies each proof, add at most 1 ms
    // p99 at half of their own peak on this machine, as the target asks of Leash.
    let ([_, (verify_name, _)], [_, verify_peak]) = (floors, floor_peaks);
    let mut own_half = Vec::new();
    for (name, target, own_peak) in [
        ("nginx reverse proxy", &nginx, nginx_peak.per_second),
        (verify_name, &verify, verify_peak),
    ] {
        let rate = own_peak / 2.0;
        print_open_loop_header(rate, &format!("half of the peak of {name}"));
        warm(&direct, &client).await;
        let direct_run = at_rate(&direct, &client, rate).await;
        print_row("direct", &direct_run);
        warm(target, &client).await;
        let run = at_rate(target, &client, rate).await;
        print_row(name, &run);
        own_half.push((name, added_p99_ms(&run, &direct_run)));
    }

    // Stop nginx with its workers (a kill of the master alone would orphan them).
    let _ = tokio::process::Command::new(NGINX)
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(prefix.path().join("nginx.conf"))
        .args(["-s", "stop"])
        .status()
        .await;
    let _ = nginx_process.wait().await;

    println!();
    println!(
        "Leash / nginx requests/s: {:.1} % (target >= 50 %)",
        100.0 * leash_peak.per_second / nginx_peak.per_second
    );
    println!(
        "Leash p99 added over direct at half its peak: {:.2} ms (target <= 1 ms)",
        added_p99_ms(&leash_rate, &direct_rate)
    );
    println!(
        "Leash p99 added over direct at a quarter of its peak: {:.2} ms",
        added_p99_ms(&leash_quarter, &direct_quarter)
    );
    for (((name, _), floor_peak), floor_rate) in floors.iter().zip(&floor_peaks).zip(&floor_rates) {
        println!(
            "{name}: {:.1} % of nginx's requests/s; p99 added over direct at Leash's half peak \
             {:.2} ms",
            100.0 * floor_peak / nginx_peak.per_second,
            added_p99_ms(floor_rate, &direct_rate)
        );
    }
    println!(
        "Leash / verify floor requests/s: {:.1} %",
        100.0 * leash_peak.per_second / verify_peak
    );
    for (name, added) in own_half {
        println!("{name}: p99 added over direct at half of its own peak {added:.2} ms");
    }
    println!(
        "SQLite log restarts during the half-peak run: {} (writer paused p50 {} µs, max {} µs)",
        restarts.len(),
        restarts.get(restarts.len() / 2).copied().unwrap_or(0),
        restarts.last().copied().unwrap_or(0),
    );
    let slow: Vec<String> = leash
        .logs()
        .lines()
        .filter(|line| line.contains("slow commit") || line.contains("slow WAL restart"))
        .map(str::to_owned)
        .collect();
    println!(
        "Leash commits or WAL restarts slower than 100 ms (disk stalls): {}",
        slow.len()
    );
    for line in slow.iter().take(5) {
        println!("  {line}");
    }
}

/// `GATEWAY_LOAD_PROFILE_RATE=<requests/s>`: only Leash, open loop at that rate for
/// `PROFILE_SECONDS` (20 s), for attaching a profiler (`perf record -p`, `perf stat -p`) to the
/// server, whose pid it prints first.
fn profile_rate() -> Option<f64> {
    std::env::var("GATEWAY_LOAD_PROFILE_RATE")
        .ok()?
        .parse()
        .ok()
}

async fn profile(leash: &Leash, token: &str, dpop: &AgentKey, client: &reqwest::Client, rate: f64) {
    const PROFILE_SECONDS: u64 = 20;
    let url = leash_url(leash);
    let proofs: Vec<String> = (0..(rate as u64 * (PROFILE_SECONDS + 1) + 1_000))
        .map(|_| dpop.dpop_proof("GET", &url, Some(token), None, now()))
        .collect();
    let gateway = Target::Proofs(Arc::new(ProofTarget {
        url,
        authorization: format!("DPoP {token}"),
        proofs: Arc::new(proofs),
        next: AtomicUsize::new(0),
        each_once: true,
    }));
    warm(&gateway, client).await;
    println!(
        "leash pid {}: {rate:.0} requests/s for {PROFILE_SECONDS} s",
        leash.pid()
    );
    print_header();
    let run = at_rate_for(&gateway, client, rate, PROFILE_SECONDS).await;
    print_row("Leash gateway", &run);
}

/// The writer's pause (µs) at each restart of the write-ahead log in `logs`, sorted: every
/// request waiting on the writer sat through it.
fn log_restart_pauses(logs: &str) -> Vec<u64> {
    let mut pauses: Vec<u64> = logs
        .lines()
        .filter(|line| line.contains("WAL started over"))
        .filter_map(|line| {
            line.split("us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    pauses.sort_unstable();
    pauses
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then only check it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    assert!(
        profile_rate().is_some() || Path::new(NGINX).exists(),
        "this benchmark compares against nginx: apt-get install nginx"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}
