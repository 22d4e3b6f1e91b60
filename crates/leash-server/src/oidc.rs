//! Human login through the company's IdP (API §13): the authorization code flow with PKCE,
//! `state` and `nonce` (`GET /login` → `GET /auth/callback`), server-side sessions behind an
//! `HttpOnly` cookie (`POST /logout`), and the IdP's access tokens as Bearer tokens.
//!
//! The flow itself is the `openidconnect` crate's: discovery, the authorization URL, the code
//! exchange and the ID token's verification (the IdP's JWKS, `iss`, `aud`, `azp`, `exp`,
//! `nonce`; asymmetric algorithms only). What is Leash's: a login is bound to the browser that
//! started it by a random login cookie whose digest keys the stored `state`, `nonce` and PKCE
//! verifier, taken exactly once by the callback (no login CSRF, no replay); each login creates a
//! fresh random session id, stored only as its SHA-256; humans are keyed by (`iss`, `sub`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use leash_core::audit::{AuditEvent, Mode};
use leash_core::secret::{Secret, SecretDigest, random_id};
use leash_store::{Login, Session, User};
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreClaimName, CoreClaimType, CoreClientAuthMethod,
    CoreErrorResponseType, CoreGenderClaim, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm,
    CoreResponseMode, CoreResponseType, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreSubjectIdentifierType, CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AdditionalProviderMetadata, AuthenticationFlow, AuthorizationCode, ClientId,
    ClientSecret, CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    IdTokenFields, IssuerUrl, JsonWebKey as _, Nonce, PkceCodeChallenge, PkceCodeVerifier,
    ProviderMetadata, RedirectUrl, Scope, StandardErrorResponse, StandardTokenResponse,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tokio::sync::Mutex;

use crate::config::OidcConfig;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// How long a started login may take to come back.
const LOGIN_TTL: i64 = 600;
/// How long discovery (metadata and keys) is trusted before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);
/// The least time between two fetches forced by a key the cached set does not hold.
const REFRESH_FLOOR: Duration = Duration::from_secs(10);
/// A session's `last_seen` is written at most this often, and at most every quarter of the idle
/// lifetime (so a session in use never reaches its idle end).
const TOUCH_EVERY: i64 = 60;
/// The signature algorithms accepted from the IdP: asymmetric only, so a token signed with the
/// client secret (HS256) or unsigned never passes.
const ALGORITHMS: [CoreJwsSigningAlgorithm; 9] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// The `groups` claim, which decides admin and who may log in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct GroupClaims {
    #[serde(default)]
    groups: Vec<String>,
}

impl AdditionalClaims for GroupClaims {}

/// RFC 9207: whether the IdP names itself (`iss`) in its authorization responses. When it says
/// so, a response without `iss` is refused like one with another issuer (mix-up).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct IssParameter {
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

impl AdditionalProviderMetadata for IssParameter {}

type Metadata = ProviderMetadata<
    IssParameter,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

type TokenResponse = StandardTokenResponse<
    IdTokenFields<
        GroupClaims,
        EmptyExtraTokenFields,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    CoreTokenType,
>;

type OidcClient = openidconnect::Client<
    GroupClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    TokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// What discovery found, and when.
struct Discovered {
    client: OidcClient,
    metadata: Metadata,
    at: Instant,
}

/// Login through one IdP: its configuration, the HTTP client that talks to it, and what its
/// discovery document and keys said (fetched on first use, again after [`DISCOVERY_TTL`], or
/// when a token names a key the cached set does not hold).
pub struct Oidc {
    config: OidcConfig,
    http: openidconnect::reqwest::Client,
    redirect: RedirectUrl,
    discovered: Mutex<Option<Arc<Discovered>>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.config.issuer)
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// A human as an OIDC login or an IdP token shows them.
#[derive(Debug)]
pub struct Human {
    /// The Leash user.
    pub user: User,
    /// Whether their groups make them an admin.
    pub admin: bool,
}

impl Oidc {
    /// The login of `config`, whose callback is `<public_url>/auth/callback`.
    pub fn new(config: OidcConfig, public_url: &str) -> Result<Self, String> {
        let http = openidconnect::reqwest::Client::builder()
            // The IdP's answers are read as they are: a redirect is never followed (SSRF).
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the OIDC HTTP client: {e}"))?;
        let redirect = RedirectUrl::new(format!("{public_url}/auth/callback"))
            .map_err(|e| format!("invalid callback URL: {e}"))?;
        Ok(Self {
            config,
            http,
            redirect,
            discovered: Mutex::new(None),
        })
    }

    /// The IdP as discovered: the cached copy unless it is stale, or `refresh` asks for a new
    /// one (a key not in the cached set) and the last fetch is older than [`REFRESH_FLOOR`].
    async fn discovered(&self, refresh: bool) -> ApiResult<Arc<Discovered>> {
        let mut slot = self.discovered.lock().await;
        if let Some(current) = slot.as_ref() {
            let age = current.at.elapsed();
            if age < DISCOVERY_TTL && !(refresh && age >= REFRESH_FLOOR) {
                return Ok(Arc::clone(current));
            }
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|e| unreachable_idp(format!("invalid issuer: {e}")))?;
        let metadata = match Metadata::discover_async(issuer, &self.http).await {
            Ok(metadata) => metadata,
            Err(e) => {
                let failed = unreachable_idp(format!("discovery failed: {e}"));
                // An IdP that is down for a while does not lock everyone out: the keys it
                // published last still verify, and the next try waits REFRESH_FLOOR.
                return match slot.as_mut() {
                    Some(stale) => {
                        let kept = Arc::new(Discovered {
                            client: stale.client.clone(),
                            metadata: stale.metadata.clone(),
                            at: Instant::now()
                                .checked_sub(DISCOVERY_TTL - REFRESH_FLOOR)
                                .unwrap_or_else(Instant::now),
                        });
                        *stale = Arc::clone(&kept);
                        Ok(kept)
                    }
                    None => Err(failed),
                };
            }
        };
        let client = OidcClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            Some(ClientSecret::new(
                self.config.client_secret.expose().to_owned(),
            )),
        )
        .set_redirect_uri(self.redirect.clone());
        let fresh = Arc::new(Discovered {
            client,
            metadata,
            at: Instant::now(),
        });
        *slot = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    /// Whether `groups` may log in.
    fn allows(&self, groups: &[String]) -> bool {
        self.config
            .allowed_groups
            .as_ref()
            .is_none_or(|allowed| groups.iter().any(|g| allowed.contains(g)))
    }

    /// Whether `groups` make an admin.
    fn is_admin(&self, groups: &[String]) -> bool {
        groups.iter().any(|g| self.config.admin_groups.contains(g))
    }

    /// The human an IdP access token stands for, if `token` is one: signed by a key of the
    /// IdP's set with an asymmetric algorithm, `iss` the IdP, `aud` including `[oidc]
    /// audience`, within `exp`/`nbf`, and not an ID token. `Ok(None)` when the token is not
    /// the IdP's at all (another kind of Bearer token); an error when it claims to be and fails.
    pub async fn human_by_token(&self, state: &AppState, token: &str) -> ApiResult<Option<Human>> {
        let Some(jwt) = Jwt::parse(token) else {
            return Ok(None);
        };
        if jwt.claims.iss.as_deref() != Some(self.config.issuer.as_str()) {
            return Ok(None);
        }
        let refused = |why: &str| ApiError::Unauthorized(format!("IdP token refused: {why}"));
        let Some(audience) = &self.config.audience else {
            return Err(refused(
                "this server accepts no IdP tokens ([oidc] audience)",
            ));
        };
        let mut discovered = self.discovered(false).await?;
        if jwt.key(&discovered.metadata).is_none() {
            discovered = self.discovered(true).await?;
        }
        let key = jwt
            .key(&discovered.metadata)
            .ok_or_else(|| refused("signed by no key of the IdP"))?;
        if !ALGORITHMS.contains(&jwt.alg) {
            return Err(refused("algorithm not accepted"));
        }
        // No JOSE extension is understood here (RFC 7515 §4.1.11).
        if jwt.crit {
            return Err(refused("crit header"));
        }
        if !jwt.access_token_typ {
            return Err(refused(
                "not an access token (typ must be at+jwt, RFC 9068)",
            ));
        }
        key.verify_signature(&jwt.alg, jwt.signed.as_bytes(), &jwt.signature)
            .map_err(|_| refused("bad signature"))?;
        let claims = &jwt.claims;
        let now = state.clock.now();
        if !claims.aud.contains(audience) {
            return Err(refused("not issued for this server (aud)"));
        }
        if claims.nonce.is_some() || claims.at_hash.is_some() {
            return Err(refused("an ID token is not an access token"));
        }
        match claims.exp {
            Some(exp) if exp > now => {}
            _ => return Err(refused("expired")),
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + 60) {
            return Err(refused("not yet valid"));
        }
        let Some(sub) = claims.sub.as_deref().filter(|s| !s.is_empty()) else {
            return Err(refused("no sub"));
        };
        if !self.allows(&claims.groups) {
            return Err(ApiError::AccessDenied(
                "your groups are not allowed to use Leash".into(),
            ));
        }
        let name = claims
            .email
            .as_deref()
            .or(claims.preferred_username.as_deref())
            .unwrap_or(sub);
        let user = human_for(state, &self.config.issuer, sub, name).await?;
        Ok(Some(Human {
            admin: self.is_admin(&claims.groups),
            user,
        }))
    }
}

fn unreachable_idp(detail: String) -> ApiError {
    tracing::warn!(%detail, "the OIDC provider could not be used");
    ApiError::BadGateway("the identity provider could not be reached; try again".into())
}

/// A compact JWS whose claims are read before its signature is checked (to tell an IdP token
/// from another Bearer token): nothing in it is trusted until [`Oidc::human_by_token`] has
/// verified the signature.
struct Jwt {
    alg: CoreJwsSigningAlgorithm,
    kid: Option<String>,
    /// RFC 9068 §2.1: `at+jwt` (or `application/at+jwt`) marks an access token.
    access_token_typ: bool,
    crit: bool,
    signed: String,
    signature: Vec<u8>,
    claims: TokenClaims,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: CoreJwsSigningAlgorithm,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct TokenClaims {
    iss: Option<String>,
    sub: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    aud: Vec<String>,
    exp: Option<i64>,
    nbf: Option<i64>,
    nonce: Option<serde_json::Value>,
    at_hash: Option<serde_json::Value>,
    email: Option<String>,
    preferred_username: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

impl Jwt {
    fn parse(token: &str) -> Option<Self> {
        let mut parts = token.split('.');
        let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: JwtHeader =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
        let claims: TokenClaims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let access_token_typ = header.typ.as_deref().is_some_and(|typ| {
            typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt")
        });
        Some(Self {
            alg: header.alg,
            kid: header.kid,
            access_token_typ,
            crit: header.crit.is_some(),
            signed: token[..token.len() - signature.len() - 1].to_owned(),
            signature: URL_SAFE_NO_PAD.decode(signature).ok()?,
            claims,
        })
    }

    /// The key of the IdP's set this token names (by `kid`, or the only key when it names none).
    fn key<'m>(&self, metadata: &'m Metadata) -> Option<&'m CoreJsonWebKey> {
        let keys = metadata.jwks().keys();
        match &self.kid {
            Some(kid) => keys
                .iter()
                .find(|k| k.key_id().is_some_and(|id| id.as_str() == kid)),
            None if keys.len() == 1 => keys.first(),
            None => None,
        }
    }
}

/// The Leash user for (`issuer`, `subject`), created on first sight; a disabled one is refused.
async fn human_for(state: &AppState, issuer: &str, subject: &str, name: &str) -> ApiResult<User> {
    let now = state.clock.now();
    let new = User {
        id: random_id("usr_"),
        name: display_name(name),
        created_at: now,
        disabled: false,
    };
    let event = crate::audit::system_event("user.created", "oidc", Some(&new.id), None, now);
    // A key nobody is given: such a human logs in only through the IdP.
    let unusable_key = Secret::generate("unused_").digest();
    let store = &state.store;
    let user = match store
        .oidc_user(issuer, subject, &new, &unusable_key, &event)
        .await
    {
        // Two first logins at once: the other one created the human.
        Err(leash_store::StoreError::Conflict) => {
            store
                .oidc_user(issuer, subject, &new, &unusable_key, &event)
                .await?
        }
        other => other?,
    };
    if user.disabled {
        return Err(ApiError::AccessDenied("this user is disabled".into()));
    }
    Ok(user)
}

/// A display name: printable, at most 64 characters.
fn display_name(name: &str) -> String {
    let clean: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    if clean.trim().is_empty() {
        "user".to_owned()
    } else {
        clean
    }
}

/// The cookie names: `__Host-` prefixed (and `Secure`) when Leash is served over https.
struct Cookies {
    secure: bool,
}

impl Cookies {
    fn of(state: &AppState) -> Self {
        Self {
            secure: state.public_url.starts_with("https://"),
        }
    }

    fn session_name(&self) -> &'static str {
        if self.secure {
            "__Host-leash_session"
        } else {
            "leash_session"
        }
    }

    fn login_name(&self) -> &'static str {
        if self.secure {
            "__Host-leash_login"
        } else {
            "leash_login"
        }
    }

    /// A `Set-Cookie` value; `max_age` 0 deletes the cookie.
    fn set(&self, name: &str, value: &str, max_age: i64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("leash_invalid=; Max-Age=0"))
    }
}

/// The value of the request's cookie `name`: `None` when absent, and also when sent twice
/// (a cookie tossed in by a sibling host must not choose the session).
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut found = None;
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            let Some((key, value)) = pair.trim().split_once('=') else {
                continue;
            };
            if key == name {
                if found.is_some() {
                    return None;
                }
                found = Some(value);
            }
        }
    }
    found
}

/// The digest of the session id the request's cookie carries (whether or not it is live).
pub fn session_digest(state: &AppState, headers: &HeaderMap) -> Option<SecretDigest> {
    state.oidc.as_ref()?;
    cookie(headers, Cookies::of(state).session_name()).map(SecretDigest::of)
}

/// Whether the request carries a session cookie (whether or not it is valid).
pub fn has_session_cookie(state: &AppState, headers: &HeaderMap) -> bool {
    state.oidc.is_some() && cookie(headers, Cookies::of(state).session_name()).is_some()
}

/// The live session the request's cookie names, if any: within its absolute and idle ends, of
/// a human not disabled. Its use is recorded (at most once a minute).
pub async fn session_of(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<Session>> {
    let Some(oidc) = &state.oidc else {
        return Ok(None);
    };
    let Some(value) = cookie(headers, Cookies::of(state).session_name()) else {
        return Ok(None);
    };
    let digest = SecretDigest::of(value);
    let Some(session) = state.store.session(&digest).await? else {
        return Ok(None);
    };
    let now = state.clock.now();
    if now >= session.expires_at || now - session.last_seen >= oidc.config.session_idle {
        return Ok(None);
    }
    let touch_every = TOUCH_EVERY.min(oidc.config.session_idle / 4).max(1);
    if now - session.last_seen >= touch_every {
        state.store.touch_session(&digest, now).await?;
    }
    Ok(Some(session))
}

/// Query of `GET /login`.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// A path on Leash's own origin to go to after login: `/…` but not `//…` or `/\…` (which
/// browsers read as another host), printable ASCII only.
fn same_origin_path(path: Option<&str>) -> String {
    match path {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.starts_with("/\\")
                && p.len() <= 512
                && p.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            p.to_owned()
        }
        _ => "/console".to_owned(),
    }
}

fn no_oidc() -> ApiError {
    ApiError::NotFound("login is not configured on this server ([oidc])".into())
}

fn random_token() -> String {
    let mut bytes = [0_u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `GET /login`: starts a login at the IdP, bound to this browser by a login cookie.
pub async fn login(State(state): State<Arc<AppState>>, request: Request) -> ApiResult<Response> {
    let oidc = state.oidc.as_ref().ok_or_else(no_oidc)?;
    let Query(query) = Query::<LoginQuery>::try_from_uri(request.uri())
        .map_err(|_| ApiError::InvalidRequest("the only parameter is return_to".into()))?;
    // Each login started stores a row: one source address cannot start them without end.
    if let Some(source) = crate::gateway::source_of(&state, &request) {
        state.login_rates.check(&source.to_string())?;
    }
    let discovered = oidc.discovered(false).await?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = discovered.client.authorize_url(
        AuthenticationFlow::<openidconnect::core::CoreResponseType>::AuthorizationCode,
        CsrfToken::new_random,
        Nonce::new_random,
    );
    for scope in oidc.config.scopes.iter().filter(|s| *s != "openid") {
        request = request.add_scope(Scope::new(scope.clone()));
    }
    let (url, csrf, nonce) = request.set_pkce_challenge(challenge).url();
    let login_id = random_token();
    let login = Login {
        state: csrf.secret().clone(),
        nonce: nonce.secret().clone(),
        verifier: verifier.secret().clone(),
        return_to: same_origin_path(query.return_to.as_deref()),
        expires_at: state.clock.now() + LOGIN_TTL,
    };
    state
        .store
        .create_login(&SecretDigest::of(&login_id), &login)
        .await?;
    let cookies = Cookies::of(&state);
    let mut response = StatusCode::FOUND.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(url.as_str())
            .map_err(|_| unreachable_idp("an unusable authorization URL".into()))?,
    );
    headers.insert(
        header::SET_COOKIE,
        cookies.set(cookies.login_name(), &login_id, LOGIN_TTL),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Query of an OAuth callback (`GET /v1/vault/{upstream}/callback`, `GET /auth/callback`).
#[derive(Debug, Default, Deserialize)]
pub struct CallbackQuery {
    pub(crate) code: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) iss: Option<String>,
    pub(crate) error: Option<String>,
}

/// An OAuth callback's query: a parameter given twice (which one would the server mean?) or
/// a query that does not decode is refused with the contract's JSON error.
pub(crate) fn callback_query(raw: Option<&str>) -> ApiResult<CallbackQuery> {
    serde_urlencoded::from_str(raw.unwrap_or_default()).map_err(|_| {
        ApiError::InvalidRequest(
            "the callback's parameters are malformed or given more than once".into(),
        )
    })
}

/// `GET /auth/callback`: completes the login this browser started, once.
pub async fn callback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let oidc = state.oidc.as_ref().ok_or_else(no_oidc)?;
    let query = callback_query(query.as_deref())?;
    let cookies = Cookies::of(&state);
    let refused = |why: &str| ApiError::InvalidRequest(format!("login refused: {why}"));
    let login_id = cookie(&headers, cookies.login_name())
        .ok_or_else(|| refused("this browser started no login (the login cookie is missing)"))?;
    // Taken before anything else is checked: whatever happens next, this login is over.
    let login = state
        .store
        .take_login(&SecretDigest::of(login_id))
        .await?
        .ok_or_else(|| refused("no login under way for this browser (used or expired)"))?;
    let now = state.clock.now();
    if now >= login.expires_at {
        return Err(refused("the login took too long; start again"));
    }
    if let Some(error) = &query.error {
        let error = crate::error::foreign_code(error);
        return Err(refused(&format!("the identity provider answered {error}")));
    }
    let given_state = query.state.as_deref().unwrap_or_default();
    if !bool::from(given_state.as_bytes().ct_eq(login.state.as_bytes())) {
        return Err(refused("state does not match this browser's login"));
    }
    let discovered = oidc.discovered(false).await?;
    // RFC 9207: an authorization response from another server (mix-up) names another issuer,
    // or none when the IdP says it always names itself.
    let names_itself = discovered
        .metadata
        .additional_metadata()
        .authorization_response_iss_parameter_supported;
    match query.iss.as_deref() {
        Some(iss) if iss != oidc.config.issuer => {
            return Err(refused("the answer came from another issuer"));
        }
        None if names_itself => {
            return Err(refused("the answer does not name its issuer (iss)"));
        }
        _ => {}
    }
    let code = query
        .code
        .filter(|c| !c.is_empty())
        .ok_or_else(|| refused("no code"))?;
    let exchange = discovered
        .client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|_| unreachable_idp("the IdP has no token endpoint".into()))?
        .set_pkce_verifier(PkceCodeVerifier::new(login.verifier.clone()));
    let tokens: TokenResponse = match exchange.request_async(&oidc.http).await {
        Ok(tokens) => tokens,
        Err(openidconnect::RequestTokenError::ServerResponse(answer)) => {
            return Err(refused(&format!(
                "the identity provider refused the code ({})",
                answer.error()
            )));
        }
        // What the IdP sent back does not parse as a token response (an ID token's claims of
        // the wrong type, say): bad input, not an unreachable IdP.
        Err(openidconnect::RequestTokenError::Parse(_, _)) => {
            return Err(refused("the identity provider's answer is not valid"));
        }
        Err(e) => return Err(unreachable_idp(format!("code exchange failed: {e}"))),
    };
    let id_token = tokens
        .extra_fields()
        .id_token()
        .ok_or_else(|| refused("no ID token"))?;
    let nonce = Nonce::new(login.nonce.clone());
    let verify = |discovered: &Discovered| {
        let verifier = discovered
            .client
            .id_token_verifier()
            .set_allowed_algs(ALGORITHMS);
        let client_id = oidc.config.client_id.as_str();
        id_token
            .claims(&verifier, &nonce)
            .map_err(|e| e.to_string())
            .and_then(|claims| {
                // OIDC Core §3.1.3.7 steps 4-5, which the crate leaves to its user: with
                // several audiences, the authorized party must be Leash.
                match claims.authorized_party() {
                    Some(azp) if azp.as_str() != client_id => {
                        return Err("it was issued to another client (azp)".to_owned());
                    }
                    None if claims.audiences().len() > 1 => {
                        return Err("several audiences and no azp".to_owned());
                    }
                    _ => {}
                }
                if claims.subject().is_empty() {
                    return Err("no subject".to_owned());
                }
                Ok(claims)
            })
            .map(|claims| {
                (
                    claims.issuer().to_string(),
                    claims.subject().to_string(),
                    claims
                        .email()
                        .map(|e| e.to_string())
                        .or_else(|| claims.preferred_username().map(|u| u.to_string())),
                    claims.additional_claims().groups.clone(),
                )
            })
    };
    let verified = match verify(&discovered) {
        // A key the cached set does not hold: the IdP may have rotated.
        Err(_) => verify(&*oidc.discovered(true).await?),
        ok => ok,
    };
    let (issuer, subject, name, groups) =
        verified.map_err(|e| refused(&format!("the ID token is not valid: {e}")))?;
    if !oidc.allows(&groups) {
        return Err(ApiError::AccessDenied(
            "your groups are not allowed to use Leash".into(),
        ));
    }
    let user = human_for(
        &state,
        &issuer,
        &subject,
        name.as_deref().unwrap_or(&subject),
    )
    .await?;
    let session_id = random_token();
    let session = Session {
        admin: oidc.is_admin(&groups),
        created_at: now,
        last_seen: now,
        expires_at: now + oidc.config.session_ttl,
        user,
    };
    let event = human_event("session.login", &session.user, now);
    state
        .store
        .create_session(&SecretDigest::of(&session_id), &session, &event)
        .await?;
    tracing::info!(user = %session.user.id, admin = session.admin, "human logged in");
    let mut response = StatusCode::SEE_OTHER.into_response();
    let out = response.headers_mut();
    out.insert(
        header::LOCATION,
        HeaderValue::from_str(&login.return_to)
            .unwrap_or_else(|_| HeaderValue::from_static("/console")),
    );
    out.append(
        header::SET_COOKIE,
        cookies.set(cookies.session_name(), &session_id, oidc.config.session_ttl),
    );
    out.append(header::SET_COOKIE, cookies.set(cookies.login_name(), "", 0));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `POST /logout`: ends this browser's session (if any) and clears its cookie.
pub async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    let cookies = Cookies::of(&state);
    if state.oidc.is_some()
        && let Some(value) = cookie(&headers, cookies.session_name())
    {
        let digest = SecretDigest::of(value);
        if let Some(session) = state.store.session(&digest).await? {
            let event = human_event("session.logout", &session.user, state.clock.now());
            state.store.end_session(&digest, &event).await?;
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookies.set(cookies.session_name(), "", 0),
    );
    Ok(response)
}

/// The event of a human's own login or logout.
fn human_event(kind: &str, user: &User, now: i64) -> AuditEvent {
    let mut event = AuditEvent::new(kind, Mode::Direct, now);
    event.actor = Some(user.id.clone());
    event.subject = Some(user.id.clone());
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_this_origin_are_return_targets() {
        for good in ["/console", "/console#/tasks", "/v1/me?x=1"] {
            assert_eq!(same_origin_path(Some(good)), good);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "console",
            "/a b",
            "/\u{202e}x",
            "",
        ] {
            assert_eq!(same_origin_path(Some(bad)), "/console", "{bad:?}");
        }
        assert_eq!(same_origin_path(None), "/console");
    }

    #[test]
    fn a_cookie_sent_twice_counts_as_none() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; leash_session=x"),
        );
        assert_eq!(cookie(&headers, "leash_session"), Some("x"));
        headers.append(header::COOKIE, HeaderValue::from_static("leash_session=y"));
        assert_eq!(cookie(&headers, "leash_session"), None);
        assert_eq!(cookie(&headers, "a"), Some("1"));
        assert_eq!(cookie(&headers, "b"), None);
    }
}
