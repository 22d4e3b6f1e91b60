-- The request headers an approval binds and shows the human (API §7): those forwarded, as
-- [name, value] pairs for display, and the SHA-256 of their exact bytes for the match. An
-- approval stored before this has no digest and matches no retry (fail closed).
ALTER TABLE approvals ADD COLUMN headers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE approvals ADD COLUMN headers_sha256 TEXT NOT NULL DEFAULT '';
