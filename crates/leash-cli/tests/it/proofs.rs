//! DPoP proofs at the token endpoint (API §4): each refusal answers 400 invalid_dpop_proof and
//! consumes nothing.

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{Leash, Scenario, now};
use serde_json::{Map, Value, json};

use super::{b64, leash};

fn header(key: &AgentKey) -> Map<String, Value> {
    let mut h = Map::new();
    h.insert("typ".into(), json!("dpop+jwt"));
    h.insert("jwk".into(), key.public().to_value());
    h
}

fn claims(leash: &Leash) -> Value {
    json!({"jti": leash_core::secret::random_id(""), "htm": "POST", "htu": leash.token_url(), "iat": now()})
}

async fn refused(leash: &Leash, s: &Scenario, proof: Option<String>) -> Value {
    let form = s.exchange_form(leash);
    let (status, _, body) = s.exchange_raw(leash, &form, proof).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{body}"
    );
    // Nothing was consumed: the same assertion still works with a good proof.
    let good =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    assert_eq!(s.exchange_raw(leash, &form, Some(good)).await.0, 200);
    body
}

#[tokio::test]
async fn missing_proof() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    refused(&leash, &s, None).await;
}

#[tokio::test]
async fn alg_none_and_hs256_are_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    for alg in ["none", "None", "NONE"] {
        let mut h = header(&key);
        h.insert("alg".into(), json!(alg));
        let proof = format!(
            "{}.{}.",
            b64(Value::Object(h).to_string()),
            b64(claims(&leash).to_string())
        );
        refused(&leash, &s, Some(proof)).await;
    }
    // HS256 keyed with the public key's bytes: the algorithm must come from the key type.
    use hmac::Mac as _;
    let mut h = header(&key);
    h.insert("alg".into(), json!("HS256"));
    let input = format!(
        "{}.{}",
        b64(Value::Object(h).to_string()),
        b64(claims(&leash).to_string())
    );
    let x = key.public().to_value()["x"].as_str().unwrap().to_owned();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(x.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    let proof = format!("{input}.{}", b64(mac.finalize().into_bytes()));
    refused(&leash, &s, Some(proof)).await;
}

#[tokio::test]
async fn private_key_in_jwk_is_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    let mut h = header(&key);
    h.insert("jwk".into(), key.to_private_jwk());
    refused(&leash, &s, Some(key.sign(h, &claims(&leash)))).await;
}

#[tokio::test]
async fn wrong_typ_and_crit_are_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    for (name, value) in [
        ("typ", json!("jwt")),
        ("typ", json!("at+jwt")),
        ("crit", json!(["exp"])),
    ] {
        let mut h = header(&key);
        h.insert(name.into(), value);
        refused(&leash, &s, Some(key.sign(h, &claims(&leash)))).await;
    }
    let mut h = header(&key);
    h.remove("typ");
    refused(&leash, &s, Some(key.sign(h, &claims(&leash)))).await;
}

#[tokio::test]
async fn htm_and_htu_mismatches_are_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    let port = leash.url.rsplit(':').next().unwrap().to_owned();
    for (htm, htu) in [
        ("GET", leash.token_url()),
        ("post", leash.token_url()),
        ("POST", format!("{}/oauth2/introspect", leash.url)),
        ("POST", format!("https://127.0.0.1:{port}/oauth2/token")),
        ("POST", format!("http://localhost:{port}/oauth2/token")),
        ("POST", "http://evil.example/oauth2/token".to_owned()),
    ] {
        let mut c = claims(&leash);
        c["htm"] = json!(htm);
        c["htu"] = json!(htu);
        refused(&leash, &s, Some(key.sign(header(&key), &c))).await;
    }
}

#[tokio::test]
async fn iat_too_old_in_the_future_or_not_an_integer_is_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    for iat in [
        json!(now() - 120),
        json!(now() + 120),
        json!(now().to_string()),
        json!(now() as f64 + 0.5),
        json!(null),
    ] {
        let mut c = claims(&leash);
        c["iat"] = iat;
        refused(&leash, &s, Some(key.sign(header(&key), &c))).await;
    }
}

#[tokio::test]
async fn replayed_jti_is_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    let proof = key.dpop_proof("POST", &leash.token_url(), None, None, now());
    assert_eq!(
        s.exchange_raw(&leash, &s.exchange_form(&leash), Some(proof.clone()))
            .await
            .0,
        200
    );
    refused(&leash, &s, Some(proof)).await;
}

#[tokio::test]
async fn parallel_copies_of_one_proof_yield_exactly_one_token() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let proof =
        AgentKey::generate(Alg::EdDsa).dpop_proof("POST", &leash.token_url(), None, None, now());
    let forms: Vec<_> = (0..8).map(|_| s.exchange_form(&leash)).collect();
    let results = futures::future::join_all(
        forms
            .iter()
            .map(|f| s.exchange_raw(&leash, f, Some(proof.clone()))),
    )
    .await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(
        ok,
        1,
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn two_dpop_headers_are_refused() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    let form = s.exchange_form(&leash);
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _, body) = leash
        .post_form(
            "/oauth2/token",
            leash_testkit::form(&pairs),
            &[
                (
                    "DPoP",
                    key.dpop_proof("POST", &leash.token_url(), None, None, now()),
                ),
                (
                    "DPoP",
                    key.dpop_proof("POST", &leash.token_url(), None, None, now()),
                ),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{body}"
    );
}

#[tokio::test]
async fn server_nonces_when_switched_on() {
    let leash = Leash::start(super::bin(), "dpop_nonce = true").await;
    let s = Scenario::new(&leash).await;
    let key = AgentKey::generate(Alg::EdDsa);
    let form = s.exchange_form(&leash);
    let (status, headers, body) = s
        .exchange_raw(
            &leash,
            &form,
            Some(key.dpop_proof("POST", &leash.token_url(), None, None, now())),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("use_dpop_nonce")),
        "{body}"
    );
    let nonce = headers["dpop-nonce"].to_str().unwrap().to_owned();
    let foreign = "AAAAAGkAAAAAAAAAAAAAAAAAAAAAAAAA";
    let (status, _, body) = s
        .exchange_raw(
            &leash,
            &form,
            Some(key.dpop_proof("POST", &leash.token_url(), None, Some(foreign), now())),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("use_dpop_nonce"))
    );
    let (status, headers, body) = s
        .exchange_raw(
            &leash,
            &form,
            Some(key.dpop_proof("POST", &leash.token_url(), None, Some(&nonce), now())),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains_key("dpop-nonce"));

    // At a resource: 401 use_dpop_nonce with a fresh nonce, then the call with it succeeds.
    let token = body["access_token"].as_str().unwrap();
    let path = format!("/v1/grants/{}/complete", s.grant_id());
    let url = format!("{}{path}", leash.url);
    let auth = format!("DPoP {token}");
    let (status, headers, body) = s
        .agent_call(
            &leash,
            reqwest::Method::POST,
            &path,
            &auth,
            Some(key.dpop_proof("POST", &url, Some(token), None, now())),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("use_dpop_nonce")),
        "{body}"
    );
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("use_dpop_nonce")
    );
    let nonce = headers["dpop-nonce"].to_str().unwrap().to_owned();
    let (status, _, body) = s
        .agent_call(
            &leash,
            reqwest::Method::POST,
            &path,
            &auth,
            Some(key.dpop_proof("POST", &url, Some(token), Some(&nonce), now())),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("completed")),
        "{body}"
    );
}
