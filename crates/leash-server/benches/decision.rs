//! The gateway's decision path (API §6 steps 1–6, in process) against one bare signature
//! verification of a DPoP proof, measured in one run. The token's signature is verified once and
//! then answered from the verified-token cache; the grant's liveness comes from memory; the proof
//! is verified on every call. Also measured, for reference: the same plus step 7's durable commit
//! (the proof's `jti` and the budget count, one SQLite transaction), one request at a time.
//! Target (issue: gateway): decision path median ≤ 1.5× the bare verify. The two are also
//! measured in interleaved rounds (the `gateway/interleaved` line), which the machine's drift
//! between criterion's measurements cannot skew.
//! Also (issue #30): an MCP `tools/call`'s decision (`mcp::decide_tool_call`: the same steps
//! 1–6 plus the message parsed strictly, its digest, and Cedar with the call's arguments) against
//! the gateway's decision path, in interleaved rounds (`mcp/interleaved`). Target: ≤ 1.5×.
//! Run: cargo bench -p leash-server --bench decision

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::time::Instant;

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use leash_core::jws::Alg;
use leash_server::audit::Trail;
use leash_server::extract::{PresentedToken, authorization, verified_token, verify_agent};
use leash_server::gateway::decide;
use leash_server::mcp::decide_tool_call;
use leash_testkit::now;

/// The allocator the `leash` binary uses, so that the path allocates as it does in the product.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TARGET: &str = "/gw/mail/messages/42";
const PROOFS: usize = 4096;
const MCP_TARGET: &str = "/mcp/crm";
mod common;

use common::{Load, Setup, setup, signed};

/// A tool call as the official clients send it.
const MCP_CALL: &str = r#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search_contacts","arguments":{"query":"ada","limit":10,"fields":["name","email"]},"_meta":{"progressToken":42}}}"#;

fn headers(setup: &Setup) -> HeaderMap {
    signed(setup, "GET", TARGET)
}

/// A POST of an MCP message to `/mcp/crm`, signed.
fn mcp_parts(setup: &Setup) -> Parts {
    let (mut parts, ()) = axum::http::Request::builder()
        .method(Method::POST)
        .uri(MCP_TARGET)
        .body(())
        .expect("request")
        .into_parts();
    parts.headers = signed(setup, "POST", MCP_TARGET);
    parts
        .headers
        .insert("content-type", HeaderValue::from_static("application/json"));
    parts
}

fn bench(c: &mut Criterion) {
    let setup = setup(&Load::default());
    let uri: Uri = TARGET.parse().expect("uri");
    let sample = headers(&setup);
    let proof = sample["dpop"].to_str().expect("ascii").to_owned();
    let (input, sig) = proof.rsplit_once('.').expect("jws");
    let sig = leash_core::b64::decode(sig).expect("b64");
    let public = setup.dpop.public();

    // Proofs are made before measuring (each with its own jti) and used in turn.
    let proofs: Vec<HeaderMap> = (0..PROOFS).map(|_| headers(&setup)).collect();
    let mut next = proofs.iter().cycle();

    let bare_verify = || {
        public
            .verify(Alg::EdDsa, black_box(input.as_bytes()), black_box(&sig))
            .expect("verifies")
    };
    let decision_path = |headers: &HeaderMap| {
        setup.runtime.block_on(async {
            decide(
                &setup.state,
                &Method::GET,
                &uri,
                headers,
                &mut Trail::default(),
            )
            .await
            .map(|_| ())
            .expect("allowed")
        })
    };

    let mut group = c.benchmark_group("gateway");
    group.bench_function("bare_dpop_signature_verify", |b| b.iter(bare_verify));
    group.bench_function("decision_path", |b| {
        b.iter(|| decision_path(next.next().expect("cycle")))
    });
    // Before the commit bench below, whose SQLite work (the writer, WAL copying) goes on for a
    // while after it and would be timed with the path. Proofs made now: a proof's `iat` may lie
    // at most 60 s back.
    let fresh: Vec<HeaderMap> = (0..PROOFS).map(|_| headers(&setup)).collect();
    let mut next_fresh = fresh.iter().cycle();
    interleaved_ratio(
        "gateway/interleaved",
        ("decision path", "bare verify"),
        bare_verify,
        || decision_path(next_fresh.next().expect("cycle")),
    );
    // The MCP call's decision against the gateway's, interleaved likewise.
    let gateway_proofs: Vec<HeaderMap> = (0..PROOFS).map(|_| headers(&setup)).collect();
    let mut next_gateway = gateway_proofs.iter().cycle();
    let mcp_requests: Vec<Parts> = (0..PROOFS).map(|_| mcp_parts(&setup)).collect();
    let mut next_mcp = mcp_requests.iter().cycle();
    let mcp_decision = |parts: &Parts| {
        setup.runtime.block_on(async {
            let allowed = decide_tool_call(&setup.state, "crm", parts, MCP_CALL.as_bytes())
                .await
                .expect("decided");
            assert!(allowed, "the call needs no approval");
        })
    };
    mcp_decision(&mcp_parts(&setup));
    interleaved_ratio(
        "mcp/interleaved",
        ("MCP call decision", "gateway decision path"),
        || decision_path(next_gateway.next().expect("cycle")),
        || mcp_decision(next_mcp.next().expect("cycle")),
    );
    group.bench_function("parts/verified_token", |b| {
        b.iter(|| {
            let token = PresentedToken::new(black_box(setup.token.as_str()));
            verified_token(&setup.state, &token, now()).expect("valid")
        })
    });
    group.bench_function("parts/verify_agent", |b| {
        b.iter(|| {
            let headers = next.next().expect("cycle");
            setup.runtime.block_on(async {
                let (_, token) = authorization(headers)
                    .expect("well-formed")
                    .expect("present");
                verify_agent(&setup.state, &Method::GET, &uri, headers, token)
                    .await
                    .map(|_| ())
                    .expect("valid")
            })
        })
    });
    group.bench_function("decision_path_and_commit", |b| {
        b.iter_batched(
            || headers(&setup),
            |headers| {
                setup.runtime.block_on(async {
                    let mut trail = Trail::default();
                    let decided = decide(&setup.state, &Method::GET, &uri, &headers, &mut trail)
                        .await
                        .expect("allowed");
                    decided
                        .commit(&setup.state, &mut trail, "gateway.request", "req_bench")
                        .await
                        .expect("committed")
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The decision path over the bare verify again, in rounds that alternate between the two so
/// that both see the same neighbours: on a shared machine the speed drifts between criterion's
/// two measurements, which run one after the other. Prints the medians of the
/// rounds and the ratio of the fastest rounds (the least disturbed by the neighbours).
fn interleaved_ratio(
    label: &str,
    (measured, against): (&str, &str),
    mut bare_verify: impl FnMut(),
    mut decision_path: impl FnMut(),
) {
    const ROUNDS: usize = 60;
    const CALLS: usize = 200;
    let timed = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..CALLS {
            f();
        }
        start.elapsed().as_secs_f64()
    };
    let rounds: Vec<(f64, f64)> = (0..ROUNDS)
        .map(|_| (timed(&mut decision_path), timed(&mut bare_verify)))
        .collect();
    let quartiles = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        (
            values[ROUNDS / 4],
            values[ROUNDS / 2],
            values[3 * ROUNDS / 4],
        )
    };
    let per_call = |seconds: f64| seconds / CALLS as f64 * 1e6;
    let fastest = |values: &mut dyn Iterator<Item = f64>| values.fold(f64::MAX, f64::min);
    let (_, path, _) = quartiles(rounds.iter().map(|r| per_call(r.0)).collect());
    let (_, bare, _) = quartiles(rounds.iter().map(|r| per_call(r.1)).collect());
    let (low, ratio, high) = quartiles(rounds.iter().map(|r| r.0 / r.1).collect());
    let best_path = per_call(fastest(&mut rounds.iter().map(|r| r.0)));
    let best_bare = per_call(fastest(&mut rounds.iter().map(|r| r.1)));
    println!(
        "{label}: {ROUNDS} rounds of {CALLS} calls each; medians: {measured} \
         {path:.2} µs, {against} {bare:.2} µs, ratio {ratio:.3}x (quartiles {low:.3}x to \
         {high:.3}x); fastest rounds: {best_path:.2} µs over {best_bare:.2} µs = {:.3}x",
        best_path / best_bare
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
