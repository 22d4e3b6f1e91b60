//! The PostgreSQL backend, for a cluster of Leash nodes on one database. Every node takes any
//! call; what must hold across nodes is held by the database:
//! - one-time values (`replay`), grant budgets and an approval's single use are claimed by
//!   writes in the request's transaction under row locks, so a value used on one node is
//!   refused on every other (see [`writer`]);
//! - the audit chain has one head row (`audit_head`) that each appending transaction locks
//!   first, so the events of all nodes form one chain in commit order;
//! - the rows each node holds in memory (live grants, vault entries, revoked tokens) are dropped
//!   on every node when they change: the writing transaction sends a notification
//!   (`pg_notify`, delivered on commit), every node listens, and a node that lost its listening
//!   connection drops everything, as it also does every [`RESYNC_EVERY`] in case a
//!   notification was missed.

pub(crate) mod writer;

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use self::writer::UseJob;
use crate::common::{Memo, SignerSlot, unavailable, vault_key};
use crate::repo::{Backend, Change, Connection, Memos, Prepared, Repo, ask};
use crate::{StoreError, StoreResult, UseVerdict};

/// The notification channel of row changes.
const CHANGES: &str = "leash_changes";
/// How often a node drops every memo regardless of notifications (the bound on how long a
/// missed notification can leave a dead grant alive in memory).
const RESYNC_EVERY: Duration = Duration::from_millis(500);

/// PostgreSQL-backed [`Store`](crate::Store).
pub type PgStore = Repo<Postgres>;

/// What the PostgreSQL backend holds: its pool, what this node holds in memory, and its
/// writer.
#[derive(Debug)]
pub struct Postgres {
    pool: PgPool,
    watched: Arc<Watched>,
    signer: Arc<SignerSlot>,
    jobs: flume::Sender<UseJob>,
}

/// What this node holds in memory of rows other nodes may change.
#[derive(Debug)]
struct Watched {
    memos: Arc<Memos>,
    /// Whether a token `jti` is revoked.
    revoked: Memo<bool>,
}

impl Watched {
    fn clear(&self) {
        self.memos.clear();
        self.revoked.invalidate_all();
    }

    /// Applies one change notification (see [`payload`]).
    fn apply(&self, payload: &str) {
        match payload.split_once(':') {
            Some(("grant", id)) => self.memos.forget(&Change::Grant(id)),
            Some(("vault", key)) => self.memos.vault.invalidate(key),
            Some(("token", jti)) => self.revoked.invalidate(jti),
            _ => self.clear(),
        }
    }
}

/// A change as sent on [`CHANGES`]; [`Watched::apply`] reads it.
fn payload(change: &Change<'_>) -> String {
    match change {
        Change::Grant(id) => format!("grant:{id}"),
        Change::AllGrants => "grants".into(),
        Change::Vault(subject, upstream) => format!("vault:{}", vault_key(subject, upstream)),
        Change::Token(jti) => format!("token:{jti}"),
    }
}

/// Queues the news of a change in `tx`: PostgreSQL delivers it on commit, to every node.
pub(crate) async fn notify(tx: &mut sqlx::PgConnection, change: &Change<'_>) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES)
        .bind(payload(change))
        .execute(tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

impl Repo<Postgres> {
    /// Connects to the database at `url` and applies migrations (nodes starting together
    /// take turns: the migrator holds an advisory lock).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e: sqlx::Error| StoreError::Unavailable(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        let memos = Arc::new(Memos::new());
        let watched = Arc::new(Watched {
            memos: memos.clone(),
            revoked: Memo::new(),
        });
        let signer = Arc::new(SignerSlot::default());
        let (jobs, queue) = flume::bounded(1024);
        tokio::spawn(follow_changes(pool.clone(), Arc::downgrade(&watched)));
        tokio::spawn(writer::run(
            pool.clone(),
            queue,
            memos.clone(),
            signer.clone(),
        ));
        let backend = Postgres {
            pool,
            watched,
            signer: signer.clone(),
            jobs,
        };
        let store = Self::new(backend, memos, signer);
        // Events whose change committed but whose move into the chain did not (a node died
        // in between) join the chain now.
        store.flush_outbox().await;
        Ok(store)
    }
}

/// Listens for other nodes' (and this node's) changes and drops the memos they name. Ends when
/// the store is dropped.
async fn follow_changes(pool: PgPool, watched: std::sync::Weak<Watched>) {
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(CHANGES).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let Some(held) = watched.upgrade() else {
            return;
        };
        // Whatever changed while not listening is unknown: start from nothing.
        held.clear();
        drop(held);
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for changes; retrying");
                resync.tick().await;
                continue;
            }
        };
        loop {
            tokio::select! {
                received = listener.try_recv() => {
                    let Some(held) = watched.upgrade() else { return };
                    match received {
                        Ok(Some(notification)) => held.apply(notification.payload()),
                        // The connection was lost and will be re-established by the next call;
                        // notifications in between are lost.
                        Ok(None) => held.clear(),
                        Err(e) => {
                            tracing::warn!(error = %e, "change notifications lost; reconnecting");
                            held.clear();
                            break;
                        }
                    }
                }
                _ = resync.tick() => {
                    let Some(held) = watched.upgrade() else { return };
                    held.clear();
                }
            }
        }
    }
}

impl Backend for Postgres {
    type Db = sqlx::Postgres;

    const BEGIN_WRITE: &'static str = "BEGIN";

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    async fn announce(&self, tx: &mut Connection<Self>, change: &Change<'_>) -> StoreResult<()> {
        notify(tx, change).await
    }

    async fn record(&self, used: Box<Prepared>) -> StoreResult<UseVerdict> {
        let (verdict, _request) = ask(&self.jobs, |reply| UseJob::Use(used, reply)).await?;
        verdict
    }

    async fn checkpoint_now(&self) -> StoreResult<Option<leash_core::audit::Checkpoint>> {
        ask(&self.jobs, UseJob::Checkpoint).await?
    }

    /// On the caller's task: its transaction locks the head first, as every appender's does.
    async fn flush_outbox(&self) -> StoreResult<usize> {
        writer::flush_outbox(&self.pool, self.signer.0.get()).await
    }

    fn remember_revoked(&self, jti: &str, _expires_at: i64) {
        let revoked = &self.watched.revoked;
        revoked.invalidate(jti);
        revoked.fill(jti.to_owned(), true, revoked.epoch());
    }

    /// The grant's row lock orders the revocation against the commits of the token's
    /// requests, which lock it too (`writer::record_batch`): one that locked it first commits
    /// before this one; one that waits reads the revocation.
    async fn order_revocation(&self, tx: &mut Connection<Self>, grant_id: &str) -> StoreResult<()> {
        sqlx::query("SELECT 1 FROM grants WHERE id = $1 FOR SHARE")
            .bind(grant_id)
            .execute(tx)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn is_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        let memo = &self.watched.revoked;
        if let Some(revoked) = memo.get(jti) {
            return Ok(revoked);
        }
        let read_at = memo.epoch();
        let revoked = sqlx::query("SELECT 1 FROM revoked_tokens WHERE jti = $1")
            .bind(jti)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .is_some();
        memo.fill(jti.to_owned(), revoked, read_at);
        Ok(revoked)
    }

    /// One statement, beside the writer: PostgreSQL locks only the rows it deletes, so no
    /// other write waits.
    async fn prune_one_time(&self, now: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM replay WHERE until < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    /// Nothing: this node's memo of revoked tokens is dropped every [`RESYNC_EVERY`] anyway.
    fn forget_revoked(&self, _now: i64) {}

    async fn backup_to(&self, _path: &std::path::Path) -> StoreResult<()> {
        Err(StoreError::Unsupported(
            "a PostgreSQL store is backed up with pg_dump (docs/operations.md)".into(),
        ))
    }
}
