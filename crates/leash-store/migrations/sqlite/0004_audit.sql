-- The audit chain (API §8). `line` is the event exactly as hashed and exported (its JCS form);
-- the other columns copy members of it for filtering and the access review.
CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY NOT NULL,
    kind      TEXT NOT NULL,
    subject   TEXT,
    actor     TEXT,
    grant_id  TEXT,
    action    TEXT,
    decision  TEXT,
    at        INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    line      TEXT NOT NULL
);
CREATE INDEX audit_events_grant ON audit_events(grant_id, seq);
CREATE INDEX audit_events_subject ON audit_events(subject, seq);

-- Signed statements that the chain had `hash` at `seq`.
CREATE TABLE audit_checkpoints (
    seq   INTEGER PRIMARY KEY NOT NULL,
    hash  TEXT NOT NULL,
    ts    TEXT NOT NULL,
    kid   TEXT NOT NULL,
    sig   TEXT NOT NULL
);
