-- The PostgreSQL schema: the same tables and columns as the SQLite migrations (TEXT, 64-bit
-- integers, bytes; times in Unix seconds; lists as JSON arrays of strings), so that both
-- backends map rows with one code path. Several nodes share it.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    key_digest  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    jwks        TEXT NOT NULL,
    disabled    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);

CREATE TABLE grants (
    id                 TEXT PRIMARY KEY,
    handle_digest      TEXT NOT NULL UNIQUE,
    subject            TEXT NOT NULL REFERENCES users(id),
    agent              TEXT NOT NULL REFERENCES agents(id),
    purpose            TEXT NOT NULL,
    upstreams          TEXT NOT NULL,
    actions            TEXT NOT NULL,
    approval_required  TEXT NOT NULL,
    single_use         TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT NOT NULL,
    max_requests       BIGINT,
    requests_used      BIGINT NOT NULL DEFAULT 0,
    status             TEXT NOT NULL CHECK (status IN ('active', 'completed', 'revoked', 'expired')),
    ended_at           BIGINT,
    end_reason         TEXT
);
CREATE INDEX grants_subject ON grants(subject);
CREATE INDEX grants_agent ON grants(agent, status);

-- Consumed DPoP proof and client assertion jtis of every node: a value used on one node is
-- refused on all.
CREATE TABLE replay (
    key    BYTEA PRIMARY KEY,
    until  BIGINT NOT NULL
);

CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY,
    grant_id    TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE vault (
    subject      TEXT NOT NULL REFERENCES users(id),
    upstream     TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('bearer', 'cookie', 'header')),
    header_name  TEXT,
    sealed       BYTEA NOT NULL,
    expires_at   BIGINT,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (subject, upstream)
);

CREATE TABLE approvals (
    id            TEXT PRIMARY KEY,
    grant_id      TEXT NOT NULL REFERENCES grants(id),
    subject       TEXT NOT NULL REFERENCES users(id),
    agent         TEXT NOT NULL,
    action        TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    method        TEXT NOT NULL,
    path          TEXT NOT NULL,
    query         TEXT,
    body_sha256   TEXT NOT NULL,
    body_size     BIGINT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'used')),
    requested_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    decided_at    BIGINT,
    approver      TEXT,
    used_at       BIGINT
);
CREATE INDEX approvals_subject ON approvals(subject, requested_at);
CREATE INDEX approvals_grant ON approvals(grant_id);

CREATE TABLE audit_events (
    seq       BIGINT PRIMARY KEY,
    kind      TEXT NOT NULL,
    subject   TEXT,
    actor     TEXT,
    grant_id  TEXT,
    action    TEXT,
    decision  TEXT,
    at        BIGINT NOT NULL,
    hash      TEXT NOT NULL,
    line      TEXT NOT NULL
);
CREATE INDEX audit_events_grant ON audit_events(grant_id, seq);
CREATE INDEX audit_events_subject ON audit_events(subject, seq);

CREATE TABLE audit_checkpoints (
    seq   BIGINT PRIMARY KEY,
    hash  TEXT NOT NULL,
    ts    TEXT NOT NULL,
    kid   TEXT NOT NULL,
    sig   TEXT NOT NULL
);

-- The end of the one audit chain all nodes append to. A node's commit locks this row first
-- (SELECT … FOR UPDATE), so appends from several nodes are serialised into one chain in commit
-- order.
CREATE TABLE audit_head (
    id            SMALLINT PRIMARY KEY CHECK (id = 1),
    seq           BIGINT NOT NULL,
    hash          TEXT NOT NULL,
    checkpointed  BIGINT NOT NULL
);
INSERT INTO audit_head (id, seq, hash, checkpointed)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0);
