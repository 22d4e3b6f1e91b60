//! Discovery and operations: RFC 8414 metadata, JWKS, health, readiness and metrics.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::openapi::{Metadata, Status, UnavailableError};
use crate::state::AppState;
use leash_core::token::TOKEN_EXCHANGE;

/// `GET /.well-known/oauth-authorization-server`.
#[utoipa::path(get, path = "/.well-known/oauth-authorization-server", tag = "discovery",
    responses((status = 200, body = Metadata)))]
pub async fn metadata(State(state): State<Arc<AppState>>) -> Json<Value> {
    let issuer = &state.issuer;
    Json(json!({
        "issuer": issuer,
        "token_endpoint": state.token_endpoint.as_str(),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "grant_types_supported": [TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": leash_core::jws::SUPPORTED_ALGS,
        "revocation_endpoint_auth_methods_supported": ["private_key_jwt"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "dpop_signing_alg_values_supported": leash_core::jws::SUPPORTED_ALGS,
        "response_types_supported": [],
        "scopes_supported": [],
    }))
}

/// `GET /.well-known/jwks.json`.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "discovery",
    responses((status = 200, body = crate::openapi::Jwks)))]
pub async fn jwks(State(state): State<Arc<AppState>>) -> impl axum::response::IntoResponse {
    let keys = state.keys.ring().jwks(state.clock.now());
    // A rotated key signs `jwks_max_age` after it is published: a client that honours this
    // has it by then.
    let cache = format!("public, max-age={}", state.config.jwks_max_age);
    (
        [(axum::http::header::CACHE_CONTROL, cache)],
        Json(json!({ "keys": keys })),
    )
}

/// `GET /.well-known/leash-delegation-jwks.json`: the key of the delegation tokens Leash injects
/// into upstreams (API §17); never the access tokens' key.
#[utoipa::path(get, path = "/.well-known/leash-delegation-jwks.json", tag = "discovery",
    responses((status = 200, body = crate::openapi::Jwks)))]
pub async fn delegation_jwks(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"keys": [state.delegation.jwks_entry()]}))
}

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Status)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the store answers, and this node holds the key it is sealed under.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Status), UnavailableError))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|_| ApiError::Unavailable("the database is unreachable".into()))?;
    if let Some(unready) = state.master.unready() {
        return Err(unready);
    }
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /metrics` in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let m = &state.metrics;
    let mut body = format!(
        "# HELP leash_tokens_issued_total Access tokens issued.\n\
         # TYPE leash_tokens_issued_total counter\n\
         leash_tokens_issued_total {}\n\
         # HELP leash_token_refusals_total Token requests refused.\n\
         # TYPE leash_token_refusals_total counter\n\
         leash_token_refusals_total {}\n\
         # HELP leash_rate_limited_total Requests refused with 429, by endpoint (`unidentified`: \
         refusals naming nobody, over their source's rate).\n\
         # TYPE leash_rate_limited_total counter\n\
         leash_rate_limited_total{{endpoint=\"token\"}} {}\n\
         leash_rate_limited_total{{endpoint=\"gateway\"}} {}\n\
         leash_rate_limited_total{{endpoint=\"unidentified\"}} {}\n\
         # HELP leash_rate_limit_callers Callers whose rate is being tracked, by endpoint.\n\
         # TYPE leash_rate_limit_callers gauge\n\
         leash_rate_limit_callers{{endpoint=\"token\"}} {}\n\
         leash_rate_limit_callers{{endpoint=\"gateway\"}} {}\n",
        m.tokens_issued.load(Ordering::Relaxed),
        m.token_refusals.load(Ordering::Relaxed),
        state.token_rates.refused(),
        state.gateway_rates.refused(),
        state.unauthenticated.refused(),
        state.token_rates.tracked(),
        state.gateway_rates.tracked(),
    );
    m.requests.write(&mut body);
    let gauges = m.store_gauges.read(&state.store, state.clock.now()).await;
    let _ = write!(
        body,
        "# HELP leash_store_up Whether the database answered its last reading within 2 s (at most 1 s old).\n\
         # TYPE leash_store_up gauge\n\
         leash_store_up {}\n",
        u8::from(gauges.is_some())
    );
    if let Some(gauges) = gauges {
        let _ = write!(
            body,
            "# HELP leash_live_grants Grants whose tokens may be used now (active, in time, budget left).\n\
             # TYPE leash_live_grants gauge\n\
             leash_live_grants {}\n\
             # HELP leash_audit_lag_events Audit events of stored changes not yet in the chain.\n\
             # TYPE leash_audit_lag_events gauge\n\
             leash_audit_lag_events {}\n",
            gauges.live_grants, gauges.audit_outbox
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
}
