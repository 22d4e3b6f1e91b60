//! The admin or a human, by the API key they send as `Authorization: Bearer`.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use leash_core::secret::SecretDigest;
use leash_store::User;

use super::headers::{AuthScheme, authorization};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Who called, by API key.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The holder of the admin key.
    Admin,
    /// A human user.
    Human(User),
}

impl Caller {
    /// The human whose data a list shows: the caller's own, or everyone's (`None`) for the admin.
    pub fn list_scope(&self) -> Option<&str> {
        match self {
            Self::Admin => None,
            Self::Human(user) => Some(user.id.as_str()),
        }
    }

    /// Whether the caller may act on data of human `subject`.
    pub fn may_act_for(&self, subject: &str) -> bool {
        match self {
            Self::Admin => true,
            Self::Human(user) => user.id == subject,
        }
    }
}

/// Resolves a Bearer API key to a caller.
pub async fn caller_from_key(state: &AppState, key: &str) -> ApiResult<Option<Caller>> {
    let digest = SecretDigest::of(key);
    if digest.ct_eq(&state.admin_key) {
        return Ok(Some(Caller::Admin));
    }
    Ok(state.store.user_by_key(&digest).await?.map(Caller::Human))
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> ApiResult<Self> {
        caller_from_headers(state, &parts.headers).await
    }
}

/// The admin or human whose API key `headers` carry as `Authorization: Bearer`.
pub async fn caller_from_headers(state: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    match authorization(headers)? {
        Some((AuthScheme::Bearer, key)) => caller_from_key(state, key)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown API key".into())),
        Some(_) => Err(ApiError::Unauthorized(
            "use Authorization: Bearer <api key>".into(),
        )),
        None => Err(ApiError::Unauthorized(
            "Authorization: Bearer <api key> is required".into(),
        )),
    }
}

/// The admin, and only the admin.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> ApiResult<Self> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Human(_) => Err(ApiError::Forbidden("this call needs the admin key".into())),
        }
    }
}
