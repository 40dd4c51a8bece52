"""aiosqlite's interface over a plain sqlite3 connection, for the worker processes.

The store's functions are written against aiosqlite, which runs every statement on a
thread of its own so that the SMTP process's event loop never blocks. A worker process
has no SMTP sessions to protect: there each of those hand-overs (two thread switches per
statement, ~20 per report) costs more than SQLite's own work. `DirectConnection` runs the
same calls inline, so the same store code serves both processes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreError
from gateway.store import BUSY_TIMEOUT_MS

T = TypeVar("T")


class DirectConnection:
    """The subset of `aiosqlite.Connection` the gateway uses, run inline.

    With `lock_poll` (seconds) a statement that finds SQLite's write lock taken does
    not sleep in SQLite's busy handler, which would block the event loop: it tries
    again every `lock_poll` and lets the loop run in between (the mail process's relay
    sessions go on sending while one of them waits to mark its mail), within the same
    BUSY_TIMEOUT_MS."""

    def __init__(self, db: sqlite3.Connection, *, lock_poll: float | None = None) -> None:
        self._conn = db
        self._lock_poll = lock_poll
        if lock_poll is not None:
            db.execute("PRAGMA busy_timeout = 0")

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> sqlite3.Cursor:
        params = tuple(parameters)
        if self._lock_poll is None:
            return self._conn.execute(sql, params)
        return await self._polling(self._lock_poll, lambda: self._conn.execute(sql, params))

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = ()) -> list[Any]:
        params = tuple(parameters)
        if self._lock_poll is None:
            return self._conn.execute(sql, params).fetchall()
        return await self._polling(self._lock_poll,
                                   lambda: self._conn.execute(sql, params).fetchall())

    @staticmethod
    async def _polling(poll: float, run: Callable[[], T]) -> T:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return run()
            except sqlite3.OperationalError as err:
                if not _busy(err) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(poll)

    async def _execute(self, fn: Callable[..., T], *args: Any) -> T:
        """What aiosqlite's own methods go through (the intake writer calls it)."""
        return fn(*args)

    async def close(self) -> None:
        self._conn.close()


# SQLITE_BUSY_SNAPSHOT: a read transaction's snapshot is stale; trying again cannot mend it.
_BUSY_SNAPSHOT = 517


def _busy(err: sqlite3.OperationalError) -> bool:
    """What SQLite's busy handler would have waited out: SQLITE_BUSY and its extended
    codes (BUSY_RECOVERY while another process rebuilds the WAL index after a crash;
    Python gives the extended code), the statement having done nothing."""
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY and code != _BUSY_SNAPSHOT


async def connect_direct(path: Path, *, synchronous: str = "FULL",
                         lock_poll: float | None = None) -> DirectConnection:
    """Like `store.connect` (autocommit mode, WAL, foreign keys, synchronous=FULL);
    `synchronous="NORMAL"` for the commits a power cut may lose (see below);
    `lock_poll`: wait for the write lock without blocking the loop (DirectConnection)."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open database: {err}") from None
    db.row_factory = sqlite3.Row
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        # FULL where a commit is a promise (a report's ticket, its answers, the inbound
        # outcome: what the customer will be told). NORMAL where losing the last
        # commits to a power cut only repeats work: a claim (the attempt count survives
        # a crashed process, the page cache has it) and the mailer's marks (a mail
        # marked sent may go again, with the same Message-ID: at least once, as ever).
        db.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys = ON")
        # No checkpoint inside a worker's commit: the mail process's Checkpointer does
        # them all off the message path (and no SMTP commit before its 250 does one).
        db.execute("PRAGMA wal_autocheckpoint = 0")
    except sqlite3.Error as err:
        db.close()
        raise StoreError(f"{path}: cannot use database: {err}") from None
    return DirectConnection(db, lock_poll=lock_poll)


CHECKPOINT_SECONDS = 1.0
# How often a worker process's connections try for the write lock while another
# connection holds it (asyncio's timers round a sleep up to the selector's 1 ms, so it
# is about 1 ms; intake tries every 0.5 ms on its thread). 2 ms was tried: intake of
# 5 KB reports 0.87x.
LOCK_POLL_SECONDS = 0.0005


class Checkpointer:
    """Copies the write-ahead log into the database once a second, on a thread and a
    connection of its own, while the gateway runs with `[processing] workers`.

    SQLite's default makes whichever commit crosses 1,000 pages do the checkpoint (with
    its fsyncs) before it returns: now and then a 250 at intake or a report in a worker
    waited for it. PASSIVE never blocks the others: what a reader still needs is copied
    on the next round."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._version: int | None = None

    def run_once(self) -> bool:
        """One PASSIVE checkpoint if anything was committed since the last; True if run."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return False
        self._version = version
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return True

    def close(self) -> None:
        self._db.close()
