//! Public JSON Web Keys of the two supported kinds (Ed25519 and P-256), parsed strictly, with
//! RFC 7638 thumbprints. Private keys and symmetric keys are refused wherever a public key is
//! expected.

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::b64;
use crate::jws::{Alg, JoseError};

/// A public key that Leash can verify signatures with.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicJwk {
    /// `OKP` / `Ed25519`: `x` is the 32-byte public key.
    Ed25519 {
        /// base64url of the 32-byte public key, as received.
        x: String,
        /// The decoded key.
        key: ed25519_dalek::VerifyingKey,
    },
    /// `EC` / `P-256`: `x` and `y` are the 32-byte affine coordinates.
    P256 {
        /// base64url of the x coordinate, as received.
        x: String,
        /// base64url of the y coordinate, as received.
        y: String,
        /// The point, uncompressed (SEC1), checked to be on the curve.
        point: p256::EncodedPoint,
    },
}

impl std::fmt::Debug for PublicJwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicJwk({})", self.thumbprint())
    }
}

fn str_member<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, JoseError> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(JoseError::BadKey(format!(
            "jwk member `{name}` must be a string"
        ))),
        None => Err(JoseError::BadKey(format!("jwk member `{name}` is missing"))),
    }
}

fn coordinate(obj: &Map<String, Value>, name: &str) -> Result<[u8; 32], JoseError> {
    let text = str_member(obj, name)?;
    let bytes = b64::decode(text)
        .map_err(|_| JoseError::BadKey(format!("jwk member `{name}` is not base64url")))?;
    bytes
        .try_into()
        .map_err(|_| JoseError::BadKey(format!("jwk member `{name}` must be 32 bytes")))
}

impl PublicJwk {
    /// Parses a JWK object; refuses private keys (`d`, `p`, `q`, `k`…), symmetric keys and
    /// curves other than Ed25519 and P-256.
    pub fn from_value(value: &Value) -> Result<Self, JoseError> {
        let Value::Object(obj) = value else {
            return Err(JoseError::BadKey("jwk must be a JSON object".into()));
        };
        for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            if obj.contains_key(private) {
                return Err(JoseError::BadKey(
                    "jwk contains private key material; send only the public key".into(),
                ));
            }
        }
        if let Some(use_) = obj.get("use")
            && use_ != "sig"
        {
            return Err(JoseError::BadKey("jwk `use` must be \"sig\"".into()));
        }
        match (str_member(obj, "kty")?, str_member(obj, "crv")) {
            ("OKP", Ok("Ed25519")) => {
                let x_text = str_member(obj, "x")?;
                if let Some(known) = memo::get(x_text) {
                    return Ok(known);
                }
                let x = coordinate(obj, "x")?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                    .map_err(|_| JoseError::BadKey("jwk `x` is not an Ed25519 point".into()))?;
                if key.is_weak() {
                    return Err(JoseError::BadKey("jwk `x` is a small-order point".into()));
                }
                let jwk = Self::Ed25519 {
                    x: x_text.to_owned(),
                    key,
                };
                memo::put(x_text, &jwk);
                Ok(jwk)
            }
            ("EC", Ok("P-256")) => {
                let x = coordinate(obj, "x")?;
                let y = coordinate(obj, "y")?;
                let point =
                    p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
                p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| JoseError::BadKey("jwk is not a point on P-256".into()))?;
                Ok(Self::P256 {
                    x: str_member(obj, "x")?.to_owned(),
                    y: str_member(obj, "y")?.to_owned(),
                    point,
                })
            }
            (kty, crv) => Err(JoseError::BadKey(format!(
                "unsupported key type {kty}/{}: use OKP/Ed25519 or EC/P-256",
                crv.unwrap_or("-")
            ))),
        }
    }

    /// The public key as a JWK object with only its required members.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Ed25519 { x, .. } => serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            Self::P256 { x, y, .. } => {
                serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y})
            }
        }
    }

    /// The RFC 7638 SHA-256 thumbprint, base64url.
    pub fn thumbprint(&self) -> String {
        // RFC 7638 §3.2's canonical form written out directly (every proof's key is
        // thumbprinted, and building a JSON object for it cost three times as much): the
        // required members in lexical order, no whitespace. The coordinates decoded as base64url,
        // so they hold no character JSON would escape. Equal to `thumbprint(&self.to_value())`
        // (checked by a test).
        let canonical = match self {
            Self::Ed25519 { x, .. } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            Self::P256 { x, y, .. } => {
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
        };
        b64::encode(Sha256::digest(canonical.as_bytes()))
    }

    /// Whether a JWS with `alg` may be verified with this key.
    pub fn accepts(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (Self::Ed25519 { .. }, Alg::EdDsa | Alg::Ed25519) | (Self::P256 { .. }, Alg::Es256)
        )
    }

    /// Verifies `signature` over `input`: strict Ed25519 (canonical S, no small-order keys)
    /// or ES256 with a fixed 64-byte r‖s (r, s in 1..n).
    pub fn verify(&self, alg: Alg, input: &[u8], signature: &[u8]) -> Result<(), JoseError> {
        if !self.accepts(alg) {
            return Err(JoseError::AlgKeyMismatch);
        }
        match self {
            Self::Ed25519 { key, .. } => {
                let sig = ed25519_dalek::Signature::from_slice(signature)
                    .map_err(|_| JoseError::BadSignature)?;
                verify_ed25519_strict(key, input, &sig).map_err(|_| JoseError::BadSignature)
            }
            Self::P256 { point, .. } => ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                point.as_bytes(),
            )
            .verify(input, signature)
            .map_err(|_| JoseError::BadSignature),
        }
    }
}

/// Exactly ed25519-dalek's `verify_strict` (canonical `S`, neither `A` nor `R` of small order,
/// cofactorless equation), for about one field exponentiation less. `verify_strict` decompresses
/// `R` to test its order and then compares the compressed recomputed point with `R`'s bytes, so
/// it pays for a square root and an inversion. Here the cofactorless `verify` does the
/// comparison, which already refuses any `R` that is not the canonical encoding of a point, and
/// `R` is of small order exactly when its bytes are the canonical encoding of one of the eight
/// torsion points, taken from curve25519-dalek's own constant. No crate offers this check
/// without the decompression; the proof check runs it on every gateway request.
fn verify_ed25519_strict(
    key: &ed25519_dalek::VerifyingKey,
    input: &[u8],
    signature: &ed25519_dalek::Signature,
) -> Result<(), ed25519_dalek::SignatureError> {
    use ed25519_dalek::Verifier as _;
    static SMALL_ORDER: std::sync::LazyLock<[[u8; 32]; 8]> = std::sync::LazyLock::new(|| {
        curve25519_dalek::constants::EIGHT_TORSION.map(|point| point.compress().to_bytes())
    });
    if key.is_weak() || SMALL_ORDER.contains(signature.r_bytes()) {
        return Err(ed25519_dalek::SignatureError::new());
    }
    key.verify(input, signature)
}

/// A bounded memo of decoded Ed25519 keys. Decoding (point decompression and the small-order
/// check) is a pure function of `x` and costs several microseconds, while a DPoP key is sent
/// with every request of a session: remembering it keeps the proof check close to the bare
/// signature verification. Only keys that decoded successfully are remembered.
mod memo {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    use super::PublicJwk;

    const CAPACITY: usize = 4096;
    static KEYS: LazyLock<Mutex<HashMap<String, PublicJwk>>> = LazyLock::new(Default::default);

    pub(super) fn get(x: &str) -> Option<PublicJwk> {
        KEYS.lock().ok()?.get(x).cloned()
    }

    pub(super) fn put(x: &str, jwk: &PublicJwk) {
        if let Ok(mut keys) = KEYS.lock() {
            if keys.len() >= CAPACITY {
                keys.clear();
            }
            keys.insert(x.to_owned(), jwk.clone());
        }
    }
}

/// The RFC 7638 SHA-256 thumbprint of any JWK (RSA, EC, OKP or oct): the required members of
/// its key type, in lexicographic order, without whitespace. `None` for an unknown `kty` or a
/// missing member.
pub fn thumbprint(jwk: &Value) -> Option<String> {
    let required: &[&str] = match jwk.get("kty")?.as_str()? {
        "RSA" => &["e", "kty", "n"],
        "EC" => &["crv", "kty", "x", "y"],
        "OKP" => &["crv", "kty", "x"],
        "oct" => &["k", "kty"],
        _ => return None,
    };
    // The members are inserted in lexicographic order, which the Map keeps either way (cedar
    // turns on serde_json's `preserve_order`, so it keeps insertion order), and to_string emits
    // no whitespace: together that is RFC 7638 §3.2's canonical form.
    let mut members = Map::new();
    for name in required {
        members.insert(
            (*name).to_owned(),
            Value::String(jwk.get(*name)?.as_str()?.to_owned()),
        );
    }
    let canonical = Value::Object(members).to_string();
    Some(b64::encode(Sha256::digest(canonical.as_bytes())))
}

/// A JWK set as registered for an agent.
pub fn parse_jwks(value: &Value) -> Result<Vec<PublicJwk>, JoseError> {
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JoseError::BadKey("jwks must be an object with a `keys` array".into()))?;
    if keys.is_empty() || keys.len() > 16 {
        return Err(JoseError::BadKey(
            "jwks must hold between 1 and 16 keys".into(),
        ));
    }
    keys.iter().map(PublicJwk::from_value).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_rsa_thumbprint_ignores_alg_and_kid() {
        let jwk = serde_json::json!({"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"2011-04-29"});
        assert_eq!(
            thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        // The same digest as the RFC's byte list.
        let bytes = b64::decode("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs").unwrap();
        assert_eq!(&bytes[..4], &[55, 54, 203, 177]);
        // Still refused as a key Leash verifies with.
        assert!(PublicJwk::from_value(&jwk).is_err());
    }

    #[test]
    fn rfc8037_ed25519_thumbprint() {
        let jwk = serde_json::json!({"kty":"OKP","crv":"Ed25519",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let key = PublicJwk::from_value(&jwk).unwrap();
        assert_eq!(
            key.thumbprint(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
        assert_eq!(Some(key.thumbprint()), thumbprint(&key.to_value()));
    }

    #[test]
    fn rfc9449_p256_thumbprint() {
        let jwk = serde_json::json!({"kty":"EC","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
            "y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA","crv":"P-256"});
        let key = PublicJwk::from_value(&jwk).unwrap();
        assert_eq!(
            key.thumbprint(),
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
        );
        assert_eq!(Some(key.thumbprint()), thumbprint(&key.to_value()));
    }

    #[test]
    fn private_and_symmetric_keys_refused() {
        let private = serde_json::json!({"kty":"OKP","crv":"Ed25519",
            "d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert!(matches!(
            PublicJwk::from_value(&private),
            Err(JoseError::BadKey(_))
        ));
        let oct = serde_json::json!({"kty":"oct","k":"c2VjcmV0"});
        assert!(PublicJwk::from_value(&oct).is_err());
        let rsa = serde_json::json!({"kty":"RSA","n":"AQAB","e":"AQAB"});
        assert!(PublicJwk::from_value(&rsa).is_err());
    }

    #[test]
    fn small_order_ed25519_key_refused() {
        // The identity point encoding: a small-order public key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let jwk = serde_json::json!({"kty":"OKP","crv":"Ed25519","x": b64::encode(identity)});
        assert!(PublicJwk::from_value(&jwk).is_err());
    }

    fn ed25519_jwk(key: &ed25519_dalek::VerifyingKey) -> PublicJwk {
        let jwk = serde_json::json!({"kty":"OKP","crv":"Ed25519","x": b64::encode(key.as_bytes())});
        PublicJwk::from_value(&jwk).unwrap()
    }

    /// `R` = the identity (small order) with `S = k·a` satisfies the cofactorless equation:
    /// `[S]B − [k]A` is the identity, `R`'s own point. ed25519-dalek's non-strict `verify`
    /// accepts it; the strict check refuses it, as it refuses every other small-order `R`.
    #[test]
    fn a_signature_whose_r_is_of_small_order_is_refused() {
        use ed25519_dalek::Verifier as _;
        use sha2::Digest as _;
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = signing.verifying_key();
        let jwk = ed25519_jwk(&public);
        let message = b"header.claims";
        let a = signing.to_scalar();
        for (index, torsion) in curve25519_dalek::constants::EIGHT_TORSION
            .iter()
            .enumerate()
        {
            let r = torsion.compress().to_bytes();
            let digest = sha2::Sha512::new()
                .chain_update(r)
                .chain_update(public.as_bytes())
                .chain_update(message)
                .finalize();
            let k = curve25519_dalek::Scalar::from_bytes_mod_order_wide(&digest.into());
            let mut bytes = [0u8; 64];
            bytes[..32].copy_from_slice(&r);
            bytes[32..].copy_from_slice((k * a).as_bytes());
            let forged = ed25519_dalek::Signature::from_bytes(&bytes);
            if index == 0 {
                assert!(
                    public.verify(message, &forged).is_ok(),
                    "the forgery is cofactorless-valid"
                );
            }
            assert!(public.verify_strict(message, &forged).is_err());
            assert!(
                jwk.verify(Alg::EdDsa, message, &bytes).is_err(),
                "torsion point {index}"
            );
        }
    }

    proptest::proptest! {
        /// The check agrees with ed25519-dalek's `verify_strict` on genuine signatures and on
        /// every one-bit change of them.
        #[test]
        fn ed25519_check_agrees_with_verify_strict(
            seed in proptest::array::uniform32(proptest::num::u8::ANY),
            message in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            flip in proptest::option::of(0usize..512),
        ) {
            use ed25519_dalek::Signer as _;
            let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
            let public = signing.verifying_key();
            let mut bytes = signing.sign(&message).to_bytes();
            if let Some(bit) = flip {
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
            let strict = public
                .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&bytes))
                .is_ok();
            let ours = ed25519_jwk(&public).verify(Alg::EdDsa, &message, &bytes).is_ok();
            proptest::prop_assert_eq!(ours, strict);
            proptest::prop_assert_eq!(ours, flip.is_none());
        }
    }

    #[test]
    fn off_curve_p256_refused() {
        let jwk = serde_json::json!({"kty":"EC","crv":"P-256",
            "x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
            "y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"});
        assert!(PublicJwk::from_value(&jwk).is_err());
    }
}
