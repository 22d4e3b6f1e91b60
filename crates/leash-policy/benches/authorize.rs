//! Cost of one Cedar decision on natively built context, with the built-in policy alone and
//! with the example operator policies (part of the gateway's decision path), and of an MCP
//! call whose arguments a policy reads.
//! Run: cargo bench -p leash-policy --bench authorize

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::collections::BTreeSet;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use leash_policy::{Facts, McpCall, Mode, PolicyEngine};

fn bench(c: &mut Criterion) {
    let actions: BTreeSet<String> = [
        "mail:read",
        "mail:draft",
        "mail:send",
        "mail:export",
        "finance:read",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/policies/business-hours.cedar"
    ))
    .expect("example policies");
    let grant_actions = vec!["mail:read".to_owned(), "mail:draft".to_owned()];
    let facts = Facts {
        mode: Mode::Delegated,
        principal: "spiffe://example.org/agent/mailbot",
        human: "usr_1",
        action: "mail:read",
        upstream: "mail",
        method: "GET",
        path: "/messages/42",
        grant_id: "grt_1",
        purpose: "Summarise my inbox",
        grant_actions: &grant_actions,
        grant_age_seconds: 60,
        high_risk: false,
        grant_requires_approval: false,
        approval_attached: false,
        now: 1_795_428_000,
        mcp: None,
    };
    for (name, sources) in [
        ("built-in only", vec![]),
        (
            "with example policies",
            vec![("example.cedar".to_owned(), example)],
        ),
    ] {
        let engine = PolicyEngine::from_sources(&actions, &sources).expect("engine");
        c.bench_function(&format!("authorize/{name}"), |b| {
            b.iter(|| engine.authorize(black_box(&facts)))
        });
    }
    // An MCP tools/call whose arguments a policy reads (built as a Cedar record per call).
    let mut crm = actions.clone();
    crm.insert("crm:pay".to_owned());
    let limit = r#"forbid (principal, action == Leash::Action::"crm:pay", resource)
      when { context has arguments && context.arguments has amount && context.arguments.amount > 1000 };"#;
    let engine = PolicyEngine::from_sources(&crm, &[("pay.cedar".to_owned(), limit.to_owned())])
        .expect("engine");
    let arguments =
        serde_json::json!({"amount": 900, "to": "acme", "lines": [{"sku": "a", "qty": 2}]});
    let mut call = facts.clone();
    call.action = "crm:pay";
    call.mcp = Some(McpCall {
        tool: "pay",
        arguments: &arguments,
    });
    c.bench_function("authorize/mcp call, argument policy", |b| {
        b.iter(|| engine.authorize(black_box(&call)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
