//! OAuth connections to upstreams (API §17): a human connects their account at an upstream's
//! OAuth server (`POST /v1/vault/{upstream}/connect` → the server's consent page →
//! `GET /v1/vault/{upstream}/callback`), Leash keeps the access and refresh tokens sealed in
//! the vault and injects a fresh access token into the human's delegated requests.
//!
//! The protocol is the `oauth2` crate's (authorization URL with PKCE, code exchange, refresh,
//! RFC 7009 revocation). What is Leash's:
//! - a connection is bound to whoever started it: its `state` is random, stored only as its
//!   digest and taken once by the callback, which must come with the browser session that
//!   started it (or, when an API key started it, a session of the same human), so nobody can
//!   make another human's browser finish their connection (CSRF) or the reverse;
//! - the callback URL is the upstream's own, and the RFC 9207 `iss` must name the configured
//!   issuer (required when the server says it always sends it): no mix-up between servers;
//! - one refresh at a time per (human, upstream) across the cluster: in a node, the callers
//!   queue on one gate; between nodes, a lease taken by a conditional update of the vault row
//!   (the row lock decides) and a `version` that the refreshed tokens are stored over, so a
//!   rotated refresh token is stored before the old one is forgotten and never used twice;
//! - a refresh the server refuses for good (`invalid_grant`) marks the connection
//!   `reconnect`: the next requests get `502 upstream_credential_expired` at once, with no
//!   call to the server (no retry storm); any other failure sets a back-off that the whole
//!   cluster honours (requests that cannot wait fail at once);
//! - the refresh token never leaves Leash: not in an answer, a log line or an audit event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use leash_core::audit::{AuditEvent, Mode};
use leash_core::secret::SecretDigest;
use leash_store::{OAuthConnect, VaultEntry};
use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenResponse, BasicTokenType};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, RevocationUrl, Scope, TokenResponse as _, TokenUrl,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use utoipa::ToSchema;

use crate::config::{ClientAuth, UpstreamOAuth};
use crate::error::{ApiError, ApiResult};
use crate::extract::caller_from_headers;
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// How long a started connection may take to come back.
const CONNECT_TTL: i64 = 600;
/// How long a node holds the refresh of a connection: well past [`REFRESH_BUDGET`], so that no
/// other node takes over a refresh still under way (and presents the same refresh token).
const REFRESH_LEASE: i64 = 60;
/// The most a refresh may take, discovery included; past it, it is given up (a passing
/// failure).
const REFRESH_BUDGET: Duration = Duration::from_secs(25);
/// The most one revocation request may take (they run after the human's answer).
const REVOKE_BUDGET: Duration = Duration::from_secs(5);
/// The largest answer read from an upstream's OAuth server (a token response, a discovery
/// document): anything bigger is refused, not stored.
const ANSWER_CAP: usize = 64 * 1024;
/// The longest token Leash keeps and sends.
const TOKEN_CAP: usize = 8 * 1024;
/// The back-off after a refresh that failed for a passing reason.
const RETRY_AFTER: i64 = 10;
/// How long a request waits for another node's refresh before it gives up.
const REFRESH_WAIT: Duration = Duration::from_secs(12);
/// How often a waiting request looks whether another node's refresh is stored.
const REFRESH_POLL: Duration = Duration::from_millis(100);
/// How long discovery is trusted before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

type OAuthClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointMaybeSet, EndpointSet>;

/// The endpoints of one upstream's OAuth server, configured or discovered.
#[derive(Debug, Clone)]
struct Endpoints {
    authorization: AuthUrl,
    token: TokenUrl,
    revocation: Option<RevocationUrl>,
    /// RFC 9207: the server names itself (`iss`) in every authorization response.
    names_itself: bool,
    at: Instant,
}

/// What an RFC 8414 (or OpenID) discovery document says that Leash uses.
#[derive(Debug, Deserialize)]
struct ServerMetadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    revocation_endpoint: Option<String>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

/// The tokens of a connection, sealed in its vault entry.
#[derive(Serialize, Deserialize)]
struct Tokens {
    access_token: String,
    refresh_token: Option<String>,
    /// When the access token expires (Unix time), if the server said.
    expires_at: Option<i64>,
    obtained_at: i64,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// RFC 6750 §2.1 `b64token`: what an access token must be to go out as `Bearer <token>`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && token.len() <= TOKEN_CAP
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

impl Tokens {
    /// The tokens of a server's answer, if Leash can keep and send them: an access token that
    /// is a `b64token`, a refresh token of visible ASCII, each at most [`TOKEN_CAP`].
    fn from_response(
        answer: &BasicTokenResponse,
        now: i64,
        kept_refresh: Option<String>,
    ) -> Result<Self, &'static str> {
        if *answer.token_type() != BasicTokenType::Bearer {
            return Err("a token type other than Bearer");
        }
        let access_token = answer.access_token().secret();
        if !is_b64token(access_token) {
            return Err("an access token that cannot be sent as a Bearer token");
        }
        let fresh_refresh = answer.refresh_token().map(|t| t.secret().clone());
        if fresh_refresh.as_ref().is_some_and(|t| {
            t.is_empty() || t.len() > TOKEN_CAP || !t.bytes().all(|b| b.is_ascii_graphic())
        }) {
            return Err("a refresh token Leash cannot keep");
        }
        let lifetime = answer
            .expires_in()
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Self {
            access_token: access_token.clone(),
            // Rotation: a new refresh token replaces the old, which the server has forgotten;
            // without one, the old stays good.
            refresh_token: fresh_refresh.or(kept_refresh),
            expires_at: lifetime.map(|l| now.saturating_add(l)),
            obtained_at: now,
        })
    }

    /// When to refresh: a third of the lifetime before expiry, between 1 and 60 seconds.
    fn refresh_at(&self) -> Option<i64> {
        let expires_at = self.expires_at?;
        let margin = (expires_at.saturating_sub(self.obtained_at) / 3).clamp(1, 60);
        Some(expires_at.saturating_sub(margin))
    }

    /// An answer's tokens as they are, only to revoke them.
    fn unchecked(answer: &BasicTokenResponse, now: i64) -> Self {
        Self {
            access_token: answer.access_token().secret().clone(),
            refresh_token: answer.refresh_token().map(|t| t.secret().clone()),
            expires_at: None,
            obtained_at: now,
        }
    }

    fn needs_refresh(&self, now: i64) -> bool {
        self.refresh_at().is_some_and(|at| now >= at)
    }

    /// Whether the access token still has a second to live: it can go out while another
    /// caller refreshes.
    fn usable(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|at| now < at.saturating_sub(1))
    }
}

/// OAuth connections: the HTTP client that talks to the upstreams' OAuth servers, what their
/// discovery said, and the gates that keep one refresh per connection in this node.
pub struct Connections {
    http: Capped,
    discovered: std::sync::Mutex<HashMap<String, Endpoints>>,
    gates: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The server's state, for work that goes on after an answer (a refresh beside a request
    /// whose token is still good, revocations): set once it exists.
    app: std::sync::OnceLock<std::sync::Weak<AppState>>,
}

/// The HTTP client for the OAuth servers, as the `oauth2` crate calls it, reading at most
/// [`ANSWER_CAP`] of an answer (the crate's own reqwest client reads any size).
#[derive(Clone)]
struct Capped(reqwest::Client);

/// An answer's body, refused past [`ANSWER_CAP`].
async fn read_capped(response: &mut reqwest::Response) -> Result<Vec<u8>, String> {
    if response
        .content_length()
        .is_some_and(|n| n > ANSWER_CAP as u64)
    {
        return Err(format!("an answer over {ANSWER_CAP} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len().saturating_add(chunk.len()) > ANSWER_CAP {
            return Err(format!("an answer over {ANSWER_CAP} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl<'c> oauth2::AsyncHttpClient<'c> for Capped {
    type Error = oauth2::HttpClientError<reqwest::Error>;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, Self::Error>> + Send + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request).map_err(Box::new)?;
            let mut response = self.0.execute(request).await.map_err(Box::new)?;
            let mut builder = oauth2::http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = read_capped(&mut response)
                .await
                .map_err(oauth2::HttpClientError::Other)?;
            builder.body(body).map_err(oauth2::HttpClientError::Http)
        })
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").finish_non_exhaustive()
    }
}

fn expired(detail: &str) -> ApiError {
    ApiError::UpstreamCredentialExpired(format!(
        "the human's connection to this upstream cannot be used: {detail}"
    ))
}

fn server_unreachable(detail: String) -> ApiError {
    ApiError::BadGateway(format!("the upstream's OAuth server: {detail}"))
}

/// The vault's sealing context of a connection's tokens.
fn sealing_context(subject: &str, upstream: &str) -> Vec<u8> {
    crate::vault::context(subject, upstream, "oauth", None)
}

impl Connections {
    /// The connections' HTTP client: no redirects followed (SSRF), a 10 s timeout.
    pub fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the OAuth HTTP client: {e}"))?;
        Ok(Self {
            http: Capped(http),
            discovered: std::sync::Mutex::new(HashMap::new()),
            gates: std::sync::Mutex::new(HashMap::new()),
            app: std::sync::OnceLock::new(),
        })
    }

    /// Gives the connections the server's state, once it exists.
    pub fn attach(&self, state: &Arc<AppState>) {
        let _ = self.app.set(Arc::downgrade(state));
    }

    fn app(&self) -> Option<Arc<AppState>> {
        self.app.get().and_then(std::sync::Weak::upgrade)
    }

    /// The endpoints of `upstream`'s server: as configured, or discovered (RFC 8414 first,
    /// then OpenID discovery), whose `issuer` must be the configured one.
    async fn endpoints(&self, upstream: &str, oauth: &UpstreamOAuth) -> ApiResult<Endpoints> {
        if let Some(configured) = &oauth.endpoints {
            return Ok(Endpoints {
                authorization: AuthUrl::from_url(configured.authorization.clone()),
                token: TokenUrl::from_url(configured.token.clone()),
                revocation: configured.revocation.clone().map(RevocationUrl::from_url),
                names_itself: false,
                at: Instant::now(),
            });
        }
        let cached = self
            .discovered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(upstream)
            .cloned();
        if let Some(found) = &cached
            && found.at.elapsed() < DISCOVERY_TTL
        {
            return Ok(found.clone());
        }
        let issuer = oauth
            .issuer
            .as_deref()
            .ok_or_else(|| server_unreachable("no issuer configured".into()))?;
        match self.discover(issuer).await {
            Ok(found) => {
                self.discovered
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(upstream.to_owned(), found.clone());
                Ok(found)
            }
            // A server down for a while does not break working connections: what it said
            // last still holds.
            Err(e) => cached.ok_or(e),
        }
    }

    async fn discover(&self, issuer: &str) -> ApiResult<Endpoints> {
        let parsed = url::Url::parse(issuer)
            .map_err(|e| server_unreachable(format!("invalid issuer: {e}")))?;
        let path = parsed.path().trim_end_matches('/');
        let origin = parsed.origin().ascii_serialization();
        // RFC 8414 §3.1: the well-known part goes before the issuer's path.
        let candidates = [
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            ),
        ];
        let mut last = String::new();
        for candidate in candidates {
            let mut answer = match self.http.0.get(&candidate).send().await {
                Ok(answer) if answer.status() == StatusCode::OK => answer,
                Ok(answer) => {
                    last = format!("{candidate} answered {}", answer.status());
                    continue;
                }
                Err(e) => {
                    last = format!("{candidate}: {e}");
                    continue;
                }
            };
            let body = read_capped(&mut answer)
                .await
                .map_err(|e| server_unreachable(format!("{candidate}: {e}")))?;
            let metadata: ServerMetadata = serde_json::from_slice(&body)
                .map_err(|e| server_unreachable(format!("{candidate} is not metadata: {e}")))?;
            if metadata.issuer != issuer {
                return Err(server_unreachable(format!(
                    "{candidate} names another issuer"
                )));
            }
            // Web addresses only: the authorization endpoint goes to the human's browser.
            let url = |name: &str, value: &str| {
                url::Url::parse(value)
                    .map_err(|e| server_unreachable(format!("{name} in {candidate}: {e}")))
                    .and_then(|url| {
                        if matches!(url.scheme(), "http" | "https") && url.fragment().is_none() {
                            Ok(url)
                        } else {
                            Err(server_unreachable(format!(
                                "{name} in {candidate} is not an http(s) address"
                            )))
                        }
                    })
            };
            return Ok(Endpoints {
                authorization: AuthUrl::from_url(url(
                    "authorization_endpoint",
                    &metadata.authorization_endpoint,
                )?),
                token: TokenUrl::from_url(url("token_endpoint", &metadata.token_endpoint)?),
                revocation: metadata
                    .revocation_endpoint
                    .as_deref()
                    .map(|r| url("revocation_endpoint", r).map(RevocationUrl::from_url))
                    .transpose()?,
                names_itself: metadata.authorization_response_iss_parameter_supported,
                at: Instant::now(),
            });
        }
        Err(server_unreachable(format!("discovery failed: {last}")))
    }

    fn client(
        state: &AppState,
        upstream: &str,
        oauth: &UpstreamOAuth,
        endpoints: &Endpoints,
    ) -> ApiResult<OAuthClient> {
        let redirect = RedirectUrl::new(callback_url(state, upstream))
            .map_err(|e| ApiError::Unavailable(format!("invalid callback URL: {e}")))?;
        let mut client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
            .set_auth_uri(endpoints.authorization.clone())
            .set_token_uri(endpoints.token.clone())
            .set_revocation_url_option(endpoints.revocation.clone())
            .set_redirect_uri(redirect)
            .set_auth_type(match oauth.client_auth {
                ClientAuth::Basic => AuthType::BasicAuth,
                ClientAuth::Post => AuthType::RequestBody,
            });
        if let Some(secret) = &oauth.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
        }
        Ok(client)
    }

    /// The gate of one connection in this node.
    fn gate(&self, subject: &str, upstream: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self
            .gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(gates.entry(format!("{subject}\n{upstream}")).or_default())
    }

    /// The access token to inject for `entry` (an OAuth connection), refreshed first if it is
    /// about to expire: by this caller if it wins the cluster-wide lease, else by whoever holds
    /// it, whose result this caller waits for (unless the current token still has time).
    pub async fn access_token(&self, state: &AppState, entry: VaultEntry) -> ApiResult<String> {
        let tokens = match current(state, &entry)? {
            Current::Fresh(token) => return Ok(token),
            Current::Due(tokens) => tokens,
        };
        let gate = self.gate(&entry.subject, &entry.upstream);
        if tokens.usable(state.clock.now()) {
            // This token still has time: it goes out now, and the refresh (unless one is under
            // way in this node already) runs beside the request, never in its way.
            if let (Ok(held), Some(app)) = (gate.try_lock_owned(), self.app()) {
                tokio::spawn(async move {
                    let _held = held;
                    if let Err(e) = app.connections.refresh_due(&app, entry).await {
                        tracing::debug!(error = %e, "a refresh beside a request did not succeed");
                    }
                });
            }
            return Ok(tokens.access_token);
        }
        let _held = gate.lock_owned().await;
        self.refresh_due(state, entry).await
    }

    /// Holding the node's gate of the connection: its access token once refreshed, by this
    /// node if it wins the cluster-wide lease, else by whoever holds it.
    async fn refresh_due(&self, state: &AppState, entry: VaultEntry) -> ApiResult<String> {
        let waited = Instant::now();
        loop {
            // What the database holds now: whoever held the gate or the lease may have stored
            // new tokens, which memory may not know yet.
            let entry = state
                .store
                .credential_now(&entry.subject, &entry.upstream)
                .await?
                .filter(|e| e.kind == "oauth")
                .ok_or_else(|| expired("the connection was removed"))?;
            let tokens = match current(state, &entry)? {
                Current::Fresh(token) => return Ok(token),
                Current::Due(tokens) => tokens,
            };
            let now = state.clock.now();
            if entry.retry_at.is_some_and(|at| now < at) {
                return after_passing_failure(state, tokens);
            }
            if state
                .store
                .claim_refresh(
                    &entry.subject,
                    &entry.upstream,
                    entry.version,
                    now,
                    now.saturating_add(REFRESH_LEASE),
                )
                .await?
            {
                return self.refresh(state, &entry, tokens).await;
            }
            // Another node refreshes.
            if tokens.usable(now) {
                return Ok(tokens.access_token);
            }
            if waited.elapsed() >= REFRESH_WAIT {
                return Err(expired("its refresh did not finish in time; try again"));
            }
            tokio::time::sleep(REFRESH_POLL).await;
        }
    }

    /// Refreshes `entry`'s tokens, this caller holding the lease.
    async fn refresh(
        &self,
        state: &AppState,
        entry: &VaultEntry,
        tokens: Tokens,
    ) -> ApiResult<String> {
        let (subject, upstream) = (entry.subject.as_str(), entry.upstream.as_str());
        let oauth = state
            .config
            .upstreams
            .get(upstream)
            .and_then(|u| u.oauth.as_ref())
            .ok_or_else(|| expired("the upstream no longer has an OAuth server configured"))?;
        // `retry_at` none: for good (the human must connect again); else a passing failure.
        let give_up = |reason: &str, retry: bool| {
            let mut event = credential_event("credential.refresh_failed", subject, upstream, state);
            event.reason = Some(reason.to_owned());
            let retry_at = retry.then(|| retry_at(state));
            async move {
                state
                    .store
                    .refresh_failed(subject, upstream, entry.version, retry_at, &event)
                    .await
            }
        };
        let Some(refresh_token) = tokens.refresh_token.clone() else {
            give_up("no_refresh_token", false).await?;
            return Err(expired(
                "its access token expired and the server gave no refresh token; connect again",
            ));
        };
        let attempt = tokio::time::timeout(REFRESH_BUDGET, async {
            let endpoints = self.endpoints(upstream, oauth).await?;
            let client = Self::client(state, upstream, oauth, &endpoints)?;
            Ok::<_, ApiError>(
                client
                    .exchange_refresh_token(&RefreshToken::new(refresh_token.clone()))
                    .request_async(&self.http)
                    .await,
            )
        })
        .await;
        let answer = match attempt {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                give_up("server_unreachable", true).await?;
                tracing::warn!(subject, upstream, error = %e, "an OAuth connection could not be refreshed");
                return after_passing_failure(state, tokens);
            }
            Err(_) => {
                give_up("server_timeout", true).await?;
                tracing::warn!(
                    subject,
                    upstream,
                    "an OAuth connection's refresh took too long"
                );
                return after_passing_failure(state, tokens);
            }
        };
        let answer = match answer {
            Ok(answer) => answer,
            // The refresh token is dead (revoked, expired, or rotated away): only the human
            // can mend this, and trying again would only be refused again.
            Err(RequestTokenError::ServerResponse(refusal))
                if *refusal.error() == BasicErrorResponseType::InvalidGrant =>
            {
                give_up("invalid_grant", false).await?;
                tracing::warn!(
                    subject,
                    upstream,
                    "an OAuth connection's refresh was refused; the human must connect again"
                );
                return Err(expired(
                    "the server refused its refresh; the human must connect again",
                ));
            }
            Err(e) => {
                let reason = match &e {
                    RequestTokenError::ServerResponse(refusal) => refusal_code(refusal.error()),
                    _ => "server_unreachable",
                };
                give_up(reason, true).await?;
                tracing::warn!(
                    subject,
                    upstream,
                    reason,
                    "an OAuth connection could not be refreshed"
                );
                return after_passing_failure(state, tokens);
            }
        };
        let now = state.clock.now();
        let fresh = match Tokens::from_response(&answer, now, Some(refresh_token)) {
            Ok(fresh) => fresh,
            Err(why) => {
                give_up("invalid_token_response", false).await?;
                tracing::warn!(
                    subject,
                    upstream,
                    why,
                    "an OAuth connection's refresh answered tokens Leash cannot use"
                );
                return Err(expired(&format!(
                    "the server answered {why}; the human must connect again"
                )));
            }
        };
        let sealed = seal(state, subject, upstream, &fresh)?;
        let event = credential_event("credential.refreshed", subject, upstream, state);
        if state
            .store
            .store_refreshed(subject, upstream, entry.version, &sealed, &event)
            .await?
        {
            tracing::info!(subject, upstream, "OAuth connection refreshed");
            Ok(fresh.access_token)
        } else {
            // Replaced or removed by the human meanwhile: what they did wins, and the tokens
            // just obtained, which nobody will keep, are revoked.
            self.revoke_later(upstream, fresh);
            Err(expired(
                "the connection changed while it was refreshed; try again",
            ))
        }
    }

    /// Revokes a connection's tokens at the server (RFC 7009), once they are no longer
    /// Leash's: removed, replaced, or obtained too late to be kept. In the background, each
    /// token on its own and bounded: the human's answer never waits on the server, and the
    /// connection is gone from Leash whatever the server says.
    pub fn revoke_entry_later(&self, state: &AppState, entry: &VaultEntry) {
        if entry.kind != "oauth" {
            return;
        }
        if let Ok(tokens) = open(state, entry) {
            self.revoke_later(&entry.upstream, tokens);
        }
    }

    fn revoke_later(&self, upstream: &str, tokens: Tokens) {
        let Some(app) = self.app() else {
            return;
        };
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            let Some(oauth) = app
                .config
                .upstreams
                .get(&upstream)
                .and_then(|u| u.oauth.as_ref())
            else {
                return;
            };
            let connections = &app.connections;
            let endpoints =
                match tokio::time::timeout(REVOKE_BUDGET, connections.endpoints(&upstream, oauth))
                    .await
                {
                    Ok(Ok(endpoints)) => endpoints,
                    _ => {
                        tracing::warn!(
                            upstream,
                            "no revocation: the server's endpoints are not at hand"
                        );
                        return;
                    }
                };
            let Some(revocation) = endpoints.revocation else {
                return;
            };
            let mut each = Vec::new();
            if let Some(refresh) = &tokens.refresh_token {
                each.push((refresh.as_str(), "refresh_token"));
            }
            each.push((tokens.access_token.as_str(), "access_token"));
            for (token, hint) in each {
                let revoked = tokio::time::timeout(
                    REVOKE_BUDGET,
                    connections.revoke_one(oauth, revocation.url(), token, hint),
                )
                .await;
                match revoked {
                    Ok(Ok(())) => tracing::info!(upstream, hint, "token revoked at the server"),
                    Ok(Err(e)) => {
                        tracing::warn!(upstream, hint, error = %e, "the server did not confirm a revocation")
                    }
                    Err(_) => tracing::warn!(upstream, hint, "a revocation took too long"),
                }
            }
        });
    }
}

/// The standard RFC 6749 §5.2 code of a refusal, or `other`: a server's own code is never
/// repeated (it could carry anything, a token included).
fn refusal_code(error: &BasicErrorResponseType) -> &'static str {
    match error {
        BasicErrorResponseType::InvalidClient => "invalid_client",
        BasicErrorResponseType::InvalidGrant => "invalid_grant",
        BasicErrorResponseType::InvalidRequest => "invalid_request",
        BasicErrorResponseType::InvalidScope => "invalid_scope",
        BasicErrorResponseType::UnauthorizedClient => "unauthorized_client",
        BasicErrorResponseType::UnsupportedGrantType => "unsupported_grant_type",
        BasicErrorResponseType::Extension(code) if code == "temporarily_unavailable" => {
            "temporarily_unavailable"
        }
        BasicErrorResponseType::Extension(code) if code == "server_error" => "server_error",
        _ => "other",
    }
}

impl Connections {
    /// One RFC 7009 request. By hand rather than with the `oauth2` crate, which refuses any
    /// revocation endpoint that is not https even where it accepts an http token endpoint
    /// (a server on loopback, a test); the request is one form POST with the client's
    /// authentication, as the crate sends it at the token endpoint.
    async fn revoke_one(
        &self,
        oauth: &UpstreamOAuth,
        endpoint: &url::Url,
        token: &str,
        hint: &str,
    ) -> ApiResult<()> {
        let mut form = vec![("token", token), ("token_type_hint", hint)];
        let mut request = self.http.0.post(endpoint.clone());
        let secret = oauth.client_secret.as_ref().map(|s| s.expose());
        match (oauth.client_auth, secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 §2.3.1: each part form-encoded before Basic's own encoding.
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request = request.basic_auth(encode(&oauth.client_id), Some(encode(secret)));
            }
            (ClientAuth::Post, Some(secret)) => {
                form.push(("client_id", &oauth.client_id));
                form.push(("client_secret", secret));
            }
            (_, None) => form.push(("client_id", &oauth.client_id)),
        }
        let answer = request
            .form(&form)
            .send()
            .await
            .map_err(|e| server_unreachable(format!("revocation failed: {e}")))?;
        if answer.status() == StatusCode::OK {
            Ok(())
        } else {
            Err(server_unreachable(format!(
                "revocation answered {}",
                answer.status()
            )))
        }
    }
}

/// A connection's tokens as they stand.
enum Current {
    /// Its access token, good for now.
    Fresh(String),
    /// Its tokens, due for a refresh.
    Due(Tokens),
}

fn current(state: &AppState, entry: &VaultEntry) -> ApiResult<Current> {
    if entry.reconnect {
        return Err(expired("the human must connect again"));
    }
    let tokens = open(state, entry)?;
    Ok(if tokens.needs_refresh(state.clock.now()) {
        Current::Due(tokens)
    } else {
        Current::Fresh(tokens.access_token)
    })
}

/// After a refresh that failed for a passing reason (until the back-off ends): the current
/// access token while it lives, else `502`.
fn after_passing_failure(state: &AppState, tokens: Tokens) -> ApiResult<String> {
    if tokens.usable(state.clock.now()) {
        Ok(tokens.access_token)
    } else {
        Err(expired("its refresh failed; try again later"))
    }
}

fn open(state: &AppState, entry: &VaultEntry) -> ApiResult<Tokens> {
    let plain = state
        .master
        .open(&entry.sealed, &sealing_context(&entry.subject, &entry.upstream))
        .map_err(|_| {
            tracing::error!(subject = %entry.subject, upstream = %entry.upstream, "an OAuth connection does not open with the master key");
            ApiError::Unavailable("the vaulted credential cannot be used".into())
        })?;
    serde_json::from_slice(&plain)
        .map_err(|_| ApiError::Unavailable("the vaulted credential is unusable".into()))
}

fn seal(state: &AppState, subject: &str, upstream: &str, tokens: &Tokens) -> ApiResult<Vec<u8>> {
    let plain = serde_json::to_vec(tokens)
        .map_err(|_| ApiError::Unavailable("cannot seal the tokens".into()))?;
    state
        .master
        .seal(&plain, &sealing_context(subject, upstream))
}

fn credential_event(kind: &str, subject: &str, upstream: &str, state: &AppState) -> AuditEvent {
    let mut event = AuditEvent::new(kind, Mode::Direct, state.clock.now());
    event.subject = Some(subject.to_owned());
    event.upstream = Some(upstream.to_owned());
    event
}

fn retry_at(state: &AppState) -> i64 {
    state.clock.now().saturating_add(RETRY_AFTER)
}

fn callback_url(state: &AppState, upstream: &str) -> String {
    format!("{}/v1/vault/{upstream}/callback", state.public_url)
}

fn oauth_of<'s>(state: &'s AppState, upstream: &str) -> ApiResult<&'s UpstreamOAuth> {
    state
        .config
        .upstreams
        .get(upstream)
        .ok_or_else(|| ApiError::NotFound("unknown upstream".into()))?
        .oauth
        .as_ref()
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "this upstream has no OAuth server configured ([upstream.oauth])".into(),
            )
        })
}

/// Answer of `POST /v1/vault/{upstream}/connect`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectStarted {
    /// Open this in the browser where the human is logged in to Leash.
    authorization_url: String,
    /// RFC 3339: when the connection can no longer complete.
    expires_at: String,
}

/// `POST /v1/vault/{upstream}/connect` (human, session or key): starts an OAuth connection
/// and answers the authorization URL to open. The callback must come back to a browser logged
/// in to Leash as this human (with a session, that very session).
#[utoipa::path(post, path = "/v1/vault/{upstream}/connect", tag = "vault",
    params(("upstream" = String, Path)),
    responses((status = 200, body = ConnectStarted), ApiErrors), security(("api_key" = [])))]
pub async fn connect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(upstream): Path<String>,
) -> ApiResult<Json<ConnectStarted>> {
    let caller = caller_from_headers(&state, &headers).await?;
    let user = crate::vault::human(caller)?;
    let oauth = oauth_of(&state, &upstream)?;
    if state.oidc.is_none() {
        return Err(ApiError::InvalidRequest(
            "connecting needs human login ([oidc]): the callback is checked against the browser session".into(),
        ));
    }
    // Each connection started stores a row: one human cannot start them without end.
    state.login_rates.check(&user.id)?;
    let session_digest = if headers.contains_key(header::AUTHORIZATION) {
        None
    } else {
        crate::oidc::session_digest(&state, &headers).map(|d| d.as_str().to_owned())
    };
    let connections = &state.connections;
    let endpoints = connections.endpoints(&upstream, oauth).await?;
    let client = Connections::client(&state, &upstream, oauth, &endpoints)?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client.authorize_url(CsrfToken::new_random);
    for scope in &oauth.scopes {
        request = request.add_scope(Scope::new(scope.clone()));
    }
    let (url, csrf) = request.set_pkce_challenge(challenge).url();
    let now = state.clock.now();
    let expires_at = now + CONNECT_TTL;
    let pending = OAuthConnect {
        subject: user.id.clone(),
        upstream: upstream.clone(),
        session_digest,
        verifier: verifier.secret().clone(),
        expires_at,
    };
    state
        .store
        .create_connect(&SecretDigest::of(csrf.secret()), &pending)
        .await?;
    tracing::info!(subject = %user.id, upstream = %upstream, "OAuth connection started");
    Ok(Json(ConnectStarted {
        authorization_url: url.to_string(),
        expires_at: leash_core::audit::rfc3339(expires_at),
    }))
}

/// `GET /v1/vault/{upstream}/callback`: completes a connection, once, in the browser session
/// that started it.
#[utoipa::path(get, path = "/v1/vault/{upstream}/callback", tag = "vault",
    params(("upstream" = String, Path)),
    responses((status = 303, description = "connected; on to the console"), ApiErrors))]
pub async fn callback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(upstream): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let refused = |why: &str| ApiError::InvalidRequest(format!("connection refused: {why}"));
    let query = crate::oidc::callback_query(query.as_deref())?;
    let oauth = oauth_of(&state, &upstream)?;
    let given_state = query
        .state
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| refused("no state"))?;
    // Taken before anything else is checked: whatever happens next, this connection is over.
    let pending = state
        .store
        .take_connect(&SecretDigest::of(given_state))
        .await?
        .ok_or_else(|| refused("no connection under way with this state (used or expired)"))?;
    let now = state.clock.now();
    if pending.upstream != upstream {
        return Err(refused("the answer is for another upstream's connection"));
    }
    if now >= pending.expires_at {
        return Err(refused("the connection took too long; start again"));
    }
    let session = crate::oidc::session_of(&state, &headers)
        .await?
        .ok_or_else(|| {
            refused(
                "this browser is not logged in to Leash as the human who started the connection",
            )
        })?;
    let same_session = match &pending.session_digest {
        Some(started) => crate::oidc::session_digest(&state, &headers)
            .is_some_and(|d| bool::from(d.as_str().as_bytes().ct_eq(started.as_bytes()))),
        None => true,
    };
    if !same_session || session.user.id != pending.subject {
        return Err(refused(
            "this browser's session is not the one that started the connection",
        ));
    }
    if let Some(error) = &query.error {
        let error = crate::error::foreign_code(error);
        return Err(refused(&format!(
            "the authorization server answered {error}"
        )));
    }
    let connections = &state.connections;
    let endpoints = connections.endpoints(&upstream, oauth).await?;
    // RFC 9207: an answer from another server (mix-up) names another issuer, or none when
    // this server says it always names itself. Without a configured issuer, the callback URL
    // (one per upstream) is what tells the servers apart.
    match (query.iss.as_deref(), oauth.issuer.as_deref()) {
        (Some(iss), Some(issuer)) if iss != issuer => {
            return Err(refused(
                "the answer came from another authorization server (iss)",
            ));
        }
        (None, _) if endpoints.names_itself => {
            return Err(refused("the answer does not name its issuer (iss)"));
        }
        _ => {}
    }
    let code = query
        .code
        .filter(|c| !c.is_empty())
        .ok_or_else(|| refused("no code"))?;
    let client = Connections::client(&state, &upstream, oauth, &endpoints)?;
    let answer = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
        .request_async(&connections.http)
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(RequestTokenError::ServerResponse(refusal)) => {
            return Err(refused(&format!(
                "the authorization server refused the code ({})",
                refusal.error()
            )));
        }
        Err(RequestTokenError::Parse(_, _)) => {
            return Err(refused("the authorization server's answer is not valid"));
        }
        Err(e) => return Err(server_unreachable(format!("code exchange failed: {e}"))),
    };
    let tokens = match Tokens::from_response(&answer, now, None) {
        Ok(tokens) => tokens,
        Err(why) => {
            // Issued but refused here: the server should not keep them live either.
            connections.revoke_later(&upstream, Tokens::unchecked(&answer, now));
            return Err(refused(&format!("the authorization server answered {why}")));
        }
    };
    let replaced = state
        .store
        .credential_now(&pending.subject, &upstream)
        .await?;
    let entry = VaultEntry {
        sealed: seal(&state, &pending.subject, &upstream, &tokens)?,
        subject: pending.subject,
        upstream,
        kind: "oauth".into(),
        header_name: None,
        expires_at: None,
        created_at: now,
        reconnect: false,
        version: 0,
        retry_at: None,
    };
    let mut event = credential_event(
        "credential.connected",
        &entry.subject,
        &entry.upstream,
        &state,
    );
    event.actor = Some(entry.subject.clone());
    state.store.put_credential(&entry, &event).await?;
    // Connecting again: the connection replaced is no longer Leash's to keep.
    if let Some(replaced) = replaced {
        connections.revoke_entry_later(&state, &replaced);
    }
    tracing::info!(subject = %entry.subject, upstream = %entry.upstream, "OAuth connection stored");
    let mut response = StatusCode::SEE_OTHER.into_response();
    let out = response.headers_mut();
    out.insert(
        header::LOCATION,
        HeaderValue::from_static("/console#/vault"),
    );
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::Tokens;

    fn tokens(obtained_at: i64, expires_at: Option<i64>) -> Tokens {
        Tokens {
            access_token: "a".into(),
            refresh_token: Some("r".into()),
            expires_at,
            obtained_at,
        }
    }

    #[test]
    fn a_token_is_refreshed_a_third_of_its_life_before_expiry_within_bounds() {
        // 6 s: 2 s before; 3 s: at least 1 s before; an hour: at most 60 s before.
        assert_eq!(tokens(100, Some(106)).refresh_at(), Some(104));
        assert_eq!(tokens(100, Some(103)).refresh_at(), Some(102));
        assert_eq!(tokens(0, Some(3600)).refresh_at(), Some(3540));
        assert!(!tokens(100, Some(106)).needs_refresh(103));
        assert!(tokens(100, Some(106)).needs_refresh(104));
        // Without a stated lifetime it is used as it is.
        assert!(!tokens(100, None).needs_refresh(i64::MAX));
    }

    #[test]
    fn a_token_goes_out_only_with_a_second_to_live() {
        assert!(tokens(100, Some(106)).usable(104));
        assert!(!tokens(100, Some(106)).usable(105));
        assert!(tokens(100, None).usable(i64::MAX));
    }

    #[test]
    fn the_debug_form_shows_no_token() {
        let shown = format!("{:?}", tokens(1, Some(2)));
        assert!(
            !shown.contains("\"a\"") && !shown.contains("\"r\""),
            "{shown}"
        );
    }
}
