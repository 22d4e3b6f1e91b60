//! `leash demo` as a newcomer runs it: the whole story, checked by the demo itself, and the
//! interactive pause answered with `leash approvals approve` from "another terminal".

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use super::bin;

fn demo(args: &[&str]) -> Command {
    let mut command = Command::new(bin());
    command
        .arg("demo")
        .args(args)
        .env("NO_COLOR", "1")
        // The demo's server is its own: a user's LEASH_* settings must not leak into it.
        .env("LEASH_LISTEN", "127.0.0.1:1")
        .env("LEASH_DATABASE", "sqlite:///nonexistent/leash.db");
    command
}

/// The lines that tell each step's outcome, in order.
const KEY_LINES: &[&str] = &[
    "1. Alice stores her mailbox session in the vault",
    "[ OK  ] alice put her mailbox session cookie in the vault",
    "2. Alice delegates \"triage my inbox\" for 15 minutes",
    "[ALLOW] GET /gw/mail/messages → 200, 3 messages",
    "[ALLOW] POST /gw/mail/drafts → 201",
    "[ OK  ] the mailbox saw Alice's session cookie, injected by Leash",
    "[ OK  ] the mailbox refreshed its cookie (Set-Cookie); Leash stripped it",
    "[DENY ] GET /gw/mail/export → 403 insufficient_scope",
    "[DENY ] GET /gw/finance/accounts → 403 insufficient_scope",
    "[WAIT ] POST /gw/mail/messages/draft-1/send → 403 approval_required (apr_",
    "[ALLOW] the same request with Leash-Approval → 200",
    "[DENY ] the approval on another message → 403 approval_mismatch",
    "[DENY ] the approved send replayed → 403 approval_required",
    "the mailbox received the send exactly once",
    "[DENY ] with the thief's own DPoP key → 401 invalid_dpop_proof",
    "[DENY ] as a plain Bearer token → 401 invalid_token",
    "[DENY ] the agent's next call with its token → 401 invalid_token",
    "8. A second task through MCP",
    "[ALLOW] tools/list → lookup_contact only",
    "[ALLOW] tools/call lookup_contact {\"name\": \"Bob\"} → Bob Smith",
    "[DENY ] tools/call delete_contact → Leash refused:",
    "9. The audit trail",
    "[ OK  ] hash chain and signed checkpoints verified over all",
    "[FLAG ] never used: mail:delete",
    "Every step behaved as expected.",
];

fn assert_in_order(text: &str, lines: &[&str]) {
    let mut rest = text;
    for line in lines {
        let at = rest
            .find(line)
            .unwrap_or_else(|| panic!("{line:?} missing (or out of order) in:\n{text}"));
        rest = &rest[at + line.len()..];
    }
}

#[test]
fn demo_tells_the_whole_story_and_checks_every_step() {
    let output = demo(&[]).output().expect("run leash demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_in_order(&stdout, KEY_LINES);
    assert!(!stdout.contains('\u{1b}'), "NO_COLOR output has no escapes");
    // The audit table: the approved send, attributed to the human, the agent and the approver.
    let approved_send = stdout
        .lines()
        .find(|l| {
            l.contains("gateway.request") && l.contains("draft-1/send") && l.contains("allow")
        })
        .unwrap_or_else(|| panic!("no allowed send in the audit table:\n{stdout}"));
    let columns: Vec<&str> = approved_send.split_whitespace().collect();
    assert_eq!(
        columns[2..],
        [
            "delegated",
            "alice",
            "inbox-triage",
            "mail:send",
            "POST",
            "/mail/messages/draft-1/send",
            "allow",
            "alice"
        ]
    );
}

#[test]
fn interactive_demo_waits_for_the_human_to_approve_from_another_terminal() {
    let mut child = demo(&["--interactive", "--wait", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run leash demo --interactive");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    let command = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the demo ended before asking:\n{seen}"))
            .expect("read");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("leash approvals approve") {
            break line;
        }
    };
    assert!(
        !seen.contains("[ALLOW] the same request"),
        "nothing is sent before the human decides"
    );
    // `LEASH_URL=… LEASH_TOKEN=… leash approvals approve apr_…`, run as printed.
    let words: Vec<&str> = command.split_whitespace().collect();
    let env = |name: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} not in {command:?}"))
            .to_owned()
    };
    let id = words.last().expect("approval id");
    assert!(id.starts_with("apr_"), "{command}");
    let approve = Command::new(bin())
        .args(["approvals", "approve", id])
        .env("LEASH_URL", env("LEASH_URL="))
        .env("LEASH_TOKEN", env("LEASH_TOKEN="))
        .output()
        .expect("run leash approvals approve");
    assert!(
        approve.status.success(),
        "{}",
        String::from_utf8_lossy(&approve.stderr)
    );
    for line in lines {
        seen.push_str(&line.expect("read"));
        seen.push('\n');
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{seen}");
    assert_in_order(
        &seen,
        &[
            "[ALLOW] the same request with Leash-Approval → 200",
            "[DENY ] the approved send replayed → 403 approval_required",
            "Every step behaved as expected.",
        ],
    );
}
