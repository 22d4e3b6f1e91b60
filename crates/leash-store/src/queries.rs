//! The statements both backends run alike, written once: the trait [`Queries`], implemented
//! for `sqlx::Sqlite` and `sqlx::Postgres`, which the one repository (`repo::Repo`) calls on its
//! backend's database (`B::Db::create_user(&mut tx, …)`). sqlx's connections are typed by
//! database, so `shared_queries!` expands the one body of each statement into both impls: the
//! SQL, the binds and the row mapping stay in one place without a wall of generic bounds. The
//! SQL is what SQLite and PostgreSQL both accept: `$n` parameters, `CAST(… AS TEXT)`. Each
//! runs one statement on a connection: a transaction's, or one taken from a pool.

use std::future::Future;

use leash_core::audit::{AuditEvent, Checkpoint};
use leash_core::grant::Grant;
use leash_core::secret::SecretDigest;

use crate::common::{
    APPROVAL_COLUMNS, Columns as _, GRANT_BY_HANDLE, GRANT_COLUMNS, agent_from_row,
    approval_from_row, checkpoint_from_row, connect_from_row, grant_from_row,
    grant_with_agent_from_row, json_list, login_from_row, session_from_row, unavailable,
    user_from_row, vault_from_row,
};
use crate::{
    ActionUse, Agent, Approval, ApprovalStatus, AuditQuery, GrantEnd, Login, OAuthConnect,
    RestoreReport, SealedPlace, Session, SigningKeyRow, StoreResult, User, VaultEntry,
};

/// The shared statements, on a connection of the database.
pub(crate) trait Queries: sqlx::Database {
    fn ping(conn: &mut Self::Connection) -> impl Future<Output = StoreResult<()>> + Send;
    /// `Store::gauges`.
    fn gauges(
        conn: &mut Self::Connection,
        now: i64,
    ) -> impl Future<Output = StoreResult<crate::StoreGauges>> + Send;
    /// Fails unless `table` exists (a name of the schema, never input).
    fn probe(
        conn: &mut Self::Connection,
        table: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// A server-wide setting, if set.
    fn setting(
        conn: &mut Self::Connection,
        name: &str,
    ) -> impl Future<Output = StoreResult<Option<Vec<u8>>>> + Send;
    /// Sets a setting unless it is set.
    fn insert_setting(
        conn: &mut Self::Connection,
        name: &str,
        value: &[u8],
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn create_user(
        conn: &mut Self::Connection,
        user: &User,
        key: &SecretDigest,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn user_by_key(
        conn: &mut Self::Connection,
        key: &SecretDigest,
    ) -> impl Future<Output = StoreResult<Option<User>>> + Send;
    fn list_users(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = StoreResult<Vec<User>>> + Send;
    fn user_by_oidc_subject(
        conn: &mut Self::Connection,
        issuer: &str,
        subject: &str,
    ) -> impl Future<Output = StoreResult<Option<User>>> + Send;
    fn user_name_taken(
        conn: &mut Self::Connection,
        name: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    fn create_oidc_user(
        conn: &mut Self::Connection,
        user: &User,
        key: &SecretDigest,
        issuer: &str,
        subject: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Marks the human disabled and deletes their sessions; false if there is no such human.
    fn disable_user_row(
        conn: &mut Self::Connection,
        id: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Revokes every active grant the human made.
    fn revoke_user_grants(
        conn: &mut Self::Connection,
        id: &str,
        now: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn create_session(
        conn: &mut Self::Connection,
        id: &SecretDigest,
        session: &Session,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn session(
        conn: &mut Self::Connection,
        id: &SecretDigest,
    ) -> impl Future<Output = StoreResult<Option<Session>>> + Send;
    fn touch_session(
        conn: &mut Self::Connection,
        id: &SecretDigest,
        now: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn delete_session(
        conn: &mut Self::Connection,
        id: &SecretDigest,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    fn create_login(
        conn: &mut Self::Connection,
        id: &SecretDigest,
        login: &Login,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn take_login(
        conn: &mut Self::Connection,
        id: &SecretDigest,
    ) -> impl Future<Output = StoreResult<Option<Login>>> + Send;
    fn signing_keys(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = StoreResult<Vec<SigningKeyRow>>> + Send;
    /// The rollback of `Store::finish_restore`, but for the keys and the events.
    fn roll_back_restored(
        conn: &mut Self::Connection,
        now: i64,
    ) -> impl Future<Output = StoreResult<RestoreReport>> + Send;
    /// Inserts a signing key unless one of its `kid` exists.
    fn insert_signing_key(
        conn: &mut Self::Connection,
        key: &SigningKeyRow,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Ends the publication of every key published after `until`, at `until`.
    fn withdraw_keys(
        conn: &mut Self::Connection,
        until: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Ends the publication of key `kid` at `until`, if it had no end; false if it had.
    fn end_publication(
        conn: &mut Self::Connection,
        kid: &str,
        until: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// A grant's cookie jar for one upstream, sealed (API §16).
    fn cookie_jar(
        conn: &mut Self::Connection,
        grant_id: &str,
        upstream: &str,
    ) -> impl Future<Output = StoreResult<Option<Vec<u8>>>> + Send;
    /// Stores a grant's cookie jar for one upstream, if the grant is active; false if not.
    fn put_cookie_jar(
        conn: &mut Self::Connection,
        grant_id: &str,
        upstream: &str,
        sealed: &[u8],
        now: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Every value sealed under the master key, with where it is kept.
    fn sealed_values(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = StoreResult<Vec<(SealedPlace, Vec<u8>)>>> + Send;
    /// Replaces the sealed value kept at `place` if it is still `old`; false if it changed.
    fn replace_sealed(
        conn: &mut Self::Connection,
        place: &SealedPlace,
        old: &[u8],
        sealed: &[u8],
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    fn create_connect(
        conn: &mut Self::Connection,
        state: &SecretDigest,
        connect: &OAuthConnect,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn take_connect(
        conn: &mut Self::Connection,
        state: &SecretDigest,
    ) -> impl Future<Output = StoreResult<Option<OAuthConnect>>> + Send;
    /// The conditional update of `Store::claim_refresh`.
    fn claim_refresh(
        conn: &mut Self::Connection,
        subject: &str,
        upstream: &str,
        version: i64,
        now: i64,
        until: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// The conditional update of `Store::store_refreshed`.
    fn store_refreshed(
        conn: &mut Self::Connection,
        subject: &str,
        upstream: &str,
        version: i64,
        sealed: &[u8],
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Ends the lease of the row at `version` after a failed refresh: no new try before
    /// `retry_at`, or none at all (the row waits for a new connection); false if it changed.
    fn refresh_failed(
        conn: &mut Self::Connection,
        subject: &str,
        upstream: &str,
        version: i64,
        retry_at: Option<i64>,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Deletes sessions, logins and OAuth connections past their end; returns how many.
    fn prune_sessions(
        conn: &mut Self::Connection,
        now: i64,
    ) -> impl Future<Output = StoreResult<u64>> + Send;
    fn create_agent(
        conn: &mut Self::Connection,
        agent: &Agent,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn agent(
        conn: &mut Self::Connection,
        id: &str,
    ) -> impl Future<Output = StoreResult<Option<Agent>>> + Send;
    fn list_agents(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = StoreResult<Vec<Agent>>> + Send;
    /// Marks the agent disabled; false if there is no such agent.
    fn disable_agent_row(
        conn: &mut Self::Connection,
        id: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Revokes every active grant of the agent.
    fn revoke_agent_grants(
        conn: &mut Self::Connection,
        id: &str,
        now: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn create_grant(
        conn: &mut Self::Connection,
        grant: &Grant,
        handle: &SecretDigest,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn grant(
        conn: &mut Self::Connection,
        id: &str,
    ) -> impl Future<Output = StoreResult<Option<Grant>>> + Send;
    /// The grant a handle was issued for, with its agent, in one round trip.
    fn grant_by_handle(
        conn: &mut Self::Connection,
        handle: &SecretDigest,
    ) -> impl Future<Output = StoreResult<Option<(Grant, Agent)>>> + Send;
    fn list_grants(
        conn: &mut Self::Connection,
        subject: Option<&str>,
    ) -> impl Future<Output = StoreResult<Vec<Grant>>> + Send;
    /// The compare-and-set of `Store::end_grant`.
    fn end_grant(
        conn: &mut Self::Connection,
        id: &str,
        end: GrantEnd,
        reason: Option<&str>,
        now: i64,
    ) -> impl Future<Output = StoreResult<Option<Grant>>> + Send;
    fn audit_lines(
        conn: &mut Self::Connection,
        query: &AuditQuery,
    ) -> impl Future<Output = StoreResult<Vec<String>>> + Send;
    fn checkpoints(
        conn: &mut Self::Connection,
        since_seq: u64,
    ) -> impl Future<Output = StoreResult<Vec<Checkpoint>>> + Send;
    fn latest_checkpoint(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = StoreResult<Option<Checkpoint>>> + Send;
    fn action_uses(
        conn: &mut Self::Connection,
        subject: Option<&str>,
    ) -> impl Future<Output = StoreResult<Vec<ActionUse>>> + Send;
    fn approval(
        conn: &mut Self::Connection,
        id: &str,
    ) -> impl Future<Output = StoreResult<Option<Approval>>> + Send;
    fn approval_preview(
        conn: &mut Self::Connection,
        id: &str,
    ) -> impl Future<Output = StoreResult<Option<Vec<u8>>>> + Send;
    fn list_approvals(
        conn: &mut Self::Connection,
        subject: Option<&str>,
    ) -> impl Future<Output = StoreResult<Vec<Approval>>> + Send;
    /// The compare-and-set of `Store::decide_approval`.
    fn decide_approval(
        conn: &mut Self::Connection,
        id: &str,
        approve: bool,
        approver: &str,
        now: i64,
    ) -> impl Future<Output = StoreResult<Option<Approval>>> + Send;
    fn put_credential(
        conn: &mut Self::Connection,
        entry: &VaultEntry,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn credential(
        conn: &mut Self::Connection,
        subject: &str,
        upstream: &str,
    ) -> impl Future<Output = StoreResult<Option<VaultEntry>>> + Send;
    fn list_credentials(
        conn: &mut Self::Connection,
        subject: &str,
    ) -> impl Future<Output = StoreResult<Vec<VaultEntry>>> + Send;
    /// Deletes a credential; false if there was none.
    fn delete_credential(
        conn: &mut Self::Connection,
        subject: &str,
        upstream: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    fn revoke_token(
        conn: &mut Self::Connection,
        jti: &str,
        grant_id: &str,
        expires_at: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Puts a management change's event in the outbox (in the change's transaction), for the
    /// chain's appender to take.
    fn stage_event(
        conn: &mut Self::Connection,
        event: &AuditEvent,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Deletes revoked-token rows of tokens expired anyway; returns how many.
    fn prune_revoked(
        conn: &mut Self::Connection,
        now: i64,
    ) -> impl Future<Output = StoreResult<u64>> + Send;
}

/// Implements [`Queries`] for each sqlx database type given, from one body.
macro_rules! shared_queries {
    ($($db:ty),+) => {$(
    impl Queries for $db {
        async fn ping(conn: &mut <$db as sqlx::Database>::Connection) -> StoreResult<()> {
            sqlx::query("SELECT 1").execute(conn).await.map_err(unavailable)?;
            Ok(())
        }

        async fn gauges(
            conn: &mut <$db as sqlx::Database>::Connection,
            now: i64,
        ) -> StoreResult<crate::StoreGauges> {
            let (live_grants, audit_outbox): (i64, i64) = sqlx::query_as(
                "SELECT \
                 (SELECT COUNT(*) FROM grants WHERE status = 'active' AND expires_at > $1 \
                  AND (max_requests IS NULL OR requests_used < max_requests)), \
                 (SELECT COUNT(*) FROM audit_outbox)",
            )
            .bind(now)
            .fetch_one(conn)
            .await
            .map_err(unavailable)?;
            Ok(crate::StoreGauges {
                live_grants: u64::try_from(live_grants).unwrap_or_default(),
                audit_outbox: u64::try_from(audit_outbox).unwrap_or_default(),
            })
        }

        async fn probe(conn: &mut <$db as sqlx::Database>::Connection, table: &str) -> StoreResult<()> {
            sqlx::query(&format!("SELECT 1 FROM {table} WHERE 1 = 0"))
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        }

        async fn setting(
            conn: &mut <$db as sqlx::Database>::Connection,
            name: &str,
        ) -> StoreResult<Option<Vec<u8>>> {
            let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
                .bind(name)
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            row.map(|r| r.column("value")).transpose()
        }

        async fn insert_setting(
            conn: &mut <$db as sqlx::Database>::Connection,
            name: &str,
            value: &[u8],
        ) -> StoreResult<()> {
            sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(name)
                .bind(value)
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        }

        async fn create_user(
            conn: &mut <$db as sqlx::Database>::Connection,
            user: &User,
            key: &SecretDigest,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO users (id, name, key_digest, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&user.id)
            .bind(&user.name)
            .bind(key.as_str())
            .bind(user.created_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn user_by_key(
            conn: &mut <$db as sqlx::Database>::Connection,
            key: &SecretDigest,
        ) -> StoreResult<Option<User>> {
            let row = sqlx::query(
                "SELECT id, name, created_at, disabled FROM users \
                 WHERE key_digest = $1 AND disabled = 0",
            )
                .bind(key.as_str())
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(user_from_row).transpose()
        }

        async fn list_users(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> StoreResult<Vec<User>> {
            let rows = sqlx::query(
                "SELECT id, name, created_at, disabled FROM users ORDER BY created_at, id",
            )
                .fetch_all(conn)
                .await
                .map_err(unavailable)?;
            rows.iter().map(user_from_row).collect()
        }

        async fn user_by_oidc_subject(
            conn: &mut <$db as sqlx::Database>::Connection,
            issuer: &str,
            subject: &str,
        ) -> StoreResult<Option<User>> {
            let row = sqlx::query(
                "SELECT id, name, created_at, disabled FROM users \
                 WHERE oidc_iss = $1 AND oidc_sub = $2",
            )
            .bind(issuer)
            .bind(subject)
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(user_from_row).transpose()
        }

        async fn user_name_taken(
            conn: &mut <$db as sqlx::Database>::Connection,
            name: &str,
        ) -> StoreResult<bool> {
            let row = sqlx::query("SELECT 1 AS taken FROM users WHERE name = $1")
                .bind(name)
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            Ok(row.is_some())
        }

        async fn create_oidc_user(
            conn: &mut <$db as sqlx::Database>::Connection,
            user: &User,
            key: &SecretDigest,
            issuer: &str,
            subject: &str,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO users (id, name, key_digest, created_at, oidc_iss, oidc_sub) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&user.id)
            .bind(&user.name)
            .bind(key.as_str())
            .bind(user.created_at)
            .bind(issuer)
            .bind(subject)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn disable_user_row(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
        ) -> StoreResult<bool> {
            let done = sqlx::query("UPDATE users SET disabled = 1 WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }

        async fn revoke_user_grants(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
            now: i64,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE grants SET status = 'revoked', ended_at = $1, \
                 end_reason = 'user disabled' WHERE subject = $2 AND status = 'active'",
            )
            .bind(now)
            .bind(id)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn create_session(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &SecretDigest,
            session: &Session,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO sessions (id_digest, user_id, admin, created_at, last_seen, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id.as_str())
            .bind(&session.user.id)
            .bind(i64::from(session.admin))
            .bind(session.created_at)
            .bind(session.last_seen)
            .bind(session.expires_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn session(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &SecretDigest,
        ) -> StoreResult<Option<Session>> {
            let row = sqlx::query(
                "SELECT u.id, u.name, u.created_at, u.disabled, s.admin, \
                 s.created_at AS session_created_at, s.last_seen, s.expires_at \
                 FROM sessions s JOIN users u ON u.id = s.user_id \
                 WHERE s.id_digest = $1 AND u.disabled = 0",
            )
            .bind(id.as_str())
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(session_from_row).transpose()
        }

        async fn touch_session(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &SecretDigest,
            now: i64,
        ) -> StoreResult<()> {
            sqlx::query("UPDATE sessions SET last_seen = $1 WHERE id_digest = $2 AND last_seen < $1")
                .bind(now)
                .bind(id.as_str())
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        }

        async fn delete_session(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &SecretDigest,
        ) -> StoreResult<bool> {
            let done = sqlx::query("DELETE FROM sessions WHERE id_digest = $1")
                .bind(id.as_str())
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }

        async fn create_login(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &SecretDigest,
            login: &Login,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO logins (id_digest, state, nonce, verifier, return_to, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id.as_str())
            .bind(&login.state)
            .bind(&login.nonce)
            .bind(&login.verifier)
            .bind(&login.return_to)
            .bind(login.expires_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn take_login(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &SecretDigest,
        ) -> StoreResult<Option<Login>> {
            let row = sqlx::query(
                "DELETE FROM logins WHERE id_digest = $1 \
                 RETURNING state, nonce, verifier, return_to, expires_at",
            )
            .bind(id.as_str())
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(login_from_row).transpose()
        }

        async fn prune_sessions(
            conn: &mut <$db as sqlx::Database>::Connection,
            now: i64,
        ) -> StoreResult<u64> {
            let sessions = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            let logins = sqlx::query("DELETE FROM logins WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            let connects = sqlx::query("DELETE FROM oauth_connects WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            // Jars of grants that ended otherwise than by completion or revocation (expired,
            // exhausted, their human disabled), which delete theirs at once.
            let jars = sqlx::query(
                "DELETE FROM cookie_jars WHERE grant_id NOT IN \
                 (SELECT id FROM grants WHERE status = 'active' AND expires_at > $1)",
            )
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
            Ok(sessions.rows_affected()
                + logins.rows_affected()
                + connects.rows_affected()
                + jars.rows_affected())
        }

        async fn roll_back_restored(
            conn: &mut <$db as sqlx::Database>::Connection,
            now: i64,
        ) -> StoreResult<RestoreReport> {
            let last = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            let last_event = match last {
                Some(row) => Some((row.int("seq")?, row.column("hash")?)),
                None => None,
            };
            let grants = sqlx::query(
                "UPDATE grants SET status = 'revoked', ended_at = $1, end_reason = 'restored' \
                 WHERE status = 'active'",
            )
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
            let approvals = sqlx::query(
                "UPDATE approvals SET expires_at = $1 WHERE status = 'pending' AND expires_at > $1",
            )
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
            let sessions = sqlx::query("DELETE FROM sessions")
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            for table in ["logins", "oauth_connects"] {
                sqlx::query(&format!("DELETE FROM {table}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(unavailable)?;
            }
            sqlx::query("DELETE FROM settings WHERE name = $1")
                .bind(crate::RESTORE_PENDING)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            Ok(RestoreReport {
                last_event,
                grants_revoked: grants.rows_affected(),
                approvals_expired: approvals.rows_affected(),
                sessions_ended: sessions.rows_affected(),
            })
        }

        async fn signing_keys(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> StoreResult<Vec<SigningKeyRow>> {
            let rows = sqlx::query(
                "SELECT kid, sealed, public_jwk, created_at, signs_from, published_until \
                 FROM signing_keys ORDER BY signs_from, created_at, kid",
            )
            .fetch_all(conn)
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|row| {
                    Ok(SigningKeyRow {
                        kid: row.column("kid")?,
                        sealed: row.column("sealed")?,
                        public_jwk: row.column("public_jwk")?,
                        created_at: row.column("created_at")?,
                        signs_from: row.column("signs_from")?,
                        published_until: row.column("published_until")?,
                    })
                })
                .collect()
        }

        async fn insert_signing_key(
            conn: &mut <$db as sqlx::Database>::Connection,
            key: &SigningKeyRow,
        ) -> StoreResult<bool> {
            let done = sqlx::query(
                "INSERT INTO signing_keys \
                 (kid, sealed, public_jwk, created_at, signs_from, published_until) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kid) DO NOTHING",
            )
            .bind(&key.kid)
            .bind(&key.sealed)
            .bind(&key.public_jwk)
            .bind(key.created_at)
            .bind(key.signs_from)
            .bind(key.published_until)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn withdraw_keys(
            conn: &mut <$db as sqlx::Database>::Connection,
            until: i64,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE signing_keys SET published_until = $1 \
                 WHERE published_until IS NULL OR published_until > $1",
            )
            .bind(until)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn end_publication(
            conn: &mut <$db as sqlx::Database>::Connection,
            kid: &str,
            until: i64,
        ) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE signing_keys SET published_until = $2 \
                 WHERE kid = $1 AND published_until IS NULL",
            )
            .bind(kid)
            .bind(until)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn cookie_jar(
            conn: &mut <$db as sqlx::Database>::Connection,
            grant_id: &str,
            upstream: &str,
        ) -> StoreResult<Option<Vec<u8>>> {
            let row = sqlx::query(
                "SELECT sealed FROM cookie_jars WHERE grant_id = $1 AND upstream = $2",
            )
            .bind(grant_id)
            .bind(upstream)
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.map(|r| r.column("sealed")).transpose()
        }

        async fn put_cookie_jar(
            conn: &mut <$db as sqlx::Database>::Connection,
            grant_id: &str,
            upstream: &str,
            sealed: &[u8],
            now: i64,
        ) -> StoreResult<bool> {
            // The grant's state is read in the same statement: a jar is never stored for a
            // grant that ended (its deletion at the end could not see it otherwise).
            let done = sqlx::query(
                "INSERT INTO cookie_jars (grant_id, upstream, sealed, updated_at) \
                 SELECT $1, $2, $3, $4 WHERE EXISTS \
                 (SELECT 1 FROM grants WHERE id = $1 AND status = 'active' AND expires_at > $4) \
                 ON CONFLICT (grant_id, upstream) \
                 DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            )
            .bind(grant_id)
            .bind(upstream)
            .bind(sealed)
            .bind(now)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn sealed_values(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> StoreResult<Vec<(SealedPlace, Vec<u8>)>> {
            let mut out = Vec::new();
            for row in sqlx::query("SELECT name, value FROM settings ORDER BY name")
                .fetch_all(&mut *conn)
                .await
                .map_err(unavailable)?
            {
                out.push((SealedPlace::Setting(row.column("name")?), row.column("value")?));
            }
            for row in sqlx::query(
                "SELECT subject, upstream, kind, header_name, sealed FROM vault \
                 ORDER BY subject, upstream",
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?
            {
                let place = SealedPlace::Vault {
                    subject: row.column("subject")?,
                    upstream: row.column("upstream")?,
                    kind: row.column("kind")?,
                    header_name: row.column("header_name")?,
                };
                out.push((place, row.column("sealed")?));
            }
            for row in sqlx::query("SELECT kid, sealed FROM signing_keys ORDER BY kid")
                .fetch_all(&mut *conn)
                .await
                .map_err(unavailable)?
            {
                out.push((SealedPlace::SigningKey(row.column("kid")?), row.column("sealed")?));
            }
            for row in sqlx::query("SELECT id, sealed FROM approval_previews ORDER BY id")
                .fetch_all(&mut *conn)
                .await
                .map_err(unavailable)?
            {
                out.push((SealedPlace::Preview(row.column("id")?), row.column("sealed")?));
            }
            for row in sqlx::query(
                "SELECT grant_id, upstream, sealed FROM cookie_jars ORDER BY grant_id, upstream",
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?
            {
                let place = SealedPlace::CookieJar {
                    grant_id: row.column("grant_id")?,
                    upstream: row.column("upstream")?,
                };
                out.push((place, row.column("sealed")?));
            }
            Ok(out)
        }

        async fn replace_sealed(
            conn: &mut <$db as sqlx::Database>::Connection,
            place: &SealedPlace,
            old: &[u8],
            sealed: &[u8],
        ) -> StoreResult<bool> {
            // Conditional on the value read, so that a node writing meanwhile is never undone
            // (a rotation while nodes serve). The vault's `version` stays: the plaintext is the
            // same, and a refresh under way must still be able to store its result.
            let query = match place {
                SealedPlace::Setting(name) => {
                    sqlx::query("UPDATE settings SET value = $3 WHERE name = $1 AND value = $2")
                        .bind(name)
                }
                SealedPlace::Vault { subject, upstream, .. } => sqlx::query(
                    "UPDATE vault SET sealed = $3 \
                     WHERE subject = $1 AND upstream = $2 AND sealed = $4",
                )
                .bind(subject)
                .bind(upstream),
                SealedPlace::Preview(id) => sqlx::query(
                    "UPDATE approval_previews SET sealed = $3 WHERE id = $1 AND sealed = $2",
                )
                .bind(id),
                SealedPlace::SigningKey(kid) => sqlx::query(
                    "UPDATE signing_keys SET sealed = $3 WHERE kid = $1 AND sealed = $2",
                )
                .bind(kid),
                SealedPlace::CookieJar { grant_id, upstream } => sqlx::query(
                    "UPDATE cookie_jars SET sealed = $3 \
                     WHERE grant_id = $1 AND upstream = $2 AND sealed = $4",
                )
                .bind(grant_id)
                .bind(upstream),
            };
            let query = match place {
                SealedPlace::Vault { .. } | SealedPlace::CookieJar { .. } => {
                    query.bind(sealed).bind(old)
                }
                _ => query.bind(old).bind(sealed),
            };
            let done = query.execute(conn).await.map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn create_connect(
            conn: &mut <$db as sqlx::Database>::Connection,
            state: &SecretDigest,
            connect: &OAuthConnect,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO oauth_connects \
                 (state_digest, subject, upstream, session_digest, verifier, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(state.as_str())
            .bind(&connect.subject)
            .bind(&connect.upstream)
            .bind(&connect.session_digest)
            .bind(&connect.verifier)
            .bind(connect.expires_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn take_connect(
            conn: &mut <$db as sqlx::Database>::Connection,
            state: &SecretDigest,
        ) -> StoreResult<Option<OAuthConnect>> {
            let row = sqlx::query(
                "DELETE FROM oauth_connects WHERE state_digest = $1 \
                 RETURNING subject, upstream, session_digest, verifier, expires_at",
            )
            .bind(state.as_str())
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(connect_from_row).transpose()
        }

        async fn claim_refresh(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: &str,
            upstream: &str,
            version: i64,
            now: i64,
            until: i64,
        ) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE vault SET refresh_lease = $4 \
                 WHERE subject = $1 AND upstream = $2 AND version = $3 AND status = 'active' \
                 AND (refresh_lease IS NULL OR refresh_lease <= $5) \
                 AND (retry_at IS NULL OR retry_at <= $5)",
            )
            .bind(subject)
            .bind(upstream)
            .bind(version)
            .bind(until)
            .bind(now)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn store_refreshed(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: &str,
            upstream: &str,
            version: i64,
            sealed: &[u8],
        ) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE vault SET sealed = $4, version = version + 1, refresh_lease = NULL, \
                 retry_at = NULL \
                 WHERE subject = $1 AND upstream = $2 AND version = $3",
            )
            .bind(subject)
            .bind(upstream)
            .bind(version)
            .bind(sealed)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn refresh_failed(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: &str,
            upstream: &str,
            version: i64,
            retry_at: Option<i64>,
        ) -> StoreResult<bool> {
            let done = sqlx::query(
                "UPDATE vault SET status = CASE WHEN $4 IS NULL THEN 'reconnect' ELSE status END, \
                 retry_at = $4, version = version + 1, refresh_lease = NULL \
                 WHERE subject = $1 AND upstream = $2 AND version = $3",
            )
            .bind(subject)
            .bind(upstream)
            .bind(version)
            .bind(retry_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        }

        async fn create_agent(
            conn: &mut <$db as sqlx::Database>::Connection,
            agent: &Agent,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO agents (id, name, jwks, disabled, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&agent.id)
            .bind(&agent.name)
            .bind(agent.jwks.to_string())
            .bind(i64::from(agent.disabled))
            .bind(agent.created_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn agent(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
        ) -> StoreResult<Option<Agent>> {
            let row = sqlx::query("SELECT * FROM agents WHERE id = $1")
                .bind(id)
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(agent_from_row).transpose()
        }

        async fn list_agents(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> StoreResult<Vec<Agent>> {
            let rows = sqlx::query("SELECT * FROM agents ORDER BY created_at, id")
                .fetch_all(conn)
                .await
                .map_err(unavailable)?;
            rows.iter().map(agent_from_row).collect()
        }

        /// Marks the agent disabled; false if there is no such agent.
        async fn disable_agent_row(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
        ) -> StoreResult<bool> {
            let done = sqlx::query("UPDATE agents SET disabled = 1 WHERE id = $1")
                .bind(id)
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }

        /// Revokes every active grant of the agent.
        async fn revoke_agent_grants(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
            now: i64,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE grants SET status = 'revoked', ended_at = $1, \
                 end_reason = 'agent disabled' WHERE agent = $2 AND status = 'active'",
            )
            .bind(now)
            .bind(id)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn create_grant(
            conn: &mut <$db as sqlx::Database>::Connection,
            grant: &Grant,
            handle: &SecretDigest,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO grants (id, handle_digest, subject, agent, purpose, upstreams, \
                 actions, approval_required, single_use, created_at, expires_at, max_requests, \
                 requests_used, status) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn grant(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
        ) -> StoreResult<Option<Grant>> {
            let row = sqlx::query(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = $1"))
                .bind(id)
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(grant_from_row).transpose()
        }

        async fn grant_by_handle(
            conn: &mut <$db as sqlx::Database>::Connection,
            handle: &SecretDigest,
        ) -> StoreResult<Option<(Grant, Agent)>> {
            let row = sqlx::query(&GRANT_BY_HANDLE)
                .bind(handle.as_str())
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(grant_with_agent_from_row).transpose()
        }

        async fn list_grants(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: Option<&str>,
        ) -> StoreResult<Vec<Grant>> {
            let rows = sqlx::query(&format!(
                "SELECT {GRANT_COLUMNS} FROM grants \
                 WHERE (CAST($1 AS TEXT) IS NULL OR subject = $1) ORDER BY created_at DESC, id"
            ))
            .bind(subject)
            .fetch_all(conn)
            .await
            .map_err(unavailable)?;
            rows.iter().map(grant_from_row).collect()
        }

        /// The compare-and-set of `Store::end_grant`.
        async fn end_grant(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
            end: GrantEnd,
            reason: Option<&str>,
            now: i64,
        ) -> StoreResult<Option<Grant>> {
            let row = sqlx::query(&format!(
                "UPDATE grants SET status = $1, ended_at = $2, end_reason = $3 \
                 WHERE id = $4 AND status = 'active' AND expires_at > $2 \
                 RETURNING {GRANT_COLUMNS}"
            ))
            .bind(end.status().as_str())
            .bind(now)
            .bind(reason)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(unavailable)?;
            if row.is_some() {
                sqlx::query("DELETE FROM cookie_jars WHERE grant_id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(unavailable)?;
            }
            row.as_ref().map(grant_from_row).transpose()
        }

        async fn audit_lines(
            conn: &mut <$db as sqlx::Database>::Connection,
            query: &AuditQuery,
        ) -> StoreResult<Vec<String>> {
            sqlx::query_scalar(
                "SELECT line FROM audit_events WHERE seq > $1 \
                 AND (CAST($2 AS TEXT) IS NULL OR grant_id = $2) \
                 AND (CAST($3 AS TEXT) IS NULL OR actor = $3) \
                 AND (CAST($4 AS TEXT) IS NULL OR subject = $4) ORDER BY seq LIMIT $5",
            )
            .bind(query.since_seq.min(i64::MAX as u64) as i64)
            .bind(&query.grant_id)
            .bind(&query.actor)
            .bind(&query.subject)
            .bind(i64::from(query.limit))
            .fetch_all(conn)
            .await
            .map_err(unavailable)
        }

        async fn checkpoints(
            conn: &mut <$db as sqlx::Database>::Connection,
            since_seq: u64,
        ) -> StoreResult<Vec<Checkpoint>> {
            let rows = sqlx::query(
                "SELECT seq, hash, ts, kid, sig FROM audit_checkpoints WHERE seq > $1 \
                 ORDER BY seq",
            )
            .bind(since_seq.min(i64::MAX as u64) as i64)
            .fetch_all(conn)
            .await
            .map_err(unavailable)?;
            rows.iter().map(checkpoint_from_row).collect()
        }

        async fn latest_checkpoint(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> StoreResult<Option<Checkpoint>> {
            let row = sqlx::query(
                "SELECT seq, hash, ts, kid, sig FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(checkpoint_from_row).transpose()
        }

        async fn action_uses(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: Option<&str>,
        ) -> StoreResult<Vec<ActionUse>> {
            let rows = sqlx::query(
                "SELECT grant_id, action, count(*) AS uses, max(at) AS last_used \
                 FROM audit_events WHERE kind IN ('gateway.request', 'mcp.call') AND decision = 'allow' \
                 AND grant_id IS NOT NULL AND action IS NOT NULL \
                 AND (CAST($1 AS TEXT) IS NULL OR subject = $1) GROUP BY grant_id, action",
            )
            .bind(subject)
            .fetch_all(conn)
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|row| {
                    Ok(ActionUse {
                        grant_id: row.column("grant_id")?,
                        action: row.column("action")?,
                        count: row.int("uses")?.max(0) as u64,
                        last_used: row.int("last_used")?,
                    })
                })
                .collect()
        }

        async fn approval(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
        ) -> StoreResult<Option<Approval>> {
            let row = sqlx::query(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(approval_from_row).transpose()
        }

        async fn list_approvals(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: Option<&str>,
        ) -> StoreResult<Vec<Approval>> {
            let rows = sqlx::query(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals \
                 WHERE (CAST($1 AS TEXT) IS NULL OR subject = $1) ORDER BY requested_at DESC, id"
            ))
            .bind(subject)
            .fetch_all(conn)
            .await
            .map_err(unavailable)?;
            rows.iter().map(approval_from_row).collect()
        }

        async fn decide_approval(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
            approve: bool,
            approver: &str,
            now: i64,
        ) -> StoreResult<Option<Approval>> {
            let status = if approve {
                ApprovalStatus::Approved
            } else {
                ApprovalStatus::Denied
            };
            let row = sqlx::query(&format!(
                "UPDATE approvals SET status = $1, decided_at = $2, approver = $3 \
                 WHERE id = $4 AND status = 'pending' AND expires_at > $2 \
                 RETURNING {APPROVAL_COLUMNS}"
            ))
            .bind(status.as_str())
            .bind(now)
            .bind(approver)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(unavailable)?;
            if row.is_some() {
                // Shown to decide; once decided, nobody needs it.
                sqlx::query("DELETE FROM approval_previews WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(unavailable)?;
            }
            row.as_ref().map(approval_from_row).transpose()
        }

        async fn approval_preview(
            conn: &mut <$db as sqlx::Database>::Connection,
            id: &str,
        ) -> StoreResult<Option<Vec<u8>>> {
            sqlx::query_scalar("SELECT sealed FROM approval_previews WHERE id = $1")
                .bind(id)
                .fetch_optional(conn)
                .await
                .map_err(unavailable)
        }

        async fn put_credential(
            conn: &mut <$db as sqlx::Database>::Connection,
            entry: &VaultEntry,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO vault \
                 (subject, upstream, kind, header_name, sealed, expires_at, created_at, status, \
                 version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (subject, upstream) DO UPDATE \
                 SET kind = excluded.kind, header_name = excluded.header_name, \
                 sealed = excluded.sealed, expires_at = excluded.expires_at, \
                 created_at = excluded.created_at, status = excluded.status, \
                 version = vault.version + 1, refresh_lease = NULL, retry_at = NULL",
            )
            .bind(&entry.subject)
            .bind(&entry.upstream)
            .bind(&entry.kind)
            .bind(&entry.header_name)
            .bind(&entry.sealed)
            .bind(entry.expires_at)
            .bind(entry.created_at)
            .bind(if entry.reconnect { "reconnect" } else { "active" })
            .bind(entry.version)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn credential(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: &str,
            upstream: &str,
        ) -> StoreResult<Option<VaultEntry>> {
            let row = sqlx::query("SELECT * FROM vault WHERE subject = $1 AND upstream = $2")
                .bind(subject)
                .bind(upstream)
                .fetch_optional(conn)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(vault_from_row).transpose()
        }

        async fn list_credentials(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: &str,
        ) -> StoreResult<Vec<VaultEntry>> {
            let rows = sqlx::query("SELECT * FROM vault WHERE subject = $1 ORDER BY upstream")
                .bind(subject)
                .fetch_all(conn)
                .await
                .map_err(unavailable)?;
            rows.iter().map(vault_from_row).collect()
        }

        /// Deletes a credential; false if there was none.
        async fn delete_credential(
            conn: &mut <$db as sqlx::Database>::Connection,
            subject: &str,
            upstream: &str,
        ) -> StoreResult<bool> {
            let done = sqlx::query("DELETE FROM vault WHERE subject = $1 AND upstream = $2")
                .bind(subject)
                .bind(upstream)
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }

        async fn revoke_token(
            conn: &mut <$db as sqlx::Database>::Connection,
            jti: &str,
            grant_id: &str,
            expires_at: i64,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO revoked_tokens (jti, grant_id, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(jti)
            .bind(grant_id)
            .bind(expires_at)
            .execute(conn)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        async fn stage_event(
            conn: &mut <$db as sqlx::Database>::Connection,
            event: &AuditEvent,
        ) -> StoreResult<()> {
            let text = serde_json::to_string(event)
                .map_err(|e| crate::StoreError::Unavailable(e.to_string()))?;
            sqlx::query("INSERT INTO audit_outbox (event) VALUES ($1)")
                .bind(text)
                .execute(conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        }

        /// Deletes revoked-token rows of tokens expired anyway; returns how many.
        async fn prune_revoked(
            conn: &mut <$db as sqlx::Database>::Connection,
            now: i64,
        ) -> StoreResult<u64> {
            let done = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < $1")
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            // Bodies kept for approvals that expired undecided go with the same sweep.
            sqlx::query(
                "DELETE FROM approval_previews WHERE id IN \
                 (SELECT id FROM approvals WHERE expires_at <= $1)",
            )
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected())
        }
    }
    )+};
}

shared_queries!(sqlx::Sqlite, sqlx::Postgres);
