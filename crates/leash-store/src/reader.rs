//! A read-only view of a store's audit trail, for offline checks (`leash audit verify
//! --database`) that may run beside a live server. It never migrates and never writes, takes no
//! lock and starts none of the store's threads: the server stays the database's one owner and
//! its writer the chain's one appender.

use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use leash_core::audit::Checkpoint;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use crate::common::unavailable;
use crate::queries::Queries;
use crate::{AuditQuery, StoreError, StoreResult, display_url};

/// The tables the reader reads: a database without them holds no Leash data.
const READ_TABLES: [&str; 3] = ["settings", "audit_checkpoints", "audit_events"];

/// Reads a store's settings, checkpoints and audit events, and nothing else.
#[derive(Debug)]
pub struct AuditReader {
    pool: Box<dyn Read>,
}

/// What the reader reads, on a pool of either database.
#[async_trait]
trait Read: Send + Sync + std::fmt::Debug {
    async fn probe(&self, table: &str) -> StoreResult<()>;
    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;
    async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>>;
    async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>>;
    async fn signing_keys(&self) -> StoreResult<Vec<crate::SigningKeyRow>>;
}

#[async_trait]
impl<D: Queries> Read for sqlx::Pool<D> {
    async fn probe(&self, table: &str) -> StoreResult<()> {
        D::probe(&mut *self.acquire().await.map_err(unavailable)?, table).await
    }

    async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        D::setting(&mut *self.acquire().await.map_err(unavailable)?, name).await
    }

    async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>> {
        D::checkpoints(&mut *self.acquire().await.map_err(unavailable)?, since_seq).await
    }

    async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>> {
        D::audit_lines(&mut *self.acquire().await.map_err(unavailable)?, query).await
    }

    async fn signing_keys(&self) -> StoreResult<Vec<crate::SigningKeyRow>> {
        D::signing_keys(&mut *self.acquire().await.map_err(unavailable)?).await
    }
}

/// Opens the database named by `url` for reading its audit trail (see [`AuditReader`]): SQLite
/// read-only (a missing file is not created), PostgreSQL in read-only transactions. A database
/// without Leash's tables is [`StoreError::NotLeash`].
pub async fn open_audit_reader(url: &str) -> StoreResult<AuditReader> {
    let pool: Box<dyn Read> = if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).is_file() {
            return Err(StoreError::NotLeash(format!(
                "no database file at {path}: name the file a Leash server stores in"
            )));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .read_only(true)
            .busy_timeout(Duration::from_secs(5));
        Box::new(
            SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(unavailable)?,
        )
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .options([("default_transaction_read_only", "on")]);
        Box::new(
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .map_err(unavailable)?,
        )
    } else {
        return Err(StoreError::UnsupportedUrl(display_url(url)));
    };
    for table in READ_TABLES {
        if let Err(e) = pool.probe(table).await {
            return Err(StoreError::NotLeash(format!(
                "database {} has no Leash schema (table {table}: {e}): name the database a \
                 Leash server stores in",
                display_url(url)
            )));
        }
    }
    Ok(AuditReader { pool })
}

impl AuditReader {
    /// A server-wide setting, if set.
    pub async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.pool.setting(name).await
    }

    /// Checkpoints with `seq` > `since_seq`, oldest first.
    pub async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>> {
        self.pool.checkpoints(since_seq).await
    }

    /// The public JWK (JSON) of every token-signing key there has been, by `kid`: what verifies
    /// the checkpoints, across rotations. Empty for a database from before rotations.
    pub async fn signing_public_keys(&self) -> StoreResult<Vec<(String, String)>> {
        match self.pool.signing_keys().await {
            Ok(rows) => Ok(rows.into_iter().map(|r| (r.kid, r.public_jwk)).collect()),
            Err(_) if self.pool.probe("signing_keys").await.is_err() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Stored event lines (their hashed JCS form) matching `query`.
    pub async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>> {
        self.pool.audit_lines(query).await
    }
}
