-- The forward proxy's cookie jars (API §16): per grant and upstream, the cookies the upstream
-- set, sealed under the master key (context `cookie jar <grant> <upstream>`). Never sent to the
-- browser, never written to the vault; deleted when the grant ends (at once when it is
-- completed or revoked, by the pruner otherwise).
CREATE TABLE cookie_jars (
    grant_id    TEXT NOT NULL,
    upstream    TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (grant_id, upstream)
);
