//! The identity provider of `leash demo --console`: the company IdP that Alice logs in at, in
//! this process on loopback, so that the demo needs nothing installed. It knows one person
//! (Alice) and one client (the demo's Leash), and does what Leash's login needs of an OpenID
//! Provider: discovery, its JWKS, an authorization page ("sign in as Alice", one click), and a
//! token endpoint that checks the client secret, the code (once, 60 s) and the PKCE verifier
//! before it signs an ID token with the `nonce`. It also mints the access tokens (RFC 9068)
//! with which the demo makes Alice's API calls, so that the Alice of the API and the Alice of
//! the browser are one human, keyed by (`iss`, `sub`).
//!
//! Hand-written because it is a stage prop, not a product: a real deployment uses its own IdP
//! (the tests use npm `oidc-provider`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_core::secret::SecretDigest;
use serde_json::{Map, Value, json};

/// The client id of the demo's Leash at this IdP.
pub const CLIENT_ID: &str = "leash";
/// The audience of the access tokens the demo makes Alice's API calls with.
pub const AUDIENCE: &str = "leash-demo";
/// Alice at the IdP.
const SUBJECT: &str = "alice";
const EMAIL: &str = "alice@example.com";
/// How long an authorization code may wait for its exchange.
const CODE_TTL: Duration = Duration::from_secs(60);

/// The IdP, serving until dropped.
pub struct DemoIdp {
    /// Its issuer URL.
    pub issuer: String,
    /// The demo Leash's client secret.
    pub client_secret: String,
    state: Arc<IdpState>,
    task: tokio::task::JoinHandle<()>,
}

struct IdpState {
    issuer: String,
    key: AgentKey,
    kid: String,
    client_secret: SecretDigest,
    redirect_uri: Mutex<Option<String>>,
    /// Authorization requests shown to Alice, by a random id the page's form posts back.
    asked: Mutex<HashMap<String, Asked>>,
    /// Codes handed out, each taken once.
    codes: Mutex<HashMap<String, Asked>>,
}

#[derive(Clone)]
struct Asked {
    state: String,
    nonce: String,
    challenge: String,
    at: Instant,
}

impl Drop for DemoIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    leash_core::b64::encode(bytes)
}

impl DemoIdp {
    /// Starts the IdP on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen for the demo identity provider")?;
        let issuer = format!("http://{}", listener.local_addr()?);
        let key = AgentKey::generate(Alg::EdDsa);
        let client_secret = random();
        let state = Arc::new(IdpState {
            issuer: issuer.clone(),
            kid: key.public().thumbprint(),
            key,
            client_secret: SecretDigest::of(&client_secret),
            redirect_uri: Mutex::new(None),
            asked: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/authorize/yes", post(sign_in))
            .route("/token", post(token))
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            issuer,
            client_secret,
            state,
            task,
        })
    }

    /// Leash's callback, known once Leash listens: the only place codes are sent to.
    pub fn set_redirect_uri(&self, uri: String) {
        *lock(&self.state.redirect_uri) = Some(uri);
    }

    /// An access token of Alice's for the demo's Leash (RFC 9068), valid for two hours.
    pub fn alice_access_token(&self) -> String {
        let now = now();
        self.state.sign(
            "at+jwt",
            &json!({
                "iss": self.state.issuer, "sub": SUBJECT, "aud": AUDIENCE, "client_id": CLIENT_ID,
                "iat": now, "exp": now + 7200, "jti": random(),
                "email": EMAIL, "preferred_username": SUBJECT, "groups": ["staff"],
            }),
        )
    }
}

impl IdpState {
    fn sign(&self, typ: &str, claims: &Value) -> String {
        let mut header = Map::new();
        header.insert("typ".into(), json!(typ));
        header.insert("kid".into(), json!(self.kid));
        self.key.sign(header, claims)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn refuse(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn discovery(State(idp): State<Arc<IdpState>>) -> axum::Json<Value> {
    let issuer = &idp.issuer;
    axum::Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "email", "profile"],
        "authorization_response_iss_parameter_supported": true,
    }))
}

async fn jwks(State(idp): State<Arc<IdpState>>) -> axum::Json<Value> {
    let mut jwk = idp.key.public().to_value();
    if let Value::Object(map) = &mut jwk {
        map.insert("kid".into(), json!(idp.kid));
        map.insert("alg".into(), json!("EdDSA"));
        map.insert("use".into(), json!("sig"));
    }
    axum::Json(json!({"keys": [jwk]}))
}

/// `GET /authorize`: checks the request is the demo Leash's, with PKCE, then asks Alice.
async fn authorize(
    State(idp): State<Arc<IdpState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let field = |name: &str| query.get(name).map(String::as_str).unwrap_or_default();
    let registered = lock(&idp.redirect_uri).clone();
    if field("client_id") != CLIENT_ID || registered.as_deref() != Some(field("redirect_uri")) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unknown client or redirect_uri",
        );
    }
    if field("response_type") != "code"
        || field("code_challenge_method") != "S256"
        || field("code_challenge").is_empty()
        || field("nonce").is_empty()
        || field("state").is_empty()
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a code request with state, nonce and an S256 PKCE challenge is required",
        );
    }
    let id = random();
    lock(&idp.asked).insert(
        id.clone(),
        Asked {
            state: field("state").to_owned(),
            nonce: field("nonce").to_owned(),
            challenge: field("code_challenge").to_owned(),
            at: Instant::now(),
        },
    );
    // The page holds no script and shows nothing the request carried (the id is ours).
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Demo identity provider</title></head>\
         <body style=\"font-family:sans-serif;max-width:32em;margin:4em auto\">\
         <h1>Company sign-in (demo)</h1>\
         <p>The Leash console asks who you are. In this demo you are Alice ({EMAIL}).</p>\
         <form method=\"post\" action=\"/authorize/yes\"><input type=\"hidden\" name=\"id\" value=\"{id}\">\
         <button id=\"sign-in\" type=\"submit\">Sign in as Alice</button></form></body></html>"
    );
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(page),
    )
        .into_response()
}

/// `POST /authorize/yes`: Alice signed in; back to Leash with a code, the state and the issuer.
async fn sign_in(State(idp): State<Arc<IdpState>>, body: Bytes) -> Response {
    let form = form_of(&body);
    let asked = form.get("id").and_then(|id| lock(&idp.asked).remove(id));
    let (Some(asked), Some(redirect)) = (asked, lock(&idp.redirect_uri).clone()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "no sign-in is under way",
        );
    };
    let code = random();
    let state = asked.state.clone();
    lock(&idp.codes).insert(
        code.clone(),
        Asked {
            at: Instant::now(),
            ..asked
        },
    );
    let mut url = match url::Url::parse(&redirect) {
        Ok(url) => url,
        Err(_) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", "bad redirect"),
    };
    url.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &state)
        .append_pair("iss", &idp.issuer);
    Redirect::to(url.as_str()).into_response()
}

/// `POST /token`: the client's secret, the code (once, fresh) and its PKCE verifier, then Alice's
/// ID token with the authorization's `nonce`.
async fn token(State(idp): State<Arc<IdpState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form_of(&body);
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let secret = basic_secret(&headers).unwrap_or_else(|| field("client_secret").to_owned());
    if !SecretDigest::of(&secret).ct_eq(&idp.client_secret) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "bad client secret",
        );
    }
    let asked = lock(&idp.codes).remove(field("code"));
    let Some(asked) = asked.filter(|a| a.at.elapsed() < CODE_TTL) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown, used or expired code",
        );
    };
    let verifier = field("code_verifier");
    let challenge =
        leash_core::b64::encode(<sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
    if verifier.is_empty() || challenge != asked.challenge {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the PKCE verifier does not match",
        );
    }
    let now = now();
    let id_token = idp.sign(
        "JWT",
        &json!({
            "iss": idp.issuer, "sub": SUBJECT, "aud": CLIENT_ID, "iat": now, "exp": now + 300,
            "nonce": asked.nonce, "email": EMAIL, "preferred_username": SUBJECT,
            "groups": ["staff"],
        }),
    );
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({
            "access_token": random(),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        })),
    )
        .into_response()
}

/// A form body's fields (the last of a repeated name).
fn form_of(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// The secret of `Authorization: Basic` (RFC 6749 §2.3.1: form-encoded id and secret).
fn basic_secret(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    (decode(id)? == CLIENT_ID).then(|| decode(secret))?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn authorized(idp: &DemoIdp, http: &reqwest::Client, verifier: &str) -> String {
        let challenge =
            leash_core::b64::encode(<sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
        let page = http
            .get(format!("{}/authorize", idp.issuer))
            .query(&[
                ("client_id", CLIENT_ID),
                ("redirect_uri", "http://127.0.0.1:9/cb"),
                ("response_type", "code"),
                ("state", "s1"),
                ("nonce", "n1"),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        let text = page.text().await.unwrap();
        let id = text
            .split("name=\"id\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_owned();
        let back = http
            .post(format!("{}/authorize/yes", idp.issuer))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("id={id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(back.status(), 303);
        let location = url::Url::parse(back.headers()["location"].to_str().unwrap()).unwrap();
        let query: HashMap<_, _> = location.query_pairs().into_owned().collect();
        assert_eq!(query["state"], "s1");
        assert_eq!(query["iss"], idp.issuer);
        query["code"].clone()
    }

    async fn redeem(
        idp: &DemoIdp,
        http: &reqwest::Client,
        code: &str,
        verifier: &str,
        secret: &str,
    ) -> u16 {
        http.post(format!("{}/token", idp.issuer))
            .basic_auth(CLIENT_ID, Some(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=authorization_code&code={code}&code_verifier={verifier}&redirect_uri=x"
            ))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn codes_need_the_secret_and_the_verifier_and_work_once() {
        let idp = DemoIdp::start().await.unwrap();
        idp.set_redirect_uri("http://127.0.0.1:9/cb".into());
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let code = authorized(&idp, &http, "verifier-1").await;
        assert_eq!(redeem(&idp, &http, &code, "verifier-1", "wrong").await, 401);
        assert_eq!(
            redeem(&idp, &http, &code, "verifier-1", &idp.client_secret).await,
            200
        );
        assert_eq!(
            redeem(&idp, &http, &code, "verifier-1", &idp.client_secret).await,
            400
        );
        let code = authorized(&idp, &http, "verifier-2").await;
        assert_eq!(
            redeem(&idp, &http, &code, "other", &idp.client_secret).await,
            400
        );
        // The code was spent by the failed try too.
        assert_eq!(
            redeem(&idp, &http, &code, "verifier-2", &idp.client_secret).await,
            400
        );
    }

    #[tokio::test]
    async fn only_the_registered_callback_with_pkce_is_served() {
        let idp = DemoIdp::start().await.unwrap();
        idp.set_redirect_uri("http://127.0.0.1:9/cb".into());
        let http = reqwest::Client::new();
        for (redirect, method) in [
            ("http://evil.example/cb", "S256"),
            ("http://127.0.0.1:9/cb", "plain"),
        ] {
            let answer = http
                .get(format!("{}/authorize", idp.issuer))
                .query(&[
                    ("client_id", CLIENT_ID),
                    ("redirect_uri", redirect),
                    ("response_type", "code"),
                    ("state", "s"),
                    ("nonce", "n"),
                    ("code_challenge", "c"),
                    ("code_challenge_method", method),
                ])
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 400, "{redirect} {method}");
        }
    }
}
