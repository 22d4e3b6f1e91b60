//! The one mapping from every error Leash answers with to its HTTP status, headers and
//! `{"error", "error_description"}` body. The match is exhaustive on purpose.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use leash_store::StoreError;

/// The header naming the decision of an answer Leash produced itself (API §6).
pub const LEASH_DECISION: &str = "leash-decision";

/// An error answered to a caller. Descriptions never contain secrets or tokens.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request`.
    #[error("{0}")]
    InvalidRequest(String),
    /// 413 `invalid_request`: the body is over the endpoint's limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// 408 `invalid_request`: the client stopped sending the request body, or took longer than
    /// allowed for all of it (see `listener::StallTimed`); the connection is closed.
    #[error(
        "the request body did not arrive in time: it stalled for longer than header_read_timeout, or took longer than body_read_timeout in all"
    )]
    RequestTimeout,
    /// 415 `invalid_request`.
    #[error("content type must be {0}")]
    UnsupportedMediaType(&'static str),
    /// 401 `unauthorized`: no or unknown API key at a /v1 endpoint.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// 409 `conflict`.
    #[error("{0}")]
    Conflict(String),
    /// 401 `invalid_client` (RFC 6749 §5.2).
    #[error("{0}")]
    InvalidClient(String),
    /// 400 `invalid_grant`.
    #[error("{0}")]
    InvalidGrant(String),
    /// 400 `invalid_scope`.
    #[error("{0}")]
    InvalidScope(String),
    /// 400 `invalid_target` (RFC 8707): a `resource` that is not one of Leash's own.
    #[error("{0}")]
    InvalidTarget(String),
    /// 400 `unsupported_grant_type`.
    #[error("{0}")]
    UnsupportedGrantType(String),
    /// 400 `invalid_dpop_proof` at the token endpoint.
    #[error("{0}")]
    InvalidDpopProof(String),
    /// 400 `use_dpop_nonce` at the token endpoint, with a fresh `DPoP-Nonce`.
    #[error("authorization server requires nonce in DPoP proof")]
    UseDpopNonce(String),
    /// 401 `invalid_token` at a resource, with a DPoP challenge.
    #[error("{0}")]
    InvalidToken(String),
    /// 401 `invalid_dpop_proof` at a resource, with a DPoP challenge.
    #[error("{0}")]
    ResourceInvalidProof(String),
    /// 401 `use_dpop_nonce` at a resource, with a fresh `DPoP-Nonce`.
    #[error("resource server requires nonce in DPoP proof")]
    ResourceUseNonce(String),
    /// 403 `csrf`: a state-changing request authenticated by a session cookie without
    /// Leash's own `Origin` (API §13).
    #[error("{0}")]
    Csrf(String),
    /// 403 `access_denied`: the IdP vouched for the human, and Leash does not let them in
    /// (`[oidc] allowed_groups`, or a disabled human).
    #[error("{0}")]
    AccessDenied(String),
    /// 403 `no_route`: no route of the upstream names this request's action.
    #[error("{0}")]
    NoRoute(String),
    /// 403 `insufficient_scope`: the upstream or action is outside the token's grant and scope.
    #[error("{0}")]
    InsufficientScope(String),
    /// 403 `policy_denied`, naming the policies that decided.
    #[error("{reason}")]
    PolicyDenied {
        /// Why.
        reason: String,
        /// The deciding policy ids.
        policies: Vec<String>,
    },
    /// 403 `approval_required`: a human must approve this exact request.
    #[error("this action needs a human approval of this exact request")]
    ApprovalRequired {
        /// The policies that require it.
        policies: Vec<String>,
        /// The approval request created for it (`apr_…`), if one was.
        approval: Option<String>,
    },
    /// 403 `approval_mismatch`: the attached approval is for another request, grant or agent.
    #[error("{0}")]
    ApprovalMismatch(String),
    /// 403 `approval_unsupported`: the request needs an approval, and the proxy asking
    /// `/v1/authorize` did not send the request's whole body, which an approval is bound to.
    /// Also the audited reason of an MCP `resources/*` or `prompts/*` message that needs an
    /// approval: only a tool call can be held open for one.
    #[error(
        "this action needs a human approval, which a proxy can only ask for when it sends the whole request body to /v1/authorize"
    )]
    ApprovalUnsupported,
    /// 429 `rate_limited`, with `Retry-After`: the caller is over its rate (`[limits]`).
    #[error("too many requests from this caller; retry after {retry_after_secs} s")]
    RateLimited {
        /// Whole seconds until a request would be allowed (at least 1).
        retry_after_secs: u64,
    },
    /// 429 `too_many_pending_approvals`: the grant has `max_pending_approvals` approvals
    /// waiting for its human already (API §7).
    #[error(
        "this grant has as many approvals pending as it may; wait for the human to decide them"
    )]
    TooManyPendingApprovals,
    /// 431 `invalid_request`: the request head is over `[limits]`.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 502 `bad_gateway`: the upstream could not be reached.
    #[error("{0}")]
    BadGateway(String),
    /// 502 `upstream_credential_expired`: the human's OAuth connection to the upstream could
    /// not be refreshed (API §17); they must connect again, or try later.
    #[error("{0}")]
    UpstreamCredentialExpired(String),
    /// 502 `credential_reflected`: the upstream's answer carried the credential Leash injected
    /// (see the `reflection` module); the agent gets nothing of it.
    #[error(
        "the upstream's answer carried the credential Leash injected for it; nothing of it was passed on"
    )]
    CredentialReflected,
    /// 504 `gateway_timeout`: the upstream did not start its answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
    /// 503 `audit_unavailable`: the audit event could not be written, so nothing was done.
    #[error("the audit log cannot be written; nothing was done")]
    AuditUnavailable,
    /// 503 `temporarily_unavailable`: the store failed; nothing was decided.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict("already exists".into()),
            StoreError::Unsupported(why) => Self::InvalidRequest(why),
            StoreError::Unavailable(_)
            | StoreError::Corrupt(_)
            | StoreError::UnsupportedUrl(_)
            | StoreError::InUse { .. }
            | StoreError::NotLeash(_) => {
                tracing::error!(error = %e, "storage failure");
                Self::Unavailable("storage is unavailable; try again".into())
            }
        }
    }
}

fn challenge(error: &str, description: &str) -> HeaderValue {
    let algs = leash_core::jws::SUPPORTED_ALGS.join(" ");
    let description = description.replace(['"', '\\'], "'");
    HeaderValue::from_str(&format!(
        "DPoP error=\"{error}\", error_description=\"{description}\", algs=\"{algs}\""
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("DPoP"))
}

impl ApiError {
    /// The status and OAuth-style error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request"),
            Self::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "invalid_request"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request")
            }
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Csrf(_) => (StatusCode::FORBIDDEN, "csrf"),
            Self::AccessDenied(_) => (StatusCode::FORBIDDEN, "access_denied"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::InvalidClient(_) => (StatusCode::UNAUTHORIZED, "invalid_client"),
            Self::InvalidGrant(_) => (StatusCode::BAD_REQUEST, "invalid_grant"),
            Self::InvalidScope(_) => (StatusCode::BAD_REQUEST, "invalid_scope"),
            Self::InvalidTarget(_) => (StatusCode::BAD_REQUEST, "invalid_target"),
            Self::UnsupportedGrantType(_) => (StatusCode::BAD_REQUEST, "unsupported_grant_type"),
            Self::InvalidDpopProof(_) => (StatusCode::BAD_REQUEST, "invalid_dpop_proof"),
            Self::UseDpopNonce(_) => (StatusCode::BAD_REQUEST, "use_dpop_nonce"),
            Self::InvalidToken(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Self::ResourceInvalidProof(_) => (StatusCode::UNAUTHORIZED, "invalid_dpop_proof"),
            Self::ResourceUseNonce(_) => (StatusCode::UNAUTHORIZED, "use_dpop_nonce"),
            Self::NoRoute(_) => (StatusCode::FORBIDDEN, "no_route"),
            Self::InsufficientScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            Self::PolicyDenied { .. } => (StatusCode::FORBIDDEN, "policy_denied"),
            Self::ApprovalRequired { .. } => (StatusCode::FORBIDDEN, "approval_required"),
            Self::ApprovalMismatch(_) => (StatusCode::FORBIDDEN, "approval_mismatch"),
            Self::ApprovalUnsupported => (StatusCode::FORBIDDEN, "approval_unsupported"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::TooManyPendingApprovals => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_pending_approvals")
            }
            Self::HeadersTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request",
            ),
            Self::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            Self::CredentialReflected => (StatusCode::BAD_GATEWAY, "credential_reflected"),
            Self::UpstreamCredentialExpired(_) => {
                (StatusCode::BAD_GATEWAY, "upstream_credential_expired")
            }
            Self::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "gateway_timeout"),
            Self::AuditUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let description = self.to_string();
        let mut body = serde_json::json!({"error": code, "error_description": description});
        if let Self::PolicyDenied { policies, .. } | Self::ApprovalRequired { policies, .. } = &self
        {
            body["policies"] = serde_json::json!(policies);
        }
        if let Self::ApprovalRequired {
            approval: Some(id), ..
        } = &self
        {
            body["approval_id"] = serde_json::json!(id);
            body["status_url"] = serde_json::json!(format!("/v1/approvals/{id}"));
        }
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // API §6: every answer Leash itself produces names its decision, so a client can tell
        // Leash's refusals from an upstream's (the gateway strips this header from upstreams).
        headers.insert(LEASH_DECISION, HeaderValue::from_static(code));
        match &self {
            Self::UseDpopNonce(nonce) => {
                if let Ok(v) = HeaderValue::from_str(nonce) {
                    headers.insert("dpop-nonce", v);
                }
            }
            Self::ResourceUseNonce(nonce) => {
                if let Ok(v) = HeaderValue::from_str(nonce) {
                    headers.insert("dpop-nonce", v);
                }
                headers.insert(header::WWW_AUTHENTICATE, challenge(code, &description));
            }
            Self::InvalidToken(_) | Self::ResourceInvalidProof(_) => {
                headers.insert(header::WWW_AUTHENTICATE, challenge(code, &description));
            }
            Self::RateLimited { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::InvalidClient(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_client\""),
                );
            }
            Self::RequestTimeout => {
                // What is left of the body will not be read.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::InvalidRequest(_)
            | Self::TooLarge(_)
            | Self::UnsupportedMediaType(_)
            | Self::Forbidden(_)
            | Self::Csrf(_)
            | Self::AccessDenied(_)
            | Self::NotFound(_)
            | Self::MethodNotAllowed
            | Self::Conflict(_)
            | Self::InvalidGrant(_)
            | Self::InvalidScope(_)
            | Self::InvalidTarget(_)
            | Self::UnsupportedGrantType(_)
            | Self::InvalidDpopProof(_)
            | Self::NoRoute(_)
            | Self::InsufficientScope(_)
            | Self::PolicyDenied { .. }
            | Self::ApprovalRequired { .. }
            | Self::ApprovalMismatch(_)
            | Self::ApprovalUnsupported
            | Self::TooManyPendingApprovals
            | Self::HeadersTooLarge(_)
            | Self::BadGateway(_)
            | Self::CredentialReflected
            | Self::UpstreamCredentialExpired(_)
            | Self::GatewayTimeout(_)
            | Self::AuditUnavailable
            | Self::Unavailable(_) => {}
        }
        response
    }
}

/// An error code another server chose (an OAuth `error`), as Leash may repeat it in an answer,
/// a log line or an event: printable ASCII only, at most 64 characters.
pub fn foreign_code(code: &str) -> String {
    code.chars()
        .filter(char::is_ascii_graphic)
        .take(64)
        .collect()
}

/// Result of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// Whether `error`, or an error that caused it, is a `T`: how a failure deep in hyper or axum
/// (a body over its limit, a stalled body) is told apart from the rest.
pub fn caused_by<T: std::error::Error + 'static>(
    error: &(dyn std::error::Error + 'static),
) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<T>() {
            return true;
        }
        source = e.source();
    }
    false
}
