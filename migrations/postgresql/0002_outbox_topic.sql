-- PostgreSQL dialect of ../0002_outbox_topic.sql (read it for why).
ALTER TABLE outbox ADD COLUMN topic TEXT NOT NULL DEFAULT '';
CREATE INDEX outbox_topic ON outbox (rcpt_to, kind, topic, created_at);
