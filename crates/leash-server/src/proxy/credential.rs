//! The proxy credential (API §16): what an agent's browser presents to the proxy in
//! `Proxy-Authorization: Basic base64("leash:" + credential)`, obtained by a token exchange with
//! `requested_token_type=urn:leash:params:oauth:token-type:proxy-credential`.
//!
//! A browser cannot sign DPoP proofs, so the credential is a bearer secret, and only Leash can
//! read or check it: `lpx_` + base64url(claims) + `.` + base64url(HMAC-SHA256). It is MACed with
//! a key of its own (sealed in the store like the other keys, shared by every node), never
//! signed with the token key, so nothing that verifies Leash's access tokens through the JWKS
//! can take it for one. It names its grant and its own `jti`, so revoking, completing or
//! exhausting the grant, or revoking the credential, kills it like every token
//! (`extract::check_token_live`).

use hmac::{Hmac, Mac as _};
use leash_core::b64;
use leash_core::token::Actor;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The `requested_token_type` (and `issued_token_type`) of a proxy credential.
pub const PROXY_CREDENTIAL_TYPE: &str = "urn:leash:params:oauth:token-type:proxy-credential";

/// Its prefix.
pub const PREFIX: &str = "lpx_";

/// The setting the MAC key is stored under, sealed.
pub const KEY_SETTING: &str = "proxy_credential_key";

/// Domain separation of the MAC, and the format's version.
const MAC_CONTEXT: &[u8] = b"leash proxy credential v1\0";

/// Longest credential accepted (a grant's scope is bounded; this bounds the work on garbage).
const MAX_LEN: usize = 4096;

/// What a proxy credential says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyClaims {
    /// Leash's issuer.
    pub iss: String,
    /// The human.
    pub sub: String,
    /// The agent (RFC 8693 §4.1).
    pub act: Actor,
    /// The agent, as a client.
    pub client_id: String,
    /// The grant it acts under.
    pub grant_id: String,
    /// The actions it may take, space-separated.
    pub scope: String,
    /// Its own id: a revocation names it.
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a credential was refused (said to the browser only as "refused").
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("not a Leash proxy credential")]
    Malformed,
    #[error("the proxy credential's signature does not check out")]
    BadMac,
    #[error("the proxy credential has expired")]
    Expired,
    #[error("the proxy credential is for another issuer")]
    OtherIssuer,
}

/// The key that makes and checks credentials.
pub struct CredentialKey([u8; 32]);

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialKey(<redacted>)")
    }
}

impl CredentialKey {
    /// A key from 32 secret bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(MAC_CONTEXT);
        mac.update(body.as_bytes());
        mac
    }

    /// Issues a credential saying `claims`.
    pub fn issue(&self, claims: &ProxyClaims) -> String {
        let body = b64::encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = self.mac(&body).finalize().into_bytes();
        format!("{PREFIX}{body}.{}", b64::encode(tag))
    }

    /// Checks a credential: its MAC (in constant time), then its claims, issuer and expiry.
    pub fn verify(
        &self,
        credential: &str,
        issuer: &str,
        now: i64,
    ) -> Result<ProxyClaims, CredentialError> {
        if credential.len() > MAX_LEN {
            return Err(CredentialError::Malformed);
        }
        let (body, tag) = credential
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(CredentialError::Malformed)?;
        let tag = b64::decode(tag).map_err(|_| CredentialError::Malformed)?;
        self.mac(body)
            .verify_slice(&tag)
            .map_err(|_| CredentialError::BadMac)?;
        let claims: ProxyClaims = b64::decode(body)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(CredentialError::Malformed)?;
        if claims.iss != issuer {
            return Err(CredentialError::OtherIssuer);
        }
        if claims.exp <= now {
            return Err(CredentialError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> ProxyClaims {
        ProxyClaims {
            iss: "https://leash.example".into(),
            sub: "usr_1".into(),
            act: Actor {
                sub: "spiffe://example.org/agent/browser".into(),
            },
            client_id: "spiffe://example.org/agent/browser".into(),
            grant_id: "grt_1".into(),
            scope: "finance:read".into(),
            jti: "lpx_jti".into(),
            iat: 100,
            exp,
        }
    }

    #[test]
    fn a_credential_round_trips_and_refuses_tampering_other_keys_and_expiry() {
        let key = CredentialKey::new([7; 32]);
        let credential = key.issue(&claims(200));
        assert!(credential.starts_with(PREFIX));
        assert_eq!(
            key.verify(&credential, "https://leash.example", 150),
            Ok(claims(200))
        );
        assert_eq!(
            key.verify(&credential, "https://leash.example", 200),
            Err(CredentialError::Expired)
        );
        assert_eq!(
            key.verify(&credential, "https://other.example", 150),
            Err(CredentialError::OtherIssuer)
        );
        assert_eq!(
            CredentialKey::new([8; 32]).verify(&credential, "https://leash.example", 150),
            Err(CredentialError::BadMac)
        );
        // A widened scope with the old MAC.
        let (body, tag) = credential[PREFIX.len()..].split_once('.').unwrap();
        let mut wider = claims(200);
        wider.scope = "finance:read finance:export".into();
        let forged_body = b64::encode(serde_json::to_vec(&wider).unwrap());
        assert_ne!(forged_body, body);
        assert_eq!(
            key.verify(
                &format!("{PREFIX}{forged_body}.{tag}"),
                "https://leash.example",
                150
            ),
            Err(CredentialError::BadMac)
        );
        for garbage in [
            "",
            "lpx_",
            "lpx_.",
            "lpx_a.b",
            "Basic x",
            &"lpx_a".repeat(2000),
        ] {
            assert!(
                key.verify(garbage, "https://leash.example", 150).is_err(),
                "{garbage:?}"
            );
        }
    }
}
