"""The jobs that run on a clock rather than on a message: the rating window closing
resolved tickets, the held digest, `[storage] keep_raw`, the ticket numbers' warning
(gateway/number_space.py) and systemd's STATUS line.

They run where processing runs: in the SMTP process when `[processing] workers = 0`,
else in the mail process (one process only, so each job runs once). With several
gateways on one PostgreSQL database, on one of them at a time (an advisory lock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from gateway import staff, store
from gateway.cluster import may_run_timed_jobs
from gateway.config import Config
from gateway.store.dialect import is_postgres
from gateway.digest import send_held_digest
from gateway.errors import expected_failure
from gateway.context import Context
from gateway.number_space import NumberSpaceWatch

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 30.0


async def queue_status(conn: Any) -> str:
    """systemd's STATUS= line (the gauges are read at scrape time instead)."""
    counts = await store.queue_counts(conn)
    return (f"listening; {counts.inbound_queued} inbound to process, "
            f"{counts.outbox_waiting} outgoing waiting")


async def drop_old_raw(conn: Any, config: Config) -> int:
    """[storage] keep_raw: raw mail of tickets closed longer ago is dropped."""
    keep = config.storage.keep_raw_seconds
    if keep is None:
        return 0
    now = store.utcnow()
    dropped = await store.drop_old_raw(conn, now - timedelta(seconds=keep), now)
    if dropped:
        log.info("storage.keep_raw: raw mail of %d message(s) of tickets closed over %s ago"
                 " dropped", dropped, config.storage.keep_raw)
    return dropped


class TimedJobs:
    """Every `interval` seconds, on a connection of its own, one round at a time."""

    def __init__(self, conn: Any, context: Context, *, on_status: Callable[[str], None],
                 interval: float = INTERVAL_SECONDS, lock: asyncio.Lock | None = None) -> None:
        self.conn = conn
        self._context = context
        self._on_status = on_status
        self.interval = interval
        # Shared with whatever else uses `conn` (the SIGHUP reload): two coroutines must
        # never interleave transactions on one connection.
        self.lock = lock or asyncio.Lock()
        # PostgreSQL: one node at a time holds the timed-jobs lock (cluster.py).
        self._runs_here = False
        self.numbers = NumberSpaceWatch()  # its first round is at start

    async def run_once(self) -> bool:
        """One round; False when another node runs the jobs (PostgreSQL)."""
        async with self.lock:
            if not self._runs_here:
                self._runs_here = await may_run_timed_jobs(self.conn)
                if self._runs_here and is_postgres(self.conn):
                    log.info("this node runs the timed jobs (rating window, held digest, "
                             "keep_raw) while it is up")
            if self._runs_here:
                await staff.close_expired_ratings(self.conn, self._context)
                await send_held_digest(self.conn, self._context)
                await drop_old_raw(self.conn, self._context.config)
                await self.numbers.check(self.conn, self._context.clock())
            self._on_status(await queue_status(self.conn))
            return self._runs_here

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as err:  # noqa: BLE001 - e.g. a locked database: next round
                reason = expected_failure(err)
                if reason is None:
                    log.exception("housekeeping failed")
                else:  # expected in operation: one line, no traceback
                    log.error("housekeeping failed, next round in %.0fs: %s",
                              self.interval, reason)
            await asyncio.sleep(self.interval)
