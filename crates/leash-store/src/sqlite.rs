//! The embedded SQLite backend. Writes go through a single-connection pool so that write
//! transactions never race for SQLite's one write lock; reads use a separate pool. WAL with
//! `synchronous = NORMAL`: a commit is in the WAL before it returns, so it survives the process
//! being killed (`kill -9`); only a power cut may lose the last commits.

use std::collections::HashSet;
use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use leash_core::dpop::ReplayKey;
use leash_core::grant::{Grant, GrantStatus};
use leash_core::secret::SecretDigest;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::{Agent, GrantEnd, Store, StoreError, StoreResult, User, VaultEntry};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    replay: mpsc::Sender<ConsumeRequest>,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn json_list(value: &[String]) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "[]".into())
}

fn parse_list(text: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("list column: {e}")))
}

const GRANT_COLUMNS: &str = "id, subject, agent, purpose, upstreams, actions, approval_required, \
     single_use, created_at, expires_at, max_requests, requests_used, status";

fn grant_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<Grant> {
    let status: String = row.try_get("status").map_err(unavailable)?;
    Ok(Grant {
        id: row.try_get("id").map_err(unavailable)?,
        subject: row.try_get("subject").map_err(unavailable)?,
        agent: row.try_get("agent").map_err(unavailable)?,
        purpose: row.try_get("purpose").map_err(unavailable)?,
        upstreams: parse_list(row.try_get("upstreams").map_err(unavailable)?)?,
        actions: parse_list(row.try_get("actions").map_err(unavailable)?)?,
        approval_required: parse_list(row.try_get("approval_required").map_err(unavailable)?)?,
        single_use: parse_list(row.try_get("single_use").map_err(unavailable)?)?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
        expires_at: row.try_get("expires_at").map_err(unavailable)?,
        max_requests: row.try_get("max_requests").map_err(unavailable)?,
        requests_used: row.try_get("requests_used").map_err(unavailable)?,
        status: GrantStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("grant status {status:?}")))?,
    })
}

fn agent_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<Agent> {
    let jwks: String = row.try_get("jwks").map_err(unavailable)?;
    Ok(Agent {
        id: row.try_get("id").map_err(unavailable)?,
        name: row.try_get("name").map_err(unavailable)?,
        jwks: serde_json::from_str(&jwks).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        disabled: row.try_get::<i64, _>("disabled").map_err(unavailable)? != 0,
        created_at: row.try_get("created_at").map_err(unavailable)?,
    })
}

fn vault_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<VaultEntry> {
    Ok(VaultEntry {
        subject: row.try_get("subject").map_err(unavailable)?,
        upstream: row.try_get("upstream").map_err(unavailable)?,
        kind: row.try_get("kind").map_err(unavailable)?,
        header_name: row.try_get("header_name").map_err(unavailable)?,
        sealed: row.try_get("sealed").map_err(unavailable)?,
        expires_at: row.try_get("expires_at").map_err(unavailable)?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
    })
}

fn user_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<User> {
    Ok(User {
        id: row.try_get("id").map_err(unavailable)?,
        name: row.try_get("name").map_err(unavailable)?,
        created_at: row.try_get("created_at").map_err(unavailable)?,
    })
}

/// One caller's one-time values and where to send the verdict.
type ConsumeRequest = (
    Vec<(ReplayKey, i64)>,
    oneshot::Sender<StoreResult<Option<usize>>>,
);

/// Most requests committed in one replay transaction.
const MAX_REPLAY_BATCH: usize = 64;

/// Group commit of one-time values: one task owns replay writes and commits whatever requests
/// are waiting in one transaction, so concurrent token and gateway calls share a commit.
async fn replay_writer(pool: SqlitePool, mut requests: mpsc::Receiver<ConsumeRequest>) {
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_REPLAY_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let entries: Vec<&[(ReplayKey, i64)]> = batch.iter().map(|(e, _)| e.as_slice()).collect();
        match consume_batch(&pool, &entries).await {
            Ok(verdicts) => {
                for ((_, reply), verdict) in batch.into_iter().zip(verdicts) {
                    let _ = reply.send(Ok(verdict));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
    }
}

/// Consumes each request's values all-or-nothing, in one transaction for the whole batch.
/// Within a batch the earlier of two requests sharing a value claims it, even if that request
/// then fails on another of its values: the later one is refused (fail closed).
async fn consume_batch(
    pool: &SqlitePool,
    requests: &[&[(ReplayKey, i64)]],
) -> StoreResult<Vec<Option<usize>>> {
    let mut verdicts = vec![None; requests.len()];
    let mut claimed: HashSet<&ReplayKey> = HashSet::new();
    let mut candidates = Vec::new();
    for (index, entries) in requests.iter().enumerate() {
        let mut own = HashSet::new();
        let seen = entries
            .iter()
            .position(|(key, _)| claimed.contains(key) || !own.insert(key));
        match seen {
            Some(position) => verdicts[index] = Some(position),
            None => {
                claimed.extend(own);
                candidates.push(index);
            }
        }
    }
    if candidates.is_empty() {
        return Ok(verdicts);
    }
    let rows: Vec<&(ReplayKey, i64)> = candidates
        .iter()
        .flat_map(|&i| requests[i].iter())
        .collect();
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let mut sql = String::from("INSERT INTO replay (key, until) VALUES ");
    sql.push_str(&vec!["(?, ?)"; rows.len()].join(", "));
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING key");
    let mut query = sqlx::query(&sql);
    for (key, until) in &rows {
        query = query.bind(key.as_slice()).bind(until);
    }
    let inserted: HashSet<Vec<u8>> = query
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| row.try_get::<Vec<u8>, _>("key"))
        .collect::<Result<_, _>>()
        .map_err(unavailable)?;
    let mut undo: Vec<&ReplayKey> = Vec::new();
    for &index in &candidates {
        let entries = requests[index];
        if let Some(position) = entries
            .iter()
            .position(|(key, _)| !inserted.contains(key.as_slice()))
        {
            verdicts[index] = Some(position);
            undo.extend(
                entries
                    .iter()
                    .filter(|(key, _)| inserted.contains(key.as_slice()))
                    .map(|(key, _)| key),
            );
        }
    }
    if !undo.is_empty() {
        let sql = format!(
            "DELETE FROM replay WHERE key IN ({})",
            vec!["?"; undo.len()].join(", ")
        );
        let mut query = sqlx::query(&sql);
        for key in undo {
            query = query.bind(key.as_slice());
        }
        query.execute(&mut *tx).await.map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)?;
    Ok(verdicts)
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and applies migrations.
    pub async fn open(path: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.read_only(true))
            .await
            .map_err(unavailable)?;
        let (replay, requests) = mpsc::channel(1024);
        tokio::spawn(replay_writer(writer.clone(), requests));
        Ok(Self {
            writer,
            reader,
            replay,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT value FROM settings WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.map(|r| r.try_get("value").map_err(unavailable))
            .transpose()
    }

    async fn init_setting(&self, name: &str, value: &[u8]) -> StoreResult<Vec<u8>> {
        sqlx::query("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(value)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = ?")
            .bind(name)
            .fetch_one(&self.writer)
            .await
            .map_err(unavailable)?;
        row.try_get("value").map_err(unavailable)
    }

    async fn create_user(&self, user: &User, key: &SecretDigest) -> StoreResult<()> {
        sqlx::query("INSERT INTO users (id, name, key_digest, created_at) VALUES (?, ?, ?, ?)")
            .bind(&user.id)
            .bind(&user.name)
            .bind(key.as_str())
            .bind(user.created_at)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn user_by_key(&self, key: &SecretDigest) -> StoreResult<Option<User>> {
        let row = sqlx::query("SELECT id, name, created_at FROM users WHERE key_digest = ?")
            .bind(key.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM users ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(user_from_row).collect()
    }

    async fn create_agent(&self, agent: &Agent) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO agents (id, name, jwks, disabled, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&agent.id)
        .bind(&agent.name)
        .bind(agent.jwks.to_string())
        .bind(i64::from(agent.disabled))
        .bind(agent.created_at)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        let row = sqlx::query("SELECT * FROM agents WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn disable_agent(&self, id: &str, now: i64) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let found = sqlx::query("UPDATE agents SET disabled = 1 WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
            > 0;
        sqlx::query(
            "UPDATE grants SET status = 'revoked', ended_at = ?, end_reason = 'agent disabled' \
             WHERE agent = ? AND status = 'active'",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(found)
    }

    async fn create_grant(&self, grant: &Grant, handle: &SecretDigest) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO grants (id, handle_digest, subject, agent, purpose, upstreams, actions, \
             approval_required, single_use, created_at, expires_at, max_requests, requests_used, \
             status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&grant.id)
        .bind(handle.as_str())
        .bind(&grant.subject)
        .bind(&grant.agent)
        .bind(&grant.purpose)
        .bind(json_list(&grant.upstreams))
        .bind(json_list(&grant.actions))
        .bind(json_list(&grant.approval_required))
        .bind(json_list(&grant.single_use))
        .bind(grant.created_at)
        .bind(grant.expires_at)
        .bind(grant.max_requests)
        .bind(grant.requests_used)
        .bind(grant.status.as_str())
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        let row = sqlx::query(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(grant_from_row).transpose()
    }

    async fn grant_by_handle(&self, handle: &SecretDigest) -> StoreResult<Option<(Grant, Agent)>> {
        let grant_columns: Vec<String> = GRANT_COLUMNS
            .split(", ")
            .map(|c| format!("g.{c}"))
            .collect();
        let row = sqlx::query(&format!(
            "SELECT {}, a.name AS agent_name, a.jwks AS agent_jwks, \
             a.disabled AS agent_disabled, a.created_at AS agent_created_at \
             FROM grants g JOIN agents a ON a.id = g.agent WHERE g.handle_digest = ?",
            grant_columns.join(", ")
        ))
        .bind(handle.as_str())
        .fetch_optional(&self.reader)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let grant = grant_from_row(&row)?;
        let jwks: String = row.try_get("agent_jwks").map_err(unavailable)?;
        let agent = Agent {
            id: grant.agent.clone(),
            name: row.try_get("agent_name").map_err(unavailable)?,
            jwks: serde_json::from_str(&jwks).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            disabled: row
                .try_get::<i64, _>("agent_disabled")
                .map_err(unavailable)?
                != 0,
            created_at: row.try_get("agent_created_at").map_err(unavailable)?,
        };
        Ok(Some((grant, agent)))
    }

    async fn list_grants(&self, subject: Option<&str>) -> StoreResult<Vec<Grant>> {
        let rows = sqlx::query(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE (?1 IS NULL OR subject = ?1) \
             ORDER BY created_at DESC, id"
        ))
        .bind(subject)
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter().map(grant_from_row).collect()
    }

    async fn end_grant(
        &self,
        id: &str,
        end: GrantEnd,
        reason: Option<&str>,
        now: i64,
    ) -> StoreResult<Option<Grant>> {
        let row = sqlx::query(&format!(
            "UPDATE grants SET status = ?, ended_at = ?, end_reason = ? \
             WHERE id = ? AND status = 'active' AND expires_at > ? RETURNING {GRANT_COLUMNS}"
        ))
        .bind(end.status().as_str())
        .bind(now)
        .bind(reason)
        .bind(id)
        .bind(now)
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(grant_from_row).transpose()
    }

    async fn consume_once(&self, entries: &[(ReplayKey, i64)]) -> StoreResult<Option<usize>> {
        if entries.is_empty() {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        self.replay
            .send((entries.to_vec(), reply))
            .await
            .map_err(|_| StoreError::Unavailable("the replay writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the replay writer has stopped".into()))?
    }

    async fn count_request(&self, grant_id: &str, now: i64) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "UPDATE grants SET requests_used = requests_used + 1 \
             WHERE id = ? AND status = 'active' AND expires_at > ? \
             AND (max_requests IS NULL OR requests_used < max_requests) RETURNING requests_used",
        )
        .bind(grant_id)
        .bind(now)
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        row.map(|r| r.try_get("requests_used").map_err(unavailable))
            .transpose()
    }

    async fn put_credential(&self, entry: &VaultEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO vault (subject, upstream, kind, header_name, sealed, expires_at, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subject, upstream) DO UPDATE SET \
             kind = excluded.kind, header_name = excluded.header_name, sealed = excluded.sealed, \
             expires_at = excluded.expires_at, created_at = excluded.created_at",
        )
        .bind(&entry.subject)
        .bind(&entry.upstream)
        .bind(&entry.kind)
        .bind(&entry.header_name)
        .bind(&entry.sealed)
        .bind(entry.expires_at)
        .bind(entry.created_at)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn credential(&self, subject: &str, upstream: &str) -> StoreResult<Option<VaultEntry>> {
        let row = sqlx::query("SELECT * FROM vault WHERE subject = ? AND upstream = ?")
            .bind(subject)
            .bind(upstream)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(vault_from_row).transpose()
    }

    async fn list_credentials(&self, subject: &str) -> StoreResult<Vec<VaultEntry>> {
        let rows = sqlx::query("SELECT * FROM vault WHERE subject = ? ORDER BY upstream")
            .bind(subject)
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        rows.iter().map(vault_from_row).collect()
    }

    async fn delete_credential(&self, subject: &str, upstream: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM vault WHERE subject = ? AND upstream = ?")
            .bind(subject)
            .bind(upstream)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_token(&self, jti: &str, grant_id: &str, expires_at: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO revoked_tokens (jti, grant_id, expires_at) VALUES (?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(jti)
        .bind(grant_id)
        .bind(expires_at)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM revoked_tokens WHERE jti = ?")
            .bind(jti)
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    async fn prune(&self, now: i64) -> StoreResult<u64> {
        let replay = sqlx::query("DELETE FROM replay WHERE until < ?")
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?
            .rows_affected();
        let tokens = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < ?")
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?
            .rows_affected();
        Ok(replay + tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> ReplayKey {
        leash_core::dpop::replay_key("test", "", name)
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn consume_once_is_all_or_nothing() {
        let (_dir, store) = store().await;
        let a = (k("a"), 10);
        let b = (k("b"), 10);
        assert_eq!(
            store.consume_once(std::slice::from_ref(&a)).await.unwrap(),
            None
        );
        // b is new but a is not: nothing is stored, and index 0 is named.
        assert_eq!(store.consume_once(&[a, b]).await.unwrap(), Some(0));
        assert_eq!(store.consume_once(&[b, a]).await.unwrap(), Some(1));
        assert_eq!(store.consume_once(&[b]).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_copies_are_consumed_exactly_once() {
        let (_dir, store) = store().await;
        let store = std::sync::Arc::new(store);
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let store = store.clone();
                // Each request shares "proof" and has its own assertion.
                tokio::spawn(async move {
                    store
                        .consume_once(&[(k(&format!("assertion-{i}")), 10), (k("proof"), 10)])
                        .await
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if task.await.unwrap().unwrap().is_none() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
        // The losers' own assertions were not consumed.
        let fresh: Vec<_> = (0..32)
            .map(|i| (k(&format!("assertion-{i}")), 10))
            .collect();
        let reused = count_already_taken(&store, fresh).await;
        assert_eq!(reused, 1, "only the winner's assertion is taken");
    }

    async fn count_already_taken(store: &SqliteStore, entries: Vec<(ReplayKey, i64)>) -> usize {
        let mut taken = 0;
        for entry in entries {
            if store.consume_once(&[entry]).await.unwrap().is_some() {
                taken += 1;
            }
        }
        taken
    }

    #[tokio::test]
    async fn a_request_repeating_its_own_value_is_refused() {
        let (_dir, store) = store().await;
        let a = (k("a"), 10);
        assert_eq!(store.consume_once(&[a, a]).await.unwrap(), Some(1));
        assert_eq!(store.consume_once(&[a]).await.unwrap(), None);
    }

    #[tokio::test]
    async fn settings_initialise_once() {
        let (_dir, store) = store().await;
        assert_eq!(store.setting("k").await.unwrap(), None);
        assert_eq!(store.init_setting("k", b"one").await.unwrap(), b"one");
        assert_eq!(store.init_setting("k", b"two").await.unwrap(), b"one");
    }

    #[tokio::test]
    async fn prune_drops_only_expired_entries() {
        let (_dir, store) = store().await;
        store
            .consume_once(&[(k("old"), 5), (k("new"), 50)])
            .await
            .unwrap();
        assert_eq!(store.prune(10).await.unwrap(), 1);
        assert_eq!(
            store.consume_once(&[(k("new"), 50)]).await.unwrap(),
            Some(0)
        );
        assert_eq!(store.consume_once(&[(k("old"), 50)]).await.unwrap(), None);
    }
}
