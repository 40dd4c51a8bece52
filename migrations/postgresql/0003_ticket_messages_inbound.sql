-- PostgreSQL dialect of ../0003_ticket_messages_inbound.sql (read it for why).
CREATE INDEX ticket_messages_inbound ON ticket_messages (inbound_id);
