//! The decision benches' server: the real `AppState` on a temporary SQLite database, one human,
//! the bench agent and its grant and token, and as many other agents, grants and operator
//! policies as a bench asks for.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use leash_core::aead::MasterKey;
use leash_core::audit::{AuditEvent, Mode};
use leash_core::client::AgentKey;
use leash_core::clock::SystemClock;
use leash_core::grant::{Grant, GrantStatus};
use leash_core::jws::Alg;
use leash_core::secret::Secret;
use leash_core::token::{AccessClaims, Actor, Confirmation};
use leash_server::{AppState, Config, Flags};
use leash_store::{Agent, User};
use leash_testkit::{AGENT, UNLIMITED, UPSTREAMS, now};

pub const ISSUER: &str = "http://127.0.0.1:8470";
pub const MCP_UPSTREAM: &str = "
[[upstream]]
name = \"crm\"
url = \"http://127.0.0.1:9/mcp\"
kind = \"mcp\"
[[upstream.tool]]
name = \"search_contacts\"
action = \"crm:search\"
";

/// What a bench's server holds besides the bench agent's grant.
#[derive(Default)]
pub struct Load<'a> {
    /// The policy directory (`examples/policies` when `None`).
    pub policy_dir: Option<&'a std::path::Path>,
    /// Other agents, each with its own grants.
    pub agents: usize,
    /// Other live grants, spread over those agents.
    pub grants: usize,
}

pub struct Setup {
    _dir: tempfile::TempDir,
    pub runtime: tokio::runtime::Runtime,
    pub state: Arc<AppState>,
    pub token: String,
    pub dpop: AgentKey,
}

pub fn setup(load: &Load<'_>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/policies"
    ));
    let policies = load.policy_dir.unwrap_or(&examples);
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
        for i in 0..load.agents {
            let mut other = agent.clone();
            other.id = format!("spiffe://example.org/agent/load-{i}");
            store
                .create_agent(&other, &ev("agent.registered"))
                .await
                .expect("agent");
        }
        for j in 0..load.grants {
            let mut other = grant.clone();
            other.id = format!("grt_load_{j}");
            other.agent = format!("spiffe://example.org/agent/load-{}", j % load.agents.max(1));
            store
                .create_grant(
                    &other,
                    &Secret::generate("lgh_").digest(),
                    &ev("grant.created"),
                )
                .await
                .expect("grant");
        }
        let token = state.sign_token(&claims("tok_bench", &dpop));
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

/// The claims of a token `jti` for the bench agent's grant, bound to `dpop`.
fn claims(jti: &str, dpop: &AgentKey) -> AccessClaims {
    let t = now();
    AccessClaims {
        iss: ISSUER.into(),
        sub: "usr_bench".into(),
        aud: ISSUER.into(),
        iat: t,
        exp: t + 3600,
        jti: jti.into(),
        client_id: AGENT.into(),
        act: Actor { sub: AGENT.into() },
        scope: "mail:read mail:draft crm:search".into(),
        cnf: Confirmation {
            jkt: dpop.public().thumbprint(),
        },
        grant_id: "grt_bench".into(),
        purpose: "Summarise my inbox".into(),
    }
}

/// Another token for the bench agent's grant, as the token endpoint would issue it.
#[allow(dead_code, reason = "only the scale bench mints more tokens")]
pub fn mint(setup: &Setup, jti: &str) -> String {
    setup.state.sign_token(&claims(jti, &setup.dpop))
}

pub fn signed(setup: &Setup, method: &str, target: &str) -> HeaderMap {
    signed_with(setup, &setup.token, method, target)
}

/// A request's headers with `token` and a fresh proof for it.
pub fn signed_with(setup: &Setup, token: &str, method: &str, target: &str) -> HeaderMap {
    let url = format!("{ISSUER}{target}");
    let proof = setup
        .dpop
        .dpop_proof(method, &url, Some(token), None, now());
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("DPoP {token}")).expect("header"),
    );
    headers.insert("dpop", HeaderValue::from_str(&proof).expect("header"));
    headers
}

/// The event the store records with a setup change.
fn ev(kind: &str) -> AuditEvent {
    AuditEvent::new(kind, Mode::System, now())
}
