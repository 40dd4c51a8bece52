-- Lists that scale (#17): every list is read in keyset pages, `WHERE key > ? ORDER BY
-- key LIMIT ?`, and each filter a list takes has an index that starts with the
-- filter and ends with the list's order, so a page reads only its own rows
-- (SQLite's secondary indexes carry the rowid; PostgreSQL's do not, hence the
-- explicit id columns). The single-column indexes these replace go.

-- inbox list --outcome O
CREATE INDEX inbound_outcome_id ON inbound (outcome, id);
DROP INDEX inbound_outcome;

-- tickets list, oldest first: (created_at, number); --status S; --assignee E
CREATE INDEX tickets_created ON tickets (created_at, number);
CREATE INDEX tickets_status_created ON tickets (status, created_at, number);
DROP INDEX tickets_status;
CREATE INDEX tickets_assignee_created ON tickets (lower(assignee), created_at, number);

-- held list (status held, or --all)
CREATE INDEX held_status_id ON held (status, id);
DROP INDEX held_status;

-- outbox list --status S (outbox_due serves the mailer's claims)
CREATE INDEX outbox_status_id ON outbox (status, id);
