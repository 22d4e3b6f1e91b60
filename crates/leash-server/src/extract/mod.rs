//! Request extractors: strict JSON and form bodies with per-endpoint size limits (`body.rs`),
//! and the caller's identity: the admin or a human by API key, IdP token or browser session
//! (`api_key.rs`), an agent by DPoP-bound access token and proof, the token checks included
//! (`agent.rs`). The `Authorization` and `DPoP` header fields they read are parsed in one place
//! (`headers.rs`).

mod agent;
mod api_key;
mod body;
mod headers;

pub use agent::{
    AgentAuth, PresentedToken, ResourceCaller, authenticate_api_caller, authenticate_resource,
    check_token_live, commit_use, verdict_result, verified_token, verify_agent,
};
pub use api_key::{Admin, Caller, caller_from_headers, caller_from_key, session_caller};
pub use body::{FORM_LIMIT, Form, JSON_LIMIT, JsonBody, body_error, optional_json};
pub use headers::{AuthScheme, DpopHeaderError, authorization, single_dpop_header};

use crate::error::{ApiError, ApiResult};

/// The query of list endpoints: an optional `status` filter, nothing else.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    status: Option<String>,
}

/// Parses the `?status=` filter of a list endpoint with `parse`; `allowed` names the values in
/// the error.
pub fn status_filter<T>(
    query: Result<axum::extract::Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
    parse: impl Fn(&str) -> Option<T>,
    allowed: &str,
) -> ApiResult<Option<T>> {
    let axum::extract::Query(query) =
        query.map_err(|_| ApiError::InvalidRequest("the only query parameter is status".into()))?;
    query
        .status
        .map(|s| {
            parse(&s).ok_or_else(|| ApiError::InvalidRequest(format!("status must be {allowed}")))
        })
        .transpose()
}
