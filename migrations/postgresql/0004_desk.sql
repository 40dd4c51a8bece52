-- PostgreSQL dialect of ../0004_desk.sql (read it for what each column is for).

ALTER TABLE inbound ADD COLUMN auth TEXT;
ALTER TABLE inbound ADD COLUMN auth_reason TEXT;

ALTER TABLE tickets ADD COLUMN assignee TEXT;
ALTER TABLE tickets ADD COLUMN dispatcher TEXT;
ALTER TABLE tickets ADD COLUMN contact_email TEXT;
ALTER TABLE tickets ADD COLUMN rating_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tickets ADD COLUMN last_customer_at TEXT;
ALTER TABLE tickets ADD COLUMN last_staff_at TEXT;
CREATE INDEX tickets_assignee ON tickets (assignee);

ALTER TABLE ticket_messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'customer';
ALTER TABLE ticket_messages ADD COLUMN auth TEXT;
ALTER TABLE ticket_messages ADD COLUMN author TEXT;
UPDATE ticket_messages SET kind = CASE
    WHEN (SELECT kind FROM outbox WHERE outbox.id = ticket_messages.outbox_id) = 'staff_reply'
    THEN 'staff_reply' ELSE 'notice' END
  WHERE direction = 'out';

ALTER TABLE held ADD COLUMN announced_at TEXT;

ALTER TABLE outbox ADD COLUMN rcpt_key TEXT NOT NULL DEFAULT '';
UPDATE outbox SET rcpt_key = lower(rcpt_to);
CREATE INDEX outbox_rcpt_key ON outbox (rcpt_key, auto, created_at);
