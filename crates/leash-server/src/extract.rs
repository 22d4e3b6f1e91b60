//! Request extractors: strict JSON and form bodies with per-endpoint size limits, and the
//! caller's identity (admin or human by API key; agent by DPoP-bound token and proof).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use leash_core::dpop::{ProofContext, ProofError, verify_proof};
use leash_core::secret::SecretDigest;
use leash_core::token::AccessClaims;
use leash_store::{OneTimeKind, OneTimeUse, RequestUse, UseVerdict, User};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, PresentedToken};

/// Largest JSON body of the management API.
pub const JSON_LIMIT: usize = 64 * 1024;
/// Largest form body of the OAuth endpoints.
pub const FORM_LIMIT: usize = 64 * 1024;

async fn read_body(body: Body, limit: usize) -> ApiResult<axum::body::Bytes> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| body_error(&e, limit))
}

/// What a request body that could not be read whole (under `limit`) is answered with, the
/// client's error in every case: over the limit → 413, stalled or too slow → 408, malformed
/// (bad chunking) or ended early → 400.
pub fn body_error(error: &(dyn std::error::Error + 'static), limit: usize) -> ApiError {
    use crate::error::caused_by;
    if caused_by::<http_body_util::LengthLimitError>(error) {
        ApiError::TooLarge(limit)
    } else if caused_by::<crate::listener::BodyStalled>(error) {
        ApiError::RequestTimeout
    } else {
        ApiError::InvalidRequest(
            "the request body is malformed (bad chunked encoding?) or ended early".into(),
        )
    }
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

/// A JSON body, parsed strictly into `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> ApiResult<Self> {
        if !content_type_is(req.headers(), "application/json") {
            return Err(ApiError::UnsupportedMediaType("application/json"));
        }
        let bytes = read_body(req.into_body(), JSON_LIMIT).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            // serde's messages can quote the offending value; never echo values back.
            let message = e.to_string();
            let detail = if message.contains('"') && !message.contains('`') {
                format!("line {} column {}", e.line(), e.column())
            } else {
                message
            };
            ApiError::InvalidRequest(format!("request body is not the expected JSON: {detail}"))
        })
    }
}

/// An `application/x-www-form-urlencoded` body (RFC 6749 §3.2): UTF-8 after percent-decoding,
/// each parameter at most once.
#[derive(Debug)]
pub struct Form(pub HashMap<String, String>);

impl Form {
    /// Parses a form body strictly.
    pub fn parse(body: &[u8]) -> ApiResult<Self> {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::InvalidRequest("form body is not UTF-8".into()))?;
        let mut params = HashMap::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                let plus = s.replace('+', " ");
                percent_encoding::percent_decode_str(&plus)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| ApiError::InvalidRequest("form parameter is not UTF-8".into()))
            };
            let name = decode(name)?;
            if name.is_empty() {
                return Err(ApiError::InvalidRequest(
                    "a form parameter has no name".into(),
                ));
            }
            if params.contains_key(&name) {
                return Err(ApiError::InvalidRequest(format!(
                    "parameter `{}` is repeated",
                    name.chars().take(64).collect::<String>()
                )));
            }
            params.insert(name, decode(value)?);
        }
        Ok(Self(params))
    }

    /// A parameter, `None` if absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A required, non-empty parameter.
    pub fn require(&self, name: &str) -> ApiResult<&str> {
        self.get(name)
            .ok_or_else(|| ApiError::InvalidRequest(format!("parameter `{name}` is required")))
    }
}

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> ApiResult<Self> {
        if !content_type_is(req.headers(), "application/x-www-form-urlencoded") {
            return Err(ApiError::UnsupportedMediaType(
                "application/x-www-form-urlencoded",
            ));
        }
        let bytes = read_body(req.into_body(), FORM_LIMIT).await?;
        Self::parse(&bytes)
    }
}

/// A header value as text if it is visible ASCII (or tab), as `HeaderValue::to_str` decides.
/// Written as one pass without an early exit, which the compiler vectorises: the gateway reads
/// two values of hundreds of bytes (token and proof) on every request, and `to_str` checks them
/// a byte at a time.
fn header_text(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let visible = bytes.iter().fold(true, |ok, &b| {
        ok & ((b' '..=b'~').contains(&b) | (b == b'\t'))
    });
    if visible {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// The scheme of an `Authorization` header, compared without regard to case (RFC 9110 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    /// `Bearer`: an API key.
    Bearer,
    /// `DPoP`: a DPoP-bound access token.
    Dpop,
    /// Any other scheme.
    Other,
}

/// The `Authorization` header split into scheme and credentials; more than one header, or a
/// value that is not `scheme SP credentials`, is `invalid_request`.
pub fn authorization(headers: &HeaderMap) -> ApiResult<Option<(AuthScheme, &str)>> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidRequest(
            "more than one Authorization header".into(),
        ));
    }
    let text = header_text(value)
        .ok_or_else(|| ApiError::InvalidRequest("Authorization header is not ASCII".into()))?;
    let (scheme, credentials) = text.split_once(' ').ok_or_else(|| {
        ApiError::InvalidRequest("Authorization must be `scheme credentials`".into())
    })?;
    let credentials = credentials.trim();
    // memchr's vectorised search: a token is hundreds of bytes (`str::contains` with a set of
    // chars decodes each one).
    let separated = memchr::memchr2(b' ', b',', credentials.as_bytes()).is_some();
    if credentials.is_empty() || separated {
        return Err(ApiError::InvalidRequest(
            "Authorization carries more than one credential".into(),
        ));
    }
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        AuthScheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        AuthScheme::Dpop
    } else {
        AuthScheme::Other
    };
    Ok(Some((scheme, credentials)))
}

/// Who called, by API key.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The holder of the admin key.
    Admin,
    /// A human user.
    Human(User),
}

impl Caller {
    /// The human whose data a list shows: the caller's own, or everyone's (`None`) for the admin.
    pub fn list_scope(&self) -> Option<&str> {
        match self {
            Self::Admin => None,
            Self::Human(user) => Some(user.id.as_str()),
        }
    }

    /// Whether the caller may act on data of human `subject`.
    pub fn may_act_for(&self, subject: &str) -> bool {
        match self {
            Self::Admin => true,
            Self::Human(user) => user.id == subject,
        }
    }
}

/// Resolves a Bearer API key to a caller.
pub async fn caller_from_key(state: &AppState, key: &str) -> ApiResult<Option<Caller>> {
    let digest = SecretDigest::of(key);
    if digest.ct_eq(&state.admin_key) {
        return Ok(Some(Caller::Admin));
    }
    Ok(state.store.user_by_key(&digest).await?.map(Caller::Human))
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> ApiResult<Self> {
        caller_from_headers(state, &parts.headers).await
    }
}

/// The admin or human whose API key `headers` carry as `Authorization: Bearer`.
pub async fn caller_from_headers(state: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    match authorization(headers)? {
        Some((AuthScheme::Bearer, key)) => caller_from_key(state, key)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown API key".into())),
        Some(_) => Err(ApiError::Unauthorized(
            "use Authorization: Bearer <api key>".into(),
        )),
        None => Err(ApiError::Unauthorized(
            "Authorization: Bearer <api key> is required".into(),
        )),
    }
}

/// The admin, and only the admin.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> ApiResult<Self> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Human(_) => Err(ApiError::Forbidden("this call needs the admin key".into())),
        }
    }
}

/// An agent authenticated by a live DPoP-bound access token and a valid proof. The proof's
/// one-time `jti` is claimed only when the request's use is committed ([`commit_use`]), in the
/// same transaction as its budget count, before anything acts on it.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    /// The verified token's claims.
    pub claims: Arc<AccessClaims>,
    /// The token's grant, live when the call was authenticated.
    pub grant: leash_core::grant::Grant,
    /// The proof's one-time value.
    pub proof_once: OneTimeUse,
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

/// The one `DPoP` header of a request, if any. More than one, or a non-ASCII value, is a
/// problem the caller answers in its own terms (token endpoint or resource).
pub fn single_dpop_header(headers: &HeaderMap) -> Result<Option<&str>, DpopHeaderError> {
    let mut values = headers.get_all("dpop").iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(DpopHeaderError::Repeated);
    }
    header_text(first)
        .map(Some)
        .ok_or(DpopHeaderError::NotAscii)
}

/// What is wrong with a request's `DPoP` header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DpopHeaderError {
    /// More than one `DPoP` header.
    #[error("more than one DPoP header")]
    Repeated,
    /// A value that is not visible ASCII.
    #[error("dpop proof is not ASCII")]
    NotAscii,
}

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
/// An agent's proof is checked but not yet claimed: the caller must [`commit_use`] it (with
/// `proof_once`) before acting.
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

/// Checks an agent at a resource (RFC 9449 §7), in memory: `token` (from `Authorization:
/// DPoP`) by signature and claims (a verified token is cached), grant and token liveness, then
/// the proof (method, URL, `ath`, key binding). The proof's `jti` is returned in `proof_once` for
/// [`commit_use`].
pub async fn verify_agent(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    token: &str,
) -> ApiResult<AgentAuth> {
    let now = state.clock.now();
    let token = PresentedToken::new(token);
    let claims = state.verified_token(&token, now)?;
    let grant = state.check_token_live(&claims, now).await?;

    // API §6: two DPoP headers are a malformed request.
    let proof = single_dpop_header(headers)
        .map_err(|e| match e {
            DpopHeaderError::Repeated => ApiError::InvalidRequest(e.to_string()),
            DpopHeaderError::NotAscii => ApiError::ResourceInvalidProof(e.to_string()),
        })?
        .ok_or_else(|| ApiError::InvalidToken("DPoP proof header is missing".into()))?;
    let url = state.resource_url(uri);
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

/// The query of list endpoints: an optional `status` filter, nothing else.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    status: Option<String>,
}

/// Parses the `?status=` filter of a list endpoint with `parse`; `allowed` names the values in
/// the error.
pub fn status_filter<T>(
    query: Result<axum::extract::Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
    parse: impl Fn(&str) -> Option<T>,
    allowed: &str,
) -> ApiResult<Option<T>> {
    let axum::extract::Query(query) =
        query.map_err(|_| ApiError::InvalidRequest("the only query parameter is status".into()))?;
    query
        .status
        .map(|s| {
            parse(&s).ok_or_else(|| ApiError::InvalidRequest(format!("status must be {allowed}")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_accepts_exactly_what_to_str_accepts() {
        for byte in 0..=u8::MAX {
            for at in [0, 1, 40] {
                let mut bytes = b"DPoP eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c3JfMSJ9.c2ln".to_vec();
                bytes[at] = byte;
                let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                    continue;
                };
                assert_eq!(
                    header_text(&value),
                    value.to_str().ok(),
                    "byte {byte} at {at}"
                );
            }
        }
    }

    #[test]
    fn authorization_splits_scheme_and_one_credential() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            authorization(&headers)
                .map(|found| found.map(|(scheme, credentials)| (scheme, credentials.to_owned())))
                .map_err(|e| e.to_string())
        };
        let found = |scheme, credentials: &str| Ok(Some((scheme, credentials.to_owned())));
        assert_eq!(with("DPoP abc.def"), found(AuthScheme::Dpop, "abc.def"));
        assert_eq!(with("bearer  lsk_1 "), found(AuthScheme::Bearer, "lsk_1"));
        assert_eq!(with("Basic dXNlcg=="), found(AuthScheme::Other, "dXNlcg=="));
        for bad in ["DPoP", "DPoP a b", "Bearer a,b", "Bearer  "] {
            assert!(with(bad).is_err(), "{bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"DPoP \xc3\xa9").unwrap(),
        );
        assert!(authorization(&headers).is_err());
        assert!(matches!(authorization(&HeaderMap::new()), Ok(None)));
    }
}
