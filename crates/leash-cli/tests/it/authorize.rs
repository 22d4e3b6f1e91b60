//! `POST /v1/authorize` (API §6), the decision API for a proxy the operator runs: only a proxy
//! presenting a configured `Leash-Proxy-Key` is ever answered with the human's credential
//! (ATTACKS.md line 43), and approvals work through it when the proxy sends the whole body.

use leash_testkit::{PROXY_KEY, now, proxy_key_config, read};
use reqwest::Method;
use serde_json::{Value, json};

use super::gateway::{Gw, grant, setup};

const VAULTED: &str = "alice-mail-secret";

/// The agent's headers for `method target` (token and a fresh proof naming the gateway URL),
/// as a proxy passes them on, with the original request line a proxy adds.
fn ask(gw: &Gw, method: &str, target: &str) -> reqwest::RequestBuilder {
    let proof = gw.dpop.dpop_proof(
        method,
        &format!("{}{target}", gw.leash.url),
        Some(&gw.token),
        None,
        now(),
    );
    gw.leash
        .http()
        .post(format!("{}/v1/authorize", gw.leash.url))
        .header("Authorization", format!("DPoP {}", gw.token))
        .header("DPoP", proof)
        .header("Leash-Original-Method", method)
        .header("Leash-Original-URI", target)
}

/// Sends `request` and asserts Leash refused it with `status` and `code`.
async fn refused(
    request: reqwest::RequestBuilder,
    status: u16,
    code: &str,
) -> (reqwest::header::HeaderMap, Value) {
    let (got, headers, body) = read(request.send().await.unwrap()).await;
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert_eq!(headers["leash-decision"], code);
    (headers, body)
}

/// Asserts the answer carries nothing from the vault, in headers or body.
fn assert_no_credential(headers: &reqwest::header::HeaderMap, body: &Value) {
    for (name, value) in headers {
        assert!(
            !name.as_str().starts_with("leash-inject"),
            "{name} was answered"
        );
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(VAULTED),
            "{name} carries the vaulted secret"
        );
    }
    assert!(!body.to_string().contains(VAULTED), "{body}");
}

#[tokio::test]
async fn the_agent_calling_authorize_itself_never_gets_the_credential() {
    // ATTACKS.md 43: with its own valid token and proof, and no proxy key configured at all.
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    for key in [None, Some(PROXY_KEY), Some("")] {
        let mut request = ask(&gw, "GET", "/gw/mail/messages/1");
        if let Some(key) = key {
            request = request.header("Leash-Proxy-Key", key);
        }
        let (headers, body) = refused(request, 401, "unauthorized").await;
        assert_no_credential(&headers, &body);
    }
}

#[tokio::test]
async fn only_a_configured_proxy_key_is_answered_with_the_credential() {
    let gw = setup(
        &proxy_key_config(),
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    // The agent itself: no key, a wrong key, the key twice, a key differing in one character.
    let near = format!("{}x", &PROXY_KEY[..PROXY_KEY.len() - 1]);
    let attempts: [&[&str]; 4] = [&[], &["lpk_guess"], &[PROXY_KEY, PROXY_KEY], &[&near]];
    for keys in attempts {
        let mut request = ask(&gw, "GET", "/gw/mail/messages/1");
        for key in keys {
            request = request.header("Leash-Proxy-Key", *key);
        }
        let (headers, body) = refused(request, 401, "unauthorized").await;
        assert_no_credential(&headers, &body);
    }
    // A refused call spends nothing: the same proof still works for the proxy.
    let (status, headers, body) = read(
        ask(&gw, "GET", "/gw/mail/messages/1?x=1")
            .header("Leash-Proxy-Key", PROXY_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["leash-inject-cookie"], format!("session={VAULTED}"));
    assert_eq!(headers["leash-actor"], leash_testkit::AGENT);
    assert_eq!(headers["leash-grant"], gw.s.grant_id());
    assert_eq!(headers["cache-control"], "no-store");
    let remove = headers["leash-remove-headers"].to_str().unwrap().to_owned();
    for name in [
        "Authorization",
        "DPoP",
        "Cookie",
        "X-HTTP-Method-Override",
        "X-Original-URL",
        "Forwarded",
    ] {
        assert!(
            remove.split(", ").any(|n| n.eq_ignore_ascii_case(name)),
            "{name} missing in {remove}"
        );
    }
    // The same decision as the gateway: outside the scope is refused, nothing is injected.
    let (headers, body) = refused(
        ask(&gw, "GET", "/gw/mail/export").header("Leash-Proxy-Key", PROXY_KEY),
        403,
        "insufficient_scope",
    )
    .await;
    assert_no_credential(&headers, &body);
    // Only the proxy's headers say what the original request was.
    let url = format!("{}/v1/authorize", gw.leash.url);
    refused(
        gw.leash
            .http()
            .post(&url)
            .header("Leash-Proxy-Key", PROXY_KEY)
            .header("X-Original-Method", "GET")
            .header("X-Original-URI", "/gw/mail/messages/1"),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn a_guessable_proxy_key_is_refused_at_start_without_being_echoed() {
    let out = std::process::Command::new(super::bin())
        .args(["serve", "--check"])
        .env("LEASH_AUTHORIZE_KEY", "short")
        .env("LEASH_DATA_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LEASH_AUTHORIZE_KEY"), "{stderr}");
    assert!(!stderr.contains("short"), "the key was echoed: {stderr}");
}

/// The body of a send, as the proxy passes it whole.
const MESSAGE: &str = r#"{"to":"bob@example.com","text":"hello"}"#;

#[tokio::test]
async fn approvals_work_through_authorize_only_with_the_whole_body() {
    let gw = setup(
        &proxy_key_config(),
        grant(&["mail:read", "mail:send"], &["mail"], json!({})),
    )
    .await;
    let send = "/gw/mail/messages/7/send";
    let proxied = |body: &str, approval: Option<&str>| {
        let mut request = ask(&gw, "POST", send)
            .header("Leash-Proxy-Key", PROXY_KEY)
            .header("Leash-Original-Body", "complete")
            .body(body.to_owned());
        if let Some(id) = approval {
            request = request.header("Leash-Approval", id);
        }
        request
    };
    // Without the whole body, no approval can be bound: refused, and none is created.
    let (headers, _) = refused(
        ask(&gw, "POST", send).header("Leash-Proxy-Key", PROXY_KEY),
        403,
        "approval_unsupported",
    )
    .await;
    assert_eq!(headers["leash-decision"], "approval_unsupported");
    assert_eq!(
        super::approvals::pending_count(&gw.leash, &gw.s.user_key).await,
        0
    );
    // Anything but `complete` is malformed.
    refused(
        ask(&gw, "POST", send)
            .header("Leash-Proxy-Key", PROXY_KEY)
            .header("Leash-Original-Body", "partial"),
        400,
        "invalid_request",
    )
    .await;

    // With it: an approval is asked for this exact body.
    let (headers, body) = refused(proxied(MESSAGE, None), 403, "approval_required").await;
    assert_no_credential(&headers, &body);
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let (status, _) = gw
        .leash
        .call(
            Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    // Another body under the approval is a mismatch; without the whole body it is unsupported.
    refused(
        proxied(r#"{"to":"mallory@example.com"}"#, Some(&id)),
        403,
        "approval_mismatch",
    )
    .await;
    refused(
        ask(&gw, "POST", send)
            .header("Leash-Proxy-Key", PROXY_KEY)
            .header("Leash-Approval", &id),
        403,
        "approval_unsupported",
    )
    .await;
    // The approved body: allowed once, with the credential for the proxy to inject.
    let (status, headers, body) = read(proxied(MESSAGE, Some(&id)).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["leash-inject-cookie"], format!("session={VAULTED}"));
    refused(proxied(MESSAGE, Some(&id)), 403, "approval_required").await;
    let (_, approval) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/approvals/{id}"),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(approval["status"], "used", "{approval}");
    assert_eq!(gw.upstream.count(), 0, "authorize never forwards");
}
