-- The automatic-answer cap (max_auto_replies_per_hour) counts, per address, the
-- automatic answers to inbound mail of the last hour, and only up to the cap
-- (store.outbox.auto_replies_since). An index of exactly those rows: the count reads
-- at most `cap` entries, however many notices staff caused to the same address.
CREATE INDEX outbox_answers ON outbox (rcpt_key, created_at)
    WHERE auto = 1 AND inbound_id IS NOT NULL;
DROP INDEX outbox_rcpt_key;
