-- Several gateways on one PostgreSQL database (README "PostgreSQL"): a claim names
-- the node that holds it ([cluster] node) and lasts until `lease_until` (ISO UTC,
-- renewed while the node works on it); after that another node may take it over.
-- With SQLite there is one node: the columns stay empty.
ALTER TABLE inbound ADD COLUMN claimed_node TEXT;
ALTER TABLE inbound ADD COLUMN lease_until TEXT;
ALTER TABLE outbox ADD COLUMN claimed_node TEXT;
ALTER TABLE outbox ADD COLUMN lease_until TEXT;
