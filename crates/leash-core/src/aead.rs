//! Authenticated encryption at rest with the master key (XChaCha20-Poly1305): the signing
//! keys, the vault, OAuth connections, approval body previews.

use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 24;

/// The 32-byte vault master key.
pub struct MasterKey(Zeroizing<[u8; 32]>);

/// Errors of sealing and opening.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AeadError {
    /// The master key is not base64 of exactly 32 bytes.
    #[error("the master key must be base64 of exactly 32 bytes")]
    BadKey,
    /// The ciphertext was altered, is truncated, or was sealed with another key or context.
    #[error("the sealed value cannot be opened with this master key")]
    Open,
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        Self(key)
    }

    /// Parses standard base64 (as in `LEASH_MASTER_KEY`) of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, AeadError> {
        use base64::Engine as _;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| AeadError::BadKey)?,
        );
        let array: [u8; 32] = bytes.as_slice().try_into().map_err(|_| AeadError::BadKey)?;
        Ok(Self(Zeroizing::new(array)))
    }

    /// The key's public name: which key sealed a store, said without revealing the key (a
    /// domain-separated SHA-256 of it; the key is 32 random bytes, so the name gives no way
    /// back to it).
    pub fn id(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::new()
            .chain_update(b"leash master key id\0")
            .chain_update(self.0.as_ref())
            .finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Standard base64 of the key, for writing the key file.
    pub fn to_base64(&self) -> Zeroizing<String> {
        use base64::Engine as _;
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_ref()))
    }

    /// Encrypts `plaintext`; `context` is authenticated so a value cannot be moved elsewhere.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plaintext,
            aad: context,
        };
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            // INVARIANT: encryption fails only for messages over 256 GiB.
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`MasterKey::seal`] produced with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        if sealed.len() < NONCE_LEN {
            return Err(AeadError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| AeadError::Open)
    }
}

/// What can open sealed values: one master key, or a node's keys during a rotation.
pub trait Opener: Send + Sync {
    /// Decrypts what [`MasterKey::seal`] produced with the same `context`.
    fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError>;
}

impl Opener for MasterKey {
    fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        MasterKey::open(self, sealed, context)
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = MasterKey::generate();
        let mut sealed = key.seal(b"secret", b"ctx");
        assert_eq!(key.open(&sealed, b"ctx").unwrap().as_slice(), b"secret");
        assert_eq!(key.open(&sealed, b"other").unwrap_err(), AeadError::Open);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(key.open(&sealed, b"ctx").unwrap_err(), AeadError::Open);
        let other = MasterKey::generate();
        assert!(other.open(&key.seal(b"x", b"c"), b"c").is_err());
    }

    #[test]
    fn the_id_names_one_key_and_reveals_nothing_of_it() {
        let key = MasterKey::generate();
        let same = MasterKey::from_base64(&key.to_base64()).unwrap();
        assert_eq!(key.id(), same.id());
        assert_eq!(key.id().len(), 16);
        assert_ne!(key.id(), MasterKey::generate().id());
    }

    #[test]
    fn base64_key_must_be_32_bytes() {
        let key = MasterKey::generate();
        assert!(MasterKey::from_base64(&key.to_base64()).is_ok());
        assert_eq!(
            MasterKey::from_base64("AAAA").unwrap_err(),
            AeadError::BadKey
        );
        assert_eq!(MasterKey::from_base64("!!").unwrap_err(), AeadError::BadKey);
    }
}
