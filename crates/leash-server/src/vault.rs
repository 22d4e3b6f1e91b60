//! The credential vault (API §9): a human stores their session or key for one upstream; it is
//! sealed with the master key, never returned, and injected only into that human's delegated
//! or direct requests to that upstream.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use leash_core::audit::rfc3339;
use leash_core::secret::Secret;
use leash_store::VaultEntry;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, JsonBody};
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// Body of `PUT /v1/vault/{upstream}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    /// `bearer`, `cookie` or `header`.
    kind: String,
    /// The credential itself; never shown again.
    #[schema(value_type = String)]
    secret: Secret,
    /// The header name, for kind `header`.
    name: Option<String>,
    /// RFC 3339.
    expires_at: Option<String>,
}

/// A stored credential as the API shows it: metadata, never the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialView {
    upstream: String,
    /// `bearer`, `cookie`, `header` or `oauth` (a connection, API §17).
    kind: String,
    /// `active`, or `reconnect`: an OAuth connection whose refresh failed for good; the human
    /// must connect again (`POST /v1/vault/{upstream}/connect`).
    status: &'static str,
    name: Option<String>,
    expires_at: Option<String>,
    created_at: String,
}

impl From<&VaultEntry> for CredentialView {
    fn from(entry: &VaultEntry) -> Self {
        Self {
            upstream: entry.upstream.clone(),
            kind: entry.kind.clone(),
            status: if entry.reconnect {
                "reconnect"
            } else {
                "active"
            },
            name: entry.header_name.clone(),
            expires_at: entry.expires_at.map(rfc3339),
            created_at: rfc3339(entry.created_at),
        }
    }
}

/// `GET /v1/vault`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialList {
    credentials: Vec<CredentialView>,
}

/// The header a credential is injected as.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Header name.
    pub name: HeaderName,
    /// Header value (sensitive: hyper never logs or compresses it).
    pub value: HeaderValue,
}

/// The headers of opened vaulted credentials, by the SHA-256 of the sealed value and its
/// context: opening one (XChaCha20-Poly1305) cost about 2 % of a gateway request, for the same
/// answer every time a credential is injected. A sealed value is never sealed again in place
/// (a new secret, or a master key rotation, seals it anew with a fresh nonce), so an entry can
/// only ever be the opening of its key. Bounded; the key is a digest, never the secret. It
/// keeps nothing the process does not hold already: [`crate::reflection::SecretsCache`] keeps
/// the same credentials' guards.
pub struct Openings(quick_cache::sync::Cache<[u8; 32], Injection>);

/// Credentials whose opened headers are kept.
const OPENINGS_CAPACITY: usize = 4096;

impl Default for Openings {
    fn default() -> Self {
        Self(quick_cache::sync::Cache::new(OPENINGS_CAPACITY))
    }
}

impl std::fmt::Debug for Openings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Openings(<redacted>)")
    }
}

impl Openings {
    /// The header of `entry`, opened with `state`'s master key, or kept from the last time.
    fn of(&self, state: &AppState, entry: &VaultEntry) -> ApiResult<Injection> {
        use sha2::Digest as _;
        let name = entry.header_name.as_deref();
        let mut digest = sha2::Sha256::new();
        // What the context is made of (not the context itself, which would be formatted on
        // every request), then the sealed value; each part length-prefixed, and the header
        // name's absence told from an empty name, so no two entries share a key.
        let parts = [
            entry.subject.as_bytes(),
            entry.upstream.as_bytes(),
            entry.kind.as_bytes(),
            name.unwrap_or_default().as_bytes(),
            &entry.sealed,
        ];
        digest.update([u8::from(name.is_some())]);
        for part in parts {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        let key: [u8; 32] = digest.finalize().into();
        self.0.get_or_insert_with(&key, || {
            let context = context(&entry.subject, &entry.upstream, &entry.kind, name);
            open(state, entry, &context)
        })
    }
}

/// Opens `entry` (sealed with `context`) into the header it is injected as.
fn open(state: &AppState, entry: &VaultEntry, context: &[u8]) -> ApiResult<Injection> {
    let plain = state.master.open(&entry.sealed, context).map_err(|_| {
        tracing::error!(subject = %entry.subject, upstream = %entry.upstream, "a vaulted credential does not open with the master key");
        ApiError::Unavailable("the vaulted credential cannot be used".into())
    })?;
    let text = std::str::from_utf8(&plain)
        .map_err(|_| ApiError::Unavailable("the vaulted credential is unusable".into()))?;
    let (name, value) = match (entry.kind.as_str(), entry.header_name.as_deref()) {
        ("bearer", _) => (axum::http::header::AUTHORIZATION, format!("Bearer {text}")),
        ("cookie", _) => (axum::http::header::COOKIE, text.to_owned()),
        (_, Some(name)) => (
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ApiError::Unavailable("bad stored header name".into()))?,
            text.to_owned(),
        ),
        _ => {
            return Err(ApiError::Unavailable(
                "the vaulted credential is unusable".into(),
            ));
        }
    };
    let mut value = HeaderValue::from_str(&value)
        .map_err(|_| ApiError::Unavailable("the vaulted credential is unusable".into()))?;
    value.set_sensitive(true);
    Ok(Injection { name, value })
}

/// Headers a vaulted `header` credential may not replace.
const RESERVED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "dpop",
    "cookie",
    "authorization",
    "upgrade",
    "te",
];

/// The AEAD context a vault entry is sealed under: who, for which upstream, what kind.
pub fn context(entry_subject: &str, upstream: &str, kind: &str, name: Option<&str>) -> Vec<u8> {
    format!(
        "leash vault\0{entry_subject}\0{upstream}\0{kind}\0{}",
        name.unwrap_or("")
    )
    .into_bytes()
}

pub(crate) fn human(caller: Caller) -> ApiResult<leash_store::User> {
    match caller {
        Caller::Human(user) | Caller::AdminHuman(user) => Ok(user),
        Caller::Admin => Err(ApiError::Forbidden(
            "the vault holds humans' own credentials: use the human's key".into(),
        )),
    }
}

/// `PUT /v1/vault/{upstream}` (human).
#[utoipa::path(put, path = "/v1/vault/{upstream}", tag = "vault", params(("upstream" = String, Path)),
    request_body = NewCredential,
    responses((status = 200, body = CredentialView), ApiErrors), security(("api_key" = [])))]
pub async fn put(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(upstream): Path<String>,
    JsonBody(body): JsonBody<NewCredential>,
) -> ApiResult<(StatusCode, Json<CredentialView>)> {
    let user = human(caller)?;
    if !state.config.upstreams.contains_key(&upstream) {
        return Err(ApiError::InvalidRequest("unknown upstream".into()));
    }
    let secret = body.secret.expose();
    if secret.is_empty() || secret.len() > 8192 || HeaderValue::from_str(secret).is_err() {
        return Err(ApiError::InvalidRequest(
            "secret must be 1 to 8192 visible characters".into(),
        ));
    }
    let name = match (body.kind.as_str(), body.name) {
        ("bearer" | "cookie", None) => None,
        ("header", Some(name)) => {
            let lower = name.to_ascii_lowercase();
            if HeaderName::from_bytes(name.as_bytes()).is_err()
                || RESERVED.contains(&lower.as_str())
                || lower.starts_with("leash-")
                || lower.starts_with("x-forwarded-")
            {
                return Err(ApiError::InvalidRequest(
                    "name must be a header name Leash does not reserve".into(),
                ));
            }
            Some(name)
        }
        ("header", None) => {
            return Err(ApiError::InvalidRequest(
                "a header credential needs a name".into(),
            ));
        }
        ("bearer" | "cookie", Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "name is only for kind header".into(),
            ));
        }
        ("oauth", _) => {
            return Err(ApiError::InvalidRequest(
                "an OAuth connection is made with POST /v1/vault/{upstream}/connect".into(),
            ));
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "kind must be bearer, cookie or header".into(),
            ));
        }
    };
    let now = state.clock.now();
    let expires_at = body
        .expires_at
        .map(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .map(|t| t.unix_timestamp())
                .map_err(|_| ApiError::InvalidRequest("expires_at must be an RFC 3339 time".into()))
        })
        .transpose()?;
    if expires_at.is_some_and(|t| t <= now) {
        return Err(ApiError::InvalidRequest("expires_at is in the past".into()));
    }
    let sealed = state.master.seal(
        secret.as_bytes(),
        &context(&user.id, &upstream, &body.kind, name.as_deref()),
    )?;
    let entry = VaultEntry {
        subject: user.id,
        upstream,
        kind: body.kind,
        header_name: name,
        sealed,
        expires_at,
        created_at: now,
        reconnect: false,
        version: 0,
        retry_at: None,
    };
    let event = credential_event("credential.stored", &entry.subject, &entry.upstream, now);
    let replaced = state
        .store
        .credential_now(&entry.subject, &entry.upstream)
        .await?;
    state.store.put_credential(&entry, &event).await?;
    // A secret stored over an OAuth connection ends it: its tokens are revoked at the server.
    if let Some(replaced) = replaced {
        state.connections.revoke_entry_later(&state, &replaced);
    }
    tracing::info!(subject = %entry.subject, upstream = %entry.upstream, kind = %entry.kind, "credential stored");
    Ok((StatusCode::OK, Json(CredentialView::from(&entry))))
}

/// A human's own change to their vault: which upstream, never the secret or its kind's value.
fn credential_event(
    kind: &str,
    subject: &str,
    upstream: &str,
    now: i64,
) -> leash_core::audit::AuditEvent {
    let mut event = leash_core::audit::AuditEvent::new(kind, leash_core::audit::Mode::Direct, now);
    event.subject = Some(subject.to_owned());
    event.actor = Some(subject.to_owned());
    event.upstream = Some(upstream.to_owned());
    event
}

/// `GET /v1/vault` (human): metadata only.
#[utoipa::path(get, path = "/v1/vault", tag = "vault",
    responses((status = 200, body = CredentialList), ApiErrors), security(("api_key" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<CredentialList>> {
    let user = human(caller)?;
    let entries = state.store.list_credentials(&user.id).await?;
    Ok(Json(CredentialList {
        credentials: entries.iter().map(CredentialView::from).collect(),
    }))
}

/// `DELETE /v1/vault/{upstream}` (human).
#[utoipa::path(delete, path = "/v1/vault/{upstream}", tag = "vault", params(("upstream" = String, Path)),
    responses((status = 204, description = "deleted"), ApiErrors), security(("api_key" = [])))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(upstream): Path<String>,
) -> ApiResult<StatusCode> {
    let user = human(caller)?;
    let event = credential_event("credential.deleted", &user.id, &upstream, state.clock.now());
    let connection = state
        .store
        .credential_now(&user.id, &upstream)
        .await?
        .filter(|entry| entry.kind == "oauth");
    if state
        .store
        .delete_credential(&user.id, &upstream, &event)
        .await?
    {
        tracing::info!(subject = %user.id, upstream = %upstream, "credential deleted");
        // Gone from Leash first: a server that does not answer cannot keep it here, nor
        // hold this answer (the revocation runs after it).
        if let Some(connection) = connection {
            state.connections.revoke_entry_later(&state, &connection);
        }
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("no credential for this upstream".into()))
    }
}

/// The header to inject for `subject`'s requests to `upstream`, if a live credential exists.
pub async fn injection(
    state: &AppState,
    subject: &str,
    upstream: &str,
) -> ApiResult<Option<Injection>> {
    let Some(entry) = state.store.credential(subject, upstream).await? else {
        return Ok(None);
    };
    if entry.expires_at.is_some_and(|t| t <= state.clock.now()) {
        return Ok(None);
    }
    if entry.kind == "oauth" {
        let token = state.connections.access_token(state, entry).await?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ApiError::UpstreamCredentialExpired(
                "the upstream's OAuth server issued an access token that cannot be sent".into(),
            )
        })?;
        value.set_sensitive(true);
        return Ok(Some(Injection {
            name: axum::http::header::AUTHORIZATION,
            value,
        }));
    }
    state.vault_openings.of(state, &entry).map(Some)
}
