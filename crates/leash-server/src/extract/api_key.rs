//! The admin or a human: by the API key or IdP access token they send as `Authorization:
//! Bearer`, or, on the management API only, by their browser session (API §13).

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
    /// A human whose IdP groups make them an admin: the admin's rights, under their own name.
    AdminHuman(User),
}

impl Caller {
    /// The human whose data a list shows: the caller's own, or everyone's (`None`) for the admin.
    pub fn list_scope(&self) -> Option<&str> {
        match self {
            Self::Admin | Self::AdminHuman(_) => None,
            Self::Human(user) => Some(user.id.as_str()),
        }
    }

    /// Whether the caller may act on data of human `subject`.
    pub fn may_act_for(&self, subject: &str) -> bool {
        match self {
            Self::Admin | Self::AdminHuman(_) => true,
            Self::Human(user) => user.id == subject,
        }
    }

    /// The human calling, if a human calls.
    pub fn user(&self) -> Option<&User> {
        match self {
            Self::Admin => None,
            Self::Human(user) | Self::AdminHuman(user) => Some(user),
        }
    }

    /// Whether the caller has the admin's rights.
    pub fn is_admin(&self) -> bool {
        matches!(self, Self::Admin | Self::AdminHuman(_))
    }

    fn human(user: User, admin: bool) -> Self {
        if admin {
            Self::AdminHuman(user)
        } else {
            Self::Human(user)
        }
    }
}

/// Resolves a Bearer token to a caller: an API key, or an access token of the configured IdP
/// (`None` when it is neither; an error when it is the IdP's and fails its checks).
pub async fn caller_from_key(state: &AppState, key: &str) -> ApiResult<Option<Caller>> {
    let digest = SecretDigest::of(key);
    if digest.ct_eq(&state.admin_key) {
        return Ok(Some(Caller::Admin));
    }
    if let Some(user) = state.store.user_by_key(&digest).await? {
        return Ok(Some(Caller::Human(user)));
    }
    match &state.oidc {
        Some(oidc) => Ok(oidc
            .human_by_token(state, key)
            .await?
            .map(|human| Caller::human(human.user, human.admin))),
        None => Ok(None),
    }
}

/// The human whose browser session the request's cookie names, if it is live. Only the
/// management API, `/console` and `/logout` accept sessions: the gateway, MCP and `/v1/authorize`
/// never call this.
pub async fn session_caller(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<Caller>> {
    Ok(crate::oidc::session_of(state, headers)
        .await?
        .map(|session| Caller::human(session.user, session.admin)))
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> ApiResult<Self> {
        caller_from_headers(state, &parts.headers).await
    }
}

/// The admin or human whose API key or IdP token `headers` carry as `Authorization: Bearer`,
/// or, without an `Authorization` header, whose browser session the cookie names.
pub async fn caller_from_headers(state: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    match authorization(headers)? {
        None if crate::oidc::has_session_cookie(state, headers) => session_caller(state, headers)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("the session has ended; log in again".into())),
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
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.is_admin() {
            Ok(Admin)
        } else {
            Err(ApiError::Forbidden("this call needs the admin".into()))
        }
    }
}
