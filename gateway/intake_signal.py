"""Intake first, across processes (SQLite): the SMTP process tells the processing
workers while one of its commits wants SQLite's one write lock.

In one process the write gate (`store.connection.WriteGate`) puts intake's commit
ahead of the other writers. The processing workers write from processes of their own:
with this signal a worker holds its next BEGIN back while intake is committing or
waiting to (at most HOLD_BACK_MAX_SECONDS: intake never starves processing for good),
so a 250 waits at most for the transaction already open, which
`stages.BATCH_HOLD_SECONDS` keeps short. (Ending that transaction early as well was
tried: under a steady stream of mail it split every batch into one commit, one fsync,
per report, and processing fell behind.)

One shared integer (shared memory, no lock): only the SMTP process's intake writer
changes it, one write at a time; the workers only read it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HOLD_BACK_MAX_SECONDS = 0.05
_POLL_SECONDS = 0.0005


class IntakeSignal:
    """Created by the daemon before it starts the workers (they get it at spawn)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._pending: Any = context.RawValue("i", 0)  # intake writes under way
        self._done: Any = context.RawValue("q", 0)  # intake writes finished, ever

    def waiting(self) -> bool:
        return bool(self._pending.value)

    def writes_done(self) -> int:
        return int(self._done.value)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around intake's write: from before its BEGIN to after its COMMIT."""
        self._pending.value += 1
        try:
            yield
        finally:
            self._pending.value -= 1
            self._done.value += 1


async def hold_back(signal: IntakeSignal | None) -> None:
    """Before a worker's BEGIN: let the intake write under way go first. Only that one:
    under a steady stream of mail intake writes again at once, and waiting for a
    moment without any would hold every batch back for the whole bound."""
    if signal is None or not signal.waiting():
        return
    loop = asyncio.get_running_loop()
    until = loop.time() + HOLD_BACK_MAX_SECONDS
    seen = signal.writes_done()
    while signal.waiting() and signal.writes_done() == seen and loop.time() < until:
        await asyncio.sleep(_POLL_SECONDS)
