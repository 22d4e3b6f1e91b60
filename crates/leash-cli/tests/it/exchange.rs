//! Token exchange (API §3.1): the happy path and each refusal.

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, AGENT, Scenario, now};
use reqwest::Method;
use serde_json::{Map, json};

use super::{leash, segment};

#[tokio::test]
async fn happy_path_issues_a_dpop_bound_token_with_the_documented_claims() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let dpop = AgentKey::generate(Alg::EdDsa);
    let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, headers, body) = s
        .exchange_raw(&leash, &s.exchange_form(&leash), Some(proof))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["token_type"], "DPoP");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["scope"], "mail:read mail:draft");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((295..=300).contains(&expires_in), "{expires_in}");
    assert!(body.get("refresh_token").is_none());

    let token = body["access_token"].as_str().unwrap();
    let header = segment(token, 0);
    let claims = segment(token, 1);
    let (_, jwks) = leash
        .call(Method::GET, "/.well-known/jwks.json", "", None)
        .await;
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
    assert_eq!(jwks["keys"][0]["use"], "sig");
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    assert_eq!(claims["iss"], leash.url);
    assert_eq!(claims["aud"], leash.url);
    assert_eq!(claims["sub"], s.user_id);
    assert_eq!(claims["act"]["sub"], AGENT);
    assert_eq!(claims["client_id"], AGENT);
    assert_eq!(claims["cnf"]["jkt"], dpop.public().thumbprint());
    assert_eq!(claims["grant_id"], s.grant_id());
    assert_eq!(claims["purpose"], "Summarise my inbox");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        expires_in
    );

    let introspection = s.introspect(&leash, token).await;
    assert_eq!(introspection["active"], true);
    assert_eq!(introspection["sub"], s.user_id);
    assert_eq!(introspection["act"]["sub"], AGENT);
    assert_eq!(introspection["token_type"], "DPoP");
    assert_eq!(introspection["cnf"]["jkt"], dpop.public().thumbprint());
}

#[tokio::test]
async fn metadata_lists_the_endpoints_and_algorithms() {
    let leash = leash().await;
    let (status, meta) = leash
        .call(
            Method::GET,
            "/.well-known/oauth-authorization-server",
            "",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(meta["issuer"], leash.url);
    assert_eq!(meta["token_endpoint"], leash.token_url());
    assert_eq!(
        meta["jwks_uri"],
        format!("{}/.well-known/jwks.json", leash.url)
    );
    assert_eq!(
        meta["introspection_endpoint"],
        format!("{}/oauth2/introspect", leash.url)
    );
    assert_eq!(
        meta["revocation_endpoint"],
        format!("{}/oauth2/revoke", leash.url)
    );
    assert_eq!(
        meta["grant_types_supported"],
        json!(["urn:ietf:params:oauth:grant-type:token-exchange"])
    );
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert_eq!(
        meta["dpop_signing_alg_values_supported"],
        json!(["EdDSA", "Ed25519", "ES256"])
    );
    let (status, _) = leash.call(Method::GET, "/healthz", "", None).await;
    assert_eq!(status, 200);
    let (status, ready) = leash.call(Method::GET, "/readyz", "", None).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
}

#[tokio::test]
async fn p256_agent_and_rfc9864_ed25519_name_are_accepted() {
    for (agent_alg, dpop_alg) in [(Alg::Es256, Alg::Es256), (Alg::Ed25519, Alg::Ed25519)] {
        let leash = leash().await;
        let s = Scenario::with_grant(&leash, agent_alg, json!({
            "agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 60,
        }))
        .await;
        let dpop = AgentKey::generate(dpop_alg);
        let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
        let (status, _, body) = s
            .exchange_raw(&leash, &s.exchange_form(&leash), Some(proof))
            .await;
        assert_eq!(status, 200, "{agent_alg:?}: {body}");
        let claims = segment(body["access_token"].as_str().unwrap(), 1);
        assert_eq!(claims["cnf"]["jkt"], dpop.public().thumbprint());
    }
}

async fn expect_error(
    s: &Scenario,
    leash: &leash_testkit::Leash,
    form: &[(String, String)],
    status: u16,
    code: &str,
) {
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    let (got, _, body) = s.exchange_raw(leash, form, Some(proof)).await;
    assert_eq!(
        (got, body["error"].as_str().unwrap_or_default()),
        (status, code),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
}

fn with(form: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut out: Vec<_> = form.iter().filter(|(k, _)| k != name).cloned().collect();
    out.push((name.into(), value.into()));
    out
}

fn without(form: &[(String, String)], name: &str) -> Vec<(String, String)> {
    form.iter().filter(|(k, _)| k != name).cloned().collect()
}

#[tokio::test]
async fn assertion_signed_by_another_key_is_invalid_client() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let stranger =
        AgentKey::generate(Alg::EdDsa).client_assertion(AGENT, &leash.token_url(), now());
    expect_error(
        &s,
        &leash,
        &with(&s.exchange_form(&leash), "client_assertion", &stranger),
        401,
        "invalid_client",
    )
    .await;
}

#[tokio::test]
async fn replayed_assertion_is_invalid_client() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let form = s.exchange_form(&leash);
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    assert_eq!(s.exchange_raw(&leash, &form, Some(proof)).await.0, 200);
    expect_error(&s, &leash, &form, 401, "invalid_client").await;
}

fn assertion_with(s: &Scenario, claims: serde_json::Value) -> String {
    s.agent_key.sign(Map::new(), &claims)
}

#[tokio::test]
async fn expired_far_future_and_type_confused_assertions_are_invalid_client() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let aud = leash.token_url();
    let t = now();
    for claims in [
        json!({"iss": AGENT, "sub": AGENT, "aud": aud, "exp": t - 120, "jti": "a1"}),
        json!({"iss": AGENT, "sub": AGENT, "aud": aud, "exp": t + 3600, "jti": "a2"}),
        json!({"iss": AGENT, "sub": AGENT, "aud": aud, "exp": (t + 60).to_string(), "jti": "a3"}),
        json!({"iss": AGENT, "sub": AGENT, "aud": aud, "jti": "a4"}),
        json!({"iss": AGENT, "sub": AGENT, "aud": "http://elsewhere", "exp": t + 60, "jti": "a5"}),
        json!({"iss": "spiffe://example.org/agent/other", "sub": AGENT, "aud": aud, "exp": t + 60, "jti": "a6"}),
        json!({"iss": AGENT, "sub": AGENT, "aud": aud, "exp": t + 60}),
    ] {
        let form = with(
            &s.exchange_form(&leash),
            "client_assertion",
            &assertion_with(&s, claims.clone()),
        );
        expect_error(&s, &leash, &form, 401, "invalid_client").await;
    }
}

#[tokio::test]
async fn handle_of_another_agent_is_invalid_grant() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let other_id = "spiffe://example.org/agent/other";
    let other = AgentKey::generate(Alg::EdDsa);
    leash.register_agent(other_id, &other).await;
    let form = with(
        &s.exchange_form(&leash),
        "client_assertion",
        &other.client_assertion(other_id, &leash.token_url(), now()),
    );
    expect_error(&s, &leash, &form, 400, "invalid_grant").await;
    // An unknown handle reads the same.
    expect_error(
        &s,
        &leash,
        &with(&s.exchange_form(&leash), "subject_token", "lgh_unknown"),
        400,
        "invalid_grant",
    )
    .await;
}

#[tokio::test]
async fn revoked_and_completed_grants_are_invalid_grant() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (status, body) = leash
        .call(
            Method::POST,
            &format!("/v1/grants/{}/revoke", s.grant_id()),
            &s.user_key,
            Some(json!({"reason": "done with it"})),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("revoked")),
        "{body}"
    );
    expect_error(&s, &leash, &s.exchange_form(&leash), 400, "invalid_grant").await;
    // Terminal: never back to active, a second end is a conflict.
    let (status, _) = leash
        .call(
            Method::POST,
            &format!("/v1/grants/{}/complete", s.grant_id()),
            &s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 409);

    let second = leash.create_grant(&s.user_key, json!({
        "agent": AGENT, "purpose": "p2", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 60,
    })).await;
    let (status, body) = leash
        .call(
            Method::POST,
            &format!("/v1/grants/{}/complete", second["id"].as_str().unwrap()),
            &s.user_key,
            None,
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("completed")));
    let form = with(
        &s.exchange_form(&leash),
        "subject_token",
        second["handle"].as_str().unwrap(),
    );
    expect_error(&s, &leash, &form, 400, "invalid_grant").await;
}

#[tokio::test]
async fn expired_grant_is_invalid_grant() {
    let leash = leash().await;
    let s = Scenario::with_grant(&leash, Alg::EdDsa, json!({
        "agent": AGENT, "purpose": "brief", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 1,
    }))
    .await;
    let path = format!("/v1/grants/{}", s.grant_id());
    let (_, grant) = leash.call(Method::GET, &path, &s.user_key, None).await;
    leash_testkit::wait_until(leash_testkit::unix_of(&grant["expires_at"])).await;
    expect_error(&s, &leash, &s.exchange_form(&leash), 400, "invalid_grant").await;
    assert_eq!(s.grant_status(&leash).await, "expired");
}

#[tokio::test]
async fn scope_outside_the_grant_is_invalid_scope_and_exp_never_passes_the_grant() {
    let leash = leash().await;
    let s = Scenario::with_grant(&leash, Alg::EdDsa, json!({
        "agent": AGENT, "purpose": "short", "upstreams": ["mail"], "actions": ["mail:read", "mail:draft"], "ttl_seconds": 100,
    }))
    .await;
    for scope in [
        "mail:send",
        "mail:read finance:read",
        "",
        "mail:read  mail:draft",
    ] {
        expect_error(
            &s,
            &leash,
            &with(&s.exchange_form(&leash), "scope", scope),
            400,
            "invalid_scope",
        )
        .await;
    }
    let form = with(&s.exchange_form(&leash), "scope", "mail:read");
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, _, body) = s.exchange_raw(&leash, &form, Some(proof)).await;
    assert_eq!(status, 200);
    assert_eq!(body["scope"], "mail:read");
    assert!(body["expires_in"].as_i64().unwrap() <= 100);
    let claims = segment(body["access_token"].as_str().unwrap(), 1);
    assert!(claims["exp"].as_i64().unwrap() <= now() + 100);
}

#[tokio::test]
async fn disabled_agent_gets_no_token_and_loses_its_grants() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, _) = s.token(&leash).await;
    let path = format!(
        "/v1/agents/{}/disable",
        url::form_urlencoded::byte_serialize(AGENT.as_bytes()).collect::<String>()
    );
    let (status, body) = leash.call(Method::POST, &path, ADMIN_KEY, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("disabled")),
        "{body}"
    );
    expect_error(&s, &leash, &s.exchange_form(&leash), 401, "invalid_client").await;
    assert_eq!(s.introspect(&leash, &token).await, json!({"active": false}));
    assert_eq!(s.grant_status(&leash).await, "revoked");
}

#[tokio::test]
async fn missing_or_wrong_parameters_are_invalid_request() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let form = s.exchange_form(&leash);
    expect_error(
        &s,
        &leash,
        &without(&form, "subject_token"),
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        &s,
        &leash,
        &with(&form, "subject_token", ""),
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        &s,
        &leash,
        &without(&form, "subject_token_type"),
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        &s,
        &leash,
        &with(
            &form,
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        &s,
        &leash,
        &without(&form, "grant_type"),
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        &s,
        &leash,
        &with(&form, "grant_type", "client_credentials"),
        400,
        "unsupported_grant_type",
    )
    .await;
    expect_error(
        &s,
        &leash,
        &without(&form, "client_assertion"),
        401,
        "invalid_client",
    )
    .await;
    // RFC 8693 delegation with an actor_token is not how agents authenticate here.
    expect_error(
        &s,
        &leash,
        &with(&form, "actor_token", "eyJ.e30.x"),
        400,
        "invalid_request",
    )
    .await;
    let mut repeated = s.exchange_form(&leash);
    repeated.push(("subject_token".into(), "lgh_other".into()));
    expect_error(&s, &leash, &repeated, 400, "invalid_request").await;
}

#[tokio::test]
async fn grant_creation_validates_actions_and_ownership() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    for body in [
        json!({"agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["mail:fly"], "ttl_seconds": 60}),
        json!({"agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["finance:read"], "ttl_seconds": 60}),
        json!({"agent": AGENT, "purpose": "p", "upstreams": ["nope"], "actions": ["mail:read"], "ttl_seconds": 60}),
        json!({"agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["mail:read"], "approval_required": ["mail:send"], "ttl_seconds": 60}),
        json!({"agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["mail:read"], "single_use": ["mail:draft"], "ttl_seconds": 60}),
        json!({"agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 0}),
        json!({"agent": "spiffe://example.org/agent/ghost", "purpose": "p", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 60}),
        json!({"agent": AGENT, "purpose": "", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 60}),
    ] {
        let (status, out) = leash
            .call(Method::POST, "/v1/grants", &s.user_key, Some(body.clone()))
            .await;
        assert_eq!(
            (status, out["error"].as_str()),
            (400, Some("invalid_request")),
            "{body}: {out}"
        );
    }
    // ttl is capped by max_grant_ttl (8 h).
    let capped = leash.create_grant(&s.user_key, json!({
        "agent": AGENT, "purpose": "long", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 999_999,
    })).await;
    let created = time::OffsetDateTime::parse(
        capped["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires = time::OffsetDateTime::parse(
        capped["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((expires - created).whole_seconds(), 8 * 3600);

    // The admin cannot create grants for nobody; bob sees neither alice's grants nor one by id.
    let valid = json!({"agent": AGENT, "purpose": "p", "upstreams": ["mail"], "actions": ["mail:read"], "ttl_seconds": 60});
    let (status, body) = leash
        .call(Method::POST, "/v1/grants", ADMIN_KEY, Some(valid))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (_, bob_key) = leash.create_user("bob").await;
    let (_, list) = leash.call(Method::GET, "/v1/grants", &bob_key, None).await;
    assert_eq!(list["grants"], json!([]));
    let (status, _) = leash
        .call(
            Method::GET,
            &format!("/v1/grants/{}", s.grant_id()),
            &bob_key,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = leash
        .call(
            Method::POST,
            &format!("/v1/grants/{}/revoke", s.grant_id()),
            &bob_key,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, all) = leash
        .call(Method::GET, "/v1/grants?status=active", ADMIN_KEY, None)
        .await;
    assert_eq!(all["grants"].as_array().unwrap().len(), 2);
    assert!(
        all["grants"][0].get("handle").is_none(),
        "a handle is shown only once"
    );
}
