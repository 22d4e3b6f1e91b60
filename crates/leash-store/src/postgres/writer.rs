//! The PostgreSQL group-commit writer: one task per node commits the request uses waiting at
//! that moment in one transaction. What a batch decides is decided by the shared rules
//! (`rules`); this module fetches what they need for the whole batch first, then writes what
//! they decided, each step one statement for the whole batch (arrays bound with `unnest`): a
//! round trip to the server costs more than the work of a row, so a batch costs about the same
//! round trips whether it holds one request or sixty-four.
//!
//! Ordering across nodes: a batch with events locks the chain head first, so audited batches
//! of all nodes take turns and never deadlock on each other's rows; the batch's grants are
//! locked before the revoked tokens are read, which orders each use against a revocation of
//! its token (`Backend::order_revocation`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use leash_core::audit::{AuditEvent, Checkpoint};
use leash_core::dpop::ReplayKey;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::oneshot;

use crate::chain::ChainHead;
use crate::common::{
    APPROVAL_COLUMNS, Columns as _, SignerSlot, log_unflushed, outcome_name, staged_event,
    unavailable,
};
use crate::postgres::notify;
use crate::queries::Queries;
use crate::repo::{Answer, Change, Memos, Prepared};
use crate::rules::{Batch, Budget, Facts};
use crate::{CheckpointSigner, StoreError, StoreResult, UseVerdict};

/// Most request uses committed in one transaction.
const MAX_USE_BATCH: usize = 64;
/// How often a transaction that lost a deadlock or serialisation race is tried again.
const RETRIES: usize = 3;

/// Work for the writer task.
pub(crate) enum UseJob {
    /// One request's use and where to send the verdict.
    Use(Box<Prepared>, oneshot::Sender<Answer>),
    /// Sign the head now (if it moved) and send back the latest checkpoint.
    Checkpoint(oneshot::Sender<StoreResult<Option<Checkpoint>>>),
}

impl std::fmt::Debug for UseJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Use(..) => "Use",
            Self::Checkpoint(_) => "Checkpoint",
        })
    }
}

/// The group-commit task: commits the uses waiting at each moment in one transaction. Ends
/// when the store is dropped (its queue closes).
pub(crate) async fn run(
    pool: PgPool,
    jobs: flume::Receiver<UseJob>,
    memos: Arc<Memos>,
    signer: Arc<SignerSlot>,
) {
    while let Ok(first) = jobs.recv_async().await {
        let mut batch = Vec::new();
        let mut pending = Some(first);
        while let Some(job) = pending.take() {
            match job {
                UseJob::Use(request, reply) => batch.push((request, reply)),
                UseJob::Checkpoint(reply) => {
                    // The timer's checkpoint also retries events an earlier flush left behind.
                    if let Err(e) = flush_outbox(&pool, signer.0.get()).await {
                        log_unflushed(&e);
                    }
                    let _ = reply.send(checkpoint_now(&pool, signer.0.get()).await);
                }
            }
            if batch.len() < MAX_USE_BATCH {
                pending = jobs.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let (uses, replies): (Vec<Box<Prepared>>, Vec<_>) = batch.into_iter().unzip();
        let mut result = Err(StoreError::Unavailable("not tried".into()));
        for _ in 0..RETRIES {
            result = record_batch(&pool, &uses, signer.0.get()).await;
            match &result {
                Err(StoreError::Unavailable(message)) if is_retryable(message) => continue,
                _ => break,
            }
        }
        let verdicts = match result {
            Ok((verdicts, spent)) => {
                for id in &spent {
                    memos.grants.invalidate(id);
                }
                verdicts
                    .into_iter()
                    .map(Ok)
                    .collect::<Vec<StoreResult<_>>>()
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed: the requests are refused");
                let message = e.to_string();
                (0..uses.len())
                    .map(|_| Err(StoreError::Unavailable(message.clone())))
                    .collect()
            }
        };
        for ((reply, verdict), used) in replies.into_iter().zip(verdicts).zip(uses) {
            let _ = reply.send((verdict, used));
        }
    }
}

/// Deadlocks (40P01) and serialisation failures (40001) are lost races, not failures.
fn is_retryable(message: &str) -> bool {
    message.contains("40P01") || message.contains("40001") || message.contains("deadlock")
}

/// Locks the chain head for the rest of the transaction.
async fn lock_head(tx: &mut Transaction<'_, Postgres>) -> StoreResult<ChainHead> {
    let row = sqlx::query("SELECT seq, hash, checkpointed FROM audit_head WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(ChainHead {
        seq: row.int("seq")?.max(0) as u64,
        hash: row.column("hash")?,
        checkpointed: row.int("checkpointed")?.max(0) as u64,
    })
}

async fn save_head(tx: &mut Transaction<'_, Postgres>, head: &ChainHead) -> StoreResult<()> {
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2, checkpointed = $3 WHERE id = 1")
        .bind(head.seq as i64)
        .bind(&head.hash)
        .bind(head.checkpointed as i64)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

async fn insert_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    checkpoint: &Checkpoint,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, ts, kid, sig) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(checkpoint.seq as i64)
    .bind(&checkpoint.hash)
    .bind(&checkpoint.ts)
    .bind(&checkpoint.kid)
    .bind(&checkpoint.sig)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

async fn checkpoint_now(
    pool: &PgPool,
    signer: Option<&CheckpointSigner>,
) -> StoreResult<Option<Checkpoint>> {
    if signer.is_some() {
        let mut tx = pool.begin().await.map_err(unavailable)?;
        let mut head = lock_head(&mut tx).await?;
        if let Some(checkpoint) = head.new_checkpoint(signer) {
            insert_checkpoint(&mut tx, &checkpoint).await?;
            head.checkpointed = head.seq;
            save_head(&mut tx, &head).await?;
        }
        tx.commit().await.map_err(unavailable)?;
    }
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    <Postgres as Queries>::latest_checkpoint(&mut conn).await
}

/// Appends the events waiting in the outbox to the chain, in their order, and deletes them from
/// it, in one transaction that locks the head first (as every appender does); returns how many
/// moved. A node that waited for the lock sees the rows another node moved meanwhile as gone.
pub(crate) async fn flush_outbox(
    pool: &PgPool,
    signer: Option<&CheckpointSigner>,
) -> StoreResult<usize> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let mut head = lock_head(&mut tx).await?;
    let staged = sqlx::query("SELECT id, event FROM audit_outbox ORDER BY id")
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
    if staged.is_empty() {
        return Ok(0);
    }
    let mut moved = Vec::with_capacity(staged.len());
    let mut chain = Appended::default();
    for row in &staged {
        let id = row.int("id")?;
        let event = staged_event(id, &row.column::<String>("event")?)?;
        chain.append(&mut head, event, None, UseVerdict::Recorded, signer)?;
        moved.push(id);
    }
    chain.insert(&mut tx).await?;
    // Exactly the rows read: another node's change may commit a lower id after this read (ids
    // are handed out before commit), and a range delete would drop its event unchained.
    sqlx::query("DELETE FROM audit_outbox WHERE id = ANY($1::BIGINT[])")
        .bind(&moved)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    save_head(&mut tx, &head).await?;
    tx.commit().await.map_err(unavailable)?;
    Ok(moved.len())
}

/// Judges and records a batch of uses in one transaction (see the module's docs); returns the
/// verdicts, in order, and the grants found spent or used up.
async fn record_batch(
    pool: &PgPool,
    uses: &[Box<Prepared>],
    signer: Option<&CheckpointSigner>,
) -> StoreResult<(Vec<UseVerdict>, Vec<String>)> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let has_events = uses.iter().any(|used| used.request.audit.is_some());
    let mut head = if has_events {
        Some(lock_head(&mut tx).await?)
    } else {
        None
    };
    let mut known = Known::fetch(&mut tx, uses).await?;
    let mut batch = Batch::default();
    let verdicts: Vec<UseVerdict> = uses
        .iter()
        .map(|used| {
            let Ok(verdict) = batch.judge(&used.request, &mut known);
            verdict
        })
        .collect();
    let spent: Vec<String> = batch.spent().map(str::to_owned).collect();
    write_spending(&mut tx, &batch, &known).await?;
    for id in &spent {
        notify(&mut tx, &Change::Grant(id)).await?;
    }
    if let Some(head) = &mut head {
        let mut chain = Appended::default();
        for (used, verdict) in uses.iter().zip(&verdicts) {
            if let Some(event) = &used.request.audit {
                chain.append(head, event.clone(), used.draft.as_ref(), *verdict, signer)?;
            }
        }
        chain.insert(&mut tx).await?;
        save_head(&mut tx, head).await?;
    }
    tx.commit().await.map_err(unavailable)?;
    Ok((verdicts, spent))
}

/// What the database holds for a batch, fetched before the rules run, in an order that makes
/// it hold until the commit: the one-time values are claimed first (an insert that another
/// node's claim of the same value makes wait, then fail), then the grants are locked, and only
/// then are the revoked tokens read.
#[derive(Debug, Default)]
struct Known {
    /// The values the batch tried to insert, and those it did insert (new to the database).
    tried: HashSet<ReplayKey>,
    inserted: HashSet<ReplayKey>,
    /// Values only checked (a single use not spent) that were consumed before.
    checked_consumed: HashSet<ReplayKey>,
    revoked: HashSet<String>,
    /// Approved approvals (locked) and their expiry.
    approved: HashMap<String, i64>,
    /// Active grants (locked) and their budgets.
    budgets: HashMap<String, Budget>,
    /// Pending approvals of a grant unexpired at a time.
    pending: HashMap<(String, i64), u64>,
}

impl Known {
    async fn fetch(
        tx: &mut Transaction<'_, Postgres>,
        uses: &[Box<Prepared>],
    ) -> StoreResult<Self> {
        let requests = || uses.iter().map(|used| &used.request);
        let mut known = Self::default();

        // Single uses only checked (requests asking for an approval; rare), read before the
        // batch's own inserts.
        let checked: Vec<&[u8]> = requests()
            .filter_map(|request| request.single_use.as_ref())
            .filter(|single| !single.spend)
            .map(|single| single.value.key.as_slice())
            .collect();
        if !checked.is_empty() {
            let found: Vec<Vec<u8>> =
                sqlx::query_scalar("SELECT key FROM replay WHERE key = ANY($1::BYTEA[])")
                    .bind(&checked)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(unavailable)?;
            known.checked_consumed = found.iter().filter_map(|key| key_of(key)).collect();
        }

        // Every value a request may consume, once, kept until the latest time asked. Those
        // stored before come back missing from RETURNING; those no request claims are
        // deleted again before the commit.
        let mut until: HashMap<ReplayKey, i64> = HashMap::new();
        for value in requests().flat_map(crate::RequestUse::consumed) {
            let kept = until.entry(value.key).or_insert(value.keep_until);
            *kept = (*kept).max(value.keep_until);
        }
        if !until.is_empty() {
            let (keys, untils): (Vec<&[u8]>, Vec<i64>) = until
                .iter()
                .map(|(key, until)| (key.as_slice(), *until))
                .unzip();
            let inserted: Vec<Vec<u8>> = sqlx::query_scalar(
                "INSERT INTO replay (key, until) SELECT * FROM unnest($1::BYTEA[], $2::BIGINT[]) \
                 ON CONFLICT DO NOTHING RETURNING key",
            )
            .bind(&keys)
            .bind(&untils)
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
            known.inserted = inserted.iter().filter_map(|key| key_of(key)).collect();
            known.tried = until.into_keys().collect();
        }

        // The grants counted against, exchanged or asked an approval for, locked before
        // anything is spent; then the revoked tokens, read after that lock.
        let grants: HashSet<&str> = requests()
            .flat_map(|request| {
                let pending = request.pending_approval.as_ref().map(|a| &a.grant_id);
                request
                    .grant
                    .iter()
                    .chain(&request.exchanged_grant)
                    .chain(pending)
            })
            .map(String::as_str)
            .collect();
        if !grants.is_empty() {
            let ids: Vec<&str> = grants.into_iter().collect();
            let rows = sqlx::query(
                "SELECT id, requests_used, max_requests, expires_at FROM grants \
                 WHERE id = ANY($1::TEXT[]) AND status = 'active' FOR UPDATE",
            )
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
            for row in &rows {
                let budget = Budget {
                    used: row.int("requests_used")?,
                    max: row.column("max_requests")?,
                    expires_at: row.int("expires_at")?,
                };
                known.budgets.insert(row.column("id")?, budget);
            }
        }
        let tokens: Vec<&str> = requests().filter_map(|r| r.token.as_deref()).collect();
        if !tokens.is_empty() {
            let revoked: Vec<String> =
                sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE jti = ANY($1::TEXT[])")
                    .bind(&tokens)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(unavailable)?;
            known.revoked = revoked.into_iter().collect();
        }

        // Approvals spent (rare), locked: of two nodes spending one, the second waits and
        // finds it used.
        let approvals: Vec<&str> = requests().filter_map(|r| r.approval.as_deref()).collect();
        if !approvals.is_empty() {
            let rows = sqlx::query(
                "SELECT id, expires_at FROM approvals \
                 WHERE id = ANY($1::TEXT[]) AND status = 'approved' FOR UPDATE",
            )
            .bind(&approvals)
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
            for row in &rows {
                known
                    .approved
                    .insert(row.column("id")?, row.int("expires_at")?);
            }
        }

        // Approvals pending, for the requests that ask for one under a limit (rare: one
        // statement each), read under the grant's lock taken above.
        for request in requests().filter(|r| r.max_pending_approvals.is_some()) {
            if let Some(asked) = &request.pending_approval {
                let count: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM approvals \
                     WHERE grant_id = $1 AND status = 'pending' AND expires_at > $2",
                )
                .bind(&asked.grant_id)
                .bind(asked.requested_at)
                .fetch_one(&mut **tx)
                .await
                .map_err(unavailable)?;
                let at = (asked.grant_id.clone(), asked.requested_at);
                known.pending.insert(at, count.max(0) as u64);
            }
        }
        Ok(known)
    }
}

/// A stored key (a BYTEA of 32 bytes; anything else is not one Leash wrote and is skipped,
/// which can only refuse a request).
fn key_of(bytes: &[u8]) -> Option<ReplayKey> {
    ReplayKey::try_from(bytes).ok()
}

impl Facts for Known {
    type Error = Infallible;

    fn consumed(&mut self, key: &ReplayKey) -> Result<bool, Infallible> {
        Ok(if self.tried.contains(key) {
            !self.inserted.contains(key)
        } else {
            self.checked_consumed.contains(key)
        })
    }

    fn revoked(&mut self, jti: &str) -> Result<bool, Infallible> {
        Ok(self.revoked.contains(jti))
    }

    fn approved_until(&mut self, id: &str) -> Result<Option<i64>, Infallible> {
        Ok(self.approved.get(id).copied())
    }

    fn budget(&mut self, grant: &str) -> Result<Option<Budget>, Infallible> {
        Ok(self.budgets.get(grant).copied())
    }

    fn pending_approvals(&mut self, grant: &str, at: i64) -> Result<u64, Infallible> {
        Ok(self
            .pending
            .get(&(grant.to_owned(), at))
            .copied()
            .unwrap_or(0))
    }
}

/// Writes what the batch decided besides its events: the values inserted that no request
/// claimed are deleted again, then the approvals used, the grants' counts and the new pending
/// approvals are written.
async fn write_spending(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    known: &Known,
) -> StoreResult<()> {
    let unclaimed: Vec<&[u8]> = known
        .inserted
        .iter()
        .filter(|key| !batch.claimed(key))
        .map(|key| key.as_slice())
        .collect();
    if !unclaimed.is_empty() {
        sqlx::query("DELETE FROM replay WHERE key = ANY($1::BYTEA[])")
            .bind(&unclaimed)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
    }
    if !batch.approvals_used().is_empty() {
        let (ids, ats): (Vec<&str>, Vec<i64>) = batch
            .approvals_used()
            .iter()
            .map(|(id, at)| (id.as_str(), *at))
            .unzip();
        sqlx::query(
            "UPDATE approvals SET status = 'used', used_at = u.at \
             FROM unnest($1::TEXT[], $2::BIGINT[]) AS u(id, at) WHERE approvals.id = u.id",
        )
        .bind(&ids)
        .bind(&ats)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    let (grown, counts): (Vec<&str>, Vec<i64>) = batch.counts().unzip();
    if !grown.is_empty() {
        sqlx::query(
            "UPDATE grants SET requests_used = requests_used + c.added \
             FROM unnest($1::TEXT[], $2::BIGINT[]) AS c(id, added) WHERE grants.id = c.id",
        )
        .bind(&grown)
        .bind(&counts)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    for a in batch.approvals_new() {
        sqlx::query(&format!(
            "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
        ))
        .bind(&a.id)
        .bind(&a.grant_id)
        .bind(&a.subject)
        .bind(&a.agent)
        .bind(&a.action)
        .bind(&a.upstream)
        .bind(&a.method)
        .bind(&a.path)
        .bind(&a.query)
        .bind(&a.body_sha256)
        .bind(a.body_size)
        .bind(a.status.as_str())
        .bind(a.requested_at)
        .bind(a.expires_at)
        .bind(a.decided_at)
        .bind(&a.approver)
        .bind(crate::common::headers_json(&a.headers))
        .bind(&a.headers_sha256)
        .bind(a.previewed)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    for (id, sealed) in batch.previews_new() {
        sqlx::query("INSERT INTO approval_previews (id, sealed) VALUES ($1, $2)")
            .bind(id)
            .bind(sealed)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Audit events sealed and waiting to be inserted, as columns, and the checkpoints due among
/// them (inserted after them).
#[derive(Default)]
struct Appended {
    seq: Vec<i64>,
    kind: Vec<String>,
    subject: Vec<Option<String>>,
    actor: Vec<Option<String>>,
    grant_id: Vec<Option<String>>,
    action: Vec<Option<String>>,
    decision: Vec<Option<&'static str>>,
    at: Vec<i64>,
    hash: Vec<String>,
    line: Vec<String>,
    checkpoints: Vec<Checkpoint>,
}

impl Appended {
    /// Seals `event` after `head` and keeps its row, and the checkpoint due after it.
    fn append(
        &mut self,
        head: &mut ChainHead,
        mut event: AuditEvent,
        draft: Option<&(leash_core::audit::Draft, i64)>,
        verdict: UseVerdict,
        signer: Option<&CheckpointSigner>,
    ) -> StoreResult<()> {
        let mut line = String::new();
        let (seq, at) = head
            .append(&mut event, draft, verdict, &mut line)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.seq.push(seq as i64);
        self.decision.push(event.decision.map(outcome_name));
        self.kind.push(event.kind);
        self.subject.push(event.subject);
        self.actor.push(event.actor);
        self.grant_id.push(event.grant_id);
        self.action.push(event.action);
        self.at.push(at);
        self.hash.push(event.hash);
        self.line.push(line);
        if let Some(checkpoint) = head.due_checkpoint(signer) {
            self.checkpoints.push(checkpoint);
            head.checkpointed = head.seq;
        }
        Ok(())
    }

    /// Inserts the events in one statement, then the checkpoints.
    async fn insert(self, tx: &mut Transaction<'_, Postgres>) -> StoreResult<()> {
        if !self.seq.is_empty() {
            sqlx::query(
                "INSERT INTO audit_events \
                 (seq, kind, subject, actor, grant_id, action, decision, at, hash, line) \
                 SELECT * FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
                 $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::TEXT[], $10::TEXT[])",
            )
            .bind(self.seq)
            .bind(self.kind)
            .bind(self.subject)
            .bind(self.actor)
            .bind(self.grant_id)
            .bind(self.action)
            .bind(self.decision)
            .bind(self.at)
            .bind(self.hash)
            .bind(self.line)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
        }
        for checkpoint in &self.checkpoints {
            insert_checkpoint(tx, checkpoint).await?;
        }
        Ok(())
    }
}
