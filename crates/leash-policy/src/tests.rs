use super::*;

fn actions() -> BTreeSet<String> {
    ["mail:read", "mail:send", "mail:export"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn facts(action: &str, now: i64) -> Facts<'_> {
    Facts {
        mode: Mode::Delegated,
        principal: "spiffe://example.org/agent/mailbot",
        human: "usr_1",
        action,
        upstream: "mail",
        method: "GET",
        path: "/messages/1",
        grant_id: "grt_1",
        purpose: "triage",
        grant_actions: &[],
        grant_age_seconds: 10,
        high_risk: high_risk_by_name(action),
        grant_requires_approval: false,
        approval_attached: false,
        now,
    }
}

// Monday 2026-11-23 10:00 UTC and 22:00 UTC.
const MONDAY_10: i64 = 1_795_428_000;
const MONDAY_22: i64 = MONDAY_10 + 12 * 3600;

#[test]
fn time_parts_are_utc_and_monday_based() {
    assert_eq!(time_parts(MONDAY_10), (10, 600, 0));
    assert_eq!(time_parts(0), (0, 0, 3));
}

fn context_read(policy: &str) -> Vec<&'static str> {
    let engine =
        PolicyEngine::from_sources(&actions(), &[("p.cedar".into(), policy.into())]).unwrap();
    engine.context_read.iter().map(|&(_, name)| name).collect()
}

#[test]
fn only_the_context_attributes_policies_read_are_built() {
    let engine = PolicyEngine::from_sources(&actions(), &[]).unwrap();
    assert!(
        engine.context_read.is_empty(),
        "the built-in permit reads nothing"
    );
    let example = include_str!("../../../examples/policies/business-hours.cedar");
    assert_eq!(context_read(example), ["app", "verb", "hour", "weekday"]);
    assert_eq!(
        context_read(
            r#"forbid(principal, action, resource) when { context["purpose"] like "*tax*" };"#
        ),
        ["purpose"]
    );
    assert_eq!(
        context_read(
            "forbid(principal, action, resource) when { context has grant_id && context.grant_actions.contains(\"mail:send\") };"
        ),
        ["grant_id", "grant_actions"]
    );
    // `context` used as a value: every attribute.
    let all: Vec<&str> = CONTEXT.iter().map(|&(_, name, _)| name).collect();
    assert_eq!(
        context_read(r#"forbid(principal, action, resource) when { {"c": context}.c.hour > 30 };"#),
        all
    );
    assert_eq!(
        context_read(
            r#"forbid(principal, action, resource) when { context == context && context.hour > 30 };"#
        ),
        all
    );
}

#[test]
fn decisions_on_the_read_attributes_equal_those_on_the_whole_context() {
    let policies = r#"
@id("a") forbid(principal, action, resource) when { context.verb == "export" && context.hour >= 17 };
@id("b") forbid(principal is Leash::Agent, action, resource) when { context["app"] == "finance" };
@id("c") forbid(principal, action, resource) when { context has purpose && context.purpose like "*secret*" };
@id("d") forbid(principal, action, resource) when { context.grant_age_seconds > 3600 && context.risk == "high" };
@id("e") forbid(principal, action, resource) unless { context.path like "/messages/*" || context.method == "POST" };
@id("f") forbid(principal, action, resource) unless { context has approval_attached };
@id("w") @approval("not_required") permit(principal, action, resource) when { context.weekday == 0 && context.minute_of_day < 660 };
"#;
    let sources = [("p.cedar".to_owned(), policies.to_owned())];
    let read = PolicyEngine::from_sources(&actions(), &sources).unwrap();
    assert!(read.context_read.len() < CONTEXT.len());
    let mut whole = PolicyEngine::from_sources(&actions(), &sources).unwrap();
    whole.context_read = context_attributes(|_| true);
    let mut decided = std::collections::HashSet::new();
    for action in ["mail:read", "mail:export", "mail:send"] {
        for now in [MONDAY_10, MONDAY_22, MONDAY_10 + 86_400] {
            for (purpose, path, age) in [
                ("triage", "/messages/1", 10),
                ("secret stuff", "/messages/1", 10),
                ("triage", "/drafts/1", 10),
                ("triage", "/messages/1", 7200),
            ] {
                let mut f = facts(action, now);
                f.purpose = purpose;
                f.path = path;
                f.grant_age_seconds = age;
                let decision = read.authorize(&f);
                assert_eq!(decision, whole.authorize(&f), "{f:?}");
                decided.insert(format!("{decision:?}"));
            }
        }
    }
    // The cases reach allow, deny by several policies and approval.
    assert!(decided.len() >= 5, "{decided:?}");
}

#[test]
fn built_context_validates_against_the_schema() {
    let mut engine = PolicyEngine::from_sources(&actions(), &[]).unwrap();
    engine.context_read = context_attributes(|_| true);
    let request = engine.request(&facts("mail:read", MONDAY_10)).unwrap();
    let (schema, _) = Schema::from_cedarschema_str(&schema_text(&actions())).unwrap();
    let context = request.context().unwrap().clone();
    Request::new(
        request.principal().unwrap().clone(),
        request.action().unwrap().clone(),
        request.resource().unwrap().clone(),
        context,
        Some(&schema),
    )
    .unwrap();
}

#[test]
fn defaults_allow_and_require_approval_for_high_risk() {
    let engine = PolicyEngine::from_sources(&actions(), &[]).unwrap();
    assert!(matches!(
        engine.authorize(&facts("mail:read", MONDAY_10)),
        Decision::Allow { .. }
    ));
    assert!(matches!(
        engine.authorize(&facts("mail:export", MONDAY_10)),
        Decision::ApprovalRequired { .. }
    ));
    let mut with_approval = facts("mail:export", MONDAY_10);
    with_approval.approval_attached = true;
    assert!(matches!(
        engine.authorize(&with_approval),
        Decision::Allow { .. }
    ));
    let mut grant_wants_it = facts("mail:read", MONDAY_10);
    grant_wants_it.grant_requires_approval = true;
    assert!(matches!(
        engine.authorize(&grant_wants_it),
        Decision::ApprovalRequired { .. }
    ));
}

#[test]
fn the_system_mode_is_denied_whatever_the_policies() {
    let engine = PolicyEngine::from_sources(&actions(), &[]).unwrap();
    let mut system = facts("mail:read", MONDAY_10);
    system.mode = Mode::System;
    assert!(matches!(engine.authorize(&system), Decision::Deny { .. }));
}

#[test]
fn business_hours_for_exports_decides_with_the_given_clock() {
    let policy = r#"
@id("exports-in-business-hours")
forbid(principal, action, resource)
when { context.verb == "export" && (context.hour < 9 || context.hour >= 17 || context.weekday >= 5) };
"#;
    let engine =
        PolicyEngine::from_sources(&actions(), &[("hours.cedar".into(), policy.into())]).unwrap();
    let mut day = facts("mail:export", MONDAY_10);
    day.approval_attached = true;
    assert!(matches!(engine.authorize(&day), Decision::Allow { .. }));
    let mut night = facts("mail:export", MONDAY_22);
    night.approval_attached = true;
    match engine.authorize(&night) {
        Decision::Deny { policies, .. } => assert_eq!(policies, vec!["exports-in-business-hours"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn explicit_waiver_skips_the_approval_of_a_high_risk_route_but_not_the_grants_own() {
    let policy = r#"
@id("exports-of-mail-need-no-approval")
@approval("not_required")
permit(principal, action == Leash::Action::"mail:export", resource);
"#;
    let engine =
        PolicyEngine::from_sources(&actions(), &[("w.cedar".into(), policy.into())]).unwrap();
    assert!(matches!(
        engine.authorize(&facts("mail:export", MONDAY_10)),
        Decision::Allow { .. }
    ));
    let mut grant_wants_it = facts("mail:export", MONDAY_10);
    grant_wants_it.grant_requires_approval = true;
    assert!(matches!(
        engine.authorize(&grant_wants_it),
        Decision::ApprovalRequired { .. }
    ));
}

#[test]
fn invalid_policies_are_refused_at_load() {
    for bad in [
        "permit(principal, action, resource) when { context.nope == 1 };",
        "permit(principal, action == Leash::Action::\"mail:fly\", resource);",
        "this is not cedar",
        "@approval(\"not_required\") forbid(principal, action, resource);",
        "permit(principal == ?principal, action, resource);",
    ] {
        assert!(
            PolicyEngine::from_sources(&actions(), &[("bad.cedar".into(), bad.into())]).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn an_evaluation_error_denies() {
    // `grant_actions` is a set; `.contains` on a string action is fine, but a long overflow
    // errors at evaluation time and must deny, even though the forbid it sits in is skipped.
    let policy = r#"
@id("overflow")
forbid(principal, action, resource) when { context.grant_age_seconds * 9223372036854775807 > 0 };
"#;
    let engine =
        PolicyEngine::from_sources(&actions(), &[("o.cedar".into(), policy.into())]).unwrap();
    match engine.authorize(&facts("mail:read", MONDAY_10)) {
        Decision::Deny { reason, .. } => assert!(reason.contains("evaluation"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn policies_load_from_a_directory_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.cedar"), "@id(\"deny-finance\") forbid(principal, action, resource) when { context.app == \"finance\" };").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let engine = PolicyEngine::load(&actions(), Some(dir.path())).unwrap();
    assert_eq!(engine.operator_policies(), 1);
    assert!(PolicyEngine::load(&actions(), Some(&dir.path().join("missing"))).is_err());
}
