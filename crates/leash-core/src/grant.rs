//! Grants (one delegated task): their status rules and the checks on what an agent may ask for.

// Handles numbers a client chose (time claims, counts): no operation that can overflow.
#![deny(clippy::arithmetic_side_effects)]

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A grant's stored status. `Active` is the only non-terminal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantStatus {
    /// The task is under way.
    Active,
    /// The human or the agent said the task is done.
    Completed,
    /// The human or an admin revoked it.
    Revoked,
    /// Its time ran out.
    Expired,
}

impl GrantStatus {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// Parses a wire or storage name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "completed" => Some(Self::Completed),
            "revoked" => Some(Self::Revoked),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// A delegated task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `grt_…`.
    pub id: String,
    /// The human (`usr_…`).
    pub subject: String,
    /// The agent's id.
    pub agent: String,
    /// What the task is for.
    pub purpose: String,
    /// Upstreams the agent may reach.
    pub upstreams: Vec<String>,
    /// Actions the agent may take.
    pub actions: Vec<String>,
    /// Actions that need a human approval each time.
    pub approval_required: Vec<String>,
    /// Actions that may be taken once.
    pub single_use: Vec<String>,
    /// Creation time.
    pub created_at: i64,
    /// End of the task's time limit.
    pub expires_at: i64,
    /// Request budget at the gateway.
    pub max_requests: Option<i64>,
    /// Requests counted so far.
    pub requests_used: i64,
    /// Stored status; see [`Grant::status_at`] for the effective one.
    pub status: GrantStatus,
}

impl Grant {
    /// The status as of `now`: an active grant past its time limit is expired.
    pub fn status_at(&self, now: i64) -> GrantStatus {
        match self.status {
            GrantStatus::Active if now >= self.expires_at => GrantStatus::Expired,
            status => status,
        }
    }

    /// Whether its tokens may be used at `now`: active, in time and with budget left.
    pub fn is_live(&self, now: i64) -> bool {
        self.status_at(now) == GrantStatus::Active && !self.is_exhausted()
    }

    /// Whether the request budget is spent.
    pub fn is_exhausted(&self) -> bool {
        self.max_requests
            .is_some_and(|max| self.requests_used >= max)
    }
}

/// Why a requested scope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// An action the grant does not hold.
    #[error("scope names an action outside the grant: {0}")]
    Outside(String),
    /// Empty or malformed.
    #[error("scope must be a space-separated list of actions")]
    Malformed,
}

/// The actions a token gets: the requested subset of the grant, or all of it when no scope is
/// asked for. INVARIANT: the result is never wider than `grant_actions`.
pub fn narrow_scope(
    requested: Option<&str>,
    grant_actions: &[String],
) -> Result<Vec<String>, ScopeError> {
    let Some(requested) = requested else {
        return Ok(grant_actions.to_vec());
    };
    let mut out = BTreeSet::new();
    for action in requested.split(' ') {
        if action.is_empty() {
            return Err(ScopeError::Malformed);
        }
        if !grant_actions.iter().any(|a| a == action) {
            return Err(ScopeError::Outside(action.chars().take(100).collect()));
        }
        out.insert(action.to_owned());
    }
    if out.is_empty() {
        return Err(ScopeError::Malformed);
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions() -> Vec<String> {
        vec!["mail:read".into(), "mail:draft".into()]
    }

    #[test]
    fn scope_is_never_wider_than_the_grant() {
        assert_eq!(narrow_scope(None, &actions()).unwrap(), actions());
        assert_eq!(
            narrow_scope(Some("mail:read"), &actions()).unwrap(),
            vec!["mail:read"]
        );
        assert!(matches!(
            narrow_scope(Some("mail:send"), &actions()),
            Err(ScopeError::Outside(_))
        ));
        assert_eq!(
            narrow_scope(Some(""), &actions()),
            Err(ScopeError::Malformed)
        );
        assert_eq!(
            narrow_scope(Some("mail:read  mail:draft"), &actions()),
            Err(ScopeError::Malformed)
        );
    }

    #[test]
    fn status_over_time_and_budget() {
        let mut g = Grant {
            id: "grt_1".into(),
            subject: "usr_1".into(),
            agent: "a".into(),
            purpose: "p".into(),
            upstreams: vec![],
            actions: actions(),
            approval_required: vec![],
            single_use: vec![],
            created_at: 0,
            expires_at: 100,
            max_requests: Some(2),
            requests_used: 0,
            status: GrantStatus::Active,
        };
        assert!(g.is_live(99));
        assert_eq!(g.status_at(100), GrantStatus::Expired);
        assert!(!g.is_live(100));
        g.requests_used = 2;
        assert!(!g.is_live(50));
        g.status = GrantStatus::Revoked;
        assert_eq!(g.status_at(0), GrantStatus::Revoked);
    }
}
