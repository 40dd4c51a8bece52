-- The engineers' desk (SPEC §4, §9) and sender verdicts (SPEC §10).

-- Sender verdict of each inbound message: pass | fail | none, with its reason; NULL
-- until processing computed it.
ALTER TABLE inbound ADD COLUMN auth TEXT;
ALTER TABLE inbound ADD COLUMN auth_reason TEXT;

-- Who works the ticket (a staff e-mail address); staff copies go there, else to notify.
ALTER TABLE tickets ADD COLUMN assignee TEXT;
-- The sender of the first message when a report names another reporter in the
-- sender's own domain (a dispatcher): gets a copy (Cc) of every mail of the ticket.
ALTER TABLE tickets ADD COLUMN dispatcher TEXT;
-- An address the report's body named in another domain: a contact for staff only,
-- never mailed (otherwise anyone could make crm@ mail any address).
ALTER TABLE tickets ADD COLUMN contact_email TEXT;
-- The short request for a rating 1-5 goes once per ticket (a reply on resolved
-- without a readable rating).
ALTER TABLE tickets ADD COLUMN rating_requested INTEGER NOT NULL DEFAULT 0;
-- When the customer last wrote and when staff last answered: `tickets list --waiting`.
ALTER TABLE tickets ADD COLUMN last_customer_at TEXT;
ALTER TABLE tickets ADD COLUMN last_staff_at TEXT;
CREATE INDEX tickets_assignee ON tickets (assignee);

-- What a thread entry is: customer | staff_reply | staff_note | notice; and for
-- inbound entries the sender verdict at the time.
ALTER TABLE ticket_messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'customer';
ALTER TABLE ticket_messages ADD COLUMN auth TEXT;
ALTER TABLE ticket_messages ADD COLUMN author TEXT;  -- staff address or login for staff entries
UPDATE ticket_messages SET kind = CASE
    WHEN (SELECT kind FROM outbox WHERE outbox.id = ticket_messages.outbox_id) = 'staff_reply'
    THEN 'staff_reply' ELSE 'notice' END
  WHERE direction = 'out';

-- Held mail announced to notify in an hourly digest: when it was announced.
ALTER TABLE held ADD COLUMN announced_at TEXT;

-- The automatic-answer cap counts per recipient as well as per sender, compared
-- lower-case without a +tag ("victim+1@" and "victim+2@" are one recipient).
ALTER TABLE outbox ADD COLUMN rcpt_key TEXT NOT NULL DEFAULT '';
UPDATE outbox SET rcpt_key = lower(rcpt_to);
CREATE INDEX outbox_rcpt_key ON outbox (rcpt_key, auto, created_at);
