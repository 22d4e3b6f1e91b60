//! What both backends share: row mapping, the in-memory memos of hot rows, the checkpoint
//! signer's slot.

use std::sync::{Mutex, OnceLock, PoisonError};

use leash_core::audit::{Checkpoint, Outcome};
use leash_core::grant::{Grant, GrantStatus};

use crate::{
    Agent, Approval, ApprovalStatus, CheckpointSigner, Login, OAuthConnect, Session, StoreError,
    StoreResult, User, VaultEntry,
};

/// Typed column reads, the same for a SQLite and a PostgreSQL row (both schemas use TEXT,
/// 64-bit integers and bytes only).
pub(crate) trait Columns {
    /// The column's value; a missing column or another type is `Unavailable`.
    fn column<T: ColumnType>(&self, name: &str) -> StoreResult<T>;

    fn int(&self, name: &str) -> StoreResult<i64> {
        self.column(name)
    }
}

/// The Rust types the schemas' columns are read as.
pub(crate) trait ColumnType:
    for<'r> sqlx::Decode<'r, sqlx::Sqlite>
    + sqlx::Type<sqlx::Sqlite>
    + for<'r> sqlx::Decode<'r, sqlx::Postgres>
    + sqlx::Type<sqlx::Postgres>
{
}

impl<T> ColumnType for T where
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite>
        + sqlx::Type<sqlx::Sqlite>
        + for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
{
}

impl Columns for sqlx::sqlite::SqliteRow {
    fn column<T: ColumnType>(&self, name: &str) -> StoreResult<T> {
        sqlx::Row::try_get(self, name).map_err(unavailable)
    }
}

impl Columns for sqlx::postgres::PgRow {
    fn column<T: ColumnType>(&self, name: &str) -> StoreResult<T> {
        sqlx::Row::try_get(self, name).map_err(unavailable)
    }
}

pub(crate) fn unavailable(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Unavailable(e.to_string()),
    }
}

pub(crate) fn json_list(value: &[String]) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn parse_list(text: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("list column: {e}")))
}

pub(crate) const GRANT_COLUMNS: &str = "id, subject, agent, purpose, upstreams, actions, approval_required, \
     single_use, created_at, expires_at, max_requests, requests_used, status";

pub(crate) fn grant_from_row(row: &impl Columns) -> StoreResult<Grant> {
    let status: String = row.column("status")?;
    Ok(Grant {
        id: row.column("id")?,
        subject: row.column("subject")?,
        agent: row.column("agent")?,
        purpose: row.column("purpose")?,
        upstreams: parse_list(&row.column::<String>("upstreams")?)?,
        actions: parse_list(&row.column::<String>("actions")?)?,
        approval_required: parse_list(&row.column::<String>("approval_required")?)?,
        single_use: parse_list(&row.column::<String>("single_use")?)?,
        created_at: row.column("created_at")?,
        expires_at: row.column("expires_at")?,
        max_requests: row.column("max_requests")?,
        requests_used: row.column("requests_used")?,
        status: GrantStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("grant status {status:?}")))?,
    })
}

pub(crate) fn agent_from_row(row: &impl Columns) -> StoreResult<Agent> {
    let jwks: String = row.column("jwks")?;
    Ok(Agent {
        id: row.column("id")?,
        name: row.column("name")?,
        jwks: serde_json::from_str(&jwks).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        disabled: row.int("disabled")? != 0,
        created_at: row.column("created_at")?,
    })
}

pub(crate) fn vault_from_row(row: &impl Columns) -> StoreResult<VaultEntry> {
    Ok(VaultEntry {
        subject: row.column("subject")?,
        upstream: row.column("upstream")?,
        kind: row.column("kind")?,
        header_name: row.column("header_name")?,
        sealed: row.column("sealed")?,
        expires_at: row.column("expires_at")?,
        created_at: row.column("created_at")?,
        reconnect: row.column::<String>("status")? == "reconnect",
        version: row.column("version")?,
        retry_at: row.column("retry_at")?,
    })
}

pub(crate) fn connect_from_row(row: &impl Columns) -> StoreResult<OAuthConnect> {
    Ok(OAuthConnect {
        subject: row.column("subject")?,
        upstream: row.column("upstream")?,
        session_digest: row.column("session_digest")?,
        verifier: row.column("verifier")?,
        expires_at: row.column("expires_at")?,
    })
}

pub(crate) const APPROVAL_COLUMNS: &str = "id, grant_id, subject, agent, action, upstream, method, path, \
     query, body_sha256, body_size, status, requested_at, expires_at, decided_at, approver, headers, \
     headers_sha256, previewed";

/// An approval's headers as stored.
pub(crate) fn headers_json(headers: &[(String, String)]) -> String {
    serde_json::to_string(headers).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn approval_from_row(row: &impl Columns) -> StoreResult<Approval> {
    let status: String = row.column("status")?;
    Ok(Approval {
        id: row.column("id")?,
        grant_id: row.column("grant_id")?,
        subject: row.column("subject")?,
        agent: row.column("agent")?,
        action: row.column("action")?,
        upstream: row.column("upstream")?,
        method: row.column("method")?,
        path: row.column("path")?,
        query: row.column("query")?,
        body_sha256: row.column("body_sha256")?,
        body_size: row.column("body_size")?,
        headers: {
            let headers: String = row.column("headers")?;
            serde_json::from_str(&headers)
                .map_err(|e| StoreError::Corrupt(format!("approval headers: {e}")))?
        },
        headers_sha256: row.column("headers_sha256")?,
        previewed: row.column("previewed")?,
        status: ApprovalStatus::parse(&status)
            .filter(|s| *s != ApprovalStatus::Expired)
            .ok_or_else(|| StoreError::Corrupt(format!("approval status {status:?}")))?,
        requested_at: row.column("requested_at")?,
        expires_at: row.column("expires_at")?,
        decided_at: row.column("decided_at")?,
        approver: row.column("approver")?,
    })
}

pub(crate) fn checkpoint_from_row(row: &impl Columns) -> StoreResult<Checkpoint> {
    Ok(Checkpoint {
        seq: row.int("seq")?.max(0) as u64,
        hash: row.column("hash")?,
        ts: row.column("ts")?,
        kid: row.column("kid")?,
        sig: row.column("sig")?,
    })
}

pub(crate) fn user_from_row(row: &impl Columns) -> StoreResult<User> {
    Ok(User {
        id: row.column("id")?,
        name: row.column("name")?,
        created_at: row.column("created_at")?,
        disabled: row.int("disabled")? != 0,
    })
}

pub(crate) fn session_from_row(row: &impl Columns) -> StoreResult<Session> {
    Ok(Session {
        user: user_from_row(row)?,
        admin: row.int("admin")? != 0,
        created_at: row.column("session_created_at")?,
        last_seen: row.column("last_seen")?,
        expires_at: row.column("expires_at")?,
    })
}

pub(crate) fn login_from_row(row: &impl Columns) -> StoreResult<Login> {
    Ok(Login {
        state: row.column("state")?,
        nonce: row.column("nonce")?,
        verifier: row.column("verifier")?,
        return_to: row.column("return_to")?,
        expires_at: row.column("expires_at")?,
    })
}

/// The checkpoint signer, set once the server has its key.
#[derive(Default)]
pub(crate) struct SignerSlot(pub(crate) OnceLock<CheckpointSigner>);

impl std::fmt::Debug for SignerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "SignerSlot(set)"
        } else {
            "SignerSlot(unset)"
        })
    }
}

/// Rows held in memory for the per-request path (grants for liveness, vault entries for
/// injection). Every write that changes such a row drops it afterwards; the epoch stops a read
/// that raced such a write from putting the old row back. On SQLite only this store writes to
/// the database, since it holds the database's lock (`sqlite::own_database`); on PostgreSQL
/// other nodes' writes arrive as notifications (see `postgres`).
pub(crate) struct Memo<V> {
    entries: quick_cache::sync::Cache<String, V>,
    epoch: Mutex<u64>,
}

/// Rows of one kind held in memory at most.
const MEMO_CAPACITY: usize = 16_384;

impl<V: Clone> Memo<V> {
    pub(crate) fn new() -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(MEMO_CAPACITY),
            epoch: Mutex::new(0),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        *self.epoch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self, key: &str) -> Option<V> {
        self.entries.get(key)
    }

    /// Keeps a row read while the epoch was `read_at`, unless a write invalidated since.
    pub(crate) fn fill(&self, key: String, value: V, read_at: u64) {
        let epoch = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        if *epoch == read_at {
            self.entries.insert(key, value);
        }
    }

    pub(crate) fn invalidate(&self, key: &str) {
        let mut epoch = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        *epoch += 1;
        self.entries.remove(key);
    }

    pub(crate) fn invalidate_all(&self) {
        let mut epoch = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        *epoch += 1;
        self.entries.clear();
    }
}

impl<V: Clone> std::fmt::Debug for Memo<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo")
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// The memo key of a human's credential for an upstream. A newline cannot occur in either
/// (user ids are generated, upstream names are checked at start), and unlike NUL it may travel
/// in a PostgreSQL notification.
pub(crate) fn vault_key(subject: &str, upstream: &str) -> String {
    format!("{subject}\n{upstream}")
}

pub(crate) fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::ApprovalRequired => "approval_required",
    }
}

/// The Unix time of an event's RFC 3339 `ts` (0 if it does not parse).
pub(crate) fn unix_of(ts: &str) -> i64 {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

/// The grant a handle was issued for, with its agent, in one round trip (`$1`: the handle's
/// digest; SQLite reads `$1` as its first parameter too).
pub(crate) static GRANT_BY_HANDLE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let grant_columns: Vec<String> = GRANT_COLUMNS
        .split(", ")
        .map(|c| format!("g.{c}"))
        .collect();
    format!(
        "SELECT {}, a.name AS agent_name, a.jwks AS agent_jwks, \
         a.disabled AS agent_disabled, a.created_at AS agent_created_at \
         FROM grants g JOIN agents a ON a.id = g.agent WHERE g.handle_digest = $1",
        grant_columns.join(", ")
    )
});

/// A row of [`GRANT_BY_HANDLE`].
pub(crate) fn grant_with_agent_from_row(row: &impl Columns) -> StoreResult<(Grant, Agent)> {
    let grant = grant_from_row(row)?;
    let jwks: String = row.column("agent_jwks")?;
    let agent = Agent {
        id: grant.agent.clone(),
        name: row.column("agent_name")?,
        jwks: serde_json::from_str(&jwks).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        disabled: row.int("agent_disabled")? != 0,
        created_at: row.column("agent_created_at")?,
    };
    Ok((grant, agent))
}

/// A use's audit event in canonical form with its Unix time, made by the calling task so that
/// the single writer only splices in the chain members and hashes.
pub(crate) fn draft_of(
    request: &crate::RequestUse,
) -> StoreResult<Option<(leash_core::audit::Draft, i64)>> {
    request
        .audit
        .as_ref()
        .map(|event| {
            let draft = event
                .draft()
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok((draft, unix_of(&event.ts)))
        })
        .transpose()
}

/// An event read back from the audit outbox (written there by `queries::stage_event`).
pub(crate) fn staged_event(id: i64, text: &str) -> StoreResult<leash_core::audit::AuditEvent> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("audit outbox row {id} is not an event: {e}")))
}

/// Logs a failed move of the outbox's events into the chain. Nothing is lost: the events stay
/// in the outbox, and the next change, checkpoint or start tries again.
pub(crate) fn log_unflushed(error: &StoreError) {
    tracing::error!(error = %error, "audit events stay in the outbox: the chain cannot be written");
}
