//! The server's shared state, [`AppState`]: what every handler reads (configuration, store,
//! keys, caches, rate tables), built once at start by [`crate::bootstrap`]; and the policy set
//! in force, which a reload swaps whole.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::Uri;
use leash_core::Clock;
use leash_core::aead::MasterKey;
use leash_core::dpop::{AccessTokenHash, NonceKey};
use leash_core::grant::{Grant, GrantStatus};
use leash_core::jwk::PublicJwk;
use leash_core::secret::SecretDigest;
use leash_core::token::{AccessClaims, SigningKey, verify_access_token};
use leash_policy::{PolicyEngine, PolicyError};
use leash_store::Store;

use crate::config::Config;
use crate::error::{ApiError, ApiResult};

/// Counters exported at `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Access tokens issued.
    pub tokens_issued: AtomicU64,
    /// Token requests refused.
    pub token_refusals: AtomicU64,
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
    /// `<issuer>/oauth2/token`.
    pub token_endpoint: url::Url,
    /// The repositories.
    pub store: Arc<dyn Store>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The token signing key.
    pub signing: SigningKey,
    /// Keys tokens may be verified with, by `kid` (held in memory: a token never makes
    /// Leash fetch a key).
    pub verify_keys: HashMap<String, PublicJwk>,
    /// Digest of the admin API key.
    pub admin_key: SecretDigest,
    /// Key of stateless DPoP nonces, shared by all nodes through the store.
    pub nonce_key: NonceKey,
    /// Counters.
    pub metrics: Metrics,
    /// The vault master key.
    pub master: MasterKey,
    /// The policy set in force; replaced whole on reload.
    pub policy: std::sync::RwLock<Arc<PolicyEngine>>,
    /// The client that forwards gateway requests.
    pub upstream_client: crate::upstream_client::UpstreamClient,
    /// Claims of access tokens whose signature checked out, by SHA-256 of the token: the
    /// gateway verifies a token's signature once, not on every request. Liveness (grant,
    /// revocation) and the proof are still checked every time.
    pub verified_tokens: quick_cache::sync::Cache<AccessTokenHash, Arc<AccessClaims>>,
    /// Approval notifications (`[approvals] webhook_url`).
    pub notifier: crate::notify::Notifier,
    /// Token requests per agent (`[limits] token_rate`).
    pub token_rates: crate::limits::CallerRates,
    /// Gateway and authorize requests per caller (`[limits] gateway_rate`).
    pub gateway_rates: crate::limits::CallerRates,
    /// Refusals of unidentified callers per source address (`[limits] unauthenticated_rate`).
    pub unauthenticated: crate::limits::UnauthenticatedRefusals,
    /// What the gateway looks for in answers, per injected credential.
    pub reflection_guards: crate::reflection::SecretsCache,
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

    /// A token-verification key by `kid`.
    pub fn verify_key(&self, kid: &str) -> Option<PublicJwk> {
        self.verify_keys.get(kid).cloned()
    }

    /// The nonce key when nonces are required.
    pub fn required_nonces(&self) -> Option<&NonceKey> {
        self.config.dpop_nonce.then_some(&self.nonce_key)
    }

    /// The external URL of a resource request, as the DPoP `htu` must name it.
    pub fn resource_url(&self, uri: &Uri) -> String {
        format!("{}{}", self.public_url, uri.path())
    }

    /// Verifies an access token (signature, `typ`, `iss`, `aud`, times), answering from the
    /// cache of verified tokens when it can; the expiry is checked on every call.
    pub fn verified_token(
        &self,
        token: &PresentedToken<'_>,
        now: i64,
    ) -> ApiResult<Arc<AccessClaims>> {
        if let Some(claims) = self.verified_tokens.get(&token.hash) {
            if claims.exp <= now {
                return Err(ApiError::InvalidToken(
                    "access token refused: exp has passed".into(),
                ));
            }
            return Ok(claims);
        }
        let claims = verify_access_token(token.text, |kid| self.verify_key(kid), &self.issuer, now)
            .map_err(|e| ApiError::InvalidToken(format!("access token refused: {e}")))?;
        let claims = Arc::new(claims);
        self.verified_tokens.insert(token.hash, claims.clone());
        Ok(claims)
    }

    /// Refuses a token whose grant is no longer live or that was revoked itself; returns the
    /// live grant.
    pub async fn check_token_live(&self, claims: &AccessClaims, now: i64) -> ApiResult<Grant> {
        let grant = self
            .store
            .live_grant(&claims.grant_id)
            .await?
            .ok_or_else(|| ApiError::InvalidToken("the token's grant does not exist".into()))?;
        if !grant.is_live(now) {
            let status = grant.status_at(now);
            let why = if status == GrantStatus::Active {
                "exhausted"
            } else {
                status.as_str()
            };
            return Err(ApiError::InvalidToken(format!(
                "the token's grant is {why}"
            )));
        }
        if self.store.is_token_revoked(&claims.jti).await? {
            return Err(ApiError::InvalidToken("the token was revoked".into()));
        }
        Ok(grant)
    }
}

/// An access token as a request presents it, hashed once: the hash keys the verified-token cache
/// and is what the proof's `ath` must name. Only [`PresentedToken::new`] makes one, so the hash
/// is always the token's own.
#[derive(Debug)]
pub struct PresentedToken<'a> {
    text: &'a str,
    hash: AccessTokenHash,
}

impl<'a> PresentedToken<'a> {
    /// Hashes `text`.
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            hash: AccessTokenHash::of(text),
        }
    }

    /// The token's SHA-256.
    pub fn hash(&self) -> &AccessTokenHash {
        &self.hash
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
