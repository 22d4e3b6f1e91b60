-- Foundation: users, agents, grants, replay cache, revoked tokens, server settings.
-- Times are Unix seconds; lists are JSON arrays of strings.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);

CREATE TABLE users (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    key_digest  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    jwks        TEXT NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE TABLE grants (
    id                 TEXT PRIMARY KEY NOT NULL,
    handle_digest      TEXT NOT NULL UNIQUE,
    subject            TEXT NOT NULL REFERENCES users(id),
    agent              TEXT NOT NULL REFERENCES agents(id),
    purpose            TEXT NOT NULL,
    upstreams          TEXT NOT NULL,
    actions            TEXT NOT NULL,
    approval_required  TEXT NOT NULL,
    single_use         TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    expires_at         INTEGER NOT NULL,
    max_requests       INTEGER,
    requests_used      INTEGER NOT NULL DEFAULT 0,
    status             TEXT NOT NULL CHECK (status IN ('active', 'completed', 'revoked', 'expired')),
    ended_at           INTEGER,
    end_reason         TEXT
);
CREATE INDEX grants_subject ON grants(subject);
CREATE INDEX grants_agent ON grants(agent, status);

-- One row per consumed DPoP proof or client assertion jti: the key is SHA-256 of its kind,
-- issuer and jti. No index on `until`: pruning scans once a minute, while an index would double
-- the pages every consumption writes.
CREATE TABLE replay (
    key    BLOB PRIMARY KEY NOT NULL,
    until  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY NOT NULL,
    grant_id    TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
