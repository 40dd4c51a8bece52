-- Every message starts by asking whether it is already in a ticket (reprocessing is
-- idempotent): without this index that question read the whole thread table, and
-- processing got slower with every ticket ever opened.
CREATE INDEX ticket_messages_inbound ON ticket_messages (inbound_id);
