-- Gateway: the humans' upstream credentials, sealed with the master key.
CREATE TABLE vault (
    subject      TEXT NOT NULL REFERENCES users(id),
    upstream     TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('bearer', 'cookie', 'header')),
    header_name  TEXT,
    sealed       BLOB NOT NULL,
    expires_at   INTEGER,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (subject, upstream)
) WITHOUT ROWID;
