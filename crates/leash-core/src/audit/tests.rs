use proptest::prelude::*;

use super::*;

fn key() -> SigningKey {
    SigningKey::new(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]))
}

/// A chain of `n` events with a checkpoint every `every` events and one at the end.
fn chain(n: u64, every: u64) -> (Vec<String>, Vec<Checkpoint>) {
    let key = key();
    let mut prev = GENESIS_HASH.to_owned();
    let mut lines = Vec::new();
    let mut checkpoints = Vec::new();
    for seq in 1..=n {
        let mut event = AuditEvent::new("gateway.request", Mode::Delegated, 1_800_000_000);
        event.subject = Some("usr_1".into());
        event.actor = Some("spiffe://example.org/agent/mailbot".into());
        event.path = Some(format!("/messages/{seq}"));
        event.decision = Some(if seq % 3 == 0 {
            Outcome::Deny
        } else {
            Outcome::Allow
        });
        event.policies = Some(vec!["leash-default-high-risk".into()]);
        lines.push(event.seal(seq, &prev).expect("seal"));
        prev = event.hash.clone();
        if seq % every == 0 || seq == n {
            checkpoints.push(Checkpoint::sign(&key, seq, &prev, 1_800_000_000).expect("sign"));
        }
    }
    (lines, checkpoints)
}

fn verify(lines: &[String], checkpoints: &[Checkpoint]) -> Result<u64, ChainBreak> {
    let public = key().public();
    let mut verifier =
        ChainVerifier::new(checkpoints, |_| Some(public.clone())).expect("checkpoints are good");
    for line in lines {
        verifier.push(line)?;
    }
    verifier.finish()
}

#[test]
fn an_untouched_chain_verifies() {
    let (lines, checkpoints) = chain(25, 10);
    assert_eq!(verify(&lines, &checkpoints), Ok(25));
}

#[test]
fn the_hash_covers_prev_hash_and_every_member_in_canonical_form() {
    let mut event = AuditEvent::new("grant.created", Mode::Direct, 0);
    let line = event.seal(1, GENESIS_HASH).expect("seal");
    // JCS: members sorted, nulls kept, no whitespace.
    assert!(line.starts_with(
        r#"{"action":null,"actor":null,"approver":null,"decision":null,"grant_id":null,"hash":""#
    ));
    assert!(line.contains(r#""mode":"direct""#));
    assert!(line.contains(r#""ts":"1970-01-01T00:00:00Z""#));
    let without: String = line.replace(&format!(r#""hash":"{}","#, event.hash), "");
    assert_eq!(hex::encode(Sha256::digest(without.as_bytes())), event.hash);
    let mut other = event.clone();
    assert_ne!(other.seal(1, &"1".repeat(64)).expect("seal"), line);
}

#[test]
fn a_modes_name_is_its_wire_name() {
    for mode in [Mode::Delegated, Mode::Direct, Mode::System] {
        let wire = serde_json::to_value(mode).unwrap();
        assert_eq!(wire.as_str(), Some(mode.as_str()));
    }
}

#[test]
fn a_forged_checkpoint_signature_is_caught() {
    let (_, mut checkpoints) = chain(5, 5);
    let forger = SigningKey::new(ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]));
    let forged = Checkpoint::sign(&forger, 5, &checkpoints[0].hash, 1_800_000_000).expect("sign");
    checkpoints[0].sig = forged.sig;
    let public = key().public();
    let refused = ChainVerifier::new(&checkpoints, |_| Some(public.clone())).map(|_| ());
    assert_eq!(refused, Err(CheckpointError::BadSignature(5)));
    let mut moved = chain(5, 5).1;
    moved[0].seq = 4;
    let refused = ChainVerifier::new(&moved, |_| Some(public.clone())).map(|_| ());
    assert_eq!(refused, Err(CheckpointError::BadSignature(4)));
    let unknown = ChainVerifier::new(&chain(5, 5).1, |_| None).map(|_| ());
    assert!(matches!(unknown, Err(CheckpointError::UnknownKey(5, _))));
}

#[test]
fn a_rehashed_edit_is_caught_by_the_next_link_or_the_checkpoint() {
    let (mut lines, checkpoints) = chain(6, 3);
    // The forger recomputes the edited event's own hash: the next event's prev_hash breaks.
    let mut event: AuditEvent = serde_json::from_str(&lines[1]).expect("event");
    event.approver = Some("usr_mallory".into());
    let prev = event.prev_hash.clone();
    lines[1] = event.seal(2, &prev).expect("seal");
    assert_eq!(verify(&lines, &checkpoints).map_err(|b| b.seq), Err(3));
    // Re-hashing the whole rest of the chain still differs from the signed checkpoint at 3.
    let mut prev = event.hash.clone();
    for line in lines.iter_mut().skip(2) {
        let mut next: AuditEvent = serde_json::from_str(line).expect("event");
        *line = next.seal(next.seq, &prev).expect("seal");
        prev = next.hash;
    }
    assert_eq!(verify(&lines, &checkpoints).map_err(|b| b.seq), Err(3));
}

#[derive(Debug, Clone, Copy)]
enum Tamper {
    Edit(&'static str),
    Delete,
    Insert,
    Swap,
    Truncate,
}

fn tamper(lines: &mut Vec<String>, at: usize, how: Tamper) -> u64 {
    let seq = at as u64 + 1;
    match how {
        Tamper::Edit(member) => {
            let mut value: Value = serde_json::from_str(&lines[at]).expect("event");
            value[member] = match &value[member] {
                Value::String(s) => Value::String(format!("{s}x")),
                Value::Number(n) => Value::from(n.as_u64().unwrap_or(0) + 100),
                _ => Value::String("edited".into()),
            };
            lines[at] = value.to_string();
            seq
        }
        Tamper::Delete => {
            lines.remove(at);
            seq
        }
        Tamper::Insert => {
            let copy = lines[at].clone();
            lines.insert(at + 1, copy);
            seq + 1
        }
        Tamper::Swap => {
            lines.swap(at, at + 1);
            seq
        }
        Tamper::Truncate => {
            lines.truncate(at);
            seq
        }
    }
}

fn tamperings() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        prop::sample::select(vec![
            "seq",
            "ts",
            "kind",
            "mode",
            "subject",
            "actor",
            "grant_id",
            "purpose",
            "action",
            "upstream",
            "method",
            "path",
            "decision",
            "reason",
            "policies",
            "approver",
            "request_id",
            "prev_hash",
            "hash",
        ])
        .prop_map(Tamper::Edit),
        Just(Tamper::Delete),
        Just(Tamper::Insert),
        Just(Tamper::Swap),
        Just(Tamper::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any single edit, removal, insertion, reordering or cut names the seq where it happened.
    #[test]
    fn any_tampering_is_found_at_its_seq(n in 2u64..40, position in 0usize..1000, how in tamperings()) {
        let (mut lines, checkpoints) = chain(n, 7);
        let last = lines.len() - 1;
        let at = match how {
            Tamper::Swap => position % last,
            _ => position % lines.len(),
        };
        let expected = tamper(&mut lines, at, how);
        let found = verify(&lines, &checkpoints);
        prop_assert_eq!(found.map_err(|b| b.seq), Err(expected));
    }
}

#[test]
fn a_reformatted_but_equal_event_still_verifies() {
    let (lines, checkpoints) = chain(3, 3);
    let pretty: Vec<String> = lines
        .iter()
        .map(|l| {
            let value: Value = serde_json::from_str(l).expect("event");
            serde_json::to_string_pretty(&value)
                .expect("json")
                .replace('\n', " ")
        })
        .collect();
    assert_eq!(verify(&pretty, &checkpoints), Ok(3));
}

proptest! {
    /// A draft sealed by the writer is byte for byte the event sealed whole (for every seq
    /// JCS writes exactly: up to 2^53, as numbers are IEEE doubles in JCS).
    #[test]
    fn a_sealed_draft_is_the_sealed_event(
        seq in 1u64..(1u64 << 53),
        path in ".{0,40}",
        reason in proptest::option::of(".{0,40}"),
        prev in "[0-9a-f]{64}",
    ) {
        let mut event = AuditEvent::new("gateway.request", Mode::Direct, 1_800_000_000);
        event.path = Some(path);
        event.reason = reason;
        event.policies = Some(vec![r#"quote " and "hash":"","#.into()]);
        let draft = event.draft().expect("draft");
        let (line, hash) = draft.seal(seq, &prev);
        let whole = event.seal(seq, &prev).expect("seal");
        prop_assert_eq!(&line, &whole);
        prop_assert_eq!(&hash, &event.hash);
        // The writer seals into buffers it reuses: what they held before leaves no trace.
        let (mut reused_line, mut reused_hash) = ("x".repeat(2048), "y".repeat(100));
        draft.seal_into(seq, &prev, &mut reused_line, &mut reused_hash);
        prop_assert_eq!(reused_line, whole);
        prop_assert_eq!(reused_hash, hash);
    }
}

/// RFC 8785 §3.2.2 and §3.2.3: escaping, literals, numbers and UTF-16 member order.
#[test]
#[allow(
    clippy::excessive_precision,
    reason = "the RFC's input numbers, digit for digit"
)]
fn canonical_form_matches_the_rfc_8785_examples() {
    let input = serde_json::json!({
        "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u{20ac}$\u{000F}\u{000a}A'\u{0042}\u{0022}\u{005c}\\\"/",
        "literals": [null, true, false]
    });
    let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
    assert_eq!(
        String::from_utf8(canonical(&input).expect("jcs")).expect("utf8"),
        expected
    );
    let sorting = serde_json::json!({
        "\u{20ac}": "Euro Sign", "\r": "Carriage Return", "\u{fb33}": "Hebrew Letter Dalet With Dagesh",
        "1": "One", "\u{1f600}": "Emoji: Grinning Face", "\u{0080}": "Control", "\u{00f6}": "Latin Small Letter O With Diaeresis"
    });
    let text = String::from_utf8(canonical(&sorting).expect("jcs")).expect("utf8");
    let positions: Vec<usize> = [
        "Carriage Return",
        "One",
        "Control",
        "Latin Small",
        "Euro Sign",
        "Emoji",
        "Hebrew",
    ]
    .iter()
    .map(|name| text.find(name).expect("present"))
    .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "members not in UTF-16 order: {positions:?}"
    );
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, with control characters, quotes and backslashes made likely.
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x1f\\x7f\"\\\\a-z\u{2028}\u{20ac}\u{1f600}]{0,24}",
    ]
}

proptest! {
    /// serde_json's output of an event is exactly the RFC 8785 crate's (see `draft`).
    #[test]
    fn a_draft_is_the_rfc_8785_form(
        strings in proptest::collection::vec(proptest::option::of(text()), 12),
        policies in proptest::option::of(proptest::collection::vec(text(), 0..4)),
        seq in 0u64..(1u64 << 53),
    ) {
        let mut event = AuditEvent::new("gateway.request", Mode::System, 1_800_000_000);
        let mut s = strings.into_iter();
        event.action = s.next().flatten();
        event.actor = s.next().flatten();
        event.approver = s.next().flatten();
        event.grant_id = s.next().flatten();
        event.kind = s.next().flatten().unwrap_or_default();
        event.method = s.next().flatten();
        event.path = s.next().flatten();
        event.purpose = s.next().flatten();
        event.reason = s.next().flatten();
        event.request_id = s.next().flatten();
        event.subject = s.next().flatten();
        event.upstream = s.next().flatten();
        event.policies = policies;
        event.decision = Some(Outcome::ApprovalRequired);
        event.seq = seq;
        let ours = serde_json::to_string(&event).expect("json");
        let reference = String::from_utf8(canonical(&event).expect("jcs")).expect("utf8");
        prop_assert_eq!(ours, reference);
    }
}
