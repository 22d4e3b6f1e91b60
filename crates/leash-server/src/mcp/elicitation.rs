//! Elicitations for the human (API §14): a server's `elicitation/create` never reaches the agent.
//! It becomes a pending approval of the grant (method `elicitation/create`, action
//! `<upstream>:elicitation`) that the grant's human sees in the approvals inbox with the
//! server's message and form, and answers by approving with the form's `content` (accept) or
//! denying (decline). Leash sends the answer to the server as the client's, in the same session;
//! no answer within `mcp.approval_wait`, a form Leash cannot check, or a grant that ended is a
//! decline. The form and the waiting relay live in this node's memory, like MCP sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leash_core::audit::{AuditEvent, Mode, Outcome};
use leash_core::mcp::RequestId;
use leash_core::secret::random_id;
use leash_store::{Approval, ApprovalStatus, RequestUse, UseVerdict};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;

use super::Answerer;
use crate::state::AppState;

/// The approval method that marks an elicitation.
pub const METHOD: &str = "elicitation/create";

/// How often a waiting elicitation re-reads its approval and grant (a decision on this node
/// wakes it at once).
const POLL: Duration = Duration::from_secs(1);

/// The largest elicitation (its params as JSON) put to the human, as request bodies are
/// previewed only up to 64 KiB: a server's bigger one is declined, never stored or listed.
const LIMIT: usize = 64 * 1024;

/// What the human sees of an elicitation, beside the approval: the server's words and form.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ElicitationView {
    /// The server's message to the human (its text, shown as text).
    message: String,
    /// The form: an object schema of primitive members (MCP's `requestedSchema`).
    requested_schema: Value,
}

/// The elicitations waiting for their human on this node, by approval id.
#[derive(Debug, Default)]
pub struct Elicitations {
    waiting: Mutex<HashMap<String, Arc<Waiting>>>,
}

#[derive(Debug)]
struct Waiting {
    /// The grant whose human it waits for.
    grant: String,
    view: ElicitationView,
    /// The human's `content`, set before the approval is decided.
    answer: Mutex<Option<Map<String, Value>>>,
    decided: tokio::sync::Notify,
}

/// Why the human's answer cannot be sent.
#[derive(Debug)]
pub(crate) enum AnswerError {
    /// Not waiting here (another node's, or its session is gone).
    NotHere,
    /// Another decision holds an answer already.
    Busy,
    /// Not what the form asks for.
    Invalid(String),
}

impl Elicitations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Waiting>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The message and form of the elicitation behind `approval_id`, if one waits here.
    pub(crate) fn view(&self, approval_id: &str) -> Option<ElicitationView> {
        self.lock().get(approval_id).map(|w| w.view.clone())
    }

    /// Checks the human's `content` against the form and keeps it for the answer, before the
    /// approval is decided (the waiting relay reads it once it sees the approval).
    pub(crate) fn prepare(
        &self,
        approval_id: &str,
        content: Option<Map<String, Value>>,
    ) -> Result<(), AnswerError> {
        let waiting = self.lock().get(approval_id).cloned();
        let waiting = waiting.ok_or(AnswerError::NotHere)?;
        let content = content.unwrap_or_default();
        check_answer(&waiting.view.requested_schema, &content).map_err(AnswerError::Invalid)?;
        let mut answer = lock(&waiting.answer);
        if answer.is_some() {
            return Err(AnswerError::Busy);
        }
        *answer = Some(content);
        Ok(())
    }

    /// Forgets a prepared answer whose approval could not be decided.
    pub(crate) fn unprepare(&self, approval_id: &str) {
        if let Some(waiting) = self.lock().get(approval_id) {
            lock(&waiting.answer).take();
        }
    }

    /// Wakes the relay waiting for `approval_id`, which was just decided.
    pub(crate) fn decided(&self, approval_id: &str) {
        if let Some(waiting) = self.lock().get(approval_id) {
            waiting.decided.notify_one();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The message and form of an `elicitation/create`, if Leash can put it before the human: form
/// mode (the default) with a string message and an object schema whose members are all
/// primitives Leash checks answers against ([`check_answer`]). URL mode and anything else are
/// declined.
fn form(params: Option<&Value>) -> Option<ElicitationView> {
    let params = params?.as_object()?;
    if params
        .get("mode")
        .is_some_and(|mode| mode.as_str() != Some("form"))
    {
        return None;
    }
    let message = params.get("message")?.as_str()?.to_owned();
    let schema = params.get("requestedSchema")?;
    let object = schema.as_object()?;
    if object.get("type").and_then(Value::as_str) != Some("object") {
        return None;
    }
    let properties = match object.get("properties") {
        None => &Map::new(),
        Some(properties) => properties.as_object()?,
    };
    if !properties.values().all(primitive) {
        return None;
    }
    if let Some(required) = object.get("required") {
        let all_known = required.as_array()?.iter().all(|name| {
            name.as_str()
                .is_some_and(|name| properties.contains_key(name))
        });
        if !all_known {
            return None;
        }
    }
    Some(ElicitationView {
        message,
        requested_schema: schema.clone(),
    })
}

/// Whether a form member is one of MCP's primitive schemas, with only keywords Leash checks
/// answers against (or that only describe it): string (`minLength`, `maxLength`, `format`
/// email, uri, date or date-time, `enum` of strings), number and integer (`minimum`,
/// `maximum`), boolean. Any other keyword (`pattern`, say) is a rule Leash would not enforce:
/// such a form is declined.
fn primitive(schema: &Value) -> bool {
    const DESCRIBING: [&str; 4] = ["type", "title", "description", "default"];
    let Some(schema) = schema.as_object() else {
        return false;
    };
    let only = |checked: &[&str]| {
        schema
            .keys()
            .all(|key| DESCRIBING.contains(&key.as_str()) || checked.contains(&key.as_str()))
    };
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => {
            only(&["minLength", "maxLength", "format", "enum", "enumNames"])
                && schema
                    .get("enum")
                    .is_none_or(|e| e.as_array().is_some_and(|e| e.iter().all(Value::is_string)))
                && schema.get("format").is_none_or(|format| {
                    matches!(
                        format.as_str(),
                        Some("email" | "uri" | "date" | "date-time")
                    )
                })
        }
        Some("number" | "integer") => only(&["minimum", "maximum"]),
        Some("boolean") => only(&[]),
        _ => false,
    }
}

/// Whether `text` is of the string `format` a form names (checked as the forms' readers do:
/// an address with one `@`, an absolute URI, an RFC 3339 full-date or date-time).
fn of_format(format: &str, text: &str) -> bool {
    match format {
        "email" => text.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        }),
        "uri" => url::Url::parse(text).is_ok(),
        "date" => time::Date::parse(
            text,
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .is_ok(),
        "date-time" => {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .is_ok()
        }
        _ => false,
    }
}

/// Checks the human's answer against the form (a JSON Schema subset: MCP restricts elicitation
/// forms to flat objects of primitives, so a general JSON Schema validator would accept forms
/// Leash must refuse): only the form's members, each of its type and within its bounds, and
/// every required one.
fn check_answer(schema: &Value, content: &Map<String, Value>) -> Result<(), String> {
    let empty = Map::new();
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (name, value) in content {
        let Some(member) = properties.get(name) else {
            return Err(format!("the form has no member {name:?}"));
        };
        check_member(member, value).map_err(|why| format!("{name:?}: {why}"))?;
    }
    let required = schema.get("required").and_then(Value::as_array);
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        if !content.contains_key(name) {
            return Err(format!("the form requires {name:?}"));
        }
    }
    Ok(())
}

fn check_member(schema: &Value, value: &Value) -> Result<(), String> {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => {
            let text = value.as_str().ok_or("must be a string")?;
            let length = text.chars().count() as f64;
            if bound("minLength").is_some_and(|min| length < min)
                || bound("maxLength").is_some_and(|max| length > max)
            {
                return Err("its length is out of the form's bounds".into());
            }
            if let Some(options) = schema.get("enum").and_then(Value::as_array)
                && !options.contains(value)
            {
                return Err("must be one of the form's options".into());
            }
            if let Some(format) = schema.get("format").and_then(Value::as_str)
                && !of_format(format, text)
            {
                return Err(format!("must be a valid {format}"));
            }
            Ok(())
        }
        Some("boolean") if value.is_boolean() => Ok(()),
        Some("boolean") => Err("must be true or false".into()),
        Some(kind @ ("number" | "integer")) => {
            let number = value.as_f64().ok_or("must be a number")?;
            if kind == "integer" && !(value.is_i64() || value.is_u64()) {
                return Err("must be an integer".into());
            }
            if bound("minimum").is_some_and(|min| number < min)
                || bound("maximum").is_some_and(|max| number > max)
            {
                return Err("is out of the form's bounds".into());
            }
            Ok(())
        }
        _ => Err("the form's member is not one Leash can check".into()),
    }
}

/// Puts the server's `elicitation/create` `id` before the grant's human and answers the server
/// with what they decide (in a task of its own: the stream it came on goes on meanwhile).
/// `asked_on_stream` counts the elicitations of the stream it came on put to the human: past
/// the grant's `max_pending_approvals` (as past the number waiting on this node for the grant),
/// one is declined at once, unstored and unaudited, so that a server cannot flood the inbox or
/// the audit log.
pub(crate) fn ask(
    state: &Arc<AppState>,
    answerer: &Answerer,
    id: RequestId,
    params: Option<Value>,
    asked_on_stream: &AtomicUsize,
) {
    let shown = form(params.as_ref());
    let flood = shown.is_some()
        && asked_on_stream.fetch_add(1, Ordering::Relaxed)
            >= state.config.max_pending_approvals as usize;
    let (state, answerer) = (state.clone(), answerer.clone());
    tokio::spawn(async move {
        let answer = match shown {
            Some(_) if flood => {
                tracing::info!(upstream = %answerer.upstream, "an elicitation over the stream's limit declined");
                None
            }
            Some(view) => wait_for_human(&state, &answerer, view, params.as_ref()).await,
            None => {
                tracing::info!(upstream = %answerer.upstream, "an elicitation Leash cannot show the human declined");
                None
            }
        };
        let result = match answer {
            Some(content) => json!({"action": "accept", "content": content}),
            None => json!({"action": "decline"}),
        };
        answerer.answer(
            &state,
            json!({"jsonrpc": "2.0", "id": id.to_value(), "result": result}),
        );
    });
}

/// Stores the elicitation as a pending approval and waits for its human: `Some(content)` if
/// they approved with it, `None` for anything else.
async fn wait_for_human(
    state: &Arc<AppState>,
    answerer: &Answerer,
    view: ElicitationView,
    params: Option<&Value>,
) -> Option<Map<String, Value>> {
    let now = state.clock.now();
    let grant = match state.store.grant(&answerer.grant).await {
        Ok(Some(grant)) if grant.is_live(now) => grant,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "an elicitation declined: the grant could not be read");
            return None;
        }
    };
    let body = params.map(Value::to_string).unwrap_or_default();
    if body.len() > LIMIT {
        tracing::info!(upstream = %answerer.upstream, size = body.len(), "an elicitation over the size limit declined");
        return None;
    }
    let wait = i64::try_from(state.config.mcp_approval_wait.as_secs()).unwrap_or(i64::MAX);
    let action = answerer.elicitation_action.clone();
    let approval = Approval {
        id: random_id("apr_"),
        grant_id: grant.id.clone(),
        subject: grant.subject.clone(),
        agent: grant.agent.clone(),
        action: action.clone(),
        upstream: answerer.upstream.clone(),
        method: METHOD.into(),
        path: "/elicitation".into(),
        query: None,
        body_sha256: hex::encode(Sha256::digest(body.as_bytes())),
        body_size: body.len() as i64,
        headers: Vec::new(),
        headers_sha256: String::new(),
        // The human reads the form in the approval itself.
        previewed: false,
        status: ApprovalStatus::Pending,
        requested_at: now,
        expires_at: now.saturating_add(wait).min(grant.expires_at),
        decided_at: None,
        approver: None,
    };
    let mut event = AuditEvent::new("mcp.elicitation", Mode::Delegated, now);
    event.subject = Some(grant.subject.clone());
    event.actor = Some(grant.agent.clone());
    event.grant_id = Some(grant.id.clone());
    event.purpose = Some(grant.purpose.clone());
    event.action = Some(action);
    event.upstream = Some(answerer.upstream.clone());
    event.method = Some(METHOD.into());
    event.path = Some("/elicitation".into());
    event.decision = Some(Outcome::ApprovalRequired);
    event.request_id = Some(approval.id.clone());
    let waiting = Arc::new(Waiting {
        grant: grant.id.clone(),
        view,
        answer: Mutex::new(None),
        decided: tokio::sync::Notify::new(),
    });
    // Registered before it is stored: a human who sees it at once finds it here. A grant with
    // as many waiting here as it may have pending gets no more (and no audit event of each).
    {
        let mut registry = state.elicitations.lock();
        let limit = state.config.max_pending_approvals as usize;
        if registry.values().filter(|w| w.grant == grant.id).count() >= limit {
            tracing::info!(grant = %grant.id, "an elicitation over the grant's pending limit declined");
            return None;
        }
        registry.insert(approval.id.clone(), waiting.clone());
    }
    let _registered = Unregister(state, &approval.id);
    let request = RequestUse {
        now,
        pending_approval: Some(Box::new(approval.clone())),
        max_pending_approvals: Some(state.config.max_pending_approvals),
        audit: Some(event),
        ..RequestUse::default()
    };
    match state.store.record_use(request).await {
        Ok(UseVerdict::Recorded) => {}
        Ok(verdict) => {
            tracing::info!(
                ?verdict,
                "an elicitation declined: it could not be put to the human"
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "an elicitation declined: it could not be stored");
            return None;
        }
    }
    let mut shown = crate::approvals::ApprovalView::of(&approval, Some(&grant.purpose), now);
    shown.elicitation = Some(waiting.view.clone());
    state
        .notifier
        .send(json!({"type": "approval.requested", "approval": shown}));
    tracing::info!(approval = %approval.id, grant = %grant.id, "an elicitation put to the human");
    loop {
        let now = state.clock.now();
        let stored = match state.store.approval(&approval.id).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "an elicitation declined: its approval could not be read");
                return None;
            }
        };
        // The task may end while the human thinks: nothing is answered for it then.
        if !super::grant_is_live(state, &grant.id).await {
            return None;
        }
        match stored.status_at(now) {
            ApprovalStatus::Approved => return lock(&waiting.answer).take(),
            ApprovalStatus::Pending => {
                let left = Duration::from_secs(stored.expires_at.saturating_sub(now).max(0) as u64);
                tokio::select! {
                    () = waiting.decided.notified() => {}
                    () = tokio::time::sleep(POLL.min(left + Duration::from_millis(50))) => {}
                }
            }
            ApprovalStatus::Denied | ApprovalStatus::Expired | ApprovalStatus::Used => return None,
        }
    }
}

/// Forgets a waiting elicitation however its wait ends.
struct Unregister<'a>(&'a AppState, &'a str);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.elicitations.lock().remove(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email_form() -> Value {
        json!({
            "type": "object",
            "properties": {
                "email": {"type": "string", "minLength": 3, "maxLength": 64, "format": "email"},
                "site": {"type": "string", "format": "uri", "title": "Site", "default": "x"},
                "born": {"type": "string", "format": "date"},
                "at": {"type": "string", "format": "date-time"},
                "count": {"type": "integer", "minimum": 1, "maximum": 3},
                "ratio": {"type": "number"},
                "ok": {"type": "boolean"},
                "tier": {"type": "string", "enum": ["gold", "silver"]}
            },
            "required": ["email"]
        })
    }

    #[test]
    fn only_forms_of_primitives_are_put_to_the_human() {
        let params = |schema: Value| json!({"message": "New email?", "requestedSchema": schema});
        let shown = form(Some(&params(email_form()))).unwrap();
        assert_eq!(shown.message, "New email?");
        assert!(
            form(Some(
                &json!({"mode": "form", "message": "m", "requestedSchema": {"type": "object"}})
            ))
            .is_some()
        );
        for refused in [
            json!({"mode": "url", "message": "m", "url": "https://x", "requestedSchema": email_form()}),
            params(json!({"type": "object", "properties": {"a": {"type": "object"}}})),
            params(json!({"type": "object", "properties": {"a": {"type": "array"}}})),
            params(
                json!({"type": "object", "properties": {"a": {"type": "integer", "enum": [1]}}}),
            ),
            params(
                json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}),
            ),
            params(json!({"type": "string"})),
            json!({"requestedSchema": email_form()}),
            json!([1]),
        ] {
            assert!(form(Some(&refused)).is_none(), "{refused}");
        }
        assert!(form(None).is_none());
    }

    #[test]
    fn answers_are_checked_against_the_form() {
        let schema = email_form();
        let content = |value: Value| value.as_object().unwrap().clone();
        let good = [
            json!({"email": "ada@example.org"}),
            json!({"email": "ada@example.org", "count": 2, "ratio": 0.5, "ok": false, "tier": "gold"}),
            json!({"email": "a@b", "site": "https://example.org/x", "born": "1815-12-10", "at": "2026-12-06T10:00:00Z"}),
        ];
        for answer in good {
            assert_eq!(
                check_answer(&schema, &content(answer.clone())),
                Ok(()),
                "{answer}"
            );
        }
        let bad = [
            json!({}),
            json!({"email": 1}),
            json!({"email": "ab"}),
            json!({"email": "a".repeat(65)}),
            json!({"email": "ada@example.org", "count": 1.5}),
            json!({"email": "ada@example.org", "count": 4}),
            json!({"email": "ada@example.org", "ratio": "1"}),
            json!({"email": "ada@example.org", "ok": "yes"}),
            json!({"email": "ada@example.org", "tier": "bronze"}),
            json!({"email": "ada@example.org", "extra": true}),
            json!({"email": "not an address"}),
            json!({"email": "a@b@c"}),
            json!({"email": "ada@example.org", "site": "example.org"}),
            json!({"email": "ada@example.org", "born": "10/12/1815"}),
            json!({"email": "ada@example.org", "at": "2026-12-06 10:00"}),
        ];
        for answer in bad {
            assert!(
                check_answer(&schema, &content(answer.clone())).is_err(),
                "{answer}"
            );
        }
    }
}
