-- The engineers' web desk (SPEC §11): who may sign in, their sessions, and the
-- sign-in attempts that rate-limit password guessing.

-- Engineers who may sign in (`s4e-gateway users add`). Only an argon2 hash of the
-- password is kept; `email` is the staff address recorded as the actor of their actions.
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    email         TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

-- A signed-in browser. The cookie carries a random token; only its SHA-256 is kept
-- here, so a copy of the database does not sign anyone in.
CREATE TABLE web_sessions (
    token_hash TEXT PRIMARY KEY,
    user       TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    csrf       TEXT NOT NULL,               -- the form token of this session
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX web_sessions_user ON web_sessions (user);

-- Failed sign-ins, by user name and by client address, for the rate limit.
CREATE TABLE login_attempts (
    id       INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    client   TEXT NOT NULL,
    at       TEXT NOT NULL
);
CREATE INDEX login_attempts_username ON login_attempts (username, at);
CREATE INDEX login_attempts_client ON login_attempts (client, at);
