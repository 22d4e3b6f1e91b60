//! Token-signing keys and their rotation (API §3): every node holds the keys in a [`KeyRing`],
//! read again from the store every half second (so a rotation made on any node is seen by all
//! within a second); which key signs and which are published follow from the times stored
//! with each key, so every node switches at the same moment.
//!
//! `POST /v1/keys/rotate` adds a key that is published at once and signs from `jwks_max_age`
//! later (clients that cached the JWKS have it by then); the previous key stays published,
//! and its tokens accepted, until `max_token_ttl` + 60 s after it stopped signing. With
//! `compromised`, the new key signs at once and every key before it is withdrawn at once (the
//! one signing may be older than the newest, which may not sign yet): their tokens die. Public keys are kept for ever, for the audit checkpoints they signed.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use leash_core::aead::{MasterKey, Opener};
use leash_core::audit::{AuditEvent, Mode, rfc3339};
use leash_core::jwk::PublicJwk;
use leash_core::token::SigningKey;
use leash_store::{SigningKeyRow, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, optional_json};
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// The setting the first key is kept under, and the sealing context of every signing key.
pub const SIGNING_KEY_CONTEXT: &str = "token_signing_key";
/// How often each node reads the keys again.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_millis(500);
/// How long the previous key stays published after its last token could have been issued,
/// beyond `max_token_ttl`: clock skew between nodes and verifiers.
const PUBLISHED_MARGIN: i64 = 60;

/// One key of the ring.
struct RingKey {
    key: SigningKey,
    signs_from: i64,
    published_until: Option<i64>,
}

impl RingKey {
    fn published(&self, now: i64) -> bool {
        self.published_until.is_none_or(|until| now < until)
    }
}

/// The signing keys as a node holds them, oldest first.
pub struct KeyRing {
    keys: Vec<RingKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.key.kid()).collect();
        f.debug_struct("KeyRing").field("kids", &kids).finish()
    }
}

impl KeyRing {
    /// The key that signs at `now`: the newest published one whose time has come.
    pub fn signer(&self, now: i64) -> &SigningKey {
        let signing = self
            .keys
            .iter()
            .rev()
            .find(|k| k.signs_from <= now && k.published(now));
        // A ring always holds the first key, which signs from 0; a ring where every key was
        // withdrawn cannot be stored (a withdrawal adds the key that replaces it).
        match signing.or_else(|| self.keys.last()) {
            Some(key) => &key.key,
            None => unreachable!("a key ring is never empty"),
        }
    }

    /// The public key of `kid` if it is published at `now`: tokens it signed are accepted.
    pub fn verify_key(&self, kid: &str, now: i64) -> Option<PublicJwk> {
        self.keys
            .iter()
            .find(|k| k.key.kid() == kid && k.published(now))
            .map(|k| k.key.public())
    }

    /// The JWKS entries published at `now`.
    pub fn jwks(&self, now: i64) -> Vec<Value> {
        self.keys
            .iter()
            .filter(|k| k.published(now))
            .map(|k| k.key.jwks_entry())
            .collect()
    }
}

/// The node's key ring and what it was read from.
pub struct Keys {
    ring: RwLock<Arc<KeyRing>>,
    read: RwLock<Vec<SigningKeyRow>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("ring", &self.ring()).finish()
    }
}

/// Opens a signing key sealed under the master key, checking it is the key its row names.
pub fn open_key(master: &dyn Opener, sealed: &[u8]) -> anyhow::Result<SigningKey> {
    let bytes = master
        .open(sealed, SIGNING_KEY_CONTEXT.as_bytes())
        .map_err(|_| {
            anyhow::anyhow!(
                "the master key does not open this database's signing key (wrong LEASH_MASTER_KEY?)"
            )
        })?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("stored signing key has the wrong length"))?;
    Ok(SigningKey::new(ed25519_dalek::SigningKey::from_bytes(
        &bytes,
    )))
}

/// A new signing key, sealed, signing from `signs_from` (a rotation, or a restore's first
/// start).
pub fn new_key(master: &MasterKey, now: i64, signs_from: i64) -> SigningKeyRow {
    let bytes = crate::bootstrap::random_32();
    let sealed = master.seal(&bytes, SIGNING_KEY_CONTEXT.as_bytes());
    let key = SigningKey::new(ed25519_dalek::SigningKey::from_bytes(&bytes));
    row_of(&key, sealed, now, signs_from)
}

/// The row of a key signing from `signs_from`.
pub fn row_of(key: &SigningKey, sealed: Vec<u8>, now: i64, signs_from: i64) -> SigningKeyRow {
    SigningKeyRow {
        kid: key.kid().to_owned(),
        sealed,
        public_jwk: key.jwks_entry().to_string(),
        created_at: now,
        signs_from,
        published_until: None,
    }
}

fn ring_of(master: &dyn Opener, rows: &[SigningKeyRow]) -> anyhow::Result<KeyRing> {
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let key = open_key(master, &row.sealed)?;
        if key.kid() != row.kid {
            anyhow::bail!("signing key {} is stored under another kid", row.kid);
        }
        keys.push(RingKey {
            key,
            signs_from: row.signs_from,
            published_until: row.published_until,
        });
    }
    if keys.is_empty() {
        anyhow::bail!("the database holds no signing key");
    }
    Ok(KeyRing { keys })
}

impl Keys {
    /// The keys the store holds, opened with `master`.
    pub async fn load(store: &dyn Store, master: &dyn Opener) -> anyhow::Result<Self> {
        let rows = store.signing_keys().await?;
        let ring = ring_of(master, &rows)?;
        Ok(Self {
            ring: RwLock::new(Arc::new(ring)),
            read: RwLock::new(rows),
        })
    }

    /// The ring as last read.
    pub fn ring(&self) -> Arc<KeyRing> {
        Arc::clone(
            &self
                .ring
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Reads the keys again; the ring changes only if they did (then true).
    pub async fn reload(&self, store: &dyn Store, master: &dyn Opener) -> anyhow::Result<bool> {
        let rows = store.signing_keys().await?;
        let unchanged = *self
            .read
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == rows;
        if unchanged {
            return Ok(false);
        }
        let ring = Arc::new(ring_of(master, &rows)?);
        *self
            .ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ring;
        *self
            .read
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rows;
        Ok(true)
    }
}

/// Reads the keys again; when they changed, forgets the tokens verified so far, so that a
/// withdrawn key's tokens are checked (and refused) again.
async fn reload(state: &AppState) -> anyhow::Result<()> {
    if state
        .keys
        .reload(state.store.as_ref(), &state.master)
        .await?
    {
        state.verified_tokens.clear();
    }
    Ok(())
}

/// Reads the keys again every [`RELOAD_EVERY`], for as long as the server runs.
pub async fn watch(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The master key first: after a rotation elsewhere, the keys open only with the new one.
        if let Err(e) = crate::master::follow(&state).await {
            tracing::warn!(error = %e, "reading the store's master key name failed");
        }
        if state.master.unready().is_some() {
            // Without the store's master key the keys do not open; `follow` said so once.
            continue;
        }
        if let Err(e) = reload(&state).await {
            tracing::warn!(error = %e, "reading the signing keys failed; keeping the ones held");
        }
    }
}

/// Body of `POST /v1/keys/rotate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// The current key is compromised: the new key signs at once and every older key is
    /// withdrawn at once (every token they signed dies).
    #[serde(default)]
    compromised: bool,
}

/// Answer of `POST /v1/keys/rotate`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rotated {
    /// The new key's `kid`, published now.
    kid: String,
    /// RFC 3339: when it starts signing.
    signs_from: String,
    /// The previous key's `kid`.
    previous_kid: String,
    /// RFC 3339: when the previous key is withdrawn (its tokens no longer accepted).
    previous_published_until: String,
}

/// `POST /v1/keys/rotate` (admin; `leash keys rotate`).
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "discovery",
    request_body(content = RotateRequest, description = "optional"),
    responses((status = 200, body = Rotated), ApiErrors), security(("api_key" = [])))]
pub async fn rotate(
    State(state): State<Arc<AppState>>,
    _: Admin,
    request: axum::extract::Request,
) -> ApiResult<Json<Rotated>> {
    let request: RotateRequest = optional_json(request).await?;
    rotate_now(&state, request.compromised, "admin")
        .await
        .map(Json)
}

/// Rotates the signing key now, for `actor` (`admin`, or `schedule`).
async fn rotate_now(state: &AppState, compromised: bool, actor: &str) -> ApiResult<Rotated> {
    let now = state.clock.now();
    let rows = state.store.signing_keys().await?;
    // The newest is the one key published without an end (every rotation ends the one
    // before); by time it may tie with another made in the same second.
    let newest = rows
        .iter()
        .find(|k| k.published_until.is_none())
        .ok_or_else(|| ApiError::Unavailable("the database holds no open signing key".into()))?;
    let (signs_from, previous_until) = if compromised {
        (now, now)
    } else {
        let signs_from = now.saturating_add(state.config.jwks_max_age);
        let until = signs_from
            .saturating_add(state.config.max_token_ttl)
            .saturating_add(PUBLISHED_MARGIN);
        (signs_from, until)
    };
    let row = new_key(&*state.master.sealing_key()?, now, signs_from);
    let mut event = AuditEvent::new("keys.rotated", Mode::System, now);
    event.actor = Some(actor.to_owned());
    event.reason = Some(if compromised {
        format!(
            "compromised: {} and every older key withdrawn; {} signs",
            newest.kid, row.kid
        )
    } else {
        format!("{} replaced by {}", newest.kid, row.kid)
    });
    match state
        .store
        .rotate_signing_key(&newest.kid, &row, previous_until, compromised, &event)
        .await
    {
        Ok(()) => {}
        Err(StoreError::Conflict) => {
            return Err(ApiError::Conflict(
                "another rotation happened at the same time; look at the JWKS and try again if needed".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    reload(state)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the new key cannot be read back: {e}")))?;
    tracing::warn!(kid = %row.kid, previous = %newest.kid, compromised, actor, "signing key rotated");
    Ok(Rotated {
        kid: row.kid,
        signs_from: rfc3339(signs_from),
        previous_kid: newest.kid.clone(),
        previous_published_until: rfc3339(previous_until),
    })
}

/// `[keys] rotate_every`: a planned rotation whenever the newest key is that old. Every node
/// runs this; when two find the key due at once, one rotation wins and the other is refused.
pub async fn schedule(state: Arc<AppState>, every: Duration) {
    let every_secs = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
    let mut tick =
        tokio::time::interval((every / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = match state.store.signing_keys().await {
            Ok(rows) => rows
                .iter()
                .find(|k| k.published_until.is_none())
                .is_some_and(|k| state.clock.now() >= k.created_at.saturating_add(every_secs)),
            Err(e) => {
                tracing::warn!(error = %e, "reading the signing keys for the rotation schedule failed");
                false
            }
        };
        if due {
            match rotate_now(&state, false, "schedule").await {
                Ok(_) | Err(ApiError::Conflict(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the scheduled key rotation failed; it is tried again")
                }
            }
        }
    }
}

/// A key as `GET /v1/keys` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    kid: String,
    /// Its public JWK.
    #[schema(value_type = Object)]
    jwk: Value,
    /// RFC 3339: from when it signs.
    signs_from: String,
    /// RFC 3339: until when it is published; absent while it is the newest.
    #[serde(skip_serializing_if = "Option::is_none")]
    published_until: Option<String>,
}

/// `GET /v1/keys`.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    keys: Vec<KeyView>,
}

/// `GET /v1/keys` (admin): every signing key there has been, withdrawn ones included (their
/// public halves verify the checkpoints they signed).
#[utoipa::path(get, path = "/v1/keys", tag = "discovery",
    responses((status = 200, body = KeyList), ApiErrors), security(("api_key" = [])))]
pub async fn list(State(state): State<Arc<AppState>>, _: Admin) -> ApiResult<Json<KeyList>> {
    let rows = state.store.signing_keys().await?;
    Ok(Json(KeyList {
        keys: rows
            .into_iter()
            .map(|row| KeyView {
                jwk: serde_json::from_str(&row.public_jwk).unwrap_or(Value::Null),
                kid: row.kid,
                signs_from: rfc3339(row.signs_from),
                published_until: row.published_until.map(rfc3339),
            })
            .collect(),
    }))
}
