"""The processing loop: order, failures kept, recovery after a crash."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiosqlite

from gateway import processor as processor_module
from gateway import store
from gateway.model import Inbound, Outcome
from gateway.processor import MAX_ATTEMPTS, Processed, Processor
from gateway.store import InboundRow
from tests.conftest import database_for, wait_for

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL


async def open_store(tmp_path) -> aiosqlite.Connection:
    conn = await store.connect(database_for(tmp_path))
    await store.migrate(conn)
    return conn


async def put(conn: aiosqlite.Connection, n: int) -> int:
    writer = store.IntakeWriter(conn)
    writer.start()
    try:
        raw = f"Message-ID: <m{n}@example.com>\r\nSubject: {n}\r\n\r\nbody\r\n".encode()
        stored = await writer.store(Inbound("peer", "a@example.com", ("serwis@s4e.pl",), raw,
                                            datetime.now(UTC)))
    finally:
        await writer.stop()
    return stored.id


async def test_messages_are_processed_in_order_and_a_bad_one_is_kept_as_failed(tmp_path) -> None:
    conn = await open_store(tmp_path)
    ids = [await put(conn, n) for n in range(5)]
    seen: list[int] = []

    async def stages(c: aiosqlite.Connection, row: InboundRow) -> Processed:
        seen.append(row.id)
        if row.id == ids[2]:
            raise ValueError("cannot handle this one")
        await store.mark_inbound(c, row.id, state="done", outcome=Outcome.NEW)
        return Processed(Outcome.NEW)

    work = await store.connect(database_for(tmp_path))
    processor = Processor(work, stages)
    await processor.start()
    await wait_for(lambda: len(seen) == 5)
    await processor.stop()
    assert seen == ids
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert rows[ids[2]].state == "failed" and rows[ids[2]].outcome == "failed"
    assert "ValueError: cannot handle this one" in rows[ids[2]].error
    assert all(rows[i].state == "done" for i in ids if i != ids[2])
    # Kept and re-processable.
    assert await store.requeue_inbound(conn, ids[2])
    assert (await store.get_inbound(conn, ids[2])).state == "queued"
    await work.close()
    await conn.close()


async def test_rows_left_processing_by_a_crash_are_claimed_again(tmp_path) -> None:
    conn = await open_store(tmp_path)
    first = await put(conn, 1)
    claimed = await store.claim_inbound(conn)  # ... and the process dies here
    assert claimed is not None and claimed.id == first
    processor = Processor(conn)
    await processor.start()
    await wait_for(lambda: store.get_inbound(conn, first))
    await wait_for(lambda: _state_is(conn, first, "done"))
    await processor.stop()
    await conn.close()


async def test_a_message_that_kills_a_fresh_process_is_quarantined(tmp_path) -> None:
    conn = await open_store(tmp_path)
    poison = await put(conn, 1)
    await store.claim_inbound(conn)  # claimed, never finished (process killed)
    await store.recover_inbound(conn)
    probed: list[bytes] = []

    async def crashing_probe(raw: bytes) -> bool:  # as a child killed by SIGSEGV answers
        probed.append(raw)
        return False

    processor = Processor(conn, probe=crashing_probe)
    await processor.start()
    await wait_for(lambda: _state_is(conn, poison, "failed"))
    await processor.stop()
    row = await store.get_inbound(conn, poison)
    assert row.outcome == "failed" and "crashes the process" in row.error
    assert probed == [await store.read_raw(conn, poison)]
    await conn.close()


async def test_a_message_in_hand_at_three_unrelated_crashes_is_processed(tmp_path) -> None:
    conn = await open_store(tmp_path)
    innocent = await put(conn, 1)
    for _ in range(MAX_ATTEMPTS):
        await store.claim_inbound(conn)  # in hand when the process was killed
        await store.recover_inbound(conn)
    processor = Processor(conn)  # the real probe: the parser in a child interpreter
    await processor.start()
    await wait_for(lambda: _state_is(conn, innocent, "done"), timeout=60)
    await processor.stop()
    await conn.close()


async def test_environmental_failures_are_retried_never_failed(tmp_path, caplog) -> None:
    import errno
    import sqlite3

    conn = await open_store(tmp_path)
    first = await put(conn, 1)
    failures = [sqlite3.OperationalError("database is locked"),
                sqlite3.OperationalError("database or disk is full"),
                OSError(errno.ENOSPC, "No space left on device")]
    seen: list[int] = []

    async def stages(c: aiosqlite.Connection, row: InboundRow) -> Processed:
        seen.append(row.id)
        if failures:
            raise failures.pop(0)
        await store.mark_inbound(c, row.id, state="done", outcome=Outcome.NEW)
        return Processed(Outcome.NEW)

    processor = Processor(conn, stages, retry_first=0.01)
    await processor.start()
    await wait_for(lambda: _state_is(conn, first, "done"))
    await processor.stop()
    assert seen == [first] * 4
    row = await store.get_inbound(conn, first)
    assert row.outcome == "new" and row.attempts == 1  # never counted as a crash
    lines = [r for r in caplog.records if r.name == "gateway.processor"]
    assert len(lines) == 3 and not any(r.exc_info for r in lines)
    assert "database is locked" in lines[0].getMessage() and "retry in" in lines[0].getMessage()
    await conn.close()


async def _state_is(conn: aiosqlite.Connection, inbound_id: int, state: str) -> bool:
    row = await store.get_inbound(conn, inbound_id)
    return row is not None and row.state == state


async def test_new_mail_wakes_the_processor_without_polling_delay(tmp_path, monkeypatch) -> None:
    # A poll far longer than the wait below: done before it proves the wake.
    monkeypatch.setattr(processor_module, "IDLE_POLL_SECONDS", 60.0)
    conn = await open_store(tmp_path)
    processor = Processor(conn)
    await processor.start()
    await asyncio.sleep(0.05)
    writer = store.IntakeWriter(conn, on_commit=processor.wake)
    writer.start()
    raw = b"Subject: x\r\n\r\ny\r\n"
    stored = await writer.store(Inbound("p", "a@b.pl", ("serwis@s4e.pl",), raw,
                                        datetime.now(UTC)))
    await wait_for(lambda: _state_is(conn, stored.id, "done"), timeout=20)
    await writer.stop()
    await processor.stop()
    await conn.close()
