//! Costs of sealing one audit event: the JCS draft (calling task) and the writer's splice.
//! Run: cargo bench -p leash-core --bench audit_seal

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use leash_core::audit::{AuditEvent, Mode, Outcome};

fn event() -> AuditEvent {
    let mut event = AuditEvent::new("gateway.request", Mode::Delegated, 1_800_000_000);
    event.subject = Some("usr_8f3a0c2b9d4e5f60718293a4".into());
    event.actor = Some("spiffe://example.org/agent/mailbot".into());
    event.grant_id = Some("grt_5d1c9e0a7b3f4e2d8c6a1b0f".into());
    event.purpose = Some("Summarise my inbox and draft replies".into());
    event.action = Some("mail:read".into());
    event.upstream = Some("mail".into());
    event.method = Some("GET".into());
    event.path = Some("/messages/42".into());
    event.decision = Some(Outcome::Allow);
    event.policies = Some(vec!["leash-default-permit".into()]);
    event.request_id = Some("req_000000000000000000000042".into());
    event
}

fn bench(c: &mut Criterion) {
    let event = event();
    let draft = event.draft().expect("draft");
    let prev = "a".repeat(64);
    c.bench_function("audit/draft (JCS)", |b| {
        b.iter(|| black_box(&event).draft().expect("draft"))
    });
    c.bench_function("audit/seal draft (writer)", |b| {
        b.iter(|| black_box(&draft).seal(7, &prev))
    });
    c.bench_function("audit/serde_json compact", |b| {
        b.iter(|| serde_json::to_string(black_box(&event)).expect("json"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
