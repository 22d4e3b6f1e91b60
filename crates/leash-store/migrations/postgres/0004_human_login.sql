-- Human login (API §13). A human created by an OIDC login is keyed by the IdP's (iss, sub),
-- never by name or email; their key_digest is a digest of a random key nobody was given.
-- A disabled human's sessions and API key stop working at once.
ALTER TABLE users ADD COLUMN oidc_iss TEXT;
ALTER TABLE users ADD COLUMN oidc_sub TEXT;
ALTER TABLE users ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX users_by_oidc_subject ON users (oidc_iss, oidc_sub);

-- Browser sessions, by the SHA-256 of their random id (the cookie's value is never stored).
-- `admin` is what the ID token's groups said at login. Absolute and idle ends are checked on
-- every use; expired rows are swept by the pruner.
CREATE TABLE sessions (
    id_digest   TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id),
    admin       BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);

-- Logins under way: what `/login` bound to the browser's login cookie (by its digest), taken
-- exactly once by the callback.
CREATE TABLE logins (
    id_digest    TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    nonce        TEXT NOT NULL,
    verifier     TEXT NOT NULL,
    return_to    TEXT NOT NULL,
    expires_at   BIGINT NOT NULL
);
