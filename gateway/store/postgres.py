"""PostgreSQL under the store's SQLite-shaped interface.

The store's functions are written against the part of aiosqlite's interface listed in
`PgConnection`; this module offers the same over an asyncio psycopg 3 connection, so one
store serves both databases (`[storage] database = "postgresql://..."`). What differs:

- Placeholders: the store writes `?`; they become `%s` here (and a literal `%` becomes
  `%%`), outside quoted strings and identifiers. Translations are cached.
- `BEGIN IMMEDIATE` (SQLite: take the one write lock now) becomes `BEGIN` plus a
  transaction-scoped advisory lock: a ticket change on one node never interleaves with
  one on another, as with SQLite's single writer. Intake and claims do not take it (they
  are safe on their own: a unique key, `FOR UPDATE SKIP LOCKED`).
- Errors come as sqlite3's exception classes (`OperationalError` for a lost server, a
  full disk or a lock timeout; `IntegrityError` for a constraint), so the one error
  vocabulary the gateway handles (`except sqlite3.Error`, `errors.expected_failure`)
  holds for both. The message names PostgreSQL.
- Rows answer `row["name"]`, `row[0]` and `keys()`, as `sqlite3.Row` does.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql
from psycopg.adapt import Dumper
from psycopg.pq import TransactionStatus
from psycopg.rows import RowMaker

from gateway.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

# pg_advisory_xact_lock key of the cluster-wide "write lock" (ticket changes).
WRITE_LOCK_KEY = 0x5345_0001
# pg_try_advisory_lock key of the timed jobs (one node at a time).
TIMED_JOBS_LOCK_KEY = 0x5345_0002
# The channels NOTIFY wakes: new inbound mail, new or due outgoing mail.
INBOUND_CHANNEL = "s4e_inbound"
OUTBOX_CHANNEL = "s4e_outbox"

_TOKENS = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|\?|%)""")


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s`, `%` as `%%`, outside quotes."""
    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        return token  # a quoted string, an identifier or a comment: as written
    text = _TOKENS.sub(one, sql)
    stripped = text.strip().rstrip(";").upper()
    if stripped in ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"):
        return _BEGIN_WRITE
    if stripped == "BEGIN DEFERRED":
        return "BEGIN"
    return text


_BEGIN_WRITE = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"


@functools.lru_cache(maxsize=2048)
def _verb(text: str) -> str:
    """The statement's first word, upper case (BEGIN, COMMIT, ROLLBACK...)."""
    return text.lstrip()[:8].upper()


class PgRow(tuple[Any, ...]):
    """A row by position or by column name, like sqlite3.Row."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key])
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[PgRow]:
    return type("PgRow", (PgRow,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def pg_row(cursor: Any) -> RowMaker[PgRow]:
    description = cursor.description
    if description is None:
        return lambda values: PgRow(values)
    cls = _row_class(tuple(column.name for column in description))
    return lambda values: cls(values)


class _BoolAsInt(Dumper):
    """Python booleans go in as 0/1: the schema keeps SQLite's INTEGER flags."""

    oid = psycopg.adapters.types["int4"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


def _as_sqlite_error(err: psycopg.Error) -> sqlite3.Error:
    """The sqlite3 class for `err`. The environment's failures (the server gone or
    restarting, a full disk, a lock wait over lock_timeout) are OperationalErrors whose
    text says "unavailable", which `processor.is_environmental` knows: the message
    stays queued and is tried again, never marked failed."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, psycopg.errors.IntegrityError):
        return sqlite3.IntegrityError(f"postgresql: {first}")
    if isinstance(err, psycopg.errors.DiskFull):
        return sqlite3.OperationalError(f"postgresql: database or disk is full: {first}")
    if isinstance(err, (psycopg.OperationalError, psycopg.errors.LockNotAvailable,
                        psycopg.errors.QueryCanceled, psycopg.errors.AdminShutdown,
                        psycopg.errors.CannotConnectNow, psycopg.errors.InsufficientResources,
                        psycopg.errors.SerializationFailure,
                        psycopg.errors.DeadlockDetected)):
        return sqlite3.OperationalError(f"postgresql: unavailable: {first}")
    return sqlite3.DatabaseError(f"postgresql: {first}")


class PgCursor:
    """What the store reads back from one statement (rows fetched at once)."""

    def __init__(self, rows: list[PgRow], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    async def fetchone(self) -> PgRow | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    async def fetchall(self) -> list[PgRow]:
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows


def _to_savepoint(text: str) -> bool:
    """ROLLBACK TO SAVEPOINT x: the transaction goes on."""
    return text.lstrip()[8:].lstrip().upper().startswith("TO")


class PgConnection:
    """The subset of `aiosqlite.Connection` the store uses, over psycopg (async)."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.AsyncConnection[PgRow], url: str, *,
                 application_name: str = "s4e-gateway", synchronous: str = "on") -> None:
        self._pg = conn
        self.url = url
        self._application_name = application_name
        self._synchronous = synchronous
        self._closing = False
        self._in_transaction = False  # between our BEGIN and its COMMIT or ROLLBACK

    @property
    def in_transaction(self) -> bool:
        return self._pg.info.transaction_status != TransactionStatus.IDLE

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> PgCursor:
        params = tuple(parameters)
        text = translate(sql)
        verb = _verb(text)
        if self._pg.broken or self._pg.closed:
            # Never go on with a transaction on a new connection: what it did before
            # is gone, the rest would commit alone. Its ROLLBACK is then a no-op.
            if self._in_transaction and not (verb.startswith("ROLLBACK")
                                             and not _to_savepoint(text)):
                raise sqlite3.OperationalError("postgresql: unavailable: the connection was "
                                               "lost during the transaction")
            await self._reconnect()
            self._in_transaction = False
            if verb.startswith("ROLLBACK"):
                return PgCursor([], -1)
        if verb.startswith(("COMMIT", "ROLLBACK")) and not _to_savepoint(text):
            self._in_transaction = False
        try:
            async with self._pg.cursor() as cur:
                if text is _BEGIN_WRITE:  # two statements, one round trip (no parameters)
                    try:
                        await cur.execute(_BEGIN_WRITE)
                    except psycopg.Error:
                        # BEGIN went through, the lock did not (lock_timeout): no
                        # transaction may stay open, as after SQLite's failed BEGIN.
                        if not self._pg.broken:
                            await self._pg.execute("ROLLBACK")
                        raise
                    self._in_transaction = True
                    return PgCursor([], -1)
                await cur.execute(text, params or None, prepare=None)
                if verb.startswith("BEGIN"):
                    self._in_transaction = True
                rows = await cur.fetchall() if cur.description is not None else []
                return PgCursor(rows, cur.rowcount)
        except psycopg.Error as err:
            raise _as_sqlite_error(err) from err

    async def _reconnect(self) -> None:
        """The server went away (a restart, a fail-over): a new connection, so that
        the gateway recovers by itself."""
        if self._closing:
            raise sqlite3.OperationalError("postgresql: unavailable: connection closed")
        try:
            fresh = await connect_postgres(self.url, application_name=self._application_name,
                                           synchronous=self._synchronous)
        except StoreError as err:
            raise sqlite3.OperationalError(f"postgresql: unavailable: {err}") from None
        self._pg = fresh._pg
        log.warning("PostgreSQL connection re-established (%s)", redact(self.url))

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = ()) -> list[PgRow]:
        cursor = await self.execute(sql, parameters)
        return await cursor.fetchall()

    async def executescript(self, script: str) -> None:
        """A migration: several statements, no parameters, in one round trip."""
        try:
            await self._pg.execute(pgsql.SQL(script))  # type: ignore[arg-type]
        except psycopg.Error as err:
            raise _as_sqlite_error(err) from err

    async def _execute(self, fn: Callable[..., T], *args: Any) -> T:
        raise StoreError("PostgreSQL: no sqlite3 connection to run a function on")

    async def close(self) -> None:
        self._closing = True
        await self._pg.close()


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


async def connect_postgres(url: str, *, application_name: str = "s4e-gateway",
                           synchronous: str = "on") -> PgConnection:
    """An autocommit connection (transactions are explicit BEGIN/COMMIT, as with
    SQLite) whose commits wait for the WAL flush (`synchronous_commit`), unless
    `synchronous="off"` for commits whose loss only repeats work (claims, marks)."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, row_factory=pg_row, application_name=application_name,
            connect_timeout=10)
    except psycopg.Error as err:
        raise StoreError(f"{redact(url)}: cannot connect to PostgreSQL: "
                         f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}") from None
    conn.adapters.register_dumper(bool, _BoolAsInt)
    try:
        await conn.execute(f"SET synchronous_commit = {'on' if synchronous == 'on' else 'off'}")
        # A lock wait as long as SQLite's busy_timeout, then an error, never for ever.
        await conn.execute("SET lock_timeout = '10s'")
    except psycopg.Error as err:
        await conn.close()
        raise StoreError(f"{redact(url)}: cannot use PostgreSQL: {err}") from None
    return PgConnection(conn, url, application_name=application_name, synchronous=synchronous)
