//! The web console (API §13): three static files built into the binary (no external assets,
//! works offline), served under a CSP without inline script, and the guard that keeps a session
//! cookie from being used across sites (`Origin` on every cookie-authenticated change).
//!
//! The page builds its DOM with `textContent` only (see `console/app.js`), so what an agent or
//! upstream wrote is shown as text, never run; the CSP is the second wall.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/app.css");

/// The console's content security policy: its own script and style only, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /console` and every page under it: the one HTML page (it routes by its `#` fragment).
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `GET /console/assets/app.js`.
pub async fn script() -> Response {
    page("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console/assets/app.css`.
pub async fn style() -> Response {
    page("text/css; charset=utf-8", STYLE)
}

/// Whether a request is one a session cookie may authenticate and that changes state.
fn is_cookie_change(method: &Method, path: &str) -> bool {
    let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    changes && (path.starts_with("/v1/") || path == "/logout")
}

/// The `403 csrf` refusal of a state-changing request that a session cookie would
/// authenticate (no `Authorization`, a session cookie) unless its `Origin` is Leash's own: a
/// page of another site cannot make the browser act with the human's session. Run for every
/// request by [`crate::listener::front_door`].
pub fn csrf_refusal(state: &AppState, request: &Request) -> Option<Response> {
    let refused = is_cookie_change(request.method(), request.uri().path())
        && !request.headers().contains_key(header::AUTHORIZATION)
        && crate::oidc::has_session_cookie(state, request.headers())
        && !same_origin(state, request.headers());
    refused.then(|| {
        ApiError::Csrf(
            "a change made with a session cookie must come from Leash's own pages (Origin)".into(),
        )
        .into_response()
    })
}

fn same_origin(state: &AppState, headers: &HeaderMap) -> bool {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (Some(origin), None) => origin.as_bytes() == state.origin.as_bytes(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_to_the_api_and_logout_are_guarded() {
        assert!(is_cookie_change(
            &Method::POST,
            "/v1/approvals/apr_1/approve"
        ));
        assert!(is_cookie_change(&Method::DELETE, "/v1/vault/mail"));
        assert!(is_cookie_change(&Method::PUT, "/v1/vault/mail"));
        assert!(is_cookie_change(&Method::POST, "/logout"));
        assert!(!is_cookie_change(&Method::GET, "/v1/approvals"));
        assert!(!is_cookie_change(&Method::HEAD, "/v1/me"));
        // The gateway never reads the session, so the cookie there is inert anyway.
        assert!(!is_cookie_change(&Method::POST, "/gw/mail/send"));
    }
}
