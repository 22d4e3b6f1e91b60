-- Consumed one-time values, kept in order of `until` and then of arrival. The key is no longer
-- the table's primary key: every consumption landed on a random page of that B-tree, so each
-- request rewrote a page of its own in the write-ahead log (under gateway load the log then
-- restarted every second, each restart holding every request up). Now consumptions land at the
-- end of the tree, a page or two per commit, and pruning deletes from its start. The writer
-- checks keys against its copy of this table in memory, loaded at start (`ReplaySet` in
-- sqlite.rs); `seq` only orders the rows that share an `until`.
CREATE TABLE replay_in_order (
    until  INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    key    BLOB NOT NULL,
    PRIMARY KEY (until, seq)
) WITHOUT ROWID;
INSERT INTO replay_in_order (until, seq, key)
    SELECT until, row_number() OVER (ORDER BY until), key FROM replay;
DROP TABLE replay;
ALTER TABLE replay_in_order RENAME TO replay;
