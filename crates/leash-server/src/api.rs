//! The management API: users, agents, grants and upstreams (API §1, §2, §5, §12).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use leash_core::grant::{Grant, GrantStatus};
use leash_core::jwk::parse_jwks;
use leash_core::secret::{API_KEY_PREFIX, HANDLE_PREFIX, Secret, random_id};
use leash_store::{Agent, GrantEnd, RequestUse, User};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit;
use crate::config::valid_action;
use crate::error::{ApiError, ApiResult};
use crate::extract::{
    Admin, Caller, JsonBody, ResourceCaller, StatusQuery, authenticate_resource, commit_use,
    status_filter,
};
use crate::state::{AppState, rfc3339};
use leash_core::audit::Mode;

fn user_json(user: &User) -> Value {
    json!({"id": user.id, "name": user.name, "created_at": rfc3339(user.created_at)})
}

/// Body of `POST /v1/users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    name: String,
}

/// `POST /v1/users` (admin).
pub async fn create_user(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonBody(body): JsonBody<NewUser>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(
            "name must be 1 to 64 printable characters".into(),
        ));
    }
    let key = Secret::generate(API_KEY_PREFIX);
    let user = User {
        id: random_id("usr_"),
        name: name.to_owned(),
        created_at: state.clock.now(),
    };
    state
        .store
        .create_user(&user, &key.digest())
        .await
        .map_err(|e| match e {
            leash_store::StoreError::Conflict => {
                ApiError::Conflict(format!("a user named {name:?} exists"))
            }
            e => e.into(),
        })?;
    tracing::info!(user = %user.id, "user created");
    let event = audit::system_event(
        "user.created",
        "admin",
        Some(&user.id),
        None,
        user.created_at,
    );
    audit::record(&state, event).await?;
    let mut out = user_json(&user);
    out["api_key"] = json!(key.expose());
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /v1/users` (admin).
pub async fn list_users(State(state): State<Arc<AppState>>, _: Admin) -> ApiResult<Json<Value>> {
    let users = state.store.list_users().await?;
    Ok(Json(
        json!({"users": users.iter().map(user_json).collect::<Vec<_>>()}),
    ))
}

fn agent_json(agent: &Agent) -> Value {
    json!({
        "id": agent.id,
        "name": agent.name,
        "jwks": agent.jwks,
        "status": if agent.disabled { "disabled" } else { "active" },
        "created_at": rfc3339(agent.created_at),
    })
}

/// Body of `POST /v1/agents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    id: String,
    name: Option<String>,
    jwks: Value,
}

fn valid_agent_id(id: &str) -> bool {
    id.len() <= 512
        && url::Url::parse(id).is_ok_and(|u| !u.cannot_be_a_base() || u.scheme() == "urn")
        && !id.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// `POST /v1/agents` (admin): registers an agent with its public keys.
pub async fn create_agent(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonBody(body): JsonBody<NewAgent>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if !valid_agent_id(&body.id) {
        return Err(ApiError::InvalidRequest(
            "id must be a URI such as spiffe://example.org/agent/mailbot".into(),
        ));
    }
    let keys = parse_jwks(&body.jwks).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    // Store only the public members Leash needs, whatever else the caller sent.
    let jwks = json!({"keys": keys.iter().map(|k| k.to_value()).collect::<Vec<_>>()});
    let name = body.name.unwrap_or_else(|| body.id.clone());
    if name.len() > 200 {
        return Err(ApiError::InvalidRequest(
            "name must be at most 200 characters".into(),
        ));
    }
    let agent = Agent {
        id: body.id,
        name,
        jwks,
        disabled: false,
        created_at: state.clock.now(),
    };
    state
        .store
        .create_agent(&agent)
        .await
        .map_err(|e| match e {
            leash_store::StoreError::Conflict => {
                ApiError::Conflict("an agent with this id exists".into())
            }
            e => e.into(),
        })?;
    tracing::info!(agent = %agent.id, "agent registered");
    let event = audit::system_event("agent.registered", &agent.id, None, None, agent.created_at);
    audit::record(&state, event).await?;
    Ok((StatusCode::CREATED, Json(agent_json(&agent))))
}

/// `GET /v1/agents` (admin).
pub async fn list_agents(State(state): State<Arc<AppState>>, _: Admin) -> ApiResult<Json<Value>> {
    let agents = state.store.list_agents().await?;
    Ok(Json(
        json!({"agents": agents.iter().map(agent_json).collect::<Vec<_>>()}),
    ))
}

/// `GET /v1/agents/{id}` (admin).
pub async fn get_agent(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let agent = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such agent".into()))?;
    Ok(Json(agent_json(&agent)))
}

/// `POST /v1/agents/{id}/disable` (admin): no new tokens, every grant revoked.
pub async fn disable_agent(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let now = state.clock.now();
    if !state.store.disable_agent(&id, now).await? {
        return Err(ApiError::NotFound("no such agent".into()));
    }
    tracing::info!(agent = %id, "agent disabled");
    let event = audit::system_event(
        "agent.disabled",
        &id,
        None,
        Some("offboarded: every grant revoked"),
        now,
    );
    audit::record(&state, event).await?;
    let agent = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such agent".into()))?;
    Ok(Json(agent_json(&agent)))
}

/// A grant as the API shows it (never its handle).
pub fn grant_json(grant: &Grant, now: i64) -> Value {
    json!({
        "id": grant.id,
        "status": grant.status_at(now).as_str(),
        "subject": grant.subject,
        "agent": grant.agent,
        "purpose": grant.purpose,
        "upstreams": grant.upstreams,
        "actions": grant.actions,
        "approval_required": grant.approval_required,
        "single_use": grant.single_use,
        "created_at": rfc3339(grant.created_at),
        "expires_at": rfc3339(grant.expires_at),
        "max_requests": grant.max_requests,
        "requests_used": grant.requests_used,
    })
}

/// Body of `POST /v1/grants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    agent: String,
    purpose: String,
    upstreams: Vec<String>,
    actions: Vec<String>,
    #[serde(default)]
    approval_required: Vec<String>,
    #[serde(default)]
    single_use: Vec<String>,
    ttl_seconds: i64,
    max_requests: Option<i64>,
}

fn dedup(list: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    list.into_iter()
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

/// `POST /v1/grants` (human): delegates one task to one agent; the handle is shown once.
pub async fn create_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonBody(body): JsonBody<NewGrant>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Caller::Human(user) = caller else {
        return Err(ApiError::Forbidden(
            "grants are created by the human who delegates, with their own key".into(),
        ));
    };
    let purpose = body.purpose.trim();
    if purpose.is_empty() || purpose.len() > 1000 {
        return Err(ApiError::InvalidRequest(
            "purpose must be 1 to 1000 characters".into(),
        ));
    }
    let upstreams = dedup(body.upstreams);
    let actions = dedup(body.actions);
    if upstreams.is_empty() || actions.is_empty() {
        return Err(ApiError::InvalidRequest(
            "upstreams and actions must not be empty".into(),
        ));
    }
    let mut defined = BTreeSet::new();
    for name in &upstreams {
        let upstream = state
            .config
            .upstreams
            .get(name)
            .ok_or_else(|| ApiError::InvalidRequest(format!("unknown upstream {name:?}")))?;
        defined.extend(upstream.actions());
    }
    for action in &actions {
        if !valid_action(action) || !defined.contains(action.as_str()) {
            return Err(ApiError::InvalidRequest(format!(
                "action {action:?} is not defined by the named upstreams"
            )));
        }
    }
    let approval_required = dedup(body.approval_required);
    let single_use = dedup(body.single_use);
    for (field, list) in [
        ("approval_required", &approval_required),
        ("single_use", &single_use),
    ] {
        if let Some(extra) = list.iter().find(|a| !actions.contains(a)) {
            return Err(ApiError::InvalidRequest(format!(
                "{field} names {extra:?}, which is not in actions"
            )));
        }
    }
    if body.ttl_seconds <= 0 {
        return Err(ApiError::InvalidRequest(
            "ttl_seconds must be positive".into(),
        ));
    }
    if body.max_requests.is_some_and(|m| m <= 0) {
        return Err(ApiError::InvalidRequest(
            "max_requests must be positive".into(),
        ));
    }
    let agent = state
        .store
        .agent(&body.agent)
        .await?
        .ok_or_else(|| ApiError::InvalidRequest("unknown agent".into()))?;
    if agent.disabled {
        return Err(ApiError::InvalidRequest("the agent is disabled".into()));
    }
    let now = state.clock.now();
    let grant = Grant {
        id: random_id("grt_"),
        subject: user.id,
        agent: agent.id,
        purpose: purpose.to_owned(),
        upstreams,
        actions,
        approval_required,
        single_use,
        created_at: now,
        expires_at: now + body.ttl_seconds.min(state.config.max_grant_ttl),
        max_requests: body.max_requests,
        requests_used: 0,
        status: GrantStatus::Active,
    };
    let handle = Secret::generate(HANDLE_PREFIX);
    state.store.create_grant(&grant, &handle.digest()).await?;
    tracing::info!(grant_id = %grant.id, agent = %grant.agent, subject = %grant.subject, "grant created");
    let event = audit::grant_event("grant.created", Mode::Direct, &grant, now);
    audit::record(&state, event).await?;
    let mut out = grant_json(&grant, now);
    out["handle"] = json!(handle.expose());
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /v1/grants[?status=]`: a human sees their own, admin all.
pub async fn list_grants(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let status = status_filter(
        query,
        GrantStatus::parse,
        "active, completed, revoked or expired",
    )?;
    let subject = caller.list_scope();
    let now = state.clock.now();
    let grants = state.store.list_grants(subject).await?;
    let shown: Vec<Value> = grants
        .iter()
        .filter(|g| status.is_none_or(|s| g.status_at(now) == s))
        .map(|g| grant_json(g, now))
        .collect();
    Ok(Json(json!({"grants": shown})))
}

async fn visible_grant(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Grant> {
    state
        .store
        .grant(id)
        .await?
        .filter(|g| caller.may_act_for(&g.subject))
        .ok_or_else(|| ApiError::NotFound("no such grant".into()))
}

/// `GET /v1/grants/{id}`.
pub async fn get_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let grant = visible_grant(&state, &caller, &id).await?;
    Ok(Json(grant_json(&grant, state.clock.now())))
}

/// Optional body of `POST /v1/grants/{id}/revoke`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    reason: Option<String>,
}

async fn end(
    state: &AppState,
    grant: &Grant,
    end: GrantEnd,
    reason: Option<&str>,
    mode: Mode,
) -> ApiResult<Json<Value>> {
    let now = state.clock.now();
    match state.store.end_grant(&grant.id, end, reason, now).await? {
        Some(ended) => {
            tracing::info!(grant_id = %ended.id, status = ended.status.as_str(), "grant ended");
            let kind = match end {
                GrantEnd::Completed => "grant.completed",
                GrantEnd::Revoked => "grant.revoked",
            };
            let mut event = audit::grant_event(kind, mode, &ended, now);
            event.reason = reason.map(str::to_owned);
            audit::record(state, event).await?;
            Ok(Json(grant_json(&ended, now)))
        }
        None => {
            let current = state
                .store
                .grant(&grant.id)
                .await?
                .unwrap_or_else(|| grant.clone());
            Err(ApiError::Conflict(format!(
                "the grant is {}, not active",
                current.status_at(now).as_str()
            )))
        }
    }
}

/// `POST /v1/grants/{id}/revoke` (the grant's human, or admin).
pub async fn revoke_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let grant = visible_grant(&state, &caller, &id).await?;
    let reason = if body.is_empty() {
        RevokeBody::default()
    } else {
        let is_json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType("application/json"));
        }
        serde_json::from_slice(&body)
            .map_err(|_| ApiError::InvalidRequest("body must be {\"reason\": \"…\"}".into()))?
    };
    if reason.reason.as_ref().is_some_and(|r| r.len() > 500) {
        return Err(ApiError::InvalidRequest(
            "reason must be at most 500 characters".into(),
        ));
    }
    let mode = audit::caller_mode(&caller);
    end(
        &state,
        &grant,
        GrantEnd::Revoked,
        reason.reason.as_deref(),
        mode,
    )
    .await
}

/// `POST /v1/grants/{id}/complete` (the grant's human, or the agent with a token of it).
pub async fn complete_grant(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let (grant, mode) = match authenticate_resource(&state, &method, &uri, &headers).await? {
        ResourceCaller::Agent(agent) if agent.grant.id == id => {
            let request = RequestUse {
                once: vec![agent.proof_once],
                now: state.clock.now(),
                ..RequestUse::default()
            };
            commit_use(&state, request).await?;
            (agent.grant, Mode::Delegated)
        }
        ResourceCaller::Agent(_) => {
            return Err(ApiError::Forbidden("the token is for another grant".into()));
        }
        ResourceCaller::Key(caller) => (
            visible_grant(&state, &caller, &id).await?,
            audit::caller_mode(&caller),
        ),
    };
    let reason = Some("task completed");
    end(&state, &grant, GrantEnd::Completed, reason, mode).await
}

/// `GET /v1/upstreams`: names, routes and actions (any authenticated caller).
pub async fn list_upstreams(State(state): State<Arc<AppState>>, _: Caller) -> Json<Value> {
    let upstreams: Vec<Value> = state
        .config
        .upstreams
        .values()
        .map(|u| json!({"name": u.name, "actions": u.actions(), "routes": u.routes}))
        .collect();
    Json(json!({"upstreams": upstreams}))
}
