//! `POST /v1/authorize` (API §6): the gateway's steps 1–7 as a decision API for a proxy the
//! operator runs (nginx `auth_request`, Envoy `ext_authz`). Its `200` carries the human's vaulted
//! credential for the proxy to inject, so only a configured proxy, by its `Leash-Proxy-Key`, is
//! ever answered: an agent asking itself would otherwise read what it must never hold.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use leash_core::secret::random_id;

use crate::audit::Trail;
use crate::error::{ApiError, ApiResult};
use crate::gateway::{ApprovalState, attribute_refused_token, decide, refuse, source_of};
use crate::overrides::{FormBody, form_body, refuse_method_field};
use crate::state::AppState;

/// The proxy's key, checked against `[authorize] proxy_keys` and `LEASH_AUTHORIZE_KEY`.
pub const PROXY_KEY: &str = "leash-proxy-key";
/// The original request's method, set by the proxy (overwriting anything the client sent).
pub const ORIGINAL_METHOD: &str = "leash-original-method";
/// The original request target (`/gw/{upstream}/{path}?query`), set by the proxy.
pub const ORIGINAL_URI: &str = "leash-original-uri";
/// Set to `complete` by a proxy that sends the original request's whole body as the body of
/// its `/v1/authorize` request (Envoy: `with_request_body`, `allow_partial_message: false`);
/// only then can an approval be bound to the body, so only then are approvals asked or used.
pub const ORIGINAL_BODY: &str = "leash-original-body";

/// The audit kind of this decision point.
const AUTHORIZE_EVENT: &str = "authorize.request";

/// Client headers a proxy must drop before forwarding an allowed request (`Leash-Remove-Headers`):
/// the agent's credentials, its approval reference, what it could send under Leash's own
/// names, the client-address and forwarding headers (the gateway drops the whole `X-Forwarded-*`
/// family; a proxy can only drop names), and every
/// override header ([`crate::overrides::OVERRIDE_HEADERS`]) that would let the upstream act on
/// another method or URL than the one policy judged.
fn remove_headers() -> HeaderValue {
    const CREDENTIALS_AND_ADDRESSES: &[&str] = &[
        "authorization",
        "dpop",
        "cookie",
        "proxy-authorization",
        "leash-approval",
        "leash-proxy-key",
        "leash-subject",
        "leash-actor",
        "leash-grant",
        "leash-request-id",
        "leash-original-method",
        "leash-original-uri",
        "leash-original-body",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "x-original-uri",
        "x-original-host",
        "x-envoy-original-path",
    ];
    let names: Vec<&str> = CREDENTIALS_AND_ADDRESSES
        .iter()
        .chain(crate::overrides::OVERRIDE_HEADERS)
        .copied()
        .collect();
    HeaderValue::from_str(&names.join(", ")).unwrap_or_else(|_| HeaderValue::from_static("*"))
}

/// `POST|GET /v1/authorize`. The proxy passes the agent's headers as they came, plus
/// `Leash-Proxy-Key`, `Leash-Original-Method` and `Leash-Original-URI` (a `/gw/{upstream}/{path}`
/// target as seen at the proxy, whose external base URL is Leash's `public_url`). `200` carries
/// the headers to inject — `Leash-Subject`, `Leash-Actor`, `Leash-Grant`, `Leash-Request-Id`,
/// and the credential as `Leash-Inject-Authorization`, `Leash-Inject-Cookie`, or
/// `Leash-Inject-Name` + `Leash-Inject-Value` — and, in `Leash-Remove-Headers`, the client
/// headers the proxy must drop.
#[utoipa::path(method(get, post), path = "/v1/authorize", tag = "gateway",
    params(
        ("Leash-Proxy-Key" = String, Header, description = "the proxy's key (`[authorize] proxy_keys`)"),
        ("Leash-Original-Method" = String, Header, description = "the original request's method"),
        ("Leash-Original-URI" = String, Header, description = "the original `/gw/{upstream}/{path}` target"),
        ("Leash-Original-Body" = Option<String>, Header, description = "`complete` when the body is the original request's whole body"),
    ),
    responses((status = 200, description = "allowed; the headers to inject are in the response headers"), crate::openapi::GatewayErrors),
    security(("dpop" = []), ("api_key" = [])))]
pub async fn authorize(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let request_id = random_id("req_");
    let source = source_of(&state, &request);
    let (parts, body) = request.into_parts();
    let mut trail = Trail::default();
    let result = match check_proxy_key(&state, &parts.headers) {
        Ok(()) => decide_for_proxy(&state, &parts.headers, body, &request_id, &mut trail).await,
        Err(refused) => {
            // Audited against the token's agent when it carries a genuine one: an agent asking
            // for credentials itself is what an investigator wants to see.
            attribute_refused_token(&state, &parts.headers, &mut trail);
            Err(refused)
        }
    };
    match result {
        Ok(response) => response,
        Err(e) => refuse(&state, &trail, AUTHORIZE_EVENT, &request_id, source, e).await,
    }
}

/// Exactly one `Leash-Proxy-Key`, and it is a configured one. Nothing else about the request is
/// looked at before this passes, so a caller without the key learns nothing.
fn check_proxy_key(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let mut keys = headers.get_all(PROXY_KEY).iter();
    let accepted = match (keys.next(), keys.next()) {
        (Some(key), None) => key
            .to_str()
            .is_ok_and(|key| state.config.authorize.accepts(key)),
        _ => false,
    };
    if accepted {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "only a proxy configured in [authorize] proxy_keys may call /v1/authorize (Leash-Proxy-Key)"
                .into(),
        ))
    }
}

fn original<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok(),
        _ => None,
    }
}

async fn decide_for_proxy(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
    request_id: &str,
    trail: &mut Trail,
) -> ApiResult<Response> {
    let method = original(headers, ORIGINAL_METHOD)
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or_else(|| ApiError::InvalidRequest("Leash-Original-Method is required".into()))?;
    let uri: axum::http::Uri = original(headers, ORIGINAL_URI)
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "Leash-Original-URI must be the original request target".into(),
            )
        })?;
    let body_complete = match original(headers, ORIGINAL_BODY) {
        None => false,
        Some("complete") => true,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "Leash-Original-Body must be `complete` when it is sent".into(),
            ));
        }
    };
    let decided = decide(state, &method, &uri, headers, trail).await?;
    // Only a body the proxy sent whole can be checked for `_method` or bound to an approval.
    let form = if body_complete {
        form_body(&method, headers)?
    } else {
        FormBody::Other
    };
    if !matches!(decided.approval, ApprovalState::NotNeeded) {
        // An approval is bound to the body: without the whole of it, neither asking for one
        // nor using one can be bound to what the proxy will forward.
        if !body_complete {
            return Err(ApiError::ApprovalUnsupported);
        }
        decided
            .bind_body(
                state,
                body,
                form,
                uri.query(),
                headers,
                trail,
                AUTHORIZE_EVENT,
                request_id,
            )
            .await?;
    } else if form != FormBody::Other {
        let limit = state.config.limits.gateway_body_bytes;
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|e| crate::extract::body_error(&e, limit))?;
        refuse_method_field(form, &bytes)?;
    }
    let injected = decided
        .commit(state, trail, AUTHORIZE_EVENT, request_id)
        .await?;
    let mut response = StatusCode::OK.into_response();
    let out = response.headers_mut();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    out.insert("leash-remove-headers", remove_headers());
    for (name, value) in injected {
        let carrier = injected_as(&name, out);
        out.insert(carrier, value);
    }
    tracing::info!(request_id = %request_id, upstream = %decided.upstream().name, actor = %decided.actor(), "authorized for a proxy");
    Ok(response)
}

/// The response header that carries an upstream header for the proxy to set.
fn injected_as(name: &HeaderName, out: &mut HeaderMap) -> HeaderName {
    match name.as_str() {
        "authorization" => HeaderName::from_static("leash-inject-authorization"),
        "cookie" => HeaderName::from_static("leash-inject-cookie"),
        n if n.starts_with("leash-") => name.clone(),
        _ => {
            if let Ok(n) = HeaderValue::from_str(name.as_str()) {
                out.insert("leash-inject-name", n);
            }
            HeaderName::from_static("leash-inject-value")
        }
    }
}
