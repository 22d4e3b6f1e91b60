//! Step-up approvals (API §7) through the real gateway and a recording upstream: the whole flow,
//! each mismatch refused and never forwarded, single use under parallel retries, and who may
//! decide.

use leash_core::client::AgentKey;
use leash_testkit::{Scenario, now, read};
use reqwest::Method;
use serde_json::{Value, json};

use super::gateway::{Gw, grant, setup};

const SEND: &str = "/gw/mail/messages/7/send";

async fn mail_send(config: &str) -> Gw {
    setup(
        config,
        grant(&["mail:read", "mail:send"], &["mail"], json!({})),
    )
    .await
}

/// One agent request through the gateway with a fresh proof.
async fn send(
    gw: &Gw,
    token: &str,
    dpop: &AgentKey,
    method: Method,
    target: &str,
    body: &str,
    approval: Option<&str>,
) -> (u16, Value) {
    let url = format!("{}{target}", gw.leash.url);
    let proof = dpop.dpop_proof(method.as_str(), &url, Some(token), None, now());
    let mut request = gw
        .leash
        .http()
        .request(method, &url)
        .header("Authorization", format!("DPoP {token}"))
        .header("DPoP", proof)
        .body(body.to_owned());
    if let Some(id) = approval {
        request = request.header("Leash-Approval", id);
    }
    let (status, _, body) = read(request.send().await.unwrap()).await;
    (status, body)
}

/// `POST SEND` by the agent with extra headers.
async fn send_with_headers(
    gw: &Gw,
    headers: &[(&str, &str)],
    body: &str,
    approval: Option<&str>,
) -> (u16, Value) {
    let url = format!("{}{SEND}", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("POST", &url, Some(&gw.token), None, now());
    let mut request = gw
        .leash
        .http()
        .post(&url)
        .header("Authorization", format!("DPoP {}", gw.token))
        .header("DPoP", proof)
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(id) = approval {
        request = request.header("Leash-Approval", id);
    }
    let (status, _, body) = read(request.send().await.unwrap()).await;
    (status, body)
}

async fn agent_send(
    gw: &Gw,
    method: Method,
    target: &str,
    body: &str,
    approval: Option<&str>,
) -> (u16, Value) {
    send(gw, &gw.token, &gw.dpop, method, target, body, approval).await
}

/// Asks for an approval of `POST SEND` with `body`; returns its id.
async fn ask(gw: &Gw, body: &str) -> String {
    let before = gw.upstream.count();
    let (status, answer) = agent_send(gw, Method::POST, SEND, body, None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_required")),
        "{answer}"
    );
    let id = answer["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_owned();
    assert!(id.starts_with("apr_"), "{id}");
    assert_eq!(answer["status_url"], format!("/v1/approvals/{id}"));
    assert_eq!(
        gw.upstream.count(),
        before,
        "a request waiting for approval was forwarded"
    );
    id
}

async fn decide(gw: &Gw, key: &str, id: &str, verb: &str) -> (u16, Value) {
    gw.leash
        .call(
            Method::POST,
            &format!("/v1/approvals/{id}/{verb}"),
            key,
            None,
        )
        .await
}

/// The agent reads its approval with its own token and a proof.
async fn agent_status(gw: &Gw, id: &str) -> Value {
    let path = format!("/v1/approvals/{id}");
    let url = format!("{}{path}", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("GET", &url, Some(&gw.token), None, now());
    let (status, _, body) =
        gw.s.agent_call(
            &gw.leash,
            Method::GET,
            &path,
            &format!("DPoP {}", gw.token),
            Some(proof),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn approve_then_retry_forwards_once_and_a_second_use_is_refused() {
    let gw = mail_send("").await;
    let target = format!("{SEND}?priority=high");
    let (status, answer) = agent_send(&gw, Method::POST, &target, "hello bob", None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_required")),
        "{answer}"
    );
    let id = answer["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(gw.upstream.count(), 0);

    // What the human sees: exactly what will happen.
    let (status, pending) = gw
        .leash
        .call(
            Method::GET,
            "/v1/approvals?status=pending",
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{pending}");
    let shown = &pending["approvals"][0];
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["method"], "POST");
    assert_eq!(shown["upstream"], "mail");
    assert_eq!(shown["path"], "/messages/7/send");
    assert_eq!(shown["query"], "priority=high");
    assert_eq!(shown["action"], "mail:send");
    assert_eq!(shown["purpose"], "Triage my inbox");
    assert_eq!(shown["body_size"], 9);
    assert_eq!(shown["body_sha256"], sha256_hex(b"hello bob"));
    assert_eq!(agent_status(&gw, &id).await["status"], "pending");

    // Retrying before the human decided still waits, on the same approval.
    let (status, answer) = agent_send(&gw, Method::POST, &target, "hello bob", Some(&id)).await;
    assert_eq!(
        (status, answer["approval_id"].as_str()),
        (403, Some(id.as_str()))
    );

    let (status, decided) = decide(&gw, &gw.s.user_key, &id, "approve").await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["status"], "approved");
    assert_eq!(decided["approver"], gw.s.user_id.as_str());

    let (status, answer) = agent_send(&gw, Method::POST, &target, "hello bob", Some(&id)).await;
    assert_eq!(status, 200, "{answer}");
    let forwarded = gw.upstream.requests();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].body, b"hello bob");
    assert_eq!(forwarded[0].target, "/messages/7/send?priority=high");
    assert!(forwarded[0].headers.get("leash-approval").is_none());

    // Used once: the identical retry is refused and never forwarded.
    let (status, answer) = agent_send(&gw, Method::POST, &target, "hello bob", Some(&id)).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_required"))
    );
    assert_eq!(gw.upstream.count(), 1);
    assert_eq!(agent_status(&gw, &id).await["status"], "used");
}

#[tokio::test]
async fn the_forwarded_headers_are_shown_and_bound() {
    let gw = mail_send("").await;
    let asked = [("content-type", "text/plain"), ("x-priority", "high")];
    let (status, answer) = send_with_headers(&gw, &asked, "hi", None).await;
    assert_eq!(status, 403, "{answer}");
    let id = answer["approval_id"].as_str().unwrap().to_owned();
    let (status, shown) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/approvals/{id}"),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{shown}");
    let headers: Vec<(String, String)> = shown["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().into(),
                h["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (name, value) in asked {
        assert!(
            headers.contains(&(name.into(), value.into())),
            "{headers:?}"
        );
    }
    let names: Vec<&str> = headers.iter().map(|(name, _)| name.as_str()).collect();
    for hidden in ["authorization", "dpop", "leash-approval", "host"] {
        assert!(!names.contains(&hidden), "{hidden} shown: {names:?}");
    }
    assert_eq!(decide(&gw, &gw.s.user_key, &id, "approve").await.0, 200);

    // Another header value, a header more or one less: a mismatch, never forwarded.
    for changed in [
        vec![("content-type", "text/html"), ("x-priority", "high")],
        vec![
            ("content-type", "text/plain"),
            ("x-priority", "high"),
            ("x-extra", "1"),
        ],
        vec![("content-type", "text/plain")],
    ] {
        let (status, answer) = send_with_headers(&gw, &changed, "hi", Some(&id)).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (403, Some("approval_mismatch")),
            "{changed:?}: {answer}"
        );
    }
    assert_eq!(gw.upstream.count(), 0);
    // A proxy's per-request tracing id is not bound, nor the order of different fields: the
    // same request with a new id and its headers in another order passes.
    let traced = [
        ("x-request-id", "r2"),
        ("x-priority", "high"),
        ("content-type", "text/plain"),
    ];
    let (status, answer) = send_with_headers(&gw, &traced, "hi", Some(&id)).await;
    assert_eq!(status, 200, "{answer}");
    let forwarded = gw.upstream.requests();
    assert_eq!(forwarded[0].headers.get("x-priority").unwrap(), "high");
}

/// `GET /v1/approvals/{id}/body` as the human and as the agent.
async fn preview(gw: &Gw, id: &str, as_agent: bool) -> reqwest::Response {
    let url = format!("{}/v1/approvals/{id}/body", gw.leash.url);
    let request = gw.leash.http().get(&url);
    let request = if as_agent {
        let proof = gw
            .dpop
            .dpop_proof("GET", &url, Some(&gw.token), None, now());
        request
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof)
    } else {
        request.bearer_auth(&gw.s.user_key)
    };
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_human_sees_the_body_as_an_inert_attachment_while_it_is_pending() {
    let gw = mail_send("approval_preview_bytes = 64").await;
    let body = "<script>alert(1)</script>";
    let id = ask(&gw, body).await;
    let (_, shown) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/approvals/{id}"),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(shown["body_previewed"], true, "{shown}");
    let response = preview(&gw, &id, false).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["content-security-policy"], "sandbox");
    assert_eq!(response.text().await.unwrap(), body);
    // Never to the agent.
    assert_eq!(preview(&gw, &id, true).await.status(), 403);
    // Not in the audit log either.
    let (status, events) = super::audit::audit(&gw.leash, leash_testkit::ADMIN_KEY, "").await;
    assert_eq!(status, 200);
    assert!(
        !serde_json::to_string(&events).unwrap().contains("alert(1)"),
        "the body reached the audit log"
    );
    // Decided: deleted.
    assert_eq!(decide(&gw, &gw.s.user_key, &id, "deny").await.0, 200);
    assert_eq!(preview(&gw, &id, false).await.status(), 404);

    // Over approval_preview_bytes, or encoded: not previewed, and said so.
    let large = ask(&gw, &"x".repeat(65)).await;
    let (_, shown) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/approvals/{large}"),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(shown["body_previewed"], false, "{shown}");
    assert_eq!(preview(&gw, &large, false).await.status(), 404);
    let (status, answer) = send_with_headers(
        &gw,
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        "small",
        None,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let encoded = answer["approval_id"].as_str().unwrap();
    assert_eq!(preview(&gw, encoded, false).await.status(), 404);
}

#[tokio::test]
async fn each_mismatch_is_refused_and_leaves_the_approval_unused() {
    let gw = mail_send("").await;
    let id = ask(&gw, "hello").await;
    assert_eq!(decide(&gw, &gw.s.user_key, &id, "approve").await.0, 200);

    let cases: [(Method, &str, &str); 5] = [
        (Method::POST, "/gw/mail/messages/8/send", "hello"),
        (Method::POST, "/gw/mail/messages/7/send?cc=eve", "hello"),
        (Method::POST, SEND, "hello eve"),
        (Method::GET, "/gw/mail/messages/7/send", "hello"),
        (Method::POST, SEND, ""),
    ];
    for (method, target, body) in cases {
        let (status, answer) = agent_send(&gw, method.clone(), target, body, Some(&id)).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (403, Some("approval_mismatch")),
            "{method} {target} {body:?}: {answer}"
        );
    }

    // Another grant of the same human (and a token of it) cannot use it either.
    let (status, other) = gw
        .leash
        .call(
            Method::POST,
            "/v1/grants",
            &gw.s.user_key,
            Some(grant(&["mail:send"], &["mail"], json!({}))),
        )
        .await;
    assert_eq!(status, 201, "{other}");
    let second = Scenario {
        user_id: gw.s.user_id.clone(),
        user_key: gw.s.user_key.clone(),
        agent_key: AgentKey::from_private_jwk(&gw.s.agent_key.to_private_jwk()).unwrap(),
        grant: other,
    };
    let (token, dpop) = second.token(&gw.leash).await;
    let (status, answer) = send(&gw, &token, &dpop, Method::POST, SEND, "hello", Some(&id)).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_mismatch")),
        "{answer}"
    );
    // An unknown id is a mismatch too.
    let (status, answer) = agent_send(&gw, Method::POST, SEND, "hello", Some("apr_nope")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_mismatch"))
    );

    assert_eq!(gw.upstream.count(), 0, "a mismatched request was forwarded");
    // None of that spent it: the exact request still goes through, once.
    assert_eq!(
        agent_send(&gw, Method::POST, SEND, "hello", Some(&id))
            .await
            .0,
        200
    );
    assert_eq!(gw.upstream.count(), 1);
}

#[tokio::test]
async fn denied_and_expired_approvals_are_never_forwarded() {
    // Expiry is kept in whole seconds, so a TTL of n lives between n - 1 and n seconds:
    // 3 leaves the steps below at least 2 s before the first approval expires.
    let gw = mail_send("approval_ttl = 3").await;
    let denied = ask(&gw, "a").await;
    let (status, decided) = decide(&gw, &gw.s.user_key, &denied, "deny").await;
    assert_eq!((status, decided["status"].as_str()), (200, Some("denied")));
    let (status, answer) = agent_send(&gw, Method::POST, SEND, "a", Some(&denied)).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_required"))
    );
    // A decided approval cannot be decided again.
    assert_eq!(decide(&gw, &gw.s.user_key, &denied, "approve").await.0, 409);

    let approved = ask(&gw, "b").await;
    assert_eq!(
        decide(&gw, &gw.s.user_key, &approved, "approve").await.0,
        200
    );
    let late = ask(&gw, "c").await;
    // The later of the two expires last.
    let path = format!("/v1/approvals/{late}");
    let (_, view) = gw
        .leash
        .call(Method::GET, &path, &gw.s.user_key, None)
        .await;
    leash_testkit::wait_until(leash_testkit::unix_of(&view["expires_at"])).await;
    let (status, answer) = agent_send(&gw, Method::POST, SEND, "b", Some(&approved)).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("approval_required"))
    );
    assert_eq!(agent_status(&gw, &approved).await["status"], "expired");
    // Too late to approve as well.
    assert_eq!(decide(&gw, &gw.s.user_key, &late, "approve").await.0, 409);
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn sixteen_parallel_retries_forward_exactly_once() {
    let gw = mail_send("").await;
    let id = ask(&gw, "pay").await;
    assert_eq!(decide(&gw, &gw.s.user_key, &id, "approve").await.0, 200);
    let retries = (0..16).map(|_| agent_send(&gw, Method::POST, SEND, "pay", Some(&id)));
    let statuses: Vec<u16> = futures::future::join_all(retries)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 403),
        "{statuses:?}"
    );
    assert_eq!(gw.upstream.count(), 1);
}

#[tokio::test]
async fn only_the_grants_human_or_the_admin_decides() {
    let gw = mail_send("").await;
    let id = ask(&gw, "x").await;
    // The agent, with its own valid token and proof: 403.
    let path = format!("/v1/approvals/{id}/approve");
    let url = format!("{}{path}", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("POST", &url, Some(&gw.token), None, now());
    let (status, _, body) =
        gw.s.agent_call(
            &gw.leash,
            Method::POST,
            &path,
            &format!("DPoP {}", gw.token),
            Some(proof),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    // Another human: not theirs to see or decide.
    let (_, mallory) = gw.leash.create_user("mallory").await;
    assert_eq!(decide(&gw, &mallory, &id, "approve").await.0, 404);
    let (status, listed) = gw
        .leash
        .call(Method::GET, "/v1/approvals", &mallory, None)
        .await;
    assert_eq!(
        (status, listed["approvals"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    assert_eq!(agent_status(&gw, &id).await["status"], "pending");
    // The admin may.
    let (status, decided) = decide(&gw, leash_testkit::ADMIN_KEY, &id, "approve").await;
    assert_eq!((status, decided["approver"].as_str()), (200, Some("admin")));
}

#[tokio::test]
async fn agent_curl_waits_for_the_approval_the_human_gives_with_the_cli() {
    let gw = mail_send("").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.jwk"),
        gw.s.agent_key.to_private_jwk().to_string(),
    )
    .unwrap();
    // tokio's Command: the recording upstream runs on this test's runtime and must keep serving.
    let command = |args: &[&str], key: Option<&str>| {
        let mut command = tokio::process::Command::new(super::bin());
        command
            .args(args)
            .current_dir(dir.path())
            .env("LEASH_URL", &gw.leash.url)
            .env_remove("LEASH_TOKEN");
        if let Some(key) = key {
            command.env("LEASH_TOKEN", key);
        }
        command
    };
    let out = command(
        &[
            "agent",
            "token",
            "--id",
            leash_testkit::AGENT,
            "--key",
            "agent.jwk",
            "--handle",
            gw.s.handle(),
        ],
        None,
    )
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let url = format!("{}{SEND}", gw.leash.url);
    let curl = command(
        &[
            "agent",
            "curl",
            "POST",
            &url,
            "--data",
            "hello",
            "--wait-approval",
            "30",
        ],
        None,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();

    // The human finds the pending approval, reads what it would let through, and approves it.
    let mut id = None;
    for _ in 0..100 {
        let (_, listed) = gw
            .leash
            .call(
                Method::GET,
                "/v1/approvals?status=pending",
                &gw.s.user_key,
                None,
            )
            .await;
        if let Some(found) = listed["approvals"][0]["id"].as_str() {
            id = Some(found.to_owned());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = id.expect("leash agent curl never asked for an approval");
    assert_eq!(gw.upstream.count(), 0);
    let shown = command(&["approvals", "show", &id], Some(&gw.s.user_key))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    for expected in [
        "POST mail /messages/7/send",
        "5 bytes",
        &sha256_hex(b"hello"),
        "Triage my inbox",
        "pending",
    ] {
        assert!(
            text.contains(expected),
            "`approvals show` lacks {expected:?}:\n{text}"
        );
    }
    let approved = command(&["approvals", "approve", &id], Some(&gw.s.user_key))
        .output()
        .await
        .unwrap();
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );

    let out = curl.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("approval {id} is needed")),
        "{stderr}"
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["ok"], true);
    let forwarded = gw.upstream.requests();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].body, b"hello");
}

#[tokio::test]
async fn each_new_approval_is_posted_signed_to_the_webhook() {
    let receiver = leash_testkit::RecordingUpstream::start().await;
    let config = format!(
        "[approvals]\nwebhook_url = \"{}/hooks/leash\"\nwebhook_secret = \"hook-secret-1\"\n",
        receiver.url
    );
    let gw = mail_send(&config).await;
    let id = ask(&gw, "hello").await;
    let mut delivered = Vec::new();
    for _ in 0..100 {
        delivered = receiver.requests();
        if !delivered.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(delivered.len(), 1, "the webhook got no event");
    let hook = &delivered[0];
    assert_eq!(
        (hook.method.as_str(), hook.target.as_str()),
        ("POST", "/hooks/leash")
    );
    let event: Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(event["type"], "approval.requested");
    assert_eq!(event["approval"]["id"], id.as_str());
    assert_eq!(event["approval"]["path"], "/messages/7/send");
    let signature = hook.headers["leash-signature"].to_str().unwrap();
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret-1").unwrap();
    mac.update(&hook.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, format!("sha256={expected}"));
    // The secret itself never travels.
    assert!(!String::from_utf8_lossy(&hook.body).contains("hook-secret-1"));
    assert!(!gw.leash.logs().contains("hook-secret-1"));
}

#[tokio::test]
async fn a_hanging_webhook_does_not_hold_up_the_gateway() {
    // A receiver that accepts connections and never answers: each delivery attempt hangs
    // until its 5 s timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    let config = format!(
        "max_pending_approvals = 20\n[approvals]\nwebhook_url = \"http://{address}/hook\"\nwebhook_secret = \"s\"\n"
    );
    let gw = mail_send(&config).await;
    let started = std::time::Instant::now();
    for i in 0..10 {
        let asked = std::time::Instant::now();
        ask(&gw, &format!("message {i}")).await;
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(2),
            "an approval request waited for the webhook ({:?})",
            asked.elapsed()
        );
    }
    // Ten requests took far less than one delivery attempt's timeout...
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // ...while the webhook was being tried.
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // And the gateway still answers other requests at once.
    assert_eq!(
        agent_send(&gw, Method::GET, "/gw/mail/messages/1", "", None)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn two_approval_headers_and_an_oversized_body_are_refused() {
    let gw = mail_send("").await;
    let id = ask(&gw, "hi").await;
    assert_eq!(decide(&gw, &gw.s.user_key, &id, "approve").await.0, 200);
    let (status, _, body) = read(
        gw.request(Method::POST, SEND)
            .header("Leash-Approval", id.as_str())
            .header("Leash-Approval", "apr_other")
            .body("hi")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );

    // A body over the 1 MiB that approvals hash is refused before any approval is stored.
    let big = "x".repeat(1024 * 1024 + 1);
    let (status, _) = agent_send(&gw, Method::POST, SEND, &big, None).await;
    assert_eq!(status, 413);
    let (_, listed) = gw
        .leash
        .call(Method::GET, "/v1/approvals", &gw.s.user_key, None)
        .await;
    assert_eq!(listed["approvals"].as_array().map(Vec::len), Some(1));
    assert_eq!(gw.upstream.count(), 0);
    // The approval was not spent by either refusal.
    assert_eq!(
        agent_send(&gw, Method::POST, SEND, "hi", Some(&id)).await.0,
        200
    );
}

#[tokio::test]
async fn a_replayed_request_that_needs_approval_stores_no_second_approval() {
    let gw = mail_send("").await;
    let url = format!("{}{SEND}", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("POST", &url, Some(&gw.token), None, now());
    let post = || {
        gw.leash
            .http()
            .post(&url)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", &proof)
            .body("pay")
            .send()
    };
    let (status, _, first) = read(post().await.unwrap()).await;
    assert_eq!(
        (status, first["error"].as_str()),
        (403, Some("approval_required")),
        "{first}"
    );
    let id = first["approval_id"].as_str().expect("approval_id");
    let (status, _, again) = read(post().await.unwrap()).await;
    assert_eq!(status, 401, "the same proof twice: {again}");

    let (_, listed) = gw
        .leash
        .call(Method::GET, "/v1/approvals", &gw.s.user_key, None)
        .await;
    let ids: Vec<&str> = listed["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, [id]);
    // The request that asked is audited with its approval; the replay as a refusal.
    let (_, events) = super::audit::audit(&gw.leash, leash_testkit::ADMIN_KEY, "?limit=1000").await;
    let outcomes: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["kind"] == "gateway.request")
        .map(|e| {
            (
                e["decision"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(outcomes, [("approval_required", id), ("deny", "replayed")]);
    assert_eq!(gw.upstream.count(), 0);
}

/// How many approvals the human with `user_key` sees pending.
pub async fn pending_count(leash: &leash_testkit::Leash, user_key: &str) -> usize {
    let (status, body) = leash
        .call(Method::GET, "/v1/approvals?status=pending", user_key, None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["approvals"].as_array().map_or(0, Vec::len)
}

/// API §7: a grant has at most `max_pending_approvals` pending at once; one more ask is `429`
/// and stores nothing, and a decision frees a place.
#[tokio::test]
async fn a_grant_has_at_most_max_pending_approvals() {
    let gw = mail_send("max_pending_approvals = 2").await;
    let first = ask(&gw, "one").await;
    ask(&gw, "two").await;
    let (status, answer) = agent_send(&gw, Method::POST, SEND, "three", None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (429, Some("too_many_pending_approvals")),
        "{answer}"
    );
    assert!(answer.get("approval_id").is_none(), "{answer}");
    assert_eq!(pending_count(&gw.leash, &gw.s.user_key).await, 2);
    let (status, _) = decide(&gw, &gw.s.user_key.clone(), &first, "deny").await;
    assert_eq!(status, 200);
    ask(&gw, "three").await;
    assert_eq!(pending_count(&gw.leash, &gw.s.user_key).await, 2);
    assert_eq!(gw.upstream.count(), 0);
}
