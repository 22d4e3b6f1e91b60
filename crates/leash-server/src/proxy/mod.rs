//! The forward proxy for browser agents (API §16): the agent's browser uses Leash as its proxy,
//! and Leash holds the human's session. The proxy CA and its leaf certificates (`ca`), the
//! credential the browser presents (`credential`), the listener and its tunnels (`front`), each
//! request in a tunnel through the gateway's steps (`tunnel`), the grant's cookie jar (`jar`),
//! and the pages a browser is refused with (`page`).

pub mod ca;
pub mod credential;
pub mod front;
pub mod jar;
mod page;
mod socket;
mod tunnel;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ApiResult};
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// `GET /v1/proxy/ca`: the proxy CA's certificate (PEM), for browsers to trust; public, as any
/// CA certificate is (`leash proxy ca`).
#[utoipa::path(get, path = "/v1/proxy/ca", tag = "proxy",
    responses((status = 200, description = "PEM", content_type = "application/x-pem-file", body = String), ApiErrors))]
pub async fn ca_pem(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let ca = state.proxy_ca.as_ref().ok_or_else(|| {
        ApiError::NotFound("the proxy is not configured: no upstream has `hosts`".into())
    })?;
    let mut response = ca.pem().to_owned().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    Ok(response)
}
