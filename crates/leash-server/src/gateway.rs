//! The gateway (API §6): `ANY /gw/{upstream}/{path…}`. Every request runs the steps in order and
//! fails closed at the first failure; only then is it forwarded, with the agent's credentials
//! removed and the human's vaulted credential injected. Bodies stream in both directions.
//!
//! The file follows a request top to bottom, as it happens: [`handle`] and its driver; the
//! request target, checked before anything else; [`decide`], steps 1–6 in memory, one function
//! per step (`authenticate` for steps 1–3, `route_and_scope` for step 4, `attached_approval`
//! and `evaluate_policy` for step 5, `approval_step` for step 6); the body, read whole where an
//! approval binds it or a form must be checked ([`Decided::bind_body`]); step 7,
//! [`Decided::commit`]; step 8, `forward`; and last, how a refusal at any step is answered and
//! audited (`refuse`). `/v1/authorize` runs the same `decide`, `bind_body` and `commit`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use leash_core::audit::{Mode, Outcome};
use leash_core::dpop::replay_key;
use leash_core::grant::Grant;
use leash_core::route::safe_segments;
use leash_core::secret::random_id;
use leash_core::token::AccessClaims;
use leash_policy::{Decision, Facts, high_risk_by_name};
use leash_store::{Approval, ApprovalStatus, OneTimeKind, OneTimeUse, RequestUse, SingleUse};
use tower_http::timeout::TimeoutBody;

use crate::audit::Trail;
use crate::config::{Risk, Route, Upstream};
use crate::error::{ApiError, ApiResult, caused_by};
use crate::extract::{Caller, ResourceCaller, authenticate_resource, verdict_result};
use crate::metrics::{Counted, Surface};
use crate::overrides::{FormBody, form_body, refuse_method_field, refuse_method_parameter};
use crate::reflection::{GuardedBody, Secrets};
use crate::state::AppState;

/// The audit kind of the gateway's decisions.
const GATEWAY_EVENT: &str = "gateway.request";

/// `ANY /gw/{upstream}/{path…}`.
pub async fn handle(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let mut counted = Counted::new(&state.metrics.requests, Surface::Gateway);
    let request_id = random_id("req_");
    let source = source_of(&state, &request);
    match gateway(&state, request, &request_id, &mut counted.trail).await {
        Ok(response) => response,
        Err(e) => {
            counted.refused_by(&e);
            refuse(
                &state,
                &counted.trail,
                GATEWAY_EVENT,
                &request_id,
                source,
                e,
            )
            .await
        }
    }
}

/// A request's way through the gateway, step by step; `trail` gathers what is known for its
/// audit event as the steps pass.
async fn gateway(
    state: &Arc<AppState>,
    request: Request,
    request_id: &str,
    trail: &mut Trail,
) -> ApiResult<Response> {
    let (mut parts, body) = request.into_parts();
    if parts.version == axum::http::Version::HTTP_2 {
        trail.known.method = Some(parts.method.as_str().to_owned());
        parts.uri = http2_target(&parts.uri, &parts.headers)?;
    }
    // Steps 1–6, in memory.
    let decided = decide(state, &parts.method, &parts.uri, &parts.headers, trail).await?;
    // Between steps 6 and 7: the body, read whole where it must be checked or bound.
    let body = request_body(state, &decided, &parts, body, trail, request_id).await?;
    // Step 7: the request's use and its audit event, durably (the credential had first).
    let injected = decided
        .commit(state, trail, GATEWAY_EVENT, request_id)
        .await?;
    // Step 8: forward.
    let sent = Forwarded {
        path: &decided.path,
        query: parts.uri.query(),
        method: &parts.method,
        headers: &parts.headers,
        body,
        trail,
        answer_idle: None,
        injected,
        proxied: None,
    };
    forward_committed(state, &decided, sent, request_id).await
}

/// Step 8 for a committed request: forwards it; a request whose body failed while it was sent
/// is also recorded as cut off.
pub(crate) async fn forward_committed(
    state: &Arc<AppState>,
    decided: &Decided<'_>,
    sent: Forwarded<'_>,
    request_id: &str,
) -> ApiResult<Response> {
    let trail = sent.trail;
    match forward(state, decided, sent, request_id).await {
        Ok(response) => Ok(response),
        Err(NotForwarded::Failed(e)) => Err(e),
        Err(NotForwarded::CutOff(e)) => {
            // The allow event is committed already: the trail must also say that the request
            // never reached the upstream whole.
            let event = trail.event(
                GATEWAY_EVENT,
                state.clock.now(),
                request_id,
                Outcome::Deny,
                Some(REQUEST_CUT_OFF.into()),
            );
            if crate::audit::record(state, event).await.is_err() {
                tracing::error!(request_id = %request_id, "the cut-off of a forwarded request is not in the audit trail");
            }
            Err(e)
        }
    }
}

// ---- Before step 1: the request target ----------------------------------------------------------

/// The request target of an HTTP/2 request, as HTTP/1.1 sends it: `:scheme` and `:authority`
/// make hyper's URI absolute, but they decide nothing here (the upstream comes from
/// configuration, a proof's `htu` is checked against `public_url`), so only the path and query
/// are kept. A request RFC 9113 §8.3.1 and §8.2.1 call malformed, and h2 lets through, is
/// refused: userinfo in `:authority`, a `Host` naming another authority, a field value with
/// leading or trailing whitespace.
pub(crate) fn http2_target(uri: &Uri, headers: &HeaderMap) -> ApiResult<Uri> {
    let malformed =
        |what: &str| ApiError::InvalidRequest(format!("malformed HTTP/2 request: {what}"));
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(malformed(":authority must not carry userinfo"));
        }
        let other_host = headers.get_all(header::HOST).iter().any(|host| {
            !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        if other_host {
            return Err(malformed("Host differs from :authority"));
        }
    }
    let padded = headers.values().any(|value| {
        let bytes = value.as_bytes();
        bytes.first().is_some_and(|b| matches!(b, b' ' | b'\t'))
            || bytes.last().is_some_and(|b| matches!(b, b' ' | b'\t'))
    });
    if padded {
        return Err(malformed(
            "a field value has leading or trailing whitespace",
        ));
    }
    let target = uri.path_and_query().map_or("/", |target| target.as_str());
    target
        .parse()
        .map_err(|_| malformed("the :path is not a request target"))
}

/// A request's method and target, which passed the checks made before anyone is
/// authenticated: at the gateway (`/gw/{upstream}/…`) or in the forward proxy's tunnel (whose
/// host names the upstream).
pub(crate) struct Target<'r> {
    method: &'r Method,
    /// The upstream's name, as the request spells it.
    upstream: &'r str,
    /// The path after the upstream's name, `/` at least.
    path: &'r str,
    /// The path's segments, each checked safe (`route::safe_segments`).
    segments: Vec<&'r str>,
    query: Option<&'r str>,
}

impl<'r> Target<'r> {
    /// Refuses a path that is not byte for byte what would be forwarded
    /// (`route::safe_segments`) and a `_method` query parameter.
    pub(crate) fn checked(
        method: &'r Method,
        upstream: &'r str,
        path: &'r str,
        query: Option<&'r str>,
        trail: &mut Trail,
    ) -> ApiResult<Self> {
        trail.known.method = Some(method.as_str().to_owned());
        trail.known.upstream = Some(upstream.to_owned());
        trail.known.path = Some(path.to_owned());
        let segments = safe_segments(path).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        if let Some(query) = query {
            refuse_method_parameter(query.as_bytes())?;
        }
        Ok(Self {
            method,
            upstream,
            path,
            segments,
            query,
        })
    }
}

/// Refuses what no step may see: an absolute-form target, `CONNECT` and `TRACE`, and what
/// [`Target::checked`] refuses. Splits the target into the upstream's name and the path.
fn check_target<'r>(method: &'r Method, uri: &'r Uri, trail: &mut Trail) -> ApiResult<Target<'r>> {
    trail.known.method = Some(method.as_str().to_owned());
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(ApiError::InvalidRequest(
            "absolute-form targets are not accepted".into(),
        ));
    }
    // CONNECT would tunnel past every check; TRACE echoes the request, credentials included.
    if *method == Method::CONNECT || *method == Method::TRACE {
        return Err(ApiError::InvalidRequest(format!(
            "{method} is not accepted at the gateway"
        )));
    }
    let rest = uri.path().strip_prefix("/gw/").unwrap_or_default();
    let (upstream, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Target::checked(method, upstream, path, uri.query(), trail)
}

// ---- Steps 1–6: the decision, in memory ---------------------------------------------------------

/// Who the request is for and by whom.
#[derive(Clone)]
pub(crate) struct Principal {
    pub(crate) mode: Mode,
    /// The agent proof's one-time value, claimed when the request is committed.
    pub(crate) proof_once: Option<OneTimeUse>,
    /// The agent (delegated) or the human (direct).
    pub(crate) actor: String,
    /// The human.
    pub(crate) subject: String,
    pub(crate) grant: Option<Arc<Grant>>,
    /// The agent's token (delegated).
    pub(crate) token: Option<Arc<AccessClaims>>,
}

/// A request that passed steps 1–6 (in memory); [`Decided::commit`] makes it durable.
pub struct Decided<'s> {
    pub(crate) principal: Principal,
    pub(crate) upstream: &'s Upstream,
    pub(crate) path: String,
    pub(crate) method: String,
    pub(crate) action: String,
    /// Whether the route allows a WebSocket (only the forward proxy opens one).
    pub(crate) websocket: bool,
    /// Step 6's outcome.
    pub approval: ApprovalState,
}

/// Where a decided request stands with step 6.
pub enum ApprovalState {
    /// No approval needed (or direct mode).
    NotNeeded,
    /// Needed and none attached: the gateway creates one and refuses.
    Needed {
        /// The policies that require it.
        policies: Vec<String>,
    },
    /// An approved, unexpired approval bound to this method, upstream, path, query, grant and
    /// agent is attached; its body digest is checked once the body is read, and its single use
    /// is spent in the commit.
    Attached(Box<Approval>),
}

impl Decided<'_> {
    /// The upstream the request is for.
    pub fn upstream(&self) -> &Upstream {
        self.upstream
    }

    /// The agent (delegated) or the human (direct) making the request.
    pub fn actor(&self) -> &str {
        &self.principal.actor
    }
}

/// Steps 1–6 for `method` on `uri` (`/gw/{upstream}/{path…}`) with the caller's `headers`,
/// after the target's checks; each step is one of the functions below, in order.
pub async fn decide<'s>(
    state: &'s AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    trail: &mut Trail,
) -> ApiResult<Decided<'s>> {
    let target = check_target(method, uri, trail)?;
    // Steps 1–3.
    let principal = authenticate(state, method, uri, headers, trail).await?;
    decide_for(state, principal, &target, headers, trail).await
}

/// Steps 4–6 for an authenticated `principal` (by the gateway's steps 1–3, or by the forward
/// proxy's credential) and a checked `target`.
pub(crate) async fn decide_for<'s>(
    state: &'s AppState,
    principal: Principal,
    target: &Target<'_>,
    headers: &HeaderMap,
    trail: &mut Trail,
) -> ApiResult<Decided<'s>> {
    // Counted once the caller is authenticated: forged requests naming an agent cannot use up
    // its allowance, and the table holds registered callers only.
    state.gateway_rates.check(&principal.actor)?;
    // Step 4.
    let routed = route_and_scope(state, &principal, target, trail)?;
    // Step 5, with the attached approval (if any) checked first: policy sees whether there is
    // one.
    let now = state.clock.now();
    let attached = attached_approval(state, &principal, headers, target, &routed, now).await?;
    trail.known.approver = attached.as_ref().and_then(|a| a.approver.clone());
    let judged = Judged {
        method: target.method.as_str(),
        path: target.path,
        upstream: routed.upstream,
        action: &routed.route.action,
        risk: routed.route.risk,
        mcp: None,
    };
    let permitted = evaluate_policy(state, &principal, &judged, attached.is_some(), now)?;
    // Step 6.
    let approval = approval_step(permitted, principal.mode, attached, trail);
    Ok(Decided {
        principal,
        upstream: routed.upstream,
        path: target.path.to_owned(),
        method: target.method.as_str().to_owned(),
        action: routed.route.action.clone(),
        websocket: routed.route.websocket,
        approval,
    })
}

/// Steps 1–3 (delegated: the agent's token, its grant and revocation, the proof; see
/// `extract::verify_agent`) or the human's API key (direct). The admin key acts on no upstream.
pub(crate) async fn authenticate(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    trail: &mut Trail,
) -> ApiResult<Principal> {
    let caller = match authenticate_resource(state, method, uri, headers).await {
        Ok(caller) => caller,
        Err(e) => {
            attribute_refused_token(state, headers, trail);
            return Err(e);
        }
    };
    let principal = match caller {
        ResourceCaller::Agent(agent) => {
            let agent = *agent;
            Principal {
                mode: Mode::Delegated,
                proof_once: Some(agent.proof_once),
                actor: agent.claims.client_id.clone(),
                subject: agent.claims.sub.clone(),
                grant: Some(agent.grant),
                token: Some(agent.claims),
            }
        }
        ResourceCaller::Key(Caller::Human(user) | Caller::AdminHuman(user)) => Principal {
            mode: Mode::Direct,
            proof_once: None,
            actor: user.id.clone(),
            subject: user.id,
            grant: None,
            token: None,
        },
        ResourceCaller::Key(Caller::Admin) => {
            trail.known.mode = Mode::System;
            trail.known.actor = Some("admin".into());
            return Err(ApiError::Forbidden(
                "the admin key does not act on upstreams".into(),
            ));
        }
    };
    principal.record(trail);
    Ok(principal)
}

impl Principal {
    /// Puts who acts, for whom and under which grant in the request's audit trail.
    pub(crate) fn record(&self, trail: &mut Trail) {
        trail.known.mode = self.mode;
        trail.known.subject = Some(self.subject.clone());
        trail.known.actor = Some(self.actor.clone());
        if let Some(grant) = &self.grant {
            trail.grant(grant);
        }
    }
}

/// The configured upstream a request names, and its route that matched the request.
struct Routed<'s> {
    upstream: &'s Upstream,
    /// Its action (`mail:read`) and risk.
    route: &'s Route,
}

/// Step 4: the route of the configured upstream the request names gives its action, which must
/// be within the grant's upstreams and the token's scope.
fn route_and_scope<'s>(
    state: &'s AppState,
    principal: &Principal,
    target: &Target<'_>,
    trail: &mut Trail,
) -> ApiResult<Routed<'s>> {
    let (method, name, path) = (target.method, target.upstream, target.path);
    let upstream = state
        .config
        .upstreams
        .get(name)
        .ok_or_else(|| ApiError::NoRoute(format!("no upstream named {name:?}")))?;
    let route = upstream
        .route(method.as_str(), &target.segments)
        .ok_or_else(|| {
            ApiError::NoRoute(format!(
                "no route of {} matches {method} {path}",
                upstream.name
            ))
        })?;
    trail.known.action = Some(route.action.clone());
    if let Some(grant) = &principal.grant {
        if !grant.upstreams.contains(&upstream.name) {
            return Err(ApiError::InsufficientScope(format!(
                "the grant does not cover upstream {}",
                upstream.name
            )));
        }
        let in_scope = principal
            .token
            .as_ref()
            .is_some_and(|token| token.actions().any(|action| action == route.action));
        if !in_scope {
            return Err(ApiError::InsufficientScope(format!(
                "the token's scope does not include {}",
                route.action
            )));
        }
    }
    Ok(Routed { upstream, route })
}

/// Before step 5, which sees whether an approval is attached: the approval a delegated request
/// names in `Leash-Approval`, which must be for exactly this request (all but the body, which is
/// checked once read) of this agent under this grant: another grant, agent, method, upstream,
/// path or query is a mismatch; one that is not approved (yet, or any more) still needs
/// approval.
async fn attached_approval(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    target: &Target<'_>,
    routed: &Routed<'_>,
    now: i64,
) -> ApiResult<Option<Approval>> {
    let (Some(grant), Some(id)) = (&principal.grant, approval_header(headers)?) else {
        return Ok(None);
    };
    let approval = state
        .store
        .approval(&id)
        .await?
        .ok_or_else(|| ApiError::ApprovalMismatch(format!("no approval {id:?} exists")))?;
    let mismatch = if approval.grant_id != grant.id {
        Some("another grant")
    } else if approval.agent != principal.actor {
        Some("another agent")
    } else if approval.method != target.method.as_str() {
        Some("another method")
    } else if approval.upstream != routed.upstream.name || approval.path != target.path {
        Some("another path")
    } else if approval.query.as_deref() != target.query {
        Some("another query")
    } else {
        None
    };
    if let Some(what) = mismatch {
        return Err(ApiError::ApprovalMismatch(format!(
            "approval {id} was given for {what}"
        )));
    }
    match approval.status_at(now) {
        ApprovalStatus::Approved => Ok(Some(approval)),
        ApprovalStatus::Pending => Err(ApiError::ApprovalRequired {
            policies: Vec::new(),
            approval: Some(approval.id),
        }),
        ApprovalStatus::Denied | ApprovalStatus::Used | ApprovalStatus::Expired => {
            Err(ApiError::ApprovalRequired {
                policies: Vec::new(),
                approval: None,
            })
        }
    }
}

/// The `Leash-Approval` header's value, if there is exactly one.
fn approval_header(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all("leash-approval").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidRequest(
            "more than one Leash-Approval header".into(),
        ));
    }
    value
        .to_str()
        .map(|v| Some(v.trim().to_owned()))
        .map_err(|_| ApiError::InvalidRequest("Leash-Approval must be an approval id".into()))
}

/// What step 5 let through: the request, at once or once a human approved it.
pub(crate) enum Permitted {
    /// Allowed by these policies.
    Allow { policies: Vec<String> },
    /// Allowed once approved, as these policies require.
    ApprovalRequired { policies: Vec<String> },
}

/// What policy judges of a request: its method and path as forwarded (an MCP call's: see
/// `mcp`), and the upstream and action they name.
pub(crate) struct Judged<'r> {
    pub(crate) method: &'r str,
    pub(crate) path: &'r str,
    pub(crate) upstream: &'r Upstream,
    pub(crate) action: &'r str,
    pub(crate) risk: Risk,
    /// An MCP `tools/call`'s tool and arguments, for policies that read them.
    pub(crate) mcp: Option<leash_policy::McpCall<'r>>,
}

/// Step 5: the Cedar policy set in force decides, on the facts of the request; a deny names the
/// policies that decided.
pub(crate) fn evaluate_policy(
    state: &AppState,
    principal: &Principal,
    judged: &Judged<'_>,
    approval_attached: bool,
    now: i64,
) -> ApiResult<Permitted> {
    let (upstream, action) = (judged.upstream, judged.action);
    let grant = principal.grant.as_ref();
    let no_actions = Vec::new();
    let facts = Facts {
        mode: principal.mode,
        principal: &principal.actor,
        human: &principal.subject,
        action,
        upstream: &upstream.name,
        method: judged.method,
        path: judged.path,
        grant_id: grant.map_or("", |g| g.id.as_str()),
        purpose: grant.map_or("", |g| g.purpose.as_str()),
        grant_actions: grant.map_or(&no_actions, |g| &g.actions),
        grant_age_seconds: grant.map_or(0, |g| now - g.created_at),
        high_risk: judged.risk == Risk::High || high_risk_by_name(action),
        grant_requires_approval: grant
            .is_some_and(|g| g.approval_required.iter().any(|a| a == action)),
        approval_attached,
        now,
        mcp: judged.mcp,
    };
    match state.policy().authorize(&facts) {
        Decision::Deny { policies, reason } => Err(ApiError::PolicyDenied { reason, policies }),
        Decision::ApprovalRequired { policies } => Ok(Permitted::ApprovalRequired { policies }),
        Decision::Allow { policies } => Ok(Permitted::Allow { policies }),
    }
}

/// Step 6: whether the request waits for a human's approval. Direct calls skip it: the human
/// acts for themselves.
pub(crate) fn approval_step(
    permitted: Permitted,
    mode: Mode,
    attached: Option<Approval>,
    trail: &mut Trail,
) -> ApprovalState {
    match permitted {
        Permitted::ApprovalRequired { .. } if mode == Mode::Direct => ApprovalState::NotNeeded,
        Permitted::ApprovalRequired { policies } => ApprovalState::Needed { policies },
        Permitted::Allow { policies } => {
            trail.known.policies = Some(policies);
            match attached {
                Some(approval) => ApprovalState::Attached(Box::new(approval)),
                None => ApprovalState::NotNeeded,
            }
        }
    }
}

// ---- Between steps 6 and 7: the request body, and the approval it binds -------------------------

/// The agent's body as the request sends it on, checked before step 7: a body declared larger
/// than `[limits] gateway_body_bytes` is refused at once; a form body may name another method
/// (`_method`), so it is read whole (within the limit) and checked; a body an approval binds is
/// read whole and hashed ([`Decided::bind_body`]). Other bodies stream, cut off at the limit.
pub(crate) async fn request_body(
    state: &AppState,
    decided: &Decided<'_>,
    parts: &Parts,
    body: Body,
    trail: &mut Trail,
    request_id: &str,
) -> ApiResult<Body> {
    let body_limit = state.config.limits.gateway_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > body_limit as u64) {
        return Err(ApiError::TooLarge(body_limit));
    }
    let form = if body.is_end_stream() {
        FormBody::Other
    } else {
        form_body(&parts.method, &parts.headers)?
    };
    // The agent's body, its errors told apart from the upstream's when sending fails.
    let body = Body::new(body.map_err(ClientBodyError));
    let body = match decided.approval {
        ApprovalState::NotNeeded if form == FormBody::Other => {
            // A body without a length is cut off at the limit while it streams.
            Body::new(http_body_util::Limited::new(body, body_limit))
        }
        ApprovalState::NotNeeded => {
            let bytes = axum::body::to_bytes(body, body_limit)
                .await
                .map_err(|e| crate::extract::body_error(&e, body_limit))?;
            refuse_method_field(form, &bytes)?;
            Body::from(bytes)
        }
        ApprovalState::Needed { .. } | ApprovalState::Attached(_) => {
            let query = parts.uri.query();
            let bytes = decided
                .bind_body(
                    state,
                    body,
                    form,
                    query,
                    &parts.headers,
                    trail,
                    GATEWAY_EVENT,
                    request_id,
                )
                .await?;
            Body::from(bytes)
        }
    };
    Ok(body)
}

/// Largest request body of an action that needs an approval: the body is read whole and its
/// SHA-256 bound to the approval. Other requests stream.
pub const APPROVAL_BODY_LIMIT: usize = 1024 * 1024;

pub(crate) async fn hash_body(body: Body) -> ApiResult<(axum::body::Bytes, String)> {
    use sha2::Digest as _;
    let bytes = axum::body::to_bytes(body, APPROVAL_BODY_LIMIT)
        .await
        .map_err(|e| crate::extract::body_error(&e, APPROVAL_BODY_LIMIT))?;
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    Ok((bytes, digest))
}

impl Decided<'_> {
    /// Step 6 for a request whose approval is needed or attached, which binds its body: reads
    /// the body whole and hashes it. Needed: stores the pending approval and returns the
    /// refusal to answer with. Attached: checks the approval was given for this body and
    /// returns the body to forward.
    #[expect(
        clippy::too_many_arguments,
        reason = "the request's parts an approval binds, and where to record it"
    )]
    pub async fn bind_body(
        &self,
        state: &AppState,
        body: Body,
        form: FormBody,
        query: Option<&str>,
        headers: &HeaderMap,
        trail: &mut Trail,
        kind: &str,
        request_id: &str,
    ) -> ApiResult<axum::body::Bytes> {
        let (bytes, digest) = hash_body(body).await?;
        refuse_method_field(form, &bytes)?;
        match &self.approval {
            ApprovalState::NotNeeded => Ok(bytes),
            ApprovalState::Needed { policies } => {
                let asked = Asked {
                    query,
                    headers: BoundHeaders::of(headers),
                    body: &bytes,
                    body_sha256: digest,
                    policies,
                };
                Err(ask_approval(state, self, asked, trail, kind, request_id).await)
            }
            ApprovalState::Attached(approval) => {
                if approval.body_sha256 != digest || approval.body_size != bytes.len() as i64 {
                    return Err(ApiError::ApprovalMismatch(format!(
                        "approval {} was given for another request body",
                        approval.id
                    )));
                }
                let sent = BoundHeaders::of(headers);
                if sent.sha256 != approval.headers_sha256 {
                    return Err(ApiError::ApprovalMismatch(format!(
                        "approval {} was given for other request headers",
                        approval.id
                    )));
                }
                Ok(bytes)
            }
        }
    }
}

/// The request an approval is asked for: what [`Decided`] does not hold.
pub(crate) struct Asked<'r> {
    pub(crate) query: Option<&'r str>,
    /// The request headers it binds ([`BoundHeaders::of`]).
    pub(crate) headers: BoundHeaders,
    pub(crate) body: &'r [u8],
    pub(crate) body_sha256: String,
    /// The policies that require the approval.
    pub(crate) policies: &'r [String],
}

/// What an approval's sealed body is bound to: it opens only as that approval's.
pub(crate) fn preview_context(approval_id: &str) -> Vec<u8> {
    format!("leash approval preview {approval_id}").into_bytes()
}

/// Creates the approval request for a decided request that needs one, and returns the refusal
/// to answer with. The proof's `jti` is claimed, the pending approval stored and the refusal
/// audited in one commit: a replay of the refused request cannot pile up approval requests,
/// and no approval is stored without its event.
pub(crate) async fn ask_approval(
    state: &AppState,
    decided: &Decided<'_>,
    asked: Asked<'_>,
    trail: &mut Trail,
    kind: &str,
    request_id: &str,
) -> ApiError {
    let principal = &decided.principal;
    let Some(grant) = principal.grant.as_ref() else {
        return ApiError::Forbidden("only delegated requests wait for approval".into());
    };
    let now = state.clock.now();
    let id = random_id("apr_");
    // The human sees the body they approve, if it is small and not encoded (API §7).
    let encoded = asked
        .headers
        .shown
        .iter()
        .any(|(name, _)| name == "content-encoding");
    let preview = match (!encoded && asked.body.len() <= state.config.approval_preview_bytes)
        .then(|| state.master.seal(asked.body, &preview_context(&id)))
        .transpose()
    {
        Ok(preview) => preview,
        Err(refused) => return refused,
    };
    let approval = Approval {
        id,
        grant_id: grant.id.clone(),
        subject: principal.subject.clone(),
        agent: principal.actor.clone(),
        action: decided.action.clone(),
        upstream: decided.upstream.name.clone(),
        method: decided.method.clone(),
        path: decided.path.clone(),
        query: asked.query.map(str::to_owned),
        body_sha256: asked.body_sha256,
        body_size: asked.body.len() as i64,
        headers: asked.headers.shown,
        headers_sha256: asked.headers.sha256,
        previewed: preview.is_some(),
        status: ApprovalStatus::Pending,
        requested_at: now,
        expires_at: (now + state.config.approval_ttl).min(grant.expires_at),
        decided_at: None,
        approver: None,
    };
    let refusal = ApiError::ApprovalRequired {
        policies: asked.policies.to_vec(),
        approval: Some(approval.id.clone()),
    };
    let event = trail.event(kind, now, request_id, Outcome::Deny, None);
    let request = RequestUse {
        once: principal.proof_once.into_iter().collect(),
        // A token that used its single use of the action is refused before a human is asked;
        // asking consumes nothing: the approved retry does.
        single_use: decided.single_use(false),
        // A token revoked while it asked stores no approval another token could use.
        token: principal.token.as_ref().map(|token| token.jti.clone()),
        now,
        pending_approval: Some(Box::new(approval.clone())),
        pending_preview: preview,
        max_pending_approvals: Some(state.config.max_pending_approvals),
        audit: Some(crate::audit::as_refusal(event, &refusal)),
        ..RequestUse::default()
    };
    let verdict = match state.store.record_use(request).await {
        Ok(verdict) => verdict,
        Err(e) => {
            tracing::error!(error = %e, "approval request commit failed: nothing is stored");
            return ApiError::AuditUnavailable;
        }
    };
    trail.recorded = true;
    if let Err(refused) = verdict_result(verdict) {
        return refused;
    }
    state.notifier.send(serde_json::json!({
        "type": "approval.requested",
        "approval": crate::approvals::ApprovalView::of(&approval, Some(&grant.purpose), now),
    }));
    tracing::info!(approval = %approval.id, grant = %grant.id, action = %approval.action, "approval requested");
    refusal
}

// ---- Step 7: the commit -------------------------------------------------------------------------

/// How long a token's single use of an action is remembered after the token expired.
const SINGLE_USE_KEPT_PAST_EXPIRY: i64 = 60;

impl Decided<'_> {
    /// Step 7: claims the proof's `jti` and the token's single use of a `single_use` action,
    /// counts the request against its grant's budget and appends its audit event, atomically
    /// and durably, before anything is forwarded. A replayed proof, a single use used before,
    /// or a token revoked or a grant that ended or ran out since step 2 is refused here (and
    /// audited as refused in the same transaction); a failed write is `audit_unavailable`.
    pub async fn commit(
        &self,
        state: &AppState,
        trail: &mut Trail,
        kind: &str,
        request_id: &str,
    ) -> ApiResult<Injected> {
        let principal = &self.principal;
        let approval = match &self.approval {
            ApprovalState::NotNeeded => None,
            ApprovalState::Attached(approval) => Some(approval.id.clone()),
            ApprovalState::Needed { policies } => {
                return Err(ApiError::ApprovalRequired {
                    policies: policies.clone(),
                    approval: None,
                });
            }
        };
        // The credential before the commit: one that cannot be had (an OAuth connection whose
        // refresh failed) refuses the request before it spends anything of the grant, and the
        // refusal is what the audit says.
        let injected = self.upstream_headers(state, request_id).await?;
        let now = state.clock.now();
        let request = RequestUse {
            once: principal.proof_once.into_iter().collect(),
            single_use: self.single_use(true),
            token: principal.token.as_ref().map(|token| token.jti.clone()),
            grant: principal.grant.as_ref().map(|g| g.id.clone()),
            exchanged_grant: None,
            now,
            approval,
            pending_approval: None,
            pending_preview: None,
            max_pending_approvals: None,
            audit: Some(trail.event(kind, now, request_id, Outcome::Allow, None)),
        };
        let verdict = state.store.record_use(request).await.map_err(|e| {
            tracing::error!(error = %e, "request commit failed: nothing is forwarded");
            ApiError::AuditUnavailable
        })?;
        trail.recorded = true;
        verdict_result(verdict)?;
        trail.allowed = true;
        Ok(injected)
    }

    /// The token's single use of the action, if the grant makes it `single_use` (API §2): one
    /// per token and action, kept past the token's expiry (a request checked just before it
    /// may commit just after). `spend`: whether a recorded use consumes it.
    fn single_use(&self, spend: bool) -> Option<SingleUse> {
        let principal = &self.principal;
        let (Some(grant), Some(token)) = (&principal.grant, &principal.token) else {
            return None;
        };
        grant.single_use.contains(&self.action).then(|| SingleUse {
            value: OneTimeUse {
                kind: OneTimeKind::SingleUse,
                key: replay_key("single_use", &token.jti, &self.action),
                keep_until: token.exp.saturating_add(SINGLE_USE_KEPT_PAST_EXPIRY),
            },
            spend,
        })
    }
}

// ---- Step 8: forward ----------------------------------------------------------------------------

/// The audit reason of an answer refused or cut off because it carried the credential Leash
/// injected ([`crate::reflection`]).
pub const CREDENTIAL_REFLECTED: &str = "credential_reflected";

/// The audit reason of a request whose body failed (malformed, over the limit, stalled) after
/// it was committed and while it streamed to the upstream.
pub const REQUEST_CUT_OFF: &str = "request_cut_off";

/// The headers the upstream gets from Leash for one request (see [`Decided::upstream_headers`]).
pub type Injected = Vec<(HeaderName, HeaderValue)>;

/// What [`forward`] sends of the agent's request.
pub(crate) struct Forwarded<'r> {
    /// The path after the upstream's URL.
    pub(crate) path: &'r str,
    pub(crate) query: Option<&'r str>,
    pub(crate) method: &'r Method,
    pub(crate) headers: &'r HeaderMap,
    pub(crate) body: Body,
    /// The request's trail, for the event recorded if the answer carries the injected
    /// credential.
    pub(crate) trail: &'r Trail,
    /// How long the answer may pause between two parts (`None`: `upstream_timeout`).
    pub(crate) answer_idle: Option<std::time::Duration>,
    /// What Leash adds: the credential and the attribution headers, had before the commit.
    pub(crate) injected: Injected,
    /// What differs for a request from the forward proxy (`None`: the gateway's or MCP's).
    pub(crate) proxied: Option<ProxyForward<'r>>,
}

/// What the forward proxy asks of [`forward`] beyond the gateway's step 8.
pub(crate) struct ProxyForward<'r> {
    /// The credentials an answer must not echo: the vaulted credential and every cookie of
    /// the grant's jar, not only the injected header as a whole.
    pub(crate) guarded: Vec<&'r [u8]>,
    /// The browser asked for a WebSocket on a route that allows one: the upstream is asked to
    /// switch protocols too, and its `101` is passed on with [`UpstreamSocket`].
    pub(crate) websocket: bool,
}

/// The upstream's `Set-Cookie` values, which never reach the caller: kept in the answer's
/// extensions (never sent) for the forward proxy's cookie jar.
#[derive(Clone)]
pub(crate) struct SetCookies(pub(crate) Vec<HeaderValue>);

/// An upstream's side of a WebSocket it switched to (`101`), in the answer's extensions: its
/// connection once upgraded, and what its messages must not echo.
#[derive(Clone)]
pub(crate) struct UpstreamSocket {
    pub(crate) upgrade: hyper::upgrade::OnUpgrade,
    pub(crate) secrets: Secrets,
}

/// The extensions of a WebSocket handshake: asking for one lets the upstream compress its
/// messages, past the check for an echoed credential, so none is asked for or accepted.
const WEBSOCKET_EXTENSIONS: &str = "sec-websocket-extensions";

/// Why a committed request was not forwarded.
pub(crate) enum NotForwarded {
    /// The agent's body failed while it streamed to the upstream: the client's error, after
    /// the request's allow event was committed.
    CutOff(ApiError),
    /// Anything else (the vault, the upstream).
    Failed(ApiError),
}

pub(crate) async fn forward(
    state: &Arc<AppState>,
    decided: &Decided<'_>,
    sent: Forwarded<'_>,
    request_id: &str,
) -> Result<Response, NotForwarded> {
    let Forwarded {
        path,
        query,
        method,
        headers,
        body,
        trail,
        answer_idle,
        injected,
        proxied,
    } = sent;
    let websocket = proxied.as_ref().is_some_and(|p| p.websocket);
    let guarded = proxied.as_ref().map(|p| &p.guarded);
    // Made only for an answer Leash guards (a credential was injected), when it is guarded.
    let reflected = || {
        trail.event(
            GATEWAY_EVENT,
            state.clock.now(),
            request_id,
            Outcome::Deny,
            Some(CREDENTIAL_REFLECTED.into()),
        )
    };
    let (upstream, principal) = (decided.upstream, &decided.principal);
    let mut target = format!("{}{path}", upstream.url.as_str().trim_end_matches('/'));
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    let mut out = HeaderMap::new();
    for (name, value) in forwarded_request_headers(headers) {
        out.append(name.clone(), value.clone());
    }
    let mut secrets = match &guarded {
        Some(values) if !values.is_empty() => state.reflection_guards.of_all(values),
        _ => Secrets::default(),
    };
    for (name, value) in injected {
        if guarded.is_none() && !name.as_str().starts_with("leash-") {
            secrets = if upstream.delegation_audience.is_some() {
                // A token minted for this request only: caching its automaton would only push
                // the vaulted credentials' out.
                Secrets::of(value.as_bytes())
            } else {
                state.reflection_guards.of(value.as_bytes())
            };
        }
        out.insert(name, value);
    }
    if websocket {
        out.remove(WEBSOCKET_EXTENSIONS);
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if !secrets.is_empty() {
        // An answer is only checked for the credential as it is sent: a compressed echo would
        // carry it past the check, so none is asked for (and none accepted, below).
        out.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    let mut request = axum::http::Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = target.parse().map_err(|_| {
        NotForwarded::Failed(ApiError::InvalidRequest(
            "the request target cannot be forwarded".into(),
        ))
    })?;
    *request.headers_mut() = out;
    let limits = &state.config.limits;
    let response = tokio::time::timeout(
        limits.upstream_timeout,
        state.upstream_clients.of(upstream).request(request),
    )
    .await
    .map_err(|_| {
        tracing::warn!(request_id = %request_id, upstream = %upstream.name, "upstream did not answer in time");
        NotForwarded::Failed(ApiError::GatewayTimeout(format!(
            "upstream {} did not answer within {} s",
            upstream.name,
            limits.upstream_timeout.as_secs()
        )))
    })?
    .map_err(|e| {
        // Sending failed because of the agent's body (malformed, over the limit, stalled):
        // the client's error, not the upstream's.
        if let Some(refusal) = client_body_failure(&e, limits.gateway_body_bytes) {
            tracing::info!(request_id = %request_id, error = %e, "request body failed while forwarded");
            return NotForwarded::CutOff(refusal);
        }
        tracing::warn!(request_id = %request_id, upstream = %upstream.name, error = %e, "upstream unreachable");
        NotForwarded::Failed(ApiError::BadGateway(format!(
            "upstream {} did not answer",
            upstream.name
        )))
    })?;
    let (mut upstream_parts, upstream_body) = response.into_parts();
    let status = upstream_parts.status;
    if websocket && status == StatusCode::SWITCHING_PROTOCOLS {
        let key = headers.get("sec-websocket-key").map(HeaderValue::as_bytes);
        let socket =
            switched(upstream, &mut upstream_parts, key, secrets, request_id).map_err(|e| {
                if matches!(e, ApiError::CredentialReflected) {
                    record_reflection(state.clone(), reflected());
                }
                NotForwarded::Failed(e)
            })?;
        let mut relayed = Response::new(Body::empty());
        *relayed.status_mut() = status;
        *relayed.headers_mut() = socket.0;
        relayed.extensions_mut().insert(socket.1);
        keep_set_cookies(&upstream_parts.headers, &mut relayed);
        tracing::info!(request_id = %request_id, upstream = %upstream.name, actor = %principal.actor, "WebSocket opened");
        return Ok(relayed);
    }
    if status.is_informational() {
        // Nothing was upgraded for the agent; an unasked-for 101 would leave its connection to
        // the upstream's protocol.
        return Err(NotForwarded::Failed(ApiError::BadGateway(format!(
            "upstream {} answered {status}, which the gateway does not pass on",
            upstream.name
        ))));
    }
    let encoded = upstream_parts
        .headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if encoded && !secrets.is_empty() {
        tracing::warn!(request_id = %request_id, upstream = %upstream.name, "an encoded answer to a request carrying an injected credential refused");
        return Err(NotForwarded::Failed(ApiError::BadGateway(format!(
            "upstream {} answered with a Content-Encoding though the gateway asked for none; an encoded answer cannot be checked for the credential Leash injected",
            upstream.name
        ))));
    }
    // Between two parts of its answer the upstream has as long as it had to start it (nginx's
    // `proxy_read_timeout`): a stalled answer is cut off instead of holding the agent's
    // connection, and the upstream's, for as long as the upstream does.
    let stalled = request_id.to_owned();
    let upstream_body = TimeoutBody::new(
        answer_idle.unwrap_or(limits.upstream_timeout),
        upstream_body,
    )
    .map_err(move |e| {
        tracing::warn!(request_id = %stalled, error = %e, "upstream answer cut off");
        e
    });
    let kept = relayed_response_headers(&upstream_parts.headers);
    let body = if secrets.is_empty() {
        Body::new(upstream_body)
    } else {
        if secrets.found_in_headers(&kept) {
            tracing::warn!(request_id = %request_id, upstream = %upstream.name, "the upstream's answer headers carry the injected credential; refused");
            record_reflection(state.clone(), reflected());
            return Err(NotForwarded::Failed(ApiError::CredentialReflected));
        }
        let (state, reported, event) = (state.clone(), request_id.to_owned(), reflected());
        Body::new(GuardedBody::new(
            Box::pin(upstream_body),
            secrets,
            move || {
                tracing::warn!(request_id = %reported, "the upstream's answer body carries the injected credential; cut off");
                record_reflection(state, event);
            },
        ))
    };
    let mut relayed = Response::new(body);
    *relayed.status_mut() = status;
    *relayed.headers_mut() = kept;
    if proxied.is_some() {
        keep_set_cookies(&upstream_parts.headers, &mut relayed);
    }
    tracing::info!(
        request_id = %request_id,
        upstream = %upstream.name,
        actor = %principal.actor,
        status = status.as_u16(),
        "forwarded"
    );
    Ok(relayed)
}

/// The upstream's `Set-Cookie` values, in `relayed`'s extensions for the proxy's jar.
fn keep_set_cookies(upstream: &HeaderMap, relayed: &mut Response) {
    let mut set_cookies = upstream.get_all(header::SET_COOKIE).iter();
    if let Some(first) = set_cookies.next() {
        let all = std::iter::once(first).chain(set_cookies).cloned().collect();
        relayed.extensions_mut().insert(SetCookies(all));
    }
}

/// An upstream's `101` to a WebSocket handshake: the headers the browser gets (the
/// upstream's, hop-by-hop and `Set-Cookie` dropped, `Upgrade` and `Connection` set again) and
/// the upstream's socket. Refused: an answer switching to anything but `websocket`, one whose
/// `Sec-WebSocket-Accept` does not answer the browser's key (RFC 6455 §4.1), one that names an
/// extension (none was offered: a compressed message would hide an echoed credential),
/// and one whose headers echo a credential.
fn switched(
    upstream: &Upstream,
    parts: &mut axum::http::response::Parts,
    key: Option<&[u8]>,
    secrets: Secrets,
    request_id: &str,
) -> ApiResult<(HeaderMap, UpstreamSocket)> {
    let refused = |why: &str| {
        tracing::warn!(request_id = %request_id, upstream = %upstream.name, "{why}");
        ApiError::BadGateway(format!("upstream {}: {why}", upstream.name))
    };
    let to_websocket = parts
        .headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    if !to_websocket {
        return Err(refused(
            "switched protocols to something other than WebSocket",
        ));
    }
    let accept = key.map(tokio_tungstenite::tungstenite::handshake::derive_accept_key);
    let accepted = parts
        .headers
        .get("sec-websocket-accept")
        .is_some_and(|v| accept.is_some_and(|a| v.as_bytes() == a.as_bytes()));
    if !accepted {
        return Err(refused(
            "switched to WebSocket without accepting the browser's key",
        ));
    }
    if parts.headers.contains_key(WEBSOCKET_EXTENSIONS) {
        return Err(refused(
            "accepted a WebSocket extension that was not offered",
        ));
    }
    let upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| refused("switched protocols on a connection that cannot be upgraded"))?;
    let mut kept = relayed_response_headers(&parts.headers);
    if !secrets.is_empty() && secrets.found_in_headers(&kept) {
        tracing::warn!(request_id = %request_id, upstream = %upstream.name, "the upstream's switch to WebSocket carries the injected credential; refused");
        return Err(ApiError::CredentialReflected);
    }
    kept.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    kept.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    Ok((kept, UpstreamSocket { upgrade, secrets }))
}

impl Decided<'_> {
    /// The headers the upstream gets from Leash: the human's vaulted credential (if any) and
    /// the attribution headers.
    pub async fn upstream_headers(
        &self,
        state: &AppState,
        request_id: &str,
    ) -> ApiResult<Vec<(HeaderName, HeaderValue)>> {
        let principal = &self.principal;
        let mut out = Vec::new();
        if let Some(audience) = &self.upstream.delegation_audience {
            out.push((
                header::AUTHORIZATION,
                self.delegation_token(state, audience),
            ));
        } else if let Some(injection) =
            crate::vault::injection(state, &principal.subject, &self.upstream.name).await?
        {
            out.push((injection.name, injection.value));
        }
        let grant = principal.grant.as_ref().map(|g| g.id.as_str());
        let attribution = [
            ("leash-subject", Some(principal.subject.as_str())),
            ("leash-actor", Some(principal.actor.as_str())),
            ("leash-grant", grant),
            ("leash-request-id", Some(request_id)),
        ];
        for (name, value) in attribution {
            if let Some(Ok(value)) = value.map(HeaderValue::from_str) {
                out.push((HeaderName::from_static(name), value));
            }
        }
        Ok(out)
    }
}

/// How long a delegation token lives (API §17: at most 60 s).
pub const DELEGATION_TOKEN_TTL: i64 = 60;

impl Decided<'_> {
    /// `Bearer <delegation token>` for this request (API §17): signed with the delegation key
    /// for the upstream's `audience`, naming the human (`sub`), the agent (`act.sub`,
    /// `client_id`), the grant and the one action, for [`DELEGATION_TOKEN_TTL`] seconds. No
    /// `cnf`: it is the upstream's bearer token, bound to this audience, not the agent's key.
    fn delegation_token(&self, state: &AppState, audience: &str) -> HeaderValue {
        let principal = &self.principal;
        let delegated = principal
            .grant
            .as_ref()
            .map(|grant| (principal.actor.as_str(), grant.id.as_str()));
        delegation_token(state, audience, &principal.subject, delegated, &self.action)
    }
}

/// `Authorization: Bearer <delegation token>` (API §17) for one request of `subject` under
/// `action`, made by the agent of `delegated` (actor, grant id) or by the human directly.
pub(crate) fn delegation_token(
    state: &AppState,
    audience: &str,
    subject: &str,
    delegated: Option<(&str, &str)>,
    action: &str,
) -> HeaderValue {
    let now = state.clock.now();
    let mut claims = serde_json::json!({
        "iss": state.issuer,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "exp": now.saturating_add(DELEGATION_TOKEN_TTL),
        "jti": leash_core::secret::random_id("dlg_"),
        "scope": action,
    });
    if let Some((actor, grant_id)) = delegated {
        claims["grant_id"] = serde_json::json!(grant_id);
        claims["client_id"] = serde_json::json!(actor);
        claims["act"] = serde_json::json!({"sub": actor});
    }
    let token = state.delegation.sign_at_jwt(&claims);
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    value.set_sensitive(true);
    value
}

/// The request headers an approval binds and shows the human (API §7): those the gateway
/// forwards (so not `Authorization`, `DPoP`, `Leash-Approval`, cookies or hop-by-hop ones),
/// but for per-request tracing ids a proxy in front sets anew on every request (an Envoy
/// `x-request-id` would make every approved retry a mismatch), see [`is_tracing_id`].
pub(crate) struct BoundHeaders {
    /// `(name, value)` in order, values lossily as UTF-8, for the human.
    pub(crate) shown: Vec<(String, String)>,
    /// Hex SHA-256 of the exact names and values, for the match.
    pub(crate) sha256: String,
}

impl BoundHeaders {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        use sha2::Digest as _;
        let mut bound: Vec<(&HeaderName, &HeaderValue)> = forwarded_request_headers(headers)
            .filter(|(name, value)| !is_tracing_id(name, value))
            .collect();
        // The order of different fields carries no meaning (RFC 9110 §5.3), that of one
        // field's lines does: a stable sort by name keeps the latter.
        bound.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut digest = sha2::Sha256::new();
        for (name, value) in &bound {
            // Length-prefixed, so that no two different lists hash alike.
            for part in [name.as_str().as_bytes(), value.as_bytes()] {
                digest.update((part.len() as u64).to_be_bytes());
                digest.update(part);
            }
        }
        Self {
            shown: bound
                .into_iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            sha256: hex::encode(digest.finalize()),
        }
    }
}

/// A per-request tracing id (Envoy's `x-request-id`, W3C `traceparent`, B3's ids), forwarded
/// but not bound: only when its value has the id's exact shape, so that none can carry anything
/// else the human did not see (any other value is bound like any header).
fn is_tracing_id(name: &HeaderName, value: &HeaderValue) -> bool {
    let value = value.as_bytes();
    let hex = |v: &[u8], lens: &[usize]| {
        lens.contains(&v.len())
            && v.iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    match name.as_str() {
        "x-request-id" => {
            (1..=128).contains(&value.len())
                && value
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        }
        // version-traceid-parentid-flags (W3C Trace Context §3.2).
        "traceparent" => {
            let parts: Vec<&[u8]> = value.split(|b| *b == b'-').collect();
            matches!(parts.as_slice(), [v, t, p, f]
                if hex(v, &[2]) && hex(t, &[32]) && hex(p, &[16]) && hex(f, &[2]))
        }
        "x-b3-traceid" => hex(value, &[16, 32]),
        "x-b3-spanid" | "x-b3-parentspanid" => hex(value, &[16]),
        "x-b3-sampled" => matches!(value, b"0" | b"1" | b"d"),
        "x-b3-flags" => value == b"1",
        _ => false,
    }
}

/// The caller's headers the gateway forwards: all but those [`is_stripped_request_header`]
/// names and those `Connection` lists.
fn forwarded_request_headers(
    headers: &HeaderMap,
) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let listed = connection_listed(headers);
    headers.iter().filter(move |(name, _)| {
        !is_stripped_request_header(name) && !listed.iter().any(|l| l == name.as_str())
    })
}

/// Headers of the caller that never reach an upstream, besides those `Connection` lists: the
/// one list of them, with [`crate::overrides::is_override_header`].
fn is_stripped_request_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "authorization"
            | "dpop"
            | "cookie"
            | "host"
            | "forwarded"
            | "proxy-authorization"
            | "proxy-connection"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || n.starts_with("leash-")
        || n.starts_with("x-forwarded-")
        || crate::overrides::is_override_header(name)
}

/// The upstream's answer headers that are passed on: all but the hop-by-hop ones (and those
/// `Connection` lists), `Set-Cookie` and `Leash-Decision`.
fn relayed_response_headers(headers: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if !is_stripped_response_header(name) && !listed.iter().any(|l| l == name.as_str()) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

fn is_stripped_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        crate::error::LEASH_DECISION
            | "set-cookie"
            | "set-cookie2"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Names listed in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
pub(crate) fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// An error of the agent's request body (bad chunking, a connection that closed midway, a
/// stall): the client's, never the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("the request body could not be read: {0}")]
struct ClientBodyError(#[source] axum::Error);

/// The answer to a request whose body failed while it was sent upstream (`error` or one of its
/// causes), if it did ([`crate::extract::body_error`]); `None`: the upstream failed.
fn client_body_failure(
    error: &(dyn std::error::Error + 'static),
    limit: usize,
) -> Option<ApiError> {
    let the_body = caused_by::<ClientBodyError>(error)
        || caused_by::<http_body_util::LengthLimitError>(error)
        || caused_by::<crate::listener::BodyStalled>(error);
    the_body.then(|| crate::extract::body_error(error, limit))
}

/// Records that an answer was refused or cut off for carrying the injected credential. The
/// request's allow event is committed already; this one says what the agent did not get.
fn record_reflection(state: Arc<AppState>, event: leash_core::audit::AuditEvent) {
    tokio::spawn(async move {
        if crate::audit::record(&state, event).await.is_err() {
            tracing::error!("a reflected credential's refusal is not in the audit trail");
        }
    });
}

// ---- A refusal at any step ----------------------------------------------------------------------

/// The source address a request's refusal counts against (`[limits] unauthenticated_rate`).
pub(crate) fn source_of(state: &AppState, request: &Request) -> Option<std::net::IpAddr> {
    crate::limits::source_address(
        request.extensions().get(),
        request.headers(),
        &state.config.trusted_proxies,
    )
}

/// Answers a refused gateway or authorize request and audits it — unless nobody could be
/// identified for it and its source is over `[limits] unauthenticated_rate`: then it is
/// answered 429 and counted in the minutely summary instead (API §6), so garbage cannot flood
/// the audit log. A refusal naming a caller (even a dead token's) is always audited.
pub(crate) async fn refuse(
    state: &AppState,
    trail: &Trail,
    kind: &str,
    request_id: &str,
    source: Option<std::net::IpAddr>,
    error: ApiError,
) -> Response {
    let identified = trail.known.actor.is_some() || trail.known.subject.is_some();
    if !trail.recorded && !identified && !state.unauthenticated.admit(source) {
        tracing::debug!(request_id = %request_id, error = %error, "unidentified refusal over the rate");
        return ApiError::RateLimited {
            retry_after_secs: 1,
        }
        .into_response();
    }
    tracing::info!(request_id = %request_id, error = %error, "{kind} refused");
    audit_refusal(state, trail, kind, request_id, &error).await;
    error.into_response()
}

/// Records a refused request, unless its commit recorded it already.
async fn audit_refusal(
    state: &AppState,
    trail: &Trail,
    kind: &str,
    request_id: &str,
    error: &ApiError,
) {
    if !trail.recorded {
        let event = trail.event(kind, state.clock.now(), request_id, Outcome::Deny, None);
        crate::audit::record_refusal(state, event, error).await;
    }
}

/// A request refused at steps 2–3 (dead grant, bad or missing proof, Bearer downgrade) still
/// carried a token Leash signed: its claims are authentic, so the refusal is recorded against
/// the human, agent and grant the token names — who held a stolen token, or kept calling after
/// the task ended, is what an investigator asks first. Only a token whose signature and expiry
/// check out is used; verification is the cached in-memory one.
pub(crate) fn attribute_refused_token(state: &AppState, headers: &HeaderMap, trail: &mut Trail) {
    let Ok(Some((_, token))) = crate::extract::authorization(headers) else {
        return;
    };
    let token = crate::extract::PresentedToken::new(token);
    if let Ok(claims) = crate::extract::verified_token(state, &token, state.clock.now()) {
        trail.known.subject = Some(claims.sub.clone());
        trail.known.actor = Some(claims.client_id.clone());
        trail.known.grant_id = Some(claims.grant_id.clone());
        trail.known.purpose = Some(claims.purpose.clone());
    }
}
