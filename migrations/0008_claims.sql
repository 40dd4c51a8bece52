-- Processing runs in worker processes ([processing] workers). A message in hand is
-- claimed by one of them: `claimed_by` is the worker's slot (0, 1, ...; NULL for
-- processing inside the SMTP process or the CLI), so that a worker restarted after a
-- crash takes back its own unfinished message and never one another worker holds.
ALTER TABLE inbound ADD COLUMN claimed_by INTEGER;
CREATE INDEX inbound_processing ON inbound (claimed_by) WHERE state = 'processing';
