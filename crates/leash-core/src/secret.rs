//! Secrets (API keys, grant handles) as redacting newtypes, their generation and their
//! storage form (a SHA-256 digest: the values are ≥ 256 random bits, so a fast hash is enough).

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

/// Prefix of human and admin API keys.
pub const API_KEY_PREFIX: &str = "lsk_";
/// Prefix of grant handles.
pub const HANDLE_PREFIX: &str = "lgh_";

/// A secret string whose `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// A fresh random secret: `prefix` followed by 256 random bits in base64url.
    pub fn generate(prefix: &str) -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::new(format!("{prefix}{}", crate::b64::encode(bytes)))
    }

    /// The value itself; call only where it must leave the process (shown once, or sent).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest under which the secret is stored and looked up.
    pub fn digest(&self) -> SecretDigest {
        SecretDigest::of(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of a secret, hex encoded: what the store keeps instead of the secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretDigest(String);

impl SecretDigest {
    /// The digest of `value`.
    pub fn of(value: &str) -> Self {
        Self(hex::encode(Sha256::digest(value.as_bytes())))
    }

    /// A digest read back from storage.
    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }

    /// The hex form kept in storage.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time equality, for comparing against a configured key.
    pub fn ct_eq(&self, other: &SecretDigest) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretDigest({}…)", &self.0[..8.min(self.0.len())])
    }
}

/// A random opaque identifier such as `grt_…`, 128 bits, unguessable. From the thread's
/// CSPRNG (ChaCha12, seeded and reseeded from the operating system) rather than a system call
/// each: the gateway makes one for every request.
pub fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", crate::b64::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let secret = Secret::generate(API_KEY_PREFIX);
        assert!(!format!("{secret:?}").contains(secret.expose()));
        assert!(!format!("{secret}").contains(secret.expose()));
        assert!(secret.expose().starts_with(API_KEY_PREFIX));
    }

    #[test]
    fn digest_compares_equal_only_for_same_value() {
        let a = Secret::new("lsk_a");
        assert!(a.digest().ct_eq(&SecretDigest::of("lsk_a")));
        assert!(!a.digest().ct_eq(&SecretDigest::of("lsk_b")));
    }
}
