-- Step-up approvals (API §7): each bound to one exact request of one agent under one grant.
-- `expired` is not stored: a pending or approved approval past `expires_at` reads as expired.
CREATE TABLE approvals (
    id            TEXT PRIMARY KEY NOT NULL,
    grant_id      TEXT NOT NULL REFERENCES grants(id),
    subject       TEXT NOT NULL REFERENCES users(id),
    agent         TEXT NOT NULL,
    action        TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    method        TEXT NOT NULL,
    path          TEXT NOT NULL,
    query         TEXT,
    body_sha256   TEXT NOT NULL,
    body_size     INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'used')),
    requested_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    decided_at    INTEGER,
    approver      TEXT,
    used_at       INTEGER
);
CREATE INDEX approvals_subject ON approvals(subject, requested_at);
CREATE INDEX approvals_grant ON approvals(grant_id);
