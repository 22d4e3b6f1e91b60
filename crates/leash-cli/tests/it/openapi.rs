//! The OpenAPI description at `/openapi.json` (issue #8) against the wire contract and the
//! running handlers. Schema conformance of real answers is schemathesis's part (`.ci/run`).

use std::collections::BTreeSet;

use leash_testkit::ADMIN_KEY;
use reqwest::Method;
use serde_json::Value;

use super::leash;

/// Every JSON endpoint the wire contract (API.md) names; the transparent gateway
/// (`ANY /gw/{upstream}/{path…}`) passes upstream answers through and is not one.
const CONTRACT: &[(&str, &str)] = &[
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/.well-known/leash-delegation-jwks.json"),
    ("GET", "/.well-known/oauth-authorization-server"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/readyz"),
    ("POST", "/oauth2/token"),
    ("POST", "/oauth2/revoke"),
    ("POST", "/oauth2/introspect"),
    ("POST", "/v1/users"),
    ("POST", "/v1/users/{id}/disable"),
    ("GET", "/v1/me"),
    ("GET", "/v1/agents"),
    ("POST", "/v1/agents"),
    ("GET", "/v1/agents/{id}"),
    ("POST", "/v1/agents/{id}/disable"),
    ("GET", "/v1/grants"),
    ("POST", "/v1/grants"),
    ("GET", "/v1/grants/{id}"),
    ("POST", "/v1/grants/{id}/revoke"),
    ("POST", "/v1/grants/{id}/complete"),
    ("GET", "/v1/upstreams"),
    ("GET", "/v1/approvals"),
    ("GET", "/v1/approvals/{id}"),
    ("POST", "/v1/approvals/{id}/approve"),
    ("POST", "/v1/approvals/{id}/deny"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/review"),
    ("GET", "/v1/vault"),
    ("PUT", "/v1/vault/{upstream}"),
    ("DELETE", "/v1/vault/{upstream}"),
    ("POST", "/v1/authorize"),
];

fn documented(description: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in description["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "post", "put", "delete"].contains(&method.as_str()) {
                out.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_description_covers_the_contract_and_every_documented_route_has_its_handler() {
    let leash = leash().await;
    let response = leash
        .http()
        .get(format!("{}/openapi.json", leash.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let description: Value = response.json().await.unwrap();
    assert_eq!(description["openapi"], "3.1.0");

    let documented = documented(&description);
    let missing: Vec<_> = CONTRACT
        .iter()
        .filter(|(method, path)| !documented.contains(&((*method).to_owned(), (*path).to_owned())))
        .collect();
    assert!(missing.is_empty(), "undocumented endpoints: {missing:?}");

    // Each documented operation reaches a handler: the router's own fallbacks answer 404 "no
    // such endpoint" and 405, which a documented route never gives for its method.
    for (method, path) in &documented {
        let target = path.replace("{id}", "x").replace("{upstream}", "mail");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let response = leash
            .http()
            .request(method.clone(), format!("{}{target}", leash.url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(
            !(status == 404 && body.contains("no such endpoint")),
            "{method} {path} is documented but not routed"
        );
        assert!(status < 500, "{method} {path}: {status} {body}");

        // Every operation documents the refusals it can answer with, as the one error body.
        let operation = &description["paths"][path][method.as_str().to_ascii_lowercase()];
        let responses = operation["responses"].as_object().unwrap();
        let refusals: Vec<_> = responses
            .keys()
            .filter(|s| s.starts_with('4') || s.starts_with('5'))
            .collect();
        if path != "/healthz" && path != "/metrics" && !path.starts_with("/.well-known") {
            assert!(!refusals.is_empty(), "{method} {path} documents no refusal");
        }
        for status in refusals {
            assert_eq!(
                responses[status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path} {status}"
            );
        }
    }

    // The router's fallback, which the loop above tells apart from a handler.
    let (status, body) = leash
        .call(Method::GET, "/v1/not-an-endpoint", ADMIN_KEY, None)
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}
