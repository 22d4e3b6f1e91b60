//! The audit chain (API §8): events hashed over their RFC 8785 (JCS) canonical JSON and linked by
//! `prev_hash`, Ed25519-signed checkpoints, and a streaming verifier that names the first bad
//! `seq`. Pure logic: the store assigns `seq` and the head; the caller brings the keys.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::b64;
use crate::jwk::PublicJwk;
use crate::jws::Alg;
use crate::token::SigningKey;

/// `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who acted: an agent under a grant, a human with their own key, or the server/admin. The one
/// mode of Leash: the audit log records it and policy (`leash_policy::Facts`) reads it, both
/// under the names of [`Mode::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// An agent acting for a human under a grant.
    Delegated,
    /// A human acting with their own key.
    Direct,
    /// The server or an admin.
    System,
}

impl Mode {
    /// The mode's name: `delegated`, `direct` or `system` (API §8).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Delegated => "delegated",
            Self::Direct => "direct",
            Self::System => "system",
        }
    }
}

/// The outcome recorded for a decision event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Allowed (and, at the gateway, forwarded).
    Allow,
    /// Refused.
    Deny,
    /// Waiting for a human's approval.
    ApprovalRequired,
}

/// One audit event with every member of API §8; members that do not apply are `null`.
///
/// The members are declared in RFC 8785 order (sorted), so that serde_json's compact output
/// of this struct is its canonical form: see [`AuditEvent::draft`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// The action (`mail:read`).
    pub action: Option<String>,
    /// The agent, or `admin`/the human for direct and system events.
    pub actor: Option<String>,
    /// Who approved (for a request that spent an approval, or the approval's decision).
    pub approver: Option<String>,
    /// The decision, for decision events.
    pub decision: Option<Outcome>,
    /// The grant concerned.
    pub grant_id: Option<String>,
    /// SHA-256 (hex) over the JCS form of this event without `hash`.
    pub hash: String,
    /// What happened, e.g. `gateway.request`, `grant.created`.
    pub kind: String,
    /// The request method.
    pub method: Option<String>,
    /// Who acted.
    pub mode: Mode,
    /// The upstream path.
    pub path: Option<String>,
    /// The deciding policy ids.
    pub policies: Option<Vec<String>>,
    /// The previous event's `hash`.
    pub prev_hash: String,
    /// The grant's purpose.
    pub purpose: Option<String>,
    /// Why (an error code or a free-text reason given by a human).
    pub reason: Option<String>,
    /// The request id (`Leash-Request-Id`), a token's `jti`, or an approval id.
    pub request_id: Option<String>,
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The human on whose behalf (or who) acted.
    pub subject: Option<String>,
    /// RFC 3339 UTC time.
    pub ts: String,
    /// The upstream.
    pub upstream: Option<String>,
    /// How a delegated request came in, where it is not the gateway itself: `proxy` (the
    /// forward proxy, API §16). Absent otherwise, not `null`: the events of every chain written
    /// before it existed keep their hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// Failures to canonicalise (only a non-finite number could cause one; events hold none).
pub use crate::json::CanonicalError;
use crate::json::canonical;

/// Hex SHA-256 over the JCS form of a JSON object without its `hash` member.
pub fn hash_without_hash_member(value: &Value) -> Result<String, CanonicalError> {
    let mut object = value.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("hash");
    }
    Ok(hex::encode(Sha256::digest(canonical(&object)?)))
}

impl AuditEvent {
    /// A new event of `kind` by `mode`; every other member null until set, `seq` and hashes
    /// filled by [`AuditEvent::seal`].
    pub fn new(kind: &str, mode: Mode, now: crate::UnixTime) -> Self {
        Self {
            seq: 0,
            ts: rfc3339(now),
            kind: kind.to_owned(),
            mode,
            subject: None,
            actor: None,
            grant_id: None,
            purpose: None,
            action: None,
            upstream: None,
            via: None,
            method: None,
            path: None,
            decision: None,
            reason: None,
            policies: None,
            approver: None,
            request_id: None,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// Places the event after `prev_hash` at `seq` and computes its hash; returns its stored
    /// line (the JCS form of the whole event, `hash` included).
    pub fn seal(&mut self, seq: u64, prev_hash: &str) -> Result<String, CanonicalError> {
        self.seq = seq;
        self.prev_hash = prev_hash.to_owned();
        self.hash = String::new();
        let value = serde_json::to_value(&*self).map_err(|e| CanonicalError(e.to_string()))?;
        self.hash = hash_without_hash_member(&value)?;
        let line = canonical(&*self)?;
        String::from_utf8(line).map_err(|e| CanonicalError(e.to_string()))
    }
}

/// An event in canonical form with its chain members left open: the expensive part of
/// sealing (JCS, and hashing everything before `prev_hash`) done before the event reaches the
/// single writer that owns the chain head.
#[derive(Debug, Clone)]
pub struct Draft {
    canonical: String,
    hash_at: usize,
    prev_at: usize,
    seq_at: usize,
    /// SHA-256 fed with the canonical form up to `prev_hash`'s value, without the `hash` member.
    before_prev: Sha256,
}

/// The open chain members as they appear in a draft's canonical form. JCS sorts members
/// (`hash` < `kind` … < `prev_hash` < … < `seq` < `subject`), so each is followed by a comma,
/// and a quote inside a string value is escaped, so none can be matched inside a value.
const OPEN_HASH: &str = r#""hash":"","#;
const OPEN_PREV: &str = r#""prev_hash":"","#;
const OPEN_SEQ: &str = r#""seq":0,"#;
/// `OPEN_PREV` up to where the value goes.
const PREV_KEY: &str = r#""prev_hash":""#;

impl AuditEvent {
    /// The canonical form of this event with `seq`, `prev_hash` and `hash` still open.
    ///
    /// Written by serde_json directly, not through the RFC 8785 crate: this struct's members
    /// are declared in sorted order, holds no number but `seq` and no float, and serde_json
    /// escapes strings exactly as RFC 8785 §3.2.2.2 does, so its compact output is the
    /// canonical form (a property test checks it against the crate over arbitrary strings).
    /// Every append pays for this, and the crate's sorting costs several times more.
    pub fn draft(&self) -> Result<Draft, CanonicalError> {
        let json = |event: &AuditEvent| {
            serde_json::to_string(event).map_err(|e| CanonicalError(e.to_string()))
        };
        let canonical = if self.seq == 0 && self.prev_hash.is_empty() && self.hash.is_empty() {
            json(self)?
        } else {
            let mut open = self.clone();
            open.seq = 0;
            open.prev_hash = String::new();
            open.hash = String::new();
            json(&open)?
        };
        // memchr's vectorised search: str::find's two-way search was a tenth of each append.
        // The searchers are built once: `memmem::find` builds one on every call.
        static OPEN_MEMBERS: LazyLock<[memchr::memmem::Finder<'static>; 3]> =
            LazyLock::new(|| [OPEN_HASH, OPEN_PREV, OPEN_SEQ].map(memchr::memmem::Finder::new));
        let find = |finder: &memchr::memmem::Finder<'_>| {
            finder.find(canonical.as_bytes()).ok_or_else(|| {
                CanonicalError(format!(
                    "no {} in the canonical form",
                    String::from_utf8_lossy(finder.needle())
                ))
            })
        };
        let [open_hash, open_prev, open_seq] = &*OPEN_MEMBERS;
        let (hash_at, prev_at, seq_at) = (find(open_hash)?, find(open_prev)?, find(open_seq)?);
        if !(hash_at < prev_at && prev_at < seq_at) {
            return Err(CanonicalError("members out of canonical order".into()));
        }
        let mut before_prev = Sha256::new();
        before_prev.update(&canonical.as_bytes()[..hash_at]);
        before_prev.update(&canonical.as_bytes()[hash_at + OPEN_HASH.len()..prev_at]);
        before_prev.update(PREV_KEY.as_bytes());
        Ok(Draft {
            canonical,
            hash_at,
            prev_at,
            seq_at,
            before_prev,
        })
    }
}

impl Draft {
    /// Places the event at `seq` after `prev_hash`: returns its stored line and its hash,
    /// exactly as [`AuditEvent::seal`] would.
    pub fn seal(&self, seq: u64, prev_hash: &str) -> (String, String) {
        let (mut line, mut hash) = (String::new(), String::new());
        self.seal_into(seq, prev_hash, &mut line, &mut hash);
        (line, hash)
    }

    /// [`Draft::seal`] into the caller's buffers, overwriting them; they allocate only when
    /// short of capacity. The store's single writer seals every event: it reuses one line
    /// buffer, and writes the hash into capacity the calling task reserved (so that it is
    /// freed where it was allocated).
    pub fn seal_into(&self, seq: u64, prev_hash: &str, line: &mut String, hash: &mut String) {
        let c = &self.canonical;
        let before_hash = &c[..self.hash_at];
        let between = &c[self.hash_at + OPEN_HASH.len()..self.prev_at];
        let middle = &c[self.prev_at + OPEN_PREV.len()..self.seq_at];
        let rest = &c[self.seq_at + OPEN_SEQ.len()..];
        let mut seq_digits = itoa::Buffer::new();
        let seq = seq_digits.format(seq);
        let mut digest = self.before_prev.clone();
        for part in [prev_hash, "\",", middle, "\"seq\":", seq, ",", rest] {
            digest.update(part.as_bytes());
        }
        let digest = digest.finalize();
        // Into a buffer: hex::encode's char iterator was a sixth of this function.
        let mut hex_digits = [0u8; 64];
        hash.clear();
        match hex::encode_to_slice(digest, &mut hex_digits)
            .ok()
            .and_then(|()| std::str::from_utf8(&hex_digits).ok())
        {
            Some(hex) => hash.push_str(hex),
            None => hash.push_str(&hex::encode(digest)),
        }
        let parts = [
            before_hash,
            "\"hash\":\"",
            hash.as_str(),
            "\",",
            between,
            PREV_KEY,
            prev_hash,
            "\",",
            middle,
            "\"seq\":",
            seq,
            ",",
            rest,
        ];
        line.clear();
        line.reserve(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            line.push_str(part);
        }
    }
}

/// RFC 3339 UTC with second precision: how every time appears in audit events and API answers.
/// A time RFC 3339 cannot write (outside the years 0–9999) renders as the epoch.
pub fn rfc3339(now: crate::UnixTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(now)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// A signed statement that the chain had `hash` at `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The last event covered.
    pub seq: u64,
    /// That event's hash.
    pub hash: String,
    /// When it was signed.
    pub ts: String,
    /// The signing key's id (its JWKS `kid`).
    pub kid: String,
    /// base64url Ed25519 signature over the JCS form of `{seq, hash, ts, kid}`.
    pub sig: String,
}

#[derive(Serialize)]
struct CheckpointBody<'a> {
    seq: u64,
    hash: &'a str,
    ts: &'a str,
    kid: &'a str,
}

impl Checkpoint {
    /// Signs the head `(seq, hash)` with the server key.
    pub fn sign(
        key: &SigningKey,
        seq: u64,
        hash: &str,
        now: crate::UnixTime,
    ) -> Result<Self, CanonicalError> {
        let ts = rfc3339(now);
        let kid = key.kid().to_owned();
        let body = canonical(&CheckpointBody {
            seq,
            hash,
            ts: &ts,
            kid: &kid,
        })?;
        let sig = b64::encode(key.sign_bytes(&body));
        Ok(Self {
            seq,
            hash: hash.to_owned(),
            ts,
            kid,
            sig,
        })
    }

    /// Whether the signature verifies with `key` (an Ed25519 JWK).
    pub fn verify(&self, key: &PublicJwk) -> bool {
        let Ok(body) = canonical(&CheckpointBody {
            seq: self.seq,
            hash: &self.hash,
            ts: &self.ts,
            kid: &self.kid,
        }) else {
            return false;
        };
        let Ok(sig) = b64::decode(&self.sig) else {
            return false;
        };
        key.accepts(Alg::EdDsa) && key.verify(Alg::EdDsa, &body, &sig).is_ok()
    }
}

/// Why verification stopped: the first bad `seq` and what was wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seq {seq}: {problem}")]
pub struct ChainBreak {
    /// The first position where the chain is not what it must be.
    pub seq: u64,
    /// What was found there.
    pub problem: String,
}

/// A checkpoint that cannot be trusted (the log as a whole fails).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Its `kid` is not among the keys given.
    #[error("checkpoint at seq {0} names an unknown key {1:?}")]
    UnknownKey(u64, String),
    /// Its signature does not verify.
    #[error("checkpoint at seq {0} has a bad signature")]
    BadSignature(u64),
}

/// The hash of a line as stored: JCS puts `hash` between `grant_id` and `kind`, so removing
/// that one member from the stored bytes gives exactly what was hashed. A line whose bytes
/// differ in any way gives another hash (and is then canonicalised to be sure); inside a JSON
/// string a quote is escaped, so the member cannot be matched within a value.
fn stored_form_hash(line: &str, hash: &str) -> Option<String> {
    let member = format!("\"hash\":\"{hash}\",");
    let at = line.find(&member)?;
    let mut digest = Sha256::new();
    digest.update(&line.as_bytes()[..at]);
    digest.update(&line.as_bytes()[at + member.len()..]);
    Some(hex::encode(digest.finalize()))
}

/// Checks a chain event by event (in `seq` order as stored or exported) against signed
/// checkpoints given up front; memory stays constant in the number of events.
#[derive(Debug)]
pub struct ChainVerifier {
    checkpoints: BTreeMap<u64, String>,
    next_seq: u64,
    prev_hash: String,
}

impl ChainVerifier {
    /// A verifier for a chain starting at seq 1, holding the given checkpoints, each checked
    /// against the key its `kid` names (`find_key`).
    pub fn new(
        checkpoints: &[Checkpoint],
        find_key: impl Fn(&str) -> Option<PublicJwk>,
    ) -> Result<Self, CheckpointError> {
        let mut covered = BTreeMap::new();
        for checkpoint in checkpoints {
            let key = find_key(&checkpoint.kid).ok_or_else(|| {
                CheckpointError::UnknownKey(checkpoint.seq, checkpoint.kid.clone())
            })?;
            if !checkpoint.verify(&key) {
                return Err(CheckpointError::BadSignature(checkpoint.seq));
            }
            covered.insert(checkpoint.seq, checkpoint.hash.clone());
        }
        Ok(Self {
            checkpoints: covered,
            next_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
        })
    }

    /// The number of events accepted so far.
    pub fn verified(&self) -> u64 {
        self.next_seq - 1
    }

    /// Checks the next event's line.
    pub fn push(&mut self, line: &str) -> Result<(), ChainBreak> {
        let at = self.next_seq;
        let broken = |problem: String| ChainBreak { seq: at, problem };
        let event: AuditEvent =
            serde_json::from_str(line).map_err(|e| broken(format!("not an audit event ({e})")))?;
        if event.seq != at {
            return Err(broken(format!(
                "found seq {} where {at} belongs",
                event.seq
            )));
        }
        if event.prev_hash != self.prev_hash {
            return Err(broken("prev_hash does not match the previous event".into()));
        }
        let hash = match stored_form_hash(line, &event.hash) {
            Some(hash) if hash == event.hash => hash,
            // Not in the stored (canonical) form, e.g. re-indented: canonicalise it.
            _ => {
                let value: Value = serde_json::from_str(line)
                    .map_err(|e| broken(format!("not a JSON event ({e})")))?;
                hash_without_hash_member(&value).map_err(|e| broken(e.to_string()))?
            }
        };
        if hash != event.hash {
            return Err(broken("the event does not match its hash".into()));
        }
        if let Some(signed) = self.checkpoints.get(&at)
            && *signed != hash
        {
            return Err(broken(
                "the event differs from the signed checkpoint".into(),
            ));
        }
        self.next_seq += 1;
        self.prev_hash = hash;
        Ok(())
    }

    /// Ends the check: a signed checkpoint past the last event means the tail was cut off.
    pub fn finish(&self) -> Result<u64, ChainBreak> {
        match self.checkpoints.last_key_value() {
            Some((&seq, _)) if seq >= self.next_seq => Err(ChainBreak {
                seq: self.next_seq,
                problem: format!(
                    "the log ends at seq {} but a signed checkpoint covers seq {seq}: events were removed from the end",
                    self.verified()
                ),
            }),
            _ => Ok(self.verified()),
        }
    }
}

#[cfg(test)]
mod tests;
