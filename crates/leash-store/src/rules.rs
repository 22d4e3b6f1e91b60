//! The rules of a group commit, written once for both writers: what each request of a batch
//! may claim, in which order its checks decide its verdict, and what the batch then writes.
//! Pure: what the database held before the batch comes in through [`Facts`], asked only when a
//! verdict depends on it, and what the batch changes is kept in [`Batch`]. Each writer asks its
//! database in its own way (SQLite: the writer's in-memory copies and one statement at a time;
//! PostgreSQL: a few statements for the whole batch, before the rules run) and writes the
//! batch's effects in its own way, but neither decides anything itself.
//!
//! A request's checks, in the order that decides its verdict ([`Batch::judge`]):
//! 1. its one-time values ([`RequestUse::one_time_values`]): one consumed before the batch,
//!    claimed by an earlier request of the batch, or repeated within the request →
//!    [`UseVerdict::Replayed`] of the first such value's kind, and it claims nothing. Otherwise
//!    it claims the values of `once` now, whatever comes next;
//! 2. its token revoked → [`UseVerdict::TokenRevoked`];
//! 3. the approval it spends: approved, unexpired at its `now` and not spent by an earlier
//!    request of the batch, else [`UseVerdict::ApprovalSpent`]; spent now, whatever comes next;
//! 4. the grant it exchanges: active, unexpired and under its budget as counted so far, else
//!    [`UseVerdict::GrantSpent`];
//! 5. the grant it counts against: the same, else [`UseVerdict::GrantSpent`]; counted now;
//! 6. the approval it asks for: its grant has fewer than `max_pending_approvals` pending
//!    (stored ones unexpired at its time, and the batch's own), else
//!    [`UseVerdict::TooManyPending`];
//! 7. recorded: its single use, if spent, is claimed.
//!
//! Judging a batch gives the verdicts of committing its requests one by one, in its order (a
//! property test below holds the rules to that).

use std::collections::{BTreeSet, HashMap, HashSet};

use leash_core::dpop::ReplayKey;

use crate::{Approval, OneTimeUse, RequestUse, UseVerdict};

/// A grant's budget: what its count is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Requests counted so far.
    pub(crate) used: i64,
    /// Its `max_requests`, if any.
    pub(crate) max: Option<i64>,
    /// Its end.
    pub(crate) expires_at: i64,
}

impl Budget {
    /// Whether a request at `now` may count against it (or exchange it).
    fn admits(&self, now: i64) -> bool {
        now < self.expires_at && self.max.is_none_or(|max| self.used < max)
    }

    fn used_up(&self) -> bool {
        self.max.is_some_and(|max| self.used >= max)
    }
}

/// What the database held before the batch began, as far as the rules need it. A writer
/// answers from its memory, a statement, or what it fetched for the whole batch beforehand.
pub(crate) trait Facts {
    /// The database's failure.
    type Error;
    /// Whether a one-time value was consumed (on PostgreSQL: by any node).
    fn consumed(&mut self, key: &ReplayKey) -> Result<bool, Self::Error>;
    /// Whether a token is revoked.
    fn revoked(&mut self, jti: &str) -> Result<bool, Self::Error>;
    /// The expiry of an approval that is approved and not used; `None` for any other.
    fn approved_until(&mut self, id: &str) -> Result<Option<i64>, Self::Error>;
    /// The budget of an active grant; `None` for a grant ended or unknown.
    fn budget(&mut self, grant: &str) -> Result<Option<Budget>, Self::Error>;
    /// How many approvals of a grant are pending and unexpired at `at`.
    fn pending_approvals(&mut self, grant: &str, at: i64) -> Result<u64, Self::Error>;
}

/// A grant as a batch counts it: its budget as read, plus the batch's counts.
#[derive(Debug, Clone, Copy)]
struct Counted {
    budget: Budget,
    added: i64,
}

/// What a batch has decided so far, and so what it writes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The one-time values claimed, in the order claimed, with how long each is kept.
    claims: Vec<(ReplayKey, i64)>,
    claimed: HashSet<ReplayKey>,
    /// The grants asked about (`None`: not active), with the batch's counts.
    grants: HashMap<String, Option<Counted>>,
    /// Grants found spent (ended, expired or used up) or used up by the batch.
    spent: BTreeSet<String>,
    /// The approvals the batch spends, with the time of the request that spends each.
    approvals_used: Vec<(String, i64)>,
    /// The pending approvals the batch stores.
    approvals_new: Vec<Approval>,
    /// The sealed bodies kept for them, by approval id.
    previews_new: Vec<(String, Vec<u8>)>,
}

impl Batch {
    /// Decides the next request's verdict (the order is in the module's docs) and notes what
    /// it claims, spends, counts or stores.
    pub(crate) fn judge<F: Facts>(
        &mut self,
        request: &RequestUse,
        facts: &mut F,
    ) -> Result<UseVerdict, F::Error> {
        // A set, not a scan of the earlier values: a request may carry many (a test consumes
        // a hundred thousand at once), and a scan would be quadratic in them.
        let mut own = HashSet::new();
        for value in request.one_time_values() {
            let repeated = !own.insert(value.key);
            if repeated || self.claimed.contains(&value.key) || facts.consumed(&value.key)? {
                return Ok(UseVerdict::Replayed(value.kind));
            }
        }
        for value in &request.once {
            self.claim(value);
        }
        if let Some(jti) = &request.token
            && facts.revoked(jti)?
        {
            return Ok(UseVerdict::TokenRevoked);
        }
        if let Some(id) = &request.approval {
            let spent_here = self.approvals_used.iter().any(|(used, _)| used == id);
            let usable = !spent_here
                && facts
                    .approved_until(id)?
                    .is_some_and(|end| request.now < end);
            if !usable {
                return Ok(UseVerdict::ApprovalSpent);
            }
            self.approvals_used.push((id.clone(), request.now));
        }
        if let Some(grant) = &request.exchanged_grant
            && !self
                .grant(grant, facts)?
                .is_some_and(|c| c.budget.admits(request.now))
        {
            self.spent.insert(grant.clone());
            return Ok(UseVerdict::GrantSpent);
        }
        if let Some(grant) = &request.grant {
            match self.grant(grant, facts)? {
                Some(counted) if counted.budget.admits(request.now) => {
                    counted.budget.used += 1;
                    counted.added += 1;
                    if counted.budget.used_up() {
                        self.spent.insert(grant.clone());
                    }
                }
                _ => {
                    self.spent.insert(grant.clone());
                    return Ok(UseVerdict::GrantSpent);
                }
            }
        }
        if let Some(pending) = &request.pending_approval {
            if let Some(limit) = request.max_pending_approvals {
                let stored = facts.pending_approvals(&pending.grant_id, pending.requested_at)?;
                let here = self
                    .approvals_new
                    .iter()
                    .filter(|new| {
                        new.grant_id == pending.grant_id && new.expires_at > pending.requested_at
                    })
                    .count() as u64;
                if stored + here >= u64::from(limit) {
                    return Ok(UseVerdict::TooManyPending);
                }
            }
            self.approvals_new.push(Approval::clone(pending));
            if let Some(sealed) = &request.pending_preview {
                self.previews_new.push((pending.id.clone(), sealed.clone()));
            }
        }
        if let Some(single) = request.single_use.filter(|single| single.spend) {
            self.claim(&single.value);
        }
        Ok(UseVerdict::Recorded)
    }

    fn claim(&mut self, value: &OneTimeUse) {
        self.claimed.insert(value.key);
        self.claims.push((value.key, value.keep_until));
    }

    /// A grant as counted so far; read from `facts` the first time.
    fn grant<F: Facts>(
        &mut self,
        id: &str,
        facts: &mut F,
    ) -> Result<Option<&mut Counted>, F::Error> {
        if !self.grants.contains_key(id) {
            let budget = facts.budget(id)?;
            let counted = budget.map(|budget| Counted { budget, added: 0 });
            self.grants.insert(id.to_owned(), counted);
        }
        Ok(self.grants.get_mut(id).and_then(Option::as_mut))
    }

    /// The one-time values the batch consumes, in the order claimed, each with the time until
    /// which it is kept.
    pub(crate) fn claims(&self) -> &[(ReplayKey, i64)] {
        &self.claims
    }

    /// Whether the batch consumes a value.
    pub(crate) fn claimed(&self, key: &ReplayKey) -> bool {
        self.claimed.contains(key)
    }

    /// Each grant the batch counted against, with how many requests it counted.
    pub(crate) fn counts(&self) -> impl Iterator<Item = (&str, i64)> {
        self.grants.iter().filter_map(|(id, counted)| {
            counted
                .filter(|counted| counted.added > 0)
                .map(|counted| (id.as_str(), counted.added))
        })
    }

    /// The grants found spent or used up: what memory holds of them must go.
    pub(crate) fn spent(&self) -> impl Iterator<Item = &str> {
        self.spent.iter().map(String::as_str)
    }

    /// The approvals the batch spends, with the time of the request that spends each.
    pub(crate) fn approvals_used(&self) -> &[(String, i64)] {
        &self.approvals_used
    }

    /// The pending approvals the batch stores.
    pub(crate) fn approvals_new(&self) -> &[Approval] {
        &self.approvals_new
    }

    /// The sealed bodies kept for the new approvals.
    pub(crate) fn previews_new(&self) -> &[(String, Vec<u8>)] {
        &self.previews_new
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests abort loudly on failure")]

    use std::collections::{HashMap, HashSet};
    use std::convert::Infallible;

    use leash_core::dpop::ReplayKey;
    use proptest::prelude::*;

    use super::{Batch, Budget, Facts};
    use crate::{
        Approval, ApprovalStatus, OneTimeKind, OneTimeUse, RequestUse, SingleUse, UseVerdict,
    };

    /// A database in memory: what the rules may ask, and what a committed batch changes.
    #[derive(Debug, Clone, Default)]
    struct Db {
        consumed: HashMap<ReplayKey, i64>,
        revoked: HashSet<String>,
        /// Approved approvals and their expiry.
        approved: HashMap<String, i64>,
        grants: HashMap<String, Budget>,
        /// Pending approvals: (grant, expiry).
        pending: Vec<(String, i64)>,
    }

    impl Facts for Db {
        type Error = Infallible;
        fn consumed(&mut self, key: &ReplayKey) -> Result<bool, Infallible> {
            Ok(self.consumed.contains_key(key))
        }
        fn revoked(&mut self, jti: &str) -> Result<bool, Infallible> {
            Ok(self.revoked.contains(jti))
        }
        fn approved_until(&mut self, id: &str) -> Result<Option<i64>, Infallible> {
            Ok(self.approved.get(id).copied())
        }
        fn budget(&mut self, grant: &str) -> Result<Option<Budget>, Infallible> {
            Ok(self.grants.get(grant).copied())
        }
        fn pending_approvals(&mut self, grant: &str, at: i64) -> Result<u64, Infallible> {
            let pending = self.pending.iter();
            Ok(pending.filter(|(g, end)| g == grant && *end > at).count() as u64)
        }
    }

    impl Db {
        /// Writes what `batch` decided, as a writer does at its commit.
        fn commit(&mut self, batch: &Batch) {
            for (key, until) in batch.claims() {
                assert!(
                    self.consumed.insert(*key, *until).is_none(),
                    "a value consumed twice"
                );
            }
            for (id, _) in batch.approvals_used() {
                assert!(
                    self.approved.remove(id).is_some(),
                    "an approval spent twice"
                );
            }
            for (id, added) in batch.counts() {
                let budget = self.grants.get_mut(id).unwrap();
                budget.used += added;
                assert!(
                    budget.max.is_none_or(|max| budget.used <= max),
                    "over budget"
                );
            }
            for new in batch.approvals_new() {
                self.pending.push((new.grant_id.clone(), new.expires_at));
            }
        }

        /// Judges `requests` as one batch and commits it.
        fn judge_batch(&mut self, requests: &[RequestUse]) -> Vec<UseVerdict> {
            let mut batch = Batch::default();
            let verdicts = requests
                .iter()
                .map(|request| batch.judge(request, self).unwrap())
                .collect();
            self.commit(&batch);
            verdicts
        }
    }

    fn key(name: u8) -> ReplayKey {
        [name; 32]
    }

    fn value(kind: OneTimeKind, name: u8) -> OneTimeUse {
        OneTimeUse {
            kind,
            key: key(name),
            keep_until: 100 + i64::from(name),
        }
    }

    fn proof(name: u8) -> OneTimeUse {
        value(OneTimeKind::Proof, name)
    }

    fn single(name: u8, spend: bool) -> SingleUse {
        SingleUse {
            value: value(OneTimeKind::SingleUse, name),
            spend,
        }
    }

    fn counted(grant: &str, proof_name: u8) -> RequestUse {
        RequestUse {
            once: vec![proof(proof_name)],
            grant: Some(grant.into()),
            now: 10,
            ..RequestUse::default()
        }
    }

    fn asking(grant: &str, id: &str, requested_at: i64, limit: u32) -> RequestUse {
        RequestUse {
            pending_approval: Some(Box::new(Approval {
                id: id.into(),
                grant_id: grant.into(),
                subject: "usr_1".into(),
                agent: "agent".into(),
                action: "mail:send".into(),
                upstream: "mail".into(),
                method: "POST".into(),
                path: "/".into(),
                query: None,
                body_sha256: "00".into(),
                body_size: 0,
                headers: Vec::new(),
                headers_sha256: String::new(),
                previewed: false,
                status: ApprovalStatus::Pending,
                requested_at,
                expires_at: requested_at + 50,
                decided_at: None,
                approver: None,
            })),
            max_pending_approvals: Some(limit),
            now: requested_at,
            ..RequestUse::default()
        }
    }

    fn budget(used: i64, max: Option<i64>) -> Budget {
        Budget {
            used,
            max,
            expires_at: 1000,
        }
    }

    #[test]
    fn the_earlier_request_of_a_batch_claims_a_shared_value() {
        let mut db = Db::default();
        let first = RequestUse {
            once: vec![proof(1), value(OneTimeKind::Assertion, 2)],
            ..RequestUse::default()
        };
        let second = RequestUse {
            once: vec![proof(3), value(OneTimeKind::Assertion, 2)],
            ..RequestUse::default()
        };
        let verdicts = db.judge_batch(&[first, second]);
        assert_eq!(
            verdicts,
            [
                UseVerdict::Recorded,
                UseVerdict::Replayed(OneTimeKind::Assertion)
            ]
        );
        // The later one claimed nothing, not even its own new proof.
        assert!(db.consumed.contains_key(&key(1)) && !db.consumed.contains_key(&key(3)));
        assert_eq!(db.consumed[&key(2)], 102);
    }

    #[test]
    fn a_request_refused_as_a_replay_leaves_its_values_to_later_requests() {
        let mut db = Db::default();
        db.consumed.insert(key(9), 0);
        // The first request's proof 1 is new, but its assertion 9 was seen: it claims nothing,
        // so proof 1 is still free for the second request of the same batch.
        let first = RequestUse {
            once: vec![proof(1), value(OneTimeKind::Assertion, 9)],
            ..RequestUse::default()
        };
        let second = RequestUse {
            once: vec![proof(1)],
            ..RequestUse::default()
        };
        let verdicts = db.judge_batch(&[first, second]);
        assert_eq!(
            verdicts,
            [
                UseVerdict::Replayed(OneTimeKind::Assertion),
                UseVerdict::Recorded
            ]
        );
    }

    #[test]
    fn a_request_repeating_its_own_value_is_a_replay_and_claims_nothing() {
        let mut db = Db::default();
        let repeated = RequestUse {
            once: vec![proof(1), proof(1)],
            ..RequestUse::default()
        };
        assert_eq!(
            db.judge_batch(&[repeated]),
            [UseVerdict::Replayed(OneTimeKind::Proof)]
        );
        assert!(db.consumed.is_empty());
        // Its single use repeating one of its values counts the same.
        let mut with_single = counted("g", 2);
        with_single.single_use = Some(SingleUse {
            value: OneTimeUse {
                kind: OneTimeKind::SingleUse,
                ..proof(2)
            },
            spend: true,
        });
        db.grants.insert("g".into(), budget(0, None));
        assert_eq!(
            db.judge_batch(&[with_single]),
            [UseVerdict::Replayed(OneTimeKind::SingleUse)]
        );
    }

    #[test]
    fn a_single_use_only_checked_claims_nothing_and_one_spent_is_claimed_when_recorded() {
        let mut db = Db::default();
        db.grants.insert("g".into(), budget(0, Some(1)));
        let check = RequestUse {
            single_use: Some(single(7, false)),
            ..RequestUse::default()
        };
        let spend = |proof_name| RequestUse {
            single_use: Some(single(7, true)),
            ..counted("g", proof_name)
        };
        // Checked twice and then spent, all in one batch: the checks claim nothing.
        let verdicts = db.judge_batch(&[check.clone(), check.clone(), spend(1)]);
        assert_eq!(verdicts, [UseVerdict::Recorded; 3]);
        assert!(db.consumed.contains_key(&key(7)));
        // Spent: a check or a use is refused as the single use's replay.
        let verdicts = db.judge_batch(&[check, spend(2)]);
        let replayed = UseVerdict::Replayed(OneTimeKind::SingleUse);
        assert_eq!(verdicts, [replayed, replayed]);

        // A use refused for another reason (here the budget) leaves its single use unspent
        // for the next request of the batch, but its proof is consumed.
        let mut db = Db::default();
        db.grants.insert("g".into(), budget(1, Some(1)));
        let other = RequestUse {
            single_use: Some(single(7, true)),
            once: vec![proof(3)],
            ..RequestUse::default()
        };
        let verdicts = db.judge_batch(&[spend(1), other]);
        assert_eq!(verdicts, [UseVerdict::GrantSpent, UseVerdict::Recorded]);
        assert!(db.consumed.contains_key(&key(1)) && db.consumed.contains_key(&key(7)));
    }

    /// Each check refuses only when the earlier ones passed: a request failing several is
    /// refused for the first, in the order replay → token → approval → exchanged grant →
    /// budget → pending approvals.
    #[test]
    fn the_first_failing_check_in_order_names_the_verdict() {
        let mut db = Db::default();
        db.consumed.insert(key(1), 0);
        db.revoked.insert("revoked".into());
        db.grants.insert("spent".into(), budget(3, Some(3)));
        db.grants.insert("live".into(), budget(0, None));
        db.pending.push(("live".into(), 500));
        let failing = RequestUse {
            once: vec![proof(1)],
            token: Some("revoked".into()),
            approval: Some("apr_unknown".into()),
            exchanged_grant: Some("spent".into()),
            grant: Some("spent".into()),
            ..asking("live", "apr_new", 10, 1)
        };
        let mut request = failing.clone();
        let mut expected = Vec::new();
        let mut verdicts = Vec::new();
        for (fix, verdict) in [
            (0, UseVerdict::Replayed(OneTimeKind::Proof)),
            (1, UseVerdict::TokenRevoked),
            (2, UseVerdict::ApprovalSpent),
            (3, UseVerdict::GrantSpent),
            (4, UseVerdict::GrantSpent),
            (5, UseVerdict::TooManyPending),
            (6, UseVerdict::Recorded),
        ] {
            match fix {
                0 => {}
                1 => request.once = vec![proof(2)],
                2 => request.token = Some("live".into()),
                3 => {
                    db.approved.insert("apr_1".into(), 1000);
                    request.approval = Some("apr_1".into());
                    request.once = vec![proof(3)];
                }
                4 => request.exchanged_grant = Some("live".into()),
                5 => request.grant = Some("live".into()),
                _ => request.max_pending_approvals = Some(2),
            }
            let mut batch = Batch::default();
            verdicts.push(batch.judge(&request, &mut db).unwrap());
            expected.push(verdict);
        }
        assert_eq!(verdicts, expected);
    }

    #[test]
    fn a_refusal_after_the_replay_check_keeps_the_proof_consumed_and_spends_nothing_else() {
        let mut db = Db::default();
        db.revoked.insert("t".into());
        db.approved.insert("apr_1".into(), 1000);
        db.grants.insert("g".into(), budget(0, None));
        let request = RequestUse {
            token: Some("t".into()),
            approval: Some("apr_1".into()),
            single_use: Some(single(7, true)),
            ..counted("g", 1)
        };
        assert_eq!(db.judge_batch(&[request]), [UseVerdict::TokenRevoked]);
        assert_eq!(db.consumed.keys().collect::<Vec<_>>(), [&key(1)]);
        assert!(db.approved.contains_key("apr_1"));
        assert_eq!(db.grants["g"].used, 0);
    }

    #[test]
    fn an_approval_is_spent_once_per_batch_and_only_while_approved_and_unexpired() {
        let mut db = Db::default();
        db.approved.insert("apr_1".into(), 20);
        let spend = |proof_name, now| RequestUse {
            once: vec![proof(proof_name)],
            approval: Some("apr_1".into()),
            now,
            ..RequestUse::default()
        };
        let verdicts = db.judge_batch(&[spend(1, 20), spend(2, 19), spend(3, 19)]);
        assert_eq!(
            verdicts,
            [
                UseVerdict::ApprovalSpent,
                UseVerdict::Recorded,
                UseVerdict::ApprovalSpent
            ],
            "expired at its end; then the first in time spends it"
        );
        assert!(db.approved.is_empty());
    }

    #[test]
    fn budgets_are_counted_in_batch_order_against_used_and_max() {
        let mut db = Db::default();
        db.grants.insert("g".into(), budget(1, Some(3)));
        db.grants.insert("h".into(), budget(0, None));
        let requests: Vec<RequestUse> = (0..4).map(|i| counted("g", i)).collect();
        let verdicts = db.judge_batch(&requests);
        use UseVerdict::{GrantSpent, Recorded};
        assert_eq!(verdicts, [Recorded, Recorded, GrantSpent, GrantSpent]);
        assert_eq!(db.grants["g"].used, 3);

        // An exchange needs its grant under the budget as counted so far, and counts nothing.
        let mut db = Db::default();
        db.grants.insert("g".into(), budget(0, Some(1)));
        let exchange = |proof_name| RequestUse {
            once: vec![proof(proof_name)],
            exchanged_grant: Some("g".into()),
            now: 10,
            ..RequestUse::default()
        };
        let verdicts = db.judge_batch(&[exchange(1), counted("g", 2), exchange(3)]);
        assert_eq!(verdicts, [Recorded, Recorded, GrantSpent]);
        assert_eq!(db.grants["g"].used, 1);

        // A grant expired at a request's time, or not active, is spent for it.
        let mut db = Db::default();
        db.grants.insert("g".into(), budget(0, None));
        let late = RequestUse {
            now: 1000,
            ..counted("g", 1)
        };
        let verdicts = db.judge_batch(&[counted("g", 2), late, counted("ended", 3)]);
        assert_eq!(verdicts, [Recorded, GrantSpent, GrantSpent]);
    }

    #[test]
    fn the_grants_a_batch_spends_are_those_refused_or_used_up() {
        let mut db = Db::default();
        db.grants.insert("used_up".into(), budget(0, Some(1)));
        db.grants.insert("room".into(), budget(0, Some(5)));
        db.grants.insert("expired".into(), budget(0, None));
        let exchange = RequestUse {
            exchanged_grant: Some("expired".into()),
            now: 2000,
            ..RequestUse::default()
        };
        let requests = [
            counted("used_up", 1),
            counted("room", 2),
            counted("ended", 3),
            exchange,
        ];
        let mut batch = Batch::default();
        for request in &requests {
            batch.judge(request, &mut db).unwrap();
        }
        assert_eq!(
            batch.spent().collect::<Vec<_>>(),
            ["ended", "expired", "used_up"]
        );
        let mut counts: Vec<_> = batch.counts().collect();
        counts.sort();
        assert_eq!(counts, [("room", 1), ("used_up", 1)]);
    }

    #[test]
    fn the_pending_limit_counts_stored_unexpired_approvals_and_the_batch_own() {
        let mut db = Db::default();
        db.pending.push(("g".into(), 10)); // expired at 10
        db.pending.push(("g".into(), 60));
        db.pending.push(("other".into(), 60));
        let verdicts = db.judge_batch(&[
            asking("g", "apr_1", 10, 3),
            asking("g", "apr_2", 11, 2),
            asking("g", "apr_3", 12, 4),
        ]);
        assert_eq!(
            verdicts,
            [
                UseVerdict::Recorded,
                UseVerdict::TooManyPending,
                UseVerdict::Recorded
            ]
        );
        assert_eq!(db.pending.len(), 5);
        // No limit: always stored.
        let unlimited = RequestUse {
            max_pending_approvals: None,
            ..asking("g", "apr_4", 12, 0)
        };
        assert_eq!(db.judge_batch(&[unlimited]), [UseVerdict::Recorded]);
    }

    /// A small world for generated batches: few keys, grants, tokens and approvals, so that
    /// requests collide on them often.
    fn request() -> impl Strategy<Value = RequestUse> {
        let one_time = (0..3u8, 0..6u8).prop_map(|(kind, name)| {
            let kind = [
                OneTimeKind::Proof,
                OneTimeKind::Assertion,
                OneTimeKind::SingleUse,
            ][usize::from(kind)];
            value(kind, name)
        });
        let name = |prefix: &'static str| (0..3u8).prop_map(move |n| format!("{prefix}{n}"));
        (
            prop::collection::vec(one_time, 0..3),
            prop::option::of((4..8u8, any::<bool>())),
            prop::option::of(name("tok")),
            prop::option::of(name("apr")),
            prop::option::of(name("grt")),
            prop::option::of(name("grt")),
            prop::option::of((name("grt"), 0..3u32)),
            0..40i64,
        )
            .prop_map(
                |(once, single_use, token, approval, grant, exchanged, pending, now)| {
                    let mut request = RequestUse {
                        once,
                        single_use: single_use.map(|(n, spend)| single(n, spend)),
                        token,
                        approval,
                        grant,
                        exchanged_grant: exchanged,
                        now,
                        ..RequestUse::default()
                    };
                    if let Some((grant, limit)) = pending {
                        let asked = asking(&grant, "apr_new", now, limit);
                        request.pending_approval = asked.pending_approval;
                        request.max_pending_approvals = Some(limit).filter(|l| *l > 0);
                    }
                    request
                },
            )
    }

    fn db() -> impl Strategy<Value = Db> {
        let grant =
            (0..3i64, prop::option::of(0..4i64), 10..40i64).prop_map(|(used, max, expires_at)| {
                Budget {
                    used: max.map_or(used, |max| used.min(max)),
                    max,
                    expires_at,
                }
            });
        (
            prop::collection::hash_set(0..8u8, 0..4),
            prop::collection::hash_set(0..3u8, 0..2),
            prop::collection::hash_map(0..3u8, 0..40i64, 0..3),
            prop::collection::hash_map(0..3u8, grant, 0..3),
            prop::collection::vec((0..3u8, 0..60i64), 0..4),
        )
            .prop_map(|(consumed, revoked, approved, grants, pending)| Db {
                consumed: consumed.into_iter().map(|n| (key(n), 0)).collect(),
                revoked: revoked.into_iter().map(|n| format!("tok{n}")).collect(),
                approved: approved
                    .into_iter()
                    .map(|(n, end)| (format!("apr{n}"), end))
                    .collect(),
                grants: grants
                    .into_iter()
                    .map(|(n, budget)| (format!("grt{n}"), budget))
                    .collect(),
                pending: pending
                    .into_iter()
                    .map(|(n, end)| (format!("grt{n}"), end))
                    .collect(),
            })
    }

    proptest! {
        /// Group commit is invisible: the verdicts of a batch, and the database after it, are
        /// those of committing its requests one at a time, in order.
        #[test]
        fn a_batch_decides_as_its_requests_one_by_one(
            start in db(),
            requests in prop::collection::vec(request(), 1..12),
        ) {
            let mut batched = start.clone();
            let together = batched.judge_batch(&requests);
            let mut alone = start;
            let one_by_one: Vec<UseVerdict> = requests
                .iter()
                .flat_map(|request| alone.judge_batch(std::slice::from_ref(request)))
                .collect();
            prop_assert_eq!(&together, &one_by_one);
            prop_assert_eq!(&batched.consumed, &alone.consumed);
            prop_assert_eq!(&batched.approved, &alone.approved);
            prop_assert_eq!(&batched.grants, &alone.grants);
            prop_assert_eq!(&batched.pending, &alone.pending);
        }

        /// What a verdict leaves: a replay claims nothing; any other refusal claims exactly the
        /// values of `once`; a recorded use claims those and its single use if spent.
        #[test]
        fn what_a_verdict_claims(start in db(), request in request()) {
            let mut db = start.clone();
            let verdict = db.judge_batch(std::slice::from_ref(&request))[0];
            let mut expected: Vec<ReplayKey> = match verdict {
                UseVerdict::Replayed(_) => Vec::new(),
                UseVerdict::Recorded => request.consumed().map(|v| v.key).collect(),
                _ => request.once.iter().map(|v| v.key).collect(),
            };
            let mut claimed: Vec<ReplayKey> = db
                .consumed
                .keys()
                .filter(|key| !start.consumed.contains_key(*key))
                .copied()
                .collect();
            expected.sort();
            claimed.sort();
            prop_assert_eq!(claimed, expected);
        }
    }
}
