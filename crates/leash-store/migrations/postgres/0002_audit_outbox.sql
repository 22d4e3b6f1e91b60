-- Audit events of management changes (grants, agents, users, approvals, vault, revocations),
-- written in the change's own transaction and moved into the chain, under the head's lock,
-- right after: a change is never stored without its event, even if the node dies in between.
CREATE TABLE audit_outbox (
    id     BIGSERIAL PRIMARY KEY,
    event  TEXT NOT NULL
);
