//! The one implementation of [`Store`] over both backends. [`Repo`] runs every repository
//! method with the shared statements ([`Queries`]) on its backend's database, keeps the rows the
//! request path reads in memory ([`Memos`]), and asks its [`Backend`] only for what the
//! databases do differently: the group-commit writer that records request uses and appends the
//! audit chain (SQLite: a thread on its own connection; PostgreSQL: a task per node), telling
//! the other nodes what changed (PostgreSQL's `pg_notify`; a SQLite database has one server),
//! revoked tokens, and pruning one-time values.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use leash_core::audit::{AuditEvent, Checkpoint, Draft, GENESIS_HASH};
use leash_core::grant::Grant;
use leash_core::secret::SecretDigest;
use sqlx::pool::PoolConnection;
use tokio::sync::oneshot;

use crate::common::{Memo, SignerSlot, draft_of, log_unflushed, unavailable, vault_key};
use crate::queries::Queries;
use crate::{
    ActionUse, Agent, Approval, AuditQuery, CheckpointSigner, GrantEnd, Login, OAuthConnect,
    RequestUse, Resealer, RestoreReport, Session, SigningKeyRow, Store, StoreError, StoreGauges,
    StoreResult, UseVerdict, User, VaultEntry,
};

/// A connection of a backend's database.
pub(crate) type Connection<B> = <<B as Backend>::Db as sqlx::Database>::Connection;

/// What differs between the databases (see the module's docs).
pub(crate) trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// The sqlx database, with the shared statements.
    type Db: Queries;
    /// The pool reads go to.
    fn reader(&self) -> &sqlx::Pool<Self::Db>;
    /// The pool management changes are written through.
    fn writer(&self) -> &sqlx::Pool<Self::Db>;
    /// The statement a management change begins with.
    const BEGIN_WRITE: &'static str;
    /// Tells the other nodes, in the change's transaction, to drop what they hold in memory of
    /// what changed.
    fn announce(
        &self,
        tx: &mut Connection<Self>,
        change: &Change<'_>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Commits a request's use through the group-commit writer; the verdict.
    fn record(&self, used: Box<Prepared>) -> impl Future<Output = StoreResult<UseVerdict>> + Send;
    /// Through the writer: signs the head if events came after the last checkpoint; the latest
    /// checkpoint.
    fn checkpoint_now(&self) -> impl Future<Output = StoreResult<Option<Checkpoint>>> + Send;
    /// Through the chain's appender: moves the events waiting in the outbox into the chain;
    /// how many moved.
    fn flush_outbox(&self) -> impl Future<Output = StoreResult<usize>> + Send;
    /// Marks a token revoked in memory, before the revocation is written: if the write fails,
    /// the token is refused anyway (fail closed).
    fn remember_revoked(&self, jti: &str, expires_at: i64);
    /// Orders a revocation, in its transaction, against the commits of its token's requests:
    /// one that committed before is done, and a later one sees the revocation.
    fn order_revocation(
        &self,
        tx: &mut Connection<Self>,
        grant_id: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Whether a token was revoked.
    fn is_token_revoked(&self, jti: &str) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Deletes the one-time values kept until before `now`; how many.
    fn prune_one_time(&self, now: i64) -> impl Future<Output = StoreResult<u64>> + Send;
    /// Forgets the revoked tokens expired before `now`, whose rows were just pruned.
    fn forget_revoked(&self, now: i64);
    /// Writes a consistent copy of the database to `path` (a new file).
    fn backup_to(&self, path: &std::path::Path) -> impl Future<Output = StoreResult<()>> + Send;
}

/// What a management change changed: memory drops what it holds of it (on every node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// One grant.
    Grant(&'a str),
    /// Every grant (of an agent disabled).
    AllGrants,
    /// A human's credential for an upstream.
    Vault(&'a str, &'a str),
    /// A token revoked.
    Token(&'a str),
}

/// Rows held in memory for the request path: grants for liveness, vault entries for
/// injection (see [`Memo`]).
#[derive(Debug)]
pub(crate) struct Memos {
    pub(crate) grants: Memo<Arc<Grant>>,
    pub(crate) vault: Memo<Option<Arc<VaultEntry>>>,
}

impl Memos {
    pub(crate) fn new() -> Self {
        Self {
            grants: Memo::new(),
            vault: Memo::new(),
        }
    }

    /// Drops what memory holds of what changed. A revoked token stays: the backend marked it
    /// before the write ([`Backend::remember_revoked`]).
    pub(crate) fn forget(&self, change: &Change<'_>) {
        match change {
            Change::Grant(id) => self.grants.invalidate(id),
            Change::AllGrants => self.grants.invalidate_all(),
            Change::Vault(subject, upstream) => {
                self.vault.invalidate(&vault_key(subject, upstream))
            }
            Change::Token(_) => {}
        }
    }

    /// Drops everything.
    pub(crate) fn clear(&self) {
        self.grants.invalidate_all();
        self.vault.invalidate_all();
    }
}

/// A request's use with its audit event already in canonical form, done by the calling task
/// so that the writer only splices in the chain members and hashes.
pub(crate) struct Prepared {
    pub(crate) request: RequestUse,
    /// The event's draft and Unix time, if it has an event.
    pub(crate) draft: Option<(Draft, i64)>,
}

/// The writer's answer to one use. It hands the request back, so that it is freed by the
/// caller's thread, which allocated it.
pub(crate) type Answer = (StoreResult<UseVerdict>, Box<Prepared>);

/// Sends the job `make` builds to a writer and waits for its answer.
pub(crate) async fn ask<J, T>(
    jobs: &flume::Sender<J>,
    make: impl FnOnce(oneshot::Sender<T>) -> J,
) -> StoreResult<T> {
    let (reply, answer) = oneshot::channel();
    jobs.send_async(make(reply)).await.map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())
}

pub(crate) fn stopped() -> StoreError {
    StoreError::Unavailable("the writer has stopped".into())
}

/// The [`Store`] of backend `B` (`SqliteStore`, `PgStore`). Handles are cheap clones of one
/// store.
#[derive(Debug)]
pub struct Repo<B> {
    backend: Arc<B>,
    memos: Arc<Memos>,
    signer: Arc<SignerSlot>,
}

impl<B> Clone for Repo<B> {
    fn clone(&self) -> Self {
        Self {
            backend: Arc::clone(&self.backend),
            memos: Arc::clone(&self.memos),
            signer: Arc::clone(&self.signer),
        }
    }
}

// The bounds are on the methods (crate-private, like `Backend`), not on the impl.
impl<B> Repo<B> {
    /// The store over `backend`, whose writer shares `memos` and `signer`.
    pub(crate) fn new(backend: B, memos: Arc<Memos>, signer: Arc<SignerSlot>) -> Self {
        Self {
            backend: Arc::new(backend),
            memos,
            signer,
        }
    }

    /// The backend (tests look into it).
    #[cfg(test)]
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    async fn read(&self) -> StoreResult<PoolConnection<B::Db>>
    where
        B: Backend,
    {
        self.backend.reader().acquire().await.map_err(unavailable)
    }

    async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, B::Db>>
    where
        B: Backend,
    {
        self.backend
            .writer()
            .begin_with(B::BEGIN_WRITE)
            .await
            .map_err(unavailable)
    }

    /// Ends a management change: writes its audit event (when the change took effect) into
    /// the outbox and tells the other nodes what changed, in the change's own transaction;
    /// commits; drops what memory holds of what changed (at once, not after the flush, and also
    /// when the commit reports a failure: on PostgreSQL a lost connection can hide a commit that
    /// happened, and dropping is always safe); then has the appender move the event into the
    /// chain (see `Store`).
    async fn commit_change(
        &self,
        mut tx: sqlx::Transaction<'static, B::Db>,
        event: Option<&AuditEvent>,
        changes: &[Change<'_>],
    ) -> StoreResult<()>
    where
        B: Backend,
    {
        if let Some(event) = event {
            B::Db::stage_event(&mut tx, event).await?;
        }
        for change in changes {
            self.backend.announce(&mut tx, change).await?;
        }
        let result = tx.commit().await.map_err(unavailable);
        for change in changes {
            self.memos.forget(change);
        }
        result?;
        if event.is_some() {
            self.flush_outbox().await;
        }
        Ok(())
    }

    /// Moves the outbox's events into the chain. A failure leaves them there for the next
    /// flush (see `Store`), so it is logged, not returned.
    pub(crate) async fn flush_outbox(&self)
    where
        B: Backend,
    {
        if let Err(e) = self.backend.flush_outbox().await {
            log_unflushed(&e);
        }
    }
}

#[async_trait]
impl<B: Backend> Store for Repo<B> {
    async fn ping(&self) -> StoreResult<()> {
        B::Db::ping(&mut *self.read().await?).await
    }

    async fn gauges(&self, now: i64) -> StoreResult<StoreGauges> {
        B::Db::gauges(&mut *self.read().await?, now).await
    }

    async fn backup_to(&self, path: &std::path::Path) -> StoreResult<()> {
        self.backend.backup_to(path).await
    }

    async fn finish_restore(
        &self,
        now: i64,
        next_key: &SigningKeyRow,
        restored: &mut AuditEvent,
        rotated: &AuditEvent,
    ) -> StoreResult<Option<RestoreReport>> {
        let mut tx = self.begin().await?;
        if B::Db::setting(&mut tx, crate::RESTORE_PENDING)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let report = B::Db::roll_back_restored(&mut tx, now).await?;
        // Whatever signed before the snapshot was taken, and after it on the old deployment,
        // is withdrawn: the restored store signs with a key of its own.
        B::Db::withdraw_keys(&mut tx, now).await?;
        if !B::Db::insert_signing_key(&mut tx, next_key).await? {
            return Err(StoreError::Conflict);
        }
        restored.reason = Some(match &report.last_event {
            Some((seq, hash)) => format!(
                "restored from a snapshot ending at seq {seq} (hash {hash}): {} grants revoked, \
                 {} pending approvals expired, {} sessions ended, signing key replaced; users \
                 and agents disabled after the snapshot are enabled in it",
                report.grants_revoked, report.approvals_expired, report.sessions_ended
            ),
            None => "restored from a snapshot with no events".to_owned(),
        });
        B::Db::stage_event(&mut tx, restored).await?;
        self.commit_change(tx, Some(rotated), &[Change::AllGrants])
            .await?;
        self.memos.clear();
        Ok(Some(report))
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
        // From the writer: a rotation must be seen at once by the node that made it.
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::signing_keys(&mut conn).await
    }

    async fn init_signing_key(&self, key: &SigningKeyRow) -> StoreResult<()> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::insert_signing_key(&mut conn, key).await.map(|_| ())
    }

    async fn rotate_signing_key(
        &self,
        newest: &str,
        next: &SigningKeyRow,
        previous_until: i64,
        withdraw_all: bool,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        // The newest key is the only one published without an end: ending it is the claim. Of
        // two rotations at once, the second waits on its row and then finds it ended.
        if !B::Db::end_publication(&mut tx, newest, previous_until).await? {
            return Err(StoreError::Conflict);
        }
        if withdraw_all {
            B::Db::withdraw_keys(&mut tx, previous_until).await?;
        }
        if !B::Db::insert_signing_key(&mut tx, next).await? {
            return Err(StoreError::Conflict);
        }
        self.commit_change(tx, Some(event), &[]).await
    }

    async fn reseal_all(
        &self,
        reseal: &Resealer<'_>,
        event: Option<&AuditEvent>,
    ) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let mut changed = 0;
        for (place, sealed) in B::Db::sealed_values(&mut tx).await? {
            let Some(resealed) = reseal(&place, &sealed).map_err(StoreError::Corrupt)? else {
                continue;
            };
            if !B::Db::replace_sealed(&mut tx, &place, &sealed, &resealed).await? {
                return Err(StoreError::Conflict);
            }
            changed += 1;
        }
        self.commit_change(tx, event, &[]).await?;
        self.memos.clear();
        Ok(changed)
    }

    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        B::Db::setting(&mut *self.read().await?, name).await
    }

    async fn cookie_jar(&self, grant_id: &str, upstream: &str) -> StoreResult<Option<Vec<u8>>> {
        B::Db::cookie_jar(&mut *self.read().await?, grant_id, upstream).await
    }

    async fn put_cookie_jar(
        &self,
        grant_id: &str,
        upstream: &str,
        sealed: &[u8],
        now: i64,
    ) -> StoreResult<bool> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::put_cookie_jar(&mut conn, grant_id, upstream, sealed, now).await
    }

    async fn init_setting(&self, name: &str, value: &[u8]) -> StoreResult<Vec<u8>> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::insert_setting(&mut conn, name, value).await?;
        B::Db::setting(&mut conn, name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("setting {name} vanished")))
    }

    async fn create_user(
        &self,
        user: &User,
        key: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        B::Db::create_user(&mut tx, user, key).await?;
        self.commit_change(tx, Some(event), &[]).await
    }

    async fn user_by_key(&self, key: &SecretDigest) -> StoreResult<Option<User>> {
        B::Db::user_by_key(&mut *self.read().await?, key).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        B::Db::list_users(&mut *self.read().await?).await
    }

    async fn oidc_user(
        &self,
        issuer: &str,
        subject: &str,
        new: &User,
        key: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<User> {
        let mut tx = self.begin().await?;
        if let Some(user) = B::Db::user_by_oidc_subject(&mut tx, issuer, subject).await? {
            return Ok(user);
        }
        let mut user = new.clone();
        if B::Db::user_name_taken(&mut tx, &user.name).await? {
            // Names are for display; who a human is comes only from (iss, sub).
            user.name = format!("{} ({})", user.name, user.id);
        }
        B::Db::create_oidc_user(&mut tx, &user, key, issuer, subject).await?;
        self.commit_change(tx, Some(event), &[]).await?;
        Ok(user)
    }

    async fn disable_user(&self, id: &str, now: i64, event: &AuditEvent) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let found = B::Db::disable_user_row(&mut tx, id).await?;
        B::Db::revoke_user_grants(&mut tx, id, now).await?;
        self.commit_change(tx, found.then_some(event), &[Change::AllGrants])
            .await
            .map(|()| found)
    }

    async fn create_session(
        &self,
        id: &SecretDigest,
        session: &Session,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        B::Db::create_session(&mut tx, id, session).await?;
        self.commit_change(tx, Some(event), &[]).await
    }

    async fn session(&self, id: &SecretDigest) -> StoreResult<Option<Session>> {
        B::Db::session(&mut *self.read().await?, id).await
    }

    async fn touch_session(&self, id: &SecretDigest, now: i64) -> StoreResult<()> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::touch_session(&mut conn, id, now).await
    }

    async fn end_session(&self, id: &SecretDigest, event: &AuditEvent) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let found = B::Db::delete_session(&mut tx, id).await?;
        self.commit_change(tx, found.then_some(event), &[])
            .await
            .map(|()| found)
    }

    async fn create_login(&self, id: &SecretDigest, login: &Login) -> StoreResult<()> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::create_login(&mut conn, id, login).await
    }

    async fn take_login(&self, id: &SecretDigest) -> StoreResult<Option<Login>> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::take_login(&mut conn, id).await
    }

    async fn create_connect(
        &self,
        state: &SecretDigest,
        connect: &OAuthConnect,
    ) -> StoreResult<()> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::create_connect(&mut conn, state, connect).await
    }

    async fn take_connect(&self, state: &SecretDigest) -> StoreResult<Option<OAuthConnect>> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::take_connect(&mut conn, state).await
    }

    async fn create_agent(&self, agent: &Agent, event: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        B::Db::create_agent(&mut tx, agent).await?;
        self.commit_change(tx, Some(event), &[]).await
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        B::Db::agent(&mut *self.read().await?, id).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        B::Db::list_agents(&mut *self.read().await?).await
    }

    async fn disable_agent(&self, id: &str, now: i64, event: &AuditEvent) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let found = B::Db::disable_agent_row(&mut tx, id).await?;
        B::Db::revoke_agent_grants(&mut tx, id, now).await?;
        self.commit_change(tx, found.then_some(event), &[Change::AllGrants])
            .await
            .map(|()| found)
    }

    async fn create_grant(
        &self,
        grant: &Grant,
        handle: &SecretDigest,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        B::Db::create_grant(&mut tx, grant, handle).await?;
        self.commit_change(tx, Some(event), &[]).await
    }

    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        B::Db::grant(&mut *self.read().await?, id).await
    }

    async fn grant_by_handle(&self, handle: &SecretDigest) -> StoreResult<Option<(Grant, Agent)>> {
        B::Db::grant_by_handle(&mut *self.read().await?, handle).await
    }

    async fn list_grants(&self, subject: Option<&str>) -> StoreResult<Vec<Grant>> {
        B::Db::list_grants(&mut *self.read().await?, subject).await
    }

    async fn end_grant(
        &self,
        id: &str,
        end: GrantEnd,
        reason: Option<&str>,
        now: i64,
        event: &AuditEvent,
    ) -> StoreResult<Option<Grant>> {
        let mut tx = self.begin().await?;
        let ended = B::Db::end_grant(&mut tx, id, end, reason, now).await?;
        self.commit_change(tx, ended.is_some().then_some(event), &[Change::Grant(id)])
            .await
            .map(|()| ended)
    }

    async fn live_grant(&self, id: &str) -> StoreResult<Option<Arc<Grant>>> {
        let grants = &self.memos.grants;
        if let Some(grant) = grants.get(id) {
            return Ok(Some(grant));
        }
        let read_at = grants.epoch();
        let Some(grant) = self.grant(id).await? else {
            return Ok(None);
        };
        let grant = Arc::new(grant);
        grants.fill(grant.id.clone(), Arc::clone(&grant), read_at);
        Ok(Some(grant))
    }

    async fn record_use(&self, mut request: RequestUse) -> StoreResult<UseVerdict> {
        if request.is_empty() {
            return Ok(UseVerdict::Recorded);
        }
        let draft = draft_of(&request)?;
        if let Some(event) = &mut request.audit {
            // The writer writes the hash into this; the request comes back to be freed here.
            event.hash.reserve(GENESIS_HASH.len());
        }
        self.backend
            .record(Box::new(Prepared { request, draft }))
            .await
    }

    fn set_checkpoint_signer(&self, signer: CheckpointSigner) {
        let _ = self.signer.0.set(signer);
    }

    async fn checkpoint_now(&self) -> StoreResult<Option<Checkpoint>> {
        self.backend.checkpoint_now().await
    }

    async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>> {
        B::Db::audit_lines(&mut *self.read().await?, query).await
    }

    async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>> {
        B::Db::checkpoints(&mut *self.read().await?, since_seq).await
    }

    async fn action_uses(&self, subject: Option<&str>) -> StoreResult<Vec<ActionUse>> {
        B::Db::action_uses(&mut *self.read().await?, subject).await
    }

    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        B::Db::approval(&mut *self.read().await?, id).await
    }

    async fn approval_preview(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        B::Db::approval_preview(&mut *self.read().await?, id).await
    }

    async fn list_approvals(&self, subject: Option<&str>) -> StoreResult<Vec<Approval>> {
        B::Db::list_approvals(&mut *self.read().await?, subject).await
    }

    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        approver: &str,
        now: i64,
        event: &AuditEvent,
    ) -> StoreResult<Option<Approval>> {
        let mut tx = self.begin().await?;
        let decided = B::Db::decide_approval(&mut tx, id, approve, approver, now).await?;
        self.commit_change(tx, decided.is_some().then_some(event), &[])
            .await
            .map(|()| decided)
    }

    async fn put_credential(&self, entry: &VaultEntry, event: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        B::Db::put_credential(&mut tx, entry).await?;
        let change = Change::Vault(&entry.subject, &entry.upstream);
        self.commit_change(tx, Some(event), &[change]).await
    }

    async fn credential(&self, subject: &str, upstream: &str) -> StoreResult<Option<VaultEntry>> {
        let vault = &self.memos.vault;
        let key = vault_key(subject, upstream);
        if let Some(entry) = vault.get(&key) {
            return Ok(entry.as_deref().cloned());
        }
        let read_at = vault.epoch();
        let entry = B::Db::credential(&mut *self.read().await?, subject, upstream).await?;
        vault.fill(key, entry.clone().map(Arc::new), read_at);
        Ok(entry)
    }

    async fn credential_now(
        &self,
        subject: &str,
        upstream: &str,
    ) -> StoreResult<Option<VaultEntry>> {
        // From the writer: on PostgreSQL a reader could be a replica behind it.
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::credential(&mut conn, subject, upstream).await
    }

    async fn list_credentials(&self, subject: &str) -> StoreResult<Vec<VaultEntry>> {
        B::Db::list_credentials(&mut *self.read().await?, subject).await
    }

    async fn claim_refresh(
        &self,
        subject: &str,
        upstream: &str,
        version: i64,
        now: i64,
        until: i64,
    ) -> StoreResult<bool> {
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        B::Db::claim_refresh(&mut conn, subject, upstream, version, now, until).await
    }

    async fn store_refreshed(
        &self,
        subject: &str,
        upstream: &str,
        version: i64,
        sealed: &[u8],
        event: &AuditEvent,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let stored = B::Db::store_refreshed(&mut tx, subject, upstream, version, sealed).await?;
        let change = Change::Vault(subject, upstream);
        self.commit_change(tx, stored.then_some(event), &[change])
            .await
            .map(|()| stored)
    }

    async fn refresh_failed(
        &self,
        subject: &str,
        upstream: &str,
        version: i64,
        retry_at: Option<i64>,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        B::Db::refresh_failed(&mut tx, subject, upstream, version, retry_at).await?;
        let change = Change::Vault(subject, upstream);
        self.commit_change(tx, Some(event), &[change]).await
    }

    async fn delete_credential(
        &self,
        subject: &str,
        upstream: &str,
        event: &AuditEvent,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let deleted = B::Db::delete_credential(&mut tx, subject, upstream).await?;
        let change = Change::Vault(subject, upstream);
        self.commit_change(tx, deleted.then_some(event), &[change])
            .await
            .map(|()| deleted)
    }

    async fn revoke_token(
        &self,
        jti: &str,
        grant_id: &str,
        expires_at: i64,
        event: &AuditEvent,
    ) -> StoreResult<()> {
        self.backend.remember_revoked(jti, expires_at);
        let mut tx = self.begin().await?;
        self.backend.order_revocation(&mut tx, grant_id).await?;
        B::Db::revoke_token(&mut tx, jti, grant_id, expires_at).await?;
        self.commit_change(tx, Some(event), &[Change::Token(jti)])
            .await
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        self.backend.is_token_revoked(jti).await
    }

    async fn prune(&self, now: i64) -> StoreResult<u64> {
        let one_time = self.backend.prune_one_time(now).await?;
        let mut conn = self.backend.writer().acquire().await.map_err(unavailable)?;
        let tokens = B::Db::prune_revoked(&mut conn, now).await?;
        let sessions = B::Db::prune_sessions(&mut conn, now).await?;
        self.backend.forget_revoked(now);
        Ok(one_time + tokens + sessions)
    }
}
