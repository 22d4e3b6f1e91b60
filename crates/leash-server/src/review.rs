//! Access review (API §10): per grant, what was granted against what the gateway actually
//! forwarded (from the audit log), and the approvals asked and given; per agent, its live
//! grants and the union of their actions. Flags over-broad grants and standing access.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use leash_core::audit::rfc3339;
use leash_store::ApprovalStatus;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiResult;
use crate::extract::Caller;
use crate::openapi::ApiErrors;
use crate::state::AppState;

/// A grant is flagged when more than this share of its actions was never used.
const UNUSED_SHARE_FLAG: f64 = 0.5;
/// An agent is flagged when one of its live grants is older than this (standing access).
const STANDING_AFTER_SECONDS: i64 = 24 * 3600;

/// How often one action of a grant was used.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionUsed {
    action: String,
    count: u64,
    last_used: String,
}

/// Approvals of a grant.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalCounts {
    asked: u64,
    given: u64,
}

/// One grant: granted against used.
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantReview {
    id: String,
    subject: String,
    agent: String,
    purpose: String,
    status: String,
    created_at: String,
    expires_at: String,
    actions_granted: Vec<String>,
    actions_used: Vec<ActionUsed>,
    actions_unused: Vec<String>,
    /// Share of the granted actions never used, 0 to 1.
    unused_share: f64,
    /// More than half of the actions were never used.
    over_broad: bool,
    approvals: ApprovalCounts,
}

/// One agent's live access.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentReview {
    agent: String,
    live_grants: Vec<String>,
    live_actions: Vec<String>,
    oldest_live_grant_at: String,
    /// A live grant is older than a day.
    standing: bool,
}

/// `GET /v1/review`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Review {
    grants: Vec<GrantReview>,
    agents: Vec<AgentReview>,
}

/// `GET /v1/review`: the admin sees every grant and agent, a human their own grants and the
/// agents acting on them.
#[utoipa::path(get, path = "/v1/review", tag = "audit",
    responses((status = 200, body = Review), ApiErrors), security(("api_key" = [])))]
pub async fn review(State(state): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Review>> {
    let subject = caller.list_scope();
    let now = state.clock.now();
    let grants = state.store.list_grants(subject).await?;
    let mut uses: HashMap<String, Vec<leash_store::ActionUse>> = HashMap::new();
    for used in state.store.action_uses(subject).await? {
        uses.entry(used.grant_id.clone()).or_default().push(used);
    }
    let mut approvals: HashMap<String, (u64, u64)> = HashMap::new();
    for approval in state.store.list_approvals(subject).await? {
        let counts = approvals.entry(approval.grant_id.clone()).or_default();
        counts.0 += 1;
        if matches!(
            approval.status,
            ApprovalStatus::Approved | ApprovalStatus::Used
        ) {
            counts.1 += 1;
        }
    }

    let mut grant_rows = Vec::new();
    // Agent → (live grant ids, live actions, oldest live grant's creation).
    let mut agents: BTreeMap<String, (Vec<String>, BTreeSet<String>, i64)> = BTreeMap::new();
    for grant in &grants {
        let used = uses.remove(&grant.id).unwrap_or_default();
        let used_actions: BTreeSet<&str> = used.iter().map(|u| u.action.as_str()).collect();
        let unused: Vec<&String> = grant
            .actions
            .iter()
            .filter(|a| !used_actions.contains(a.as_str()))
            .collect();
        let unused_share = if grant.actions.is_empty() {
            0.0
        } else {
            unused.len() as f64 / grant.actions.len() as f64
        };
        let (asked, given) = approvals.get(&grant.id).copied().unwrap_or_default();
        grant_rows.push(GrantReview {
            id: grant.id.clone(),
            subject: grant.subject.clone(),
            agent: grant.agent.clone(),
            purpose: grant.purpose.clone(),
            status: grant.status_at(now).as_str().to_owned(),
            created_at: rfc3339(grant.created_at),
            expires_at: rfc3339(grant.expires_at),
            actions_granted: grant.actions.clone(),
            actions_used: used
                .iter()
                .map(|u| ActionUsed {
                    action: u.action.clone(),
                    count: u.count,
                    last_used: rfc3339(u.last_used),
                })
                .collect(),
            actions_unused: unused.into_iter().cloned().collect(),
            unused_share: (unused_share * 100.0).round() / 100.0,
            over_broad: unused_share > UNUSED_SHARE_FLAG,
            approvals: ApprovalCounts { asked, given },
        });
        if grant.is_live(now) {
            let entry = agents
                .entry(grant.agent.clone())
                .or_insert_with(|| (Vec::new(), BTreeSet::new(), i64::MAX));
            entry.0.push(grant.id.clone());
            entry.1.extend(grant.actions.iter().cloned());
            entry.2 = entry.2.min(grant.created_at);
        }
    }
    let agent_rows = agents
        .into_iter()
        .map(|(agent, (live, actions, oldest))| AgentReview {
            agent,
            live_grants: live,
            live_actions: actions.into_iter().collect(),
            oldest_live_grant_at: rfc3339(oldest),
            standing: now - oldest > STANDING_AFTER_SECONDS,
        })
        .collect();
    Ok(Json(Review {
        grants: grant_rows,
        agents: agent_rows,
    }))
}
