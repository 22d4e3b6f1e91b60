-- OAuth connections (API §17). A vault entry of kind 'oauth' holds the upstream's access and
-- refresh tokens, sealed. `status` is 'reconnect' once a refresh failed for good (the human must
-- connect again). `version` grows with every write of the row, so a refresh result is stored
-- only over the row it was made from. `refresh_lease` is the Unix time until which one node
-- (the one whose conditional update set it: the row lock decides between nodes) refreshes the
-- tokens; the others wait or use the current access token. `retry_at`: after a refresh that
-- failed for a passing reason, no new try before then (a back-off shared by the cluster, so
-- waiting requests fail at once).
ALTER TABLE vault DROP CONSTRAINT vault_kind_check;
ALTER TABLE vault ADD CONSTRAINT vault_kind_check
    CHECK (kind IN ('bearer', 'cookie', 'header', 'oauth'));
ALTER TABLE vault ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'reconnect'));
ALTER TABLE vault ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vault ADD COLUMN refresh_lease BIGINT;
ALTER TABLE vault ADD COLUMN retry_at BIGINT;

-- Connections under way: what `POST /v1/vault/{upstream}/connect` bound to its `state` (by its
-- digest), taken exactly once by the callback. `session_digest` is the browser session that
-- started it, when one did.
CREATE TABLE oauth_connects (
    state_digest    TEXT PRIMARY KEY,
    subject         TEXT NOT NULL REFERENCES users(id),
    upstream        TEXT NOT NULL,
    session_digest  TEXT,
    verifier        TEXT NOT NULL,
    expires_at      BIGINT NOT NULL
);
