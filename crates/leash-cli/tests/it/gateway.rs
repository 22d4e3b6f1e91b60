//! The gateway (API §5, §6, §9) against a real recording upstream on loopback: what is
//! forwarded, what is injected, and each refusal, asserting the upstream received nothing.

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{AGENT, Leash, RecordingUpstream, Scenario, now, read};
use reqwest::Method;
use serde_json::{Value, json};

use super::bin;

pub struct Gw {
    pub leash: Leash,
    pub upstream: RecordingUpstream,
    pub s: Scenario,
    pub token: String,
    pub dpop: AgentKey,
}

pub fn grant(actions: &[&str], upstreams: &[&str], extra: Value) -> Value {
    let mut body = json!({
        "agent": AGENT, "purpose": "Triage my inbox", "upstreams": upstreams, "actions": actions, "ttl_seconds": 600,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

pub async fn setup(config: &str, grant_body: Value) -> Gw {
    setup_with(config, grant_body, None).await
}

/// [`setup`] with the test upstreams at `upstream_url` instead of the recording upstream
/// (which then receives nothing).
pub async fn setup_with(config: &str, grant_body: Value, upstream_url: Option<&str>) -> Gw {
    let upstream = RecordingUpstream::start().await;
    let url = upstream_url.unwrap_or(&upstream.url);
    let leash = Leash::start_with_upstream(bin(), config, url).await;
    let s = Scenario::with_grant(&leash, Alg::EdDsa, grant_body).await;
    let (status, body) = leash
        .call(
            Method::PUT,
            "/v1/vault/mail",
            &s.user_key,
            Some(json!({"kind": "cookie", "secret": "session=alice-mail-secret"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (token, dpop) = s.token(&leash).await;
    Gw {
        leash,
        upstream,
        s,
        token,
        dpop,
    }
}

impl Gw {
    pub async fn call(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        read(self.send(method, target, headers).await).await
    }

    /// The agent's request with its token and a fresh proof, ready for a body or more headers.
    pub fn request(&self, method: Method, target: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{target}", self.leash.url);
        let proof = self
            .dpop
            .dpop_proof(method.as_str(), &url, Some(&self.token), None, now());
        self.leash
            .http()
            .request(method, &url)
            .header("Authorization", format!("DPoP {}", self.token))
            .header("DPoP", proof)
    }

    /// The agent's request as sent, with its response unread.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.request(method, target);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// The human revokes the grant (API §2); it must succeed.
    pub async fn revoke(&self) {
        let (status, body) = self
            .leash
            .call(
                Method::POST,
                &format!("/v1/grants/{}/revoke", self.s.grant_id()),
                &self.s.user_key,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn refused(&self, method: Method, target: &str, status: u16, code: &str) -> Value {
        let before = self.upstream.count();
        let (got, _, body) = self.call(method, target, &[]).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{target}: {body}"
        );
        assert_eq!(
            self.upstream.count(),
            before,
            "{target}: the upstream received a refused request"
        );
        body
    }
}

#[tokio::test]
async fn allowed_read_gets_the_vaulted_credential_and_attribution_and_nothing_of_the_agent() {
    let gw = setup(
        "",
        grant(&["mail:read", "mail:draft"], &["mail"], json!({})),
    )
    .await;
    let (status, headers, body) = gw
        .call(
            Method::GET,
            "/gw/mail/messages/42?folder=inbox",
            &[
                ("Cookie", "agent_cookie=1"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("Forwarded", "for=6.6.6.6"),
                ("Leash-Subject", "usr_forged"),
                ("Leash-Request-Id", "forged"),
                ("Leash-Whatever", "forged"),
                ("Host", "evil.example"),
                ("Connection", "X-Hop-Secret"),
                ("X-Hop-Secret", "hop"),
                ("X-Custom", "kept"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    assert!(
        headers.get("set-cookie").is_none(),
        "the agent must never receive session material"
    );
    assert_eq!(headers["x-upstream"], "yes");

    let got = gw.upstream.requests();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(
        (r.method.as_str(), r.target.as_str()),
        ("GET", "/messages/42?folder=inbox")
    );
    assert_eq!(r.headers["cookie"], "session=alice-mail-secret");
    assert_eq!(r.headers.get_all("cookie").iter().count(), 1);
    assert_eq!(r.headers["leash-subject"], gw.s.user_id.as_str());
    assert_eq!(r.headers["leash-actor"], AGENT);
    assert_eq!(r.headers["leash-grant"], gw.s.grant_id());
    assert!(
        r.headers["leash-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    assert_eq!(r.headers["x-custom"], "kept");
    let upstream_host = gw.upstream.url.trim_start_matches("http://");
    assert_eq!(
        r.headers["host"], upstream_host,
        "the upstream host comes only from configuration"
    );
    for gone in [
        "authorization",
        "dpop",
        "x-forwarded-for",
        "forwarded",
        "leash-whatever",
        "x-hop-secret",
    ] {
        assert!(r.headers.get(gone).is_none(), "{gone} was forwarded");
    }
    let everything = format!("{:?}", r.headers);
    assert!(
        !everything.contains(&gw.token),
        "the agent's token reached the upstream"
    );
    // A request without a body is forwarded without one: no chunked framing for a GET.
    assert!(
        r.headers.get("transfer-encoding").is_none() && r.body.is_empty(),
        "a bodiless GET was forwarded with a body: {:?}",
        r.headers
    );
    // The upstream's length passes through, so the agent's response is not re-framed.
    assert!(headers.get("content-length").is_some(), "{headers:?}");
    assert!(headers.get("transfer-encoding").is_none(), "{headers:?}");

    // A POST body streams through unchanged.
    let url = format!("{}/gw/mail/drafts", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("POST", &url, Some(&gw.token), None, now());
    let response = gw
        .leash
        .http()
        .post(&url)
        .header("Authorization", format!("DPoP {}", gw.token))
        .header("DPoP", proof)
        .body(vec![7u8; 300_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let post = &gw.upstream.requests()[1];
    assert_eq!(post.body, vec![7u8; 300_000]);
    assert_eq!(post.headers["content-length"], "300000");
    assert!(post.headers.get("transfer-encoding").is_none());
}

/// The gateway keeps opened credentials (`vault::Openings`): what it injects must still follow
/// the vault from one request to the next.
#[tokio::test]
async fn a_replaced_or_deleted_credential_is_never_injected_again() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let injected = |gw: &Gw| {
        gw.upstream
            .requests()
            .last()
            .and_then(|r| r.headers.get("cookie").cloned())
    };
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(injected(&gw).unwrap(), "session=alice-mail-secret");

    for secret in ["session=rotated-secret-2", "session=alice-mail-secret"] {
        gw.s.vault(
            &gw.leash,
            "mail",
            json!({"kind": "cookie", "secret": secret}),
        )
        .await;
        let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(injected(&gw).unwrap(), secret);
    }

    let (status, body) = gw
        .leash
        .call(Method::DELETE, "/v1/vault/mail", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.upstream.requests().len(), 4);
    assert_eq!(injected(&gw), None, "a deleted credential was injected");
}

#[tokio::test]
async fn unmapped_routes_outside_scope_and_outside_grant_are_refused() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    gw.refused(Method::GET, "/gw/mail/unknown", 403, "no_route")
        .await;
    gw.refused(Method::PUT, "/gw/mail/messages/1", 403, "no_route")
        .await;
    gw.refused(Method::GET, "/gw/nope/messages", 403, "no_route")
        .await;
    gw.refused(Method::POST, "/gw/mail/drafts", 403, "insufficient_scope")
        .await;
    gw.refused(Method::GET, "/gw/finance/ledger", 403, "insufficient_scope")
        .await;
}

#[tokio::test]
async fn high_risk_actions_wait_for_approval() {
    let gw = setup(
        "",
        grant(
            &["mail:read", "mail:export", "mail:send"],
            &["mail"],
            json!({}),
        ),
    )
    .await;
    gw.refused(Method::GET, "/gw/mail/export", 403, "approval_required")
        .await;
    gw.refused(
        Method::POST,
        "/gw/mail/messages/1/send",
        403,
        "approval_required",
    )
    .await;
}

impl Gw {
    /// Sends `request_line_target` byte for byte (no client-side URL normalisation) and returns
    /// the status line.
    async fn raw(&self, method: &str, target: &str, proof_url: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = self.leash.url.trim_start_matches("http://").to_owned();
        let proof = self
            .dpop
            .dpop_proof(method, proof_url, Some(&self.token), None, now());
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let raw = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: DPoP {}\r\nDPoP: {proof}\r\nConnection: close\r\n\r\n",
            self.token
        );
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }
}

#[tokio::test]
async fn path_tricks_are_invalid_request() {
    let gw = setup(
        "",
        grant(&["mail:read", "mail:export"], &["mail"], json!({})),
    )
    .await;
    for target in [
        "/gw/mail/messages/../export",
        "/gw/mail/messages/%2e%2e/export",
        "/gw/mail/messages/%2E%2E/export",
        "/gw/mail/messages%2f1",
        "/gw/mail//messages",
        "/gw/mail/messages/1;x",
        "/gw/mail/messages/%00",
        "/gw/mail/messages/./1",
        "/gw/mail/%6dessages/1",
    ] {
        let answer = gw
            .raw("GET", target, &format!("{}{target}", gw.leash.url))
            .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("invalid_request"), "{target}: {answer}");
    }
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn absolute_form_targets_are_refused() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let target = format!("{}/gw/mail/messages/1", gw.leash.url);
    let answer = gw.raw("GET", &target, &target).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = gw
        .raw("CONNECT", "127.0.0.1:9", &format!("{}/", gw.leash.url))
        .await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn bearer_downgrade_wrong_ath_and_foreign_key_are_refused() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let send = |auth: String, proof: String| {
        gw.leash
            .http()
            .get(&url)
            .header("Authorization", auth)
            .header("DPoP", proof)
            .send()
    };
    let good_proof = || {
        gw.dpop
            .dpop_proof("GET", &url, Some(&gw.token), None, now())
    };
    let (status, headers, _) = read(
        send(format!("Bearer {}", gw.token), good_proof())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let (status, _, body) = read(
        send(
            format!("DPoP {}", gw.token),
            gw.dpop.dpop_proof("GET", &url, Some("other"), None, now()),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_dpop_proof"))
    );
    let stranger = AgentKey::generate(Alg::EdDsa);
    let (status, _, body) = read(
        send(
            format!("DPoP {}", gw.token),
            stranger.dpop_proof("GET", &url, Some(&gw.token), None, now()),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_dpop_proof"))
    );
    let (status, _, body) = read(
        gw.leash
            .http()
            .get(&url)
            .header("Authorization", format!("DPoP {}", gw.token))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn a_replayed_proof_is_forwarded_once_even_in_parallel() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("GET", &url, Some(&gw.token), None, now());
    let send = || {
        gw.leash
            .http()
            .get(&url)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof.clone())
            .send()
    };
    let copies = (0..16).map(|_| async { read(send().await.unwrap()).await });
    let answers = futures::future::join_all(copies).await;
    let statuses: Vec<(u16, Option<String>)> = answers
        .iter()
        .map(|(status, _, body)| (*status, body["error"].as_str().map(str::to_owned)))
        .collect();
    assert_eq!(
        statuses.iter().filter(|(s, _)| *s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|(s, e)| *s == 200 || (*s == 401 && e.as_deref() == Some("invalid_dpop_proof"))),
        "{statuses:?}"
    );
    // Later, once more: still refused, and the upstream saw exactly one request.
    let (status, _, body) = read(send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_dpop_proof"))
    );
    assert_eq!(gw.upstream.count(), 1);
}

#[tokio::test]
async fn revoking_between_two_requests_refuses_the_second() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/1", &[]).await.0,
        200
    );
    gw.revoke().await;
    gw.refused(Method::GET, "/gw/mail/messages/1", 401, "invalid_token")
        .await;
    assert_eq!(gw.upstream.count(), 1);
}

#[tokio::test]
async fn expired_token_is_refused() {
    let gw = setup(
        "max_token_ttl = 1",
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    leash_testkit::wait_until(leash_testkit::jwt_exp(&gw.token)).await;
    gw.refused(Method::GET, "/gw/mail/messages/1", 401, "invalid_token")
        .await;
}

#[tokio::test]
async fn max_requests_holds_under_parallel_load() {
    let gw = setup(
        "",
        grant(&["mail:read"], &["mail"], json!({"max_requests": 3})),
    )
    .await;
    let calls = (0..8).map(|i| {
        let gw = &gw;
        async move {
            gw.call(Method::GET, &format!("/gw/mail/messages/{i}"), &[])
                .await
                .0
        }
    });
    let statuses = futures::future::join_all(calls).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(gw.upstream.count(), 3);
    let (_, grant) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/grants/{}", gw.s.grant_id()),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(grant["requests_used"], 3);
}

#[tokio::test]
async fn policy_deny_names_the_policy_and_sighup_reloads_without_restart() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().to_str().unwrap().to_owned();
    std::fs::write(dir.path().join("base.cedar"), "// nothing yet\n").unwrap();
    let leash = Leash::start_with_upstream(
        bin(),
        &format!("policy_dir = \"{policy_dir}\""),
        &upstream.url,
    )
    .await;
    let s = Scenario::with_grant(
        &leash,
        Alg::EdDsa,
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    let (token, dpop) = s.token(&leash).await;
    let gw = Gw {
        leash,
        upstream,
        s,
        token,
        dpop,
    };
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/1", &[]).await.0,
        200
    );

    std::fs::write(
        dir.path().join("base.cedar"),
        "@id(\"no-reading-message-7\")\nforbid(principal, action == Leash::Action::\"mail:read\", resource) when { context.path == \"/messages/7\" };\n",
    )
    .unwrap();
    gw.leash.hangup().await;
    let mut denied = Value::Null;
    for _ in 0..50 {
        let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/7", &[]).await;
        if status == 403 {
            denied = body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(denied["error"], "policy_denied", "{denied}");
    assert_eq!(denied["policies"], json!(["no-reading-message-7"]));
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/8", &[]).await.0,
        200
    );

    // A broken file keeps the old set.
    std::fs::write(dir.path().join("broken.cedar"), "permit(principal").unwrap();
    gw.leash.hangup().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gw.leash.logs().contains("policy reload failed") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.leash.logs());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.refused(Method::GET, "/gw/mail/messages/7", 403, "policy_denied")
        .await;
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/8", &[]).await.0,
        200
    );
}

#[tokio::test]
async fn direct_mode_uses_the_humans_own_key_and_credential() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let response = gw
        .leash
        .http()
        .get(format!("{}/gw/mail/export", gw.leash.url))
        .bearer_auth(&gw.s.user_key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the human may export their own mail directly"
    );
    let r = &gw.upstream.requests()[0];
    assert_eq!(r.headers["cookie"], "session=alice-mail-secret");
    assert_eq!(r.headers["leash-actor"], gw.s.user_id.as_str());
    assert!(r.headers.get("leash-grant").is_none());
    assert!(
        r.headers.get("authorization").is_none(),
        "the human's Leash key is not forwarded"
    );
}

#[tokio::test]
async fn vault_lists_metadata_only_and_never_returns_secrets() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, list) = gw
        .leash
        .call(Method::GET, "/v1/vault", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["credentials"][0]["upstream"], "mail");
    assert_eq!(list["credentials"][0]["kind"], "cookie");
    assert!(!list.to_string().contains("alice-mail-secret"));
    for bad in [
        json!({"kind": "password", "secret": "x"}),
        json!({"kind": "header", "secret": "x"}),
        json!({"kind": "header", "name": "Leash-Actor", "secret": "x"}),
        json!({"kind": "bearer", "secret": "a\r\nb"}),
    ] {
        let (status, body) = gw
            .leash
            .call(
                Method::PUT,
                "/v1/vault/mail",
                &gw.s.user_key,
                Some(bad.clone()),
            )
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
        assert!(!body.to_string().contains("a\r\nb"));
    }
    let (status, _) = gw
        .leash
        .call(
            Method::PUT,
            "/v1/vault/nope",
            &gw.s.user_key,
            Some(json!({"kind": "bearer", "secret": "x"})),
        )
        .await;
    assert_eq!(status, 400);
    // The secret is sealed at rest.
    let stored = gw.leash.stored_bytes().await;
    assert!(
        !stored.windows(17).any(|w| w == b"alice-mail-secret"),
        "a vaulted secret is stored in the clear"
    );
    assert!(!gw.leash.logs().contains("alice-mail-secret"));
    let (status, _) = gw
        .leash
        .call(Method::DELETE, "/v1/vault/mail", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        gw.call(Method::GET, "/gw/mail/messages/1", &[]).await.0,
        200
    );
    assert!(
        gw.upstream.requests()[0].headers.get("cookie").is_none(),
        "a deleted credential is not injected"
    );
}

#[tokio::test]
async fn leash_agent_curl_works_through_the_gateway() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.jwk"),
        gw.s.agent_key.to_private_jwk().to_string(),
    )
    .unwrap();
    // tokio's Command: the recording upstream runs on this test's runtime and must keep serving.
    let run = |args: &[&str]| {
        tokio::process::Command::new(bin())
            .args(args)
            .current_dir(dir.path())
            .env("LEASH_URL", &gw.leash.url)
            .output()
    };
    let out = run(&[
        "agent",
        "token",
        "--id",
        AGENT,
        "--key",
        "agent.jwk",
        "--handle",
        gw.s.handle(),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("{}/gw/mail/messages/1?x=y", gw.leash.url);
    let out = run(&["agent", "curl", "GET", &url]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["ok"], true);
    assert_eq!(
        gw.upstream.requests().last().unwrap().target,
        "/messages/1?x=y"
    );
    // Refused calls exit non-zero and say why.
    let out = run(&[
        "agent",
        "curl",
        "GET",
        &format!("{}/gw/mail/export", gw.leash.url),
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("insufficient_scope"));
}

#[tokio::test]
async fn two_dpop_headers_and_unknown_keys_are_refused_at_the_gateway() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let proof = || {
        gw.dpop
            .dpop_proof("GET", &url, Some(&gw.token), None, now())
    };
    let response = gw
        .leash
        .http()
        .get(&url)
        .header("Authorization", format!("DPoP {}", gw.token))
        .header("DPoP", proof())
        .header("DPoP", proof())
        .send()
        .await
        .unwrap();
    let (status, _, body) = read(response).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let (status, _, body) = read(
        gw.leash
            .http()
            .get(&url)
            .bearer_auth("lsk_not_a_key")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    let (status, _, body) = read(
        gw.leash
            .http()
            .get(&url)
            .bearer_auth(leash_testkit::ADMIN_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert_eq!(gw.upstream.count(), 0);
}

/// ATTACKS 19: the URL a proof must name is Leash's own; `X-Forwarded-Host` or `Forwarded`
/// from the caller never make another host acceptable.
#[tokio::test]
async fn a_forwarded_host_never_changes_the_url_a_proof_must_name() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let path = "/gw/mail/messages/1";
    let forged = format!("http://evil.example{path}");
    let proof = gw
        .dpop
        .dpop_proof("GET", &forged, Some(&gw.token), None, now());
    let response = gw
        .leash
        .http()
        .get(format!("{}{path}", gw.leash.url))
        .header("Authorization", format!("DPoP {}", gw.token))
        .header("DPoP", proof)
        .header("X-Forwarded-Host", "evil.example")
        .header("X-Forwarded-Proto", "http")
        .header("Forwarded", "host=evil.example;proto=http")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_dpop_proof");
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn leash_decision_marks_leash_answers_and_an_upstream_cannot_fake_one() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, headers, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers.get("leash-decision").is_none(),
        "the upstream's own Leash-Decision reached the agent"
    );
    let (status, headers, _) = gw.call(Method::GET, "/gw/mail/export", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(headers["leash-decision"], "insufficient_scope");
    let (status, headers, body) = read(
        gw.leash
            .http()
            .get(format!("{}/gw/mail/messages/1", gw.leash.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(headers["leash-decision"], body["error"].as_str().unwrap());
}

/// Found beyond ATTACKS.md: an upstream that reflects what it received (a debug page, an error
/// page quoting the request) would hand the agent the human's cookie. In a header → `502
/// credential_reflected`; in the body → the answer is cut off before the secret, and either
/// way the audit says so.
#[tokio::test]
async fn an_upstream_reflecting_the_injected_credential_never_hands_it_to_the_agent() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, headers, body) = gw
        .call(Method::GET, "/gw/mail/messages/echo-cookie", &[])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("credential_reflected")),
        "{body}"
    );
    assert!(headers.get("x-got-cookie").is_none());
    assert!(!body.to_string().contains("alice-mail-secret"));

    // The body: read raw, every byte the agent got.
    let url = format!("{}/gw/mail/messages/echo-headers", gw.leash.url);
    let answer = gw.raw("GET", "/gw/mail/messages/echo-headers", &url).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..80.min(answer.len())]
    );
    assert!(
        answer.contains(&"x".repeat(1000)),
        "the answer before the secret was passed on"
    );
    assert!(
        !answer.contains("alice-mail-secret"),
        "the reflected credential reached the agent"
    );
    // Found by the second outside test: the secret as a header's name, in another case, or in
    // a compressed answer (which the upstream was asked not to send).
    for path in ["echo-name", "echo-gzip"] {
        let (status, headers, body) = gw
            .call(Method::GET, &format!("/gw/mail/messages/{path}"), &[])
            .await;
        assert_eq!(status, 502, "{path}: {body}");
        assert!(
            headers
                .keys()
                .all(|name| !name.as_str().contains("alice-mail-secret"))
        );
    }
    let answer = gw
        .raw(
            "GET",
            "/gw/mail/messages/echo-upper",
            &format!("{}/gw/mail/messages/echo-upper", gw.leash.url),
        )
        .await;
    assert!(
        !answer.to_ascii_lowercase().contains("alice-mail-secret"),
        "{answer}"
    );
    let asked = gw.upstream.requests();
    assert!(
        asked
            .iter()
            .all(|r| r.headers["accept-encoding"] == "identity"),
        "an upstream was allowed to compress an answer Leash must check"
    );
    // A clean answer from the same upstream is untouched.
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!((status, body["ok"].as_bool()), (200, Some(true)), "{body}");

    // The guard's events are appended once each answer has been cut off: wait for them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, events) = super::audit::audit(&gw.leash, leash_testkit::ADMIN_KEY, "").await;
        let reflected = events
            .iter()
            .filter(|e| e["reason"] == "credential_reflected")
            .count();
        if reflected >= 4 || std::time::Instant::now() > deadline {
            assert_eq!(reflected, 4, "{events:?}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` as text.
pub async fn scrape(leash: &Leash) -> String {
    let response = reqwest::get(format!("{}/metrics", leash.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of one series of a `/metrics` text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} is not in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// `GET /metrics` (API §11): the gateway's requests by decision with their latency, live
/// grants and the audit lag read from the store when scraped.
#[tokio::test]
async fn metrics_count_requests_by_decision_and_read_live_grants() {
    let gw = setup(
        "",
        grant(&["mail:read", "mail:export"], &["mail"], json!({})),
    )
    .await;
    let scrape = || scrape(&gw.leash);
    let gateway = |decision: &str| {
        format!("leash_requests_total{{surface=\"gateway\",decision=\"{decision}\"}}")
    };
    let count = "leash_request_duration_seconds_count{surface=\"gateway\"}";
    let slowest = "leash_request_duration_seconds_bucket{surface=\"gateway\",le=\"+Inf\"}";
    let before = scrape().await;
    assert_eq!(metric(&before, "leash_store_up"), 1.0);
    assert_eq!(metric(&before, "leash_live_grants"), 1.0);
    assert_eq!(metric(&before, "leash_audit_lag_events"), 0.0);

    for _ in 0..2 {
        let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    gw.refused(Method::GET, "/gw/mail/export", 403, "approval_required")
        .await;
    gw.refused(Method::PUT, "/gw/mail/messages/1", 403, "no_route")
        .await;
    let unauthenticated = reqwest::get(format!("{}/gw/mail/messages/1", gw.leash.url))
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    let after = scrape().await;
    let added = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(added(&gateway("allow")), 2.0);
    assert_eq!(added(&gateway("approval_required")), 1.0);
    assert_eq!(added(&gateway("deny")), 2.0);
    assert_eq!(added(count), 5.0);
    assert_eq!(added(slowest), 5.0);
    assert!(added("leash_request_duration_seconds_sum{surface=\"gateway\"}") > 0.0);
    assert_eq!(
        added("leash_requests_total{surface=\"proxy\",decision=\"allow\"}"),
        0.0
    );

    gw.revoke().await;
    // A reading of the store serves the scrapes of the next second.
    let started = std::time::Instant::now();
    while metric(&scrape().await, "leash_live_grants") != 0.0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "the revoked grant is still counted live"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A committed request counts as allowed in `/metrics` whatever follows, as the audit says:
/// an upstream that cannot be reached (502), and a client that hangs up while the upstream
/// has yet to answer (the handler is dropped mid-way).
#[tokio::test]
async fn metrics_count_a_committed_request_as_allowed_when_the_upstream_fails_or_the_client_leaves()
{
    let allowed = "leash_requests_total{surface=\"gateway\",decision=\"allow\"}";
    let denied = "leash_requests_total{surface=\"gateway\",decision=\"deny\"}";

    let unreachable = setup_with(
        "",
        grant(&["mail:read"], &["mail"], json!({})),
        Some("http://127.0.0.1:9"),
    )
    .await;
    let before = scrape(&unreachable.leash).await;
    let (status, _, body) = unreachable
        .call(Method::GET, "/gw/mail/messages/1", &[])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("bad_gateway")),
        "{body}"
    );
    let after = scrape(&unreachable.leash).await;
    assert_eq!(metric(&after, allowed) - metric(&before, allowed), 1.0);
    assert_eq!(metric(&after, denied) - metric(&before, denied), 0.0);

    // An upstream that accepts and never answers.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_url = format!("http://{}", stalled.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = stalled.accept().await {
            sockets.push(socket);
        }
    });
    let gw = setup_with(
        "",
        grant(&["mail:read"], &["mail"], json!({})),
        Some(&stalled_url),
    )
    .await;
    let before = scrape(&gw.leash).await;
    let gave_up = gw
        .request(Method::GET, "/gw/mail/messages/1")
        .timeout(std::time::Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.is_err(), "the stalled upstream answered");
    let started = std::time::Instant::now();
    loop {
        let now = scrape(&gw.leash).await;
        if metric(&now, allowed) - metric(&before, allowed) == 1.0 {
            assert_eq!(metric(&now, denied), metric(&before, denied));
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "a committed request whose client left is not counted:\n{now}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    held.abort();
}

/// A store that hangs does not hang `/metrics`: with the grants table locked (PostgreSQL; a
/// migration or a stuck session would), scrapes answer within seconds with `leash_store_up 0`
/// and the request counters, one reading at a time waits on the lock however often they come,
/// and the gauges are back once the lock goes. SQLite's readers cannot be held up from outside
/// while the server runs (its connections keep the file shared), so there it checks nothing.
#[tokio::test]
async fn metrics_answer_while_the_store_hangs_with_one_reading_waiting() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    let allowed = "leash_requests_total{surface=\"gateway\",decision=\"allow\"}";
    let Some(lock) = gw.leash.lock_table("grants").await else {
        return;
    };
    // Past the reading taken by the setup's scrapes, if any.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let scraped = tokio::time::timeout(std::time::Duration::from_secs(8), scrape(&gw.leash))
            .await
            .expect("/metrics hung with the store");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(metric(&scraped, "leash_store_up"), 0.0);
        assert!(!scraped.contains("leash_live_grants"), "{scraped}");
        assert_eq!(metric(&scraped, allowed), 1.0);
        assert_eq!(
            lock.waiting("FROM audit_outbox").await,
            1,
            "readings of the gauges piled up on the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }

    lock.release().await;
    let started = std::time::Instant::now();
    loop {
        let scraped = scrape(&gw.leash).await;
        if metric(&scraped, "leash_store_up") == 1.0 {
            assert_eq!(metric(&scraped, "leash_live_grants"), 1.0);
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the gauges did not come back: {scraped}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
