-- The request headers an approval binds and shows the human (API §7): those forwarded, as
-- [name, value] pairs for display, and the SHA-256 of their exact bytes for the match. An
-- approval stored before this has no digest and matches no retry (fail closed).
ALTER TABLE approvals ADD COLUMN headers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE approvals ADD COLUMN headers_sha256 TEXT NOT NULL DEFAULT '';

-- The body shown to the human (API §7): kept sealed under the master key while the approval is
-- pending, for bodies up to approval_preview_bytes without a Content-Encoding; deleted once it
-- is decided or has expired. `previewed` says whether one was kept.
ALTER TABLE approvals ADD COLUMN previewed BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE approval_previews (
    id      TEXT PRIMARY KEY REFERENCES approvals(id),
    sealed  BYTEA NOT NULL
);
