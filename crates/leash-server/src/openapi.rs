//! The OpenAPI 3.1 description of Leash's HTTP API, served at `GET /openapi.json`.
//!
//! It is generated from the code: each handler carries its `#[utoipa::path]`, the bodies are the
//! types the handlers answer with, and [`crate::router`] registers the documented routes through
//! `utoipa_axum`, so a route cannot exist without its description or the other way round. Here
//! are only what the handlers share: the error bodies and statuses, the OAuth form bodies (the
//! form extractor is generic), and the security schemes. The transparent gateway
//! (`/gw/{upstream}/…`) passes upstream answers through and is described by its errors only in
//! the API document, not here.

use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// The description's root: metadata, shared components and security schemes; the paths are
/// added by the router as it registers each handler.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Leash",
        description = "Delegation broker and gateway for AI agents: task grants, DPoP-bound \
                       token exchange, policy-checked gateway, approvals, vault, audit and review.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "oauth", description = "Token exchange (RFC 8693), revocation, introspection"),
        (name = "humans"), (name = "agents"), (name = "grants"), (name = "approvals"),
        (name = "vault"), (name = "gateway"), (name = "audit"), (name = "discovery"),
        (name = "operations"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("the admin key or a human's API key"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "dpop",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "DPoP",
                "an agent: `Authorization: DPoP <access token>` plus this proof (RFC 9449)",
            ))),
        );
    }
}

/// Every error answer: `{"error", "error_description"}` (API §0), with the deciding policies and
/// the approval to wait for where those apply.
#[derive(Debug, ToSchema)]
pub struct ErrorBody {
    /// A machine-readable code (RFC 6749 §5.2 at the OAuth endpoints).
    pub error: String,
    /// What went wrong, for a human; never a secret.
    pub error_description: String,
    /// The policies that decided (`policy_denied`, `approval_required`).
    pub policies: Option<Vec<String>>,
    /// The approval created for this request (`approval_required`).
    pub approval_id: Option<String>,
    /// Where to poll that approval.
    pub status_url: Option<String>,
}

/// The refusals the management API can answer with.
#[derive(IntoResponses)]
pub enum ApiErrors {
    /// Malformed input.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No or unknown API key.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Not this caller's to see or change.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such object (or not visible to this caller).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The object is not in a state that allows this.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body stopped arriving for `header_read_timeout`; the connection is closed.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// The body is over the endpoint's limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not JSON.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// The request head is over the limits.
    #[response(status = 431)]
    HeadersTooLarge(ErrorBody),
    /// The store or the audit log cannot be written; nothing was done.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The refusals of the OAuth endpoints (RFC 6749 §5.2 codes).
#[derive(IntoResponses)]
pub enum OAuthErrors {
    /// `invalid_request`, `invalid_grant`, `invalid_scope`, `invalid_target`,
    /// `unsupported_grant_type`, `invalid_dpop_proof`, `use_dpop_nonce`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `invalid_client`.
    #[response(status = 401)]
    InvalidClient(ErrorBody),
    /// The form stopped arriving for `header_read_timeout`; the connection is closed.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// The form is over 64 KiB.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not a form.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `rate_limited`: this agent is over its rate; see `Retry-After`.
    #[response(status = 429, headers(("Retry-After" = u64, description = "seconds")))]
    RateLimited(ErrorBody),
    /// The request head is over the limits.
    #[response(status = 431)]
    HeadersTooLarge(ErrorBody),
    /// The store or the audit log cannot be written; nothing was done.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The refusals of a gateway decision (API §6).
#[derive(IntoResponses)]
pub enum GatewayErrors {
    /// Malformed target or headers.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `invalid_token`, `invalid_dpop_proof`, `use_dpop_nonce`, `unauthorized`.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `no_route`, `insufficient_scope`, `policy_denied`, `approval_required`,
    /// `approval_mismatch`, `approval_unsupported` (`/v1/authorize` without the whole body),
    /// `forbidden`.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `rate_limited`: this caller is over its rate; see `Retry-After`.
    #[response(status = 429, headers(("Retry-After" = u64, description = "seconds")))]
    RateLimited(ErrorBody),
    /// The request head is over the limits.
    #[response(status = 431)]
    HeadersTooLarge(ErrorBody),
    /// The audit log or the store cannot be written; nothing was forwarded.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The store is unreachable.
#[derive(IntoResponses)]
pub enum UnavailableError {
    /// `temporarily_unavailable`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// `{"status": …}` of the health endpoints.
#[derive(Debug, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: String,
}

/// RFC 8414 authorization server metadata.
#[derive(Debug, ToSchema)]
pub struct Metadata {
    /// The issuer URL.
    pub issuer: String,
    /// `<issuer>/oauth2/token`.
    pub token_endpoint: String,
    /// The JWKS with the token-signing key.
    pub jwks_uri: String,
    /// `<issuer>/oauth2/introspect`.
    pub introspection_endpoint: String,
    /// `<issuer>/oauth2/revoke`.
    pub revocation_endpoint: String,
    /// Only token exchange.
    pub grant_types_supported: Vec<String>,
    /// Only `private_key_jwt`.
    pub token_endpoint_auth_methods_supported: Vec<String>,
    /// `EdDSA`, `Ed25519`, `ES256`.
    pub dpop_signing_alg_values_supported: Vec<String>,
}

/// A JWK Set.
#[derive(Debug, ToSchema)]
pub struct Jwks {
    /// Public keys (JWK, RFC 7517).
    pub keys: Vec<Value>,
}

/// The token-exchange form (RFC 8693 §2.1 with RFC 7523 client authentication).
#[derive(Debug, ToSchema)]
pub struct TokenForm {
    /// `urn:ietf:params:oauth:grant-type:token-exchange`.
    pub grant_type: String,
    /// The grant handle.
    pub subject_token: String,
    /// `urn:leash:params:oauth:token-type:grant`.
    pub subject_token_type: String,
    /// `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
    pub client_assertion_type: String,
    /// A JWT signed with the agent's key.
    pub client_assertion: String,
    /// A space-separated subset of the grant's actions.
    pub scope: Option<String>,
    /// `urn:ietf:params:oauth:token-type:access_token` (the default), or
    /// `urn:leash:params:oauth:token-type:proxy-credential` for the agent's browser (API §16).
    pub requested_token_type: Option<String>,
}

/// The revocation form (RFC 7009); an agent authenticates with a client assertion.
#[derive(Debug, ToSchema)]
pub struct RevokeForm {
    /// The access token.
    pub token: String,
    /// Optional, ignored.
    pub token_type_hint: Option<String>,
    /// With `client_assertion`, for an agent.
    pub client_assertion_type: Option<String>,
    /// A JWT signed with the agent's key.
    pub client_assertion: Option<String>,
}

/// The introspection form (RFC 7662).
#[derive(Debug, ToSchema)]
pub struct IntrospectForm {
    /// The access token.
    pub token: String,
    /// Optional, ignored.
    pub token_type_hint: Option<String>,
}
