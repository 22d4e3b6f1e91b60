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

use std::sync::Arc;
use std::time::Instant;

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use leash_core::aead::MasterKey;
use leash_core::audit::{AuditEvent, Mode};
use leash_core::client::AgentKey;
use leash_core::clock::SystemClock;
use leash_core::grant::{Grant, GrantStatus};
use leash_core::jws::Alg;
use leash_core::secret::Secret;
use leash_core::token::{AccessClaims, Actor, Confirmation};
use leash_server::audit::Trail;
use leash_server::extract::{PresentedToken, authorization, verified_token, verify_agent};
use leash_server::gateway::decide;
use leash_server::mcp::decide_tool_call;
use leash_server::{AppState, Config, Flags};
use leash_store::{Agent, User};
use leash_testkit::{AGENT, UNLIMITED, UPSTREAMS, now};

/// The allocator the `leash` binary uses, so that the path allocates as it does in the product.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISSUER: &str = "http://127.0.0.1:8470";
const TARGET: &str = "/gw/mail/messages/42";
const PROOFS: usize = 4096;
const MCP_TARGET: &str = "/mcp/crm";
const MCP_UPSTREAM: &str = "
[[upstream]]
name = \"crm\"
url = \"http://127.0.0.1:9/mcp\"
kind = \"mcp\"
[[upstream.tool]]
name = \"search_contacts\"
action = \"crm:search\"
";
/// A tool call as the official clients send it.
const MCP_CALL: &str = r#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search_contacts","arguments":{"query":"ada","limit":10,"fields":["name","email"]},"_meta":{"progressToken":42}}}"#;

struct Setup {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
    token: String,
    dpop: AgentKey,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/policies");
    let config_path = dir.path().join("leash.toml");
    std::fs::write(
        &config_path,
        // No per-caller rate: the bench calls the decision far faster than an agent may.
        format!("policy_dir = {policies:?}\n{UPSTREAMS}{MCP_UPSTREAM}{UNLIMITED}"),
    )
    .expect("config");
    let flags = Flags {
        config: Some(config_path),
        data_dir: Some(dir.path().to_owned()),
        ..Flags::default()
    };
    let config = Config::load(&flags, |_| None).expect("config loads");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = format!("sqlite://{}/leash.db", dir.path().display());
    let dpop = AgentKey::generate(Alg::EdDsa);
    let agent_key = AgentKey::generate(Alg::EdDsa);
    let t = now();
    let (state, token) = runtime.block_on(async {
        let store = leash_store::open(&db).await.expect("store");
        let state = leash_server::bootstrap::prepare(
            config,
            ISSUER.into(),
            store.clone(),
            Arc::new(SystemClock),
            MasterKey::generate(),
            true,
            None,
        )
        .await
        .expect("bootstrap")
        .state;
        let user = User {
            id: "usr_bench".into(),
            name: "alice".into(),
            created_at: t,
            disabled: false,
        };
        store
            .create_user(
                &user,
                &Secret::generate("lsk_").digest(),
                &ev("user.created"),
            )
            .await
            .expect("user");
        let agent = Agent {
            id: AGENT.into(),
            name: "bench agent".into(),
            jwks: serde_json::json!({"keys": [agent_key.public().to_value()]}),
            disabled: false,
            created_at: t,
        };
        store
            .create_agent(&agent, &ev("agent.registered"))
            .await
            .expect("agent");
        let grant = Grant {
            id: "grt_bench".into(),
            subject: user.id.clone(),
            agent: AGENT.into(),
            purpose: "Summarise my inbox".into(),
            upstreams: vec!["mail".into(), "crm".into()],
            actions: vec!["mail:read".into(), "mail:draft".into(), "crm:search".into()],
            approval_required: Vec::new(),
            single_use: Vec::new(),
            created_at: t,
            expires_at: t + 3600,
            max_requests: None,
            requests_used: 0,
            status: GrantStatus::Active,
        };
        store
            .create_grant(
                &grant,
                &Secret::generate("lgh_").digest(),
                &ev("grant.created"),
            )
            .await
            .expect("grant");
        let claims = AccessClaims {
            iss: ISSUER.into(),
            sub: user.id.clone(),
            aud: ISSUER.into(),
            iat: t,
            exp: t + 3600,
            jti: "tok_bench".into(),
            client_id: AGENT.into(),
            act: Actor { sub: AGENT.into() },
            scope: "mail:read mail:draft crm:search".into(),
            cnf: Confirmation {
                jkt: dpop.public().thumbprint(),
            },
            grant_id: grant.id.clone(),
            purpose: grant.purpose.clone(),
        };
        let token = state.sign_token(&claims);
        (state, token)
    });
    Setup {
        _dir: dir,
        runtime,
        state,
        token,
        dpop,
    }
}

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

fn signed(setup: &Setup, method: &str, target: &str) -> HeaderMap {
    let url = format!("{ISSUER}{target}");
    let proof = setup
        .dpop
        .dpop_proof(method, &url, Some(&setup.token), None, now());
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("DPoP {}", setup.token)).expect("header"),
    );
    headers.insert("dpop", HeaderValue::from_str(&proof).expect("header"));
    headers
}

fn bench(c: &mut Criterion) {
    let setup = setup();
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

/// The event the store records with a setup change.
fn ev(kind: &str) -> AuditEvent {
    AuditEvent::new(kind, Mode::System, now())
}
