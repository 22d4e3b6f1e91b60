//! Client authentication with private_key_jwt (RFC 7523 §3, RFC 7521 §4.2): the agent signs a
//! short-lived assertion with its registered key.

// Handles numbers a client chose (time claims, counts): no operation that can overflow.
#![deny(clippy::arithmetic_side_effects)]

use serde_json::Value;

use crate::dpop::{MAX_JTI_LEN, replay_key};
use crate::jwk::PublicJwk;
use crate::jws::{JoseError, Jws};

/// The `client_assertion_type` of private_key_jwt.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How far ahead an assertion's `exp` may be.
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;
/// Clock skew tolerated on `iat`, `nbf` and `exp`.
pub const SKEW_SECS: i64 = 30;

/// A verified assertion, replay not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAssertion {
    /// The agent (`iss` = `sub`).
    pub agent: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `exp`: the replay entry is kept until then.
    pub exp: i64,
}

impl VerifiedAssertion {
    /// The replay-store key of this assertion.
    pub fn replay_key(&self) -> crate::dpop::ReplayKey {
        replay_key("assertion", &self.agent, &self.jti)
    }
}

/// The agent an assertion claims to come from (`sub`), read before the signature is checked
/// only to find the keys to check it with.
pub fn claimed_agent(assertion: &str) -> Result<String, JoseError> {
    Ok(Jws::parse(assertion)?.str_claim("sub")?.to_owned())
}

/// Verifies an assertion of `agent` signed by one of `keys`, for one of `audiences`.
pub fn verify_assertion(
    assertion: &str,
    agent: &str,
    keys: &[PublicJwk],
    audiences: &[&str],
    now: i64,
) -> Result<VerifiedAssertion, JoseError> {
    let jws = Jws::parse(assertion)?;
    // A DPoP proof or an access token is not a client assertion (RFC 8725 §3.11).
    if let Some(Value::String(typ)) = jws.header.get("typ")
        && !(typ.eq_ignore_ascii_case("JWT")
            || typ.eq_ignore_ascii_case("client-authentication+jwt"))
    {
        return Err(JoseError::WrongTyp {
            expected: "JWT or client-authentication+jwt",
        });
    }
    let verified = keys
        .iter()
        .filter(|k| k.accepts(jws.alg))
        .any(|k| jws.verify(k).is_ok());
    if !verified {
        return Err(JoseError::BadSignature);
    }
    if jws.str_claim("iss")? != agent || jws.str_claim("sub")? != agent {
        return Err(JoseError::claim(
            "iss",
            "and `sub` must both be the agent id",
        ));
    }
    let aud_ok = match jws.claims.get("aud") {
        Some(Value::String(aud)) => audiences.contains(&aud.as_str()),
        Some(Value::Array(auds)) => auds
            .iter()
            .any(|a| a.as_str().is_some_and(|a| audiences.contains(&a))),
        _ => false,
    };
    if !aud_ok {
        return Err(JoseError::claim(
            "aud",
            "must be the issuer or the token endpoint",
        ));
    }
    let exp = jws
        .time_claim("exp")?
        .ok_or(JoseError::claim("exp", "is missing"))?;
    if exp <= now.saturating_sub(SKEW_SECS) {
        return Err(JoseError::claim("exp", "is in the past"));
    }
    if exp
        > now
            .saturating_add(MAX_ASSERTION_LIFETIME_SECS)
            .saturating_add(SKEW_SECS)
    {
        return Err(JoseError::claim("exp", "is more than 5 minutes ahead"));
    }
    if let Some(iat) = jws.time_claim("iat")?
        && iat > now.saturating_add(SKEW_SECS)
    {
        return Err(JoseError::claim("iat", "is in the future"));
    }
    if let Some(nbf) = jws.time_claim("nbf")?
        && nbf > now.saturating_add(SKEW_SECS)
    {
        return Err(JoseError::claim("nbf", "is in the future"));
    }
    let jti = jws.str_claim("jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return Err(JoseError::claim("jti", "must be 1 to 256 bytes"));
    }
    Ok(VerifiedAssertion {
        agent: agent.to_owned(),
        jti: jti.to_owned(),
        exp: exp.max(now).saturating_add(SKEW_SECS),
    })
}
