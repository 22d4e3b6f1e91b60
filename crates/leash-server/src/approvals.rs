//! Step-up approvals (API §7): the human's side. The gateway creates them (`gateway`); here they
//! are listed, read, approved and denied. Only the grant's human or the admin decides; an agent
//! may read the status of its own approvals and nothing more.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, Uri};
use leash_core::audit::{AuditEvent, Outcome, rfc3339};
use leash_store::{Approval, ApprovalStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::extract::{
    AuthScheme, Caller, ResourceCaller, StatusQuery, authenticate_api_caller, authorization,
    optional_json, status_filter,
};
use crate::mcp::{AnswerError, ELICITATION_METHOD, ElicitationView};
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// The wire form of an approval: what exactly will happen if it is approved.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalView {
    /// `apr_…`.
    id: String,
    /// `pending`, `approved`, `denied`, `expired` or `used`.
    status: String,
    grant_id: String,
    /// The human on whose behalf the agent asks (`usr_…`).
    subject: String,
    /// The grant's purpose.
    purpose: Option<String>,
    agent: String,
    action: String,
    upstream: String,
    method: String,
    path: String,
    query: Option<String>,
    /// The request headers it binds, as forwarded (not `Authorization`, `DPoP`,
    /// `Leash-Approval`): a retry must send the same.
    headers: Vec<HeaderView>,
    /// Hex SHA-256 of the exact request body.
    body_sha256: String,
    body_size: i64,
    /// Whether the body was kept for the human (`GET /v1/approvals/{id}/body` while pending);
    /// false: not previewed (over `approval_preview_bytes`, or encoded).
    body_previewed: bool,
    requested_at: String,
    expires_at: String,
    decided_at: Option<String>,
    approver: Option<String>,
    /// For an MCP server's elicitation (`method` `elicitation/create`, API §14), to the human
    /// only: the server's message and the form their approval answers (`content`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) elicitation: Option<ElicitationView>,
}

/// One request header an approval binds.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeaderView {
    name: String,
    value: String,
}

impl ApprovalView {
    /// The view of `approval` at `now`, with its grant's purpose.
    pub fn of(approval: &Approval, purpose: Option<&str>, now: i64) -> Self {
        Self {
            id: approval.id.clone(),
            status: approval.status_at(now).as_str().to_owned(),
            grant_id: approval.grant_id.clone(),
            subject: approval.subject.clone(),
            purpose: purpose.map(str::to_owned),
            agent: approval.agent.clone(),
            action: approval.action.clone(),
            upstream: approval.upstream.clone(),
            method: approval.method.clone(),
            path: approval.path.clone(),
            query: approval.query.clone(),
            headers: approval
                .headers
                .iter()
                .map(|(name, value)| HeaderView {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            body_sha256: approval.body_sha256.clone(),
            body_size: approval.body_size,
            body_previewed: approval.previewed,
            requested_at: rfc3339(approval.requested_at),
            expires_at: rfc3339(approval.expires_at),
            decided_at: approval.decided_at.map(rfc3339),
            approver: approval.approver.clone(),
            elicitation: None,
        }
    }

    /// The view for the grant's human or the admin: with the elicitation's message and form.
    fn for_human(approval: &Approval, purpose: Option<&str>, now: i64, state: &AppState) -> Self {
        let mut view = Self::of(approval, purpose, now);
        if approval.method == ELICITATION_METHOD {
            view.elicitation = state.elicitations.view(&approval.id);
        }
        view
    }
}

/// Forgets a prepared elicitation answer when its approval was not decided (forgotten itself,
/// without dropping, once it was: the relay takes the answer then).
struct Unprepare<'a>(&'a AppState, &'a str);

impl Drop for Unprepare<'_> {
    fn drop(&mut self) {
        self.0.elicitations.unprepare(self.1);
    }
}

/// `GET /v1/approvals`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalList {
    approvals: Vec<ApprovalView>,
}

async fn purpose_of(state: &AppState, approval: &Approval) -> ApiResult<Option<String>> {
    let grant = state.store.grant(&approval.grant_id).await?;
    Ok(grant.map(|g| g.purpose))
}

/// `GET /v1/approvals[?status=…]`: the human's (of their grants) or, for the admin, all.
#[utoipa::path(get, path = "/v1/approvals", tag = "approvals",
    params(("status" = Option<String>, Query, description = "pending, approved, denied, expired or used")),
    responses((status = 200, body = ApprovalList), ApiErrors), security(("api_key" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ApprovalList>> {
    let status = status_filter(
        query,
        ApprovalStatus::parse,
        "pending, approved, denied, expired or used",
    )?;
    let subject = caller.list_scope();
    let now = state.clock.now();
    let mut shown = Vec::new();
    // One read per grant, not per approval: a task's approvals share its grant.
    let mut purposes: std::collections::HashMap<String, Option<String>> =
        std::collections::HashMap::new();
    for approval in state.store.list_approvals(subject).await? {
        if status.is_none_or(|s| approval.status_at(now) == s) {
            if !purposes.contains_key(&approval.grant_id) {
                let grant = state.store.grant(&approval.grant_id).await?;
                purposes.insert(approval.grant_id.clone(), grant.map(|g| g.purpose));
            }
            let purpose = purposes.get(&approval.grant_id).and_then(Option::as_deref);
            shown.push(ApprovalView::for_human(&approval, purpose, now, &state));
        }
    }
    Ok(Json(ApprovalList { approvals: shown }))
}

/// `GET /v1/approvals/{id}`: the grant's human, the admin, or the agent with a token of the
/// approval's grant.
#[utoipa::path(get, path = "/v1/approvals/{id}", tag = "approvals", params(("id" = String, Path)),
    responses((status = 200, body = ApprovalView), ApiErrors), security(("api_key" = []), ("dpop" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Json<ApprovalView>> {
    let now = state.clock.now();
    let approval = state.store.approval(&id).await?;
    let not_found = || ApiError::NotFound("no such approval".into());
    match authenticate_api_caller(&state, &method, &uri, &headers).await? {
        ResourceCaller::Agent(agent) => {
            agent.claim_proof(&state, now).await?;
            let approval = approval
                .filter(|a| a.grant_id == agent.grant.id && a.agent == agent.claims.client_id)
                .ok_or_else(not_found)?;
            let purpose = purpose_of(&state, &approval).await?;
            // The agent learns the status only: an elicitation's words are for the human.
            Ok(Json(ApprovalView::of(&approval, purpose.as_deref(), now)))
        }
        ResourceCaller::Key(caller) => {
            let approval = approval
                .filter(|a| caller.may_act_for(&a.subject))
                .ok_or_else(not_found)?;
            let purpose = purpose_of(&state, &approval).await?;
            Ok(Json(ApprovalView::for_human(
                &approval,
                purpose.as_deref(),
                now,
                &state,
            )))
        }
    }
}

/// `GET /v1/approvals/{id}/body`: the request body the approval is for, to the grant's human or
/// the admin only, while it is pending (kept sealed; deleted once decided or expired). Served
/// so that no browser renders it: an attachment, `nosniff`, `sandbox`.
#[utoipa::path(get, path = "/v1/approvals/{id}/body", tag = "approvals", params(("id" = String, Path)),
    responses((status = 200, description = "the request body, as sent", content_type = "application/octet-stream"), ApiErrors),
    security(("api_key" = [])))]
pub async fn body(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<axum::response::Response> {
    use axum::http::{HeaderValue, header};
    let (_, approval) = human_and_approval(
        &state,
        &id,
        &headers,
        "an approval's body is for the grant's human or the admin",
    )
    .await?;
    let now = state.clock.now();
    let sealed = match approval.status_at(now) {
        ApprovalStatus::Pending => state.store.approval_preview(&approval.id).await?,
        _ => None,
    };
    let Some(sealed) = sealed else {
        return Err(ApiError::NotFound(if approval.previewed {
            "the body is kept only while the approval is pending".into()
        } else {
            "this approval's body was not previewed (too large or encoded)".into()
        }));
    };
    let plain = state
        .master
        .open(&sealed, &crate::gateway::preview_context(&approval.id))
        .map_err(|_| ApiError::Unavailable("the body could not be opened".into()))?;
    let mut response = axum::response::Response::new(axum::body::Body::from(plain.to_vec()));
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    out.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"request-body\""),
    );
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The caller, the grant's human or the admin, and the approval `id` they may act on (another
/// human's is not found). An agent is refused with `agent_refusal` whatever its token or proof,
/// before anything is looked up.
async fn human_and_approval(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    agent_refusal: &str,
) -> ApiResult<(Caller, Approval)> {
    if matches!(authorization(headers)?, Some((AuthScheme::Dpop, _))) {
        return Err(ApiError::Forbidden(agent_refusal.into()));
    }
    let caller = crate::extract::caller_from_headers(state, headers).await?;
    let approval = state
        .store
        .approval(id)
        .await?
        .filter(|a| caller.may_act_for(&a.subject))
        .ok_or_else(|| ApiError::NotFound("no such approval".into()))?;
    Ok((caller, approval))
}

/// The optional body of `POST /v1/approvals/{id}/approve`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// For an MCP server's elicitation only: the answer to its form, sent to the server as the
    /// human's (checked against the form first).
    #[schema(value_type = Option<Object>)]
    content: Option<Map<String, Value>>,
}

/// `POST /v1/approvals/{id}/approve`; an MCP elicitation's approval carries the human's answer.
#[utoipa::path(post, path = "/v1/approvals/{id}/approve", tag = "approvals", params(("id" = String, Path)),
    request_body(content = Option<Answer>, content_type = "application/json"),
    responses((status = 200, body = ApprovalView), ApiErrors), security(("api_key" = [])))]
pub async fn approve(
    state: State<Arc<AppState>>,
    path: Path<String>,
    request: axum::extract::Request,
) -> ApiResult<Json<ApprovalView>> {
    let headers = request.headers().clone();
    decide(state, path, headers, Some(request)).await
}

/// `POST /v1/approvals/{id}/deny`.
#[utoipa::path(post, path = "/v1/approvals/{id}/deny", tag = "approvals", params(("id" = String, Path)),
    responses((status = 200, body = ApprovalView), ApiErrors), security(("api_key" = [])))]
pub async fn deny(
    state: State<Arc<AppState>>,
    path: Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<ApprovalView>> {
    decide(state, path, headers, None).await
}

/// Approves (with the request, whose body may answer an elicitation) or denies (`None`).
async fn decide(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    approval_request: Option<axum::extract::Request>,
) -> ApiResult<Json<ApprovalView>> {
    let approve = approval_request.is_some();
    let (caller, approval) = human_and_approval(
        &state,
        &id,
        &headers,
        "an agent cannot approve or deny: only the grant's human or the admin can",
    )
    .await?;
    let now = state.clock.now();
    let elicitation = approval.method == ELICITATION_METHOD;
    // The body is read only once the caller may decide.
    let content = match approval_request {
        Some(request) => optional_json::<Answer>(request).await?.content,
        None => None,
    };
    if content.is_some() && !elicitation {
        return Err(ApiError::InvalidRequest(
            "content answers an MCP elicitation; this approval is for a request".into(),
        ));
    }
    // The answer is checked and kept before the decision, so the relay that sees the approval
    // finds it; only one decision at a time may keep one.
    let prepared = elicitation && approve;
    if prepared {
        state
            .elicitations
            .prepare(&approval.id, content)
            .map_err(|e| match e {
                AnswerError::NotHere => ApiError::Conflict(
                    "the MCP session that asked is gone (or held by another Leash node)".into(),
                ),
                AnswerError::Busy => {
                    ApiError::Conflict("the elicitation is being answered already".into())
                }
                AnswerError::Invalid(why) => {
                    ApiError::InvalidRequest(format!("the answer does not fit the form: {why}"))
                }
            })?;
    }
    let unprepare = prepared.then(|| Unprepare(&state, &approval.id));
    let approver = caller
        .user()
        .map_or_else(|| "admin".to_owned(), |user| user.id.clone());
    let grant = state.store.grant(&approval.grant_id).await?;
    if elicitation && approve && !grant.as_ref().is_some_and(|g| g.is_live(now)) {
        return Err(ApiError::Conflict(
            "the task has ended: its elicitation can only be denied".into(),
        ));
    }
    let purpose = grant.map(|grant| grant.purpose);
    // What the event names of the approval never changes, so it is known before the decision.
    let kind = if approve {
        "approval.approved"
    } else {
        "approval.denied"
    };
    let mut event = AuditEvent::new(kind, crate::audit::caller_mode(&caller), now);
    event.subject = Some(approval.subject.clone());
    event.actor = Some(approval.agent.clone());
    event.grant_id = Some(approval.grant_id.clone());
    event.action = Some(approval.action.clone());
    event.upstream = Some(approval.upstream.clone());
    event.method = Some(approval.method.clone());
    event.path = Some(approval.path.clone());
    event.decision = Some(if approve {
        Outcome::Allow
    } else {
        Outcome::Deny
    });
    event.approver = Some(approver.clone());
    event.request_id = Some(approval.id.clone());
    event.purpose.clone_from(&purpose);
    match state
        .store
        .decide_approval(&approval.id, approve, &approver, now, &event)
        .await?
    {
        Some(decided) => {
            tracing::info!(
                approval = %decided.id,
                status = decided.status.as_str(),
                approver = %approver,
                "approval decided"
            );
            let view = ApprovalView::for_human(&decided, purpose.as_deref(), now, &state);
            if elicitation {
                // The answer is the relay's now.
                std::mem::forget(unprepare);
                state.elicitations.decided(&decided.id);
            }
            Ok(Json(view))
        }
        None => Err(ApiError::Conflict(format!(
            "the approval is {}, not pending",
            approval.status_at(now).as_str()
        ))),
    }
}
