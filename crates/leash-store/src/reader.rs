//! A read-only view of a store's audit trail, for offline checks (`leash audit verify
//! --database`) that may run beside a live server. It never migrates and never writes, takes no
//! lock and starts none of the store's threads: the server stays the database's one owner and
//! its writer the chain's one appender.

use std::str::FromStr as _;
use std::time::Duration;

use leash_core::audit::Checkpoint;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use crate::common::unavailable;
use crate::{AuditQuery, StoreError, StoreResult, display_url};

/// The tables the reader reads: a database without them holds no Leash data.
const READ_TABLES: [&str; 3] = ["settings", "audit_checkpoints", "audit_events"];

/// Reads a store's settings, checkpoints and audit events, and nothing else.
#[derive(Debug)]
pub struct AuditReader {
    pool: Pool,
}

#[derive(Debug)]
enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Opens the database named by `url` for reading its audit trail (see [`AuditReader`]): SQLite
/// read-only (a missing file is not created), PostgreSQL in read-only transactions. A database
/// without Leash's tables is [`StoreError::NotLeash`].
pub async fn open_audit_reader(url: &str) -> StoreResult<AuditReader> {
    let pool = if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).is_file() {
            return Err(StoreError::NotLeash(format!(
                "no database file at {path}: name the file a Leash server stores in"
            )));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .read_only(true)
            .busy_timeout(Duration::from_secs(5));
        Pool::Sqlite(
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
        Pool::Postgres(
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
    let reader = AuditReader { pool };
    reader.check_schema(url).await?;
    Ok(reader)
}

impl AuditReader {
    /// Fails with [`StoreError::NotLeash`] unless every table read is there.
    async fn check_schema(&self, url: &str) -> StoreResult<()> {
        for table in READ_TABLES {
            let probe = format!("SELECT 1 FROM {table} WHERE 1 = 0");
            let found = match &self.pool {
                Pool::Sqlite(pool) => sqlx::query(&probe).execute(pool).await.map(|_| ()),
                Pool::Postgres(pool) => sqlx::query(&probe).execute(pool).await.map(|_| ()),
            };
            if let Err(e) = found {
                return Err(StoreError::NotLeash(format!(
                    "database {} has no Leash schema (table {table}: {e}): name the database \
                     a Leash server stores in",
                    display_url(url)
                )));
            }
        }
        Ok(())
    }

    /// A server-wide setting, if set.
    pub async fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        match &self.pool {
            Pool::Sqlite(pool) => crate::sqlite::q::setting(pool, name).await,
            Pool::Postgres(pool) => crate::postgres::q::setting(pool, name).await,
        }
    }

    /// Checkpoints with `seq` > `since_seq`, oldest first.
    pub async fn checkpoints(&self, since_seq: u64) -> StoreResult<Vec<Checkpoint>> {
        match &self.pool {
            Pool::Sqlite(pool) => crate::sqlite::q::checkpoints(pool, since_seq).await,
            Pool::Postgres(pool) => crate::postgres::q::checkpoints(pool, since_seq).await,
        }
    }

    /// Stored event lines (their hashed JCS form) matching `query`.
    pub async fn audit_lines(&self, query: &AuditQuery) -> StoreResult<Vec<String>> {
        match &self.pool {
            Pool::Sqlite(pool) => crate::sqlite::q::audit_lines(pool, query).await,
            Pool::Postgres(pool) => crate::postgres::q::audit_lines(pool, query).await,
        }
    }
}
