//! DPoP proof verification (RFC 9449 §4.3) and stateless server nonces (§8). Replay of a proof's
//! `jti` is checked by the caller against the shared store, with the key [`VerifiedProof::replay_key`].

// Proofs and nonces carry attacker-chosen numbers: an overflow would panic (overflow checks are
// on in release) and drop the connection instead of answering.
#![deny(clippy::arithmetic_side_effects)]

use hmac::{Hmac, Mac as _};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::b64;
use crate::jwk::PublicJwk;
use crate::jws::{JoseError, Jws};

/// How far a proof's `iat` may lie in the past or the future.
pub const IAT_WINDOW_SECS: i64 = 60;
/// The longest `jti` accepted (longer ones could bloat the replay store).
pub const MAX_JTI_LEN: usize = 256;
/// How long a server nonce stays acceptable.
pub const NONCE_LIFETIME_SECS: i64 = 300;
/// How far ahead of this node's clock another node's nonce may have been issued.
const NONCE_CLOCK_SKEW_SECS: i64 = 5;

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The proof is malformed or fails a check.
    #[error("{0}")]
    Invalid(String),
    /// Nonces are required and the proof has none, or a stale or foreign one.
    #[error("a fresh server nonce is required in the DPoP proof")]
    UseNonce,
}

impl From<JoseError> for ProofError {
    fn from(e: JoseError) -> Self {
        Self::Invalid(format!("dpop proof: {e}"))
    }
}

fn invalid(message: &str) -> ProofError {
    ProofError::Invalid(format!("dpop proof: {message}"))
}

/// What the request the proof accompanies looks like.
#[derive(Debug, Clone, Copy)]
pub struct ProofContext<'a> {
    /// The request method, e.g. `POST`.
    pub method: &'a str,
    /// The external URL of the request without query or fragment, as the server spells it.
    pub url: &'a str,
    /// At a resource: the hash of the access token the proof must be bound to through `ath`.
    pub access_token: Option<&'a AccessTokenHash>,
    /// The current time.
    pub now: i64,
    /// Whether a server nonce is required, and the key that made it.
    pub nonces: Option<&'a NonceKey>,
}

/// A proof that passed every check but replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    /// The proof's `jti`.
    pub jti: String,
    /// The proof's `iat`.
    pub iat: i64,
}

impl VerifiedProof {
    /// The replay-store key: `jti` is unique per key (RFC 9449 §11.1), hashed to a fixed size.
    pub fn replay_key(&self) -> ReplayKey {
        replay_key("dpop", &self.jkt, &self.jti)
    }

    /// Until when the replay entry must be kept.
    pub fn replay_until(&self) -> i64 {
        self.iat.saturating_add(IAT_WINDOW_SECS).saturating_add(1)
    }
}

/// The store key of a one-time value: SHA-256 over its kind, its issuer and its `jti`.
pub type ReplayKey = [u8; 32];

/// A fixed-size replay-store key for a `jti` of some kind and issuer.
pub fn replay_key(kind: &str, issuer: &str, jti: &str) -> ReplayKey {
    let mut hasher = Sha256::new();
    for part in [kind, issuer, jti] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// SHA-256 of an access token: a proof's `ath` is its base64url encoding. A resource server
/// hashes the token once and uses the hash for `ath` and as the key of what it remembers about
/// the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccessTokenHash(pub [u8; 32]);

impl AccessTokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// `ath`: base64url(SHA-256(access token)).
    pub fn ath(&self) -> String {
        b64::encode(self.0)
    }
}

/// Verifies a DPoP proof against the request, everything except `jti` replay.
pub fn verify_proof(proof: &str, cx: &ProofContext<'_>) -> Result<VerifiedProof, ProofError> {
    let jws = Jws::parse(proof)?;
    jws.require_typ("dpop+jwt")?;
    let jwk = jws
        .header
        .get("jwk")
        .ok_or_else(|| invalid("header `jwk` is missing"))?;
    let key = PublicJwk::from_value(jwk)?;
    jws.verify(&key)?;

    let htm = jws.str_claim("htm")?;
    if htm != cx.method {
        return Err(invalid("htm does not match the request method"));
    }
    let htu = jws.str_claim("htu")?;
    // An `htu` spelled exactly as the request URL matches without being parsed; any other
    // spelling is parsed and compared as a URL (RFC 9449 §4.3: query and fragment ignored).
    if htu != cx.url {
        let without_query = |text: &str| {
            url::Url::parse(text).ok().map(|mut url| {
                url.set_query(None);
                url.set_fragment(None);
                url
            })
        };
        let htu = without_query(htu).ok_or_else(|| invalid("htu is not a URL"))?;
        if Some(htu) != without_query(cx.url) {
            return Err(invalid("htu does not match the request URL"));
        }
    }
    let iat = jws
        .time_claim("iat")?
        .ok_or_else(|| invalid("claim `iat` is missing"))?;
    if iat < cx.now.saturating_sub(IAT_WINDOW_SECS) {
        return Err(invalid("iat is too old"));
    }
    if iat > cx.now.saturating_add(IAT_WINDOW_SECS) {
        return Err(invalid("iat is in the future"));
    }
    // RFC 9449 gives proofs no `exp` or `nbf`, but one that carries them is held to them: a
    // malformed one is refused, never read as absent (ATTACKS.md 7, 8).
    if jws
        .time_claim("nbf")?
        .is_some_and(|nbf| nbf > cx.now.saturating_add(IAT_WINDOW_SECS))
    {
        return Err(invalid("nbf is in the future"));
    }
    if jws.time_claim("exp")?.is_some_and(|exp| exp <= cx.now) {
        return Err(invalid("exp has passed"));
    }
    let jti = jws.str_claim("jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return Err(invalid("jti must be 1 to 256 bytes"));
    }
    if let Some(token) = cx.access_token {
        match jws.claims.get("ath") {
            Some(Value::String(ath)) if *ath == token.ath() => {}
            Some(_) => return Err(invalid("ath does not match the access token")),
            None => return Err(invalid("claim `ath` is missing")),
        }
    }
    if let Some(nonces) = cx.nonces {
        match jws.claims.get("nonce") {
            Some(Value::String(nonce)) if nonces.accepts(nonce, cx.now) => {}
            _ => return Err(ProofError::UseNonce),
        }
    }
    Ok(VerifiedProof {
        jkt: key.thumbprint(),
        jti: jti.to_owned(),
        iat,
    })
}

/// The key of stateless server nonces: a nonce is its issue time and a MAC over it, so every
/// node sharing the key accepts every other node's nonces without shared state.
pub struct NonceKey([u8; 32]);

impl NonceKey {
    /// A nonce key from 32 secret bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn tag(&self, issued: i64) -> [u8; 16] {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            // INVARIANT: HMAC takes keys of any length.
            Err(_) => return [0; 16],
        };
        mac.update(b"leash dpop nonce");
        mac.update(&issued.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&full[..16]);
        tag
    }

    /// A fresh nonce issued at `now`.
    pub fn issue(&self, now: i64) -> String {
        let mut bytes = now.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.tag(now));
        b64::encode(bytes)
    }

    /// Whether `nonce` was made with this key within [`NONCE_LIFETIME_SECS`].
    pub fn accepts(&self, nonce: &str, now: i64) -> bool {
        use subtle::ConstantTimeEq as _;
        let Ok(bytes) = b64::decode(nonce) else {
            return false;
        };
        if bytes.len() != 24 {
            return false;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&bytes[..8]);
        // `issued` is whatever the client sent: `now - i64::MIN` overflows.
        let issued = i64::from_be_bytes(ts);
        let not_ahead = issued <= now.saturating_add(NONCE_CLOCK_SKEW_SECS);
        let young = now
            .checked_sub(issued)
            .is_some_and(|age| age <= NONCE_LIFETIME_SECS);
        let fresh = not_ahead && young;
        fresh && bool::from(self.tag(issued).ct_eq(&bytes[8..]))
    }
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 9449 §4.1 Figure 2, §5 Figure 7 and §7.1 Figure 13 proofs (ES256).
    const FIG2: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
    const FIG7: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjY1Mjk2fQ.pAqut2IRDm_De6PR93SYmGBPXpwrAk90e8cP2hjiaG5QsGSuKDYW7_X620BxqhvYC8ynrrvZLTk41mSRroapUA";
    const FIG13: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA";
    const JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";
    const RFC_TOKEN: &str = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";

    fn cx<'a>(method: &'a str, url: &'a str, now: i64) -> ProofContext<'a> {
        ProofContext {
            method,
            url,
            access_token: None,
            now,
            nonces: None,
        }
    }

    #[test]
    fn rfc9449_token_request_proofs_verify_with_fixed_clock() {
        let url = "https://server.example.com/token";
        let p = verify_proof(FIG2, &cx("POST", url, 1_562_262_616)).unwrap();
        assert_eq!(p.jkt, JKT);
        assert_eq!(p.jti, "-BwC3ESc6acc2lTc");
        let p7 = verify_proof(FIG7, &cx("POST", url, 1_562_265_296)).unwrap();
        // Same key and jti: the replay key is equal, so the store refuses the second use.
        assert_eq!(p7.replay_key(), p.replay_key());
    }

    #[test]
    fn rfc9449_resource_proof_with_ath() {
        let rfc_token = AccessTokenHash::of(RFC_TOKEN);
        assert_eq!(
            rfc_token.ath(),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
        let url = "https://resource.example.org/protectedresource";
        let mut c = cx("GET", url, 1_562_262_618);
        c.access_token = Some(&rfc_token);
        assert_eq!(verify_proof(FIG13, &c).unwrap().jkt, JKT);
        let another = AccessTokenHash::of("another-token");
        c.access_token = Some(&another);
        assert!(matches!(
            verify_proof(FIG13, &c),
            Err(ProofError::Invalid(_))
        ));
    }

    #[test]
    fn rfc9449_proof_refused_on_method_url_and_time() {
        let url = "https://server.example.com/token";
        let other = "https://server.example.com/other";
        let now = 1_562_262_616;
        assert!(verify_proof(FIG2, &cx("GET", url, now)).is_err());
        assert!(verify_proof(FIG2, &cx("POST", other, now)).is_err());
        assert!(verify_proof(FIG2, &cx("POST", url, now + 61)).is_err());
        assert!(verify_proof(FIG2, &cx("POST", url, now - 61)).is_err());
        let with_query = "https://server.example.com/token?x=1";
        assert!(verify_proof(FIG2, &cx("POST", with_query, now)).is_ok());
    }

    /// A DPoP proof with any `claims`, signed by `key`.
    fn proof_with(key: &crate::client::AgentKey, claims: &Value) -> String {
        let mut header = serde_json::Map::new();
        header.insert("typ".into(), serde_json::json!("dpop+jwt"));
        header.insert("jwk".into(), key.public().to_value());
        key.sign(header, claims)
    }

    #[test]
    fn htu_spelled_differently_matches_as_the_same_url() {
        let key = crate::client::AgentKey::generate(crate::jws::Alg::EdDsa);
        let url = "https://server.example.com/gw/mail/messages/42";
        for (htu, ok) in [
            (url, true),
            ("HTTPS://Server.Example.COM:443/gw/mail/messages/42", true),
            (
                "https://server.example.com/gw/mail/messages/42?page=2#top",
                true,
            ),
            ("https://server.example.com/gw/mail/messages/43", false),
            ("https://server.example.com:8443/gw/mail/messages/42", false),
            ("http://server.example.com/gw/mail/messages/42", false),
            ("/gw/mail/messages/42", false),
        ] {
            let claims = serde_json::json!({"jti": "j", "htm": "GET", "htu": htu, "iat": 1000});
            let proof = proof_with(&key, &claims);
            assert_eq!(
                verify_proof(&proof, &cx("GET", url, 1000)).is_ok(),
                ok,
                "{htu}"
            );
        }
    }

    #[test]
    fn overlong_jti_refused() {
        let key = crate::client::AgentKey::generate(crate::jws::Alg::EdDsa);
        let url = "http://127.0.0.1:8470/oauth2/token";
        for (jti, ok) in [
            ("j".repeat(256), true),
            ("j".repeat(257), false),
            (String::new(), false),
        ] {
            let claims = serde_json::json!({"jti": jti, "htm": "POST", "htu": url, "iat": 1000});
            let proof = proof_with(&key, &claims);
            assert_eq!(
                verify_proof(&proof, &cx("POST", url, 1000)).is_ok(),
                ok,
                "{}",
                jti.len()
            );
        }
    }

    #[test]
    fn proof_exp_and_nbf_are_checked_when_present_and_never_read_as_absent() {
        let key = crate::client::AgentKey::generate(crate::jws::Alg::EdDsa);
        let url = "https://rs.example/x";
        let now = 1_700_000_000;
        let proof = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"htm": "GET", "htu": url, "iat": now, "jti": "j"});
            if let (Value::Object(claims), Value::Object(extra)) = (&mut claims, extra) {
                claims.extend(extra);
            }
            let mut header = serde_json::Map::new();
            header.insert("typ".into(), serde_json::json!("dpop+jwt"));
            header.insert("jwk".into(), key.public().to_value());
            key.sign(header, &claims)
        };
        let check = |extra| verify_proof(&proof(extra), &cx("GET", url, now));
        assert!(check(serde_json::json!({})).is_ok());
        assert!(check(serde_json::json!({"exp": now + 60, "nbf": now - 1})).is_ok());
        for bad in [
            serde_json::json!({"exp": now}),
            serde_json::json!({"nbf": i64::MAX}),
            serde_json::json!({"exp": null}),
            serde_json::json!({"nbf": "0"}),
            serde_json::json!({"exp": true}),
            serde_json::json!({"exp": 1.5e9}),
            serde_json::json!({"nbf": []}),
        ] {
            assert!(check(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn nonces_round_trip_and_expire() {
        let key = NonceKey::new([9; 32]);
        let nonce = key.issue(1000);
        assert!(key.accepts(&nonce, 1000));
        assert!(key.accepts(&nonce, 1000 + NONCE_LIFETIME_SECS));
        assert!(!key.accepts(&nonce, 1001 + NONCE_LIFETIME_SECS));
        assert!(!NonceKey::new([8; 32]).accepts(&nonce, 1000));
        assert!(!key.accepts("garbage", 1000));
        let url = "https://server.example.com/token";
        let mut c = cx("POST", url, 1_562_262_616);
        c.nonces = Some(&key);
        assert_eq!(verify_proof(FIG2, &c), Err(ProofError::UseNonce));
    }

    /// A nonce is its issue time (8 bytes, big-endian) and a 16-byte tag; the time is the
    /// client's to choose, so no value of it, with any tag, may panic.
    fn nonce_of(issued: i64, tag: [u8; 16]) -> String {
        let mut bytes = issued.to_be_bytes().to_vec();
        bytes.extend_from_slice(&tag);
        b64::encode(bytes)
    }

    #[test]
    fn nonces_with_extreme_times_are_refused_without_panicking() {
        let key = NonceKey::new([9; 32]);
        let times = [
            i64::MIN,
            i64::MIN + 1,
            -1,
            0,
            i64::MAX - 4,
            i64::MAX - 5,
            i64::MAX,
        ];
        for issued in times {
            for now in times.into_iter().chain([1_800_000_000]) {
                // Forged tags, and tags this key really made for the extreme time.
                assert!(!key.accepts(&nonce_of(issued, [0xff; 16]), now));
                let valid_tag = key.issue(issued);
                let accepted = key.accepts(&valid_tag, now);
                let expected = issued <= now.saturating_add(NONCE_CLOCK_SKEW_SECS)
                    && now
                        .checked_sub(issued)
                        .is_some_and(|age| age <= NONCE_LIFETIME_SECS);
                assert_eq!(accepted, expected, "issued {issued}, now {now}");
            }
        }
        // A genuine nonce at the extremes of the clock is still judged by its age.
        assert!(key.accepts(&key.issue(i64::MAX), i64::MAX));
        assert!(key.accepts(&key.issue(i64::MIN), i64::MIN));
        assert!(!key.accepts(&key.issue(i64::MIN), i64::MAX));
        assert!(!key.accepts(&key.issue(i64::MAX), i64::MIN));
        // Huge counters in other shapes: longer or shorter than a nonce, all ones.
        for bytes in [
            vec![0xff; 24],
            vec![0xff; 25],
            vec![0xff; 23],
            vec![0x80; 24],
        ] {
            assert!(!key.accepts(&b64::encode(bytes), 0));
        }
    }

    #[test]
    fn proofs_with_extreme_iat_are_refused_without_panicking() {
        let key = crate::client::AgentKey::generate(crate::jws::Alg::EdDsa);
        let url = "http://127.0.0.1:8470/oauth2/token";
        for iat in [i64::MIN, i64::MAX, i64::MIN + 1, i64::MAX - 1] {
            let claims = serde_json::json!({"jti": "j", "htm": "POST", "htu": url, "iat": iat});
            let proof = proof_with(&key, &claims);
            for now in [i64::MIN, 0, i64::MAX] {
                let result = verify_proof(&proof, &cx("POST", url, now));
                assert_eq!(result.is_ok(), iat.abs_diff(now) <= 60, "{iat} {now}");
            }
        }
        // A proof whose `nonce` claim carries an extreme time: a nonce error, not a panic.
        let nonces = NonceKey::new([9; 32]);
        for issued in [i64::MIN, i64::MAX] {
            let claims = serde_json::json!({"jti": "j", "htm": "POST", "htu": url, "iat": 1000,
                "nonce": nonce_of(issued, [0; 16])});
            let mut c = cx("POST", url, 1000);
            c.nonces = Some(&nonces);
            assert_eq!(
                verify_proof(&proof_with(&key, &claims), &c),
                Err(ProofError::UseNonce)
            );
        }
    }
}
