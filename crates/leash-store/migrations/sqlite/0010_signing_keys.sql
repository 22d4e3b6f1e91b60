-- Token-signing keys and their rotation (API §3). The first is the one in the settings
-- (`token_signing_key`), copied here at start. `sealed` is the private key under the master key
-- (context `token_signing_key`); `public_jwk` is its public half, kept for ever so that old
-- checkpoints verify without the master key. A key signs from `signs_from` until the next
-- key's `signs_from`; it is published (and accepted) until `published_until` (none: still).
CREATE TABLE signing_keys (
    kid              TEXT PRIMARY KEY NOT NULL,
    sealed           BLOB NOT NULL,
    public_jwk       TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    signs_from       INTEGER NOT NULL,
    published_until  INTEGER
);
