"""The worker between intake and the tickets: claims committed, unprocessed inbound
messages in arrival order and runs each through the stages.

A message that breaks a stage is marked `failed` and kept (visible in `inbox list`,
re-processable with `inbox reprocess`); the loop goes on. A message left mid-way by a
crash is claimed again on start; one that was claimed MAX_ATTEMPTS times without
finishing (it keeps killing the process) is quarantined as `failed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosqlite

from gateway import store
from gateway.model import Outcome
from gateway.store import InboundRow

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
IDLE_POLL_SECONDS = 1.0  # also picks up rows queued by another process (the CLI)


@dataclass(frozen=True, slots=True)
class Processed:
    outcome: Outcome | None
    ticket: int | None = None


# One message through the stages: reads what it needs, applies the decision in one
# transaction that also marks the inbound row done. Raises on failure.
Stages = Callable[[aiosqlite.Connection, InboundRow], Awaitable[Processed]]


async def record_received(conn: aiosqlite.Connection, row: InboundRow) -> Processed:
    """The minimal stage: the message is safely stored and known as received."""
    await store.mark_inbound(conn, row.id, state="done", outcome=None)
    return Processed(outcome=None)


class Processor:
    def __init__(self, conn: aiosqlite.Connection, stages: Stages = record_received,
                 on_processed: Callable[[Processed, float], None] | None = None) -> None:
        self._conn = conn
        self._stages = stages
        self._on_processed = on_processed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        recovered = await store.recover_inbound(self._conn)
        if recovered:
            log.warning("re-claiming %d message(s) left mid-way by an earlier stop", recovered)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="processor")

    async def stop(self) -> None:
        """Finish the message in hand, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                worked = await self.run_once()
            except Exception:  # noqa: BLE001 - e.g. database locked: try again soon
                log.exception("processor: claiming a message failed")
                worked = False
            if worked:
                # Let SMTP sessions waiting for their 250 in before the next message.
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                pass

    async def run_once(self) -> bool:
        """Process one queued message; False when there was none."""
        row = await store.claim_inbound(self._conn)
        if row is None:
            return False
        if row.attempts > MAX_ATTEMPTS:
            await store.mark_inbound(
                self._conn, row.id, state="failed", outcome=Outcome.FAILED,
                error=f"abandoned after {MAX_ATTEMPTS} attempts that did not finish")
            log.error("%s inbound %d: quarantined after %d unfinished attempts",
                      row.message_id or "<no-id>", row.id, MAX_ATTEMPTS)
            return True
        started = asyncio.get_running_loop().time()
        try:
            result = await self._stages(self._conn, row)
        except Exception as err:  # noqa: BLE001 - one bad message must not stop the loop
            await self._fail(row, err)
            result = Processed(Outcome.FAILED)
        if self._on_processed:
            self._on_processed(result, asyncio.get_running_loop().time() - started)
        return True

    async def _fail(self, row: InboundRow, err: Exception) -> None:
        log.exception("%s inbound %d: outcome=failed: %s: %s", row.message_id or "<no-id>",
                      row.id, type(err).__name__, err)
        if self._conn.in_transaction:
            await self._conn.execute("ROLLBACK")
        await store.mark_inbound(self._conn, row.id, state="failed", outcome=Outcome.FAILED,
                                 error=f"{type(err).__name__}: {err}"[:2000])
