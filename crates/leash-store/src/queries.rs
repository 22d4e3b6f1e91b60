//! The statements both backends run alike, written once. `shared_queries!(Db)` expands to one
//! module of functions per backend: sqlx's executors are typed by database, and a macro keeps
//! the SQL, the binds and the row mapping in one place without a wall of generic bounds. The
//! SQL is what SQLite and PostgreSQL both accept: `$n` parameters, `CAST(… AS TEXT)`. Each
//! function runs one statement on any executor of its database (a pool, or a transaction's
//! connection).

/// Expands to the shared functions for the sqlx database type `$db`.
macro_rules! shared_queries {
    ($db:ty) => {
        use leash_core::audit::Checkpoint;
        use leash_core::grant::Grant;
        use leash_core::secret::SecretDigest;

        use crate::common::{
            APPROVAL_COLUMNS, Columns as _, GRANT_BY_HANDLE, GRANT_COLUMNS, agent_from_row,
            approval_from_row, grant_from_row, grant_with_agent_from_row, json_list, unavailable,
            user_from_row, vault_from_row,
        };
        use crate::{
            ActionUse, Agent, Approval, ApprovalStatus, AuditQuery, GrantEnd, StoreResult, User,
            VaultEntry,
        };

        pub(crate) async fn ping<'c>(db: impl sqlx::Executor<'c, Database = $db>) -> StoreResult<()> {
            sqlx::query("SELECT 1").execute(db).await.map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn setting<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            name: &str,
        ) -> StoreResult<Option<Vec<u8>>> {
            let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
                .bind(name)
                .fetch_optional(db)
                .await
                .map_err(unavailable)?;
            row.map(|r| r.column("value")).transpose()
        }

        pub(crate) async fn insert_setting<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            name: &str,
            value: &[u8],
        ) -> StoreResult<()> {
            sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(name)
                .bind(value)
                .execute(db)
                .await
                .map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn create_user<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .execute(db)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn user_by_key<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            key: &SecretDigest,
        ) -> StoreResult<Option<User>> {
            let row = sqlx::query("SELECT id, name, created_at FROM users WHERE key_digest = $1")
                .bind(key.as_str())
                .fetch_optional(db)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(user_from_row).transpose()
        }

        pub(crate) async fn list_users<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
        ) -> StoreResult<Vec<User>> {
            let rows = sqlx::query("SELECT id, name, created_at FROM users ORDER BY created_at, id")
                .fetch_all(db)
                .await
                .map_err(unavailable)?;
            rows.iter().map(user_from_row).collect()
        }

        pub(crate) async fn create_agent<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .execute(db)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn agent<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            id: &str,
        ) -> StoreResult<Option<Agent>> {
            let row = sqlx::query("SELECT * FROM agents WHERE id = $1")
                .bind(id)
                .fetch_optional(db)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(agent_from_row).transpose()
        }

        pub(crate) async fn list_agents<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
        ) -> StoreResult<Vec<Agent>> {
            let rows = sqlx::query("SELECT * FROM agents ORDER BY created_at, id")
                .fetch_all(db)
                .await
                .map_err(unavailable)?;
            rows.iter().map(agent_from_row).collect()
        }

        /// Marks the agent disabled; false if there is no such agent.
        pub(crate) async fn disable_agent_row<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            id: &str,
        ) -> StoreResult<bool> {
            let done = sqlx::query("UPDATE agents SET disabled = 1 WHERE id = $1")
                .bind(id)
                .execute(db)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }

        /// Revokes every active grant of the agent.
        pub(crate) async fn revoke_agent_grants<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            id: &str,
            now: i64,
        ) -> StoreResult<()> {
            sqlx::query(
                "UPDATE grants SET status = 'revoked', ended_at = $1, \
                 end_reason = 'agent disabled' WHERE agent = $2 AND status = 'active'",
            )
            .bind(now)
            .bind(id)
            .execute(db)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn create_grant<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .execute(db)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn grant<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            id: &str,
        ) -> StoreResult<Option<Grant>> {
            let row = sqlx::query(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = $1"))
                .bind(id)
                .fetch_optional(db)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(grant_from_row).transpose()
        }

        pub(crate) async fn grant_by_handle<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            handle: &SecretDigest,
        ) -> StoreResult<Option<(Grant, Agent)>> {
            let row = sqlx::query(&GRANT_BY_HANDLE)
                .bind(handle.as_str())
                .fetch_optional(db)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(grant_with_agent_from_row).transpose()
        }

        pub(crate) async fn list_grants<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            subject: Option<&str>,
        ) -> StoreResult<Vec<Grant>> {
            let rows = sqlx::query(&format!(
                "SELECT {GRANT_COLUMNS} FROM grants \
                 WHERE (CAST($1 AS TEXT) IS NULL OR subject = $1) ORDER BY created_at DESC, id"
            ))
            .bind(subject)
            .fetch_all(db)
            .await
            .map_err(unavailable)?;
            rows.iter().map(grant_from_row).collect()
        }

        /// The compare-and-set of `Store::end_grant`.
        pub(crate) async fn end_grant<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .fetch_optional(db)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(grant_from_row).transpose()
        }

        pub(crate) async fn audit_lines<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .fetch_all(db)
            .await
            .map_err(unavailable)
        }

        pub(crate) async fn checkpoints<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            since_seq: u64,
        ) -> StoreResult<Vec<Checkpoint>> {
            let rows = sqlx::query(
                "SELECT seq, hash, ts, kid, sig FROM audit_checkpoints WHERE seq > $1 \
                 ORDER BY seq",
            )
            .bind(since_seq.min(i64::MAX as u64) as i64)
            .fetch_all(db)
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|row| {
                    Ok(Checkpoint {
                        seq: row.int("seq")?.max(0) as u64,
                        hash: row.column("hash")?,
                        ts: row.column("ts")?,
                        kid: row.column("kid")?,
                        sig: row.column("sig")?,
                    })
                })
                .collect()
        }

        pub(crate) async fn action_uses<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            subject: Option<&str>,
        ) -> StoreResult<Vec<ActionUse>> {
            let rows = sqlx::query(
                "SELECT grant_id, action, count(*) AS uses, max(at) AS last_used \
                 FROM audit_events WHERE kind = 'gateway.request' AND decision = 'allow' \
                 AND grant_id IS NOT NULL AND action IS NOT NULL \
                 AND (CAST($1 AS TEXT) IS NULL OR subject = $1) GROUP BY grant_id, action",
            )
            .bind(subject)
            .fetch_all(db)
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

        pub(crate) async fn approval<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            id: &str,
        ) -> StoreResult<Option<Approval>> {
            let row = sqlx::query(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(db)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(approval_from_row).transpose()
        }

        pub(crate) async fn list_approvals<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            subject: Option<&str>,
        ) -> StoreResult<Vec<Approval>> {
            let rows = sqlx::query(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals \
                 WHERE (CAST($1 AS TEXT) IS NULL OR subject = $1) ORDER BY requested_at DESC, id"
            ))
            .bind(subject)
            .fetch_all(db)
            .await
            .map_err(unavailable)?;
            rows.iter().map(approval_from_row).collect()
        }

        pub(crate) async fn decide_approval<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .fetch_optional(db)
            .await
            .map_err(unavailable)?;
            row.as_ref().map(approval_from_row).transpose()
        }

        pub(crate) async fn put_credential<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            entry: &VaultEntry,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO vault \
                 (subject, upstream, kind, header_name, sealed, expires_at, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (subject, upstream) DO UPDATE \
                 SET kind = excluded.kind, header_name = excluded.header_name, \
                 sealed = excluded.sealed, expires_at = excluded.expires_at, \
                 created_at = excluded.created_at",
            )
            .bind(&entry.subject)
            .bind(&entry.upstream)
            .bind(&entry.kind)
            .bind(&entry.header_name)
            .bind(&entry.sealed)
            .bind(entry.expires_at)
            .bind(entry.created_at)
            .execute(db)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        pub(crate) async fn credential<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            subject: &str,
            upstream: &str,
        ) -> StoreResult<Option<VaultEntry>> {
            let row = sqlx::query("SELECT * FROM vault WHERE subject = $1 AND upstream = $2")
                .bind(subject)
                .bind(upstream)
                .fetch_optional(db)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(vault_from_row).transpose()
        }

        pub(crate) async fn list_credentials<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            subject: &str,
        ) -> StoreResult<Vec<VaultEntry>> {
            let rows = sqlx::query("SELECT * FROM vault WHERE subject = $1 ORDER BY upstream")
                .bind(subject)
                .fetch_all(db)
                .await
                .map_err(unavailable)?;
            rows.iter().map(vault_from_row).collect()
        }

        /// Deletes a credential; false if there was none.
        pub(crate) async fn delete_credential<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            subject: &str,
            upstream: &str,
        ) -> StoreResult<bool> {
            let done = sqlx::query("DELETE FROM vault WHERE subject = $1 AND upstream = $2")
                .bind(subject)
                .bind(upstream)
                .execute(db)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }

        pub(crate) async fn revoke_token<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
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
            .execute(db)
            .await
            .map_err(unavailable)?;
            Ok(())
        }

        /// Ends a management change: writes its audit event (when the change took effect)
        /// into the outbox in the change's own transaction, commits, runs `committed` (which
        /// drops what memory holds of the changed rows, at once, not after the flush, and also
        /// when the commit reports a failure), and then has `flush` move the event into the
        /// chain (see `Store`).
        pub(crate) async fn commit_change(
            mut tx: sqlx::Transaction<'static, $db>,
            event: Option<&leash_core::audit::AuditEvent>,
            committed: impl FnOnce(),
            flush: impl AsyncFnOnce(),
        ) -> StoreResult<()> {
            if let Some(event) = event {
                let text = serde_json::to_string(event)
                    .map_err(|e| crate::StoreError::Unavailable(e.to_string()))?;
                sqlx::query("INSERT INTO audit_outbox (event) VALUES ($1)")
                    .bind(text)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            // Memory's copies are dropped even when the commit reports a failure: on PostgreSQL
            // a lost connection can hide a commit that happened, and dropping is always safe.
            let result = tx.commit().await.map_err(unavailable);
            committed();
            result?;
            if event.is_some() {
                flush().await;
            }
            Ok(())
        }

        /// Deletes revoked-token rows of tokens expired anyway; returns how many.
        pub(crate) async fn prune_revoked<'c>(
            db: impl sqlx::Executor<'c, Database = $db>,
            now: i64,
        ) -> StoreResult<u64> {
            let done = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < $1")
                .bind(now)
                .execute(db)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected())
        }
    };
}

pub(crate) use shared_queries;
