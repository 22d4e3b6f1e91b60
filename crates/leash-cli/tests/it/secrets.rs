//! No API key, grant handle, access token or key material appears in logs or error bodies
//! (ATTACKS 39).

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, Scenario, now};
use reqwest::Method;

use super::leash;

#[tokio::test]
async fn secrets_never_reach_logs_or_error_bodies() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    // Refusals that carry secrets in their input.
    let mut form = s.exchange_form(&leash);
    form.push(("scope".into(), "mail:send".into()));
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    let (_, _, refused) = s.exchange_raw(&leash, &form, Some(proof)).await;
    let (_, bad_key) = leash
        .call(
            Method::GET,
            "/v1/grants",
            "lsk_not_a_real_key_but_secret_looking",
            None,
        )
        .await;
    let url = format!("{}/v1/grants/{}/complete", leash.url, s.grant_id());
    let (_, _, downgrade) = s
        .agent_call(
            &leash,
            Method::POST,
            &format!("/v1/grants/{}/complete", s.grant_id()),
            &format!("Bearer {token}"),
            Some(dpop.dpop_proof("POST", &url, Some(&token), None, now())),
        )
        .await;

    // A vaulted credential is stored, listed and used only inside the server.
    let (status, listed) = leash
        .call(
            Method::PUT,
            "/v1/vault/mail",
            &s.user_key,
            Some(serde_json::json!({"kind": "bearer", "secret": "vaulted-upstream-token"})),
        )
        .await;
    assert_eq!(status, 200);
    let gw_url = format!("{}/gw/mail/messages/1", leash.url);
    let (_, _, gw_answer) = s
        .agent_call(
            &leash,
            Method::GET,
            "/gw/mail/messages/1",
            &format!("DPoP {token}"),
            Some(dpop.dpop_proof("GET", &gw_url, Some(&token), None, now())),
        )
        .await;
    let master = std::fs::read_to_string(leash.data_dir().join("master.key")).unwrap();
    let logs = leash.logs();
    assert!(
        logs.contains("token issued"),
        "the logs were captured: {logs}"
    );
    assert!(
        !logs.contains('\u{1b}'),
        "logs written to a file carry no terminal colour codes: {logs}"
    );
    let bodies = format!("{refused}{bad_key}{downgrade}{listed}{gw_answer}");
    for secret in [
        "vaulted-upstream-token",
        ADMIN_KEY,
        s.user_key.as_str(),
        s.handle(),
        token.as_str(),
        master.trim(),
        "lsk_not_a_real_key_but_secret_looking",
    ] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!bodies.contains(secret), "a secret is in an error body");
    }
    // Handles are stored only as digests: the database never holds one in the clear.
    let stored = leash.stored_bytes().await;
    let handle_bytes = s.handle().as_bytes();
    assert!(
        !stored
            .windows(handle_bytes.len())
            .any(|w| w == handle_bytes),
        "a grant handle is stored in the clear"
    );
}
