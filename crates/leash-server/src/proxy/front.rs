//! The forward proxy's own listener (API §16): what a browser configured with Leash as its
//! proxy sends. Every request presents the proxy credential (`Proxy-Authorization`), checked
//! like an access token (its grant live, itself not revoked); a `CONNECT` to a host of an
//! upstream in the grant opens a tunnel in which Leash terminates TLS with its leaf certificate
//! for that host (and only when the TLS SNI names it), and a plain `http://` request is
//! handled as one inside a tunnel. Any other destination is refused with `403`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use leash_core::audit::Mode;
use leash_core::grant::Grant;
use leash_core::secret::random_id;
use leash_core::token::{AccessClaims, Confirmation};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use super::ca::Leaf;
use super::credential::{CredentialError, ProxyClaims};
use super::page;
use super::tunnel::{self, Tunnel};
use crate::audit::Trail;
use crate::error::{ApiError, ApiResult};
use crate::gateway::Principal;
use crate::state::AppState;

/// What `via` says of a request that came through the proxy.
pub(crate) const VIA: &str = "proxy";

/// The port a browser's `CONNECT` names for `https://`; the proxy opens tunnels to no other.
const HTTPS_PORT: u16 = 443;
/// The port of a plain `http://` URL.
const HTTP_PORT: u16 = 80;

/// The proxy: the server's state, the TLS configuration per host, and the tunnels open.
pub struct Proxy {
    pub(crate) state: Arc<AppState>,
    tls: Mutex<HashMap<String, HostTls>>,
    /// Tunnels outlive the connection that opened them (hyper hands the socket over), so they
    /// are counted here, within `[limits] max_connections`.
    tunnels: Arc<tokio::sync::Semaphore>,
    /// One update of a cookie jar at a time on this node: two answers setting cookies for one
    /// grant must not undo each other.
    pub(crate) jar_updates: tokio::sync::Mutex<()>,
}

impl Proxy {
    fn new(state: Arc<AppState>) -> Self {
        let tunnels = Arc::new(tokio::sync::Semaphore::new(
            state.config.limits.max_connections,
        ));
        Self {
            state,
            tls: Mutex::new(HashMap::new()),
            tunnels,
            jar_updates: tokio::sync::Mutex::new(()),
        }
    }

    /// A place among the tunnels (a WebSocket counts as one), if one is free.
    pub(crate) fn tunnel_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.tunnels).try_acquire_owned().ok()
    }

    /// The TLS configuration presenting the leaf for `host`, made again when the leaf is.
    fn tls_for(&self, host: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let ca = self
            .state
            .proxy_ca
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the proxy CA is not loaded"))?;
        let leaf = ca
            .leaf(host, self.state.clock.now())?
            .ok_or_else(|| anyhow::anyhow!("{host} is not a proxy host"))?;
        let mut configs = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(made) = configs.get(host)
            && Arc::ptr_eq(&made.leaf, &leaf)
        {
            return Ok(Arc::clone(&made.config));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = leaf
            .chain
            .iter()
            .map(|der| CertificateDer::from(der.clone()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key.clone()));
        let certified = CertifiedKey::from_der(chain, key, &provider)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneHost {
                host: host.to_owned(),
                key: Arc::new(certified),
            }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let made = HostTls {
            leaf,
            config: Arc::clone(&config),
        };
        configs.insert(host.to_owned(), made);
        Ok(config)
    }
}

/// A host's TLS configuration, and the leaf it was made with (made again with the next leaf).
struct HostTls {
    leaf: Arc<Leaf>,
    config: Arc<rustls::ServerConfig>,
}

/// Presents the leaf only to a client whose SNI names the tunnel's host: a browser that
/// tunnels to one host and asks the TLS handshake for another gets no certificate at all.
#[derive(Debug)]
struct OneHost {
    host: String,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for OneHost {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .is_some_and(|name| name.eq_ignore_ascii_case(&self.host))
            .then(|| Arc::clone(&self.key))
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let limits = state.config.limits.clone();
    let router = Router::new()
        .fallback(front)
        .with_state(Arc::new(Proxy::new(state)));
    crate::listener::serve(listener, router, &limits, shutdown).await;
}

/// A request to the proxy itself: `CONNECT host:443`, or an absolute-form `http://` request.
async fn front(State(proxy): State<Arc<Proxy>>, mut request: Request) -> Response {
    let state = &proxy.state;
    let source = crate::gateway::source_of(state, &request);
    let request_id = random_id("req_");
    let mut trail = Trail::default();
    trail.known.via = Some(VIA.into());
    trail.known.method = Some(request.method().as_str().to_owned());
    let Some(credential) = presented_credential(request.headers()) else {
        return page::challenge();
    };
    let holder = match holder(state, &credential, &mut trail).await {
        Ok(holder) => holder,
        Err(e) => return page::refuse(state, &trail, &request_id, source, e).await,
    };
    let destination = match destination(state, &request, &holder.grant, &mut trail) {
        Ok(destination) => destination,
        Err(e) => return page::refuse(state, &trail, &request_id, source, e).await,
    };
    let tunnel = Tunnel {
        proxy: Arc::clone(&proxy),
        host: destination.host.into(),
        secure: destination.secure,
        claims: holder.claims,
        source,
    };
    if request.method() != Method::CONNECT {
        return tunnel::handle(&tunnel, request).await;
    }
    let Some(permit) = proxy.tunnel_permit() else {
        let busy = ApiError::Unavailable("too many tunnels are open; try again".into());
        return page::refuse(state, &trail, &request_id, source, busy).await;
    };
    let tls = match proxy.tls_for(&tunnel.host) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, host = %tunnel.host, "no leaf certificate for a proxy host");
            let failed = ApiError::Unavailable("the proxy has no certificate for this host".into());
            return page::refuse(state, &trail, &request_id, source, failed).await;
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(upgraded) => tunnel::serve_tls(tunnel, upgraded, tls).await,
            Err(e) => tracing::debug!(error = %e, "a CONNECT was never upgraded"),
        }
    });
    StatusCode::OK.into_response()
}

/// The credential of `Proxy-Authorization: Basic base64("leash:" + credential)`, if the request
/// carries exactly one such header.
fn presented_credential(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(header::PROXY_AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, encoded) = value.to_str().ok()?.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, credential) = decoded.split_once(':')?;
    (user == "leash").then(|| credential.to_owned())
}

/// Who holds a tunnel: the agent, for the human, under the grant its credential names.
pub(crate) struct Holder {
    pub(crate) claims: Arc<AccessClaims>,
    pub(crate) grant: Arc<Grant>,
}

/// Checks a credential: its MAC and expiry, then, as for an access token, that its grant is
/// live and it was not revoked (`extract::check_token_live`, the same 1 s on every node).
async fn holder(state: &AppState, credential: &str, trail: &mut Trail) -> ApiResult<Holder> {
    let now = state.clock.now();
    let claims = state
        .proxy_credentials
        .verify(credential, &state.issuer, now)
        .map_err(|e| match e {
            CredentialError::Expired => {
                ApiError::InvalidToken("the proxy credential has expired".into())
            }
            _ => ApiError::InvalidToken("not a valid proxy credential".into()),
        })?;
    let claims = Arc::new(as_access_claims(claims));
    holder_of(state, claims, trail).await
}

/// The holder of `claims`, checked live now: on every request, since a tunnel may outlive its
/// grant or its credential.
pub(crate) async fn holder_of(
    state: &AppState,
    claims: Arc<AccessClaims>,
    trail: &mut Trail,
) -> ApiResult<Holder> {
    trail.known.mode = Mode::Delegated;
    trail.known.subject = Some(claims.sub.clone());
    trail.known.actor = Some(claims.client_id.clone());
    trail.known.grant_id = Some(claims.grant_id.clone());
    let now = state.clock.now();
    if claims.exp <= now {
        return Err(ApiError::InvalidToken(
            "the proxy credential has expired".into(),
        ));
    }
    let grant = crate::extract::check_token_live(state, &claims, now).await?;
    trail.grant(&grant);
    Ok(Holder { claims, grant })
}

impl Holder {
    /// The principal of the gateway's steps 4–8: the agent, delegated, without a proof (a
    /// browser signs none; the credential stands for steps 1–3).
    pub(crate) fn principal(&self) -> Principal {
        Principal {
            mode: Mode::Delegated,
            proof_once: None,
            actor: self.claims.client_id.clone(),
            subject: self.claims.sub.clone(),
            grant: Some(self.grant.clone()),
            token: Some(Arc::clone(&self.claims)),
        }
    }
}

/// A proxy credential's claims in the shape the gateway's steps read (scope, `jti` for
/// revocation, expiry for single use); it binds no key, so `cnf` is empty and never read.
fn as_access_claims(claims: ProxyClaims) -> AccessClaims {
    AccessClaims {
        aud: claims.iss.clone(),
        iss: claims.iss,
        sub: claims.sub,
        iat: claims.iat,
        exp: claims.exp,
        jti: claims.jti,
        client_id: claims.client_id,
        act: claims.act,
        scope: claims.scope,
        cnf: Confirmation { jkt: String::new() },
        grant_id: claims.grant_id,
        purpose: String::new(),
    }
}

/// Where a request to the proxy goes.
struct Destination {
    /// The host, lower case: one of an upstream's `hosts`.
    host: String,
    /// Through a TLS tunnel (`CONNECT`), or plain `http://`.
    secure: bool,
}

/// The host a `CONNECT` (port 443) or an absolute-form `http://` request (port 80) names,
/// which must be one of the `hosts` of an upstream in the holder's grant.
fn destination(
    state: &AppState,
    request: &Request,
    grant: &Grant,
    trail: &mut Trail,
) -> ApiResult<Destination> {
    let uri = request.uri();
    let secure = request.method() == Method::CONNECT;
    if !secure && uri.scheme_str() != Some("http") {
        return Err(ApiError::InvalidRequest(
            "this is a forward proxy: send CONNECT host:443, or an absolute http:// URL".into(),
        ));
    }
    let authority: &Authority = uri
        .authority()
        .ok_or_else(|| ApiError::InvalidRequest("the request names no host".into()))?;
    if authority.as_str().contains('@') {
        return Err(ApiError::InvalidRequest(
            "the request's host must not carry userinfo".into(),
        ));
    }
    if secure && (uri.scheme().is_some() || uri.path_and_query().is_some()) {
        return Err(ApiError::InvalidRequest(
            "CONNECT takes host:port, nothing else".into(),
        ));
    }
    let host = authority.host().to_ascii_lowercase();
    let wanted = if secure { HTTPS_PORT } else { HTTP_PORT };
    let port = port_of(authority)
        .ok_or_else(|| ApiError::InvalidRequest("the request's port is malformed".into()))?
        .unwrap_or(wanted);
    let upstream = state.config.upstream_by_host(&host);
    if let Some(upstream) = upstream {
        trail.known.upstream = Some(upstream.name.clone());
    }
    let Some(upstream) = upstream.filter(|u| grant.upstreams.contains(&u.name)) else {
        return Err(ApiError::Forbidden(format!(
            "{host} is not a host of an upstream this task was granted"
        )));
    };
    if port != wanted {
        return Err(ApiError::Forbidden(format!(
            "{host}:{port}: the proxy reaches {} at port {wanted} only",
            upstream.name
        )));
    }
    Ok(Destination { host, secure })
}

/// The port an authority names: `Some(None)` if it names none, `None` if what follows the host
/// is not `:` and 1–5 digits of a port (`:443x`, `:+443`, `:`, 65979 are not; `http`'s parser
/// reads them as no port at all).
pub(crate) fn port_of(authority: &Authority) -> Option<Option<u16>> {
    let text = authority.as_str();
    let after_host = text.get(authority.host().len()..)?;
    if after_host.is_empty() {
        return Some(None);
    }
    let digits = after_host.strip_prefix(':')?;
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_digits_of_a_port_or_nothing() {
        let port = |text: &str| port_of(&text.parse::<Authority>().unwrap());
        assert_eq!(port("shop.test"), Some(None));
        assert_eq!(port("shop.test:443"), Some(Some(443)));
        assert_eq!(port("[::1]:8443"), Some(Some(8443)));
        for bad in [
            "shop.test:",
            "shop.test:65979",
            "shop.test:443x",
            "shop.test:+443",
        ] {
            if let Ok(authority) = bad.parse::<Authority>() {
                assert_eq!(port_of(&authority), None, "{bad}");
            }
        }
    }

    fn basic(text: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(text)
        );
        headers.insert(header::PROXY_AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_credential_is_read_from_basic_as_leash_only() {
        assert_eq!(
            presented_credential(&basic("leash:lpx_a.b")).as_deref(),
            Some("lpx_a.b")
        );
        assert_eq!(presented_credential(&basic("admin:lpx_a.b")), None);
        assert_eq!(presented_credential(&basic("leash")), None);
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::PROXY_AUTHORIZATION,
            "Bearer lpx_a.b".parse().unwrap(),
        );
        assert_eq!(presented_credential(&bearer), None);
        let mut two = basic("leash:lpx_a.b");
        two.append(
            header::PROXY_AUTHORIZATION,
            basic("leash:lpx_c.d")[header::PROXY_AUTHORIZATION].clone(),
        );
        assert_eq!(presented_credential(&two), None);
        assert_eq!(presented_credential(&HeaderMap::new()), None);
    }
}
