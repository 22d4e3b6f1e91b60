//! The audit trail (API §8), server side: what each part of Leash records, and
//! `GET /v1/audit` plus the checkpoint endpoints that `leash audit export|verify` use.
//! Events never hold a secret, a token or a grant handle: a token appears as its `jti` only.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use leash_core::audit::{AuditEvent, Checkpoint, Mode, Outcome};
use leash_core::grant::Grant;
use leash_store::AuditQuery;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::AppState;

/// Default and largest page of `GET /v1/audit`.
const DEFAULT_LIMIT: u32 = 1_000;
const MAX_LIMIT: u32 = 10_000;

/// What is known about a request so far, filled in as its checks pass, so that a refusal at
/// any step is recorded with everything known up to it.
#[derive(Debug, Clone)]
pub struct Trail {
    /// The request's event as known so far; kind, time, decision and reason are set when it
    /// is recorded.
    pub known: AuditEvent,
    /// Whether the request's event is stored already (by its commit).
    pub recorded: bool,
    /// Whether its commit stored it as allowed: it was, whatever follows (the upstream
    /// failing, the client leaving).
    pub allowed: bool,
}

impl Default for Trail {
    fn default() -> Self {
        Self {
            known: AuditEvent::new("", Mode::Delegated, 0),
            recorded: false,
            allowed: false,
        }
    }
}

impl Trail {
    /// Records the grant the request runs under.
    pub fn grant(&mut self, grant: &Grant) {
        self.known.grant_id = Some(grant.id.clone());
        self.known.purpose = Some(grant.purpose.clone());
    }

    /// The event of this request.
    pub fn event(
        &self,
        kind: &str,
        now: i64,
        request_id: &str,
        decision: Outcome,
        reason: Option<String>,
    ) -> AuditEvent {
        let mut event = self.known.clone();
        event.kind = kind.to_owned();
        event.ts = leash_core::audit::rfc3339(now);
        event.decision = Some(decision);
        event.reason = reason;
        event.request_id = Some(request_id.to_owned());
        event
    }
}

/// The event of a grant's life (created, revoked, completed); `mode` tells who acted (the
/// human directly, the admin as the system, or the agent), `actor` is always the grant's agent.
pub fn grant_event(kind: &str, mode: Mode, grant: &Grant, now: i64) -> AuditEvent {
    let mut event = AuditEvent::new(kind, mode, now);
    event.subject = Some(grant.subject.clone());
    event.actor = Some(grant.agent.clone());
    event.grant_id = Some(grant.id.clone());
    event.purpose = Some(grant.purpose.clone());
    event.upstream = Some(grant.upstreams.join(" "));
    event.action = Some(grant.actions.join(" "));
    event
}

/// How a key caller acts: the admin as the system, a human directly.
pub fn caller_mode(caller: &Caller) -> Mode {
    match caller {
        Caller::Admin => Mode::System,
        Caller::Human(_) | Caller::AdminHuman(_) => Mode::Direct,
    }
}

/// The event of an admin action on an agent or a user (`subject` is the user, if any).
pub fn system_event(
    kind: &str,
    actor: &str,
    subject: Option<&str>,
    reason: Option<&str>,
    now: i64,
) -> AuditEvent {
    let mut event = AuditEvent::new(kind, Mode::System, now);
    event.actor = Some(actor.to_owned());
    event.subject = subject.map(str::to_owned);
    event.reason = reason.map(str::to_owned);
    event
}

/// Appends an event durably; a failure is `503 audit_unavailable`.
pub async fn record(state: &AppState, event: AuditEvent) -> ApiResult<()> {
    state.store.append_audit(event).await.map_err(|e| {
        tracing::error!(error = %e, "audit write failed");
        ApiError::AuditUnavailable
    })
}

/// Kind of the event that counts, once a minute, the unidentified refusals that were over
/// `[limits] unauthenticated_rate` and so got no event of their own.
pub const REFUSAL_SUMMARY_EVENT: &str = "gateway.refusals_summary";

/// Appends the minute's [`REFUSAL_SUMMARY_EVENT`], if anything was counted.
pub async fn record_refusal_summary(state: &AppState) {
    let Some(summary) = state.unauthenticated.take_summary() else {
        return;
    };
    let mut event = AuditEvent::new(REFUSAL_SUMMARY_EVENT, Mode::System, state.clock.now());
    event.decision = Some(Outcome::Deny);
    event.reason = Some(format!(
        "rate_limited: {} unidentified requests from {} source addresses refused with 429 without an event each",
        summary.requests, summary.addresses
    ));
    if record(state, event).await.is_err() {
        tracing::warn!(
            requests = summary.requests,
            "the refusal summary could not be written"
        );
    }
}

/// Records a refusal as `event`'s outcome (see [`as_refusal`]). The refusal stands even if its
/// event cannot be written (that failure is logged by [`record`]).
pub async fn record_refusal(state: &AppState, event: AuditEvent, error: &ApiError) {
    let _ = record(state, as_refusal(event, error)).await;
}

/// `event` as the record of a refusal with `error`: `approval_required` with the approval's id
/// as reason (when one was created), else a deny with the error code; the deciding policies
/// when the error names some.
pub fn as_refusal(mut event: AuditEvent, error: &ApiError) -> AuditEvent {
    let (_, code) = error.status_and_code();
    let (outcome, reason) = match error {
        ApiError::ApprovalRequired {
            approval: Some(id), ..
        } => (Outcome::ApprovalRequired, id.clone()),
        ApiError::ApprovalRequired { approval: None, .. } => {
            (Outcome::ApprovalRequired, code.to_owned())
        }
        _ => (Outcome::Deny, code.to_owned()),
    };
    if let ApiError::PolicyDenied { policies, .. } | ApiError::ApprovalRequired { policies, .. } =
        error
        && !policies.is_empty()
    {
        event.policies = Some(policies.clone());
    }
    event.decision = Some(outcome);
    event.reason = Some(reason);
    event
}

/// Query of `GET /v1/audit`; numbers are taken as text so that a bad one is our
/// `invalid_request`, not the framework's rejection.
#[derive(Debug, Deserialize)]
pub struct AuditParams {
    grant_id: Option<String>,
    actor: Option<String>,
    subject: Option<String>,
    since_seq: Option<String>,
    limit: Option<String>,
}

fn non_negative(name: &str, value: Option<&str>) -> ApiResult<Option<u64>> {
    value
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                ApiError::InvalidRequest(format!("{name} must be a non-negative integer"))
            })
        })
        .transpose()
}

fn ndjson(lines: impl IntoIterator<Item = String>) -> Response {
    let mut body = String::new();
    for line in lines {
        body.push_str(&line);
        body.push('\n');
    }
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /v1/audit?grant_id=&actor=&subject=&since_seq=&limit=`: the admin reads all events, a
/// human those on their own behalf; JSON lines, oldest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(
        ("grant_id" = Option<String>, Query), ("actor" = Option<String>, Query),
        ("subject" = Option<String>, Query),
        ("since_seq" = Option<u64>, Query, description = "events after this seq"),
        ("limit" = Option<u32>, Query, description = "at most this many (default 1000, at most 10000)"),
    ),
    responses((status = 200, description = "one event per line (API §8)", content_type = "application/x-ndjson", body = String), crate::openapi::ApiErrors),
    security(("api_key" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) =
        params.map_err(|_| ApiError::InvalidRequest("malformed query string".into()))?;
    let since_seq = non_negative("since_seq", params.since_seq.as_deref())?.unwrap_or(0);
    let limit = non_negative("limit", params.limit.as_deref())?
        .map_or(DEFAULT_LIMIT, |l| l.min(u64::from(MAX_LIMIT)) as u32);
    let subject = match (caller.list_scope(), params.subject) {
        (None, wanted) => wanted,
        (Some(own), Some(wanted)) if wanted != own => return Ok(ndjson(Vec::new())),
        (Some(own), _) => Some(own.to_owned()),
    };
    let query = AuditQuery {
        grant_id: params.grant_id,
        actor: params.actor,
        subject,
        since_seq,
        limit,
    };
    Ok(ndjson(state.store.audit_lines(&query).await?))
}

/// Query of the checkpoint list.
#[derive(Debug, Deserialize)]
pub struct SinceParams {
    since_seq: Option<String>,
}

fn admin_only(caller: &Caller) -> ApiResult<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only the admin reads audit checkpoints".into(),
        ))
    }
}

/// `GET /v1/audit/checkpoints?since_seq=` (admin): signed checkpoints as JSON lines.
#[utoipa::path(get, path = "/v1/audit/checkpoints", tag = "audit",
    params(("since_seq" = Option<u64>, Query)),
    responses((status = 200, description = "one signed checkpoint per line", content_type = "application/x-ndjson", body = String), crate::openapi::ApiErrors),
    security(("api_key" = [])))]
pub async fn checkpoints(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    params: Result<Query<SinceParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    admin_only(&caller)?;
    let Query(params) =
        params.map_err(|_| ApiError::InvalidRequest("malformed query string".into()))?;
    let since = non_negative("since_seq", params.since_seq.as_deref())?.unwrap_or(0);
    let lines = state
        .store
        .checkpoints(since)
        .await?
        .iter()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .collect::<Vec<_>>();
    Ok(ndjson(lines))
}

/// `POST /v1/audit/checkpoints` (admin): signs the head now, so that an export covers every
/// event up to it; returns the latest checkpoint (`null` while the log is empty).
#[utoipa::path(post, path = "/v1/audit/checkpoints", tag = "audit",
    responses((status = 200, description = "the latest checkpoint, or null", body = Option<Object>), crate::openapi::ApiErrors),
    security(("api_key" = [])))]
pub async fn checkpoint_now(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<axum::Json<Option<Checkpoint>>> {
    admin_only(&caller)?;
    Ok(axum::Json(state.store.checkpoint_now().await?))
}

/// The checkpoint signer handed to the store: the server's token key, whose public half is in
/// the JWKS under the same `kid`.
pub fn signer(
    keys: Arc<crate::keys::Keys>,
    clock: Arc<dyn leash_core::Clock>,
) -> leash_store::CheckpointSigner {
    Arc::new(move |seq, hash| {
        let now = clock.now();
        Checkpoint::sign(keys.ring().signer(now), seq, hash, now).ok()
    })
}

/// Signs a checkpoint at least every 10 s while events arrive (API §8); the writer adds one
/// every 1,000 events by itself.
pub async fn checkpoint_timer(store: Arc<dyn leash_store::Store>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = store.checkpoint_now().await {
            tracing::warn!(error = %e, "audit checkpoint failed; will retry");
        }
    }
}
