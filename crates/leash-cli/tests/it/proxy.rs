//! The forward proxy for browser agents (API §16), its first part: the proxy CA every node
//! serves and the master key seals, and the proxy credential an agent exchanges its grant for.

use leash_core::aead::MasterKey;
use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, form, now};
use reqwest::Method;
use serde_json::json;

use super::audit::audit;
use super::bin;
use super::gateway::{Gw, grant, setup};

const PROXY_CREDENTIAL: &str = "urn:leash:params:oauth:token-type:proxy-credential";

const PROXY: &str = r#"
[proxy]
listen = "127.0.0.1:0"
[[upstream]]
name = "portal"
url = "https://portal.example"
hosts = ["portal.example.com"]
[[upstream.route]]
method = "GET"
path = "/**"
action = "portal:read"
"#;

/// `GET /v1/proxy/ca`: status, content type, body.
async fn ca(gw: &Gw) -> (u16, String, String) {
    let response = gw
        .leash
        .http()
        .get(format!("{}/v1/proxy/ca", gw.leash.url))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, response.text().await.unwrap())
}

#[tokio::test]
async fn the_proxy_ca_is_made_once_and_kept_across_restarts_and_a_master_key_rotation() {
    let mut gw = setup(PROXY, grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, kind, pem) = ca(&gw).await;
    assert_eq!(status, 200, "{pem}");
    assert_eq!(kind, "application/x-pem-file");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
    // `leash proxy ca` prints the same, with no key.
    let out = std::process::Command::new(bin())
        .args(["proxy", "ca"])
        .env("LEASH_URL", &gw.leash.url)
        .env_remove("LEASH_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), pem);

    gw.leash.kill9().await;
    gw.leash.start_again().await;
    assert_eq!(ca(&gw).await.2, pem, "a restart keeps the CA");

    // Re-sealed with everything else by a master-key rotation: a start with only the new key
    // serves the same CA.
    let new = MasterKey::generate();
    leash_server::files::write_private(
        &gw.leash.data_dir().join("master.key.next"),
        new.to_base64().as_bytes(),
        leash_server::files::IfExists::Fail,
    )
    .unwrap();
    let (status, body) = gw
        .leash
        .call(
            Method::POST,
            "/v1/master-key/rotate",
            ADMIN_KEY,
            Some(json!({ "new_key_id": new.id() })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    gw.leash.kill9().await;
    gw.leash.start_again().await;
    assert_eq!(ca(&gw).await.2, pem);
}

/// A proxy credential asked for with a good assertion and proof is refused, saying `why`.
async fn proxy_credential_refused(gw: &Gw, why: &str) {
    let mut exchange = gw.s.exchange_form(&gw.leash);
    exchange.push(("requested_token_type".into(), PROXY_CREDENTIAL.into()));
    let dpop = AgentKey::generate(Alg::EdDsa);
    let proof = dpop.dpop_proof("POST", &gw.leash.token_url(), None, None, now());
    let (status, _, body) = gw.s.exchange_raw(&gw.leash, &exchange, Some(proof)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    let description = body["error_description"].as_str().unwrap();
    assert!(description.contains(why), "{body}");
}

#[tokio::test]
async fn without_the_proxy_there_is_no_ca_and_no_proxy_credential() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, _, body) = ca(&gw).await;
    assert_eq!(status, 404, "{body}");
    proxy_credential_refused(&gw, "[proxy]").await;
}

#[tokio::test]
async fn a_grant_no_browser_could_use_gets_no_proxy_credential() {
    // The grant's only upstream has no `hosts`.
    let gw = setup(PROXY, grant(&["mail:read"], &["mail"], json!({}))).await;
    proxy_credential_refused(&gw, "hosts").await;
}

#[tokio::test]
async fn an_agent_gets_a_proxy_credential_that_passes_for_no_access_token_and_dies_when_revoked() {
    let gw = setup(
        PROXY,
        grant(
            &["mail:read", "portal:read"],
            &["mail", "portal"],
            json!({}),
        ),
    )
    .await;
    let exchange = |requested: &str| {
        let mut form = gw.s.exchange_form(&gw.leash);
        form.push(("requested_token_type".into(), requested.into()));
        form
    };
    let dpop = AgentKey::generate(Alg::EdDsa);
    let proof = || dpop.dpop_proof("POST", &gw.leash.token_url(), None, None, now());

    // The agent must still prove its key to get one.
    let (status, _, body) =
        gw.s.exchange_raw(&gw.leash, &exchange(PROXY_CREDENTIAL), None)
            .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_dpop_proof");
    // A token type Leash does not issue.
    let (status, _, body) =
        gw.s.exchange_raw(
            &gw.leash,
            &exchange("urn:ietf:params:oauth:token-type:saml2"),
            Some(proof()),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    // The access token is still the default, asked for by either name.
    for asked in [
        "urn:ietf:params:oauth:token-type:access_token",
        "urn:ietf:params:oauth:token-type:jwt",
    ] {
        let (status, _, body) =
            gw.s.exchange_raw(&gw.leash, &exchange(asked), Some(proof()))
                .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "DPoP");
    }

    let (status, headers, body) =
        gw.s.exchange_raw(&gw.leash, &exchange(PROXY_CREDENTIAL), Some(proof()))
            .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["issued_token_type"], PROXY_CREDENTIAL);
    assert_eq!(body["token_type"], "N_A");
    assert_eq!(body["scope"], "mail:read portal:read");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!(expires_in > 0 && expires_in <= 300, "{body}");
    let credential = body["access_token"].as_str().unwrap().to_owned();
    assert!(credential.starts_with("lpx_"), "{credential}");
    // Not a JWT: nothing that verifies Leash's tokens through the JWKS can take it for one.
    assert_eq!(credential.matches('.').count(), 1);

    // Presented at the gateway as an access token, with a proof that names it: refused.
    let url = format!("{}/gw/mail/messages/1", gw.leash.public_url());
    let proof = dpop.dpop_proof("GET", &url, Some(&credential), None, now());
    let response = gw
        .leash
        .http()
        .get(format!("{}/gw/mail/messages/1", gw.leash.url))
        .header("Authorization", format!("DPoP {credential}"))
        .header("DPoP", proof)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(gw.upstream.count(), 0, "nothing was forwarded");

    // Revoked by its human like any token: audited under its own id.
    let (status, _, body) = gw
        .leash
        .post_form(
            "/oauth2/revoke",
            form(&[("token", credential.as_str())]),
            &[("Authorization", format!("Bearer {}", gw.s.user_key))],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, events) = audit(&gw.leash, ADMIN_KEY, "").await;
    let issued = events
        .iter()
        .find(|e| {
            e["kind"] == "token.exchange"
                && e["request_id"].as_str().unwrap_or("").starts_with("pxc_")
        })
        .expect("the issuance is audited");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "token.revoked" && e["request_id"] == issued["request_id"])
    );
    // The credential itself is in no event.
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains(&credential)
    );
}
