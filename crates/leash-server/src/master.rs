//! The master key (API §3): what a node seals and opens with, and its rotation, offline
//! (`leash master-key rotate`) or online (`POST /v1/master-key/rotate`) while every node serves.
//!
//! The store names the key its values are sealed under (the setting [`MASTER_KEY_ID`], a
//! digest of the key, never the key). An online rotation re-seals everything and changes that
//! name in one transaction. Every node holds its own copy of the key and learns of the new one
//! only from its own data dir (`master.key.next`), never through the store or the network: a
//! store, a backup or an old key is never enough to learn the new key. Each node checks the
//! name every [`crate::keys::RELOAD_EVERY`]: if it holds the named key (staged), it switches
//! to it; if it does not, it stops sealing and reports itself not ready until it is given it.
//! Values a node sealed under the old key just before it switched are re-sealed afterwards
//! ([`sweep`]), by a node that still holds the old key in memory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use leash_core::aead::{AeadError, MasterKey, Opener};
use leash_core::audit::{AuditEvent, Mode};
use leash_store::{SealedPlace, Store, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use crate::bootstrap::{DELEGATION_KEY, NONCE_KEY, SIGNING_KEY};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, JsonBody};
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// The setting naming the master key the store is sealed under ([`MasterKey::id`]).
pub const MASTER_KEY_ID: &str = "master_key_id";

/// The file, next to `master.key` in the data dir, that holds the next master key: written by
/// the operator (or `leash master-key rotate`) before a rotation, moved over `master.key` after.
pub const NEXT_MASTER_KEY_FILE: &str = "master.key.next";

/// The settings that hold a value sealed under the master key (bound to their name); the
/// proxy CAs' (`proxy_ca:…`) are found by opening them.
const SEALED_SETTINGS: [&str; 4] = [
    SIGNING_KEY,
    DELEGATION_KEY,
    NONCE_KEY,
    crate::proxy::credential::KEY_SETTING,
];

/// When, after a node switched keys, values still sealed under the old one are looked for:
/// later than every other node's switch (they check every 500 ms), and again in case a write
/// was slow.
const SWEEP_AFTER: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(10),
    Duration::from_secs(60),
];

/// The keys a node holds.
struct Held {
    /// Seals; the key the store is sealed under, unless `stale`.
    current: Arc<MasterKey>,
    /// The key read from `master.key.next`, ready for a rotation; opens meanwhile.
    staged: Option<Arc<MasterKey>>,
    /// The keys this process switched from: they only open (values sealed by a node that had
    /// not switched yet), until the process ends.
    previous: Vec<Arc<MasterKey>>,
    /// The store was rotated to a key this node does not hold: it must not seal.
    stale: bool,
}

impl Held {
    fn keys(&self) -> impl Iterator<Item = &Arc<MasterKey>> {
        std::iter::once(&self.current)
            .chain(self.staged.iter())
            .chain(self.previous.iter().rev())
    }
}

impl Opener for Held {
    fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        self.keys()
            .find_map(|key| key.open(sealed, context).ok())
            .ok_or(AeadError::Open)
    }
}

/// A node's master key, switched in place by a rotation.
pub struct Master {
    held: RwLock<Arc<Held>>,
    /// `<data dir>/master.key.next`.
    staged_path: PathBuf,
    /// `<data dir>/master.key`, when the key came from there (not `LEASH_MASTER_KEY`).
    key_path: Option<PathBuf>,
    /// One rotation at a time on this node (the store decides between nodes).
    rotating: tokio::sync::Mutex<()>,
    /// An unusable staged file was logged (once, not every tick).
    staged_warned: AtomicBool,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master").field("id", &self.id()).finish()
    }
}

impl Master {
    /// A node's key; `from_file` when it was read from `<data_dir>/master.key`.
    pub fn new(key: MasterKey, data_dir: &Path, from_file: bool) -> Self {
        Self {
            held: RwLock::new(Arc::new(Held {
                current: Arc::new(key),
                staged: None,
                previous: Vec::new(),
                stale: false,
            })),
            staged_path: data_dir.join(NEXT_MASTER_KEY_FILE),
            key_path: from_file.then(|| data_dir.join("master.key")),
            rotating: tokio::sync::Mutex::new(()),
            staged_warned: AtomicBool::new(false),
        }
    }

    fn held(&self) -> Arc<Held> {
        Arc::clone(
            &self
                .held
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn replace(&self, held: Held) {
        *self
            .held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(held);
    }

    /// The id of the key this node seals with.
    pub fn id(&self) -> String {
        self.held().current.id()
    }

    /// The key to seal with; refused while the store is sealed under a key this node lacks
    /// (what it sealed, no other node could open).
    pub fn sealing_key(&self) -> ApiResult<Arc<MasterKey>> {
        let held = self.held();
        if held.stale {
            return Err(self.stale_error());
        }
        Ok(Arc::clone(&held.current))
    }

    /// Encrypts `plaintext` under the current key, bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> ApiResult<Vec<u8>> {
        Ok(self.sealing_key()?.seal(plaintext, context))
    }

    /// Opens with the current key, else the staged one (a rotation another node just made),
    /// else a previous one (a value sealed by a node that had not switched yet).
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        let held = self.held();
        if let Ok(plain) = held.open(sealed, context) {
            return Ok(plain);
        }
        // A rotation elsewhere may have come before this node's next look at its staged
        // file: look now (a small local file, and only when nothing held opens the value).
        let staged = self.read_staged().ok_or(AeadError::Open)?;
        if held.staged.as_ref().is_some_and(|k| k.id() == staged.id()) {
            return Err(AeadError::Open);
        }
        let plain = staged.open(sealed, context)?;
        self.replace(Held {
            current: Arc::clone(&held.current),
            staged: Some(staged),
            previous: held.previous.clone(),
            stale: held.stale,
        });
        Ok(plain)
    }

    /// Why this node cannot seal or serve, if it cannot.
    pub fn unready(&self) -> Option<ApiError> {
        self.held().stale.then(|| self.stale_error())
    }

    fn stale_error(&self) -> ApiError {
        ApiError::Unavailable(format!(
            "the master key was rotated and this node does not hold the new key: put it in {}",
            self.staged_path.display()
        ))
    }

    /// Reads `master.key.next` again (it may come, change or go while the node runs).
    fn read_staged(&self) -> Option<Arc<MasterKey>> {
        match read_private_key(&self.staged_path) {
            Ok(key) => {
                self.staged_warned.store(false, Ordering::Relaxed);
                key.map(Arc::new)
            }
            Err(e) => {
                if !self.staged_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "the staged master key is unusable");
                }
                None
            }
        }
    }

    /// Makes `next` the key this node seals with; the old one keeps opening. Moves the staged
    /// file over `master.key`, so that the next start has the new key.
    fn switch_to(&self, next: Arc<MasterKey>) {
        let held = self.held();
        let mut previous = held.previous.clone();
        previous.push(Arc::clone(&held.current));
        self.replace(Held {
            current: next,
            staged: None,
            previous,
            stale: false,
        });
        let installed = match &self.key_path {
            Some(key_path) => std::fs::rename(&self.staged_path, key_path),
            None => std::fs::remove_file(&self.staged_path),
        };
        if let Err(e) = installed {
            tracing::error!(error = %e, path = %self.staged_path.display(), "cannot install the new master key file; the next start settles it");
        }
        match &self.key_path {
            Some(path) => {
                tracing::warn!(path = %path.display(), "master key rotated: this node seals with the new key, which the key file now holds")
            }
            None => tracing::warn!(
                "master key rotated: this node seals with the new key; set LEASH_MASTER_KEY to it before the next start"
            ),
        }
    }
}

impl Opener for Master {
    fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        Master::open(self, sealed, context)
    }
}

/// Reads a key file that must be a private regular file; `None` if there is none. A symlink
/// (it would be installed as `master.key` pointing elsewhere) or a FIFO (reading it would
/// block) is refused before it is opened.
pub fn read_private_key(path: &Path) -> anyhow::Result<Option<MasterKey>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    if !meta.file_type().is_file() {
        anyhow::bail!(
            "{} must be a regular file (not a link, directory or pipe): copy the key there",
            path.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} can be read by others (mode {:o}): make it private first (chmod 600)",
                path.display(),
                mode & 0o777
            );
        }
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
    );
    MasterKey::from_base64(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The context a value at `place` is sealed with; `None` for a setting that is not sealed.
fn context_of(place: &SealedPlace, sealed: &[u8], opener: &dyn Opener) -> Option<Vec<u8>> {
    Some(match place {
        SealedPlace::Setting(name) => {
            if !SEALED_SETTINGS.contains(&name.as_str())
                && opener.open(sealed, name.as_bytes()).is_err()
            {
                // Not sealed (a digest, the key's id): it stays as it is.
                return None;
            }
            name.as_bytes().to_vec()
        }
        SealedPlace::Vault {
            subject,
            upstream,
            kind,
            header_name,
        } => crate::vault::context(subject, upstream, kind, header_name.as_deref()),
        SealedPlace::Preview(id) => crate::gateway::preview_context(id),
        SealedPlace::SigningKey(_) => SIGNING_KEY.as_bytes().to_vec(),
        SealedPlace::CookieJar { grant_id, upstream } => {
            crate::proxy::jar::context(grant_id, upstream)
        }
    })
}

/// Makes sure the store names the key it is sealed under: a store from before names none, and
/// gets `key`'s name once `key` is seen to open its signing key.
pub async fn ensure_named(store: &dyn Store, key: &MasterKey) -> anyhow::Result<()> {
    if let Some(sealed) = store.setting(SIGNING_KEY).await? {
        crate::keys::open_key(key, &sealed)?;
    }
    let named = store
        .init_setting(MASTER_KEY_ID, key.id().as_bytes())
        .await?;
    if named != key.id().as_bytes() {
        anyhow::bail!(
            "this database is sealed under master key {}, not {} (wrong LEASH_MASTER_KEY or master.key?)",
            String::from_utf8_lossy(&named),
            key.id()
        );
    }
    Ok(())
}

/// Re-seals everything the store keeps sealed under `old` (named `old_id`) with `new`, and
/// names `new` as the store's key, in one transaction with `event` (API §3). A value that does
/// not open with `old`, a store not named `old_id`, or a value another node changed meanwhile
/// cancels the whole change. Returns how many values were re-sealed.
pub async fn rotate(
    store: &dyn Store,
    old: &dyn Opener,
    old_id: &str,
    new: &MasterKey,
    event: Option<&AuditEvent>,
) -> anyhow::Result<usize> {
    let new_id = new.id();
    let reseal = |place: &SealedPlace, sealed: &[u8]| {
        if *place == SealedPlace::Setting(MASTER_KEY_ID.into()) {
            if sealed != old_id.as_bytes() {
                return Err(format!(
                    "the store is sealed under master key {}, not {old_id}: it was rotated meanwhile; nothing was changed",
                    String::from_utf8_lossy(sealed)
                ));
            }
            return Ok(Some(new_id.as_bytes().to_vec()));
        }
        let Some(context) = context_of(place, sealed, old) else {
            return Ok(None);
        };
        let plain = old.open(sealed, &context).map_err(|_| {
            format!("{place:?} does not open with the current master key; nothing was changed")
        })?;
        Ok(Some(new.seal(&plain, &context)))
    };
    match store.reseal_all(&reseal, event).await {
        Ok(n) => Ok(n),
        Err(StoreError::Conflict) => anyhow::bail!(
            "a sealed value changed while it was re-sealed (a node wrote it); nothing was changed: try again"
        ),
        Err(e) => Err(e.into()),
    }
}

/// Finishes or undoes a master-key rotation a crash interrupted, at start: with
/// `master.key.next` in the data dir and the key from `master.key`, the one the store names
/// (or, in a store from before names, the one that opens its signing key) is the key, and
/// `master.key` holds it. A staged key the store is not sealed under yet stays staged, for an
/// online rotation. Returns the key to use.
pub async fn settle(
    store: &dyn Store,
    data_dir: &Path,
    current: MasterKey,
) -> anyhow::Result<MasterKey> {
    let next_path = data_dir.join(NEXT_MASTER_KEY_FILE);
    let next = match read_private_key(&next_path) {
        Ok(Some(next)) => next,
        Ok(None) => return Ok(current),
        Err(e) => {
            // Never the key the store is under (a rotation never takes such a file): the
            // current key opens the store or the start fails on that, saying so.
            tracing::warn!(error = %e, "the staged master key is unusable; it is ignored");
            return Ok(current);
        }
    };
    let sealed = store.setting(SIGNING_KEY).await?;
    let opens = |key: &MasterKey| {
        sealed
            .as_deref()
            .is_some_and(|s| key.open(s, SIGNING_KEY.as_bytes()).is_ok())
    };
    if opens(&next) {
        std::fs::rename(&next_path, data_dir.join("master.key"))
            .map_err(|e| anyhow::anyhow!("cannot install {}: {e}", next_path.display()))?;
        tracing::warn!("finished an interrupted master-key rotation: master.key is the new key");
        Ok(next)
    } else if opens(&current) || sealed.is_none() {
        tracing::info!(
            key = %next.id(),
            "a new master key is staged in {NEXT_MASTER_KEY_FILE}: the store is not sealed under it yet"
        );
        Ok(current)
    } else {
        anyhow::bail!(
            "neither master.key nor {NEXT_MASTER_KEY_FILE} opens this database's signing key"
        )
    }
}

/// Re-seals under this node's key the values still sealed under a key it held before (sealed
/// by a node that had not switched yet); values it cannot open are left for a node that can.
pub async fn sweep(store: &dyn Store, master: &Master) -> anyhow::Result<usize> {
    let held = master.held();
    if held.stale {
        return Ok(0);
    }
    let reseal = |place: &SealedPlace, sealed: &[u8]| {
        if *place == SealedPlace::Setting(MASTER_KEY_ID.into()) {
            return Ok(None);
        }
        let Some(context) = context_of(place, sealed, held.as_ref()) else {
            return Ok(None);
        };
        if held.current.open(sealed, &context).is_ok() {
            return Ok(None);
        }
        Ok(held
            .open(sealed, &context)
            .ok()
            .map(|plain| held.current.seal(&plain, &context)))
    };
    Ok(store.reseal_all(&reseal, None).await?)
}

fn sweep_later(state: &Arc<AppState>) {
    let state = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut waited = Duration::ZERO;
        for after in SWEEP_AFTER {
            tokio::time::sleep(after.saturating_sub(waited)).await;
            waited = after;
            let Some(state) = state.upgrade() else { return };
            match sweep(state.store.as_ref(), &state.master).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    values = n,
                    "re-sealed values a node sealed under the old master key"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "looking for values under the old master key failed; trying again later")
                }
            }
        }
    });
}

/// Follows the store's key: reads the staged file, and switches when the store names the
/// staged key (a rotation on another node). Run before the signing keys are read, so that
/// they open.
pub async fn follow(state: &Arc<AppState>) -> anyhow::Result<()> {
    let master = &state.master;
    // A rotation on this node switches by itself.
    let Ok(_one) = master.rotating.try_lock() else {
        return Ok(());
    };
    let staged = master.read_staged();
    let named = state.store.setting(MASTER_KEY_ID).await?;
    let held = master.held();
    let current_id = held.current.id();
    let named = named.map(|n| String::from_utf8_lossy(&n).into_owned());
    match named {
        Some(named) if named != current_id => {
            if let Some(next) = staged.filter(|k| k.id() == named) {
                master.switch_to(next);
                sweep_later(state);
            } else {
                if !held.stale {
                    tracing::error!(
                        store = %named, node = %current_id,
                        "the master key was rotated to a key this node does not hold: it stops sealing and is not ready until the key is put in {}",
                        master.staged_path.display()
                    );
                }
                master.replace(Held {
                    current: Arc::clone(&held.current),
                    staged: None,
                    previous: held.previous.clone(),
                    stale: true,
                });
            }
        }
        _ => {
            let staged_id = staged.as_ref().map(|k| k.id());
            if held.stale || held.staged.as_ref().map(|k| k.id()) != staged_id {
                master.replace(Held {
                    current: Arc::clone(&held.current),
                    staged,
                    previous: held.previous.clone(),
                    stale: false,
                });
            }
        }
    }
    Ok(())
}

/// Body of `POST /v1/master-key/rotate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyRotateRequest {
    /// The id of the new key (`leash master-key id --key-file F`): the key itself never
    /// crosses the network. It must be staged in this node's `master.key.next`, and in every
    /// other node's, before.
    new_key_id: String,
}

/// Answer of `POST /v1/master-key/rotate`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MasterKeyRotated {
    /// The id of the key the store is now sealed under.
    key_id: String,
    /// The id of the key it replaced.
    previous_key_id: String,
    /// How many values were re-sealed.
    resealed: usize,
}

/// `POST /v1/master-key/rotate` (admin; `leash master-key rotate --online`).
#[utoipa::path(post, path = "/v1/master-key/rotate", tag = "operations",
    request_body = MasterKeyRotateRequest,
    responses((status = 200, body = MasterKeyRotated), ApiErrors), security(("api_key" = [])))]
pub async fn rotate_online(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonBody(request): JsonBody<MasterKeyRotateRequest>,
) -> ApiResult<Json<MasterKeyRotated>> {
    let master = &state.master;
    let _one = master.rotating.lock().await;
    let staged = read_private_key(&master.staged_path)
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "no new key is staged on this node: write it to {} (mode 0600) on every node first",
                master.staged_path.display()
            ))
        })?;
    if staged.id() != request.new_key_id {
        return Err(ApiError::Conflict(format!(
            "the key staged on this node is {}, not {}",
            staged.id(),
            request.new_key_id
        )));
    }
    let held = master.held();
    if held.stale {
        return Err(master.stale_error());
    }
    let previous_id = held.current.id();
    if staged.id() == previous_id {
        return Err(ApiError::InvalidRequest(
            "the new key is the current key".into(),
        ));
    }
    let mut event = AuditEvent::new("master_key.rotated", Mode::System, state.clock.now());
    event.actor = Some("admin".into());
    event.reason = Some(format!("{previous_id} replaced by {}", staged.id()));
    let resealed = rotate(
        state.store.as_ref(),
        held.as_ref(),
        &previous_id,
        &staged,
        Some(&event),
    )
    .await
    .map_err(|e| ApiError::Conflict(format!("master key not rotated: {e}")))?;
    master.switch_to(Arc::new(staged));
    sweep_later(&state);
    Ok(Json(MasterKeyRotated {
        key_id: master.id(),
        previous_key_id: previous_id,
        resealed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master_in(dir: &Path) -> (Master, String) {
        let key = MasterKey::generate();
        let id = key.id();
        (Master::new(key, dir, true), id)
    }

    #[test]
    fn a_node_opens_with_its_staged_and_previous_keys_and_seals_with_the_current() {
        let dir = tempfile::tempdir().unwrap();
        let (master, first) = master_in(dir.path());
        let old_value = master.seal(b"old", b"ctx").unwrap();
        let next = MasterKey::generate();
        let next_id = next.id();
        let from_next = next.seal(b"new", b"ctx");
        // Not staged: a value under another key does not open.
        assert!(master.open(&from_next, b"ctx").is_err());
        crate::files::write_private(
            &dir.path().join(NEXT_MASTER_KEY_FILE),
            next.to_base64().as_bytes(),
            crate::files::IfExists::Fail,
        )
        .unwrap();
        let staged = master.read_staged().unwrap();
        master.replace(Held {
            current: Arc::clone(&master.held().current),
            staged: Some(staged),
            previous: Vec::new(),
            stale: false,
        });
        assert_eq!(&*master.open(&from_next, b"ctx").unwrap(), b"new");
        master.switch_to(Arc::new(next));
        assert_eq!(master.id(), next_id);
        assert_ne!(master.id(), first);
        // The old key still opens what a slower node sealed; sealing uses the new one only.
        assert_eq!(&*master.open(&old_value, b"ctx").unwrap(), b"old");
        let sealed_now = master.seal(b"x", b"ctx").unwrap();
        let only_new = MasterKey::from_base64(
            &std::fs::read_to_string(dir.path().join("master.key")).unwrap(),
        )
        .unwrap();
        assert_eq!(&*only_new.open(&sealed_now, b"ctx").unwrap(), b"x");
        assert!(!dir.path().join(NEXT_MASTER_KEY_FILE).exists());
    }

    #[test]
    fn a_stale_node_refuses_to_seal_and_says_where_the_key_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (master, _) = master_in(dir.path());
        let held = master.held();
        master.replace(Held {
            current: Arc::clone(&held.current),
            staged: None,
            previous: Vec::new(),
            stale: true,
        });
        let refused = master.seal(b"x", b"ctx").unwrap_err();
        assert!(
            refused.to_string().contains(NEXT_MASTER_KEY_FILE),
            "{refused}"
        );
        assert!(master.unready().is_some());
    }

    #[test]
    fn a_value_under_a_key_staged_since_the_last_look_opens_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (master, _) = master_in(dir.path());
        let next = MasterKey::generate();
        let from_next = next.seal(b"new", b"ctx");
        crate::files::write_private(
            &dir.path().join(NEXT_MASTER_KEY_FILE),
            next.to_base64().as_bytes(),
            crate::files::IfExists::Fail,
        )
        .unwrap();
        // No tick has read the file yet.
        assert!(master.held().staged.is_none());
        assert_eq!(&*master.open(&from_next, b"ctx").unwrap(), b"new");
        assert!(
            master
                .open(&MasterKey::generate().seal(b"x", b"ctx"), b"ctx")
                .is_err()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_staged_link_or_pipe_is_refused_without_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("new.key");
        crate::files::write_private(
            &target,
            MasterKey::generate().to_base64().as_bytes(),
            crate::files::IfExists::Fail,
        )
        .unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let refused = read_private_key(&link).unwrap_err().to_string();
        assert!(refused.contains("regular file"), "{refused}");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg("-m600")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Would block for ever if it were opened.
        let refused = read_private_key(&fifo).unwrap_err().to_string();
        assert!(refused.contains("regular file"), "{refused}");
    }

    #[test]
    fn a_staged_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NEXT_MASTER_KEY_FILE);
        std::fs::write(&path, MasterKey::generate().to_base64().as_bytes()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let refused = read_private_key(&path).unwrap_err().to_string();
            assert!(refused.contains("chmod 600"), "{refused}");
        }
    }
}
