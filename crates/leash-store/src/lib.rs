//! Leash's storage: one [`Store`] interface, implemented once (`repo::Repo`) over the embedded
//! SQLite database ([`SqliteStore`]) and, in cluster mode, PostgreSQL ([`PgStore`]). What the
//! backends share is written once: the statements (`queries`), the row mapping and memos
//! (`common`), the rules by which a group commit judges each request (`rules`), the audit
//! chain's head (`chain`). What is theirs alone: the group-commit writer (`sqlite::writer`,
//! `postgres::writer`), change notification across nodes (PostgreSQL), revoked-token lookup,
//! pruning, and the SQLite log's upkeep (`wal`). Migrations live per backend under
//! `migrations/`. [`open_audit_reader`] reads a store's audit trail without touching it.

mod batch_thread;
mod chain;
mod common;
mod postgres;
mod queries;
mod reader;
mod repo;
mod rules;
mod sqlite;
#[cfg(test)]
mod tests;
pub mod wal;

use std::sync::Arc;

use async_trait::async_trait;
use leash_core::audit::{AuditEvent, Checkpoint};
use leash_core::dpop::ReplayKey;
use leash_core::grant::{Grant, GrantStatus};
use leash_core::secret::SecretDigest;

pub use postgres::PgStore;
pub use reader::{AuditReader, open_audit_reader};
pub use sqlite::SqliteStore;

/// Storage failures. Callers map `Unavailable` to 503: a store failure never reads as "no".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the statement failed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A row with this key exists already.
    #[error("already exists")]
    Conflict,
    /// A stored row could not be read back (corruption or a newer schema).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The operation does not exist for this backend.
    #[error("{0}")]
    Unsupported(String),
    /// The database URL is not one this build supports.
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// Another store holds the SQLite database (another `leash serve`, here or in another
    /// process): a SQLite database has one owner, since its writer keeps what single use
    /// rests on in memory.
    #[error(
        "database {database} is in use by another Leash server (lock file {lock}); \
         stop it first, or use PostgreSQL for several nodes"
    )]
    InUse {
        /// The database file.
        database: String,
        /// The lock file its owner holds.
        lock: String,
    },
    /// The database holds no Leash schema (a wrong URL, or no server has started on it), so
    /// there is nothing to read.
    #[error("{0}")]
    NotLeash(String),
}

/// Result of storage calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A human user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `usr_…`.
    pub id: String,
    /// Unique display name.
    pub name: String,
    /// Creation time.
    pub created_at: i64,
    /// Disabled by the admin: no session or API key of theirs works.
    pub disabled: bool,
}

/// A browser session of a human (API §13), found by the digest of its cookie's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Whose it is (never a disabled human: their sessions are deleted).
    pub user: User,
    /// Whether the ID token's groups made the human an admin at login.
    pub admin: bool,
    /// Login time.
    pub created_at: i64,
    /// Last use, kept to within a minute (for the idle end).
    pub last_seen: i64,
    /// Absolute end.
    pub expires_at: i64,
}

/// A login under way: what `/login` bound to the browser's login cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The OAuth `state` sent to the IdP.
    pub state: String,
    /// The OIDC `nonce` the ID token must carry.
    pub nonce: String,
    /// The PKCE code verifier.
    pub verifier: String,
    /// The same-origin path to go to once logged in.
    pub return_to: String,
    /// When the login can no longer complete.
    pub expires_at: i64,
}

/// A token-signing key (API §3): it signs from `signs_from` until the next key's `signs_from`,
/// and is published (and accepted) until `published_until`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKeyRow {
    /// Its JWKS `kid`.
    pub kid: String,
    /// The private key, sealed under the master key.
    pub sealed: Vec<u8>,
    /// Its public JWK (JSON), kept for verifying old checkpoints.
    pub public_jwk: String,
    /// When it was made.
    pub created_at: i64,
    /// From when it signs tokens and checkpoints.
    pub signs_from: i64,
    /// Until when it is published and accepted; none: for as long as it is the newest.
    pub published_until: Option<i64>,
}

impl std::fmt::Debug for SigningKeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRow")
            .field("kid", &self.kid)
            .field("signs_from", &self.signs_from)
            .field("published_until", &self.published_until)
            .finish_non_exhaustive()
    }
}

/// The setting `leash restore` leaves in a restored store: its first start rolls it back
/// ([`Store::finish_restore`]).
pub const RESTORE_PENDING: &str = "restore_pending";

/// What the first start after a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// The snapshot's last event, `(seq, hash)`, if it had any.
    pub last_event: Option<(i64, String)>,
    /// Grants revoked.
    pub grants_revoked: u64,
    /// Approvals that were pending, now expired.
    pub approvals_expired: u64,
    /// Sessions ended.
    pub sessions_ended: u64,
}

/// Where a value sealed under the master key is kept; its AEAD context derives from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedPlace {
    /// A server-wide setting, by name (not every setting is sealed).
    Setting(String),
    /// A human's credential.
    Vault {
        /// The human.
        subject: String,
        /// The upstream.
        upstream: String,
        /// Its kind.
        kind: String,
        /// The header name of a `header` credential.
        header_name: Option<String>,
    },
    /// An approval's body preview, by the approval's id.
    Preview(String),
    /// A token-signing key, by its `kid`.
    SigningKey(String),
    /// The forward proxy's cookie jar of a grant for an upstream.
    CookieJar {
        /// The grant.
        grant_id: String,
        /// The upstream.
        upstream: String,
    },
}

/// How [`Store::reseal_all`] re-seals one value: the value sealed anew, `Ok(None)` to leave it
/// (a setting that is not sealed), or an error that cancels the whole change.
pub type Resealer<'a> =
    dyn Fn(&SealedPlace, &[u8]) -> Result<Option<Vec<u8>>, String> + Send + Sync + 'a;

/// An OAuth connection under way (API §17): what `POST /v1/vault/{upstream}/connect` bound to
/// its `state`.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthConnect {
    /// The human connecting.
    pub subject: String,
    /// The upstream connected.
    pub upstream: String,
    /// The digest of the browser session that started it, if a session did.
    pub session_digest: Option<String>,
    /// The PKCE code verifier.
    pub verifier: String,
    /// When the connection can no longer complete.
    pub expires_at: i64,
}

impl std::fmt::Debug for OAuthConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthConnect")
            .field("subject", &self.subject)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// A registered agent (workload identity).
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    /// Its URI, normally a SPIFFE ID.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Its public JWK set as registered.
    pub jwks: serde_json::Value,
    /// Offboarded: no new tokens.
    pub disabled: bool,
    /// Registration time.
    pub created_at: i64,
}

/// A human's credential for one upstream; `sealed` is AEAD ciphertext under the master key.
#[derive(Clone, PartialEq, Eq)]
pub struct VaultEntry {
    /// The human.
    pub subject: String,
    /// The upstream it is for.
    pub upstream: String,
    /// `bearer`, `cookie` or `header`.
    pub kind: String,
    /// The header name for `header` credentials.
    pub header_name: Option<String>,
    /// The sealed secret.
    pub sealed: Vec<u8>,
    /// When the credential stops being injected.
    pub expires_at: Option<i64>,
    /// When it was stored.
    pub created_at: i64,
    /// An OAuth connection whose refresh failed for good: the human must connect again.
    pub reconnect: bool,
    /// Grows with every write of the row (a refresh is stored only over the row it was made
    /// from); a new entry is stored at version 0 or above the one it replaces.
    pub version: i64,
    /// After an OAuth refresh that failed for a passing reason: no new try before then.
    pub retry_at: Option<i64>,
}

impl std::fmt::Debug for VaultEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultEntry")
            .field("subject", &self.subject)
            .field("upstream", &self.upstream)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Where an approval stands, as stored; `expired` is derived ([`Approval::status_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalStatus {
    /// Waiting for the human.
    Pending,
    /// Approved, not used yet.
    Approved,
    /// Refused by the human.
    Denied,
    /// Approved and spent on its one request.
    Used,
    /// Pending or approved past its expiry (never stored).
    Expired,
}

impl ApprovalStatus {
    /// The wire and column name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Used => "used",
            Self::Expired => "expired",
        }
    }

    /// Parses a wire or column name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Approved,
            Self::Denied,
            Self::Used,
            Self::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A step-up approval, bound to one exact request (API §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// `apr_…`.
    pub id: String,
    /// The grant the request was made under.
    pub grant_id: String,
    /// The grant's human: the one who decides.
    pub subject: String,
    /// The agent that asked.
    pub agent: String,
    /// The action of the request.
    pub action: String,
    /// The upstream.
    pub upstream: String,
    /// The request method.
    pub method: String,
    /// The upstream path (after `/gw/{upstream}`).
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Hex SHA-256 of the request body.
    pub body_sha256: String,
    /// Size of the body in bytes.
    pub body_size: i64,
    /// The request headers forwarded with it, as `(name, value)` for the human to see (values
    /// that are not UTF-8 shown lossily).
    pub headers: Vec<(String, String)>,
    /// Hex SHA-256 of those headers' exact bytes: what a retry's must equal.
    pub headers_sha256: String,
    /// Whether its body was kept (sealed) for the human to see ([`Store::approval_preview`]).
    pub previewed: bool,
    /// Stored status.
    pub status: ApprovalStatus,
    /// When the agent asked.
    pub requested_at: i64,
    /// When it stops being usable.
    pub expires_at: i64,
    /// When the human decided.
    pub decided_at: Option<i64>,
    /// Who decided (a user id, or `admin`).
    pub approver: Option<String>,
}

impl Approval {
    /// The status at `now`: pending or approved past the expiry reads as expired.
    pub fn status_at(&self, now: i64) -> ApprovalStatus {
        match self.status {
            ApprovalStatus::Pending | ApprovalStatus::Approved if now >= self.expires_at => {
                ApprovalStatus::Expired
            }
            status => status,
        }
    }
}

/// What a one-time value is: it names the value in a refusal ([`UseVerdict::Replayed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OneTimeKind {
    /// A DPoP proof's `jti`.
    Proof,
    /// A client assertion's `jti`.
    Assertion,
    /// A token's one use of a `single_use` action (API §2).
    SingleUse,
}

/// A value that may be used once, cluster-wide and across restarts: remembered until
/// `keep_until` (past the expiry of what carries it), then pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneTimeUse {
    /// What the value is.
    pub kind: OneTimeKind,
    /// Its key (`dpop::replay_key`).
    pub key: ReplayKey,
    /// Until when it must be remembered.
    pub keep_until: i64,
}

/// What one request uses, for [`Store::record_use`].
#[derive(Debug, Clone, Default)]
pub struct RequestUse {
    /// Its proof's and assertion's one-time values: all are consumed, or none.
    pub once: Vec<OneTimeUse>,
    /// The token's one use of a `single_use` action (API §2). Checked with `once`, all or
    /// nothing, but consumed only when the use is recorded: a request refused for any reason
    /// leaves it unused. Seen before → [`UseVerdict::Replayed`] of [`OneTimeKind::SingleUse`].
    pub single_use: Option<SingleUse>,
    /// The `jti` of the access token the request presents: a token revoked by the time the use
    /// commits is refused ([`UseVerdict::TokenRevoked`]) and nothing of the use is counted or
    /// spent but its one-time values. Set it together with `grant`: on PostgreSQL the check is
    /// ordered against revocations by the lock on the grant's row, which a revocation takes too.
    pub token: Option<String>,
    /// The grant whose budget the request counts against.
    pub grant: Option<String>,
    /// The grant a token exchange issues a token for: it must still be active, unexpired and
    /// under its `max_requests` when the use commits (else [`UseVerdict::GrantSpent`]), so a
    /// grant ended after it was read issues no token. It is not counted.
    pub exchanged_grant: Option<String>,
    /// The time of the request (a grant expired at `now` is spent).
    pub now: i64,
    /// An approved approval the request spends (its single use).
    pub approval: Option<String>,
    /// The sealed body of `pending_approval`, kept for the human until it is decided.
    pub pending_preview: Option<Vec<u8>>,
    /// A new pending approval the request waits for, stored only when the use is recorded
    /// ([`UseVerdict::Recorded`]), in the same transaction as its one-time values and its audit
    /// event, so that neither is stored without the other.
    pub pending_approval: Option<Box<Approval>>,
    /// The most approvals its grant may have pending at once (API §7 `max_pending_approvals`):
    /// a new one over it is not stored ([`UseVerdict::TooManyPending`]). `None`: no limit.
    pub max_pending_approvals: Option<u32>,
    /// The audit event of the request, appended to the chain in the same transaction. If the
    /// verdict is not [`UseVerdict::Recorded`], it is stored as a deny with the verdict's
    /// [`UseVerdict::reason`].
    pub audit: Option<AuditEvent>,
}

impl RequestUse {
    /// Whether it asks nothing of the store (then nothing is written).
    pub fn is_empty(&self) -> bool {
        self.once.is_empty()
            && self.single_use.is_none()
            && self.token.is_none()
            && self.grant.is_none()
            && self.exchanged_grant.is_none()
            && self.approval.is_none()
            && self.pending_approval.is_none()
            && self.audit.is_none()
    }

    /// Every one-time value it checks: `once`, then the single use.
    pub(crate) fn one_time_values(&self) -> impl Iterator<Item = &OneTimeUse> {
        self.once
            .iter()
            .chain(self.single_use.as_ref().map(|single| &single.value))
    }

    /// The values a recorded use consumes: `once`, then the single use if it is spent.
    pub(crate) fn consumed(&self) -> impl Iterator<Item = &OneTimeUse> {
        self.once.iter().chain(
            self.single_use
                .as_ref()
                .filter(|single| single.spend)
                .map(|single| &single.value),
        )
    }
}

/// A token's use of a `single_use` action: a one-time value like a proof's `jti`, kept in the
/// same replay store (so it is cluster-wide and survives restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleUse {
    /// `dpop::replay_key("single_use", <token jti>, <action>)`, kept past the token's expiry.
    pub value: OneTimeUse,
    /// Whether a recorded use consumes it. A request that only asks for an approval checks it
    /// (a token that used the action is refused before a human is asked) but leaves it for the
    /// approved retry.
    pub spend: bool,
}

/// The outcome of [`Store::record_use`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseVerdict {
    /// Everything was new and is now stored; the grant (if any) was counted.
    Recorded,
    /// A one-time value of this kind was seen before; nothing was stored. Of the single use:
    /// the token used its single use of the action before.
    Replayed(OneTimeKind),
    /// The grant is not active any more, has expired, or its `max_requests` are used up.
    GrantSpent,
    /// The approval is not (or no longer) approved and unexpired: used, denied or expired.
    ApprovalSpent,
    /// The token was revoked ([`RequestUse::token`]).
    TokenRevoked,
    /// The grant has [`RequestUse::max_pending_approvals`] approvals pending already; the new
    /// one was not stored.
    TooManyPending,
}

impl UseVerdict {
    /// The error code a refused request is answered with and audited under.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Recorded => None,
            Self::Replayed(OneTimeKind::SingleUse) => Some("single_use_spent"),
            Self::Replayed(OneTimeKind::Proof | OneTimeKind::Assertion) => Some("replayed"),
            Self::GrantSpent => Some("grant_spent"),
            Self::ApprovalSpent => Some("approval_spent"),
            Self::TokenRevoked => Some("token_revoked"),
            Self::TooManyPending => Some("too_many_pending_approvals"),
        }
    }
}

/// Which audit events to read (API §8): `seq` > `since_seq`, oldest first, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this grant's events.
    pub grant_id: Option<String>,
    /// Only this actor's events.
    pub actor: Option<String>,
    /// Only events on behalf of this human.
    pub subject: Option<String>,
    /// Events after this seq.
    pub since_seq: u64,
    /// At most this many.
    pub limit: u32,
}

/// How often a grant's action was used through the gateway (forwarded requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionUse {
    /// The grant.
    pub grant_id: String,
    /// The action.
    pub action: String,
    /// Forwarded requests.
    pub count: u64,
    /// The last one's time.
    pub last_used: i64,
}

/// Signs the chain head `(seq, hash)`; held by the store's writer, which writes a checkpoint
/// at least every [`CHECKPOINT_EVERY_EVENTS`] events.
pub type CheckpointSigner = Arc<dyn Fn(u64, &str) -> Option<Checkpoint> + Send + Sync>;

/// Most events between two checkpoints (API §8).
pub const CHECKPOINT_EVERY_EVENTS: u64 = 1_000;

/// How a grant ended, for [`Store::end_grant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantEnd {
    /// The task is done.
    Completed,
    /// Revoked by the human or an admin.
    Revoked,
}

impl GrantEnd {
    fn status(self) -> GrantStatus {
        match self {
            Self::Completed => GrantStatus::Completed,
            Self::Revoked => GrantStatus::Revoked,
        }
    }
}

/// The repository interface; every backend implements all of it with the same behaviour.
///
/// A management change (user, agent, grant, approval decision, vault, token revocation) takes
/// its audit event (`event`) and stores it in the change's own transaction, in an outbox, when
/// the change takes effect; the chain's one appender then moves it into the chain before the
/// call returns. So a change is never stored without its event, whatever fails or dies in
/// between: an event left in the outbox (the append failed, or the process was killed) joins
/// the chain at the next change, checkpoint or start, and the call that made the change still
/// succeeds (its change and its event are both durable; the failure is logged).
/// The store's figures in `GET /metrics` (API §11), read when scraped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreGauges {
    /// Grants whose tokens may be used now (`Grant::is_live`: active, in time, budget left).
    pub live_grants: u64,
    /// The audit lag: events of changes already stored that have yet to join the chain (the
    /// outbox; nonzero for long only while the chain cannot be written).
    pub audit_outbox: u64,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Whether the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// What `GET /metrics` reports of the store at `now` (API §11).
    async fn gauges(&self, now: i64) -> StoreResult<StoreGauges>;

    /// Re-seals every value sealed under the master key (settings, vault, signing keys,
    /// previews) with `reseal`, in one transaction with `event`: all or nothing, so a failure
    /// or a crash midway leaves every value as it was. A value another writer changed after it
    /// was read cancels everything with `Conflict` (nodes may serve meanwhile). Returns how
    /// many values changed.
    async fn reseal_all(
        &self,
        reseal: &Resealer<'_>,
        event: Option<&AuditEvent>,
    ) -> StoreResult<usize>;
    /// Writes a consistent copy of the database to `path`, a file that must not exist (SQLite;
    /// `Unsupported` on PostgreSQL, which has pg_dump), while the server serves.
    async fn backup_to(&self, path: &std::path::Path) -> StoreResult<()>;
    /// After a restore (API §3; the setting [`RESTORE_PENDING`] marks one), the rollback's
    /// first start, in one transaction: every grant still active revoked (`restored`), pending
    /// approvals expired, sessions and logins and connections under way ended, every signing
    /// key withdrawn and `next_key` added, the mark removed; `restored` (naming the snapshot's
    /// last event) is the first event after the snapshot's, then `rotated`. `None` if no
    /// restore is pending (nothing done).
    async fn finish_restore(
        &self,
        now: i64,
        next_key: &SigningKeyRow,
        restored: &mut AuditEvent,
        rotated: &AuditEvent,
    ) -> StoreResult<Option<RestoreReport>>;
    /// Every token-signing key, oldest first.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>>;
    /// Stores the first signing key if no key of that `kid` exists (nodes starting together
    /// all offer the same one).
    async fn init_signing_key(&self, key: &SigningKeyRow) -> StoreResult<()>;
    /// Rotation: ends the publication of `newest` (the one key published without an end) at
    /// `previous_until` and adds `next`, in one transaction with `event`; with `withdraw_all`,
    /// every key published after `previous_until` ends then too (a compromise). `Conflict` if
    /// `newest` is no longer the newest (another rotation won).
    async fn rotate_signing_key(
        &self,
        newest: &str,
        next: &SigningKeyRow,
        previous_until: i64,
        withdraw_all: bool,
        event: &AuditEvent,
    ) -> StoreResult<()>;
    /// A server-wide setting, if set.
    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;
    /// A grant's cookie jar for one upstream (the forward proxy's, API §16), sealed.
    async fn cookie_jar(&self, grant_id: &str, upstream: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Stores a grant's cookie jar for one upstream, replacing the one stored; false (nothing
    /// stored) if the grant is no longer active. Completing or revoking the grant deletes its
    /// jars, and so does the pruner once the grant ended otherwise.
    async fn put_cookie_jar(
        &self,
        grant_id: &str,
        upstream: &str,
        sealed: &[u8],
        now: i64,
    ) -> StoreResult<bool>;
    /// Sets `name` to `value` unless it is set; returns the value that holds afterwards
    /// (so nodes racing to initialise agree on one value).
    async fn init_setting(&self, name: &str, value: &[u8]) -> StoreResult<Vec<u8>>;

    /// Adds a user; `Conflict` if the name is taken.
    async fn create_user(
        &self,
        user: &User,
        key: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<()>;
    /// The user owning an API key, unless disabled.
    async fn user_by_key(&self, key: &SecretDigest) -> StoreResult<Option<User>>;
    /// All users.
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    /// The human an OIDC provider knows as (`issuer`, `subject`), disabled or not; if there is
    /// none, `new` is stored as that human (with `key`, a digest of a key nobody holds, and
    /// `event`) and returned, renamed `name (id)` when its name is taken.
    async fn oidc_user(
        &self,
        issuer: &str,
        subject: &str,
        new: &User,
        key: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<User>;
    /// Disables a human, deletes their sessions and revokes their active grants, in one
    /// transaction; false if unknown (and then no event).
    async fn disable_user(&self, id: &str, now: i64, event: &AuditEvent) -> StoreResult<bool>;

    /// Stores a new session under the digest of its id, with its login's event.
    async fn create_session(
        &self,
        id: &SecretDigest,
        session: &Session,
        event: &AuditEvent,
    ) -> StoreResult<()>;
    /// A session by the digest of its id, with its human (none once the human is disabled).
    async fn session(&self, id: &SecretDigest) -> StoreResult<Option<Session>>;
    /// Records a session's use at `now`.
    async fn touch_session(&self, id: &SecretDigest, now: i64) -> StoreResult<()>;
    /// Deletes a session; `event` is written only if there was one. False if there was none.
    async fn end_session(&self, id: &SecretDigest, event: &AuditEvent) -> StoreResult<bool>;
    /// Stores a login under way under the digest of its cookie's value.
    async fn create_login(&self, id: &SecretDigest, login: &Login) -> StoreResult<()>;
    /// Takes (deletes and returns) a login under way: a second take finds nothing.
    async fn take_login(&self, id: &SecretDigest) -> StoreResult<Option<Login>>;
    /// Stores an OAuth connection under way under the digest of its `state`.
    async fn create_connect(&self, state: &SecretDigest, connect: &OAuthConnect)
    -> StoreResult<()>;
    /// Takes (deletes and returns) an OAuth connection under way: a second take finds nothing.
    async fn take_connect(&self, state: &SecretDigest) -> StoreResult<Option<OAuthConnect>>;

    /// Registers an agent; `Conflict` if the id is taken.
    async fn create_agent(&self, agent: &Agent, event: &AuditEvent) -> StoreResult<()>;
    /// One agent.
    async fn agent(&self, id: &str) -> StoreResult<Option<Agent>>;
    /// All agents.
    async fn list_agents(&self) -> StoreResult<Vec<Agent>>;
    /// Disables an agent and revokes its active grants in one transaction; false if unknown
    /// (and then no event).
    async fn disable_agent(&self, id: &str, now: i64, event: &AuditEvent) -> StoreResult<bool>;

    /// Stores a new grant with the digest of its handle.
    async fn create_grant(
        &self,
        grant: &Grant,
        handle: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<()>;
    /// One grant.
    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>>;
    /// The grant a handle was issued for, with its agent (one round trip for the token
    /// endpoint's hot path).
    async fn grant_by_handle(&self, handle: &SecretDigest) -> StoreResult<Option<(Grant, Agent)>>;
    /// Grants, all or of one human, newest first.
    async fn list_grants(&self, subject: Option<&str>) -> StoreResult<Vec<Grant>>;
    /// Moves an active, unexpired grant to a terminal status (a compare-and-set); `None` if it
    /// was not active any more (and then no event), else the grant as it now is.
    async fn end_grant(
        &self,
        id: &str,
        end: GrantEnd,
        reason: Option<&str>,
        now: i64,
        event: &AuditEvent,
    ) -> StoreResult<Option<Grant>>;

    /// The grant a token names, for the per-request liveness check: held in memory and dropped
    /// from it whenever the grant ends or its budget runs out, so its status, expiry and
    /// exhaustion are exact; only `requests_used` below `max_requests` may lag.
    async fn live_grant(&self, id: &str) -> StoreResult<Option<Arc<Grant>>>;
    /// Commits what a request that passed its checks uses, in one durable transaction (group
    /// committed with other requests) before it acts: its one-time values, the approval it
    /// spends or waits for, its single use of an action, one count against its grant's budget,
    /// and its audit event, after checking that its token is not revoked and the grant it
    /// exchanges is live. Nothing is counted or stored when a value was seen before; the values
    /// of `once` stay consumed when the token, grant or approval turns out spent (the request is
    /// refused either way), but nothing else is counted, spent or stored then.
    async fn record_use(&self, request: RequestUse) -> StoreResult<UseVerdict>;

    /// One approval.
    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>>;
    /// The sealed body kept for a pending approval, if one was and it is not decided or pruned.
    async fn approval_preview(&self, id: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Approvals, all or of one human, newest first.
    async fn list_approvals(&self, subject: Option<&str>) -> StoreResult<Vec<Approval>>;
    /// Approves or denies a pending, unexpired approval (a compare-and-set); `None` if it was
    /// not pending any more or has expired (and then no event), else the approval as it now is.
    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        approver: &str,
        now: i64,
        event: &AuditEvent,
    ) -> StoreResult<Option<Approval>>;

    /// Stores (or replaces) a human's credential for an upstream.
    async fn put_credential(&self, entry: &VaultEntry, event: &AuditEvent) -> StoreResult<()>;
    /// A human's credential for an upstream.
    async fn credential(&self, subject: &str, upstream: &str) -> StoreResult<Option<VaultEntry>>;
    /// A human's credential for an upstream as the database holds it now, not as memory
    /// remembers it (another node may have refreshed it).
    async fn credential_now(
        &self,
        subject: &str,
        upstream: &str,
    ) -> StoreResult<Option<VaultEntry>>;
    /// A human's credentials.
    async fn list_credentials(&self, subject: &str) -> StoreResult<Vec<VaultEntry>>;
    /// Claims the refresh of an OAuth connection still at `version` until `until`: of all
    /// callers on all nodes, only one gets true until that lease runs out or the row changes.
    async fn claim_refresh(
        &self,
        subject: &str,
        upstream: &str,
        version: i64,
        now: i64,
        until: i64,
    ) -> StoreResult<bool>;
    /// Stores refreshed tokens over the row still at `version` (it moves on, its lease ends);
    /// false, and nothing written, if the row changed meanwhile.
    async fn store_refreshed(
        &self,
        subject: &str,
        upstream: &str,
        version: i64,
        sealed: &[u8],
        event: &AuditEvent,
    ) -> StoreResult<bool>;
    /// Records a failed refresh of the row at `version` and ends its lease: with `retry_at`,
    /// no new try before then (a passing failure); without, for good: the connection waits
    /// for the human to connect again.
    async fn refresh_failed(
        &self,
        subject: &str,
        upstream: &str,
        version: i64,
        retry_at: Option<i64>,
        event: &AuditEvent,
    ) -> StoreResult<()>;
    /// Deletes a human's credential for an upstream; false if there was none (and then no
    /// event).
    async fn delete_credential(
        &self,
        subject: &str,
        upstream: &str,
        event: &AuditEvent,
    ) -> StoreResult<bool>;

    /// Records one-time values atomically: either all are new and all are stored, or nothing
    /// is stored and the kind of the first one already seen is returned.
    async fn consume_once(&self, values: &[OneTimeUse]) -> StoreResult<Option<OneTimeKind>> {
        let request = RequestUse {
            once: values.to_vec(),
            ..RequestUse::default()
        };
        match self.record_use(request).await? {
            UseVerdict::Replayed(kind) => Ok(Some(kind)),
            UseVerdict::Recorded
            | UseVerdict::GrantSpent
            | UseVerdict::ApprovalSpent
            | UseVerdict::TokenRevoked
            | UseVerdict::TooManyPending => Ok(None),
        }
    }
    /// Appends one event to the audit chain, durably, before returning.
    async fn append_audit(&self, event: AuditEvent) -> StoreResult<()> {
        let request = RequestUse {
            audit: Some(event),
            ..RequestUse::default()
        };
        self.record_use(request).await.map(|_| ())
    }
    /// Sets the key that signs checkpoints; until then none are written.
    fn set_checkpoint_signer(&self, signer: CheckpointSigner);
    /// Signs the current head if events came after the last checkpoint; returns the latest
    /// checkpoint, if any.
    async fn checkpoint_now(&self) -> StoreResult<Option<Checkpoint>>;
    /// Stored event lines (their hashed JCS form) matching `query`.
    async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>>;
    /// Checkpoints with `seq` > `since_seq`, oldest first.
    async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>>;
    /// Forwarded-request counts per grant and action, all or of one human's grants.
    async fn action_uses(&self, subject: Option<&str>) -> StoreResult<Vec<ActionUse>>;

    /// Marks a token dead until its expiry (the event is stored on every call, a repeated
    /// revocation included: the request was made).
    async fn revoke_token(
        &self,
        jti: &str,
        grant_id: &str,
        expires_at: i64,
        event: &AuditEvent,
    ) -> StoreResult<()>;
    /// Whether a token was revoked.
    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool>;
    /// Deletes replay entries and revoked-token rows that can no longer matter.
    async fn prune(&self, now: i64) -> StoreResult<u64>;
}

/// The database URL as it may be shown: a password in it is replaced by `***`.
pub fn display_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Opens the store named by a database URL, creating and migrating it as needed.
pub async fn open(url: &str) -> StoreResult<Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(SqliteStore::open(path).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(display_url(url)))
    }
}
