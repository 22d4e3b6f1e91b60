//! The OAuth endpoints: token exchange (RFC 8693) with private_key_jwt and DPoP, revocation
//! (RFC 7009) and introspection (RFC 7662).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use leash_core::assertion::{JWT_BEARER, claimed_agent, verify_assertion};
use leash_core::audit::{AuditEvent, Mode, Outcome};
use leash_core::dpop::{ProofContext, ProofError, verify_proof};
use leash_core::grant::{GrantStatus, narrow_scope};
use leash_core::jwk::parse_jwks;
use leash_core::secret::{SecretDigest, random_id};
use leash_core::token::{
    ACCESS_TOKEN_TYPE, AccessClaims, Actor, Confirmation, GRANT_TOKEN_TYPE, JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE, verify_access_token,
};
use leash_store::{Agent, OneTimeKind, OneTimeUse, RequestUse, UseVerdict};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::{
    AuthScheme, Caller, Form, authorization, caller_from_key, check_token_live, single_dpop_header,
};
use crate::openapi::{IntrospectForm, OAuthErrors, RevokeForm, TokenForm};
use crate::proxy::credential::{PROXY_CREDENTIAL_TYPE, ProxyClaims};
use crate::state::{AppState, Metrics};

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// An agent authenticated by its client assertion, whose one-time value is not claimed yet.
struct AuthenticatedClient {
    /// The agent's id.
    agent: String,
    /// The assertion's `jti`, which the caller consumes together with its other one-time
    /// values.
    assertion_once: OneTimeUse,
}

/// Authenticates an agent by its client assertion (private_key_jwt).
async fn authenticate_client(
    state: &AppState,
    form: &Form,
    audiences: &[&str],
    known: Option<&Agent>,
) -> ApiResult<AuthenticatedClient> {
    match form.get("client_assertion_type") {
        Some(JWT_BEARER) => {}
        Some(_) => {
            return Err(ApiError::InvalidClient(format!(
                "client_assertion_type must be {JWT_BEARER}"
            )));
        }
        None => {
            return Err(ApiError::InvalidClient(
                "client authentication with private_key_jwt is required".into(),
            ));
        }
    }
    let assertion = form
        .get("client_assertion")
        .ok_or_else(|| ApiError::InvalidClient("client_assertion is required".into()))?;
    let agent_id = claimed_agent(assertion)
        .map_err(|e| ApiError::InvalidClient(format!("client assertion refused: {e}")))?;
    if let Some(client_id) = form.get("client_id")
        && client_id != agent_id
    {
        return Err(ApiError::InvalidClient(
            "client_id does not match the assertion".into(),
        ));
    }
    let agent = match known.filter(|a| a.id == agent_id) {
        Some(agent) => agent.clone(),
        None => state
            .store
            .agent(&agent_id)
            .await?
            .ok_or_else(|| ApiError::InvalidClient("unknown agent".into()))?,
    };
    if agent.disabled {
        return Err(ApiError::InvalidClient("the agent is disabled".into()));
    }
    let keys = parse_jwks(&agent.jwks)
        .map_err(|_| ApiError::InvalidClient("the agent's keys are unusable".into()))?;
    let verified = verify_assertion(assertion, &agent.id, &keys, audiences, state.clock.now())
        .map_err(|e| ApiError::InvalidClient(format!("client assertion refused: {e}")))?;
    let assertion_once = OneTimeUse {
        kind: OneTimeKind::Assertion,
        key: verified.replay_key(),
        keep_until: verified.exp,
    };
    Ok(AuthenticatedClient {
        agent: agent.id,
        assertion_once,
    })
}

/// `POST /oauth2/token`.
/// A successful exchange (RFC 8693 §2.2.1).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// The DPoP-bound access token (a JWT).
    access_token: String,
    #[schema(value_type = String)]
    issued_token_type: &'static str,
    /// Always `DPoP`.
    #[schema(value_type = String)]
    token_type: &'static str,
    expires_in: i64,
    /// The actions granted, space-separated.
    scope: String,
}

/// An introspection answer (RFC 7662): only `active` when the token is not live, otherwise its
/// claims as well.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Introspection {
    active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    /// `{"sub": agent}` (RFC 8693 §4.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    act: Option<Actor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<String>,
    /// `{"jkt": thumbprint}` (RFC 9449 §6.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    cnf: Option<Confirmation>,
    /// `DPoP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    token_type: Option<&'static str>,
}

impl Introspection {
    fn live(claims: AccessClaims) -> Self {
        Self {
            active: true,
            sub: Some(claims.sub),
            client_id: Some(claims.client_id),
            act: Some(claims.act),
            scope: Some(claims.scope),
            exp: Some(claims.exp),
            iat: Some(claims.iat),
            iss: Some(claims.iss),
            aud: Some(claims.aud),
            jti: Some(claims.jti),
            grant_id: Some(claims.grant_id),
            purpose: Some(claims.purpose),
            cnf: Some(claims.cnf),
            token_type: Some("DPoP"),
        }
    }
}

/// `POST /oauth2/token`: token exchange (RFC 8693) authenticated with private_key_jwt and
/// bound with DPoP.
#[utoipa::path(post, path = "/oauth2/token", tag = "oauth",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    params(("DPoP" = Option<String>, Header, description = "DPoP proof (RFC 9449)")),
    responses((status = 200, body = TokenResponse), OAuthErrors))]
pub async fn token(State(state): State<Arc<AppState>>, headers: HeaderMap, form: Form) -> Response {
    match exchange(&state, &headers, &form).await {
        Ok(response) => no_store(response),
        Err(e) => {
            Metrics::incr(&state.metrics.token_refusals);
            tracing::info!(error = %e, "token request refused");
            e.into_response()
        }
    }
}

async fn exchange(state: &AppState, headers: &HeaderMap, form: &Form) -> ApiResult<Response> {
    match form.get("grant_type") {
        Some(TOKEN_EXCHANGE) => {}
        Some(_) => {
            return Err(ApiError::UnsupportedGrantType(format!(
                "grant_type must be {TOKEN_EXCHANGE}"
            )));
        }
        None => {
            return Err(ApiError::InvalidRequest(
                "parameter `grant_type` is required".into(),
            ));
        }
    }
    let handle = form.require("subject_token")?;
    if form.require("subject_token_type")? != GRANT_TOKEN_TYPE {
        return Err(ApiError::InvalidRequest(format!(
            "subject_token_type must be {GRANT_TOKEN_TYPE}"
        )));
    }
    if let Some(resource) = form.get("resource")
        && !is_own_resource(state, resource)
    {
        return Err(ApiError::InvalidTarget(
            "resource must be one of Leash's own: its gateway, or an MCP endpoint /mcp/{upstream}"
                .into(),
        ));
    }
    if form.get("actor_token").is_some() || form.get("actor_token_type").is_some() {
        return Err(ApiError::InvalidRequest(
            "actor_token is not used: the agent authenticates with client_assertion".into(),
        ));
    }
    let for_proxy = match form.get("requested_token_type") {
        None | Some(ACCESS_TOKEN_TYPE | JWT_TOKEN_TYPE) => false,
        Some(PROXY_CREDENTIAL_TYPE) if state.config.proxy.is_some() => true,
        Some(PROXY_CREDENTIAL_TYPE) => {
            return Err(ApiError::InvalidRequest(
                "this server has no forward proxy ([proxy] is not configured)".into(),
            ));
        }
        Some(_) => {
            return Err(ApiError::InvalidRequest(format!(
                "requested_token_type must be {ACCESS_TOKEN_TYPE} or {PROXY_CREDENTIAL_TYPE}"
            )));
        }
    };

    // One query finds the grant and its agent; the client is authenticated first all the same.
    let found = state
        .store
        .grant_by_handle(&SecretDigest::of(handle))
        .await?;
    let token_endpoint = state.token_endpoint.as_str();
    let audiences = [state.issuer.as_str(), token_endpoint];
    let AuthenticatedClient {
        agent,
        assertion_once,
    } = authenticate_client(state, form, &audiences, found.as_ref().map(|(_, a)| a)).await?;
    state.token_rates.check(&agent)?;

    let now = state.clock.now();
    let proof = single_dpop_header(headers)
        .map_err(|e| ApiError::InvalidDpopProof(e.to_string()))?
        .ok_or_else(|| ApiError::InvalidDpopProof("a DPoP proof header is required".into()))?;
    let cx = ProofContext {
        method: "POST",
        url: state.token_endpoint.as_str(),
        access_token: None,
        now,
        nonces: state.required_nonces(),
    };
    let proof = verify_proof(proof, &cx).map_err(|e| match e {
        ProofError::UseNonce => ApiError::UseDpopNonce(state.nonce_key.issue(now)),
        ProofError::Invalid(m) => ApiError::InvalidDpopProof(m),
    })?;

    let grant = found
        .map(|(grant, _)| grant)
        .filter(|g| g.agent == agent)
        .ok_or_else(|| {
            ApiError::InvalidGrant("unknown grant handle, or not issued to this agent".into())
        })?;
    // From here on the grant is known: every outcome is audited under it.
    let jti = random_id(if for_proxy { "pxc_" } else { "tok_" });
    let mut event = AuditEvent::new("token.exchange", Mode::Delegated, now);
    event.subject = Some(grant.subject.clone());
    event.actor = Some(agent.clone());
    event.grant_id = Some(grant.id.clone());
    event.purpose = Some(grant.purpose.clone());
    event.request_id = Some(jti.clone());
    if !grant.is_live(now) {
        let status = grant.status_at(now);
        let why = if status == GrantStatus::Active {
            "exhausted"
        } else {
            status.as_str()
        };
        let refused = ApiError::InvalidGrant(format!("the grant is {why}"));
        return Err(audit_refusal(state, event, refused).await);
    }
    if for_proxy
        && !grant.upstreams.iter().any(|name| {
            state
                .config
                .upstreams
                .get(name)
                .is_some_and(|u| !u.hosts.is_empty())
        })
    {
        let refused = ApiError::InvalidRequest(
            "none of the grant's upstreams has `hosts`: a browser could reach nothing through the proxy".into(),
        );
        return Err(audit_refusal(state, event, refused).await);
    }
    let actions = match narrow_scope(form.0.get("scope").map(String::as_str), &grant.actions) {
        Ok(actions) => actions,
        Err(e) => {
            let refused = ApiError::InvalidScope(e.to_string());
            return Err(audit_refusal(state, event, refused).await);
        }
    };
    let scope = actions.join(" ");
    event.action = Some(scope.clone());
    event.decision = Some(Outcome::Allow);
    if for_proxy {
        event.reason = Some("a proxy credential for the agent's browser (API §16)".into());
    }

    // Both one-time values are consumed together, and only once every check passed; the
    // grant is checked live again in the same transaction (a grant revoked since it was read
    // issues no token); the issuance is audited in it (as refused if a value was seen before
    // or the grant ended).
    let request = RequestUse {
        once: vec![
            assertion_once,
            OneTimeUse {
                kind: OneTimeKind::Proof,
                key: proof.replay_key(),
                keep_until: proof.replay_until(),
            },
        ],
        exchanged_grant: Some(grant.id.clone()),
        now,
        audit: Some(event),
        ..RequestUse::default()
    };
    match state.store.record_use(request).await.map_err(|e| {
        tracing::error!(error = %e, "token commit failed");
        ApiError::AuditUnavailable
    })? {
        UseVerdict::Replayed(OneTimeKind::Assertion) => {
            return Err(ApiError::InvalidClient(
                "client assertion jti was already used".into(),
            ));
        }
        UseVerdict::Replayed(OneTimeKind::Proof) => {
            return Err(ApiError::InvalidDpopProof(
                "dpop proof jti was already used".into(),
            ));
        }
        UseVerdict::GrantSpent => {
            return Err(ApiError::InvalidGrant(
                "the grant is no longer active".into(),
            ));
        }
        UseVerdict::Recorded => {}
        // An exchange names no approval, action or token: these cannot come, and would refuse.
        UseVerdict::ApprovalSpent
        | UseVerdict::Replayed(OneTimeKind::SingleUse)
        | UseVerdict::TokenRevoked
        | UseVerdict::TooManyPending => {
            return Err(ApiError::InvalidGrant(
                "the grant cannot issue a token now".into(),
            ));
        }
    }

    let exp = (now + state.config.max_token_ttl).min(grant.expires_at);
    if for_proxy {
        let credential = state.proxy_credentials.issue(&ProxyClaims {
            iss: state.issuer.clone(),
            sub: grant.subject.clone(),
            act: Actor { sub: agent.clone() },
            client_id: agent,
            grant_id: grant.id.clone(),
            scope: scope.clone(),
            jti,
            iat: now,
            exp,
        });
        Metrics::incr(&state.metrics.tokens_issued);
        tracing::info!(grant_id = %grant.id, "proxy credential issued");
        return Ok(Json(TokenResponse {
            access_token: credential,
            issued_token_type: PROXY_CREDENTIAL_TYPE,
            // RFC 8693 §2.2.1: not an access token for an `Authorization` header.
            token_type: "N_A",
            expires_in: exp - now,
            scope,
        })
        .into_response());
    }
    let claims = AccessClaims {
        iss: state.issuer.clone(),
        sub: grant.subject.clone(),
        aud: state.issuer.clone(),
        iat: now,
        exp,
        jti,
        client_id: agent.clone(),
        act: Actor { sub: agent },
        scope: scope.clone(),
        cnf: Confirmation { jkt: proof.jkt },
        grant_id: grant.id.clone(),
        purpose: grant.purpose.clone(),
    };
    let access_token = state.sign_token(&claims);
    Metrics::incr(&state.metrics.tokens_issued);
    tracing::info!(grant_id = %grant.id, agent = %claims.client_id, jti = %claims.jti, "token issued");
    let mut response = Json(TokenResponse {
        access_token,
        issued_token_type: ACCESS_TOKEN_TYPE,
        token_type: "DPoP",
        expires_in: exp - now,
        scope,
    })
    .into_response();
    if state.config.dpop_nonce
        && let Ok(nonce) = HeaderValue::from_str(&state.nonce_key.issue(now))
    {
        response.headers_mut().insert("dpop-nonce", nonce);
    }
    Ok(response)
}

/// Records a refused exchange under its grant and gives back the refusal.
async fn audit_refusal(state: &AppState, event: AuditEvent, refused: ApiError) -> ApiError {
    crate::audit::record_refusal(state, event, &refused).await;
    refused
}

/// Who asks to revoke or introspect.
enum OAuthCaller {
    /// The admin or a human, by API key.
    Key(Caller),
    /// An agent, by client assertion.
    Agent(AuthenticatedClient),
}

async fn oauth_caller(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> ApiResult<OAuthCaller> {
    match authorization(headers)? {
        Some((AuthScheme::Bearer, key)) => caller_from_key(state, key)
            .await?
            .map(OAuthCaller::Key)
            .ok_or_else(|| ApiError::InvalidClient("unknown API key".into())),
        Some(_) => Err(ApiError::InvalidClient(
            "use Bearer or private_key_jwt".into(),
        )),
        None => {
            let revocation = format!("{}/oauth2/revoke", state.issuer);
            let audiences = [
                state.issuer.as_str(),
                state.token_endpoint.as_str(),
                revocation.as_str(),
            ];
            let client = authenticate_client(state, form, &audiences, None).await?;
            Ok(OAuthCaller::Agent(client))
        }
    }
}

/// `POST /oauth2/revoke`: 200 for any well-formed request; the token is dead afterwards if the
/// caller may revoke it (its agent, its human, or admin).
#[utoipa::path(post, path = "/oauth2/revoke", tag = "oauth",
    request_body(content = RevokeForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "the token is dead if the caller may revoke it", body = Object), OAuthErrors),
    security((), ("api_key" = [])))]
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Form,
) -> ApiResult<Response> {
    let caller = oauth_caller(&state, &headers, &form).await?;
    let token = form.require("token")?;
    if let OAuthCaller::Agent(client) = &caller
        && state
            .store
            .consume_once(std::slice::from_ref(&client.assertion_once))
            .await?
            .is_some()
    {
        return Err(ApiError::InvalidClient(
            "client assertion jti was already used".into(),
        ));
    }
    let now = state.clock.now();
    // An access token, or a proxy credential (API §16): either names its own `jti`.
    let revocable =
        match verify_access_token(token, |kid| state.verify_key(kid), &state.issuer, now) {
            Ok(claims) => Some((
                claims.sub,
                claims.client_id,
                claims.grant_id,
                claims.jti,
                claims.exp,
                Some(claims.purpose),
            )),
            Err(_) => state
                .proxy_credentials
                .verify(token, &state.issuer, now)
                .ok()
                .map(|c| (c.sub, c.client_id, c.grant_id, c.jti, c.exp, None)),
        };
    if let Some((sub, client_id, grant_id, jti, exp, purpose)) = revocable {
        let allowed = match &caller {
            OAuthCaller::Key(c) => c.may_act_for(&sub),
            OAuthCaller::Agent(client) => client.agent == client_id,
        };
        if allowed {
            let mode = match &caller {
                OAuthCaller::Key(c) => crate::audit::caller_mode(c),
                OAuthCaller::Agent(_) => Mode::Delegated,
            };
            let mut event = AuditEvent::new("token.revoked", mode, now);
            event.subject = Some(sub);
            event.actor = Some(client_id);
            event.grant_id = Some(grant_id.clone());
            event.purpose = purpose;
            event.request_id = Some(jti.clone());
            state
                .store
                .revoke_token(&jti, &grant_id, exp, &event)
                .await?;
            tracing::info!(jti = %jti, grant_id = %grant_id, "token revoked");
        }
    }
    Ok(no_store(Json(json!({})).into_response()))
}

/// `POST /oauth2/introspect` (admin): `{"active": false}` and nothing else for any token that
/// is not live.
#[utoipa::path(post, path = "/oauth2/introspect", tag = "oauth",
    request_body(content = IntrospectForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = Introspection), OAuthErrors), security(("api_key" = [])))]
pub async fn introspect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Form,
) -> ApiResult<Response> {
    let caller = match authorization(&headers)? {
        Some((AuthScheme::Bearer, key)) => caller_from_key(&state, key).await?,
        _ => None,
    };
    if !caller.as_ref().is_some_and(Caller::is_admin) {
        return Err(ApiError::InvalidClient(
            "introspection needs Authorization: Bearer <admin key>".into(),
        ));
    }
    let token = form.require("token")?;
    let now = state.clock.now();
    let inactive = || no_store(Json(Introspection::default()).into_response());
    let Ok(claims) = verify_access_token(token, |kid| state.verify_key(kid), &state.issuer, now)
    else {
        return Ok(inactive());
    };
    match check_token_live(&state, &claims, now).await {
        Ok(_) => {}
        Err(ApiError::InvalidToken(_)) => return Ok(inactive()),
        Err(e) => return Err(e),
    }
    Ok(no_store(Json(Introspection::live(claims)).into_response()))
}

/// Whether an RFC 8707 `resource` names one of Leash's own resources (API §14): Leash itself, an
/// upstream's gateway URL or an MCP upstream's endpoint. Tokens are for Leash alone; a resource
/// elsewhere is refused rather than ignored, so a client never believes it got a token for it.
fn is_own_resource(state: &AppState, resource: &str) -> bool {
    let resource = resource.trim_end_matches('/');
    if resource == state.public_url || resource == state.issuer {
        return true;
    }
    let Some(rest) = resource.strip_prefix(state.public_url.as_str()) else {
        return false;
    };
    state.config.upstreams.values().any(|upstream| {
        let mount = if upstream.mcp.is_some() { "mcp" } else { "gw" };
        rest == format!("/{mount}/{}", upstream.name)
    })
}
