//! The server's shared state, [`AppState`]: what every handler reads (configuration, store,
//! keys, caches, rate tables), built once at start by `bootstrap::prepare`; and the policy set
//! in force, which a reload swaps whole.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use leash_core::Clock;
use leash_core::dpop::{AccessTokenHash, NonceKey};
use leash_core::jwk::PublicJwk;
use leash_core::secret::SecretDigest;
use leash_core::token::{AccessClaims, SigningKey};
use leash_policy::{PolicyEngine, PolicyError};
use leash_store::Store;

use crate::config::Config;
use crate::limits::{CallerRates, UnauthenticatedRefusals};
use crate::notify::Notifier;
use crate::reflection::SecretsCache;
use crate::upstream_client::UpstreamClients;

/// Counters exported at `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Access tokens issued.
    pub tokens_issued: AtomicU64,
    /// Token requests refused.
    pub token_refusals: AtomicU64,
    /// Requests at the gateway and the forward proxy, by decision, and their latency.
    pub requests: crate::metrics::RequestMetrics,
    /// The store's gauges, as last read.
    pub store_gauges: crate::metrics::GaugeReadings,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The configuration.
    pub config: Config,
    /// The issuer URL, no trailing slash.
    pub issuer: String,
    /// External base URL for resource-side DPoP `htu`.
    pub public_url: String,
    /// The origin (`scheme://host[:port]`) of `public_url`: what a browser's `Origin` must be
    /// on a cookie-authenticated change (API §13).
    pub origin: String,
    /// Human login through the IdP, when `[oidc]` is configured.
    pub oidc: Option<crate::oidc::Oidc>,
    /// `<issuer>/oauth2/token`.
    pub token_endpoint: url::Url,
    /// The repositories.
    pub store: Arc<dyn Store>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The token-signing keys (held in memory: a token never makes Leash fetch a key), read
    /// again as they rotate.
    pub keys: Arc<crate::keys::Keys>,
    /// Digest of the admin API key.
    pub admin_key: SecretDigest,
    /// The key of delegation tokens (API §17), published only at
    /// `/.well-known/leash-delegation-jwks.json`.
    pub delegation: SigningKey,
    /// The key of proxy credentials (API §16), shared by all nodes through the store.
    pub proxy_credentials: crate::proxy::credential::CredentialKey,
    /// The proxy CA, when the proxy is configured and an upstream has `hosts`.
    pub proxy_ca: Option<crate::proxy::ca::ProxyCa>,
    /// Key of stateless DPoP nonces, shared by all nodes through the store.
    pub nonce_key: NonceKey,
    /// Counters.
    pub metrics: Metrics,
    /// The master key everything at rest is sealed under, switched by a rotation.
    pub master: crate::master::Master,
    /// The policy set in force; replaced whole on reload.
    pub policy: std::sync::RwLock<Arc<PolicyEngine>>,
    /// The clients that forward gateway requests.
    pub upstream_clients: UpstreamClients,
    /// Claims of access tokens whose signature checked out, by SHA-256 of the token
    /// (`extract::verified_token`): a token's signature is verified once, not on every
    /// request. Liveness (grant, revocation) and the proof are still checked every time.
    pub verified_tokens: quick_cache::sync::Cache<AccessTokenHash, Arc<AccessClaims>>,
    /// Approval notifications (`[approvals] webhook_url`).
    pub notifier: Notifier,
    /// Token requests per agent (`[limits] token_rate`).
    pub token_rates: CallerRates,
    /// Logins started per source address (`[limits] unauthenticated_rate`): each one stores a
    /// row until it completes or expires.
    pub login_rates: CallerRates,
    /// Gateway and authorize requests per caller (`[limits] gateway_rate`).
    pub gateway_rates: CallerRates,
    /// Refusals of unidentified callers per source address (`[limits] unauthenticated_rate`).
    pub unauthenticated: UnauthenticatedRefusals,
    /// What the gateway looks for in answers, per injected credential.
    pub reflection_guards: SecretsCache,
    /// The headers of vaulted credentials opened before.
    pub vault_openings: crate::vault::Openings,
    /// MCP sessions this node has seen initialized, and whom they belong to.
    pub mcp_sessions: crate::mcp::Sessions,
    /// OAuth connections to upstreams (API §17).
    pub connections: crate::connections::Connections,
    /// MCP servers' elicitations waiting for their human on this node.
    pub elicitations: crate::mcp::Elicitations,
}

impl AppState {
    /// The policy set in force.
    pub fn policy(&self) -> Arc<PolicyEngine> {
        match self.policy.read() {
            Ok(engine) => engine.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reloads the operator policies; on any error the old set stays in force.
    pub fn reload_policy(&self) -> Result<usize, PolicyError> {
        let engine = load_policy(&self.config)?;
        let count = engine.operator_policies();
        match self.policy.write() {
            Ok(mut current) => *current = Arc::new(engine),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(engine),
        }
        Ok(count)
    }

    /// A token-verification key by `kid`, if it is published now.
    pub fn verify_key(&self, kid: &str) -> Option<PublicJwk> {
        self.keys.ring().verify_key(kid, self.clock.now())
    }

    /// Signs an access token with the key that signs now.
    pub fn sign_token(&self, claims: &leash_core::token::AccessClaims) -> String {
        self.keys.ring().signer(self.clock.now()).sign(claims)
    }

    /// The nonce key when nonces are required.
    pub fn required_nonces(&self) -> Option<&NonceKey> {
        self.config.dpop_nonce.then_some(&self.nonce_key)
    }
}

/// Every action the configured upstreams define.
pub fn all_actions(config: &Config) -> BTreeSet<String> {
    config
        .upstreams
        .values()
        .flat_map(|u| u.actions())
        .map(str::to_owned)
        .collect()
}

/// Builds the policy engine from the built-in policies and `policy_dir`.
pub fn load_policy(config: &Config) -> Result<PolicyEngine, PolicyError> {
    PolicyEngine::load(&all_actions(config), config.policy_dir.as_deref())
}
