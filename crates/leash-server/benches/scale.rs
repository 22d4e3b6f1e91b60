//! Issue #34, target 3 (part): the gateway's decision path (API §6 steps 1–6, in process, as in
//! the `decision` bench) stays flat as the work grows: from 10 to 100,000 live grants of 10,000
//! agents, and from 2 to 1,000 Cedar policies (per-agent and per-action operator policies, as
//! an operator with many agents writes them). Each pair is measured in interleaved rounds on
//! the same machine in one run; the target is a median round ratio ≤ 1.2. `tokens` reports the
//! memory a verified token takes in the server's cache.
//! Run: cargo bench -p leash-server --bench scale [-- grants | policies | tokens]

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::time::Instant;

use axum::http::{HeaderMap, Method, Uri};
use leash_server::audit::Trail;
use leash_server::gateway::decide;

mod common;

use common::{Load, Setup, mint, setup, signed, signed_with};

/// The allocator the `leash` binary uses, so that the path allocates as it does in the product.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TARGET: &str = "/gw/mail/messages/42";
const PROOFS: usize = 2048;
const ROUNDS: usize = 40;
const CALLS: usize = 200;

/// `count` operator policies of the shapes a large deployment has: per agent, a forbid on its
/// sending at night and one on its exports for a purpose; with the two example policies.
fn policies(dir: &std::path::Path, count: usize) {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/policies");
    for entry in std::fs::read_dir(examples).expect("examples") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
    }
    let mut text = String::new();
    for i in 0..count.saturating_sub(2) {
        let agent = format!("spiffe://example.org/agent/load-{}", i / 2);
        if i % 2 == 0 {
            text.push_str(&format!(
                "forbid(principal == Leash::Agent::\"{agent}\", action == Leash::Action::\"mail:send\", resource) when {{ context.hour >= 22 }};\n"
            ));
        } else {
            text.push_str(&format!(
                "forbid(principal == Leash::Agent::\"{agent}\", action in [Leash::Action::\"mail:read\", Leash::Action::\"mail:draft\"], resource) when {{ context.purpose like \"*payroll*\" }};\n"
            ));
        }
    }
    std::fs::write(dir.join("many.cedar"), text).expect("policies");
}

fn decision_path(setup: &Setup, uri: &Uri, headers: &HeaderMap) {
    setup.runtime.block_on(async {
        decide(
            &setup.state,
            &Method::GET,
            uri,
            headers,
            &mut Trail::default(),
        )
        .await
        .map(|_| ())
        .expect("allowed")
    })
}

/// The median of per-round ratios of `large` over `small`, and each one's median per call.
fn interleaved(label: &str, small: &Setup, large: &Setup) {
    let uri: Uri = TARGET.parse().expect("uri");
    let proofs = |setup: &Setup| -> Vec<HeaderMap> {
        (0..PROOFS).map(|_| signed(setup, "GET", TARGET)).collect()
    };
    let (small_proofs, large_proofs) = (proofs(small), proofs(large));
    let (mut next_small, mut next_large) =
        (small_proofs.iter().cycle(), large_proofs.iter().cycle());
    let timed = |setup: &Setup, next: &mut dyn Iterator<Item = &HeaderMap>| {
        let start = Instant::now();
        for _ in 0..CALLS {
            decision_path(setup, &uri, next.next().expect("cycle"));
        }
        start.elapsed().as_secs_f64() / CALLS as f64 * 1e6
    };
    let rounds: Vec<(f64, f64)> = (0..ROUNDS)
        .map(|_| (timed(large, &mut next_large), timed(small, &mut next_small)))
        .collect();
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let ratio = median(rounds.iter().map(|r| r.0 / r.1).collect());
    let large_us = median(rounds.iter().map(|r| r.0).collect());
    let small_us = median(rounds.iter().map(|r| r.1).collect());
    println!(
        "{label}: {ROUNDS} rounds of {CALLS} decisions; medians {large_us:.2} µs over {small_us:.2} µs, ratio {ratio:.3}x (target ≤ 1.2x)"
    );
}

/// The process's resident memory (Linux), in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// How many distinct tokens the memory measurement sends: fewer than the verified-token cache
/// holds (`VERIFIED_TOKEN_CAPACITY`, 16,384), so that every one stays cached.
const CACHED_TOKENS: usize = 16_000;

/// Memory per cached token: the process's growth over `CACHED_TOKENS` decisions with a token
/// each, less its growth over as many decisions with one token (what the replay store, the
/// audit trail and SQLite's page cache take for any decision). Each run on a fresh server.
fn tokens_memory() {
    let growth = |distinct: bool| {
        let setup = setup(&Load::default());
        let uri: Uri = TARGET.parse().expect("uri");
        let tokens: Vec<String> = (0..CACHED_TOKENS)
            .map(|i| {
                if distinct {
                    mint(&setup, &format!("tok_{i}"))
                } else {
                    setup.token.clone()
                }
            })
            .collect();
        let requests: Vec<HeaderMap> = tokens
            .iter()
            .map(|token| signed_with(&setup, token, "GET", TARGET))
            .collect();
        // The first decision opens what every later one reuses.
        decision_path(&setup, &uri, &signed(&setup, "GET", TARGET));
        let before = resident_bytes();
        for headers in &requests {
            decision_path(&setup, &uri, headers);
        }
        resident_bytes().saturating_sub(before)
    };
    let shared = growth(false);
    let distinct = growth(true);
    println!(
        "tokens: {CACHED_TOKENS} decisions grew the process by {:.1} MiB with a token each and \
         {:.1} MiB with one token: {} bytes per cached token",
        distinct as f64 / 1048576.0,
        shared as f64 / 1048576.0,
        distinct.saturating_sub(shared) / CACHED_TOKENS as u64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that names neither part skips both.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let small = setup(&Load {
        policy_dir: None,
        agents: 10,
        grants: 10,
    });
    if wanted("grants") {
        let started = Instant::now();
        let before = resident_bytes();
        let large = setup(&Load {
            policy_dir: None,
            agents: 10_000,
            grants: 100_000,
        });
        let grown = resident_bytes().saturating_sub(before);
        println!(
            "(100,000 grants of 10,000 agents stored in {:.0?}; the process grew by {:.1} MiB, \
             {} bytes per grant, SQLite's page cache included)",
            started.elapsed(),
            grown as f64 / (1024.0 * 1024.0),
            grown / 100_000
        );
        interleaved("grants: 100,000 live grants against 10", &small, &large);
    }
    if wanted("tokens") {
        tokens_memory();
    }
    if wanted("policies") {
        let dir = tempfile::tempdir().expect("tempdir");
        policies(dir.path(), 1_000);
        let large = setup(&Load {
            policy_dir: Some(dir.path()),
            agents: 10,
            grants: 10,
        });
        interleaved("policies: 1,000 Cedar policies against 2", &small, &large);
    }
}
