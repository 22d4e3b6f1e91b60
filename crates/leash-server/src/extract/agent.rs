//! An agent at a resource (RFC 9449 §7; API §6 steps 1–3), checked in memory: the access
//! token's signature and claims (verified once per token, then answered from a cache until its
//! `exp`), its grant's liveness and its revocation, then the DPoP proof, verified on every
//! request. The proof's `jti` is not claimed here: the request's commit claims it
//! ([`commit_use`], or the gateway's step 7), with everything else the request uses.

use std::sync::Arc;

use axum::http::{HeaderMap, Method, Uri};
use leash_core::dpop::{AccessTokenHash, ProofContext, ProofError, verify_proof};
use leash_core::grant::{Grant, GrantStatus};
use leash_core::token::{AccessClaims, verify_access_token};
use leash_store::{OneTimeKind, OneTimeUse, RequestUse, UseVerdict};

use super::api_key::{Caller, caller_from_key};
use super::headers::{AuthScheme, DpopHeaderError, authorization, single_dpop_header};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Who calls a resource that agents and humans may both call.
#[derive(Debug)]
pub enum ResourceCaller {
    /// An agent with a live DPoP-bound token and a fresh proof.
    Agent(Box<AgentAuth>),
    /// A human or the admin with an API key.
    Key(Caller),
}

/// Authenticates the caller of a resource: `DPoP <token>` is an agent, `Bearer <api key>` a
/// human or the admin. An access token sent as Bearer is a downgrade and refused as such.
/// An agent's proof is checked but not yet claimed: the caller must claim it
/// ([`AgentAuth::claim_proof`], or [`commit_use`] with `proof_once`) before acting.
pub async fn authenticate_resource(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> ApiResult<ResourceCaller> {
    match authorization(headers)? {
        Some((AuthScheme::Dpop, token)) => verify_agent(state, method, uri, headers, token)
            .await
            .map(|agent| ResourceCaller::Agent(Box::new(agent))),
        Some((AuthScheme::Bearer, key)) => match caller_from_key(state, key).await? {
            Some(caller) => Ok(ResourceCaller::Key(caller)),
            None if leash_core::jws::Jws::parse(key).is_ok() => Err(ApiError::InvalidToken(
                "a DPoP-bound token must be sent with the DPoP scheme, not Bearer".into(),
            )),
            None => Err(ApiError::Unauthorized("unknown API key".into())),
        },
        _ => Err(ApiError::InvalidToken(
            "Authorization: DPoP <token> (agent) or Bearer <api key> (human) is required".into(),
        )),
    }
}

/// [`authenticate_resource`] for the management API, where a human may also call with their
/// browser session (no `Authorization` header, a session cookie).
pub async fn authenticate_api_caller(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> ApiResult<ResourceCaller> {
    if authorization(headers)?.is_none() && crate::oidc::has_session_cookie(state, headers) {
        return super::api_key::session_caller(state, headers)
            .await?
            .map(ResourceCaller::Key)
            .ok_or_else(|| ApiError::Unauthorized("the session has ended; log in again".into()));
    }
    authenticate_resource(state, method, uri, headers).await
}

/// An agent authenticated by a live DPoP-bound access token and a valid proof. The proof's
/// one-time `jti` is claimed only when the request's use is committed ([`commit_use`]), in the
/// same transaction as its budget count, before anything acts on it.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    /// The verified token's claims.
    pub claims: Arc<AccessClaims>,
    /// The token's grant, live when the call was authenticated.
    pub grant: Arc<Grant>,
    /// The proof's one-time value.
    pub proof_once: OneTimeUse,
}

impl AgentAuth {
    /// Claims the proof's `jti` at `now`, for a resource whose request uses nothing else (the
    /// gateway claims it in its own commit, with the budget count): a replayed proof is refused.
    pub async fn claim_proof(&self, state: &AppState, now: i64) -> ApiResult<()> {
        let request = RequestUse {
            once: vec![self.proof_once],
            now,
            ..RequestUse::default()
        };
        commit_use(state, request).await
    }
}

/// Checks an agent at a resource (RFC 9449 §7; API §6 steps 1–3), in memory: `token` (from
/// `Authorization: DPoP`) by signature and claims (a verified token is cached), grant and token
/// liveness, then the proof (method, URL, `ath`, key binding). The proof's `jti` is returned in
/// `proof_once` for [`commit_use`].
pub async fn verify_agent(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    token: &str,
) -> ApiResult<AgentAuth> {
    let now = state.clock.now();
    // Step 1: the token's signature and claims.
    let token = PresentedToken::new(token);
    let claims = verified_token(state, &token, now)?;
    // Step 2: its grant live, itself not revoked.
    let grant = check_token_live(state, &claims, now).await?;

    // Step 3: the proof. Two DPoP headers are a malformed request (API §6).
    let proof = single_dpop_header(headers)
        .map_err(|e| match e {
            DpopHeaderError::Repeated => ApiError::InvalidRequest(e.to_string()),
            DpopHeaderError::NotAscii => ApiError::ResourceInvalidProof(e.to_string()),
        })?
        .ok_or_else(|| ApiError::InvalidToken("DPoP proof header is missing".into()))?;
    let url = resource_url(state, uri);
    let cx = ProofContext {
        method: method.as_str(),
        url: &url,
        access_token: Some(token.hash()),
        now,
        nonces: state.required_nonces(),
    };
    let proof = verify_proof(proof, &cx).map_err(|e| match e {
        ProofError::UseNonce => ApiError::ResourceUseNonce(state.nonce_key.issue(now)),
        ProofError::Invalid(m) => ApiError::ResourceInvalidProof(m),
    })?;
    if proof.jkt != claims.cnf.jkt {
        return Err(ApiError::ResourceInvalidProof(
            "dpop proof is signed by a key other than the one the token is bound to".into(),
        ));
    }
    Ok(AgentAuth {
        claims,
        grant,
        proof_once: OneTimeUse {
            kind: OneTimeKind::Proof,
            key: proof.replay_key(),
            keep_until: proof.replay_until(),
        },
    })
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

/// Step 1: verifies an access token (signature, `typ`, `iss`, `aud`, times), answering from
/// the cache of verified tokens when it can; the expiry is checked on every call.
pub fn verified_token(
    state: &AppState,
    token: &PresentedToken<'_>,
    now: i64,
) -> ApiResult<Arc<AccessClaims>> {
    if let Some(claims) = state.verified_tokens.get(&token.hash) {
        if claims.exp <= now {
            return Err(ApiError::InvalidToken(
                "access token refused: exp has passed".into(),
            ));
        }
        return Ok(claims);
    }
    let claims = verify_access_token(token.text, |kid| state.verify_key(kid), &state.issuer, now)
        .map_err(|e| ApiError::InvalidToken(format!("access token refused: {e}")))?;
    let claims = Arc::new(claims);
    state.verified_tokens.insert(token.hash, claims.clone());
    Ok(claims)
}

/// Step 2: refuses a token whose grant is no longer live or that was revoked itself; returns
/// the live grant.
pub async fn check_token_live(
    state: &AppState,
    claims: &AccessClaims,
    now: i64,
) -> ApiResult<Arc<Grant>> {
    let grant = state
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
    if state.store.is_token_revoked(&claims.jti).await? {
        return Err(ApiError::InvalidToken("the token was revoked".into()));
    }
    Ok(grant)
}

/// The external URL of a resource request, as the DPoP `htu` must name it.
fn resource_url(state: &AppState, uri: &Uri) -> String {
    format!("{}{}", state.public_url, uri.path())
}

/// Commits what an authenticated request uses (its one-time values, one count against its
/// grant) before the request acts; a value seen before or a spent grant refuses it.
pub async fn commit_use(state: &AppState, request: RequestUse) -> ApiResult<()> {
    verdict_result(state.store.record_use(request).await?)
}

/// The answer to a request whose use got `verdict`.
pub fn verdict_result(verdict: UseVerdict) -> ApiResult<()> {
    match verdict {
        UseVerdict::Recorded => Ok(()),
        UseVerdict::Replayed(OneTimeKind::SingleUse) => Err(ApiError::InvalidToken(
            "single-use action already used by this token".into(),
        )),
        UseVerdict::Replayed(OneTimeKind::Proof | OneTimeKind::Assertion) => Err(
            ApiError::ResourceInvalidProof("dpop proof jti was already used".into()),
        ),
        UseVerdict::GrantSpent => Err(ApiError::InvalidToken(
            "the token's grant is exhausted or no longer active".into(),
        )),
        UseVerdict::ApprovalSpent => Err(ApiError::ApprovalRequired {
            policies: Vec::new(),
            approval: None,
        }),
        UseVerdict::TokenRevoked => Err(ApiError::InvalidToken("the token was revoked".into())),
        UseVerdict::TooManyPending => Err(ApiError::TooManyPendingApprovals),
    }
}
