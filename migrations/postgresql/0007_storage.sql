-- PostgreSQL dialect of ../0007_storage.sql (read it for why).
ALTER TABLE inbound_raw ADD COLUMN spans TEXT;

ALTER TABLE inbound ADD COLUMN raw_dropped_at TEXT;
ALTER TABLE outbox ADD COLUMN raw_dropped_at TEXT;
CREATE INDEX tickets_closed_at ON tickets (closed_at) WHERE status = 'closed';
CREATE INDEX inbound_ticket ON inbound (ticket);
