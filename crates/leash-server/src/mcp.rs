//! MCP servers behind the gateway (API §14): `POST|GET|DELETE /mcp/{upstream}`, the endpoint an
//! agent's MCP client connects to (Streamable HTTP), and the RFC 9728 document that names Leash
//! as its authorization server.
//!
//! Each HTTP request authenticates as at the gateway (token, grant, proof: steps 1–3) and carries
//! one JSON-RPC message, parsed strictly (`leash_core::mcp`); what is judged is what is
//! forwarded, byte for byte. `tools/call` is decided per call, as a gateway request is per route:
//! the tool names the action, then scope, Cedar (with the tool and its arguments), `single_use`
//! and approval; a refusal is a tool result with `isError` the model can read, and a call that
//! needs approval is held open while the human decides. `tools/list` answers are filtered to the
//! tools the token may call. What the server sends back streams through ([`sse`]), with its
//! `tools/list` answers filtered and its requests for the human (`elicitation/create`) put to
//! the human, never the agent ([`elicitation`]).
//!
//! An MCP session (`Mcp-Session-Id`) is bound, on this node, to the agent, grant and upstream
//! that initialized it; another caller presenting its id gets `404`, as for an unknown session,
//! and so does a client of a node that never saw it (it initializes again).

mod elicitation;
mod sse;

pub(crate) use elicitation::AnswerError;
pub use elicitation::{ElicitationView, Elicitations, METHOD as ELICITATION_METHOD};

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use leash_core::audit::{AuditEvent, Mode, Outcome};
use leash_core::mcp::{Message, RequestId, call_digest, parse_message};
use leash_core::secret::random_id;
use leash_policy::McpCall;
use leash_store::{ApprovalStatus, RequestUse};
use serde_json::{Value, json};

use crate::audit::Trail;
use crate::config::{McpServer, Risk, Upstream};
use crate::error::{ApiError, ApiResult};
use crate::extract::verdict_result;
use crate::gateway::{
    ApprovalState, Asked, BoundHeaders, Decided, Forwarded, Judged, NotForwarded, Principal,
    approval_step, ask_approval, attribute_refused_token, authenticate, evaluate_policy, forward,
    refuse, source_of,
};
use crate::metrics::{Counted, Surface};
use crate::state::AppState;

/// The audit kind of a `tools/call` decision.
pub const MCP_CALL_EVENT: &str = "mcp.call";
/// The audit kind of a refused MCP request that is not a tool call.
const MCP_REQUEST_EVENT: &str = "mcp.request";

/// Largest `tools/list` answer Leash reads whole to filter.
const LIST_ANSWER_LIMIT: usize = 16 << 20;

/// How long an MCP server's answer may pause between two events: a server's own stream (GET)
/// and a long tool's progress may be quiet for minutes, unlike an HTTP answer.
const STREAM_IDLE: Duration = Duration::from_secs(15 * 60);

/// How often a held call looks at its approval.
const APPROVAL_POLL: Duration = Duration::from_millis(250);

/// The sessions this node has seen initialized, bounded: past the cap the oldest binding is
/// dropped (its client gets `404` and initializes again).
const SESSION_CAP: usize = 16_384;

/// MCP sessions by id: who they belong to, and the server's requests waiting for the client's
/// answer (a response from the client passes only if it answers one of these).
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<SessionTable>,
    /// Calls held for approval, by session key and request id: `notifications/cancelled`
    /// withdraws them.
    held: Mutex<HashMap<(String, RequestId), Arc<tokio::sync::Notify>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write!(f, "Sessions({} bound)", table.bound.len())
    }
}

#[derive(Default)]
struct SessionTable {
    bound: HashMap<String, Session>,
    order: std::collections::VecDeque<String>,
}

struct Session {
    owner: Owner,
    outstanding: HashSet<RequestId>,
}

/// Whom a session belongs to.
#[derive(Clone, PartialEq, Eq)]
struct Owner {
    agent: String,
    grant: String,
    upstream: String,
}

impl Sessions {
    fn bind(&self, id: &str, owner: Owner) {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.bound.contains_key(id) {
            return;
        }
        if table.bound.len() >= SESSION_CAP
            && let Some(oldest) = table.order.pop_front()
        {
            table.bound.remove(&oldest);
        }
        table.order.push_back(id.to_owned());
        table.bound.insert(
            id.to_owned(),
            Session {
                owner,
                outstanding: HashSet::new(),
            },
        );
    }

    fn owned_by(&self, id: &str, owner: &Owner) -> bool {
        let table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table.bound.get(id).is_some_and(|s| s.owner == *owner)
    }

    fn end(&self, id: &str) {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table.bound.remove(id);
        table.order.retain(|other| other != id);
    }

    /// Notes a request the server sent the client in session `id`.
    fn expect_answer(&self, id: &str, request: RequestId) {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(session) = table.bound.get_mut(id)
            && session.outstanding.len() < 1024
        {
            session.outstanding.insert(request);
        }
    }

    fn hold(&self, key: &str, id: &RequestId) -> Arc<tokio::sync::Notify> {
        let cancel = Arc::new(tokio::sync::Notify::new());
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.insert((key.to_owned(), id.clone()), cancel.clone());
        cancel
    }

    fn release(&self, key: &str, id: &RequestId) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.remove(&(key.to_owned(), id.clone()));
    }

    /// Withdraws the held call `id` of session `key`, if there is one.
    fn cancel(&self, key: &str, id: &RequestId) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cancel) = held.get(&(key.to_owned(), id.clone())) {
            cancel.notify_one();
        }
    }

    /// Whether the client's response answers an outstanding server request (once).
    fn take_answer(&self, id: &str, request: &RequestId) -> bool {
        let mut table = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        table
            .bound
            .get_mut(id)
            .is_some_and(|session| session.outstanding.remove(request))
    }
}

/// `GET /.well-known/oauth-protected-resource/mcp/{upstream}` (RFC 9728): the MCP endpoint as a
/// protected resource whose authorization server is Leash.
pub async fn resource_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Response {
    let Some((upstream, _)) = mcp_upstream(&state, &name) else {
        return ApiError::NotFound(format!("no MCP server named {name:?}")).into_response();
    };
    let mut scopes: Vec<&str> = upstream.actions().into_iter().collect();
    scopes.sort_unstable();
    let body = json!({
        "resource": resource_url(&state, &upstream.name),
        "authorization_servers": [state.issuer],
        "bearer_methods_supported": ["header"],
        "scopes_supported": scopes,
        "dpop_signing_alg_values_supported": leash_core::jws::SUPPORTED_ALGS,
        "dpop_bound_access_tokens_required": true,
        "resource_name": format!("MCP server {} through Leash", upstream.name),
    });
    (
        [(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=300"),
        )],
        axum::Json(body),
    )
        .into_response()
}

/// The configured MCP upstream named `name`, and its server's tools.
fn mcp_upstream<'s>(state: &'s AppState, name: &str) -> Option<(&'s Upstream, &'s McpServer)> {
    let upstream = state.config.upstreams.get(name)?;
    Some((upstream, upstream.mcp.as_ref()?))
}

/// `<public_url>/mcp/{upstream}`: the protected resource (RFC 9728 §3.3: the URL the client
/// used).
fn resource_url(state: &AppState, upstream: &str) -> String {
    format!("{}/mcp/{upstream}", state.public_url)
}

/// `POST|GET|DELETE /mcp/{upstream}`.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let mut counted = Counted::new(&state.metrics.requests, Surface::Mcp);
    let request_id = random_id("req_");
    counted.trail.known.upstream = Some(name.clone());
    let source = source_of(&state, &request);
    match endpoint(&state, &name, request, &request_id, &mut counted.trail).await {
        Ok(response) => response,
        Err(e) => {
            counted.refused_by(&e);
            let mut response = refuse(
                &state,
                &counted.trail,
                MCP_REQUEST_EVENT,
                &request_id,
                source,
                e,
            )
            .await;
            if response.status() == StatusCode::UNAUTHORIZED {
                point_to_metadata(&state, &name, response.headers_mut());
            }
            response
        }
    }
}

/// Adds RFC 9728's `resource_metadata` to a `401`'s `WWW-Authenticate`, so that an MCP client
/// finds Leash as the authorization server.
fn point_to_metadata(state: &AppState, upstream: &str, headers: &mut HeaderMap) {
    let metadata = format!(
        "{}/.well-known/oauth-protected-resource/mcp/{upstream}",
        state.public_url
    );
    let challenge = match headers
        .get(header::WWW_AUTHENTICATE)
        .map(HeaderValue::to_str)
    {
        Some(Ok(dpop)) if dpop.starts_with("DPoP") => {
            format!("{dpop}, resource_metadata=\"{metadata}\"")
        }
        _ => format!("DPoP resource_metadata=\"{metadata}\""),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        headers.insert(header::WWW_AUTHENTICATE, value);
    }
}

async fn endpoint(
    state: &Arc<AppState>,
    name: &str,
    request: Request,
    request_id: &str,
    trail: &mut Trail,
) -> ApiResult<Response> {
    let (parts, body) = request.into_parts();
    let exchange = exchange_for(state, name, &parts, request_id, trail).await?;
    match parts.method {
        Method::POST => exchange.post(parts, body, trail).await,
        Method::GET | Method::DELETE => exchange.stream_or_end(parts, trail).await,
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Steps 1–3 and the upstream's place in the grant, for any request at the endpoint.
async fn exchange_for<'s>(
    state: &'s Arc<AppState>,
    name: &str,
    parts: &Parts,
    request_id: &'s str,
    trail: &mut Trail,
) -> ApiResult<Exchange<'s>> {
    trail.known.method = Some(parts.method.as_str().to_owned());
    trail.known.path = Some(parts.uri.path().to_owned());
    let (upstream, server) = mcp_upstream(state, name)
        .ok_or_else(|| ApiError::NoRoute(format!("no MCP server named {name:?}")))?;
    check_origin(state, &parts.headers)?;
    if parts.uri.query().is_some() {
        return Err(ApiError::InvalidRequest(
            "the MCP endpoint takes no query".into(),
        ));
    }
    let principal =
        match authenticate(state, &parts.method, &parts.uri, &parts.headers, trail).await {
            Ok(principal) => principal,
            Err(e) => {
                attribute_refused_token(state, &parts.headers, trail);
                return Err(e);
            }
        };
    if principal.mode != Mode::Delegated {
        return Err(ApiError::Forbidden(
            "the MCP endpoint is for agents, with a DPoP-bound token".into(),
        ));
    }
    state.gateway_rates.check(&principal.actor)?;
    let grant = principal
        .grant
        .as_ref()
        .ok_or_else(|| ApiError::Forbidden("no grant".into()))?;
    if !grant.upstreams.contains(&upstream.name) {
        return Err(ApiError::InsufficientScope(format!(
            "the grant does not cover upstream {}",
            upstream.name
        )));
    }
    let owner = Owner {
        agent: principal.actor.clone(),
        grant: grant.id.clone(),
        upstream: upstream.name.clone(),
    };
    let session = session_id(&parts.headers)?;
    if let Some(id) = &session
        && !state.mcp_sessions.owned_by(id, &owner)
    {
        return Err(ApiError::NotFound("no such MCP session".into()));
    }
    Ok(Exchange {
        state,
        upstream,
        server,
        principal,
        owner,
        session,
        request_id,
    })
}

/// What the decision benchmark measures: a `tools/call` message's way up to its commit, in
/// memory (steps 1–6: token, grant, proof, the message parsed strictly, the tool's action
/// judged by scope and by Cedar with its arguments). `true` if it may go on without approval.
/// The endpoint runs the same functions.
pub async fn decide_tool_call(
    state: &Arc<AppState>,
    upstream: &str,
    parts: &Parts,
    body: &[u8],
) -> ApiResult<bool> {
    let mut trail = Trail::default();
    let exchange = exchange_for(state, upstream, parts, "bench", &mut trail).await?;
    let message = parse_message(body).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    check_mcp_headers(&parts.headers, &message)?;
    let Message::Request { params, .. } = &message else {
        return Err(ApiError::InvalidRequest("not a request".into()));
    };
    let call =
        ToolCall::of(params.as_ref()).map_err(|(_, why)| ApiError::InvalidRequest(why.into()))?;
    let tool = exchange
        .server
        .tool(call.name)
        .ok_or_else(|| ApiError::NoRoute("no such tool".into()))?;
    let judged = exchange.judge(
        "tools/call",
        &call.path(),
        &tool.action,
        tool.risk,
        Some(McpCall {
            tool: call.name,
            arguments: &call.arguments,
        }),
        &mut trail,
    )?;
    Ok(matches!(judged, ApprovalState::NotNeeded) && call.input_responses.is_none())
}

/// A `tools/call`'s parameters, and the digest an approval binds.
struct ToolCall<'m> {
    name: &'m str,
    arguments: Value,
    /// A 2026-07-28 retry's answers to the server's questions, which are the human's to give.
    input_responses: Option<&'m Value>,
    digest: String,
}

impl<'m> ToolCall<'m> {
    /// The call in `params`, or the JSON-RPC error code and message to answer with.
    fn of(params: Option<&'m Value>) -> Result<Self, (i64, &'static str)> {
        let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
            return Err((-32602, "tools/call needs params.name"));
        };
        let arguments = params
            .and_then(|p| p.get("arguments"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        if !arguments.is_object() {
            return Err((-32602, "tools/call arguments must be an object"));
        }
        // A retry answering the server's questions for the human: a new call that the human
        // approves, with the answers in its digest (API §14; ATTACKS 57).
        let input_responses = params.and_then(|p| p.get("inputResponses"));
        let digest = match input_responses {
            None => call_digest(name, &arguments),
            Some(answers) => answered_call_digest(name, &arguments, answers),
        };
        Ok(Self {
            name,
            arguments,
            input_responses,
            digest,
        })
    }

    /// The path policy and approvals see: `/tools/<name>`.
    fn path(&self) -> String {
        format!("/tools/{}", self.name)
    }
}

/// `Origin`, when a browser sends one, must be Leash's own (the MCP spec's defence against DNS
/// rebinding).
fn check_origin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let ours = url::Url::parse(&state.public_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    if origin.to_str().ok() == Some(ours.as_str()) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "requests from another origin are refused".into(),
        ))
    }
}

fn session_id(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all("mcp-session-id").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidRequest(
            "more than one Mcp-Session-Id".into(),
        ));
    }
    let id = value
        .to_str()
        .ok()
        .filter(|id| !id.is_empty() && id.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        .ok_or_else(|| ApiError::InvalidRequest("Mcp-Session-Id must be visible ASCII".into()))?;
    Ok(Some(id.to_owned()))
}

/// One authenticated HTTP request at the MCP endpoint.
struct Exchange<'s> {
    state: &'s Arc<AppState>,
    upstream: &'s Upstream,
    /// The upstream's MCP server: its tools and actions.
    server: &'s McpServer,
    principal: Principal,
    owner: Owner,
    session: Option<String>,
    request_id: &'s str,
}

/// What to do with the server's answer to a forwarded message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AnswerTo {
    /// `initialize`: its `Mcp-Session-Id` binds the session.
    Initialize,
    /// `tools/list` with this id: its tools are filtered.
    ToolsList,
    /// Anything else: passed on (server requests in a stream are still looked at).
    Other,
}

impl<'s> Exchange<'s> {
    async fn post(self, parts: Parts, body: Body, trail: &mut Trail) -> ApiResult<Response> {
        if parts.headers.contains_key(header::CONTENT_ENCODING) {
            return Err(ApiError::InvalidRequest(
                "an MCP message is judged as sent: no Content-Encoding".into(),
            ));
        }
        let limit = self.state.config.limits.gateway_body_bytes;
        let bytes = axum::body::to_bytes(body, limit)
            .await
            .map_err(|e| crate::extract::body_error(&e, limit))?;
        let message = parse_message(&bytes).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        check_mcp_headers(&parts.headers, &message)?;
        match &message {
            Message::Request { id, method, params } => {
                trail.known.method = Some(method.clone());
                match method.as_str() {
                    "initialize" | "ping" | "server/discover" | "subscriptions/listen" => {
                        let answer = if method == "initialize" {
                            AnswerTo::Initialize
                        } else {
                            AnswerTo::Other
                        };
                        self.pass(parts, bytes, trail, answer).await
                    }
                    "tools/list" => self.pass(parts, bytes, trail, AnswerTo::ToolsList).await,
                    "tools/call" => self.call(parts, bytes, id, params.as_ref(), trail).await,
                    "resources/list" | "resources/read" | "resources/templates/list" => {
                        let action = self.server.resources_action.clone();
                        self.guarded(parts, bytes, id, method, &action, trail).await
                    }
                    "prompts/list" | "prompts/get" => {
                        let action = self.server.prompts_action.clone();
                        self.guarded(parts, bytes, id, method, &action, trail).await
                    }
                    _ => Ok(rpc_error(
                        id,
                        -32601,
                        &format!("method {method:?} is not offered through Leash"),
                    )),
                }
            }
            Message::Notification { method, params } if method.starts_with("notifications/") => {
                trail.known.method = Some(method.clone());
                if method == "notifications/cancelled"
                    && let Some(id) = params
                        .as_ref()
                        .and_then(|p| p.get("requestId"))
                        .and_then(request_id_of)
                {
                    self.state.mcp_sessions.cancel(&self.session_key(), &id);
                }
                self.pass(parts, bytes, trail, AnswerTo::Other).await
            }
            Message::Notification { method, .. } => Err(ApiError::InvalidRequest(format!(
                "{method:?} is not a notification"
            ))),
            Message::Response { id, .. } => {
                let key = self.session_key();
                if !self.state.mcp_sessions.take_answer(&key, id) {
                    return Err(ApiError::InvalidRequest(
                        "a response must answer a request the server sent in this session".into(),
                    ));
                }
                self.pass(parts, bytes, trail, AnswerTo::Other).await
            }
        }
    }

    /// Where server requests of this exchange are tracked: the session, or (for a server that
    /// keeps none) the grant's link to the upstream.
    fn session_key(&self) -> String {
        match &self.session {
            Some(id) => id.clone(),
            None => format!("{}\u{0}{}", self.owner.grant, self.owner.upstream),
        }
    }

    /// A message that needs no decision: the proof is claimed and the token checked live in one
    /// commit, then it is forwarded.
    async fn pass(
        self,
        parts: Parts,
        bytes: Bytes,
        trail: &mut Trail,
        answer: AnswerTo,
    ) -> ApiResult<Response> {
        let decided = self.decided("", String::new(), "", ApprovalState::NotNeeded);
        let injected = decided
            .upstream_headers(self.state, self.request_id)
            .await?;
        self.claim_proof().await?;
        self.send(&decided, &parts, Body::from(bytes), trail, answer, injected)
            .await
    }

    /// `resources/*` and `prompts/*`: scope and policy on the upstream's action for them; a
    /// refusal is a JSON-RPC error.
    async fn guarded(
        self,
        parts: Parts,
        bytes: Bytes,
        id: &RequestId,
        method: &str,
        action: &str,
        trail: &mut Trail,
    ) -> ApiResult<Response> {
        trail.known.action = Some(action.to_owned());
        let path = format!("/{method}");
        match self.judge(method, &path, action, Risk::Normal, None, trail) {
            Ok(ApprovalState::NotNeeded) => {}
            Ok(_) => {
                // Refused, so audited and its proof spent like any other refusal: only a tool
                // call can be held open while the human decides.
                self.audit_refused(trail, MCP_REQUEST_EVENT, &ApiError::ApprovalUnsupported)
                    .await?;
                return Ok(rpc_error(
                    id,
                    -32003,
                    "Leash refused: this needs an approval, which only tool calls can wait for",
                ));
            }
            Err(refusal) => {
                self.audit_refused(trail, MCP_REQUEST_EVENT, &refusal)
                    .await?;
                return Ok(rpc_error(id, -32003, &format!("Leash refused: {refusal}")));
            }
        }
        // With its action, for its `single_use` (API §2) in the commit.
        let decided = self.decided(method, path, action, ApprovalState::NotNeeded);
        let injected = decided
            .commit(self.state, trail, MCP_REQUEST_EVENT, self.request_id)
            .await?;
        self.send(
            &decided,
            &parts,
            Body::from(bytes),
            trail,
            AnswerTo::Other,
            injected,
        )
        .await
    }

    /// Steps 4–6 for an action of this upstream: scope, then policy, then whether a human must
    /// approve.
    fn judge(
        &self,
        method: &str,
        path: &str,
        action: &str,
        risk: Risk,
        call: Option<McpCall<'_>>,
        trail: &mut Trail,
    ) -> ApiResult<ApprovalState> {
        let in_scope = self
            .principal
            .token
            .as_ref()
            .is_some_and(|token| token.actions().any(|a| a == action));
        if !in_scope {
            return Err(ApiError::InsufficientScope(format!(
                "the token's scope does not include {action}"
            )));
        }
        let judged = Judged {
            method,
            path,
            upstream: self.upstream,
            action,
            risk,
            mcp: call,
        };
        let now = self.state.clock.now();
        let permitted = evaluate_policy(self.state, &self.principal, &judged, false, now)?;
        Ok(approval_step(permitted, Mode::Delegated, None, trail))
    }

    /// A `tools/call`: decided, and forwarded only when allowed (after the human's approval, if
    /// one is needed, held open for `mcp.approval_wait`).
    async fn call(
        self,
        parts: Parts,
        bytes: Bytes,
        id: &RequestId,
        params: Option<&Value>,
        trail: &mut Trail,
    ) -> ApiResult<Response> {
        let call = match ToolCall::of(params) {
            Ok(call) => call,
            Err((code, why)) => return Ok(rpc_error(id, code, why)),
        };
        let (name, digest, input_responses) = (call.name, &call.digest, call.input_responses);
        let path = call.path();
        trail.known.method = Some("tools/call".into());
        trail.known.path = Some(format!("{path}?arguments_sha256={digest}"));
        let Some(tool) = self.server.tool(name).map(Cow::into_owned) else {
            let refusal = ApiError::NoRoute(format!("tool {name:?} is not offered through Leash"));
            self.audit_refused(trail, MCP_CALL_EVENT, &refusal).await?;
            return Ok(tool_refusal(id, &refusal));
        };
        trail.known.action = Some(tool.action.clone());
        let judged = McpCall {
            tool: name,
            arguments: &call.arguments,
        };
        let approval = match self.judge(
            "tools/call",
            &path,
            &tool.action,
            tool.risk,
            Some(judged),
            trail,
        ) {
            Ok(approval) => approval,
            Err(refusal) => {
                self.audit_refused(trail, MCP_CALL_EVENT, &refusal).await?;
                return Ok(tool_refusal(id, &refusal));
            }
        };
        let approval = match (approval, input_responses) {
            (ApprovalState::NotNeeded, Some(_)) => ApprovalState::Needed {
                policies: vec![INPUT_RESPONSES_POLICY.into()],
            },
            (approval, _) => approval,
        };
        // The audit event's path (the trail's) carries the digest; the approval's path is the
        // call's, with the digest as its query.
        let mut decided = self.decided("tools/call", path, &tool.action, approval);
        if let ApprovalState::Needed { policies } = &decided.approval {
            let policies = policies.clone();
            match self
                .hold(
                    &decided,
                    id,
                    &bytes,
                    digest,
                    &policies,
                    &parts.headers,
                    trail,
                )
                .await?
            {
                Held::Approved(approval) => {
                    decided.approval = ApprovalState::Attached(approval);
                    // Its proof was claimed with the approval's request.
                    decided.principal.proof_once = None;
                }
                // The task ended meanwhile: the agent's token is dead, as at the gateway.
                Held::Refused(refusal @ ApiError::InvalidToken(_)) => return Err(refusal),
                Held::Refused(refusal) => return Ok(tool_refusal(id, &refusal)),
            }
        }
        let injected = decided
            .commit(self.state, trail, MCP_CALL_EVENT, self.request_id)
            .await?;
        self.send(
            &decided,
            &parts,
            Body::from(bytes),
            trail,
            AnswerTo::Other,
            injected,
        )
        .await
    }

    /// Asks the human and waits for the decision, up to `mcp.approval_wait`. The request for
    /// approval is stored (with the proof's `jti` and its event) as at the gateway, bound to the
    /// call's digest; a client that goes away ends the wait (the handler is dropped), the
    /// approval stays pending until it expires.
    #[expect(
        clippy::too_many_arguments,
        reason = "the call's parts its approval binds, and where to record it"
    )]
    async fn hold(
        &self,
        decided: &Decided<'_>,
        id: &RequestId,
        bytes: &Bytes,
        digest: &str,
        policies: &[String],
        headers: &HeaderMap,
        trail: &mut Trail,
    ) -> ApiResult<Held> {
        let query = format!("arguments_sha256={digest}");
        let asked = Asked {
            query: Some(&query),
            headers: BoundHeaders::of(headers),
            body: bytes,
            body_sha256: digest.to_owned(),
            policies,
        };
        let refusal = ask_approval(
            self.state,
            decided,
            asked,
            trail,
            MCP_CALL_EVENT,
            self.request_id,
        )
        .await;
        let ApiError::ApprovalRequired {
            approval: Some(approval_id),
            ..
        } = refusal
        else {
            return Err(refusal);
        };
        let key = self.session_key();
        let cancel = self.state.mcp_sessions.hold(&key, id);
        // A client that goes away drops this future mid-wait: the guard then withdraws the
        // approval in the background, so the inbox does not offer a call nobody waits for.
        let mut on_disconnect = Withdrawal {
            state: self.state.clone(),
            approval_id: approval_id.clone(),
            agent: self.principal.actor.clone(),
            event: Some(self.withdrawal_event(&approval_id, "the client went away")),
        };
        let held = self.wait_for(&approval_id, &cancel).await;
        on_disconnect.event = None;
        self.state.mcp_sessions.release(&key, id);
        if let Ok(Held::Refused(refusal)) = &held {
            // Nobody will act on it now: the inbox must not offer it to the human.
            self.withdraw(&approval_id, refusal).await;
        }
        held
    }

    /// Waits for the human's decision on `approval_id`, up to `mcp.approval_wait`, while the
    /// grant is live and the client has not cancelled the call.
    async fn wait_for(&self, approval_id: &str, cancel: &tokio::sync::Notify) -> ApiResult<Held> {
        let wait = self.state.config.mcp_approval_wait;
        let deadline = tokio::time::Instant::now() + wait;
        let grant_id = self.owner.grant.clone();
        loop {
            let now = self.state.clock.now();
            // The task may end while the human thinks: the held call ends with it.
            let live = self
                .state
                .store
                .grant(&grant_id)
                .await?
                .is_some_and(|grant| grant.is_live(now));
            if !live {
                return Ok(Held::Refused(ApiError::InvalidToken(
                    "the task ended while the call waited for approval".into(),
                )));
            }
            let approval = self
                .state
                .store
                .approval(approval_id)
                .await?
                .ok_or_else(|| ApiError::Unavailable("the approval vanished".into()))?;
            match approval.status_at(now) {
                ApprovalStatus::Approved => return Ok(Held::Approved(Box::new(approval))),
                ApprovalStatus::Pending if tokio::time::Instant::now() < deadline => {
                    tokio::select! {
                        () = tokio::time::sleep(APPROVAL_POLL) => {}
                        () = cancel.notified() => {
                            return Ok(Held::Refused(ApiError::PolicyDenied {
                                reason: format!(
                                    "the client cancelled the call; approval {approval_id} withdrawn"
                                ),
                                policies: Vec::new(),
                            }));
                        }
                    }
                }
                ApprovalStatus::Pending => {
                    return Ok(Held::Refused(ApiError::PolicyDenied {
                        reason: format!(
                            "no decision on approval {approval_id} within {} s",
                            wait.as_secs()
                        ),
                        policies: Vec::new(),
                    }));
                }
                ApprovalStatus::Denied => {
                    return Ok(Held::Refused(ApiError::PolicyDenied {
                        reason: format!("the human denied approval {approval_id}"),
                        policies: Vec::new(),
                    }));
                }
                ApprovalStatus::Expired | ApprovalStatus::Used => {
                    return Ok(Held::Refused(ApiError::PolicyDenied {
                        reason: format!("approval {approval_id} expired undecided"),
                        policies: Vec::new(),
                    }));
                }
            }
        }
    }

    /// Denies a pending approval for the call it was asked for, which ended without it (the
    /// client cancelled, the wait ran out): the agent withdraws its own request.
    async fn withdraw(&self, approval_id: &str, why: &ApiError) {
        let event = self.withdrawal_event(approval_id, &why.to_string());
        withdraw(self.state, approval_id, &self.principal.actor, &event).await;
    }

    /// The event of the agent withdrawing its own request for approval.
    fn withdrawal_event(&self, approval_id: &str, why: &str) -> AuditEvent {
        let mut event = AuditEvent::new(
            "approval.withdrawn",
            Mode::Delegated,
            self.state.clock.now(),
        );
        event.subject = Some(self.principal.subject.clone());
        event.actor = Some(self.principal.actor.clone());
        event.grant_id = Some(self.owner.grant.clone());
        event.upstream = Some(self.upstream.name.clone());
        event.decision = Some(Outcome::Deny);
        event.approver = Some(self.principal.actor.clone());
        event.request_id = Some(approval_id.to_owned());
        event.reason = Some(why.to_owned());
        event
    }

    fn decided(
        &self,
        method: &str,
        path: String,
        action: &str,
        approval: ApprovalState,
    ) -> Decided<'s> {
        Decided {
            principal: self.principal.clone(),
            upstream: self.upstream,
            path,
            method: method.to_owned(),
            action: action.to_owned(),
            websocket: false,
            approval,
        }
    }

    /// Records a refused call (its proof's `jti` claimed with it, so the refusal cannot be
    /// replayed into a flood of events).
    async fn audit_refused(
        &self,
        trail: &mut Trail,
        kind: &str,
        refusal: &ApiError,
    ) -> ApiResult<()> {
        let now = self.state.clock.now();
        let event = trail.event(kind, now, self.request_id, Outcome::Deny, None);
        let request = RequestUse {
            once: self.principal.proof_once.into_iter().collect(),
            token: self.principal.token.as_ref().map(|t| t.jti.clone()),
            now,
            audit: Some(crate::audit::as_refusal(event, refusal)),
            ..RequestUse::default()
        };
        let verdict = self.state.store.record_use(request).await.map_err(|e| {
            tracing::error!(error = %e, "MCP refusal commit failed");
            ApiError::AuditUnavailable
        })?;
        trail.recorded = true;
        verdict_result(verdict)
    }

    /// Claims the proof's `jti` and checks the token live, in one commit: what a message that
    /// needs no decision commits before it is forwarded.
    async fn claim_proof(&self) -> ApiResult<()> {
        let request = RequestUse {
            once: self.principal.proof_once.into_iter().collect(),
            token: self.principal.token.as_ref().map(|t| t.jti.clone()),
            now: self.state.clock.now(),
            ..RequestUse::default()
        };
        let verdict = self.state.store.record_use(request).await.map_err(|e| {
            tracing::error!(error = %e, "MCP request commit failed: nothing is forwarded");
            ApiError::AuditUnavailable
        })?;
        verdict_result(verdict)
    }

    /// GET (the server's stream) and DELETE (the session's end): no message to judge; the proof
    /// is claimed, then the request forwarded.
    async fn stream_or_end(self, parts: Parts, trail: &mut Trail) -> ApiResult<Response> {
        let decided = self.decided("", String::new(), "", ApprovalState::NotNeeded);
        let injected = decided
            .upstream_headers(self.state, self.request_id)
            .await?;
        self.claim_proof().await?;
        if parts.method == Method::DELETE
            && let Some(id) = &self.session
        {
            self.state.mcp_sessions.end(id);
        }
        self.send(
            &decided,
            &parts,
            Body::empty(),
            trail,
            AnswerTo::Other,
            injected,
        )
        .await
    }

    /// Forwards a decided message and relays the answer: JSON answers to `tools/list` filtered,
    /// event streams through [`sse::relay`], anything else unchanged.
    async fn send(
        &self,
        decided: &Decided<'_>,
        parts: &Parts,
        body: Body,
        trail: &Trail,
        answer: AnswerTo,
        injected: crate::gateway::Injected,
    ) -> ApiResult<Response> {
        let forwarded = forward(
            self.state,
            decided,
            Forwarded {
                path: "",
                query: None,
                method: &parts.method,
                headers: &parts.headers,
                body,
                trail,
                answer_idle: Some(STREAM_IDLE),
                injected,
                proxied: None,
            },
            self.request_id,
        )
        .await;
        let response = match forwarded {
            Ok(response) => response,
            Err(NotForwarded::Failed(e) | NotForwarded::CutOff(e)) => return Err(e),
        };
        let answered_session = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok());
        if answer == AnswerTo::Initialize
            && response.status().is_success()
            && let Some(id) = answered_session
        {
            self.state.mcp_sessions.bind(id, self.owner.clone());
        }
        let session_key = answered_session.map_or_else(|| self.session_key(), str::to_owned);
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let filter = answer == AnswerTo::ToolsList;
        if content_type.starts_with("text/event-stream") {
            let relay = sse::Relay {
                state: self.state.clone(),
                upstream: self.upstream.name.clone(),
                session: session_key,
                filter_tools: filter.then(|| self.allowed_tools()),
                sampling: self.sampling_permitted(),
                answerer: Answerer::new(self, parts, &response),
                elicited: std::sync::atomic::AtomicUsize::new(0),
            };
            return Ok(sse::relay(response, relay));
        }
        if filter && content_type.starts_with("application/json") {
            let (mut head, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, LIST_ANSWER_LIMIT)
                .await
                .map_err(|_| {
                    ApiError::BadGateway("the tools/list answer could not be read".into())
                })?;
            let filtered = filter_tools_answer(&bytes, &self.allowed_tools()).ok_or_else(|| {
                ApiError::BadGateway("the tools/list answer is not JSON-RPC".into())
            })?;
            head.headers.remove(header::CONTENT_LENGTH);
            return Ok(Response::from_parts(head, Body::from(filtered)));
        }
        Ok(response)
    }

    /// Whether the server may ask the agent's model to sample (`sampling/createMessage`): the
    /// upstream's sampling action in the token's scope and permitted by policy, without an
    /// approval (a sampling request cannot wait for one).
    fn sampling_permitted(&self) -> bool {
        let action = &self.server.sampling_action;
        let mut scratch = Trail::default();
        let judged = self.judge(
            "sampling/createMessage",
            "/sampling",
            action,
            Risk::Normal,
            None,
            &mut scratch,
        );
        matches!(judged, Ok(ApprovalState::NotNeeded))
    }

    /// The tools the token may call: those `tools/call` would judge (listed, or unlisted and let
    /// through), with their action in its scope.
    fn allowed_tools(&self) -> ToolFilter {
        ToolFilter {
            server: self.server.clone(),
            granted: self
                .principal
                .token
                .as_ref()
                .map(|token| token.actions().map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }
}

/// Whether `grant` is live now (from the store's in-memory view of live grants); a failed read
/// counts as ended.
pub(crate) async fn grant_is_live(state: &AppState, grant: &str) -> bool {
    let now = state.clock.now();
    matches!(state.store.live_grant(grant).await, Ok(Some(grant)) if grant.is_live(now))
}

/// Denies a pending approval as withdrawn by the agent that asked for it.
async fn withdraw(state: &AppState, approval_id: &str, agent: &str, event: &AuditEvent) {
    let now = state.clock.now();
    if let Err(e) = state
        .store
        .decide_approval(approval_id, false, agent, now, event)
        .await
    {
        tracing::warn!(error = %e, approval = %approval_id, "withdrawing an approval failed");
    }
}

/// Withdraws a held call's approval if the wait is dropped before it ends (the client went
/// away); disarmed by taking `event`.
struct Withdrawal {
    state: Arc<AppState>,
    approval_id: String,
    agent: String,
    event: Option<AuditEvent>,
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        let Some(event) = self.event.take() else {
            return;
        };
        let (state, approval_id, agent) = (
            self.state.clone(),
            std::mem::take(&mut self.approval_id),
            std::mem::take(&mut self.agent),
        );
        tokio::spawn(async move { withdraw(&state, &approval_id, &agent, &event).await });
    }
}

/// A held call's outcome.
enum Held {
    Approved(Box<leash_store::Approval>),
    Refused(ApiError),
}

/// The 2026-07-28 transport names the message in headers too: they must say what the body says
/// (a proxy that routes on the headers must not see another call than the one judged).
fn check_mcp_headers(headers: &HeaderMap, message: &Message) -> ApiResult<()> {
    let (method, name) = match message {
        Message::Request { method, params, .. } | Message::Notification { method, params } => {
            // The member each method is named by: a tool's or prompt's `name`, a resource's `uri`.
            let member = match method.as_str() {
                "tools/call" | "prompts/get" => Some("name"),
                "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
                _ => None,
            };
            let name = member
                .and_then(|m| params.as_ref().and_then(|p| p.get(m)))
                .and_then(Value::as_str);
            (Some(method.as_str()), name)
        }
        Message::Response { .. } => (None, None),
    };
    for (header_name, expected) in [("mcp-method", method), ("mcp-name", name)] {
        let mut values = headers.get_all(header_name).iter();
        let Some(value) = values.next() else {
            continue;
        };
        if values.next().is_some() || value.to_str().ok() != expected {
            return Err(ApiError::InvalidRequest(format!(
                "{header_name} does not match the message"
            )));
        }
    }
    Ok(())
}

/// The policy id reported when a call carries answers for the human (`inputResponses`).
const INPUT_RESPONSES_POLICY: &str = "leash:input-responses-need-the-human";

/// A JSON-RPC id given in a message's params (`notifications/cancelled`'s `requestId`).
fn request_id_of(value: &Value) -> Option<RequestId> {
    match value {
        Value::String(id) => Some(RequestId::String(id.clone())),
        Value::Number(n) => n.as_i64().map(RequestId::Number),
        _ => None,
    }
}

/// The digest of a call that carries `inputResponses`: SHA-256 of the RFC 8785 form of
/// `{name, arguments, inputResponses}`, so that an approval binds the answers too.
fn answered_call_digest(name: &str, arguments: &Value, answers: &Value) -> String {
    use sha2::Digest as _;
    let call = json!({"name": name, "arguments": arguments, "inputResponses": answers});
    match leash_core::json::canonical(&call) {
        Ok(bytes) => hex::encode(sha2::Sha256::digest(bytes)),
        // Only a non-finite number could fail, and JSON holds none.
        Err(_) => hex::encode(sha2::Sha256::digest(call.to_string())),
    }
}

/// A JSON-RPC error answer, from Leash.
fn rpc_error(id: &RequestId, code: i64, message: &str) -> Response {
    let body =
        json!({"jsonrpc": "2.0", "id": id.to_value(), "error": {"code": code, "message": message}});
    leash_answer(body, "invalid_request")
}

/// A refused tool call as a tool result the model can read (API §14).
fn tool_refusal(id: &RequestId, refusal: &ApiError) -> Response {
    let (_, code) = refusal.status_and_code();
    let body = json!({
        "jsonrpc": "2.0",
        "id": id.to_value(),
        "result": {
            "isError": true,
            "content": [{"type": "text", "text": format!("Leash refused: {refusal}")}],
        },
    });
    leash_answer(body, code)
}

fn leash_answer(body: Value, decision: &'static str) -> Response {
    let mut response = axum::Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        crate::error::LEASH_DECISION,
        HeaderValue::from_static(decision),
    );
    response
}

/// Which tools of a `tools/list` answer an agent sees: exactly those whose call its token's
/// scope would let reach the decision (an agent never sees a tool it may not call).
pub(crate) struct ToolFilter {
    server: McpServer,
    granted: HashSet<String>,
}

impl ToolFilter {
    fn allows(&self, name: &str) -> bool {
        self.server
            .tool(name)
            .is_some_and(|tool| self.granted.contains(&tool.action))
    }
}

/// A `tools/list` answer with only the `allowed` tools; `None` if it is not JSON-RPC.
fn filter_tools_answer(bytes: &[u8], allowed: &ToolFilter) -> Option<Vec<u8>> {
    let mut answer: Value = serde_json::from_slice(bytes).ok()?;
    filter_tools(&mut answer, allowed);
    serde_json::to_vec(&answer).ok()
}

/// Keeps, in a `tools/list` result, only the tools `allowed` lets through (an error answer is
/// left as is).
fn filter_tools(answer: &mut Value, allowed: &ToolFilter) {
    if let Some(tools) = answer
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    {
        tools.retain(|tool| {
            tool.get("name")
                .and_then(Value::as_str)
                .is_some_and(|name| allowed.allows(name))
        });
    }
}

/// Answers the server, in the human's name or Leash's, what it asks of the client that the agent
/// must not answer (`elicitation/create`, and sampling policy refuses): the answer goes to the
/// server as the client's, in the same session.
#[derive(Clone)]
pub(crate) struct Answerer {
    url: url::Url,
    headers: HeaderMap,
    /// The human and upstream whose vaulted credential the answer carries, as the call did;
    /// looked up only when an answer is sent (rarely), never for every relayed stream.
    subject: String,
    upstream: String,
    /// The agent (or the human, directly) on whose behalf the answer goes, for a delegation
    /// token (`[upstream.inject] kind = "leash_token"`).
    actor: String,
    /// The upstream's delegation audience, if it takes delegation tokens rather than a vaulted
    /// credential.
    delegation_audience: Option<String>,
    /// The grant whose human an elicitation is put to.
    grant: String,
    /// The action an elicitation is shown under (`<upstream>:elicitation`).
    elicitation_action: String,
}

impl Answerer {
    fn new(exchange: &Exchange<'_>, parts: &Parts, response: &Response) -> Self {
        let mut headers = HeaderMap::new();
        for name in ["mcp-session-id", "mcp-protocol-version"] {
            // The session the server's answer names (an `initialize` answer starts one), else
            // the request's.
            let value = response
                .headers()
                .get(name)
                .or_else(|| parts.headers.get(name));
            if let Some(value) = value {
                headers.insert(name, value.clone());
            }
        }
        let attribution = [
            ("leash-subject", exchange.principal.subject.as_str()),
            ("leash-actor", exchange.principal.actor.as_str()),
            ("leash-grant", exchange.owner.grant.as_str()),
            ("leash-request-id", exchange.request_id),
        ];
        for (name, value) in attribution {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        Self {
            url: exchange.upstream.url.clone(),
            headers,
            subject: exchange.principal.subject.clone(),
            upstream: exchange.upstream.name.clone(),
            actor: exchange.principal.actor.clone(),
            delegation_audience: exchange.upstream.delegation_audience.clone(),
            grant: exchange.owner.grant.clone(),
            elicitation_action: exchange.server.elicitation_action.clone(),
        }
    }

    /// Answers the server's request `id` with Leash's refusal (a JSON-RPC error).
    pub(crate) fn refuse(&self, state: &Arc<AppState>, id: &RequestId, why: &str) {
        let error = json!({"code": -32003, "message": format!("Leash refused: {why}")});
        self.answer(
            state,
            json!({"jsonrpc": "2.0", "id": id.to_value(), "error": error}),
        );
    }

    /// Sends the server a response as the client's, in the same session.
    fn answer(&self, state: &Arc<AppState>, body: Value) {
        let mut request = axum::http::Request::new(Body::from(body.to_string()));
        *request.method_mut() = Method::POST;
        let Ok(uri) = self.url.as_str().parse() else {
            return;
        };
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        let (state, subject, upstream, grant) = (
            state.clone(),
            self.subject.clone(),
            self.upstream.clone(),
            self.grant.clone(),
        );
        // Like every request the gateway forwards to such an upstream: a token minted for this
        // answer, under the action it is made as, never a stored secret.
        let delegation = self.delegation_audience.as_ref().map(|audience| {
            let delegated = (!grant.is_empty()).then_some((self.actor.as_str(), grant.as_str()));
            crate::gateway::delegation_token(
                &state,
                audience,
                &subject,
                delegated,
                &self.elicitation_action,
            )
        });
        tokio::spawn(async move {
            // The human's credential goes only with a live grant's requests (API §9): once the
            // task ended, the server gets no answer at all.
            if !grant_is_live(&state, &grant).await {
                tracing::info!(upstream = %upstream, "no answer to the MCP server: the task ended");
                return;
            }
            if let Some(token) = delegation {
                request.headers_mut().insert(header::AUTHORIZATION, token);
            } else {
                match crate::vault::injection(&state, &subject, &upstream).await {
                    Ok(Some(injection)) => {
                        request
                            .headers_mut()
                            .insert(injection.name, injection.value);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "no credential for an answer to the MCP server");
                        return;
                    }
                }
            }
            let Some(configured) = state.config.upstreams.get(&upstream) else {
                return;
            };
            if let Err(e) = state.upstream_clients.of(configured).request(request).await {
                tracing::warn!(error = %e, "answering the MCP server for the human failed");
            }
        });
    }
}
