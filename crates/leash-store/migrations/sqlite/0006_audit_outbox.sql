-- Audit events of management changes (grants, agents, users, approvals, vault, revocations),
-- written in the change's own transaction and moved into the chain by its one appender right
-- after: a change is never stored without its event, even if the process dies in between.
CREATE TABLE audit_outbox (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    event  TEXT NOT NULL
);
