-- Consumed one-time values in the order they arrive. The key is no longer the table's primary
-- key: every consumption landed on a random page of that B-tree, so each request rewrote a page
-- of its own in the write-ahead log (about half of the log's volume under gateway load, and the
-- log restarting every second). The writer checks keys against its copy of this table in
-- memory, loaded at start (see `ReplaySet` in sqlite.rs); rows are appended, and pruning walks
-- the index on `until` from its start.
CREATE TABLE replay_in_order (
    key    BLOB NOT NULL,
    until  INTEGER NOT NULL
);
INSERT INTO replay_in_order (key, until) SELECT key, until FROM replay ORDER BY until;
DROP TABLE replay;
ALTER TABLE replay_in_order RENAME TO replay;
CREATE INDEX replay_until ON replay(until);
