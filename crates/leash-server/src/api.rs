//! The management API: users, agents, grants and upstreams (API §1, §2, §5, §12).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use leash_core::audit::{Mode, rfc3339};
use leash_core::grant::{Grant, GrantStatus};
use leash_core::jwk::parse_jwks;
use leash_core::secret::{API_KEY_PREFIX, HANDLE_PREFIX, Secret, random_id};
use leash_store::{Agent, GrantEnd, User};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::audit;
use crate::config::{Risk, valid_action};
use crate::error::{ApiError, ApiResult};
use crate::extract::{
    Admin, Caller, JsonBody, ResourceCaller, StatusQuery, authenticate_api_caller, status_filter,
};
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// A human as the API shows them.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    /// `usr_…`.
    id: String,
    name: String,
    /// RFC 3339.
    created_at: String,
    /// Disabled by the admin: none of their sessions or keys work, their grants are revoked.
    disabled: bool,
}

impl From<&User> for UserView {
    fn from(user: &User) -> Self {
        Self {
            id: user.id.clone(),
            name: user.name.clone(),
            created_at: rfc3339(user.created_at),
            disabled: user.disabled,
        }
    }
}

/// `GET /v1/me`: who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// `usr_…`; null for the admin key.
    id: Option<String>,
    name: String,
    /// Whether the caller has the admin's rights (the admin key, or an admin group at login).
    admin: bool,
}

/// `GET /v1/me` (admin or human): who the caller is, for the console.
#[utoipa::path(get, path = "/v1/me", tag = "humans",
    responses((status = 200, body = Me), ApiErrors), security(("api_key" = [])))]
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        id: caller.user().map(|u| u.id.clone()),
        name: caller
            .user()
            .map_or_else(|| "admin".to_owned(), |u| u.name.clone()),
        admin: caller.is_admin(),
    })
}

/// `POST /v1/users/{id}/disable` (admin): the human's sessions and API key stop working at
/// once, and every grant they made is revoked.
#[utoipa::path(post, path = "/v1/users/{id}/disable", tag = "humans", params(("id" = String, Path)),
    responses((status = 200, body = UserView), ApiErrors), security(("api_key" = [])))]
pub async fn disable_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<UserView>> {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden("this call needs the admin".into()));
    }
    let now = state.clock.now();
    let actor = caller.user().map_or("admin", |u| u.id.as_str());
    let event = audit::system_event(
        "user.disabled",
        actor,
        Some(&id),
        Some("sessions ended, keys refused, every grant revoked"),
        now,
    );
    if !state.store.disable_user(&id, now, &event).await? {
        return Err(ApiError::NotFound("no such user".into()));
    }
    tracing::info!(user = %id, "user disabled");
    let users = state.store.list_users().await?;
    let user = users
        .iter()
        .find(|u| u.id == id)
        .ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    Ok(Json(UserView::from(user)))
}

/// A human just created, with their API key (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedUser {
    #[serde(flatten)]
    user: UserView,
    api_key: String,
}

/// `GET /v1/users`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    users: Vec<UserView>,
}

/// Body of `POST /v1/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    name: String,
}

/// `POST /v1/users` (admin).
#[utoipa::path(post, path = "/v1/users", tag = "humans", request_body = NewUser,
    responses((status = 201, body = CreatedUser), ApiErrors), security(("api_key" = [])))]
pub async fn create_user(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonBody(body): JsonBody<NewUser>,
) -> ApiResult<(StatusCode, Json<CreatedUser>)> {
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
        disabled: false,
    };
    let event = audit::system_event(
        "user.created",
        "admin",
        Some(&user.id),
        None,
        user.created_at,
    );
    state
        .store
        .create_user(&user, &key.digest(), &event)
        .await
        .map_err(|e| match e {
            leash_store::StoreError::Conflict => {
                ApiError::Conflict(format!("a user named {name:?} exists"))
            }
            e => e.into(),
        })?;
    tracing::info!(user = %user.id, "user created");
    let out = CreatedUser {
        user: UserView::from(&user),
        api_key: key.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /v1/users` (admin).
#[utoipa::path(get, path = "/v1/users", tag = "humans",
    responses((status = 200, body = UserList), ApiErrors), security(("api_key" = [])))]
pub async fn list_users(State(state): State<Arc<AppState>>, _: Admin) -> ApiResult<Json<UserList>> {
    let users = state.store.list_users().await?;
    Ok(Json(UserList {
        users: users.iter().map(UserView::from).collect(),
    }))
}

/// An agent as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    /// The agent's URI (a SPIFFE ID, normally).
    id: String,
    name: String,
    /// Its public keys, `{"keys": [JWK…]}`.
    jwks: Value,
    /// `active` or `disabled`.
    status: String,
    created_at: String,
}

impl From<&Agent> for AgentView {
    fn from(agent: &Agent) -> Self {
        Self {
            id: agent.id.clone(),
            name: agent.name.clone(),
            jwks: agent.jwks.clone(),
            status: if agent.disabled { "disabled" } else { "active" }.to_owned(),
            created_at: rfc3339(agent.created_at),
        }
    }
}

/// `GET /v1/agents`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    agents: Vec<AgentView>,
}

/// Body of `POST /v1/agents`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    /// A URI such as `spiffe://example.org/agent/mailbot`.
    id: String,
    name: Option<String>,
    /// A JWK Set of the agent's public keys (Ed25519 or P-256).
    jwks: Value,
}

fn valid_agent_id(id: &str) -> bool {
    id.len() <= 512
        && url::Url::parse(id).is_ok_and(|u| !u.cannot_be_a_base() || u.scheme() == "urn")
        && !id.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// `POST /v1/agents` (admin): registers an agent with its public keys.
#[utoipa::path(post, path = "/v1/agents", tag = "agents", request_body = NewAgent,
    responses((status = 201, body = AgentView), ApiErrors), security(("api_key" = [])))]
pub async fn create_agent(
    State(state): State<Arc<AppState>>,
    _: Admin,
    JsonBody(body): JsonBody<NewAgent>,
) -> ApiResult<(StatusCode, Json<AgentView>)> {
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
    let event = audit::system_event("agent.registered", &agent.id, None, None, agent.created_at);
    state
        .store
        .create_agent(&agent, &event)
        .await
        .map_err(|e| match e {
            leash_store::StoreError::Conflict => {
                ApiError::Conflict("an agent with this id exists".into())
            }
            e => e.into(),
        })?;
    tracing::info!(agent = %agent.id, "agent registered");
    Ok((StatusCode::CREATED, Json(AgentView::from(&agent))))
}

/// `GET /v1/agents` (admin).
#[utoipa::path(get, path = "/v1/agents", tag = "agents",
    responses((status = 200, body = AgentList), ApiErrors), security(("api_key" = [])))]
pub async fn list_agents(
    State(state): State<Arc<AppState>>,
    _: Admin,
) -> ApiResult<Json<AgentList>> {
    let agents = state.store.list_agents().await?;
    Ok(Json(AgentList {
        agents: agents.iter().map(AgentView::from).collect(),
    }))
}

/// `GET /v1/agents/{id}` (admin).
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = AgentView), ApiErrors), security(("api_key" = [])))]
pub async fn get_agent(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let agent = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such agent".into()))?;
    Ok(Json(AgentView::from(&agent)))
}

/// `POST /v1/agents/{id}/disable` (admin): no new tokens, every grant revoked.
#[utoipa::path(post, path = "/v1/agents/{id}/disable", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = AgentView), ApiErrors), security(("api_key" = [])))]
pub async fn disable_agent(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let now = state.clock.now();
    let event = audit::system_event(
        "agent.disabled",
        &id,
        None,
        Some("offboarded: every grant revoked"),
        now,
    );
    if !state.store.disable_agent(&id, now, &event).await? {
        return Err(ApiError::NotFound("no such agent".into()));
    }
    tracing::info!(agent = %id, "agent disabled");
    let agent = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such agent".into()))?;
    Ok(Json(AgentView::from(&agent)))
}

/// A grant as the API shows it (never its handle).
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantView {
    /// `grt_…`.
    id: String,
    /// `active`, `completed`, `revoked` or `expired`.
    status: String,
    /// The human (`usr_…`).
    subject: String,
    /// The agent's URI.
    agent: String,
    purpose: String,
    upstreams: Vec<String>,
    actions: Vec<String>,
    approval_required: Vec<String>,
    single_use: Vec<String>,
    created_at: String,
    expires_at: String,
    max_requests: Option<i64>,
    requests_used: i64,
}

impl GrantView {
    /// The view of `grant` at `now`.
    pub fn of(grant: &Grant, now: i64) -> Self {
        Self {
            id: grant.id.clone(),
            status: grant.status_at(now).as_str().to_owned(),
            subject: grant.subject.clone(),
            agent: grant.agent.clone(),
            purpose: grant.purpose.clone(),
            upstreams: grant.upstreams.clone(),
            actions: grant.actions.clone(),
            approval_required: grant.approval_required.clone(),
            single_use: grant.single_use.clone(),
            created_at: rfc3339(grant.created_at),
            expires_at: rfc3339(grant.expires_at),
            max_requests: grant.max_requests,
            requests_used: grant.requests_used,
        }
    }
}

/// A grant just created, with its handle (shown once; the agent exchanges it for tokens).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedGrant {
    #[serde(flatten)]
    grant: GrantView,
    handle: String,
}

/// `GET /v1/grants`.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantList {
    grants: Vec<GrantView>,
}

/// Body of `POST /v1/grants`.
#[derive(Debug, Deserialize, ToSchema)]
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
#[utoipa::path(post, path = "/v1/grants", tag = "grants", request_body = NewGrant,
    responses((status = 201, body = CreatedGrant), ApiErrors), security(("api_key" = [])))]
pub async fn create_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonBody(body): JsonBody<NewGrant>,
) -> ApiResult<(StatusCode, Json<CreatedGrant>)> {
    let (Caller::Human(user) | Caller::AdminHuman(user)) = caller else {
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
    let mut named = Vec::with_capacity(upstreams.len());
    for name in &upstreams {
        let upstream = state
            .config
            .upstreams
            .get(name)
            .ok_or_else(|| ApiError::InvalidRequest(format!("unknown upstream {name:?}")))?;
        named.push(upstream);
    }
    for action in &actions {
        if !valid_action(action) || !named.iter().any(|u| u.defines(action)) {
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
    let event = audit::grant_event("grant.created", Mode::Direct, &grant, now);
    state
        .store
        .create_grant(&grant, &handle.digest(), &event)
        .await?;
    tracing::info!(grant_id = %grant.id, agent = %grant.agent, subject = %grant.subject, "grant created");
    let out = CreatedGrant {
        grant: GrantView::of(&grant, now),
        handle: handle.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /v1/grants[?status=]`: a human sees their own, admin all.
#[utoipa::path(get, path = "/v1/grants", tag = "grants",
    params(("status" = Option<String>, Query, description = "active, completed, revoked or expired")),
    responses((status = 200, body = GrantList), ApiErrors), security(("api_key" = [])))]
pub async fn list_grants(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<GrantList>> {
    let status = status_filter(
        query,
        GrantStatus::parse,
        "active, completed, revoked or expired",
    )?;
    let subject = caller.list_scope();
    let now = state.clock.now();
    let grants = state.store.list_grants(subject).await?;
    let grants = grants
        .iter()
        .filter(|g| status.is_none_or(|s| g.status_at(now) == s))
        .map(|g| GrantView::of(g, now))
        .collect();
    Ok(Json(GrantList { grants }))
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
#[utoipa::path(get, path = "/v1/grants/{id}", tag = "grants", params(("id" = String, Path)),
    responses((status = 200, body = GrantView), ApiErrors), security(("api_key" = [])))]
pub async fn get_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<GrantView>> {
    let grant = visible_grant(&state, &caller, &id).await?;
    Ok(Json(GrantView::of(&grant, state.clock.now())))
}

/// Optional body of `POST /v1/grants/{id}/revoke`.
#[derive(Debug, Default, Deserialize, ToSchema)]
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
) -> ApiResult<Json<GrantView>> {
    let now = state.clock.now();
    let kind = match end {
        GrantEnd::Completed => "grant.completed",
        GrantEnd::Revoked => "grant.revoked",
    };
    // What the event names of the grant never changes, so it is known before the change.
    let mut event = audit::grant_event(kind, mode, grant, now);
    event.reason = reason.map(str::to_owned);
    match state
        .store
        .end_grant(&grant.id, end, reason, now, &event)
        .await?
    {
        Some(ended) => {
            tracing::info!(grant_id = %ended.id, status = ended.status.as_str(), "grant ended");
            Ok(Json(GrantView::of(&ended, now)))
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
#[utoipa::path(post, path = "/v1/grants/{id}/revoke", tag = "grants", params(("id" = String, Path)),
    request_body(content = Option<RevokeBody>, description = "optional"),
    responses((status = 200, body = GrantView), ApiErrors), security(("api_key" = [])))]
pub async fn revoke_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<GrantView>> {
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
#[utoipa::path(post, path = "/v1/grants/{id}/complete", tag = "grants", params(("id" = String, Path)),
    responses((status = 200, body = GrantView), ApiErrors), security(("api_key" = []), ("dpop" = [])))]
pub async fn complete_grant(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Json<GrantView>> {
    let (grant, mode) = match authenticate_api_caller(&state, &method, &uri, &headers).await? {
        ResourceCaller::Agent(agent) if agent.grant.id == id => {
            agent.claim_proof(&state, state.clock.now()).await?;
            (agent.grant, Mode::Delegated)
        }
        ResourceCaller::Agent(_) => {
            return Err(ApiError::Forbidden("the token is for another grant".into()));
        }
        ResourceCaller::Key(caller) => (
            Arc::new(visible_grant(&state, &caller, &id).await?),
            audit::caller_mode(&caller),
        ),
    };
    let reason = Some("task completed");
    end(&state, &grant, GrantEnd::Completed, reason, mode).await
}

/// An upstream as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpstreamView {
    name: String,
    /// The actions its routes (or an MCP server's tools) define.
    actions: Vec<String>,
    routes: Vec<crate::config::Route>,
    /// For an MCP server that lets tools the config does not list through (`"allow"` or
    /// `"high"`): a grant may also name `<upstream>:<tool>` for those.
    #[serde(skip_serializing_if = "Option::is_none")]
    unlisted_tools: Option<&'static str>,
    /// What the upstream gets from Leash (API §9, §17): `vault` (the human's stored secret),
    /// `oauth` (the access token of the human's OAuth connection, made with
    /// `POST /v1/vault/{upstream}/connect`) or `leash_token` (a delegation token).
    credential: &'static str,
}

/// `GET /v1/upstreams`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpstreamList {
    upstreams: Vec<UpstreamView>,
}

/// `GET /v1/upstreams`: names, routes and actions (any authenticated caller).
#[utoipa::path(get, path = "/v1/upstreams", tag = "gateway",
    responses((status = 200, body = UpstreamList), ApiErrors), security(("api_key" = [])))]
pub async fn list_upstreams(State(state): State<Arc<AppState>>, _: Caller) -> Json<UpstreamList> {
    let upstreams = state
        .config
        .upstreams
        .values()
        .map(|u| UpstreamView {
            name: u.name.clone(),
            actions: u.actions().into_iter().map(str::to_owned).collect(),
            routes: u.routes.clone(),
            unlisted_tools: u
                .mcp
                .as_ref()
                .and_then(|m| m.unlisted)
                .map(|risk| match risk {
                    Risk::High => "high",
                    Risk::Normal => "allow",
                }),
            credential: if u.delegation_audience.is_some() {
                "leash_token"
            } else if u.oauth.is_some() {
                "oauth"
            } else {
                "vault"
            },
        })
        .collect();
    Json(UpstreamList { upstreams })
}
