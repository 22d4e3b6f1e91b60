//! The audit trail (API §8) end to end: what each request leaves in the log, who may read it,
//! export and offline verification through the CLI, a failing audit write, and `kill -9` under
//! gateway load.

use std::process::Output;

use leash_testkit::{ADMIN_KEY, Leash};
use reqwest::Method;
use serde_json::{Value, json};

use super::bin;
use super::gateway::{Gw, grant, metric, scrape, setup};

/// `GET /v1/audit?…` as `key`: status and the events.
pub async fn audit(leash: &Leash, key: &str, query: &str) -> (u16, Vec<Value>) {
    let response = leash
        .http()
        .get(format!("{}/v1/audit{query}", leash.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    if status != 200 {
        return (status, vec![serde_json::from_str(&text).unwrap()]);
    }
    let events = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (status, events)
}

fn cli(leash: &Leash, args: &[&str]) -> Output {
    std::process::Command::new(bin())
        .args(args)
        .env("LEASH_URL", &leash.url)
        .env("LEASH_TOKEN", ADMIN_KEY)
        .env_remove("LEASH_MASTER_KEY")
        .output()
        .expect("run leash")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `leash audit verify --database` on the server's own database, with its master key.
fn verify_database(leash: &Leash) {
    let data = leash.data_dir();
    let url = leash.database_url();
    let data = data.to_str().unwrap();
    let out = cli(
        leash,
        &["audit", "verify", "--database", &url, "--data-dir", data],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("audit chain verified"),
        "{}",
        text(&out)
    );
}

fn gateway_events(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "gateway.request")
        .collect()
}

/// A mix of allowed, refused, approval-needing and direct requests around one grant.
async fn workload() -> Gw {
    let gw = setup(
        "",
        grant(
            &["mail:read", "mail:draft", "mail:send"],
            &["mail"],
            json!({"approval_required": ["mail:send"]}),
        ),
    )
    .await;
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/1", &[]).await.0,
        200
    );
    assert_eq!(gw.call(Method::GET, "/gw/mail/export", &[]).await.0, 403);
    assert_eq!(gw.call(Method::GET, "/gw/finance/ledger", &[]).await.0, 403);
    assert_eq!(
        gw.call(Method::POST, "/gw/mail/messages/1/send", &[])
            .await
            .0,
        403
    );
    let direct = gw
        .leash
        .http()
        .get(format!("{}/gw/mail/messages/2", gw.leash.url))
        .bearer_auth(&gw.s.user_key)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    gw
}

#[tokio::test]
async fn every_decision_is_logged_with_who_for_whom_and_why_and_delegated_is_told_from_direct() {
    let gw = workload().await;
    let (status, events) = audit(&gw.leash, ADMIN_KEY, "").await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in [
        "user.created",
        "agent.registered",
        "grant.created",
        "credential.stored",
        "token.exchange",
    ] {
        assert!(kinds.contains(&kind), "no {kind} event in {kinds:?}");
    }
    let gateway = gateway_events(&events);
    let summary: Vec<(&str, &str, &str, &str)> = gateway
        .iter()
        .map(|e| {
            (
                e["mode"].as_str().unwrap(),
                e["decision"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(summary[0], ("delegated", "allow", "/messages/1", ""));
    assert_eq!(
        summary[1],
        ("delegated", "deny", "/export", "insufficient_scope")
    );
    assert_eq!(
        summary[2],
        ("delegated", "deny", "/ledger", "insufficient_scope")
    );
    assert_eq!(summary[3].0, "delegated");
    assert_eq!(summary[3].1, "approval_required");
    assert!(
        summary[3].3.starts_with("apr_"),
        "the approval is named: {summary:?}"
    );
    assert_eq!(summary[4], ("direct", "allow", "/messages/2", ""));
    let allowed = gateway[0];
    assert_eq!(allowed["subject"], gw.s.user_id.as_str());
    assert_eq!(allowed["actor"], leash_testkit::AGENT);
    assert_eq!(allowed["grant_id"], gw.s.grant_id());
    assert_eq!(allowed["purpose"], "Triage my inbox");
    assert_eq!(allowed["action"], "mail:read");
    assert_eq!(allowed["method"], "GET");
    assert!(
        allowed["policies"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    // The request id the upstream saw is the one in the log.
    let first = &gw.upstream.requests()[0];
    assert_eq!(
        first.headers["leash-request-id"],
        allowed["request_id"].as_str().unwrap()
    );
    assert_eq!(gateway[4]["actor"], gw.s.user_id.as_str());
    assert!(gateway[4]["grant_id"].is_null());
    // Every member is present (null where it does not apply), and the chain is numbered.
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["seq"], index as u64 + 1);
        assert_eq!(event.as_object().unwrap().len(), 19, "{event}");
    }
    // No secret, token or handle in any event.
    let raw = serde_json::to_string(&events).unwrap();
    for secret in [
        "alice-mail-secret",
        gw.token.as_str(),
        gw.s.handle(),
        gw.s.user_key.as_str(),
        ADMIN_KEY,
    ] {
        assert!(!raw.contains(secret), "a secret is in the audit log");
    }
}

/// A stolen token used with the thief's own key, a Bearer downgrade and a call after the task
/// was revoked are refused, and each refusal names the human, agent and grant of the token (its
/// signature is Leash's own); a forged token names no one.
#[tokio::test]
async fn refusals_of_a_genuine_token_name_its_human_agent_and_grant_and_forged_ones_nobody() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let thief = leash_core::client::AgentKey::generate(leash_core::jws::Alg::EdDsa);
    let stolen = thief.dpop_proof("GET", &url, Some(&gw.token), None, leash_testkit::now());
    let http = gw.leash.http();
    let send = |auth: String, proof: Option<String>| {
        let mut request = http.get(&url).header("Authorization", auth);
        if let Some(proof) = proof {
            request = request.header("DPoP", proof);
        }
        request.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            send(format!("DPoP {}", gw.token), Some(stolen))
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        status(send(format!("Bearer {}", gw.token), None).await.unwrap()),
        401
    );
    // One signature character changed well inside the signature (the last one may carry only
    // padding bits).
    let mut forged = gw.token.clone().into_bytes();
    let at = forged.len() - 10;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let proof = gw
        .dpop
        .dpop_proof("GET", &url, Some(&forged), None, leash_testkit::now());
    assert_eq!(
        status(send(format!("DPoP {forged}"), Some(proof)).await.unwrap()),
        401
    );
    let revoke = format!("/v1/grants/{}/revoke", gw.s.grant_id());
    assert_eq!(
        gw.leash
            .call(Method::POST, &revoke, &gw.s.user_key, None)
            .await
            .0,
        200
    );
    gw.refused(Method::GET, "/gw/mail/messages/1", 401, "invalid_token")
        .await;
    assert_eq!(gw.upstream.count(), 0);

    let (_, events) = audit(&gw.leash, ADMIN_KEY, "").await;
    let refused = gateway_events(&events);
    let who = |e: &Value| {
        (
            e["reason"].as_str().unwrap().to_owned(),
            e["subject"].as_str().map(str::to_owned),
            e["actor"].as_str().map(str::to_owned),
            e["grant_id"].as_str().map(str::to_owned),
        )
    };
    let named = |reason: &str| {
        (
            reason.to_owned(),
            Some(gw.s.user_id.clone()),
            Some(leash_testkit::AGENT.to_owned()),
            Some(gw.s.grant_id().to_owned()),
        )
    };
    let seen: Vec<_> = refused.iter().map(|e| who(e)).collect();
    assert_eq!(
        seen,
        vec![
            named("invalid_dpop_proof"),
            named("invalid_token"),
            ("invalid_token".to_owned(), None, None, None),
            named("invalid_token"),
        ]
    );
    assert!(refused.iter().all(|e| e["decision"] == "deny"));
}

#[tokio::test]
async fn a_human_reads_only_their_own_events_and_bad_paging_is_refused() {
    let gw = workload().await;
    let (other_id, other_key) = gw.leash.create_user("bob").await;
    let (_, all) = audit(&gw.leash, ADMIN_KEY, "").await;
    let (status, mine) = audit(&gw.leash, &gw.s.user_key, "").await;
    assert_eq!(status, 200);
    assert!(!mine.is_empty() && mine.len() < all.len());
    assert!(mine.iter().all(|e| e["subject"] == gw.s.user_id.as_str()));
    let (_, theirs) = audit(&gw.leash, &other_key, "").await;
    assert!(theirs.iter().all(|e| e["subject"] == other_id.as_str()));
    let asked = format!("?subject={}", gw.s.user_id);
    assert_eq!(
        audit(&gw.leash, &other_key, &asked).await.1,
        Vec::<Value>::new()
    );
    // Paging: since_seq and limit, oldest first.
    let (_, page) = audit(&gw.leash, ADMIN_KEY, "?since_seq=3&limit=2").await;
    let seqs: Vec<u64> = page.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 5]);
    let by_grant = format!("?grant_id={}&limit=100000", gw.s.grant_id());
    let (status, grant_events) = audit(&gw.leash, ADMIN_KEY, &by_grant).await;
    assert_eq!(status, 200);
    assert!(
        grant_events
            .iter()
            .all(|e| e["grant_id"] == gw.s.grant_id())
    );
    for bad in ["?limit=-1", "?limit=ten", "?since_seq=-5", "?since_seq=1.5"] {
        let (status, body) = audit(&gw.leash, ADMIN_KEY, bad).await;
        assert_eq!(
            (status, body[0]["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    let (status, _) = audit(&gw.leash, "lsk_nobody", "").await;
    assert_eq!(status, 401);
    // Checkpoints are the admin's: a human can neither read nor make them.
    let url = format!("{}/v1/audit/checkpoints", gw.leash.url);
    for method in [Method::GET, Method::POST] {
        let response = gw
            .leash
            .http()
            .request(method.clone(), &url)
            .bearer_auth(&gw.s.user_key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} checkpoints as a human");
    }
    // An agent's token reads no audit events and no review.
    for path in ["/v1/audit", "/v1/review"] {
        let target = format!("{}{path}", gw.leash.url);
        let proof = gw
            .dpop
            .dpop_proof("GET", &target, Some(&gw.token), None, leash_testkit::now());
        let response = gw
            .leash
            .http()
            .get(&target)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path} as an agent");
        assert!(!response.text().await.unwrap().contains("\"seq\""));
    }
}

#[tokio::test]
async fn an_export_verifies_and_any_tampering_names_the_seq() {
    let gw = workload().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let out = cli(
        &gw.leash,
        &["audit", "export", "--output", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&gw.leash, &["audit", "verify", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("audit chain verified"),
        "{}",
        text(&out)
    );

    let original = std::fs::read_to_string(&file).unwrap();
    // The keys (every one the server has had) come first, then the checkpoints.
    let lines: Vec<&str> = original
        .lines()
        .skip_while(|l| l.starts_with(r#"{"key":"#))
        .collect();
    let checkpoints = lines
        .iter()
        .take_while(|l| l.starts_with(r#"{"checkpoint":"#))
        .count();
    assert!(
        checkpoints >= 1,
        "the export starts with its signed checkpoints"
    );
    let events = &lines[checkpoints..];
    let at = events.len() / 2;
    let seq = at + 1;
    let check = |name: &str, tampered: Vec<String>, expected: usize| {
        let path = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&path, tampered.join("\n") + "\n").unwrap();
        let out = cli(&gw.leash, &["audit", "verify", path.to_str().unwrap()]);
        assert!(!out.status.success(), "{name}: verify passed");
        assert!(
            text(&out).contains(&format!("broken at seq {expected}:")),
            "{name}: {}",
            text(&out)
        );
    };
    let head: Vec<String> = lines[..checkpoints].iter().map(|l| l.to_string()).collect();
    let with = |events: Vec<String>| [head.clone(), events].concat();
    let mut edited2: Vec<String> = events.iter().map(|l| l.to_string()).collect();
    let mut value: Value = serde_json::from_str(&edited2[at]).unwrap();
    value["decision"] = json!("allow");
    value["approver"] = json!("usr_mallory");
    edited2[at] = value.to_string();
    check("edit", with(edited2), seq);
    let mut deleted: Vec<String> = events.iter().map(|l| l.to_string()).collect();
    deleted.remove(at);
    check("delete", with(deleted), seq);
    let mut inserted: Vec<String> = events.iter().map(|l| l.to_string()).collect();
    inserted.insert(at, events[0].to_string());
    check("insert", with(inserted), seq);
    let mut swapped: Vec<String> = events.iter().map(|l| l.to_string()).collect();
    swapped.swap(at, at + 1);
    check("reorder", with(swapped), seq);
    let truncated: Vec<String> = events[..at].iter().map(|l| l.to_string()).collect();
    check("truncate", with(truncated), seq);

    // A checkpoint moved to another seq no longer matches its signature, and is refused.
    let mut forged: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut checkpoint: Value = serde_json::from_str(&forged[0]).unwrap();
    let signed_at = checkpoint["checkpoint"]["seq"].as_u64().unwrap();
    checkpoint["checkpoint"]["seq"] = json!(signed_at + 1);
    forged[0] = checkpoint.to_string();
    let path = dir.path().join("forged.jsonl");
    std::fs::write(&path, forged.join("\n")).unwrap();
    let out = cli(&gw.leash, &["audit", "verify", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad signature"), "{}", text(&out));
    // Checked against the key the JWKS names: another key set does not verify it.
    let jwks = dir.path().join("other.json");
    let other = leash_core::client::AgentKey::generate(leash_core::jws::Alg::EdDsa);
    let mut jwk = other.public().to_value();
    let kid = serde_json::from_str::<Value>(lines[0]).unwrap()["checkpoint"]["kid"].clone();
    jwk["kid"] = kid;
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let out = cli(
        &gw.leash,
        &[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--jwks",
            jwks.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("bad signature"), "{}", text(&out));
}

#[tokio::test]
async fn tail_prints_the_events_and_ocsf_export_maps_them() {
    let gw = workload().await;
    let out = cli(&gw.leash, &["audit", "tail", "--once"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("gateway.request") && shown.contains("approval_required"),
        "{shown}"
    );
    assert!(shown.contains("deny: insufficient_scope"), "{shown}");
    let out = cli(&gw.leash, &["audit", "export", "--format", "ocsf"]);
    assert!(out.status.success(), "{}", text(&out));
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.iter().all(|r| r["class_uid"] == 6003));
    let denied = records
        .iter()
        .find(|r| r["status_detail"] == "insufficient_scope")
        .expect("a denied request");
    assert_eq!(denied["status_id"], 2);
    assert_eq!(denied["actor"]["user"]["uid"], gw.s.user_id.as_str());
    assert_eq!(denied["actor"]["app_name"], leash_testkit::AGENT);
}

#[tokio::test]
async fn a_failing_audit_write_answers_503_and_forwards_nothing() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/1", &[]).await.0,
        200
    );
    // The store fails as a full disk would: every audit insert is refused.
    gw.leash.fail_inserts("audit_events", true).await;
    let before = gw.upstream.count();
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/2", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("audit_unavailable"))
    );
    assert_eq!(
        gw.upstream.count(),
        before,
        "forwarded without an audit event"
    );
    gw.leash.fail_inserts("audit_events", false).await;
    // The failed request used nothing: its grant count is unchanged and the chain continues.
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/3", &[]).await.0,
        200
    );
    let (_, grant) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/grants/{}", gw.s.grant_id()),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(grant["requests_used"], 2);
    verify_database(&gw.leash);
}

/// A management change and its event are stored in one transaction: while the chain cannot be
/// written, a revocation still takes effect (it is not a 503 with the change made anyway), and
/// its event joins the chain, before the next change's, once it can.
#[tokio::test]
async fn a_revocation_while_the_chain_cannot_be_written_stands_and_is_chained_later() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    gw.leash.fail_inserts("audit_events", true).await;
    let revoke = format!("/v1/grants/{}/revoke", gw.s.grant_id());
    let (status, body) = gw
        .leash
        .call(Method::POST, &revoke, &gw.s.user_key, None)
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("revoked")),
        "{body}"
    );
    gw.refused(Method::GET, "/gw/mail/messages/1", 401, "invalid_token")
        .await;
    let (_, events) = audit(&gw.leash, ADMIN_KEY, "").await;
    assert!(!events.iter().any(|e| e["kind"] == "grant.revoked"));
    // `/metrics` tells the operator the trail lags behind the changes.
    let lag = "leash_audit_lag_events";
    assert_eq!(metric(&scrape(&gw.leash).await, lag), 1.0);
    gw.leash.fail_inserts("audit_events", false).await;
    let (bob, _) = gw.leash.create_user("bob").await;
    let started = std::time::Instant::now();
    while metric(&scrape(&gw.leash).await, lag) != 0.0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "the trail still lags once it can be written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, events) = audit(&gw.leash, ADMIN_KEY, "").await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    let revoked = kinds.iter().position(|k| *k == "grant.revoked");
    let created = events
        .iter()
        .position(|e| e["kind"] == "user.created" && e["subject"] == bob.as_str());
    assert!(
        revoked.is_some() && revoked < created,
        "the revocation's event, then bob's: {kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "grant.revoked").count(), 1);
    verify_database(&gw.leash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_under_load_every_forwarded_request_is_in_a_chain_that_verifies() {
    let mut gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let url = gw.leash.url.clone();
        let token = gw.token.clone();
        let key =
            leash_core::client::AgentKey::from_private_jwk(&gw.dpop.to_private_jwk()).unwrap();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let target = format!("{url}/gw/mail/messages/{worker}-{n}");
                let proof =
                    key.dpop_proof("GET", &target, Some(&token), None, leash_testkit::now());
                let _ = http
                    .get(&target)
                    .header("Authorization", format!("DPoP {token}"))
                    .header("DPoP", proof)
                    .send()
                    .await;
                n += 1;
            }
        }));
    }
    while gw.upstream.count() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.leash.kill9().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let forwarded: Vec<String> = gw
        .upstream
        .requests()
        .iter()
        .map(|r| r.headers["leash-request-id"].to_str().unwrap().to_owned())
        .collect();
    gw.leash.restart().await;
    let (_, events) = audit(&gw.leash, ADMIN_KEY, "?limit=10000").await;
    let allowed: std::collections::HashSet<&str> = gateway_events(&events)
        .iter()
        .filter(|e| e["decision"] == "allow")
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let missing = forwarded
        .iter()
        .filter(|id| !allowed.contains(id.as_str()))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} forwarded requests are not in the log",
        forwarded.len()
    );
    verify_database(&gw.leash);
}

#[tokio::test]
async fn the_review_names_unused_actions_and_flags_over_broad_grants_and_standing_access() {
    let gw = workload().await;
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/3", &[]).await.0,
        200
    );
    let (status, review) = gw
        .leash
        .call(Method::GET, "/v1/review", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 200, "{review}");
    let row = &review["grants"][0];
    assert_eq!(row["id"], gw.s.grant_id());
    assert_eq!(
        row["actions_granted"],
        json!(["mail:read", "mail:draft", "mail:send"])
    );
    assert_eq!(row["actions_used"][0]["action"], "mail:read");
    assert_eq!(
        row["actions_used"][0]["count"], 2,
        "only forwarded requests count"
    );
    assert_eq!(row["actions_unused"], json!(["mail:draft", "mail:send"]));
    assert_eq!(row["over_broad"], true);
    assert_eq!(row["approvals"], json!({"asked": 1, "given": 0}));
    let agent = &review["agents"][0];
    assert_eq!(agent["agent"], leash_testkit::AGENT);
    assert_eq!(agent["live_grants"], json!([gw.s.grant_id()]));
    assert_eq!(agent["standing"], false);
    // Another human sees none of it.
    let (_, other_key) = gw.leash.create_user("carol").await;
    let (_, theirs) = gw
        .leash
        .call(Method::GET, "/v1/review", &other_key, None)
        .await;
    assert_eq!(theirs, json!({"grants": [], "agents": []}));

    // A grant live for more than a day is standing access.
    let older = "UPDATE grants SET created_at = created_at - 2 * 86400";
    gw.leash.sql(older, older).await;
    let out = cli(&gw.leash, &["review"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    assert!(table.contains("mail:draft mail:send"), "{table}");
    assert!(
        table.contains("over-broad: 67% of its actions never used"),
        "{table}"
    );
    assert!(table.contains("standing access"), "{table}");
    let out = cli(&gw.leash, &["review", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["agents"][0]["standing"], true);
}
