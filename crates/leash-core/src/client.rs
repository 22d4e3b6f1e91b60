//! The agent's side: its private key, client assertions and DPoP proofs. Used by the CLI's
//! agent verbs, the test kit and the benchmarks, so they all speak exactly what Leash checks.

use serde_json::{Map, Value, json};

use crate::b64;
use crate::jwk::PublicJwk;
use crate::jws::{Alg, JoseError};

/// An agent's (or a DPoP) private key.
pub enum AgentKey {
    /// Ed25519; signs with `alg` EdDSA or, per RFC 9864, Ed25519.
    Ed25519(ed25519_dalek::SigningKey, Alg),
    /// P-256; signs with ES256.
    P256(p256::ecdsa::SigningKey),
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey({})", self.public().thumbprint())
    }
}

impl AgentKey {
    /// A fresh key for `alg`.
    pub fn generate(alg: Alg) -> Self {
        match alg {
            Alg::EdDsa | Alg::Ed25519 => Self::Ed25519(
                ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
                alg,
            ),
            Alg::Es256 => Self::P256(p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng)),
        }
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> Alg {
        match self {
            Self::Ed25519(_, alg) => *alg,
            Self::P256(_) => Alg::Es256,
        }
    }

    /// The public key.
    pub fn public(&self) -> PublicJwk {
        match self {
            Self::Ed25519(key, _) => {
                let vk = key.verifying_key();
                PublicJwk::Ed25519 {
                    x: b64::encode(vk.as_bytes()),
                    key: vk,
                }
            }
            Self::P256(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                PublicJwk::P256 {
                    x: point.x().map(b64::encode).unwrap_or_default(),
                    y: point.y().map(b64::encode).unwrap_or_default(),
                    point,
                }
            }
        }
    }

    /// The private JWK (with `d`, `alg` and `kid`), for the key file.
    pub fn to_private_jwk(&self) -> Value {
        let mut jwk = self.public().to_value();
        let d = match self {
            Self::Ed25519(key, _) => b64::encode(key.to_bytes()),
            Self::P256(key) => b64::encode(key.to_bytes()),
        };
        if let Value::Object(map) = &mut jwk {
            map.insert("d".into(), json!(d));
            map.insert("alg".into(), json!(self.alg().name()));
            map.insert("kid".into(), json!(self.public().thumbprint()));
        }
        jwk
    }

    /// Reads a private JWK as written by [`AgentKey::to_private_jwk`].
    pub fn from_private_jwk(jwk: &Value) -> Result<Self, JoseError> {
        let get = |name: &str| {
            jwk.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| JoseError::BadKey(format!("private jwk needs `{name}`")))
        };
        let d =
            b64::decode(get("d")?).map_err(|_| JoseError::BadKey("`d` is not base64url".into()))?;
        let key = match (get("kty")?, get("crv")?) {
            ("OKP", "Ed25519") => {
                let bytes: [u8; 32] = d
                    .try_into()
                    .map_err(|_| JoseError::BadKey("`d` must be 32 bytes".into()))?;
                let alg = match jwk.get("alg").and_then(Value::as_str) {
                    Some("Ed25519") => Alg::Ed25519,
                    _ => Alg::EdDsa,
                };
                Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(&bytes), alg)
            }
            ("EC", "P-256") => Self::P256(
                p256::ecdsa::SigningKey::from_slice(&d)
                    .map_err(|_| JoseError::BadKey("`d` is not a P-256 scalar".into()))?,
            ),
            _ => return Err(JoseError::BadKey("use OKP/Ed25519 or EC/P-256".into())),
        };
        let mut public = jwk.clone();
        if let Value::Object(map) = &mut public {
            map.retain(|k, _| matches!(k.as_str(), "kty" | "crv" | "x" | "y"));
        }
        if PublicJwk::from_value(&public)? != key.public() {
            return Err(JoseError::BadKey(
                "the private key does not match its public part".into(),
            ));
        }
        Ok(key)
    }

    /// Signs a JWS with this key; `header` gets `alg` added.
    pub fn sign(&self, mut header: Map<String, Value>, claims: &Value) -> String {
        header.insert("alg".into(), json!(self.alg().name()));
        let header = Value::Object(header);
        match self {
            Self::Ed25519(key, _) => crate::jws::sign_ed25519(&header, claims, key),
            Self::P256(key) => crate::jws::sign_es256(&header, claims, key),
        }
    }

    /// A client assertion (RFC 7523) for `agent`, valid for 60 s from `now`.
    pub fn client_assertion(&self, agent: &str, audience: &str, now: i64) -> String {
        let claims = json!({
            "iss": agent, "sub": agent, "aud": audience,
            "iat": now, "exp": now + 60, "jti": crate::secret::random_id(""),
        });
        self.sign(Map::new(), &claims)
    }

    /// A DPoP proof for `method` on `url`, bound to `access_token` when given.
    pub fn dpop_proof(
        &self,
        method: &str,
        url: &str,
        access_token: Option<&str>,
        nonce: Option<&str>,
        now: i64,
    ) -> String {
        let mut header = Map::new();
        header.insert("typ".into(), json!("dpop+jwt"));
        header.insert("jwk".into(), self.public().to_value());
        let htu = url.split(['?', '#']).next().unwrap_or(url);
        let mut claims =
            json!({"jti": crate::secret::random_id(""), "htm": method, "htu": htu, "iat": now});
        if let Some(token) = access_token {
            claims["ath"] = json!(crate::dpop::AccessTokenHash::of(token).ath());
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        self.sign(header, &claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpop::{ProofContext, verify_proof};

    #[test]
    fn private_jwk_round_trip_and_proofs_verify() {
        for alg in [Alg::EdDsa, Alg::Ed25519, Alg::Es256] {
            let key = AgentKey::generate(alg);
            let back = AgentKey::from_private_jwk(&key.to_private_jwk()).unwrap();
            assert_eq!(back.public(), key.public());
            assert_eq!(back.alg(), alg);
            let url = url::Url::parse("http://127.0.0.1:8470/oauth2/token").unwrap();
            let proof = key.dpop_proof("POST", url.as_str(), None, None, 1000);
            let cx = ProofContext {
                method: "POST",
                url: url.as_str(),
                access_token: None,
                now: 1000,
                nonces: None,
            };
            assert_eq!(
                verify_proof(&proof, &cx).unwrap().jkt,
                key.public().thumbprint()
            );
        }
    }

    #[test]
    fn mismatched_private_jwk_refused() {
        let key = AgentKey::generate(Alg::EdDsa);
        let mut jwk = key.to_private_jwk();
        jwk["x"] = AgentKey::generate(Alg::EdDsa).public().to_value()["x"].clone();
        assert!(AgentKey::from_private_jwk(&jwk).is_err());
    }
}
