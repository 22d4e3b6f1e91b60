//! `examples/nginx`: a real nginx uses `POST /v1/authorize` through `auth_request`, so an
//! existing proxy gets the same decisions and injections as the built-in gateway (API §6).

use std::path::Path;

use leash_core::client::AgentKey;
use leash_testkit::{
    AGENT, Leash, PROXY_KEY, RecordingUpstream, Scenario, now, proxy_key_config, read,
};
use reqwest::Method;
use serde_json::json;

use super::bin;

const NGINX: &str = "/usr/sbin/nginx";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn nginx_auth_request_example_decides_with_leash() {
    if !Path::new(NGINX).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide nginx (.ci/run installs the Debian package)"
        );
        eprintln!(
            "SKIPPED nginx_auth_request_example_decides_with_leash: nginx is not installed (apt-get install nginx)"
        );
        return;
    }
    let upstream = RecordingUpstream::start().await;
    let port = free_port();
    let public_url = format!("http://127.0.0.1:{port}");
    let mut leash = Leash::start_with_upstream(
        bin(),
        &format!("public_url = \"{public_url}\"\n{}", proxy_key_config()),
        &upstream.url,
    )
    .await;
    let s = Scenario::with_grant(&leash, leash_core::jws::Alg::EdDsa, json!({
        "agent": AGENT, "purpose": "Triage", "upstreams": ["mail"], "actions": ["mail:read", "mail:send"], "ttl_seconds": 600,
    }))
    .await;
    let (status, _) = leash
        .call(
            Method::PUT,
            "/v1/vault/mail",
            &s.user_key,
            Some(json!({"kind": "cookie", "secret": "session=alice-via-nginx"})),
        )
        .await;
    assert_eq!(status, 200);
    let (token, dpop) = s.token(&leash).await;

    let prefix = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/nginx/leash-auth-request.conf"
    ))
    .unwrap();
    let config = template
        .replace("{{PREFIX}}", prefix.path().to_str().unwrap())
        .replace("{{LISTEN}}", &port.to_string())
        .replace("{{LEASH}}", leash.url.trim_start_matches("http://"))
        .replace("{{MAIL}}", upstream.url.trim_start_matches("http://"))
        .replace("{{PROXY_KEY}}", PROXY_KEY);
    let conf = prefix.path().join("nginx.conf");
    std::fs::write(&conf, config).unwrap();
    let mut nginx = tokio::process::Command::new(NGINX)
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if http.get(format!("{public_url}/")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "nginx did not start");

    let call = |path: &str, key: &AgentKey| {
        let url = format!("{public_url}{path}");
        let proof = key.dpop_proof("GET", &url, Some(&token), None, now());
        http.get(url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof)
            .header("Cookie", "agent=1")
            .header("X-HTTP-Method-Override", "DELETE")
            .header("X-Original-URL", "/export")
            .header("Leash-Proxy-Key", "forged-by-the-agent")
            .send()
    };
    let (status, headers, body) = read(call("/gw/mail/messages/1", &dpop).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("set-cookie").is_none());
    let got = upstream.requests();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.target, "/messages/1");
    assert_eq!(r.headers["cookie"], "session=alice-via-nginx");
    assert_eq!(r.headers["leash-subject"], s.user_id.as_str());
    assert_eq!(r.headers["leash-actor"], AGENT);
    assert_eq!(r.headers["leash-grant"], s.grant_id());
    assert!(r.headers.get("authorization").is_none() && r.headers.get("dpop").is_none());
    // What Leash judged is what the app acts on, and the proxy's key stays with the proxy.
    for name in [
        "x-http-method-override",
        "x-original-url",
        "leash-proxy-key",
    ] {
        assert!(r.headers.get(name).is_none(), "{name} reached the app");
    }
    assert_eq!(r.method, "GET");

    // nginx cannot pass the body to Leash, so an action that needs approval is refused
    // (`approval_unsupported`; nginx answers auth_request's 403 with its own page) and no
    // approval is asked for.
    let url = format!("{public_url}/gw/mail/messages/1/send");
    let proof = dpop.dpop_proof("POST", &url, Some(&token), None, now());
    let response = http
        .post(&url)
        .header("Authorization", format!("DPoP {token}"))
        .header("DPoP", proof)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        super::approvals::pending_count(&leash, &s.user_key).await,
        0
    );

    // Refusals pass through nginx as 401/403 and reach nothing.
    assert_eq!(call("/gw/mail/export", &dpop).await.unwrap().status(), 403);
    assert_eq!(
        call(
            "/gw/mail/messages/2",
            &AgentKey::generate(leash_core::jws::Alg::EdDsa)
        )
        .await
        .unwrap()
        .status(),
        401
    );
    // Input Leash finds malformed (two proofs) is its 400, not nginx's 500.
    let url = format!("{public_url}/gw/mail/messages/3");
    let proof = dpop.dpop_proof("GET", &url, Some(&token), None, now());
    let (status, _, body) = read(
        http.get(&url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", &proof)
            .header("DPoP", &proof)
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
    assert_eq!(upstream.count(), 1);

    // With Leash gone nothing is decided, so nothing is forwarded: 503, not 500.
    leash.kill9().await;
    let (status, _, body) = read(call("/gw/mail/messages/4", &dpop).await.unwrap()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(upstream.count(), 1);
    nginx.start_kill().unwrap();
    let _ = nginx.wait().await;
}
