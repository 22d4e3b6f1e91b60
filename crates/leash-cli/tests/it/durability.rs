//! State survives `kill -9`: what the server acknowledged is stored (API §2, ATTACKS 20, 35).

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{AGENT, Scenario, now};
use serde_json::json;

use super::leash;

#[tokio::test]
async fn grant_acknowledged_before_kill_9_exists_and_exchanges_after_restart() {
    let mut leash = leash().await;
    let s = Scenario::new(&leash).await;
    // Kill at once after the 201, with no shutdown of any kind.
    leash.kill9().await;
    leash.restart().await;
    assert_eq!(s.grant_status(&leash).await, "active");
    let (token, _) = s.token(&leash).await;
    assert_eq!(s.introspect(&leash, &token).await["act"]["sub"], AGENT);
}

#[tokio::test]
async fn revocations_and_replay_entries_survive_kill_9() {
    let mut leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, _) = s.token(&leash).await;
    let (status, _, _) = leash
        .post_form(
            "/oauth2/revoke",
            leash_testkit::form(&[("token", &token)]),
            &[("Authorization", format!("Bearer {}", s.user_key))],
        )
        .await;
    assert_eq!(status, 200);
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    assert_eq!(
        s.exchange_raw(&leash, &s.exchange_form(&leash), Some(proof.clone()))
            .await
            .0,
        200
    );
    leash.restart().await;
    assert_eq!(s.introspect(&leash, &token).await, json!({"active": false}));
    let (status, _, body) = s
        .exchange_raw(&leash, &s.exchange_form(&leash), Some(proof))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_dpop_proof"))
    );
    // The signing key is the same across restarts: tokens issued before still verify.
    let (fresh, _) = s.token(&leash).await;
    leash.restart().await;
    assert_eq!(s.introspect(&leash, &fresh).await["active"], true);
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut leash = leash().await;
    let status = leash.terminate().await;
    assert!(status.success(), "{status:?}");
}
