//! Agent calls at a resource (grant completion), revocation and introspection (API §2, §3.2,
//! §3.3, §4): each refusal answers 401 with a DPoP challenge and changes nothing.

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, AGENT, JWT_BEARER, Leash, Scenario, form, now};
use reqwest::Method;
use serde_json::json;

use super::leash;

fn complete_path(s: &Scenario) -> String {
    format!("/v1/grants/{}/complete", s.grant_id())
}

async fn assert_refused(
    leash: &Leash,
    s: &Scenario,
    authorization: &str,
    proof: Option<String>,
    code: &str,
) {
    let (status, headers, body) = s
        .agent_call(leash, Method::POST, &complete_path(s), authorization, proof)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some(code)),
        "{body}"
    );
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("DPoP ") && challenge.contains(code) && challenge.contains("algs="),
        "{challenge}"
    );
    assert_eq!(
        s.grant_status(leash).await,
        "active",
        "a refused call changed the grant"
    );
}

#[tokio::test]
async fn agent_completes_its_grant_and_every_token_dies() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    let (other_token, _) = s.token(&leash).await;
    let url = format!("{}{}", leash.url, complete_path(&s));
    let proof = dpop.dpop_proof("POST", &url, Some(&token), None, now());
    let (status, _, body) = s
        .agent_call(
            &leash,
            Method::POST,
            &complete_path(&s),
            &format!("DPoP {token}"),
            Some(proof),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("completed")),
        "{body}"
    );
    assert_eq!(s.introspect(&leash, &token).await, json!({"active": false}));
    assert_eq!(
        s.introspect(&leash, &other_token).await,
        json!({"active": false})
    );
}

#[tokio::test]
async fn bearer_downgrade_and_missing_proof_are_invalid_token() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    let url = format!("{}{}", leash.url, complete_path(&s));
    let proof = dpop.dpop_proof("POST", &url, Some(&token), None, now());
    assert_refused(
        &leash,
        &s,
        &format!("Bearer {token}"),
        Some(proof),
        "invalid_token",
    )
    .await;
    assert_refused(&leash, &s, &format!("DPoP {token}"), None, "invalid_token").await;
}

#[tokio::test]
async fn wrong_ath_other_key_wrong_url_and_replay_are_invalid_dpop_proof() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    let (other_token, _) = s.token(&leash).await;
    let url = format!("{}{}", leash.url, complete_path(&s));
    let auth = format!("DPoP {token}");
    // A proof bound to another token (wrong ath).
    assert_refused(
        &leash,
        &s,
        &auth,
        Some(dpop.dpop_proof("POST", &url, Some(&other_token), None, now())),
        "invalid_dpop_proof",
    )
    .await;
    // A valid proof by a key other than cnf.jkt.
    let stranger = AgentKey::generate(Alg::EdDsa);
    assert_refused(
        &leash,
        &s,
        &auth,
        Some(stranger.dpop_proof("POST", &url, Some(&token), None, now())),
        "invalid_dpop_proof",
    )
    .await;
    // No ath at all.
    assert_refused(
        &leash,
        &s,
        &auth,
        Some(dpop.dpop_proof("POST", &url, None, None, now())),
        "invalid_dpop_proof",
    )
    .await;
    // htu of another resource.
    let other = format!("{}/v1/grants/grt_other/complete", leash.url);
    assert_refused(
        &leash,
        &s,
        &auth,
        Some(dpop.dpop_proof("POST", &other, Some(&token), None, now())),
        "invalid_dpop_proof",
    )
    .await;
    // A proof used once, then replayed: the first call is refused later (wrong grant id path),
    // so replay a proof on an endpoint where it succeeded.
    let proof = dpop.dpop_proof("POST", &url, Some(&token), None, now());
    let (status, _, _) = s
        .agent_call(
            &leash,
            Method::POST,
            &complete_path(&s),
            &auth,
            Some(proof.clone()),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, body) = s
        .agent_call(&leash, Method::POST, &complete_path(&s), &auth, Some(proof))
        .await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn forged_and_foreign_tokens_are_invalid_token() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    let url = format!("{}{}", leash.url, complete_path(&s));
    // Flip one signature character.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_refused(
        &leash,
        &s,
        &format!("DPoP {forged}"),
        Some(dpop.dpop_proof("POST", &url, Some(&forged), None, now())),
        "invalid_token",
    )
    .await;
    // A DPoP proof presented as an access token.
    let proof_as_token = dpop.dpop_proof("POST", &url, None, None, now());
    assert_refused(
        &leash,
        &s,
        &format!("DPoP {proof_as_token}"),
        Some(dpop.dpop_proof("POST", &url, Some(&proof_as_token), None, now())),
        "invalid_token",
    )
    .await;
    // A token signed by the agent's own key with Leash's claims.
    let mut header = serde_json::Map::new();
    header.insert("typ".into(), json!("at+jwt"));
    header.insert("kid".into(), json!("whatever"));
    let self_made = s.agent_key.sign(header, &super::segment(&token, 1));
    assert_refused(
        &leash,
        &s,
        &format!("DPoP {self_made}"),
        Some(dpop.dpop_proof("POST", &url, Some(&self_made), None, now())),
        "invalid_token",
    )
    .await;
}

#[tokio::test]
async fn both_bearer_and_dpop_authorization_is_invalid_request() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    let url = format!("{}{}", leash.url, complete_path(&s));
    let response = leash
        .http()
        .post(&url)
        .header("Authorization", format!("Bearer {token}"))
        .header("Authorization", format!("DPoP {token}"))
        .header(
            "DPoP",
            dpop.dpop_proof("POST", &url, Some(&token), None, now()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
}

async fn revoke(
    leash: &Leash,
    token: &str,
    headers: &[(&str, String)],
    extra: &[(&str, &str)],
) -> u16 {
    let mut pairs = vec![("token", token)];
    pairs.extend_from_slice(extra);
    leash
        .post_form("/oauth2/revoke", form(&pairs), headers)
        .await
        .0
}

#[tokio::test]
async fn revocation_by_agent_human_and_admin_and_not_by_strangers() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (_, bob_key) = leash.create_user("bob").await;

    let (t1, _) = s.token(&leash).await;
    assert_eq!(
        revoke(
            &leash,
            &t1,
            &[("Authorization", format!("Bearer {bob_key}"))],
            &[]
        )
        .await,
        200
    );
    assert_eq!(
        s.introspect(&leash, &t1).await["active"],
        true,
        "bob may not revoke alice's token"
    );
    assert_eq!(
        revoke(
            &leash,
            &t1,
            &[("Authorization", format!("Bearer {}", s.user_key))],
            &[]
        )
        .await,
        200
    );
    assert_eq!(s.introspect(&leash, &t1).await, json!({"active": false}));

    let (t2, _) = s.token(&leash).await;
    let assertion = s
        .agent_key
        .client_assertion(AGENT, &leash.token_url(), now());
    let auth = [
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion.as_str()),
    ];
    assert_eq!(revoke(&leash, &t2, &[], &auth).await, 200);
    assert_eq!(s.introspect(&leash, &t2).await, json!({"active": false}));
    // The assertion was used once.
    assert_eq!(revoke(&leash, &t2, &[], &auth).await, 401);

    let (t3, _) = s.token(&leash).await;
    assert_eq!(
        revoke(
            &leash,
            &t3,
            &[("Authorization", format!("Bearer {ADMIN_KEY}"))],
            &[]
        )
        .await,
        200
    );
    assert_eq!(s.introspect(&leash, &t3).await, json!({"active": false}));

    // Garbage tokens are fine (RFC 7009 §2.2); no authentication is not.
    assert_eq!(
        revoke(
            &leash,
            "not-a-token",
            &[("Authorization", format!("Bearer {ADMIN_KEY}"))],
            &[]
        )
        .await,
        200
    );
    assert_eq!(revoke(&leash, &t3, &[], &[]).await, 401);
}

#[tokio::test]
async fn introspection_needs_the_admin_and_says_only_inactive_for_dead_tokens() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, _) = s.token(&leash).await;
    for auth in [
        vec![],
        vec![("Authorization", format!("Bearer {}", s.user_key))],
        vec![("Authorization", "Bearer lsk_wrong".to_owned())],
    ] {
        let (status, _, body) = leash
            .post_form("/oauth2/introspect", form(&[("token", &token)]), &auth)
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{body}"
        );
    }
    assert_eq!(
        s.introspect(&leash, "eyJhbGciOiJub25lIn0.e30.").await,
        json!({"active": false})
    );
    assert_eq!(
        s.introspect(&leash, "garbage").await,
        json!({"active": false})
    );
    let (status, _) = leash
        .call(
            Method::POST,
            &format!("/v1/grants/{}/revoke", s.grant_id()),
            &s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.introspect(&leash, &token).await, json!({"active": false}));
}

/// ATTACKS 34: a revocation the store could not write is answered 503, never 200.
#[tokio::test]
async fn a_storage_failure_during_revocation_is_503_never_200() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, _) = s.token(&leash).await;
    leash.fail_inserts("revoked_tokens", true).await;
    let human = [("Authorization", format!("Bearer {}", s.user_key))];
    assert_eq!(revoke(&leash, &token, &human, &[]).await, 503);
    leash.fail_inserts("revoked_tokens", false).await;
    assert_eq!(revoke(&leash, &token, &human, &[]).await, 200);
    assert_eq!(s.introspect(&leash, &token).await["active"], false);
}
