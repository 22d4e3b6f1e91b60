//! Input that could make an upstream act on something other than what policy judged, or make
//! the gateway fail instead of answering (issue #27): override headers and `_method`,
//! `TRACE`, Unicode path tricks, trailing slashes, broken chunked bodies, crafted DPoP nonces,
//! and HTTP/2 with prior knowledge.

use std::time::Duration;

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, Leash, RecordingUpstream, Scenario, now, read};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::bin;
use super::gateway::{Gw, grant, setup};

impl Gw {
    /// Writes `request` (a head up to its blank line, then `body`) on a fresh connection as the
    /// agent, with its token and a proof for `method` on `path`, and reads the answer until the
    /// server closes.
    async fn raw_request(&self, method: &str, path: &str, head: &str, body: &[u8]) -> String {
        let addr = self.leash.url.trim_start_matches("http://").to_owned();
        let url = format!("{}{}", self.leash.url, path.split('?').next().unwrap());
        let proof = self
            .dpop
            .dpop_proof(method, &url, Some(&self.token), None, now());
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: DPoP {}\r\nDPoP: {proof}\r\n\
             Connection: close\r\n{head}\r\n",
            self.token
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the server answers and closes")
            .ok();
        String::from_utf8_lossy(&answer).into_owned()
    }
}

#[tokio::test]
async fn override_headers_are_dropped_and_method_parameters_refused() {
    let gw = setup("", grant(&["mail:draft"], &["mail"], json!({}))).await;
    let overrides = [
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Original-URL", "/admin/delete-everything"),
        ("X-Rewrite-URL", "/admin/delete-everything"),
        ("X-Original-Method", "DELETE"),
        ("X-Real-IP", "10.0.0.1"),
        ("True-Client-IP", "10.0.0.1"),
        ("X-Forwarded-For", "10.0.0.1"),
    ];
    let mut request = gw
        .request(Method::POST, "/gw/mail/drafts")
        .header("content-type", "application/json")
        .header("x-kept", "yes")
        .body(r#"{"to":"bob"}"#);
    for (name, value) in overrides {
        request = request.header(name, value);
    }
    let (status, _, body) = read(request.send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let seen = &gw.upstream.requests()[0];
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("POST", "/drafts")
    );
    for (name, _) in overrides {
        assert!(
            !seen.headers.contains_key(name),
            "{name} reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-kept"], "yes", "other headers pass");
    assert_eq!(seen.body, br#"{"to":"bob"}"#);

    // `_method` in the query, or as a field of a form body: 400 and nothing forwarded.
    let multipart = "--XyZ\r\nContent-Disposition: form-data; name=\"to\"\r\n\r\nbob\r\n\
                     --XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n\
                     --XyZ--\r\n";
    let cases: [(&str, Option<&str>, &str); 6] = [
        ("/gw/mail/drafts?_method=DELETE", None, ""),
        ("/gw/mail/drafts?a=1&%5Fmethod=DELETE", None, ""),
        (
            "/gw/mail/drafts",
            Some("application/x-www-form-urlencoded"),
            "to=bob&_method=DELETE",
        ),
        (
            "/gw/mail/drafts",
            Some("multipart/form-data; boundary=XyZ"),
            multipart,
        ),
        // Rack parses the body of a POST without a Content-Type as a form.
        ("/gw/mail/drafts", None, "_method=DELETE"),
        (
            "/gw/mail/drafts",
            Some("Application/X-WWW-Form-Urlencoded; charset=utf-8"),
            "to=bob;_method=DELETE",
        ),
    ];
    for (target, content_type, body) in cases {
        let mut request = gw.request(Method::POST, target).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let (status, _, answer) = read(request.send().await.unwrap()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_request")),
            "{target} {body}: {answer}"
        );
        assert_eq!(gw.upstream.count(), 1, "{target} {body} was forwarded");
    }

    // Forms without `_method` are read to be checked and forwarded byte for byte.
    let good_multipart = multipart.replace("_method", "method");
    for (content_type, body) in [
        ("application/x-www-form-urlencoded", "to=bob&method=DELETE"),
        ("multipart/form-data; boundary=XyZ", good_multipart.as_str()),
    ] {
        let (status, _, answer) = read(
            gw.request(Method::POST, "/gw/mail/drafts")
                .header("content-type", content_type)
                .body(body.to_owned())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let seen = gw.upstream.requests().pop().unwrap();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.body, body.as_bytes());
    }
    assert_eq!(gw.upstream.count(), 3);
}

#[tokio::test]
async fn trace_unicode_path_tricks_are_refused_and_a_trailing_slash_matches() {
    let gw = setup(
        "",
        grant(
            &["mail:read", "mail:draft", "mail:export"],
            &["mail"],
            json!({}),
        ),
    )
    .await;
    gw.refused(Method::TRACE, "/gw/mail/messages/1", 400, "invalid_request")
        .await;
    for target in [
        "/gw/mail/messages/%C0%AE%C0%AE/export",
        "/gw/mail/messages/%E0%80%AE/1",
        "/gw/mail/messages/%FF",
        "/gw/mail/messages/%EF%BC%8E%EF%BC%8E/export",
        "/gw/mail/messages/%E2%80%A5/export",
        "/gw/mail/messages/1%EF%BC%8F..%EF%BC%8Fexport",
        "/gw/mail/messages/1%EF%BC%BC..",
        "/gw/mail/%EF%BD%85xport",
    ] {
        let answer = gw.raw_request("GET", target, "", b"").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("invalid_request"), "{target}: {answer}");
    }
    assert_eq!(gw.upstream.count(), 0);

    // `/drafts` matches `/drafts/`, forwarded as it was sent; text that stays non-ASCII passes.
    let (status, _, body) = gw.call(Method::POST, "/gw/mail/drafts/", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = gw
        .call(Method::GET, "/gw/mail/messages/caf%C3%A9/", &[])
        .await;
    assert_eq!(status, 200, "{body}");
    let targets: Vec<String> = gw
        .upstream
        .requests()
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(targets, ["/drafts/", "/messages/caf%C3%A9/"]);
}

#[tokio::test]
async fn a_malformed_chunked_body_is_400_and_the_audit_says_it_was_cut_off() {
    let gw = setup("", grant(&["mail:draft"], &["mail"], json!({}))).await;
    // A valid first chunk, then a chunk size that is no hexadecimal number.
    let broken = b"5\r\nhello\r\nZZ\r\nworld\r\n0\r\n\r\n";
    let head = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n";
    let answer = gw
        .raw_request("POST", "/gw/mail/drafts", head, broken)
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");
    // The upstream may have seen the request begin; never a complete body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seen in gw.upstream.requests() {
        assert_eq!(seen.body, b"", "the upstream got more than a broken body");
    }
    let (status, events) = super::audit::audit(&gw.leash, ADMIN_KEY, "?limit=100").await;
    assert_eq!(status, 200);
    let drafts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "gateway.request" && e["path"] == "/drafts")
        .collect();
    let decisions: Vec<(&str, &str)> = drafts
        .iter()
        .map(|e| {
            (
                e["decision"].as_str().unwrap_or_default(),
                e["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [("allow", ""), ("deny", "request_cut_off")],
        "{events:?}"
    );
    assert_eq!(drafts[0]["request_id"], drafts[1]["request_id"]);
    assert_eq!(drafts[1]["action"], "mail:draft");

    // The same broken body as a form, which the gateway reads itself before deciding: 400,
    // refused before the commit, nothing forwarded.
    let before = gw.upstream.count();
    let head = "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n";
    let answer = gw
        .raw_request("POST", "/gw/mail/drafts", head, broken)
        .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(gw.upstream.count(), before);

    // The server serves on.
    let (status, _, body) = gw.call(Method::POST, "/gw/mail/drafts", &[]).await;
    assert_eq!(status, 200, "{body}");
}

/// The `(decision, reason)` of each `gateway.request` event, oldest first.
async fn gateway_decisions(leash: &Leash) -> Vec<(String, String)> {
    let (status, events) = super::audit::audit(leash, ADMIN_KEY, "?limit=1000").await;
    assert_eq!(status, 200);
    events
        .iter()
        .filter(|e| e["kind"] == "gateway.request")
        .map(|e| {
            let text = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            (text("decision"), text("reason"))
        })
        .collect()
}

/// A body over the limit without a declared length (413) and a body that stalls (408) are cut
/// off while they stream, after the allow event: the trail records the cut-off of each.
#[tokio::test]
async fn bodies_cut_off_over_the_limit_or_stalled_are_audited_as_cut_off() {
    let gw = setup(
        "[limits]\nheader_read_timeout = 1\ngateway_body_bytes = 1024\ntoken_rate = 0\ngateway_rate = 0\n",
        grant(&["mail:draft"], &["mail"], json!({})),
    )
    .await;
    let chunks = futures::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512])));
    let (status, _, body) = read(
        gw.request(Method::POST, "/gw/mail/drafts")
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("invalid_request"))
    );
    let head = "Content-Type: application/octet-stream\r\nContent-Length: 100\r\n";
    let answer = gw
        .raw_request("POST", "/gw/mail/drafts", head, b"hello")
        .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let cut_off = ("deny".to_owned(), "request_cut_off".to_owned());
    let allow = ("allow".to_owned(), String::new());
    assert_eq!(
        gateway_decisions(&gw.leash).await,
        [allow.clone(), cut_off.clone(), allow, cut_off]
    );
}

/// A nonce whose time is `issued` (the client's to choose) and whose tag is made up.
fn crafted_nonce(issued: i64) -> String {
    let mut bytes = issued.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 16]);
    super::b64(bytes)
}

#[tokio::test]
async fn nonces_with_extreme_times_get_an_error_answer_not_a_dropped_connection() {
    let upstream = RecordingUpstream::start().await;
    let leash = Leash::start_with_upstream(bin(), "dpop_nonce = true", &upstream.url).await;
    let s = Scenario::with_grant(
        &leash,
        Alg::EdDsa,
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    let key = AgentKey::generate(Alg::EdDsa);
    let form = s.exchange_form(&leash);
    for issued in [i64::MIN, i64::MAX, i64::MIN + 1, -1] {
        let proof = key.dpop_proof(
            "POST",
            &leash.token_url(),
            None,
            Some(&crafted_nonce(issued)),
            now(),
        );
        let (status, headers, body) = s.exchange_raw(&leash, &form, Some(proof)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("use_dpop_nonce")),
            "{issued}: {body}"
        );
        assert!(headers.contains_key("dpop-nonce"));
    }

    // A token, through the nonce dance, then the gateway with crafted nonces.
    let proof = key.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (_, headers, _) = s.exchange_raw(&leash, &form, Some(proof)).await;
    let nonce = headers["dpop-nonce"].to_str().unwrap().to_owned();
    let proof = key.dpop_proof("POST", &leash.token_url(), None, Some(&nonce), now());
    let (status, _, body) = s.exchange_raw(&leash, &form, Some(proof)).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let url = format!("{}/gw/mail/messages/1", leash.url);
    for issued in [i64::MIN, i64::MAX] {
        let proof = key.dpop_proof(
            "GET",
            &url,
            Some(token),
            Some(&crafted_nonce(issued)),
            now(),
        );
        let response = leash
            .http()
            .get(&url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof)
            .send()
            .await
            .expect("an answer, not a dropped connection");
        let (status, _, body) = read(response).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("use_dpop_nonce")),
            "{issued}: {body}"
        );
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_with_the_same_checks() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("{}/gw/mail/messages/1?page=2", gw.leash.url);
    let send = |proof: String| {
        h2.get(&url)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof)
            .header("X-HTTP-Method-Override", "DELETE")
            .send()
    };
    let proof = gw
        .dpop
        .dpop_proof("GET", &url, Some(&gw.token), None, now());
    let response = send(proof).await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (status, headers, body) = read(response).await;
    assert_eq!(status, 200, "{body}");
    assert!(!headers.contains_key("set-cookie"));
    let seen = &gw.upstream.requests()[0];
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/messages/1?page=2")
    );
    assert!(!seen.headers.contains_key("x-http-method-override"));
    assert!(!seen.headers.contains_key("authorization"));
    assert!(!seen.headers.contains_key("dpop"));

    // A proof for another URL, a replayed proof, a path trick: refused as over HTTP/1.1.
    let other = format!("{}/gw/mail/messages/2", gw.leash.url);
    let wrong = gw
        .dpop
        .dpop_proof("GET", &other, Some(&gw.token), None, now());
    let (status, _, body) = read(send(wrong).await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_dpop_proof")),
        "{body}"
    );
    let proof = gw
        .dpop
        .dpop_proof("GET", &url, Some(&gw.token), None, now());
    assert_eq!(read(send(proof.clone()).await.unwrap()).await.0, 200);
    let (status, _, body) = read(send(proof).await.unwrap()).await;
    assert_eq!(status, 401, "a replayed proof: {body}");
    // (`%2e%2e` would be resolved by the client's URL parser before it is sent.)
    let trick = format!(
        "{}/gw/mail/messages/%EF%BC%8E%EF%BC%8E/export",
        gw.leash.url
    );
    let proof = gw
        .dpop
        .dpop_proof("GET", &trick, Some(&gw.token), None, now());
    let (status, _, body) = read(
        h2.get(&trick)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof)
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
    // A Host that names another authority than :authority is a malformed HTTP/2 request.
    let proof = gw
        .dpop
        .dpop_proof("GET", &url, Some(&gw.token), None, now());
    let (status, _, body) = read(
        h2.get(&url)
            .header("Authorization", format!("DPoP {}", gw.token))
            .header("DPoP", proof)
            .header("Host", "evil.example")
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
    assert_eq!(gw.upstream.count(), 2);
}
