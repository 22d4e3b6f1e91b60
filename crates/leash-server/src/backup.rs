//! Backup and restore (API §3). `GET /v1/backup` (admin; `leash backup`) streams a consistent
//! copy of a SQLite store taken while the server serves. `leash restore` puts one in an empty
//! data dir and marks it; the first start after that rolls the restored store back to safety
//! ([`finish_restore`]): a restore is a rollback, so nothing that was live in the snapshot may
//! come back to life (ATTACKS 61).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use leash_core::audit::{AuditEvent, Mode};
use leash_core::secret::random_id;
use leash_store::Store;

use crate::error::{ApiError, ApiResult};
use crate::extract::Admin;
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// `GET /v1/backup` (admin): the store as of now, as a SQLite database file.
#[utoipa::path(get, path = "/v1/backup", tag = "operations",
    responses((status = 200, description = "a SQLite database file", content_type = "application/vnd.sqlite3"), ApiErrors),
    security(("api_key" = [])))]
pub async fn backup(State(state): State<Arc<AppState>>, _: Admin) -> ApiResult<Response> {
    // Written next to the database (same disk, same permissions), read back, and unlinked
    // as soon as it is open: nothing is left behind, even if the download is cut.
    let path = state
        .config
        .data_dir
        .join(format!(".{}.backup", random_id("bak_")));
    if let Err(e) = state.store.backup_to(&path).await {
        // A copy cut short (a full disk, say) is not left behind either.
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    let file = tokio::fs::File::open(&path).await;
    let _ = std::fs::remove_file(&path);
    let file = file.map_err(|e| ApiError::Unavailable(format!("cannot read the backup: {e}")))?;
    let size = file.metadata().await.map(|m| m.len()).ok();
    tracing::info!(bytes = size, "backup taken");
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"leash-backup.db\""),
    );
    if let Some(size) = size {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

/// The first start after a restore: when the store is marked, revokes what was live, ends the
/// sessions, replaces the signing key and records `system.restore` (see
/// `Store::finish_restore`). Nothing to do otherwise.
pub async fn finish_restore(
    store: &dyn Store,
    master: &leash_core::aead::MasterKey,
    now: i64,
) -> anyhow::Result<()> {
    if store.setting(leash_store::RESTORE_PENDING).await?.is_none() {
        return Ok(());
    }
    let row = crate::keys::new_key(master, now, now);
    let mut restored = AuditEvent::new("system.restore", Mode::System, now);
    restored.actor = Some("leash".into());
    let mut rotated = AuditEvent::new("keys.rotated", Mode::System, now);
    rotated.actor = Some("leash".into());
    rotated.reason = Some(format!(
        "restored: every earlier key withdrawn; {} signs",
        row.kid
    ));
    if let Some(report) = store
        .finish_restore(now, &row, &mut restored, &rotated)
        .await?
    {
        tracing::warn!(
            grants_revoked = report.grants_revoked,
            approvals_expired = report.approvals_expired,
            sessions_ended = report.sessions_ended,
            last_seq = report.last_event.as_ref().map(|(seq, _)| *seq),
            "first start after a restore: what was live in the snapshot is revoked"
        );
    }
    Ok(())
}
