//! Bad input (API §0): malformed, oversized, mistyped and repeated input gets the documented
//! 4xx, never a 5xx, and changes nothing.

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, Leash, Scenario, now};
use reqwest::Method;
use serde_json::json;

use super::leash;

async fn raw(
    leash: &Leash,
    method: Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
    auth: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = leash
        .http()
        .request(method, format!("{}{path}", leash.url))
        .header("content-type", content_type)
        .body(body);
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn token_endpoint_refuses_malformed_bodies_without_consuming_anything() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let form = s.exchange_form(&leash);
    let good: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let encoded = leash_testkit::form(&good);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (FORM, vec![0xff, 0xfe, b'=', b'x'], 400),
        (FORM, format!("{encoded}&grant_type=%ff").into_bytes(), 400),
        (FORM, format!("{encoded}&scope=a&scope=b").into_bytes(), 400),
        (
            FORM,
            format!("{encoded}&pad={}", "x".repeat(64 * 1024)).into_bytes(),
            413,
        ),
        (
            "application/json",
            serde_json::to_vec(&json!({"grant_type": "x"})).unwrap(),
            415,
        ),
        ("text/plain", encoded.clone().into_bytes(), 415),
        (FORM, Vec::new(), 400),
        (FORM, b"&&&===&".to_vec(), 400),
    ];
    for (content_type, body, expected) in cases {
        let (status, out) = raw(
            &leash,
            Method::POST,
            "/oauth2/token",
            content_type,
            body,
            None,
        )
        .await;
        assert_eq!(status, expected, "{out}");
        assert_eq!(out["error"], "invalid_request", "{out}");
    }
    // A 100 KiB JWT as the assertion: over the body limit. A 60 KiB one: within it, refused as a JWT.
    for (size, expected) in [(100 * 1024, 413), (60 * 1024, 401)] {
        let huge = format!("eyJhbGciOiJFZERTQSJ9.{}.AAAA", "A".repeat(size));
        let mut pairs = good.clone();
        pairs.retain(|(k, _)| *k != "client_assertion");
        pairs.push(("client_assertion", &huge));
        let (status, out) = raw(
            &leash,
            Method::POST,
            "/oauth2/token",
            FORM,
            leash_testkit::form(&pairs).into_bytes(),
            None,
        )
        .await;
        assert_eq!(status, expected, "{out}");
    }
    // A 100 KiB DPoP header is refused before any handler runs.
    let response = leash
        .http()
        .post(leash.token_url())
        .header("content-type", FORM)
        .header("DPoP", "A".repeat(100 * 1024))
        .body(encoded.clone())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    // None of the refused requests consumed the assertion.
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    assert_eq!(s.exchange_raw(&leash, &form, Some(proof)).await.0, 200);
}

#[tokio::test]
async fn management_api_refuses_bad_json_and_changes_nothing() {
    let leash = leash().await;
    let admin = format!("Bearer {ADMIN_KEY}");
    let private = AgentKey::generate(Alg::EdDsa).to_private_jwk();
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("/v1/agents", "application/json", b"{not json".to_vec(), 400),
        ("/v1/agents", "application/json", vec![0xff, 0xfe], 400),
        ("/v1/agents", "text/plain", b"{}".to_vec(), 415),
        (
            "/v1/agents",
            "application/json",
            serde_json::to_vec(&json!({"id": "spiffe://e/a", "jwks": {"keys": [private]}}))
                .unwrap(),
            400,
        ),
        (
            "/v1/agents",
            "application/json",
            serde_json::to_vec(
                &json!({"id": "spiffe://e/a", "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}),
            )
            .unwrap(),
            400,
        ),
        (
            "/v1/agents",
            "application/json",
            serde_json::to_vec(&json!({"id": "not a uri", "jwks": {"keys": []}})).unwrap(),
            400,
        ),
        (
            "/v1/agents",
            "application/json",
            serde_json::to_vec(&json!({"id": "spiffe://e/a", "jwks": {}, "extra": 1})).unwrap(),
            400,
        ),
        ("/v1/agents", "application/json", vec![b'['; 100_000], 413),
        (
            "/v1/users",
            "application/json",
            serde_json::to_vec(&json!({"name": ""})).unwrap(),
            400,
        ),
        (
            "/v1/users",
            "application/json",
            serde_json::to_vec(&json!({"name": 5})).unwrap(),
            400,
        ),
    ];
    for (path, content_type, body, expected) in cases {
        let (status, out) = raw(&leash, Method::POST, path, content_type, body, Some(&admin)).await;
        assert_eq!(status, expected, "{path}: {out}");
        assert_eq!(out["error"], "invalid_request", "{out}");
    }
    let (_, agents) = leash.call(Method::GET, "/v1/agents", ADMIN_KEY, None).await;
    assert_eq!(agents["agents"], json!([]));
    let (_, users) = leash.call(Method::GET, "/v1/users", ADMIN_KEY, None).await;
    assert_eq!(users["users"], json!([]));
}

#[tokio::test]
async fn unknown_paths_methods_and_keys_get_json_errors() {
    let leash = leash().await;
    let (status, body) = leash.call(Method::GET, "/nope", ADMIN_KEY, None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = leash
        .call(Method::DELETE, "/oauth2/token", ADMIN_KEY, None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = leash
        .call(Method::GET, "/v1/agents", "lsk_wrong", None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (_, user_key) = leash.create_user("carol").await;
    let (status, body) = leash.call(Method::GET, "/v1/agents", &user_key, None).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, _) = leash
        .call(
            Method::POST,
            "/v1/users",
            ADMIN_KEY,
            Some(json!({"name": "carol"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, body) = leash
        .call(Method::GET, "/v1/grants?status=bogus", &user_key, None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

/// A malformed chunked body at the token and management endpoints is the client's error, `400`
/// (not `413`, as if it were too large, and never 5xx); the server keeps serving.
#[tokio::test]
async fn malformed_chunked_bodies_are_400_at_the_token_and_json_endpoints() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let leash = leash().await;
    let addr = leash.url.trim_start_matches("http://").to_owned();
    for (path, content_type, auth) in [
        ("/oauth2/token", FORM, String::new()),
        (
            "/v1/users",
            "application/json",
            format!("Authorization: Bearer {ADMIN_KEY}\r\n"),
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_request"), "{path}: {answer}");
    }
    let (status, _) = leash.call(Method::GET, "/v1/users", ADMIN_KEY, None).await;
    assert_eq!(status, 200);
}
