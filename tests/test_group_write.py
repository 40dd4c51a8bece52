"""The mail process's writes: sent marks grouped into one write, and a write that
waits for SQLite's lock without stopping the loop (real SQLite files in tmp_path)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.direct_connection import connect_direct
from gateway.group_write import GroupWriter


async def test_marks_added_while_a_write_runs_go_together_in_the_next() -> None:
    writes: list[list[int]] = []
    release = asyncio.Event()

    async def write(items: list[int]) -> None:
        writes.append(items)
        if len(writes) == 1:
            await release.wait()  # the first write waits for the lock meanwhile

    group: GroupWriter[int] = GroupWriter(write)
    first = asyncio.create_task(group.add(1))
    await asyncio.sleep(0)
    others = [asyncio.create_task(group.add(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert not first.done() and writes == [[1]]
    release.set()
    await asyncio.gather(first, *others)
    assert writes == [[1], [2, 3, 4]]


async def test_a_failed_write_reaches_each_of_its_callers_who_may_add_again() -> None:
    failing = True
    written: list[list[str]] = []

    async def write(items: list[str]) -> None:
        if failing:
            raise sqlite3.OperationalError("database or disk is full")
        written.append(items)

    group: GroupWriter[str] = GroupWriter(write)
    results = await asyncio.gather(group.add("a"), group.add("b"), return_exceptions=True)
    assert [type(r) for r in results] == [sqlite3.OperationalError] * 2
    failing = False
    await asyncio.gather(group.add("a"), group.add("b"))
    assert written == [["a", "b"]]


async def test_a_caller_cancelled_meanwhile_still_has_its_mark_written() -> None:
    release = asyncio.Event()
    written: list[list[int]] = []

    async def write(items: list[int]) -> None:
        await release.wait()
        written.append(items)

    group: GroupWriter[int] = GroupWriter(write)
    caller = asyncio.create_task(group.add(7))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    await group.drain()
    assert written == [[7]]  # the mail was sent: its mark is not lost with the caller


async def test_a_write_waiting_for_the_lock_lets_the_loop_run(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE marks (id INTEGER PRIMARY KEY)")
    conn = await connect_direct(db, synchronous="NORMAL", lock_poll=0.001)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's transaction
        write = asyncio.create_task(conn.execute("INSERT INTO marks (id) VALUES (1)"))
        ticks = 0
        for _ in range(20):  # the loop goes on while the insert waits
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not write.done()
        holder.execute("COMMIT")
        await asyncio.wait_for(write, 5)
        assert holder.execute("SELECT id FROM marks").fetchall() == [(1,)]
    finally:
        await conn.close()
        holder.close()


@pytest.mark.parametrize(("code", "waited"), [
    (5, True),      # SQLITE_BUSY: another connection holds the write lock
    (261, True),    # SQLITE_BUSY_RECOVERY: another process rebuilds the WAL index
    (517, False),   # SQLITE_BUSY_SNAPSHOT: a stale read snapshot; trying again cannot help
    (13, False),    # SQLITE_FULL: the disk is full; the caller's back-off decides
])
def test_what_a_polling_connection_waits_out(code: int, waited: bool) -> None:
    """The codes SQLite's own busy handler would have waited out, and only those."""
    from gateway.direct_connection import _busy

    err = sqlite3.OperationalError("database is locked")
    err.sqlite_errorcode = code  # type: ignore[attr-defined]
    assert _busy(err) is waited
