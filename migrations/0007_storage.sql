-- Attachments are stored once (SPEC §12): the files named by SHA-256 hold their bytes,
-- and the raw mail in inbound_raw no longer repeats them. `spans` (JSON) says where
-- the encoded attachment bodies were cut out of `raw` and how to re-encode them from
-- the files; NULL means `raw` is the message exactly as received.
ALTER TABLE inbound_raw ADD COLUMN spans TEXT;

-- [storage] keep_raw: when the raw mail of a closed ticket was dropped (the ticket's
-- text, thread and attachments stay).
ALTER TABLE inbound ADD COLUMN raw_dropped_at TEXT;
ALTER TABLE outbox ADD COLUMN raw_dropped_at TEXT;
CREATE INDEX tickets_closed_at ON tickets (closed_at) WHERE status = 'closed';
CREATE INDEX inbound_ticket ON inbound (ticket);
