"""Writes of parallel tasks taken to the database together: one turn at the write lock.

The mail process's relay sessions each mark their mail sent after the relay's 250.
One statement per mail was one wait for SQLite's single write lock per mail, behind
intake and the processing workers: at 150 reports/s the mailer spent three quarters
of its time there and fell behind the workers. Here the marks that come while one
write waits go together in the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupWriter(Generic[T]):
    """`add(item)` returns once `item` is written, by one `write(items)` call with
    whatever else was added while the write before it ran."""

    def __init__(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        self._write = write
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def add(self, item: T) -> None:
        """Wait for `item`'s write; its error, if it failed (the caller may add again).
        A caller cancelled meanwhile leaves the item in its group: it is written."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._flush(), name="group write")
        await future

    async def drain(self) -> None:
        """Wait for the writes under way (at stop)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            try:
                await self._write([item for item, _ in group])
            except Exception as err:  # noqa: BLE001 - each caller gets it, and decides
                for _, future in group:
                    if not future.done():
                        future.set_exception(err)
            else:
                for _, future in group:
                    if not future.done():
                        future.set_result(None)
