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
        mcp: None,
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

fn crm_actions() -> BTreeSet<String> {
    ["crm:pay", "crm:read"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The example of API §14's operators: no payment above 1000.
const PAY_LIMIT: &str = r#"
@id("pay-limit")
forbid (principal, action == Leash::Action::"crm:pay", resource)
  when { context has arguments && context.arguments has amount && context.arguments.amount > 1000 };
"#;

fn call<'a>(tool: &'a str, arguments: &'a serde_json::Value) -> Facts<'a> {
    let mut f = facts("crm:pay", MONDAY_10);
    f.upstream = "crm";
    f.method = "POST";
    f.path = "";
    f.mcp = Some(McpCall { tool, arguments });
    f
}

fn pay_limit_engine() -> PolicyEngine {
    PolicyEngine::from_sources(&crm_actions(), &[("pay.cedar".into(), PAY_LIMIT.into())]).unwrap()
}

#[test]
fn the_example_argument_policy_validates_and_decides() {
    // `leash policy check` is `PolicyEngine::load`: it accepts the policy.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pay.cedar"), PAY_LIMIT).unwrap();
    assert_eq!(
        PolicyEngine::load(&crm_actions(), Some(dir.path()))
            .unwrap()
            .operator_policies(),
        1
    );
    let engine = pay_limit_engine();
    assert_eq!(
        engine
            .context_read
            .iter()
            .map(|&(_, n)| n)
            .collect::<Vec<_>>(),
        ["arguments"]
    );
    let high = serde_json::json!({"amount": 1001, "to": "acme"});
    match engine.authorize(&call("pay", &high)) {
        Decision::Deny { policies, .. } => assert_eq!(policies, ["pay-limit"]),
        other => panic!("{other:?}"),
    }
    let limit = serde_json::json!({"amount": 1000, "to": "acme"});
    assert!(matches!(
        engine.authorize(&call("pay", &limit)),
        Decision::Allow { .. }
    ));
    // Without the member, or for a request that is no MCP call, the forbid does not apply.
    let other = serde_json::json!({"to": "acme"});
    assert!(matches!(
        engine.authorize(&call("pay", &other)),
        Decision::Allow { .. }
    ));
    assert!(matches!(
        engine.authorize(&facts("crm:pay", MONDAY_10)),
        Decision::Allow { .. }
    ));
}

#[test]
fn argument_policies_are_validated_except_behind_has() {
    for good in [
        r#"forbid (principal, action, resource) when { context has tool && context.tool == "pay" };"#,
        r#"forbid (principal, action, resource) when { context has arguments && context.arguments has to && context.arguments.to like "*@evil.example" };"#,
        r#"forbid (principal, action, resource) when { context has arguments && context.arguments has a && context.arguments.a has b && context.arguments.a.b.contains(3) };"#,
        r#"forbid (principal, action, resource) unless { context has arguments && context.arguments has amount && context.arguments.amount <= 1000 };"#,
    ] {
        PolicyEngine::from_sources(&crm_actions(), &[("p.cedar".into(), good.into())])
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        // Unguarded: refused at load.
        r#"forbid (principal, action, resource) when { context.arguments.amount > 1000 };"#,
        r#"forbid (principal, action, resource) when { context has arguments && context.arguments.amount > 1000 };"#,
        r#"forbid (principal, action, resource) when { context.tool == "pay" };"#,
        r#"forbid (principal, action, resource) when { context has tool && context.tool > 3 };"#,
    ] {
        assert!(
            PolicyEngine::from_sources(&crm_actions(), &[("p.cedar".into(), bad.into())]).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn a_type_mistake_behind_has_denies_at_evaluation() {
    let policy = r#"@id("t") forbid (principal, action, resource) when { context has arguments && context.arguments has amount && context.arguments.amount like "9*" };"#;
    let engine =
        PolicyEngine::from_sources(&crm_actions(), &[("p.cedar".into(), policy.into())]).unwrap();
    let args = serde_json::json!({"amount": 5});
    match engine.authorize(&call("pay", &args)) {
        Decision::Deny { reason, .. } => assert!(reason.contains("evaluation"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tool_and_nested_arguments_reach_policy() {
    let policy = r#"
@id("no-delete-tool") forbid (principal, action, resource) when { context has tool && context.tool == "delete_contact" };
@id("no-evil-cc") forbid (principal, action, resource) when { context has arguments && context.arguments has mail && context.arguments.mail has cc && context.arguments.mail.cc.contains("x@evil.example") };
@id("odd-name") forbid (principal, action, resource) when { context has arguments && context.arguments has "dry run" && context.arguments["dry run"] == false };
"#;
    let engine =
        PolicyEngine::from_sources(&crm_actions(), &[("p.cedar".into(), policy.into())]).unwrap();
    let denied_by = |tool: &str, args: serde_json::Value| match engine.authorize(&call(tool, &args))
    {
        Decision::Deny { policies, .. } => policies,
        Decision::Allow { .. } => vec![],
        other => panic!("{other:?}"),
    };
    assert_eq!(
        denied_by("delete_contact", serde_json::json!({})),
        ["no-delete-tool"]
    );
    assert_eq!(
        denied_by(
            "send",
            serde_json::json!({"mail": {"cc": ["a@b.example", "x@evil.example"]}})
        ),
        ["no-evil-cc"]
    );
    // Order and repetition do not matter to a set.
    assert_eq!(
        denied_by(
            "send",
            serde_json::json!({"mail": {"cc": ["x@evil.example", "x@evil.example"]}})
        ),
        ["no-evil-cc"]
    );
    assert!(denied_by("send", serde_json::json!({"mail": {"cc": ["a@b.example"]}})).is_empty());
    assert_eq!(
        denied_by("send", serde_json::json!({"dry run": false})),
        ["odd-name"]
    );
    assert!(
        denied_by(
            "send",
            serde_json::json!({"dry run": true, "n": -5, "s": "", "e": [], "o": {}})
        )
        .is_empty()
    );
}

#[test]
fn arguments_cedar_cannot_represent_deny_with_their_path() {
    let two_to_70: serde_json::Value = serde_json::from_str("1180591620717411303424").unwrap();
    let cases = [
        (
            serde_json::json!({"amount": null}),
            "arguments.amount is null",
        ),
        (
            serde_json::json!({"amount": 1.5}),
            "arguments.amount is a number",
        ),
        (
            serde_json::json!({"amount": 1.0}),
            "arguments.amount is a number",
        ),
        (
            serde_json::json!({"amount": two_to_70}),
            "arguments.amount is a number",
        ),
        (
            serde_json::json!({"amount": u64::MAX}),
            "arguments.amount is a number",
        ),
        (
            serde_json::json!({"to": "a", "lines": [{"sku": "x"}, {"sku": "y", "qty": null}]}),
            "arguments.lines[1].qty is null",
        ),
        (
            serde_json::json!({"odd name": {"x": null}}),
            r#"arguments["odd name"].x is null"#,
        ),
        (serde_json::json!(null), "arguments is null"),
    ];
    // Whether or not a loaded policy reads `arguments`, and whether it would permit or forbid.
    let none = PolicyEngine::from_sources(&crm_actions(), &[]).unwrap();
    let tool_only = PolicyEngine::from_sources(
        &crm_actions(),
        &[(
            "t.cedar".into(),
            r#"forbid (principal, action, resource) when { context has tool && context.tool == "x" };"#.into(),
        )],
    )
    .unwrap();
    assert!(!none.reads_arguments && !tool_only.reads_arguments);
    for engine in [&none, &tool_only, &pay_limit_engine()] {
        for (args, path) in &cases {
            match engine.authorize(&call("pay", args)) {
                Decision::Deny { policies, reason } => {
                    assert_eq!(policies, [ARGUMENTS_POLICY_ID]);
                    assert!(reason.contains(path), "{reason} lacks {path}");
                    assert!(reason.contains("integers within i64"), "{reason}");
                }
                other => panic!("{args}: {other:?}"),
            }
        }
        // i64's own bounds are exact.
        let edges = serde_json::json!({"amount": i64::MIN, "b": i64::MAX});
        assert!(!matches!(
            engine.authorize(&call("pay", &edges)),
            Decision::Deny { .. }
        ));
    }
}

#[test]
fn deeply_nested_arguments_deny_instead_of_recursing() {
    let mut deep = serde_json::json!(1);
    for _ in 0..MAX_ARGUMENT_DEPTH {
        deep = serde_json::json!([deep]);
    }
    let engine = pay_limit_engine();
    let args = serde_json::json!({"a": deep});
    match engine.authorize(&call("pay", &args)) {
        Decision::Deny { reason, .. } => assert!(reason.contains("nested too deep"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let none = PolicyEngine::from_sources(&crm_actions(), &[]).unwrap();
    assert!(matches!(
        none.authorize(&call("pay", &args)),
        Decision::Deny { .. }
    ));
}

#[test]
fn an_mcp_context_without_arguments_members_validates_against_the_schema() {
    let mut engine = PolicyEngine::from_sources(&crm_actions(), &[]).unwrap();
    engine.context_read = context_attributes(|_| true);
    engine.reads_arguments = true;
    let empty = serde_json::json!({});
    let request = engine.request(&call("pay", &empty)).unwrap();
    let (schema, _) = Schema::from_cedarschema_str(&schema_text(&crm_actions())).unwrap();
    Request::new(
        request.principal().unwrap().clone(),
        request.action().unwrap().clone(),
        request.resource().unwrap().clone(),
        request.context().unwrap().clone(),
        Some(&schema),
    )
    .unwrap();
}

/// Per-agent and per-action policies, more than [`SLICE_FROM`], of every scope shape.
fn many_policies(agents: usize) -> String {
    let mut text = String::new();
    for i in 0..agents {
        let agent = format!("spiffe://example.org/agent/a{i}");
        text.push_str(&format!(
            "@id(\"send-{i}\")\nforbid(principal == Leash::Agent::\"{agent}\", action == Leash::Action::\"mail:send\", resource) when {{ context.hour >= 20 }};\n"
        ));
        text.push_str(&format!(
            "@id(\"in-{i}\")\nforbid(principal in Leash::Agent::\"{agent}\", action in [Leash::Action::\"mail:export\", Leash::Action::\"mail:read\"], resource) when {{ context.purpose == \"p{i}\" }};\n"
        ));
    }
    text.push_str(
        "@id(\"is-agent\")\nforbid(principal is Leash::Agent, action == Leash::Action::\"mail:export\", resource) when { context.purpose like \"*leak*\" };\n\
         @id(\"waive-read\")\n@approval(\"not_required\")\npermit(principal == Leash::Agent::\"spiffe://example.org/agent/a1\", action == Leash::Action::\"mail:export\", resource);\n\
         @id(\"everyone-late\")\nforbid(principal, action, resource) when { context.hour == 23 };\n",
    );
    text
}

#[test]
fn a_sliced_policy_set_decides_exactly_as_the_whole_set() {
    let agents = 40;
    let engine =
        PolicyEngine::from_sources(&actions(), &[("many.cedar".into(), many_policies(agents))])
            .unwrap();
    let whole = engine.policies.whole.policies().count();
    assert!(whole > SLICE_FROM, "sliced at all");
    let mut compared = 0;
    for i in 0..agents + 2 {
        let principal = format!("spiffe://example.org/agent/a{i}");
        let purpose = format!("p{i}");
        for action in ["mail:read", "mail:send", "mail:export"] {
            for (now, purpose) in [
                (MONDAY_10, purpose.as_str()),
                (MONDAY_22, "triage"),
                (MONDAY_22 + 3600, "leak it"),
            ] {
                let mut facts = facts(action, now);
                facts.principal = &principal;
                facts.purpose = purpose;
                let request = engine.request(&facts).unwrap();
                let slice = engine.policies.for_request(&request);
                let sliced = slice.policies().count();
                assert!(sliced <= 8, "{sliced} of {whole} policies");
                let reasons = |set: &PolicySet| {
                    let response = engine
                        .authorizer
                        .is_authorized(&request, set, &engine.entities);
                    let mut reasons: Vec<String> = response
                        .diagnostics()
                        .reason()
                        .map(ToString::to_string)
                        .collect();
                    reasons.sort();
                    (
                        response.decision(),
                        reasons,
                        response.diagnostics().errors().count(),
                    )
                };
                assert_eq!(
                    reasons(&slice),
                    reasons(&engine.policies.whole),
                    "{principal} {action} {purpose}"
                );
                let waivers = engine.waivers.for_request(&request);
                assert_eq!(
                    engine
                        .authorizer
                        .is_authorized(&request, &waivers, &engine.entities)
                        .decision(),
                    engine
                        .authorizer
                        .is_authorized(&request, &engine.waivers.whole, &engine.entities)
                        .decision(),
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, (agents + 2) * 9);
    // The decisions themselves: an agent's own forbid, another's not, the one waiver.
    let decide = |agent: usize, action: &str, now: i64, purpose: &str| {
        let principal = format!("spiffe://example.org/agent/a{agent}");
        let mut facts = facts(action, now);
        facts.principal = &principal;
        facts.purpose = purpose;
        engine.authorize(&facts)
    };
    assert!(
        matches!(decide(3, "mail:send", MONDAY_22, "x"), Decision::Deny { policies, .. } if policies == ["send-3"])
    );
    assert!(matches!(
        decide(3, "mail:read", MONDAY_10, "p4"),
        Decision::Allow { .. }
    ));
    assert!(
        matches!(decide(4, "mail:read", MONDAY_10, "p4"), Decision::Deny { policies, .. } if policies == ["in-4"])
    );
    assert!(
        matches!(
            decide(1, "mail:export", MONDAY_10, "x"),
            Decision::Allow { .. }
        ),
        "waived"
    );
    assert!(matches!(
        decide(2, "mail:export", MONDAY_10, "x"),
        Decision::ApprovalRequired { .. }
    ));
}
