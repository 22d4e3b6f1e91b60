//! Leash's policy-as-code with Cedar: the schema of Leash's entities and request context, a
//! small built-in default policy set, operator policies from a directory (validated against the
//! schema), and [`PolicyEngine::authorize`], which turns a request into a [`Decision`] and fails
//! closed on any evaluation error.
//!
//! # MCP tool calls: `context.tool` and `context.arguments`
//!
//! For an MCP `tools/call` ([`Facts::mcp`]), the context also holds `tool` (the tool's name, a
//! String) and `arguments` (its arguments as a Cedar record); for any other request both are
//! absent, so policies test `context has tool`. An operator writes, for example:
//!
//! ```cedar
//! forbid (principal, action == Leash::Action::"crm:pay", resource)
//!   when { context has arguments && context.arguments has amount && context.arguments.amount > 1000 };
//! ```
//!
//! Argument names are the MCP server's and unknown to Leash, yet policies are validated strictly.
//! Cedar 4 has open records (`additionalAttributes`) only behind its experimental
//! `partial-validate` feature, which also weakens the validation of every other policy; per-action
//! context types would need every tool's argument names and types declared in the config. So the
//! schema declares `arguments?: {}`, an empty record: strict validation still checks everything
//! else and refuses an unguarded `context.arguments.amount`, while behind
//! `context.arguments has amount` (which the validator types as false, warning that the policy is
//! "impossible", not an error) the access is left to evaluation. There a missing member or a type
//! mistake (`context.arguments.amount like "1*"` on a number) is an evaluation error, and every
//! evaluation error denies. Requests are not checked against the schema at evaluation, so the
//! record holds the call's real members.
//!
//! JSON maps to Cedar as: string → String, boolean → Bool, integer within i64 → Long, object →
//! Record (any member name, `context.arguments["odd name"]`), array → Set. Cedar sets are
//! unordered and hold each value once: `[2, 1, 1]` and `[1, 2]` look the same to policy. No
//! Cedar expression can index a set or count its members, so no policy can tell them apart,
//! and the approval of a call is bound to the exact arguments anyway (`leash_core::mcp::call_digest`).
//! A value Cedar cannot represent exactly (null, a number that is not an integer within i64,
//! including `1.0` and `1e3`, or nesting deeper than [`MAX_ARGUMENT_DEPTH`]) denies the whole call
//! with a reason naming its path (API §14: never dropped), whether or not a loaded policy reads
//! `arguments`: the contract says such a call is denied, and denying fails closed.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};

/// The built-in policy: permit what the grant and scope checks already allowed. Operator
/// policies narrow it with `forbid`s. The approval of high-risk actions is enforced by
/// [`PolicyEngine::authorize`] after the policy set allowed, unless a permit annotated
/// `@approval("not_required")` matches the request.
pub const DEFAULT_POLICIES: &str = r#"
@id("leash:permit-within-grant")
permit(principal, action, resource);
"#;

/// Annotation an operator puts on a `permit` to waive the approval of high-risk actions it
/// matches: `@approval("not_required")`.
pub const WAIVER_ANNOTATION: &str = "approval";

/// Id reported when a high-risk action waits for approval.
pub const APPROVAL_POLICY_ID: &str = "leash:high-risk-needs-approval";

/// Id reported when an MCP call's arguments hold a value Cedar cannot represent exactly.
pub const ARGUMENTS_POLICY_ID: &str = "leash:arguments-cedar-can-represent";

/// The deepest nesting of arrays and objects in an MCP call's arguments (the arguments object
/// itself counts): what `leash_core::mcp` lets through.
pub const MAX_ARGUMENT_DEPTH: usize = leash_core::mcp::MAX_DEPTH;

/// Why the policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Read {
        /// The file or directory.
        path: String,
        /// The cause.
        message: String,
    },
    /// A file is not valid Cedar.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A policy does not validate against Leash's schema.
    #[error("policy {id} does not validate against the Leash schema: {message}")]
    Invalid {
        /// The policy's id.
        id: String,
        /// The validator's message.
        message: String,
    },
    /// Internal schema construction failed (a bug or an unusable action name).
    #[error("schema: {0}")]
    Schema(String),
}

/// Who makes the request: [`Mode::Delegated`] (an agent; the principal is a `Leash::Agent`) or
/// [`Mode::Direct`] (the human; a `Leash::Human`). The audit log records the same value; no
/// request to an upstream is made in [`Mode::System`], which policy denies.
pub use leash_core::audit::Mode;

/// Everything policy may look at, built natively per request.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// Delegated or direct.
    pub mode: Mode,
    /// The agent id (delegated) or the human id (direct).
    pub principal: &'a str,
    /// The human.
    pub human: &'a str,
    /// The action, `app:verb`.
    pub action: &'a str,
    /// The upstream's name.
    pub upstream: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The request path as forwarded.
    pub path: &'a str,
    /// The grant's id (empty in direct mode).
    pub grant_id: &'a str,
    /// The grant's purpose (empty in direct mode).
    pub purpose: &'a str,
    /// The grant's actions.
    pub grant_actions: &'a [String],
    /// Seconds since the grant was created.
    pub grant_age_seconds: i64,
    /// Whether the route or the action's name marks it high risk.
    pub high_risk: bool,
    /// Whether the grant lists the action as needing approval.
    pub grant_requires_approval: bool,
    /// Whether a matching approval is attached.
    pub approval_attached: bool,
    /// Unix time of the decision.
    pub now: i64,
    /// The MCP `tools/call` this request is, if it is one.
    pub mcp: Option<McpCall<'a>>,
}

/// An MCP `tools/call` as policy sees it: `context.tool` and `context.arguments`.
#[derive(Debug, Clone, Copy)]
pub struct McpCall<'a> {
    /// The tool's name.
    pub tool: &'a str,
    /// The call's `arguments` (an object; MCP's default is `{}`).
    pub arguments: &'a serde_json::Value,
}

/// The outcome of policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the policies that permitted it.
    Allow {
        /// Determining policy ids.
        policies: Vec<String>,
    },
    /// Denied by policy (or by an evaluation error: fail closed).
    Deny {
        /// Determining policy ids (empty: no permit matched).
        policies: Vec<String>,
        /// Why, for the error body.
        reason: String,
    },
    /// Allowed by policy, but a human must approve this exact request first.
    ApprovalRequired {
        /// The policy that requires it.
        policies: Vec<String>,
    },
}

/// Verbs that are high risk whatever the route says (API §5).
pub const HIGH_RISK_VERBS: [&str; 6] = [
    "export",
    "delete",
    "share",
    "grant_privilege",
    "create_credential",
    "read_secret",
];

/// Whether an action is high risk by its name alone.
pub fn high_risk_by_name(action: &str) -> bool {
    action
        .split_once(':')
        .is_some_and(|(_, verb)| HIGH_RISK_VERBS.contains(&verb))
}

/// One attribute of the request context policies see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    Mode,
    Human,
    Action,
    App,
    Verb,
    Upstream,
    Method,
    Path,
    GrantId,
    Purpose,
    GrantActions,
    GrantAgeSeconds,
    Risk,
    NeedsApproval,
    ApprovalAttached,
    Hour,
    MinuteOfDay,
    Weekday,
    Tool,
    Arguments,
}

/// The request context: each attribute's name and Cedar type, in the schema's order. Names
/// ending in `?` are optional attributes (present only for MCP calls).
const CONTEXT: [(Attr, &str, &str); 20] = [
    (Attr::Mode, "mode", "String"),
    (Attr::Human, "human", "String"),
    (Attr::Action, "action", "String"),
    (Attr::App, "app", "String"),
    (Attr::Verb, "verb", "String"),
    (Attr::Upstream, "upstream", "String"),
    (Attr::Method, "method", "String"),
    (Attr::Path, "path", "String"),
    (Attr::GrantId, "grant_id", "String"),
    (Attr::Purpose, "purpose", "String"),
    (Attr::GrantActions, "grant_actions", "Set<String>"),
    (Attr::GrantAgeSeconds, "grant_age_seconds", "Long"),
    (Attr::Risk, "risk", "String"),
    (Attr::NeedsApproval, "needs_approval", "Bool"),
    (Attr::ApprovalAttached, "approval_attached", "Bool"),
    (Attr::Hour, "hour", "Long"),
    (Attr::MinuteOfDay, "minute_of_day", "Long"),
    (Attr::Weekday, "weekday", "Long"),
    (Attr::Tool, "tool", "String?"),
    // Declared empty and closed: see the crate docs on MCP tool calls.
    (Attr::Arguments, "arguments", "{}?"),
];

/// The Cedar schema for a set of actions.
pub fn schema_text(actions: &BTreeSet<String>) -> String {
    let mut text = String::from(
        "namespace Leash {
  entity Human;
  entity Agent;
  entity Upstream;
  entity Path in [Upstream];
  type RequestContext = {
",
    );
    for (_, name, cedar_type) in CONTEXT {
        match cedar_type.strip_suffix('?') {
            Some(cedar_type) => text.push_str(&format!("    {name}?: {cedar_type},\n")),
            None => text.push_str(&format!("    {name}: {cedar_type},\n")),
        }
    }
    text.push_str("  };\n");
    for action in actions {
        text.push_str(&format!(
            "  action \"{action}\" appliesTo {{ principal: [Agent, Human], resource: [Path], context: RequestContext }};\n"
        ));
    }
    text.push_str("}\n");
    text
}

/// The context attributes `policies` read. Evaluating a policy reads the context only through
/// `context.name`, `context["name"]` or `context has name`; a policy that uses `context` in any
/// other way (compares it, passes it on) is taken to read every attribute, and so is one that
/// cannot be shown as JSON. Attributes outside the schema never occur: policies validate
/// strictly.
fn context_read_by(policies: &PolicySet) -> Vec<(Attr, &'static str)> {
    let mut names = BTreeSet::new();
    let whole = policies.policies().any(|policy| match policy.to_json() {
        Ok(json) => !context_attributes_in(&json, &mut names),
        Err(_) => true,
    });
    context_attributes(|name| whole || names.contains(name))
}

/// The context's attributes whose names `keep` accepts, in the schema's order.
fn context_attributes(keep: impl Fn(&str) -> bool) -> Vec<(Attr, &'static str)> {
    CONTEXT
        .iter()
        .filter(|(_, name, _)| keep(name))
        .map(|&(attr, name, _)| (attr, name))
        .collect()
}

/// Adds to `names` the attributes that the policy expression `json` (Cedar's JSON policy
/// format) reads from `context`; false if it uses `context` other than through its attributes.
fn context_attributes_in(json: &serde_json::Value, names: &mut BTreeSet<String>) -> bool {
    use serde_json::Value;
    match json {
        Value::Object(map) => {
            if let Some(Value::String(var)) = map.get("Var") {
                return var != "context";
            }
            for (key, value) in map {
                if let (".", Value::Object(access)) | ("has", Value::Object(access)) =
                    (key.as_str(), value)
                {
                    let on_context =
                        access.get("left") == Some(&serde_json::json!({ "Var": "context" }));
                    // `context has a.b` is `{"attr": ["a", "b"]}`: it reads `a`.
                    let first = match access.get("attr") {
                        Some(Value::String(name)) => Some(name.as_str()),
                        Some(Value::Array(path)) => path.first().and_then(Value::as_str),
                        _ => None,
                    };
                    if let (true, Some(name)) = (on_context, first) {
                        names.insert(name.to_owned());
                        continue;
                    }
                }
                if !context_attributes_in(value, names) {
                    return false;
                }
            }
            true
        }
        Value::Array(items) => items.iter().all(|item| context_attributes_in(item, names)),
        _ => true,
    }
}

fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(name).map_err(|e| PolicyError::Schema(e.to_string()))
}

/// A parsed, validated policy set and what it takes to evaluate it.
#[derive(Debug)]
pub struct PolicyEngine {
    policies: Sliced,
    waivers: Sliced,
    authorizer: Authorizer,
    /// Always empty: no entity has a parent, so `principal in X` and `action in [A, B]` hold
    /// only of `X` itself and of `A`, `B`, which [`Sliced`] relies on.
    entities: Entities,
    agent_type: EntityTypeName,
    human_type: EntityTypeName,
    path_type: EntityTypeName,
    action_type: EntityTypeName,
    /// The context attributes the policies read (waivers are among the policies): only these
    /// are built per request.
    context_read: Vec<(Attr, &'static str)>,
    /// Whether `arguments` is among them (else an MCP call's arguments are only checked).
    reads_arguments: bool,
    operator_policies: usize,
}

fn parse_into(set: &mut PolicySet, text: &str, origin: &str) -> Result<usize, PolicyError> {
    let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
        path: origin.to_owned(),
        message: e.to_string(),
    })?;
    if parsed.templates().next().is_some() {
        return Err(PolicyError::Parse {
            path: origin.to_owned(),
            message: "templates are not supported".into(),
        });
    }
    let mut count = 0;
    for (index, policy) in parsed.policies().enumerate() {
        let id = policy
            .annotation("id")
            .map_or_else(|| format!("{origin}#{index}"), str::to_owned);
        set.add(policy.new_id(PolicyId::new(id.clone())))
            .map_err(|e| PolicyError::Parse {
                path: origin.to_owned(),
                message: format!("policy {id}: {e}"),
            })?;
        count += 1;
    }
    Ok(count)
}

/// Reads every `*.cedar` file of `dir` in name order.
fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, PolicyError> {
    let read_error = |e: std::io::Error| PolicyError::Read {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((name, text));
        }
    }
    files.sort();
    Ok(files)
}

impl PolicyEngine {
    /// Builds the engine for `actions` (all actions the upstreams define) from the default
    /// policies and the `*.cedar` files of `dir`; every policy must validate strictly.
    pub fn load(actions: &BTreeSet<String>, dir: Option<&Path>) -> Result<Self, PolicyError> {
        let files = match dir {
            Some(dir) => read_dir(dir)?,
            None => Vec::new(),
        };
        Self::from_sources(actions, &files)
    }

    /// Builds the engine from `(name, text)` policy sources.
    pub fn from_sources(
        actions: &BTreeSet<String>,
        sources: &[(String, String)],
    ) -> Result<Self, PolicyError> {
        let (schema, _) = Schema::from_cedarschema_str(&schema_text(actions))
            .map_err(|e| PolicyError::Schema(format!("{e:?}")))?;
        let mut policies = PolicySet::new();
        parse_into(&mut policies, DEFAULT_POLICIES, "built-in")?;
        let mut operator_policies = 0;
        for (name, text) in sources {
            operator_policies += parse_into(&mut policies, text, name)?;
        }
        let validation = Validator::new(schema).validate(&policies, ValidationMode::Strict);
        if let Some(error) = validation.validation_errors().next() {
            return Err(PolicyError::Invalid {
                id: error.policy_id().to_string(),
                message: error.to_string(),
            });
        }
        let mut waivers = PolicySet::new();
        for policy in policies.policies() {
            if policy.annotation(WAIVER_ANNOTATION) == Some("not_required") {
                if policy.effect() != cedar_policy::Effect::Permit {
                    return Err(PolicyError::Invalid {
                        id: policy.id().to_string(),
                        message: "@approval(\"not_required\") belongs on a permit".into(),
                    });
                }
                waivers
                    .add(policy.clone())
                    .map_err(|e| PolicyError::Schema(e.to_string()))?;
            }
        }
        let context_read = context_read_by(&policies);
        let reads_arguments = context_read
            .iter()
            .any(|&(attr, _)| attr == Attr::Arguments);
        Ok(Self {
            policies: Sliced::new(policies),
            waivers: Sliced::new(waivers),
            authorizer: Authorizer::new(),
            entities: Entities::empty(),
            agent_type: type_name("Leash::Agent")?,
            human_type: type_name("Leash::Human")?,
            path_type: type_name("Leash::Path")?,
            action_type: type_name("Leash::Action")?,
            context_read,
            reads_arguments,
            operator_policies,
        })
    }

    /// How many operator policies were loaded (besides the built-in ones).
    pub fn operator_policies(&self) -> usize {
        self.operator_policies
    }

    /// The Cedar request, or the decision when it cannot be built (a deny).
    fn request(&self, facts: &Facts<'_>) -> Result<Request, Decision> {
        let input = |message: String| Decision::Deny {
            policies: vec![],
            reason: format!("policy input: {message}"),
        };
        let principal_type = match facts.mode {
            Mode::Delegated => self.agent_type.clone(),
            Mode::Direct => self.human_type.clone(),
            Mode::System => return Err(input("the system makes no requests to upstreams".into())),
        };
        let uid = |t: &EntityTypeName, id: &str| {
            EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id))
        };
        let arguments = match facts.mcp {
            Some(call) if self.reads_arguments => Some(
                arguments_value(call.arguments)
                    .map_err(|unrepresentable| unrepresentable.decision())?,
            ),
            Some(call) => {
                // Not read, but such a call is denied all the same (see the crate docs).
                arguments_representable(call.arguments)
                    .map_err(|unrepresentable| unrepresentable.decision())?;
                None
            }
            None => None,
        };
        let mut pairs = Vec::with_capacity(self.context_read.len());
        for &(attr, name) in &self.context_read {
            let value = match attr {
                Attr::Arguments => arguments.clone(),
                _ => context_value(attr, facts),
            };
            if let Some(value) = value {
                pairs.push((name.to_owned(), value));
            }
        }
        let context = Context::from_pairs(pairs).map_err(|e| input(e.to_string()))?;
        // The context has a fixed shape (or a part of it) that a unit test checks against the
        // schema, so the per-request schema check is skipped.
        Request::new(
            uid(&principal_type, facts.principal),
            uid(&self.action_type, facts.action),
            uid(
                &self.path_type,
                &format!("{}{}", facts.upstream, facts.path),
            ),
            context,
            None,
        )
        .map_err(|e| input(e.to_string()))
    }

    /// Decides a request. Any evaluation error denies (fail closed).
    pub fn authorize(&self, facts: &Facts<'_>) -> Decision {
        let request = match self.request(facts) {
            Ok(request) => request,
            Err(deny) => return deny,
        };
        let response = self.authorizer.is_authorized(
            &request,
            &self.policies.for_request(&request),
            &self.entities,
        );
        let diagnostics = response.diagnostics();
        let mut policies: Vec<String> = diagnostics
            .reason()
            .map(|id: &PolicyId| AsRef::<str>::as_ref(id).to_owned())
            .collect();
        // Cedar keeps them in a hash set: sorted, the answer and the audit are the same for the
        // same decision.
        policies.sort_unstable();
        if let Some(error) = diagnostics.errors().next() {
            return Decision::Deny {
                policies,
                reason: format!("policy evaluation failed: {error}"),
            };
        }
        if response.decision() == CedarDecision::Deny {
            let reason = if policies.is_empty() {
                "no policy permits this request".into()
            } else {
                "denied by policy".into()
            };
            return Decision::Deny { policies, reason };
        }
        // A grant's own approval_required list is the human's explicit wish: never waived.
        let needs_approval =
            facts.grant_requires_approval || (facts.high_risk && !self.waived(&request));
        if needs_approval && !facts.approval_attached {
            return Decision::ApprovalRequired {
                policies: vec![APPROVAL_POLICY_ID.into()],
            };
        }
        Decision::Allow { policies }
    }
}

impl PolicyEngine {
    /// Whether an operator permit annotated `@approval("not_required")` matches, cleanly.
    fn waived(&self, request: &Request) -> bool {
        let response = self.authorizer.is_authorized(
            request,
            &self.waivers.for_request(request),
            &self.entities,
        );
        response.decision() == CedarDecision::Allow
            && response.diagnostics().errors().next().is_none()
    }
}

/// From how many policies a set is sliced: below, evaluating the whole set costs less than
/// finding the slice.
const SLICE_FROM: usize = 16;

/// How many slices are kept (one per principal and action met).
const SLICES_KEPT: usize = 16_384;

/// A policy set evaluated per request only with the policies whose scope the request's
/// principal and action could satisfy, so the cost of a decision stays flat as operators add
/// policies per agent or per action (issue #34: 1,000 policies). Exact: a policy whose scope
/// does not match is never satisfied, so it neither permits, forbids nor errs. A scope naming
/// one principal (`==`, or `in`, which with no entity parents is `==`) or a list of actions
/// is matched here; any other scope (`is`, none) keeps the policy in every slice.
#[derive(Debug)]
struct Sliced {
    whole: Arc<PolicySet>,
    /// Its policies, when there are enough to slice.
    policies: Option<Vec<Policy>>,
    slices: quick_cache::sync::Cache<(EntityUid, EntityUid), Arc<PolicySet>>,
}

impl Sliced {
    fn new(whole: PolicySet) -> Self {
        let policies: Vec<Policy> = whole.policies().cloned().collect();
        Self {
            whole: Arc::new(whole),
            policies: (policies.len() >= SLICE_FROM).then_some(policies),
            slices: quick_cache::sync::Cache::new(SLICES_KEPT),
        }
    }

    /// The policies `request` is evaluated with.
    fn for_request(&self, request: &Request) -> Arc<PolicySet> {
        let (Some(policies), Some(principal), Some(action)) =
            (&self.policies, request.principal(), request.action())
        else {
            return Arc::clone(&self.whole);
        };
        let key = (principal.clone(), action.clone());
        if let Some(slice) = self.slices.get(&key) {
            return slice;
        }
        let mut slice = PolicySet::new();
        for policy in policies {
            if scope_may_match(policy, principal, action) && slice.add(policy.clone()).is_err() {
                // Cannot happen (the ids are the whole set's, unique): fail towards the whole.
                return Arc::clone(&self.whole);
            }
        }
        let slice = Arc::new(slice);
        self.slices.insert(key, Arc::clone(&slice));
        slice
    }
}

/// Whether `policy`'s principal and action constraints could hold of `principal` and `action`.
fn scope_may_match(policy: &Policy, principal: &EntityUid, action: &EntityUid) -> bool {
    let principal_may = match policy.principal_constraint() {
        PrincipalConstraint::Eq(uid) | PrincipalConstraint::In(uid) => &uid == principal,
        PrincipalConstraint::Any | PrincipalConstraint::Is(_) | PrincipalConstraint::IsIn(..) => {
            true
        }
    };
    principal_may
        && match policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(uid) => &uid == action,
            ActionConstraint::In(uids) => uids.contains(action),
        }
}

/// The value of one context attribute for a request; `None` when it is absent (`tool` of a
/// request that is no MCP call). `arguments` is built by [`arguments_value`] instead.
fn context_value(attr: Attr, facts: &Facts<'_>) -> Option<RestrictedExpression> {
    let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
    let app_verb = || facts.action.split_once(':').unwrap_or((facts.action, ""));
    Some(match attr {
        Attr::Mode => string(facts.mode.as_str()),
        Attr::Human => string(facts.human),
        Attr::Action => string(facts.action),
        Attr::App => string(app_verb().0),
        Attr::Verb => string(app_verb().1),
        Attr::Upstream => string(facts.upstream),
        Attr::Method => string(facts.method),
        Attr::Path => string(facts.path),
        Attr::GrantId => string(facts.grant_id),
        Attr::Purpose => string(facts.purpose),
        Attr::GrantActions => {
            RestrictedExpression::new_set(facts.grant_actions.iter().map(|a| string(a)))
        }
        Attr::GrantAgeSeconds => RestrictedExpression::new_long(facts.grant_age_seconds),
        Attr::Risk => string(if facts.high_risk { "high" } else { "normal" }),
        Attr::NeedsApproval => {
            RestrictedExpression::new_bool(facts.high_risk || facts.grant_requires_approval)
        }
        Attr::ApprovalAttached => RestrictedExpression::new_bool(facts.approval_attached),
        Attr::Hour => RestrictedExpression::new_long(time_parts(facts.now).0),
        Attr::MinuteOfDay => RestrictedExpression::new_long(time_parts(facts.now).1),
        Attr::Weekday => RestrictedExpression::new_long(time_parts(facts.now).2),
        Attr::Tool => string(facts.mcp?.tool),
        Attr::Arguments => return None,
    })
}

/// An argument Cedar cannot represent exactly: where it is and what it is.
#[derive(Debug)]
struct Unrepresentable {
    path: String,
    what: &'static str,
}

impl Unrepresentable {
    fn decision(self) -> Decision {
        Decision::Deny {
            policies: vec![ARGUMENTS_POLICY_ID.into()],
            reason: format!(
                "argument {} is {}, which policy cannot judge exactly: use strings, booleans, \
                 integers within i64, objects and arrays",
                self.path, self.what
            ),
        }
    }
}

/// Where a value is in the arguments: `arguments.a.b[2]`, `arguments["odd name"]`. Names are
/// cut to 64 characters.
#[derive(Clone, Copy)]
enum Step<'a> {
    Root,
    Member(&'a Step<'a>, &'a str),
    Item(&'a Step<'a>, usize),
}

impl Step<'_> {
    fn path(&self) -> String {
        match self {
            Step::Root => "arguments".into(),
            Step::Member(parent, name) => {
                let name: String = name.chars().take(64).collect();
                let plain = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if plain {
                    format!("{}.{name}", parent.path())
                } else {
                    format!("{}[{}]", parent.path(), serde_json::Value::String(name))
                }
            }
            Step::Item(parent, index) => format!("{}[{index}]", parent.path()),
        }
    }

    fn unrepresentable(&self, what: &'static str) -> Unrepresentable {
        Unrepresentable {
            path: self.path(),
            what,
        }
    }
}

/// What Cedar cannot represent exactly, if `value` is such a value (not looking inside).
fn unrepresentable(value: &serde_json::Value) -> Option<&'static str> {
    match value {
        serde_json::Value::Null => Some("null"),
        serde_json::Value::Number(n) if n.as_i64().is_none() => {
            Some("a number that is not an integer within i64")
        }
        _ => None,
    }
}

/// Checks that Cedar represents every value of `arguments` exactly, without building anything.
fn arguments_representable(arguments: &serde_json::Value) -> Result<(), Unrepresentable> {
    fn walk(value: &serde_json::Value, at: Step<'_>, depth: usize) -> Result<(), Unrepresentable> {
        if let Some(what) = unrepresentable(value) {
            return Err(at.unrepresentable(what));
        }
        let nested = value.is_array() || value.is_object();
        if nested && depth >= MAX_ARGUMENT_DEPTH {
            return Err(at.unrepresentable("nested too deep"));
        }
        match value {
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| walk(item, Step::Item(&at, i), depth + 1)),
            serde_json::Value::Object(members) => members
                .iter()
                .try_for_each(|(name, item)| walk(item, Step::Member(&at, name), depth + 1)),
            _ => Ok(()),
        }
    }
    walk(arguments, Step::Root, 0)
}

/// `arguments` as a Cedar value (see the crate docs for the mapping), or the first value Cedar
/// cannot represent exactly.
fn arguments_value(arguments: &serde_json::Value) -> Result<RestrictedExpression, Unrepresentable> {
    fn build(
        value: &serde_json::Value,
        at: Step<'_>,
        depth: usize,
    ) -> Result<RestrictedExpression, Unrepresentable> {
        use serde_json::Value;
        if let Some(what) = unrepresentable(value) {
            return Err(at.unrepresentable(what));
        }
        let nested = value.is_array() || value.is_object();
        if nested && depth >= MAX_ARGUMENT_DEPTH {
            return Err(at.unrepresentable("nested too deep"));
        }
        Ok(match value {
            Value::Bool(b) => RestrictedExpression::new_bool(*b),
            Value::String(s) => RestrictedExpression::new_string(s.clone()),
            Value::Number(n) => match n.as_i64() {
                Some(n) => RestrictedExpression::new_long(n),
                None => {
                    return Err(at.unrepresentable("a number that is not an integer within i64"));
                }
            },
            Value::Array(items) => RestrictedExpression::new_set(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| build(item, Step::Item(&at, i), depth + 1))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Value::Object(members) => RestrictedExpression::new_record(
                members
                    .iter()
                    .map(|(name, item)| {
                        Ok((
                            name.clone(),
                            build(item, Step::Member(&at, name), depth + 1)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
            // A JSON object names each member once; Cedar refuses only duplicates.
            .map_err(|_| at.unrepresentable("an object with a repeated member name"))?,
            Value::Null => return Err(at.unrepresentable("null")),
        })
    }
    build(arguments, Step::Root, 0)
}

/// (hour, minute of day, weekday with Monday = 0) in UTC.
fn time_parts(now: i64) -> (i64, i64, i64) {
    let day = now.div_euclid(86_400);
    let second = now.rem_euclid(86_400);
    // 1970-01-01 was a Thursday (3 with Monday = 0).
    ((second / 3600), (second / 60), (day + 3).rem_euclid(7))
}

#[cfg(test)]
mod tests;
