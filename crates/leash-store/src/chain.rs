//! The audit chain's head as its one appender holds it, and what appending does to it: both
//! writers seal events and sign checkpoints through these, and only store the rows their way.

use leash_core::audit::{AuditEvent, CanonicalError, Checkpoint, Draft, GENESIS_HASH, Outcome};

use crate::common::unix_of;
use crate::{CHECKPOINT_EVERY_EVENTS, CheckpointSigner, UseVerdict};

/// The end of the chain: the last event's seq and hash, and the last checkpoint's seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainHead {
    pub(crate) seq: u64,
    pub(crate) hash: String,
    pub(crate) checkpointed: u64,
}

impl Default for ChainHead {
    /// The head of an empty chain.
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
            checkpointed: 0,
        }
    }
}

impl ChainHead {
    /// Seals `event` as the next one and moves the head past it: from the draft the caller
    /// made when the use was recorded, or, when the store refused the use, as a deny with the
    /// verdict's reason, canonicalised anew. Writes the stored line into `line` (overwritten)
    /// and the hash into `event.hash`; returns the event's seq and Unix time.
    pub(crate) fn append(
        &mut self,
        event: &mut AuditEvent,
        draft: Option<&(Draft, i64)>,
        verdict: UseVerdict,
        line: &mut String,
    ) -> Result<(u64, i64), CanonicalError> {
        let seq = self.seq + 1;
        let at = match (verdict.reason(), draft) {
            (None, Some((draft, at))) => {
                draft.seal_into(seq, &self.hash, line, &mut event.hash);
                *at
            }
            (reason, _) => {
                if let Some(reason) = reason {
                    event.decision = Some(Outcome::Deny);
                    event.reason = Some(reason.to_owned());
                }
                *line = event.seal(seq, &self.hash)?;
                unix_of(&event.ts)
            }
        };
        self.seq = seq;
        self.hash.clone_from(&event.hash);
        Ok((seq, at))
    }

    /// The checkpoint due at the head: signed once [`CHECKPOINT_EVERY_EVENTS`] events passed
    /// since the last (none before the server has set its signer).
    pub(crate) fn due_checkpoint(&self, signer: Option<&CheckpointSigner>) -> Option<Checkpoint> {
        (self.seq - self.checkpointed >= CHECKPOINT_EVERY_EVENTS)
            .then(|| self.sign(signer))
            .flatten()
    }

    /// A checkpoint of the head if any event came after the last one (`Store::checkpoint_now`).
    pub(crate) fn new_checkpoint(&self, signer: Option<&CheckpointSigner>) -> Option<Checkpoint> {
        (self.seq > self.checkpointed)
            .then(|| self.sign(signer))
            .flatten()
    }

    fn sign(&self, signer: Option<&CheckpointSigner>) -> Option<Checkpoint> {
        signer.and_then(|signer| signer(self.seq, &self.hash))
    }
}
