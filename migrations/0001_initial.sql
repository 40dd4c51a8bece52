-- The initial schema. Released migrations are never edited: add 0002_... instead.
-- Times are ISO 8601 UTC text ("2026-11-25T15:29:58.123456+00:00").

-- Key/value settings kept with the data (the HMAC key for our Message-IDs).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per accepted SMTP transaction, written before the 250.
-- state: queued -> processing -> done | failed
CREATE TABLE inbound (
    id           INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL,            -- "<...>" as sent, "" when absent
    dedup_key    TEXT NOT NULL UNIQUE,     -- sha256 of Message-ID + content minus trace headers
    sha256       TEXT NOT NULL,            -- of the raw bytes as received
    size         INTEGER NOT NULL,
    peer         TEXT NOT NULL,
    mail_from    TEXT NOT NULL,            -- "" for the null reverse-path
    rcpt_tos     TEXT NOT NULL,            -- JSON list
    received_at  TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'queued',
    attempts     INTEGER NOT NULL DEFAULT 0,
    outcome      TEXT,
    ticket       INTEGER,
    error        TEXT,
    report       TEXT,                     -- JSON of the parsed Report (without attachment bytes)
    processed_at TEXT
);
CREATE INDEX inbound_state ON inbound (state, id);
CREATE INDEX inbound_message_id ON inbound (message_id);
CREATE INDEX inbound_outcome ON inbound (outcome);

-- The raw bytes apart from the row: SQLite rewrites a whole row on UPDATE.
CREATE TABLE inbound_raw (
    id  INTEGER PRIMARY KEY REFERENCES inbound (id),
    raw BLOB NOT NULL
);

CREATE TABLE tickets (
    number                      INTEGER PRIMARY KEY CHECK (number BETWEEN 0 AND 999999),
    status                      TEXT NOT NULL,
    subject                     TEXT NOT NULL,
    reporter_name               TEXT,
    reporter_email              TEXT NOT NULL,
    reporter_phone              TEXT,
    install_address             TEXT,
    description                 TEXT,
    serial_number               TEXT,
    commcell_id                 TEXT,
    missing                     TEXT NOT NULL DEFAULT '[]',  -- JSON list
    participants                TEXT NOT NULL DEFAULT '[]',  -- JSON list: From/To/Cc of the first message
    linked_to                   INTEGER REFERENCES tickets (number),
    phone_confirmation_required INTEGER NOT NULL DEFAULT 0,
    phone_confirmed             INTEGER NOT NULL DEFAULT 0,
    phone_confirmed_at          TEXT,
    rating                      INTEGER,
    reporter_bounced            INTEGER NOT NULL DEFAULT 0,
    resolved_at                 TEXT,
    closed_at                   TEXT,
    closed_reason               TEXT,
    created_at                  TEXT NOT NULL,
    updated_at                  TEXT NOT NULL
);
CREATE INDEX tickets_status ON tickets (status);

-- Every message in and out of a ticket; also the thread index for In-Reply-To matching.
CREATE TABLE ticket_messages (
    id         INTEGER PRIMARY KEY,
    ticket     INTEGER NOT NULL REFERENCES tickets (number),
    direction  TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    inbound_id INTEGER REFERENCES inbound (id),
    outbox_id  INTEGER REFERENCES outbox (id),
    from_addr  TEXT NOT NULL,
    to_addrs   TEXT NOT NULL,              -- JSON list
    subject    TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body       TEXT NOT NULL DEFAULT '',
    date       TEXT NOT NULL
);
CREATE INDEX ticket_messages_ticket ON ticket_messages (ticket, id);
CREATE INDEX ticket_messages_message_id ON ticket_messages (message_id);

CREATE TABLE ticket_history (
    id          INTEGER PRIMARY KEY,
    ticket      INTEGER NOT NULL REFERENCES tickets (number),
    from_status TEXT,
    to_status   TEXT NOT NULL,
    actor       TEXT NOT NULL,             -- "gateway", "staff", "customer", "rating_window"
    note        TEXT,
    at          TEXT NOT NULL
);
CREATE INDEX ticket_history_ticket ON ticket_history (ticket, id);

-- Attachment bytes live in files named by a generated id, never by the sender's name.
CREATE TABLE attachments (
    id           TEXT PRIMARY KEY,
    ticket       INTEGER REFERENCES tickets (number),
    inbound_id   INTEGER REFERENCES inbound (id),
    filename     TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    is_log       INTEGER NOT NULL
);
CREATE INDEX attachments_ticket ON attachments (ticket);
CREATE INDEX attachments_inbound ON attachments (inbound_id);

-- Messages not appended to the ticket they name: the sender is not authorised for it.
CREATE TABLE held (
    id          INTEGER PRIMARY KEY,
    inbound_id  INTEGER NOT NULL UNIQUE REFERENCES inbound (id),
    ticket      INTEGER,                   -- the ticket it named (may not exist)
    sender      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'held', -- held | released | dropped
    created_at  TEXT NOT NULL,
    decided_at  TEXT
);
CREATE INDEX held_status ON held (status);

-- status: pending -> sending -> sent | failed | bounced
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    ticket          INTEGER,
    inbound_id      INTEGER,               -- the message that caused it, if any
    kind            TEXT NOT NULL,          -- template event
    message_id      TEXT NOT NULL UNIQUE,
    mail_from       TEXT NOT NULL,
    rcpt_to         TEXT NOT NULL,
    subject         TEXT NOT NULL,
    auto            INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    queued_at       TEXT NOT NULL,          -- start of the current retry series (give_up_after)
    created_at      TEXT NOT NULL,
    sent_at         TEXT
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX outbox_rcpt ON outbox (rcpt_to, auto, created_at);
CREATE INDEX outbox_inbound ON outbox (inbound_id);

CREATE TABLE outbox_raw (
    id  INTEGER PRIMARY KEY REFERENCES outbox (id),
    raw BLOB NOT NULL
);

CREATE TABLE contracts (
    device_id    TEXT PRIMARY KEY COLLATE NOCASE,
    customer     TEXT NOT NULL,
    repair_hours INTEGER NOT NULL,
    imported_at  TEXT NOT NULL
);
