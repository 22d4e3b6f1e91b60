//! What the forward proxy answers a browser when it refuses: `407` with the `Basic` challenge
//! for a missing or dead credential (so the browser answers with the one it was configured
//! with), and otherwise a short HTML page saying why, with the status and `Leash-Decision` the
//! gateway would give. Every refusal is audited as the gateway's are (`gateway::refuse`).

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::audit::Trail;
use crate::error::ApiError;
use crate::state::AppState;

/// The audit kind of the proxy's decisions: the gateway's, with `via = "proxy"`.
pub(crate) const EVENT: &str = "gateway.request";

/// The challenge of a `407`.
const CHALLENGE: &str = "Basic realm=\"leash\"";

/// Records `error` and answers it as the browser should see it.
pub(crate) async fn refuse(
    state: &AppState,
    trail: &Trail,
    request_id: &str,
    source: Option<std::net::IpAddr>,
    error: ApiError,
) -> Response {
    let (status, _) = error.status_and_code();
    let mut message = error.to_string();
    let mut credential_refused = matches!(error, ApiError::InvalidToken(_));
    let answered = crate::gateway::refuse(state, trail, EVENT, request_id, source, error).await;
    if answered.status() != status {
        // Not recorded one by one: over the rate of unidentified refusals from this address.
        message = "Too many refused requests from this address; try again shortly.".into();
        credential_refused = false;
    }
    let (status, title) = if credential_refused {
        (
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "Leash needs a live proxy credential",
        )
    } else {
        (answered.status(), "Leash refused this request")
    };
    let mut page = html(status, title, &message);
    if credential_refused {
        page.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        );
    }
    for name in ["leash-decision", "retry-after"] {
        if let Some(value) = answered.headers().get(name) {
            page.headers_mut().insert(name, value.clone());
        }
    }
    page
}

/// A `407` for a request that presented no credential at all: nothing to audit (a browser
/// sends its first request without one, and answers the challenge).
pub(crate) fn challenge() -> Response {
    let mut page = html(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "Leash needs a proxy credential",
        "Send Proxy-Authorization: Basic base64(\"leash:\" + the proxy credential).",
    );
    page.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    page.headers_mut()
        .insert("leash-decision", HeaderValue::from_static("invalid_token"));
    page
}

/// The `403` a request held for approval ends with when the human denied it or did not
/// decide in time.
pub(crate) fn not_approved(approval_id: &str, denied: bool) -> Response {
    let (title, why) = if denied {
        (
            "The request was denied",
            format!("The human denied this request (approval {approval_id}). Nothing was sent."),
        )
    } else {
        (
            "No decision in time",
            format!(
                "Nobody approved this request (approval {approval_id}) in time, so nothing was \
                 sent. Sending it again asks again."
            ),
        )
    };
    let mut page = html(StatusCode::FORBIDDEN, title, &why);
    page.headers_mut().insert(
        "leash-decision",
        HeaderValue::from_static("approval_required"),
    );
    page
}

/// A short page: `title` and `message`, HTML-escaped, never cached or framed.
pub(crate) fn html(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{message}</p><p><small>Leash</small></p></body></html>\n",
        title = escape(title),
        message = escape(message),
    );
    let mut page = Response::new(Body::from(body));
    *page.status_mut() = status;
    let headers = page.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    page
}

/// `text` safe inside HTML text and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_escapes_what_it_quotes() {
        let page = html(
            StatusCode::FORBIDDEN,
            "t",
            "no route matches GET /<script>alert(\"x\")</script>&'",
        );
        assert_eq!(page.status(), StatusCode::FORBIDDEN);
        let body = futures_body(page);
        assert!(!body.contains("<script>"), "{body}");
        assert!(body.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
    }

    fn futures_body(page: Response) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = runtime
            .block_on(axum::body::to_bytes(page.into_body(), 1 << 16))
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}
