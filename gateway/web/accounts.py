"""Who may use the web desk: users with argon2 password hashes, their sessions, and
the failed sign-ins that rate-limit guessing (tables of migrations/0006_web.sql)."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiosqlite
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway import store
from gateway.errors import GatewayError, NotFoundError
from gateway.store import Tx

MIN_PASSWORD = 10
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HASHER = PasswordHasher()
# Verified against when the user name is unknown, so both cases take equally long.
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(16))


@dataclass(frozen=True, slots=True)
class User:
    name: str
    email: str
    created_at: str


@dataclass(frozen=True, slots=True)
class Session:
    user: User
    csrf: str
    expires_at: str


def check_user_name(name: str) -> str:
    if not _NAME.match(name):
        raise GatewayError(f"not a user name: {name!r} (lower-case letters, digits, '.', '_', "
                           "'-'; up to 64 characters)")
    return name


def check_email(email: str, staff_domains: tuple[str, ...]) -> str:
    """A desk user acts as a staff address: that is who the history names."""
    address = email.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address:
        raise GatewayError(f"not an e-mail address: {email!r}")
    if domain not in staff_domains:
        raise GatewayError(f"{email!r} is not a staff address (staff domains: "
                           f"{', '.join(staff_domains)})")
    return address


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise GatewayError(f"the password is too short (at least {MIN_PASSWORD} characters)")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(check_password(password))


def password_matches(password_hash: str | None, password: str) -> bool:
    """Slow on purpose (argon2); call it off the event loop."""
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


# --- users ------------------------------------------------------------------------

def _user(row: aiosqlite.Row) -> User:
    return User(row["name"], row["email"], row["created_at"])


async def add_user(conn: aiosqlite.Connection, name: str, email: str, password_hash: str,
                   now: datetime) -> User:
    async with Tx(conn):
        rows = await conn.execute_fetchall(
            "INSERT INTO users (name, email, password_hash, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING RETURNING name", (name, email, password_hash,
                                                               store.iso(now)))
    if not rows:
        raise GatewayError(f"user {name!r} exists already (remove it first to replace it)")
    return User(name, email, store.iso(now))


async def list_users(conn: aiosqlite.Connection) -> list[User]:
    return [_user(r) for r in await conn.execute_fetchall(
        "SELECT name, email, created_at FROM users ORDER BY name")]


async def get_user(conn: aiosqlite.Connection, name: str) -> User | None:
    rows = list(await conn.execute_fetchall(
        "SELECT name, email, created_at FROM users WHERE name = ?", (name,)))
    return _user(rows[0]) if rows else None


async def password_hash_of(conn: aiosqlite.Connection, name: str) -> str | None:
    rows = list(await conn.execute_fetchall("SELECT password_hash FROM users WHERE name = ?", (name,)))
    return rows[0][0] if rows else None


async def remove_user(conn: aiosqlite.Connection, name: str) -> int:
    """Remove a user and sign out every browser of theirs; returns how many sessions."""
    async with Tx(conn):
        # "user" quoted: a reserved word in PostgreSQL (a bare user is CURRENT_USER)
        cursor = await conn.execute('DELETE FROM web_sessions WHERE "user" = ?', (name,))
        ended = cursor.rowcount
        cursor = await conn.execute("DELETE FROM users WHERE name = ?", (name,))
        if cursor.rowcount != 1:
            raise NotFoundError(f"user {name!r} not found")
    return ended


# --- sessions ---------------------------------------------------------------------

def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


async def start_session(conn: aiosqlite.Connection, user: User, lifetime: int,
                        now: datetime) -> str:
    """A new session for `user`; returns the token for the cookie."""
    token = secrets.token_urlsafe(32)
    async with Tx(conn):
        await conn.execute("DELETE FROM web_sessions WHERE expires_at <= ?", (store.iso(now),))
        await conn.execute(
            'INSERT INTO web_sessions (token_hash, "user", csrf, created_at, expires_at)'
            " VALUES (?, ?, ?, ?, ?)",
            (_digest(token), user.name, secrets.token_urlsafe(32), store.iso(now),
             store.iso(now + timedelta(seconds=lifetime))))
    return token


async def find_session(conn: aiosqlite.Connection, token: str, now: datetime) -> Session | None:
    """The live session of this cookie token (a read: no write lock needed)."""
    if not token or len(token) > 200:
        return None
    rows = list(await conn.execute_fetchall(
        "SELECT s.csrf, s.expires_at, u.name, u.email, u.created_at FROM web_sessions s"
        " JOIN users u ON u.name = s.user WHERE s.token_hash = ? AND s.expires_at > ?",
        (_digest(token), store.iso(now))))
    if not rows:
        return None
    row = rows[0]
    return Session(_user(row), row["csrf"], row["expires_at"])


async def end_session(conn: aiosqlite.Connection, token: str) -> None:
    await conn.execute("DELETE FROM web_sessions WHERE token_hash = ?", (_digest(token),))


# --- sign-in attempts -----------------------------------------------------------------

async def record_failure(conn: aiosqlite.Connection, username: str, client: str,
                         now: datetime) -> None:
    await conn.execute("INSERT INTO login_attempts (username, client, at) VALUES (?, ?, ?)",
                       (username[:200], client, store.iso(now)))


async def sign_in_blocked(conn: aiosqlite.Connection, username: str, client: str, *,
                          limit: int, window: int, now: datetime) -> bool:
    """Too many failures for this user name (or 4 x as many from this client) lately."""
    since = store.iso(now - timedelta(seconds=window))
    rows = list(await conn.execute_fetchall(
        "SELECT (SELECT count(*) FROM login_attempts WHERE username = ? AND at > ?),"
        " (SELECT count(*) FROM login_attempts WHERE client = ? AND at > ?)",
        (username[:200], since, client, since)))
    by_name, by_client = rows[0]
    return by_name >= limit or by_client >= 4 * limit


async def forget_failures(conn: aiosqlite.Connection, username: str, now: datetime,
                          window: int) -> None:
    """After a good sign-in: the user's own failures no longer count; old rows go."""
    since = store.iso(now - timedelta(seconds=window))
    await conn.execute("DELETE FROM login_attempts WHERE username = ? OR at <= ?",
                       (username[:200], since))
