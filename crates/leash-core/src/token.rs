//! Leash access tokens: RFC 9068 JWTs signed with the server's Ed25519 key, carrying the human
//! (`sub`), the agent (`act.sub`, `client_id`), the grant and the DPoP key binding (`cnf.jkt`).

// Handles numbers a client chose (time claims, counts): no operation that can overflow.
#![deny(clippy::arithmetic_side_effects)]

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::b64;
use crate::jwk::PublicJwk;
use crate::jws::{JoseError, Jws};

/// The token-exchange grant type (RFC 8693 §2.1).
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The subject token type of grant handles.
pub const GRANT_TOKEN_TYPE: &str = "urn:leash:params:oauth:token-type:grant";
/// The issued token type (RFC 8693 §3).
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 §3: a JWT; Leash's access tokens are JWTs, so a request for one gets one.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// The `typ` of access tokens (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// The longest `kid` looked up; anything longer is refused before any lookup.
pub const MAX_KID_LEN: usize = 128;

/// The `act` claim (RFC 8693 §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The agent.
    pub sub: String,
}

/// The `cnf` claim (RFC 9449 §6.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Thumbprint of the DPoP key the token is bound to.
    pub jkt: String,
}

/// The claims of a Leash access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The issuer.
    pub iss: String,
    /// The human the agent acts for.
    pub sub: String,
    /// The audience: the issuer itself (the gateway is part of it).
    pub aud: String,
    /// Issued at.
    pub iat: i64,
    /// Expires at.
    pub exp: i64,
    /// Unique id, used for revocation.
    pub jti: String,
    /// The agent.
    pub client_id: String,
    /// The agent as actor.
    pub act: Actor,
    /// Space-separated actions.
    pub scope: String,
    /// DPoP binding.
    pub cnf: Confirmation,
    /// The grant the token was exchanged for.
    pub grant_id: String,
    /// The grant's purpose.
    pub purpose: String,
}

impl AccessClaims {
    /// The scope as a list of actions.
    pub fn actions(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }
}

/// The server's token-signing key.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    kid: String,
}

impl SigningKey {
    /// Wraps an Ed25519 key; its `kid` is its RFC 7638 thumbprint.
    pub fn new(key: ed25519_dalek::SigningKey) -> Self {
        let kid = public_jwk(&key.verifying_key()).thumbprint();
        Self { key, kid }
    }

    /// The key id published in the JWKS and put in every token header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The 32 private bytes, for sealing at rest.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// An Ed25519 signature over `message` (for audit checkpoints).
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.key.sign(message).to_bytes()
    }

    /// The public key for verification.
    pub fn public(&self) -> PublicJwk {
        public_jwk(&self.key.verifying_key())
    }

    /// The JWKS entry: public key with `kid`, `alg` and `use`.
    pub fn jwks_entry(&self) -> Value {
        let mut jwk = self.public().to_value();
        if let Value::Object(map) = &mut jwk {
            map.insert("kid".into(), json!(self.kid));
            map.insert("alg".into(), json!("EdDSA"));
            map.insert("use".into(), json!("sig"));
        }
        jwk
    }

    /// Signs an access token.
    pub fn sign(&self, claims: &AccessClaims) -> String {
        let claims = serde_json::to_value(claims).unwrap_or(Value::Null);
        self.sign_at_jwt(&claims)
    }

    /// Signs `claims` as an RFC 9068 access token (`typ` at+jwt) under this key's `kid`.
    pub fn sign_at_jwt(&self, claims: &Value) -> String {
        let header = json!({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYP, "kid": self.kid});
        crate::jws::sign_ed25519(&header, claims, &self.key)
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(kid={})", self.kid)
    }
}

fn public_jwk(key: &ed25519_dalek::VerifyingKey) -> PublicJwk {
    PublicJwk::Ed25519 {
        x: b64::encode(key.as_bytes()),
        key: *key,
    }
}

/// Verifies an access token: `typ` at+jwt, `alg` EdDSA (the only algorithm Leash signs with),
/// a known `kid`, no key-carrying headers, exact `iss` and `aud`, integer time claims, not
/// expired. `find_key` must only look in memory: a token never causes a fetch.
pub fn verify_access_token(
    token: &str,
    find_key: impl Fn(&str) -> Option<PublicJwk>,
    issuer: &str,
    now: i64,
) -> Result<AccessClaims, JoseError> {
    let jws = Jws::parse(token)?;
    jws.require_typ(ACCESS_TOKEN_TYP)?;
    if jws.alg.name() != "EdDSA" {
        return Err(JoseError::AlgKeyMismatch);
    }
    for header in ["jku", "x5u", "x5c", "jwk"] {
        if jws.header.contains_key(header) {
            return Err(JoseError::Malformed(
                "key-carrying header in an access token",
            ));
        }
    }
    let kid = match jws.header.get("kid") {
        Some(Value::String(kid)) if kid.len() <= MAX_KID_LEN => kid,
        _ => return Err(JoseError::UnknownKey),
    };
    let key = find_key(kid).ok_or(JoseError::UnknownKey)?;
    jws.verify(&key)?;
    let exp = jws
        .time_claim("exp")?
        .ok_or(JoseError::claim("exp", "is missing"))?;
    let iat = jws
        .time_claim("iat")?
        .ok_or(JoseError::claim("iat", "is missing"))?;
    if let Some(nbf) = jws.time_claim("nbf")?
        && nbf > now.saturating_add(30)
    {
        return Err(JoseError::claim("nbf", "is in the future"));
    }
    if exp <= now {
        return Err(JoseError::claim("exp", "has passed"));
    }
    if iat > now.saturating_add(30) {
        return Err(JoseError::claim("iat", "is in the future"));
    }
    let claims: AccessClaims = serde_json::from_value(Value::Object(jws.claims))
        .map_err(|_| JoseError::Malformed("access token claims have the wrong shape"))?;
    if claims.iss != issuer {
        return Err(JoseError::claim("iss", "is not this issuer"));
    }
    if claims.aud != issuer {
        return Err(JoseError::claim("aud", "is not this issuer"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> AccessClaims {
        AccessClaims {
            iss: "http://127.0.0.1:8470".into(),
            sub: "usr_1".into(),
            aud: "http://127.0.0.1:8470".into(),
            iat: now,
            exp: now.saturating_add(300),
            jti: "j1".into(),
            client_id: "spiffe://e/a".into(),
            act: Actor {
                sub: "spiffe://e/a".into(),
            },
            scope: "mail:read".into(),
            cnf: Confirmation { jkt: "x".into() },
            grant_id: "grt_1".into(),
            purpose: "p".into(),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let key = SigningKey::new(ed25519_dalek::SigningKey::from_bytes(&[3; 32]));
        let public = key.public();
        let find = |kid: &str| (kid == key.kid()).then(|| public.clone());
        let token = key.sign(&claims(1000));
        let iss = "http://127.0.0.1:8470";
        assert_eq!(
            verify_access_token(&token, find, iss, 1000).unwrap(),
            claims(1000)
        );
        assert!(
            verify_access_token(&token, find, iss, 1300).is_err(),
            "expired"
        );
        assert!(verify_access_token(&token, find, "http://127.0.0.1:8470/", 1000).is_err());
        assert!(
            verify_access_token(&token, |_| None, iss, 1000).is_err(),
            "unknown kid"
        );
    }

    #[test]
    fn hostile_kids_never_reach_the_key_lookup() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let looked_up = std::cell::RefCell::new(Vec::new());
        let find = |kid: &str| {
            looked_up.borrow_mut().push(kid.to_owned());
            None
        };
        for kid in [json!("a".repeat(129)), json!(5), json!(null)] {
            let header = json!({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYP, "kid": kid});
            let token = crate::jws::sign_ed25519(
                &header,
                &serde_json::to_value(claims(1000)).unwrap(),
                &key,
            );
            assert_eq!(
                verify_access_token(&token, find, "http://127.0.0.1:8470", 1000),
                Err(JoseError::UnknownKey)
            );
        }
        assert!(looked_up.borrow().is_empty());
        // A path-like kid is only ever a map key: unknown, and nothing else happens.
        let header =
            json!({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYP, "kid": "../../etc/passwd\u{0}'"});
        let token =
            crate::jws::sign_ed25519(&header, &serde_json::to_value(claims(1000)).unwrap(), &key);
        assert_eq!(
            verify_access_token(&token, find, "http://127.0.0.1:8470", 1000),
            Err(JoseError::UnknownKey)
        );
    }

    #[test]
    fn key_carrying_headers_refused() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let signing = SigningKey::new(key.clone());
        let public = signing.public();
        for extra in ["jku", "x5u", "x5c", "jwk"] {
            let mut header = json!({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYP, "kid": signing.kid()});
            header[extra] = json!("https://evil.example/keys");
            let token = crate::jws::sign_ed25519(
                &header,
                &serde_json::to_value(claims(1000)).unwrap(),
                &key,
            );
            assert!(
                verify_access_token(&token, |_| Some(public.clone()), &claims(0).iss, 1000)
                    .is_err(),
                "{extra}"
            );
        }
    }

    /// ATTACKS 3 and 8: the header's `alg` must be the key's own, and a token not valid yet
    /// (`nbf` beyond the skew) is refused like an expired one.
    #[test]
    fn an_alg_other_than_the_keys_and_a_future_nbf_are_refused() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let signing = SigningKey::new(key.clone());
        let public = signing.public();
        let verify = |token: &str| {
            verify_access_token(token, |_| Some(public.clone()), &claims(0).iss, 1000)
        };
        let sign = |header: Value, claims: Value| crate::jws::sign_ed25519(&header, &claims, &key);
        let good = json!({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYP, "kid": signing.kid()});
        let body = serde_json::to_value(claims(1000)).unwrap();
        assert!(verify(&sign(good.clone(), body.clone())).is_ok());
        // An Ed25519 signature under a header claiming ES256: the key refuses the algorithm.
        let mut es256 = good.clone();
        es256["alg"] = json!("ES256");
        assert!(verify(&sign(es256, body.clone())).is_err());
        let mut early = body.clone();
        early["nbf"] = json!(1000 + 31);
        assert!(verify(&sign(good.clone(), early)).is_err(), "future nbf");
        let mut within_skew = body;
        within_skew["nbf"] = json!(1000 + 30);
        assert!(verify(&sign(good, within_skew)).is_ok());
    }

    #[test]
    fn other_typ_refused() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let signing = SigningKey::new(key.clone());
        let public = signing.public();
        let header = json!({"alg": "EdDSA", "typ": "dpop+jwt", "kid": signing.kid()});
        let body = serde_json::to_value(claims(1000)).unwrap();
        let token = crate::jws::sign_ed25519(&header, &body, &key);
        let err = verify_access_token(&token, |_| Some(public.clone()), &claims(0).iss, 1000);
        assert_eq!(
            err.unwrap_err(),
            JoseError::WrongTyp {
                expected: ACCESS_TOKEN_TYP
            }
        );
    }
}
