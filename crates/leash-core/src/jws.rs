//! Compact JWS parsing, verification and signing, written here rather than taken from a JWT
//! crate because Leash must accept the RFC 9864 `Ed25519` algorithm name next to `EdDSA`,
//! refuse duplicate JSON members and type-confused time claims, and choose the algorithm from
//! the key, never from the header alone (RFC 8725). The signature primitives are RustCrypto's.

// Handles numbers a client chose (time claims, counts): no operation that can overflow.
#![deny(clippy::arithmetic_side_effects)]

use serde_json::{Map, Value};

use crate::b64;
use crate::json;
use crate::jwk::PublicJwk;

/// The longest compact JWS accepted anywhere (access token, proof, assertion).
pub const MAX_JWS_LEN: usize = 8 * 1024;

/// Why a JWS or one of its claims was refused. Messages never contain the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoseError {
    /// Not three base64url segments of JSON objects, too long, or duplicate members.
    #[error("malformed jwt: {0}")]
    Malformed(&'static str),
    /// `alg` missing, `none`, symmetric, or otherwise unsupported.
    #[error("unsupported alg {0:?}: use EdDSA, Ed25519 or ES256")]
    UnsupportedAlg(String),
    /// `alg` does not fit the key that must verify it.
    #[error("alg does not match the key type")]
    AlgKeyMismatch,
    /// A `crit` header: Leash implements no critical extension.
    #[error("crit header parameters are not supported")]
    Crit,
    /// The `typ` header is not the one this kind of JWT must carry.
    #[error("typ must be {expected}")]
    WrongTyp {
        /// The required value.
        expected: &'static str,
    },
    /// The key is not a usable public key.
    #[error("bad key: {0}")]
    BadKey(String),
    /// No key with the header's `kid`.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A claim is missing, of the wrong JSON type, or has a wrong value.
    #[error("claim `{claim}` {problem}")]
    Claim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl JoseError {
    /// A claim error.
    pub fn claim(claim: &'static str, problem: &'static str) -> Self {
        Self::Claim { claim, problem }
    }
}

/// The JWS algorithms Leash accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// Ed25519 under its RFC 8037 name.
    EdDsa,
    /// Ed25519 under its RFC 9864 name.
    Ed25519,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl Alg {
    /// Parses a header `alg`; anything else (including `none` and HMAC) is refused.
    pub fn parse(name: &str) -> Result<Self, JoseError> {
        match name {
            "EdDSA" => Ok(Self::EdDsa),
            "Ed25519" => Ok(Self::Ed25519),
            "ES256" => Ok(Self::Es256),
            other => Err(JoseError::UnsupportedAlg(other.chars().take(32).collect())),
        }
    }

    /// The name as it appears in a header.
    pub fn name(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Ed25519 => "Ed25519",
            Self::Es256 => "ES256",
        }
    }
}

/// The `algs` list of a DPoP challenge and of server metadata.
pub const SUPPORTED_ALGS: [&str; 3] = ["EdDSA", "Ed25519", "ES256"];

/// A compact JWS split and decoded, signature not yet checked.
#[derive(Debug, Clone)]
pub struct Jws<'a> {
    /// The protected header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
    /// `alg` from the header, already restricted to the supported set.
    pub alg: Alg,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    /// Splits and decodes; refuses anything but exactly three segments of strict base64url
    /// holding JSON objects without duplicate members, an unsupported `alg`, or a `crit`.
    pub fn parse(compact: &'a str) -> Result<Self, JoseError> {
        if compact.len() > MAX_JWS_LEN {
            return Err(JoseError::Malformed("too long"));
        }
        let mut parts = compact.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoseError::Malformed(
                "a compact jws has exactly three segments",
            ));
        };
        let header = decode_object(h)?;
        let claims = decode_object(p)?;
        let signature = b64::decode(s).map_err(|_| JoseError::Malformed("signature encoding"))?;
        if header.contains_key("crit") {
            return Err(JoseError::Crit);
        }
        let alg = match header.get("alg") {
            Some(Value::String(name)) => Alg::parse(name)?,
            _ => return Err(JoseError::UnsupportedAlg("<missing>".into())),
        };
        // Exactly three segments: all before the last dot is `header.payload`.
        let signing_input = compact
            .rsplit_once('.')
            .map_or(compact, |(signing_input, _)| signing_input);
        Ok(Self {
            header,
            claims,
            alg,
            signing_input,
            signature,
        })
    }

    /// The header's `typ`, compared case-insensitively per RFC 7515 §4.1.9 (no `application/`).
    pub fn require_typ(&self, expected: &'static str) -> Result<(), JoseError> {
        match self.header.get("typ") {
            Some(Value::String(typ)) if typ.eq_ignore_ascii_case(expected) => Ok(()),
            _ => Err(JoseError::WrongTyp { expected }),
        }
    }

    /// Verifies the signature with `key`, whose type must fit the header's `alg`.
    pub fn verify(&self, key: &PublicJwk) -> Result<(), JoseError> {
        key.verify(self.alg, self.signing_input.as_bytes(), &self.signature)
    }

    /// A string claim, required.
    pub fn str_claim(&self, name: &'static str) -> Result<&str, JoseError> {
        match self.claims.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(JoseError::claim(name, "must be a string")),
            None => Err(JoseError::claim(name, "is missing")),
        }
    }

    /// A NumericDate claim: `None` when absent; an error for anything but a JSON integer
    /// (strings, floats, booleans and null are never taken as absent).
    pub fn time_claim(&self, name: &'static str) -> Result<Option<i64>, JoseError> {
        match self.claims.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or(JoseError::claim(name, "must be an integer NumericDate")),
            Some(_) => Err(JoseError::claim(name, "must be an integer NumericDate")),
        }
    }
}

fn decode_object(segment: &str) -> Result<Map<String, Value>, JoseError> {
    let bytes = b64::decode(segment).map_err(|_| JoseError::Malformed("segment encoding"))?;
    let value = json::parse_strict(&bytes, json::MAX_DEPTH).map_err(|e| match e {
        json::StrictError::Syntax(_) => JoseError::Malformed("segment is not one JSON value"),
        _ => JoseError::Malformed("segment is not valid JSON without duplicate members"),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(JoseError::Malformed("segment is not a JSON object")),
    }
}

/// Signs `claims` with Ed25519 under `header` (which must name `alg` EdDSA or Ed25519).
pub fn sign_ed25519(header: &Value, claims: &Value, key: &ed25519_dalek::SigningKey) -> String {
    use ed25519_dalek::Signer as _;
    let input = format!(
        "{}.{}",
        b64::encode(header.to_string()),
        b64::encode(claims.to_string())
    );
    let signature = key.sign(input.as_bytes());
    format!("{input}.{}", b64::encode(signature.to_bytes()))
}

/// Signs `claims` with ES256 under `header`.
pub fn sign_es256(header: &Value, claims: &Value, key: &p256::ecdsa::SigningKey) -> String {
    use p256::ecdsa::signature::Signer as _;
    let input = format!(
        "{}.{}",
        b64::encode(header.to_string()),
        b64::encode(claims.to_string())
    );
    let signature: p256::ecdsa::Signature = key.sign(input.as_bytes());
    format!("{input}.{}", b64::encode(signature.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RFC8037_JWS: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

    fn rfc8037_key() -> PublicJwk {
        PublicJwk::from_value(&json!({"kty":"OKP","crv":"Ed25519",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}))
        .unwrap()
    }

    #[test]
    fn rfc8037_signature_is_reproduced_and_verifies() {
        let d = b64::decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&d.try_into().unwrap());
        use ed25519_dalek::Signer as _;
        let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
        let sig = key.sign(input.as_bytes());
        assert_eq!(
            hex::encode(sig.to_bytes()),
            "860c98d2297f3060a33f42739672d61b53cf3adefed3d3c672f320dc021b411e\
             9d59b8628dc351e248b88b29468e0e41855b0fb7d83bb15be902bfccb8cd0a02"
        );
        // The payload is not JSON, so check the signature at the key level.
        let (input, sig) = RFC8037_JWS.rsplit_once('.').unwrap();
        rfc8037_key()
            .verify(Alg::EdDsa, input.as_bytes(), &b64::decode(sig).unwrap())
            .unwrap();
        // RFC 9864: the same bytes are not valid under an `Ed25519` header, whose input differs.
        let mut tampered = b64::decode(sig).unwrap();
        tampered[0] ^= 1;
        assert!(
            rfc8037_key()
                .verify(Alg::EdDsa, input.as_bytes(), &tampered)
                .is_err()
        );
    }

    fn unsigned(header: &str, payload: &str) -> String {
        format!("{}.{}.", b64::encode(header), b64::encode(payload))
    }

    #[test]
    fn alg_none_and_hmac_refused() {
        for alg in ["none", "None", "NONE", "HS256", "RS256"] {
            let jws = unsigned(&format!(r#"{{"alg":"{alg}"}}"#), "{}");
            assert!(
                matches!(Jws::parse(&jws), Err(JoseError::UnsupportedAlg(_))),
                "{alg}"
            );
        }
    }

    #[test]
    fn segment_count_padding_and_alphabet() {
        let good = unsigned(r#"{"alg":"EdDSA"}"#, "{}");
        assert!(Jws::parse(&good).is_ok());
        assert!(Jws::parse(good.trim_end_matches('.')).is_err());
        assert!(Jws::parse(&format!("{good}.x")).is_err());
        assert!(Jws::parse(&format!("{}=.e30.", b64::encode(r#"{"alg":"EdDSA"}"#))).is_err());
        assert!(Jws::parse("eyJ+bGciOiJFZERTQSJ9.e30.").is_err());
        assert!(Jws::parse(&"a".repeat(MAX_JWS_LEN + 1)).is_err());
    }

    #[test]
    fn duplicate_members_and_non_objects_refused() {
        let dup = unsigned(r#"{"alg":"EdDSA","alg":"ES256"}"#, "{}");
        assert!(matches!(Jws::parse(&dup), Err(JoseError::Malformed(_))));
        let nested = unsigned(r#"{"alg":"EdDSA"}"#, r#"{"a":{"b":1,"b":2}}"#);
        assert!(Jws::parse(&nested).is_err());
        assert!(Jws::parse(&unsigned(r#"{"alg":"EdDSA"}"#, "[1]")).is_err());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(Jws::parse(&unsigned(r#"{"alg":"EdDSA"}"#, &deep)).is_err());
        let bad_utf8 = format!(
            "{}.{}.",
            b64::encode(r#"{"alg":"EdDSA"}"#),
            b64::encode([0xff, 0xfe])
        );
        assert!(Jws::parse(&bad_utf8).is_err());
    }

    #[test]
    fn crit_refused() {
        let jws = unsigned(r#"{"alg":"EdDSA","crit":["exp"]}"#, "{}");
        assert_eq!(Jws::parse(&jws).unwrap_err(), JoseError::Crit);
    }

    #[test]
    fn time_claims_must_be_integers() {
        for (payload, ok) in [
            (r#"{"exp":1}"#, true),
            (r#"{"exp":"1"}"#, false),
            (r#"{"exp":1.5}"#, false),
            (r#"{"exp":true}"#, false),
            (r#"{"exp":null}"#, false),
        ] {
            let jws = unsigned(r#"{"alg":"EdDSA"}"#, payload);
            let parsed = Jws::parse(&jws).unwrap();
            assert_eq!(parsed.time_claim("exp").is_ok(), ok, "{payload}");
        }
    }

    #[test]
    fn es256_signature_shapes_refused() {
        let key = PublicJwk::from_value(&json!({"kty":"EC","crv":"P-256",
            "x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
            "y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}))
        .unwrap();
        let n = hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")
            .unwrap();
        let zeros = [0u8; 64];
        let mut r_is_n = n.clone();
        r_is_n.extend_from_slice(&[1u8; 32]);
        for bad in [&zeros[..], &r_is_n[..], &[1u8; 63][..], &[1u8; 72][..]] {
            assert_eq!(
                key.verify(Alg::Es256, b"x", bad),
                Err(JoseError::BadSignature)
            );
        }
        assert_eq!(
            key.verify(Alg::EdDsa, b"x", &[1u8; 64]),
            Err(JoseError::AlgKeyMismatch)
        );
    }

    #[test]
    fn ed25519_non_canonical_s_refused() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = PublicJwk::from_value(&json!({"kty":"OKP","crv":"Ed25519",
            "x": b64::encode(key.verifying_key().as_bytes())}))
        .unwrap();
        use ed25519_dalek::Signer as _;
        let mut sig = key.sign(b"msg").to_bytes();
        public.verify(Alg::Ed25519, b"msg", &sig).unwrap();
        // Add the group order L to S: same value mod L, but not canonical.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = u16::from(sig[32 + i]) + u16::from(L[i]) + carry;
            sig[32 + i] = (sum & 0xff) as u8;
            carry = sum >> 8;
        }
        assert_eq!(
            public.verify(Alg::Ed25519, b"msg", &sig),
            Err(JoseError::BadSignature)
        );
    }
}
