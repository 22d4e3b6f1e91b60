//! Each request inside a proxy tunnel (API §16), through the gateway's own steps: the holder
//! checked live again, the request's `Host` checked against the tunnel's, then steps 4–8 as at
//! the gateway (`gateway::decide_for`, `request_body`, `Decided::commit`,
//! `gateway::forward_committed`). What differs is only what a browser needs: a request that
//! needs approval is held open while the human decides, and cookies go through the grant's jar
//! ([`super::jar`]) instead of the browser.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::uri::Authority;
use axum::http::{HeaderName, HeaderValue, Method, Version, header};
use axum::response::Response;
use hyper::body::Body as _;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use leash_core::secret::random_id;
use leash_core::token::AccessClaims;
use leash_store::{Approval, ApprovalStatus};
use url::Url;

use super::front::{Proxy, VIA, holder_of, port_of};
use super::{jar, page, socket};
use crate::audit::Trail;
use crate::config::Upstream;
use crate::error::{ApiError, ApiResult};
use crate::gateway::{
    ApprovalState, Asked, BoundHeaders, Decided, Forwarded, ProxyForward, SetCookies, Target,
    UpstreamSocket, decide_for,
};
use crate::listener::StallTimed;
use crate::metrics::{Counted, Decision, Surface};
use crate::overrides::{form_body, refuse_method_field};

/// How often a held request looks whether its approval was decided.
const APPROVAL_POLL: Duration = Duration::from_millis(250);

/// A tunnel (or a plain `http://` request): who holds it and the one host it reaches.
#[derive(Clone)]
pub(crate) struct Tunnel {
    pub(crate) proxy: Arc<Proxy>,
    /// The host the `CONNECT` named, lower case.
    pub(crate) host: Arc<str>,
    /// TLS (`CONNECT`) or plain `http://`.
    pub(crate) secure: bool,
    pub(crate) claims: Arc<AccessClaims>,
    pub(crate) source: Option<std::net::IpAddr>,
}

/// Terminates the browser's TLS in the tunnel and serves its requests, HTTP/1.1 or HTTP/2 as
/// ALPN chose. A handshake that does not finish within `header_read_timeout` is dropped.
pub(crate) async fn serve_tls(tunnel: Tunnel, upgraded: Upgraded, tls: Arc<rustls::ServerConfig>) {
    let limits = tunnel.proxy.state.config.limits.clone();
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(TokioIo::new(upgraded));
    let stream = match tokio::time::timeout(limits.header_read_timeout, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, host = %tunnel.host, "TLS handshake in a tunnel failed");
            return;
        }
        Err(_) => {
            tracing::debug!(host = %tunnel.host, "TLS handshake in a tunnel timed out");
            return;
        }
    };
    let stall = limits.header_read_timeout;
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let tunnel = tunnel.clone();
            async move {
                let request = request.map(|body| Body::new(StallTimed::new(body, stall)));
                Ok::<_, Infallible>(handle(&tunnel, request).await)
            }
        });
    // The protocol ALPN chose, not guessed from the first bytes: a tunnel that sends nothing
    // then meets HTTP/1's head timeout (or HTTP/2's keep-alive) instead of waiting for ever.
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let builder = crate::listener::connection_builder(&limits);
    let builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "a tunnel's connection ended with an error");
    }
}

/// One request in a tunnel.
pub(crate) async fn handle(tunnel: &Tunnel, request: Request) -> Response {
    let state = &tunnel.proxy.state;
    let request_id = random_id("req_");
    let mut counted = Counted::new(&state.metrics.requests, Surface::Proxy);
    counted.trail.known.via = Some(VIA.into());
    match proxied(tunnel, request, &request_id, &mut counted.trail).await {
        Ok(response) => response,
        Err(Stopped::Refused(e)) => {
            counted.refused_by(&e);
            page::refuse(state, &counted.trail, &request_id, tunnel.source, e).await
        }
        Err(Stopped::NotApproved { approval, denied }) => {
            counted.refused(Decision::Deny);
            page::not_approved(&approval, denied)
        }
    }
}

/// Why a request in a tunnel was not forwarded.
enum Stopped {
    /// A step refused it (to be audited and answered).
    Refused(ApiError),
    /// Its approval was denied or not given in time (its asking is audited already).
    NotApproved { approval: String, denied: bool },
}

impl From<ApiError> for Stopped {
    fn from(e: ApiError) -> Self {
        Self::Refused(e)
    }
}

async fn proxied(
    tunnel: &Tunnel,
    request: Request,
    request_id: &str,
    trail: &mut Trail,
) -> Result<Response, Stopped> {
    let state = &tunnel.proxy.state;
    let (mut parts, body) = request.into_parts();
    trail.known.method = Some(parts.method.as_str().to_owned());
    let upstream = state
        .config
        .upstream_by_host(&tunnel.host)
        .ok_or_else(|| ApiError::Forbidden("the tunnel's host is no longer served".into()))?;
    // An approval is attached by the proxy itself, once the human decided: never by the page.
    parts.headers.remove("leash-approval");
    let decided = decide(tunnel, upstream, &parts, trail).await?;
    let websocket = is_websocket_handshake(&parts);
    if websocket && !decided.websocket {
        return Err(ApiError::Forbidden(format!(
            "WebSocket refused: the route of {} {} does not allow one (websocket = true)",
            parts.method, decided.path
        ))
        .into());
    }
    let (decided, body) = if matches!(decided.approval, ApprovalState::Needed { .. }) {
        let (bytes, approval) =
            held_for_approval(tunnel, &decided, &parts, body, trail, request_id).await?;
        // Decided again, as the gateway decides the request retried with its approval: the
        // policy now sees it attached, and the commit spends it.
        let approval = HeaderValue::from_str(&approval)
            .map_err(|_| ApiError::InvalidRequest("the approval's id is not a header".into()))?;
        parts
            .headers
            .insert(HeaderName::from_static("leash-approval"), approval);
        *trail = Trail::default();
        trail.known.via = Some(VIA.into());
        let decided = decide(tunnel, upstream, &parts, trail).await?;
        let body = crate::gateway::request_body(
            state,
            &decided,
            &parts,
            Body::from(bytes),
            trail,
            request_id,
        )
        .await?;
        (decided, body)
    } else {
        let body =
            crate::gateway::request_body(state, &decided, &parts, body, trail, request_id).await?;
        (decided, body)
    };
    // The grant's cookies, read before the commit: a jar that cannot be read refuses the
    // request before it is recorded as forwarded.
    let grant_id = &tunnel.claims.grant_id;
    let url = upstream_url(upstream, &decided, parts.uri.query())?;
    let jar = jar::load(state, grant_id, &upstream.name).await?;
    // A socket is counted with the tunnels, and refused before it is recorded as opened.
    let opening =
        if websocket {
            let browser = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
                ApiError::InvalidRequest("this connection cannot be upgraded".into())
            })?;
            let permit = tunnel.proxy.tunnel_permit().ok_or_else(|| {
                ApiError::Unavailable("too many tunnels are open; try again".into())
            })?;
            Some((browser, permit))
        } else {
            None
        };
    // Step 7.
    let mut injected = decided
        .commit(state, trail, page::EVENT, request_id)
        .await?;
    // Step 8, with the grant's cookies.
    let vaulted = injected
        .iter()
        .position(|(name, _)| name == header::COOKIE)
        .map(|at| injected.remove(at).1);
    let vaulted = vaulted.as_ref().and_then(|v| v.to_str().ok());
    if let Some(cookie) = jar::cookie_header(vaulted, &jar, &url) {
        let value = HeaderValue::from_str(&cookie)
            .map_err(|_| ApiError::BadGateway("a stored cookie cannot be sent".into()))?;
        injected.push((header::COOKIE, value));
    }
    // An answer must echo none of it: not the vaulted credential, nor any cookie of the jar
    // (a session the upstream set beside a vaulted one is as good as the human's own).
    let guarded: Vec<Vec<u8>> = injected
        .iter()
        .filter(|(name, _)| !name.as_str().starts_with("leash-"))
        .map(|(_, value)| value.as_bytes().to_vec())
        .collect();
    let sent = Forwarded {
        path: &decided.path,
        query: parts.uri.query(),
        method: &parts.method,
        headers: &parts.headers,
        body,
        trail,
        answer_idle: None,
        injected,
        proxied: Some(ProxyForward {
            guarded: guarded.iter().map(Vec::as_slice).collect(),
            websocket,
        }),
    };
    let mut response = crate::gateway::forward_committed(state, &decided, sent, request_id).await?;
    if let (Some((browser, permit)), Some(upstream_socket)) = (
        opening,
        response.extensions_mut().remove::<UpstreamSocket>(),
    ) {
        tokio::spawn(socket::relay(socket::Socket {
            tunnel: tunnel.clone(),
            browser,
            upstream: upstream_socket,
            permit,
            trail: trail.clone(),
            request_id: request_id.to_owned(),
        }));
    }
    if let Some(SetCookies(set_cookies)) = response.extensions_mut().remove::<SetCookies>() {
        let _one_at_a_time = tunnel.proxy.jar_updates.lock().await;
        if let Err(e) =
            jar::store_set_cookies(state, grant_id, &upstream.name, &url, &set_cookies).await
        {
            tracing::warn!(error = %e, grant = %grant_id, "the upstream's cookies were not kept");
        }
    }
    rewrite_location(tunnel, upstream, &mut response);
    Ok(response)
}

/// Steps 1–3, the credential the tunnel was opened with checked live now, then the request's
/// own checks ([`check_request`]), then the gateway's steps 4–6.
async fn decide<'s>(
    tunnel: &'s Tunnel,
    upstream: &'s Upstream,
    parts: &Parts,
    trail: &mut Trail,
) -> ApiResult<Decided<'s>> {
    let state = &tunnel.proxy.state;
    let holder = holder_of(state, Arc::clone(&tunnel.claims), trail).await?;
    check_request(tunnel, parts)?;
    let target = Target::checked(
        &parts.method,
        &upstream.name,
        parts.uri.path(),
        parts.uri.query(),
        trail,
    )?;
    decide_for(state, holder.principal(), &target, &parts.headers, trail).await
}

/// Whether `parts` is a browser's WebSocket handshake (RFC 6455 §4.1) over HTTP/1.1: `GET`
/// without a body, `Upgrade: websocket` and nothing else, `Connection: upgrade`, version 13
/// and one well-formed key. Whether its route allows one is for the route to say.
fn is_websocket_handshake(parts: &Parts) -> bool {
    let one = |name: &str| {
        let mut values = parts.headers.get_all(name).iter();
        values.next().filter(|_| values.next().is_none())
    };
    let bodiless = || {
        !parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .all(|v| v.as_bytes() == b"0")
    };
    // `Upgrade` first: what nearly every request lacks.
    one("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && parts.version == Version::HTTP_11
        && parts.method == Method::GET
        && bodiless()
        && crate::gateway::connection_listed(&parts.headers)
            .iter()
            .any(|token| token == "upgrade")
        && one("sec-websocket-version").is_some_and(|v| v.as_bytes() == b"13")
        && one("sec-websocket-key").is_some_and(|key| is_websocket_key(key.as_bytes()))
}

/// A `Sec-WebSocket-Key`: 16 bytes, base64-encoded (RFC 6455 §4.1).
fn is_websocket_key(key: &[u8]) -> bool {
    use base64::Engine as _;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|nonce| nonce.len() == 16)
}

/// Refuses what no request in a tunnel may do: name another host than the tunnel's (`Host`,
/// HTTP/2's `:authority`, an absolute-form target), tunnel again (`CONNECT`), echo itself
/// (`TRACE`), or upgrade the connection to anything but a WebSocket (which its route must
/// then allow).
fn check_request(tunnel: &Tunnel, parts: &Parts) -> ApiResult<()> {
    if parts.method == Method::CONNECT || parts.method == Method::TRACE {
        return Err(ApiError::InvalidRequest(format!(
            "{} is not accepted in a tunnel",
            parts.method
        )));
    }
    if parts.headers.contains_key(header::UPGRADE) && !is_websocket_handshake(parts) {
        return Err(ApiError::Forbidden(
            "connection upgrades are refused, but for a WebSocket handshake on a route that allows one".into(),
        ));
    }
    let port = if tunnel.secure { 443 } else { 80 };
    let names_tunnel_host = |authority: &str| {
        authority.parse::<Authority>().is_ok_and(|a| {
            !a.as_str().contains('@')
                && a.host().eq_ignore_ascii_case(&tunnel.host)
                && port_of(&a).is_some_and(|p| p.is_none_or(|p| p == port))
        })
    };
    let other_host = || {
        ApiError::Forbidden(format!(
            "a request in the tunnel to {} must name that host",
            tunnel.host
        ))
    };
    if parts.version == Version::HTTP_2 {
        crate::gateway::http2_target(&parts.uri, &parts.headers)?;
        if !parts
            .uri
            .authority()
            .is_some_and(|a| names_tunnel_host(a.as_str()))
        {
            return Err(other_host());
        }
    } else if let Some(authority) = parts.uri.authority()
        && !names_tunnel_host(authority.as_str())
    {
        return Err(other_host());
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ApiError::InvalidRequest("more than one Host header".into()));
    }
    match host {
        Some(host) if !host.to_str().is_ok_and(names_tunnel_host) => Err(other_host()),
        None if parts.version != Version::HTTP_2 => Err(ApiError::InvalidRequest(
            "the request has no Host header".into(),
        )),
        _ => Ok(()),
    }
}

/// Step 6 for a browser: asks for the approval as the gateway does (the body bound to it),
/// then holds the request open while the human decides, up to `proxy.approval_wait`. Returns
/// the body and the approval's id, once approved.
async fn held_for_approval(
    tunnel: &Tunnel,
    decided: &Decided<'_>,
    parts: &Parts,
    body: Body,
    trail: &mut Trail,
    request_id: &str,
) -> Result<(axum::body::Bytes, String), Stopped> {
    let state = &tunnel.proxy.state;
    let ApprovalState::Needed { policies } = &decided.approval else {
        return Err(ApiError::InvalidRequest("no approval is needed".into()).into());
    };
    let form = if body.is_end_stream() {
        crate::overrides::FormBody::Other
    } else {
        form_body(&parts.method, &parts.headers)?
    };
    let (bytes, digest) = crate::gateway::hash_body(body).await?;
    refuse_method_field(form, &bytes)?;
    let asked = Asked {
        query: parts.uri.query(),
        headers: BoundHeaders::of(&parts.headers),
        body: &bytes,
        body_sha256: digest,
        policies,
    };
    let refusal =
        crate::gateway::ask_approval(state, decided, asked, trail, page::EVENT, request_id).await;
    let ApiError::ApprovalRequired {
        approval: Some(id), ..
    } = &refusal
    else {
        return Err(refusal.into());
    };
    let id = id.clone();
    let wait = state
        .config
        .proxy
        .as_ref()
        .map_or(Duration::from_secs(120), |p| p.approval_wait);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let approval: Option<Approval> = state.store.approval(&id).await.map_err(ApiError::from)?;
        let status = approval.map(|a| a.status_at(state.clock.now()));
        match status {
            Some(ApprovalStatus::Approved) => return Ok((bytes, id)),
            Some(ApprovalStatus::Denied) => {
                return Err(Stopped::NotApproved {
                    approval: id,
                    denied: true,
                });
            }
            Some(ApprovalStatus::Pending) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(APPROVAL_POLL).await;
            }
            _ => {
                return Err(Stopped::NotApproved {
                    approval: id,
                    denied: false,
                });
            }
        }
    }
}

/// The URL Leash requests of the upstream: its configured one, with the request's path and
/// query (what the grant's cookies are matched against).
fn upstream_url(upstream: &Upstream, decided: &Decided<'_>, query: Option<&str>) -> ApiResult<Url> {
    let mut url = format!(
        "{}{}",
        upstream.url.as_str().trim_end_matches('/'),
        decided.path
    );
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Url::parse(&url)
        .map_err(|_| ApiError::InvalidRequest("the request target cannot be forwarded".into()))
}

/// A redirect to the upstream's own address (which the browser cannot reach: only the
/// configured hosts are tunnelled) is made to point at the tunnel's host.
fn rewrite_location(tunnel: &Tunnel, upstream: &Upstream, response: &mut Response) {
    let Some(location) = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let origin = upstream.url.origin().ascii_serialization();
    let Some(rest) = location.strip_prefix(&origin) else {
        return;
    };
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return;
    }
    let scheme = if tunnel.secure { "https" } else { "http" };
    if let Ok(value) = HeaderValue::from_str(&format!("{scheme}://{}{rest}", tunnel.host)) {
        response.headers_mut().insert(header::LOCATION, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_key_is_16_bytes_in_base64() {
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            &b""[..],
            b"YWJj",
            b"?not*base64 at all, no!",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZSE=",
            b"dGhlIHNhbXBsZSBub25jZQ==\n",
        ] {
            assert!(!is_websocket_key(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
