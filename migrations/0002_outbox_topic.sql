-- What an answer about no particular ticket was about (the number a token named, if
-- any): guidance and held notices go at most once a day per address, kind and topic,
-- so a customer's helpdesk robot cannot keep a loop going, while two different
-- numbers still get two (identical, content-free) answers.
ALTER TABLE outbox ADD COLUMN topic TEXT NOT NULL DEFAULT '';
CREATE INDEX outbox_topic ON outbox (rcpt_to, kind, topic, created_at);
