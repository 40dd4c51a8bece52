"""Noticing other connections' commits, on either database.

SQLite: `PRAGMA data_version` changes when any other connection committed; the
watchers read it every few milliseconds while idle. PostgreSQL: the schema's triggers
NOTIFY `s4e_inbound` when a message is queued (intake, a reprocess, a claim given
back) and `s4e_outbox` when a mail becomes due; a `Listener` with a connection of its
own counts what arrives. Either way the watcher compares a number with the last one it
saw. Notifications only wake: every watcher also polls, so a lost connection or a
missed notification delays work by one poll, never loses it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg

from gateway.store.dialect import is_postgres

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0


class Listener:
    """LISTEN on `channels` on a connection of its own; `count` grows with each
    notification (and on every reconnect: something may have been missed)."""

    def __init__(self, url: str, channels: tuple[str, ...]) -> None:
        self._url = url
        self._channels = channels
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="listen")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _bump(self) -> None:
        self.count += 1

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, application_name="s4e-gateway listen",
                        connect_timeout=10) as conn:
                    for channel in self._channels:
                        await conn.execute(f"LISTEN {channel}")
                    self._bump()  # anything committed while we were not listening
                    async for _ in conn.notifies():
                        self._bump()
            except psycopg.Error as err:
                log.warning("LISTEN %s: %s; polling only, reconnecting in %.0fs",
                            ",".join(self._channels), " ".join(str(err).split())[:200],
                            RECONNECT_SECONDS)
            await asyncio.sleep(RECONNECT_SECONDS)


class CommitWatch:
    """A number that changes when another connection committed: SQLite's
    data_version on `conn`, or a PostgreSQL listener's count."""

    def __init__(self, conn: Any, channels: tuple[str, ...]) -> None:
        self._conn = conn
        self._listener: Listener | None = None
        if is_postgres(conn):
            self._listener = Listener(conn.url, channels)

    def start(self) -> None:
        if self._listener:
            self._listener.start()

    async def stop(self) -> None:
        if self._listener:
            await self._listener.stop()

    async def version(self) -> int:
        if self._listener:
            return self._listener.count
        rows = list(await self._conn.execute_fetchall("PRAGMA data_version"))
        return int(rows[0][0])
