//! What the store commits for a request beyond its proof (ATTACKS 45, 52), through the real
//! gateway and a recording upstream: a `single_use` action is performed once per token, and a
//! token revoked while its request is in flight is refused at the commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use leash_core::client::AgentKey;
use leash_testkit::{ADMIN_KEY, now, read};
use reqwest::Method;
use serde_json::{Value, json};

use super::audit::audit;
use super::gateway::{Gw, grant, setup, setup_with};

const SPENT: &str = "single-use action already used by this token";
const SEND: &str = "/gw/mail/messages/7/send";

/// A grant of mail:read and mail:draft where drafting is single-use.
async fn drafting_once() -> Gw {
    drafting_once_with("").await
}

/// [`drafting_once`] on a server with `config`.
async fn drafting_once_with(config: &str) -> Gw {
    setup(
        config,
        grant(
            &["mail:read", "mail:draft"],
            &["mail"],
            json!({"single_use": ["mail:draft"]}),
        ),
    )
    .await
}

/// The agent's request with `token`, bound to `dpop` by a fresh proof.
fn request(
    gw: &Gw,
    token: &str,
    dpop: &AgentKey,
    method: Method,
    target: &str,
) -> reqwest::RequestBuilder {
    let url = format!("{}{target}", gw.leash.url);
    let proof = dpop.dpop_proof(method.as_str(), &url, Some(token), None, now());
    gw.leash
        .http()
        .request(method, &url)
        .header("Authorization", format!("DPoP {token}"))
        .header("DPoP", proof)
}

async fn send(
    gw: &Gw,
    token: &str,
    dpop: &AgentKey,
    method: Method,
    target: &str,
    approval: Option<&str>,
) -> (u16, Value) {
    let mut request = request(gw, token, dpop, method, target).body("hello bob");
    if let Some(id) = approval {
        request = request.header("Leash-Approval", id);
    }
    let (status, _, body) = read(request.send().await.unwrap()).await;
    (status, body)
}

/// Asserts the answer is the single use's refusal.
fn assert_spent(status: u16, body: &Value) {
    assert_eq!(
        (
            status,
            body["error"].as_str(),
            body["error_description"].as_str()
        ),
        (401, Some("invalid_token"), Some(SPENT)),
        "{body}"
    );
}

/// The reasons of the refused `gateway.request` events, oldest first.
async fn refusals(gw: &Gw) -> Vec<String> {
    let (status, events) = audit(&gw.leash, ADMIN_KEY, "").await;
    assert_eq!(status, 200, "{events:?}");
    events
        .iter()
        .filter(|e| e["kind"] == "gateway.request" && e["decision"] == "deny")
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn single_use_action_used_twice_with_one_token_is_refused() {
    let gw = drafting_once().await;
    let draft = async || {
        send(
            &gw,
            &gw.token,
            &gw.dpop,
            Method::POST,
            "/gw/mail/drafts",
            None,
        )
        .await
    };
    let (status, body) = draft().await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = draft().await;
    assert_spent(status, &body);
    assert_eq!(gw.upstream.count(), 1, "the second use was forwarded");
    assert_eq!(refusals(&gw).await, ["single_use_spent"]);

    // The token's other actions stay usable, as often as the grant allows.
    for _ in 0..2 {
        let (status, body) = send(
            &gw,
            &gw.token,
            &gw.dpop,
            Method::GET,
            "/gw/mail/messages/1",
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    // A fresh exchange is a fresh invocation.
    let (token, dpop) = gw.s.token(&gw.leash).await;
    let (status, body) = send(&gw, &token, &dpop, Method::POST, "/gw/mail/drafts", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.upstream.count(), 4);
    let (status, body) = send(&gw, &token, &dpop, Method::POST, "/gw/mail/drafts", None).await;
    assert_spent(status, &body);
    assert_eq!(gw.upstream.count(), 4);
}

#[tokio::test]
async fn single_use_action_sent_in_parallel_with_one_token_is_forwarded_once() {
    let gw = drafting_once().await;
    let calls = (0..8).map(|_| {
        request(&gw, &gw.token, &gw.dpop, Method::POST, "/gw/mail/drafts")
            .body("hello")
            .send()
    });
    let mut forwarded = 0;
    for response in futures::future::join_all(calls).await {
        let (status, _, body) = read(response.unwrap()).await;
        if status == 200 {
            forwarded += 1;
        } else {
            assert_spent(status, &body);
        }
    }
    assert_eq!(forwarded, 1);
    assert_eq!(
        gw.upstream.count(),
        1,
        "of 8 parallel uses, not exactly one was forwarded"
    );
}

#[tokio::test]
async fn single_use_action_counts_even_when_the_upstream_fails() {
    // An upstream that receives the request and fails it.
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    let failing = leash_testkit::serve_apart(axum::Router::new().fallback(move || {
        seen.fetch_add(1, Ordering::SeqCst);
        async {
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "upstream broke",
            )
        }
    }));
    let body = grant(
        &["mail:draft"],
        &["mail"],
        json!({"single_use": ["mail:draft"]}),
    );
    let gw = setup_with("", body, Some(&failing)).await;
    let (status, _) = send(
        &gw,
        &gw.token,
        &gw.dpop,
        Method::POST,
        "/gw/mail/drafts",
        None,
    )
    .await;
    assert_eq!(status, 500, "the upstream's own answer");
    let (status, body) = send(
        &gw,
        &gw.token,
        &gw.dpop,
        Method::POST,
        "/gw/mail/drafts",
        None,
    )
    .await;
    assert_spent(status, &body);
    assert_eq!(received.load(Ordering::SeqCst), 1);

    // An upstream that cannot be reached: the use counts all the same.
    let body = grant(
        &["mail:draft"],
        &["mail"],
        json!({"single_use": ["mail:draft"]}),
    );
    let gw = setup_with("", body, Some("http://127.0.0.1:9")).await;
    let (status, body) = send(
        &gw,
        &gw.token,
        &gw.dpop,
        Method::POST,
        "/gw/mail/drafts",
        None,
    )
    .await;
    assert!(status >= 500, "{status} {body}");
    let (status, body) = send(
        &gw,
        &gw.token,
        &gw.dpop,
        Method::POST,
        "/gw/mail/drafts",
        None,
    )
    .await;
    assert_spent(status, &body);
}

#[tokio::test]
async fn single_use_action_needing_approval_is_used_by_the_approved_retry_not_by_asking() {
    let gw = setup(
        "",
        grant(
            &["mail:read", "mail:send"],
            &["mail"],
            json!({"single_use": ["mail:send"]}),
        ),
    )
    .await;
    let ask = async || {
        let (status, body) = send(&gw, &gw.token, &gw.dpop, Method::POST, SEND, None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("approval_required")),
            "{body}"
        );
        body["approval_id"].as_str().unwrap().to_owned()
    };
    // Asking twice: the first ask consumed nothing.
    let (first, second) = (ask().await, ask().await);
    for id in [&first, &second] {
        let path = format!("/v1/approvals/{id}/approve");
        let (status, body) = gw
            .leash
            .call(Method::POST, &path, &gw.s.user_key, None)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = send(&gw, &gw.token, &gw.dpop, Method::POST, SEND, Some(&first)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.upstream.count(), 1);

    // Used: the next approved retry is refused and its approval left unspent, and the token
    // cannot even ask again.
    let (status, body) = send(&gw, &gw.token, &gw.dpop, Method::POST, SEND, Some(&second)).await;
    assert_spent(status, &body);
    let (status, body) = send(&gw, &gw.token, &gw.dpop, Method::POST, SEND, None).await;
    assert_spent(status, &body);
    assert_eq!(
        super::approvals::pending_count(&gw.leash, &gw.s.user_key).await,
        0
    );
    assert_eq!(gw.upstream.count(), 1);

    // The next invocation, with a fresh token, can use the approval still unspent.
    let (token, dpop) = gw.s.token(&gw.leash).await;
    let (status, body) = send(&gw, &token, &dpop, Method::POST, SEND, Some(&second)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.upstream.count(), 2);
}

#[tokio::test]
async fn single_use_action_through_authorize_is_allowed_once_per_token() {
    let gw = drafting_once_with(&leash_testkit::proxy_key_config()).await;
    let authorize = || {
        let target = "/gw/mail/drafts";
        let proof = gw.dpop.dpop_proof(
            "POST",
            &format!("{}{target}", gw.leash.url),
            Some(&gw.token),
            None,
            now(),
        );
        gw.leash
            .http()
            .post(format!("{}/v1/authorize", gw.leash.url))
            .header("Leash-Proxy-Key", leash_testkit::PROXY_KEY)
            .header("Leash-Original-Method", "POST")
            .header("Leash-Original-URI", target)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof)
            .send()
    };
    let (status, _, body) = read(authorize().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = read(authorize().await.unwrap()).await;
    assert_spent(status, &body);
}

/// ATTACKS 52: a request that passed the token checks (step 2) when its token is revoked is
/// refused at its commit. An approved request is read whole before it commits, so its body,
/// held back here, keeps it in flight while the human revokes the token.
#[tokio::test]
async fn token_revoked_while_its_request_is_in_flight_is_refused_at_commit() {
    let gw = setup("", grant(&["mail:send"], &["mail"], json!({}))).await;
    let (status, body) = send(&gw, &gw.token, &gw.dpop, Method::POST, SEND, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("approval_required")),
        "{body}"
    );
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/approvals/{id}/approve");
    assert_eq!(
        gw.leash
            .call(Method::POST, &path, &gw.s.user_key, None)
            .await
            .0,
        200
    );

    let (chunks, rest) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    chunks.unbounded_send(Ok(b"hello ".to_vec())).unwrap();
    let in_flight = tokio::spawn(
        request(&gw, &gw.token, &gw.dpop, Method::POST, SEND)
            .header("Leash-Approval", &id)
            .header("Content-Length", "9")
            .body(reqwest::Body::wrap_stream(rest))
            .send(),
    );
    // Time for the head to pass steps 1–6; if it had not, the refusal below would come from
    // step 2, and the audit reason would say so.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, _, body) = gw
        .leash
        .post_form(
            "/oauth2/revoke",
            leash_testkit::form(&[("token", &gw.token)]),
            &[("Authorization", format!("Bearer {}", gw.s.user_key))],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    chunks.unbounded_send(Ok(b"bob".to_vec())).unwrap();
    drop(chunks);
    let (status, _, body) = read(in_flight.await.unwrap().unwrap()).await;
    assert_eq!(
        (
            status,
            body["error"].as_str(),
            body["error_description"].as_str()
        ),
        (401, Some("invalid_token"), Some("the token was revoked")),
        "{body}"
    );
    assert_eq!(
        gw.upstream.count(),
        0,
        "a revoked token's request was forwarded"
    );
    assert_eq!(
        refusals(&gw).await,
        ["token_revoked"],
        "not refused at the commit"
    );
    // The approval was not spent on the refused request.
    let (status, approval) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/approvals/{id}"),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(
        (status, approval["status"].as_str()),
        (200, Some("approved")),
        "{approval}"
    );
}
