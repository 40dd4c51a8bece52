"""Opening the database, transactions and the order of writes in one process.

Every connection runs SQLite in WAL mode with `synchronous=FULL`, so a commit is on
disk (the WAL fsync'd) before it returns: an acknowledged message survives power loss,
not only a crash of this process.

`run_on_thread` is the one place that calls aiosqlite's private API.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import aiosqlite

from gateway.errors import StoreError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


async def connect(path: Path | str) -> aiosqlite.Connection:
    """A connection in autocommit mode: transactions are explicit BEGIN/COMMIT.

    `path` is the SQLite file, or a "postgresql://" URL: then a `PgConnection`, which
    offers the part of aiosqlite's interface the store uses (store/postgres.py)."""
    if isinstance(path, str):
        from gateway.store.postgres import connect_postgres

        return cast(aiosqlite.Connection, await connect_postgres(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open database: {err}") from None
    conn.row_factory = aiosqlite.Row
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        if mode and mode[0][0].lower() != "wal":
            log.warning("database %s: journal_mode is %s, not WAL", path, mode[0][0])
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as err:
        await conn.close()
        raise StoreError(f"{path}: cannot use database: {err}") from None
    return conn


async def run_on_thread(conn: aiosqlite.Connection,
                        fn: Callable[[sqlite3.Connection], T]) -> T:
    """`fn(db)` with the plain sqlite3 connection, on `conn`'s own thread, in one trip.

    aiosqlite has no public "run this on the connection's thread"; `_execute` is what
    all of its own methods go through and `_conn` is the sqlite3 connection
    (aiosqlite>=0.20,<0.23, pinned in pyproject.toml). The only use of either; a
    worker's `DirectConnection` offers the same two names and runs `fn` inline.
    """
    return await conn._execute(fn, conn._conn)


# --- write order ------------------------------------------------------------------

class WriteGate:
    """The order in which this process's connections take SQLite's one write lock:
    the intake writer first, then the others in arrival order.

    Without it a connection that finds the lock taken sleeps in SQLite's busy handler
    (1, 2, 5, 10, 15, 20, 25... ms), so a 250 waits out the processor's transaction
    and then the rest of a sleep step. With it the intake writer waits on a future
    that is resolved the moment the holder commits, ahead of the processor and the
    mailer. Other processes (the CLI) still meet busy_timeout.
    """

    def __init__(self) -> None:
        self._held = False
        self._intake: deque[asyncio.Future[None]] = deque()
        self._others: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def hold(self, *, intake: bool = False) -> AsyncIterator[None]:
        await self._acquire(intake)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, intake: bool) -> None:
        if not self._held and not self._intake and (intake or not self._others):
            self._held = True
            return
        waiters = self._intake if intake else self._others
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed over just as we were cancelled: pass it on
            else:
                waiters.remove(future)
            raise

    def _release(self) -> None:
        for waiters in (self._intake, self._others):
            while waiters:
                future = waiters.popleft()
                if not future.done():
                    future.set_result(None)  # handed over: stays held
                    return
        self._held = False


def share_write_gate(*conns: aiosqlite.Connection) -> WriteGate:
    """Make these connections (one process, one database) take turns via one gate."""
    gate = WriteGate()
    for conn in conns:
        conn.write_gate = gate  # type: ignore[attr-defined]
    return gate


@asynccontextmanager
async def gated(conn: aiosqlite.Connection, *, intake: bool = False) -> AsyncIterator[None]:
    """Hold `conn`'s write gate, if it has one, around a write (a no-op inside a
    transaction: Tx holds it already)."""
    gate: WriteGate | None = getattr(conn, "write_gate", None)
    if gate is None or conn.in_transaction:
        yield
        return
    async with gate.hold(intake=intake):
        yield


@asynccontextmanager
async def savepoint(conn: aiosqlite.Connection, name: str = "one") -> AsyncIterator[None]:
    """Inside a transaction: what the block wrote is undone if it raises, the rest of
    the transaction stays (one report of a batch failing leaves the others)."""
    await conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite ends the whole transaction on some errors
            await conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
            await conn.execute(f"RELEASE SAVEPOINT {name}")
        raise
    await conn.execute(f"RELEASE SAVEPOINT {name}")


async def _begin(conn: aiosqlite.Connection) -> None:
    """BEGIN IMMEDIATE that a cancel (a timeout around the transaction) cannot split:
    the statement runs on in the database's thread, and a BEGIN that succeeds after
    its caller gave up would leave the connection holding the one write lock with
    nobody to commit. So a cancelled BEGIN is waited for and rolled back, however
    often the caller is cancelled meanwhile."""
    begin = asyncio.ensure_future(conn.execute("BEGIN IMMEDIATE"))
    try:
        await asyncio.shield(begin)
        return
    except asyncio.CancelledError:
        pass
    if await _wait_out(begin):
        await _wait_out(asyncio.ensure_future(conn.execute("ROLLBACK")))
    raise asyncio.CancelledError


async def _wait_out(statement: asyncio.Future[Any]) -> bool:
    """Wait until `statement` is done, through any number of cancels; True if it
    succeeded."""
    while not statement.done():
        try:
            await asyncio.shield(statement)
        except asyncio.CancelledError:
            continue
        except Exception:  # noqa: BLE001 - read below
            break
    return not statement.cancelled() and statement.exception() is None


class Tx:
    """`async with Tx(conn):` BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any error."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def __aenter__(self) -> aiosqlite.Connection:
        self._gate = gated(self.conn)
        await self._gate.__aenter__()
        try:
            await _begin(self.conn)
        except BaseException:
            await self._gate.__aexit__(None, None, None)
            raise
        return self.conn

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                await self.conn.execute("COMMIT")
            else:
                try:
                    await self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        finally:
            await self._gate.__aexit__(None, None, None)
