-- OAuth connections (API §17). A vault entry of kind 'oauth' holds the upstream's access and
-- refresh tokens, sealed. `status` is 'reconnect' once a refresh failed for good (the human must
-- connect again). `version` grows with every write of the row, so a refresh result is stored
-- only over the row it was made from. `refresh_lease` is the Unix time until which one node
-- (the one whose conditional update set it) refreshes the tokens; the others wait or use the
-- current access token. `retry_at`: after a refresh that failed for a passing reason, no new
-- try before then (a back-off shared by the cluster, so waiting requests fail at once). SQLite cannot change a CHECK constraint in place: the table is rebuilt.
CREATE TABLE vault_v2 (
    subject        TEXT NOT NULL REFERENCES users(id),
    upstream       TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('bearer', 'cookie', 'header', 'oauth')),
    header_name    TEXT,
    sealed         BLOB NOT NULL,
    expires_at     INTEGER,
    created_at     INTEGER NOT NULL,
    status         TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'reconnect')),
    version        INTEGER NOT NULL DEFAULT 0,
    refresh_lease  INTEGER,
    retry_at       INTEGER,
    PRIMARY KEY (subject, upstream)
) WITHOUT ROWID;
INSERT INTO vault_v2 (subject, upstream, kind, header_name, sealed, expires_at, created_at)
    SELECT subject, upstream, kind, header_name, sealed, expires_at, created_at FROM vault;
DROP TABLE vault;
ALTER TABLE vault_v2 RENAME TO vault;

-- Connections under way: what `POST /v1/vault/{upstream}/connect` bound to its `state` (by its
-- digest), taken exactly once by the callback. `session_digest` is the browser session that
-- started it, when one did.
CREATE TABLE oauth_connects (
    state_digest    TEXT PRIMARY KEY NOT NULL,
    subject         TEXT NOT NULL REFERENCES users(id),
    upstream        TEXT NOT NULL,
    session_digest  TEXT,
    verifier        TEXT NOT NULL,
    expires_at      INTEGER NOT NULL
);
