"""Several reports per transaction (stages.process_batch, a worker under load): each
report gets what it would get alone, a report that breaks fails alone, a failure of
the database loses and doubles nothing, and a message a crash left unfinished is never
batched again."""

from __future__ import annotations

import sqlite3
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from gateway import stages as stages_module
from gateway import store
from gateway.context import Context, make_context
from gateway.model import Inbound
from gateway.processor import BATCH_SIZE, Processor
from gateway.stages import BatchResult, process_batch
from gateway.store import InboundRow
from tests.conftest import CRM, INTAKE, REPORT_BODY, make_config, make_mail

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

def report(n: int, **headers: str) -> bytes:
    address = f"user{n}@example.com"
    return make_mail(sender=f"User {n} <{address}>", message_id=f"<report-{n}@example.com>",
                     body=REPORT_BODY.replace("jan.kowalski@example.com", address), **headers)


async def put(conn: aiosqlite.Connection, raws: list[tuple[bytes, str]]) -> list[int]:
    """Stored as intake stores them: (raw, recipient) each."""
    writer = store.IntakeWriter(conn)
    writer.start()
    try:
        ids = []
        for raw, rcpt in raws:
            stored = await writer.store(Inbound("192.0.2.1", "sender@example.com", (rcpt,), raw,
                                                datetime.now(UTC)))
            ids.append(stored.id)
        return ids
    finally:
        await writer.stop()


@pytest.fixture
async def desk(tmp_path: Path) -> Any:
    config = make_config(tmp_path)
    conn = await store.connect(config.storage.database)
    await store.migrate(conn)
    ctx = await make_context(conn, config)
    try:
        yield conn, ctx
    finally:
        await conn.close()


def batch_processor(conn: aiosqlite.Connection, ctx: Context, **kwargs: Any) -> Processor:
    async def batch(c: aiosqlite.Connection, rows: list[InboundRow]) -> list[BatchResult]:
        return await process_batch(c, ctx, rows)

    return Processor(conn, batch=batch, attachments=ctx.attachments, **kwargs)


async def test_each_report_of_one_batch_gets_its_own_ticket_and_acknowledgement(desk) -> None:
    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(12)])
    processor = batch_processor(conn, ctx)
    assert await processor.run_once()  # one claim: all twelve
    assert not await processor.run_once()
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert [rows[i].state for i in ids] == ["done"] * 12
    tickets = [rows[i].ticket for i in ids]
    assert None not in tickets and len(set(tickets)) == 12
    acks = [m for m in await store.list_outbox(conn) if m.kind == "acknowledgement"]
    assert sorted(m.rcpt_to for m in acks) == sorted(f"user{n}@example.com" for n in range(12))
    assert sorted(m.ticket for m in acks) == sorted(tickets)


async def test_a_reply_batched_with_its_report_goes_into_the_ticket_it_opened(desk) -> None:
    conn, ctx = desk
    reply = make_mail(sender="User 1 <user1@example.com>", to=CRM, subject="Re: Awaria serwera",
                      body="Dodaję zrzut ekranu.\n", message_id="<reply-1@example.com>",
                      In_Reply_To="<report-1@example.com>")
    report_id, reply_id = await put(conn, [(report(1), INTAKE), (reply, CRM)])
    processor = batch_processor(conn, ctx)
    assert await processor.run_once()
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert rows[report_id].outcome == "new" and rows[reply_id].outcome == "follow_up"
    assert rows[reply_id].ticket == rows[report_id].ticket
    thread = await store.ticket_messages(conn, rows[report_id].ticket)
    assert [m.message_id for m in thread if m.direction == "in"] == [
        "<report-1@example.com>", "<reply-1@example.com>"]


async def test_a_report_that_breaks_fails_alone_and_leaves_nothing_behind(
        desk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(5)])
    apply = stages_module.apply

    async def breaking(conn: Any, ctx: Any, row: InboundRow, *args: Any) -> Any:
        ticket = await apply(conn, ctx, row, *args)  # its ticket and answer are written...
        if row.id == ids[2]:
            raise ValueError("a bug met by this one report")  # ...then undone
        return ticket

    monkeypatch.setattr(stages_module, "apply", breaking)
    processor = batch_processor(conn, ctx)
    assert await processor.run_once()
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert rows[ids[2]].state == "failed"
    assert "ValueError: a bug met by this one report" in (rows[ids[2]].error or "")
    assert [rows[i].state for i in ids if i != ids[2]] == ["done"] * 4
    tickets = await store.list_tickets(conn)
    assert sorted(t.reporter_email for t in tickets) == [
        f"user{n}@example.com" for n in (0, 1, 3, 4)]
    assert "user2@example.com" not in {m.rcpt_to for m in await store.list_outbox(conn)}
    # The log says which message and where the bug is, with its traceback.
    failed = [r for r in caplog.records if "outcome=failed" in r.getMessage()]
    assert len(failed) == 1 and "<report-2@example.com>" in failed[0].getMessage()
    assert failed[0].exc_info and "a bug met by this one report" in caplog.text
    assert "in breaking" in caplog.text  # the frame that raised


async def test_a_database_failure_mid_batch_keeps_the_batch_and_doubles_nothing(
        desk, monkeypatch: pytest.MonkeyPatch) -> None:
    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(6)])
    record = stages_module.record
    failures = [ids[3]]

    async def disk_full_once(conn: Any, ctx: Any, prepared: Any) -> Any:
        if prepared.row.id in failures:
            failures.remove(prepared.row.id)
            raise sqlite3.OperationalError("database or disk is full")
        return await record(conn, ctx, prepared)

    monkeypatch.setattr(stages_module, "record", disk_full_once)
    processor = batch_processor(conn, ctx, retry_first=0.01)
    assert await processor.run_once()  # the failure: its transaction is not kept
    rows = {r.id: r for r in await store.list_inbound(conn)}
    # Those before it may have been committed in an earlier transaction of the batch
    # (BATCH_HOLD_SECONDS); it and those after are in hand, none failed.
    assert [rows[i].state for i in ids[3:]] == ["processing"] * 3
    assert {rows[i].state for i in ids[:3]} <= {"done", "processing"}
    assert len(await store.list_tickets(conn)) == sum(rows[i].state == "done" for i in ids)
    assert await processor.run_once()  # the retry, with the same claim
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert [rows[i].state for i in ids] == ["done"] * 6
    assert [rows[i].attempts for i in ids] == [1] * 6
    acks = Counter(m.rcpt_to for m in await store.list_outbox(conn))
    assert acks == Counter(f"user{n}@example.com" for n in range(6))


async def test_a_message_a_crash_left_unfinished_is_claimed_alone(desk) -> None:
    conn, _ = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(5)])
    # ids[2] was in hand when a process died: claimed once, back in the queue.
    await conn.execute("UPDATE inbound SET attempts = 1 WHERE id = ?", (ids[2],))
    claims = []
    while batch := await store.claim_inbound_batch(conn, limit=BATCH_SIZE):
        claims.append([row.id for row in batch])
    assert claims == [ids[:2], [ids[2]], ids[3:]]


async def test_a_worker_claims_its_share_of_a_short_queue(desk) -> None:
    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(10)])
    processor = batch_processor(conn, ctx, peers=2)
    assert await processor.run_once()
    done = [r.id for r in await store.list_inbound(conn) if r.state == "done"]
    assert done == ids[:5]  # the other worker takes the rest


@pytest.mark.sqlite_only  # PostgreSQL: intake takes no lock the workers hold
async def test_a_batch_begins_only_once_intake_has_committed(
        desk, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from gateway import intake_signal
    from gateway.intake_signal import IntakeSignal

    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(5)])
    statements: list[str] = []
    await conn.set_trace_callback(statements.append)
    signal = IntakeSignal()
    rows = await store.claim_inbound_batch(conn, limit=BATCH_SIZE)
    monkeypatch.setattr(intake_signal, "HOLD_BACK_MAX_SECONDS", 3600.0)
    with signal.writing():  # as the SMTP process does around its commit
        batch = asyncio.ensure_future(process_batch(conn, ctx, rows, intake=signal))
        for _ in range(50):  # the five reports parsed, then it waits
            await asyncio.sleep(0.01)
        assert not batch.done() and "BEGIN IMMEDIATE" not in statements
    results = await asyncio.wait_for(batch, 30)  # intake committed: the batch goes on
    await conn.set_trace_callback(None)
    assert [type(r).__name__ for r in results] == ["Processed"] * 5
    assert {r.state for r in await store.list_inbound(conn) if r.id in ids} == {"done"}


@pytest.mark.sqlite_only
async def test_intake_that_never_lets_go_does_not_stop_processing(desk) -> None:
    import asyncio

    from gateway.intake_signal import IntakeSignal

    conn, ctx = desk
    await put(conn, [(report(n), INTAKE) for n in range(3)])
    signal = IntakeSignal()
    rows = await store.claim_inbound_batch(conn, limit=BATCH_SIZE)
    with signal.writing():  # a flag that stays up: each hold-back ends at its bound
        results = await asyncio.wait_for(process_batch(conn, ctx, rows, intake=signal), 30)
    assert [type(r).__name__ for r in results] == ["Processed"] * 3


@pytest.mark.sqlite_only
async def test_the_intake_writer_signals_while_its_commit_waits_for_the_lock(
        tmp_path: Path) -> None:
    import asyncio

    from gateway.intake_signal import IntakeSignal
    from tests.conftest import write_lock_held

    database = tmp_path / "gw.db"
    conn = await store.connect(database)
    await store.migrate(conn)
    signal = IntakeSignal()
    writer = store.IntakeWriter(conn, signal=signal)
    writer.start()
    try:
        with write_lock_held(database):  # a worker's transaction
            stored = asyncio.ensure_future(writer.store(Inbound(
                "192.0.2.1", "a@example.com", (INTAKE,), report(1), datetime.now(UTC))))
            for _ in range(200):
                if signal.waiting():
                    break
                await asyncio.sleep(0.01)
            assert signal.waiting() and not stored.done()
        assert (await asyncio.wait_for(stored, 30)).id
        assert not signal.waiting()
    finally:
        await writer.stop()
        await conn.close()


@pytest.mark.sqlite_only  # the lock taken from outside is SQLite's one write lock
async def test_a_failed_begin_later_in_a_batch_never_records_an_earlier_report_twice(
        desk, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.store import InboundRow as _Row  # noqa: F401 - typed rows below

    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(3)])
    await conn.execute("PRAGMA busy_timeout = 100")
    monkeypatch.setattr(stages_module, "BATCH_HOLD_SECONDS", 0.0)  # a transaction each
    database = ctx.config.storage.database
    locker = sqlite3.connect(database, isolation_level=None)
    calls = []

    async def another_writer_before_the_second(signal: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the first report is committed; the next BEGIN meets a lock
            locker.execute("BEGIN IMMEDIATE")

    monkeypatch.setattr(stages_module, "hold_back", another_writer_before_the_second)
    processor = batch_processor(conn, ctx, retry_first=0.01)
    try:
        assert await processor.run_once()  # "database is locked" at the second BEGIN
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert [rows[i].state for i in ids] == ["done", "processing", "processing"]
    assert await processor.run_once()  # the two in hand, once the lock is gone
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert [rows[i].state for i in ids] == ["done"] * 3
    tickets = await store.list_tickets(conn)
    assert sorted(t.reporter_email for t in tickets) == [f"user{n}@example.com" for n in range(3)]
    assert rows[ids[0]].ticket in {t.number for t in tickets}


async def test_a_failure_that_cannot_be_marked_on_a_full_disk_stays_in_hand(
        desk, monkeypatch: pytest.MonkeyPatch) -> None:
    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(4)])
    apply, mark = stages_module.apply, store.mark_inbound
    full = [True]

    async def breaking(conn: Any, ctx: Any, row: InboundRow, *args: Any) -> Any:
        if row.id == ids[1]:
            raise ValueError("a bug met by this one report")
        return await apply(conn, ctx, row, *args)

    async def disk_full_once(conn: Any, inbound_id: int, **kwargs: Any) -> None:
        if kwargs["state"] == "failed" and full.pop() if full else False:
            raise sqlite3.OperationalError("database or disk is full")
        await mark(conn, inbound_id, **kwargs)

    monkeypatch.setattr(stages_module, "apply", breaking)
    monkeypatch.setattr(store, "mark_inbound", disk_full_once)
    processor = batch_processor(conn, ctx, retry_first=0.01)
    assert await processor.run_once()
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert rows[ids[1]].state == "processing"  # in hand, not stranded: tried again
    assert [rows[i].state for i in ids if i != ids[1]] == ["done"] * 3
    assert await processor.run_once()
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert rows[ids[1]].state == "failed"
    assert "a bug met by this one report" in (rows[ids[1]].error or "")
    assert len(await store.list_tickets(conn)) == 3


async def test_a_burst_of_large_messages_is_taken_in_chunks(
        desk, monkeypatch: pytest.MonkeyPatch) -> None:
    conn, ctx = desk
    ids = await put(conn, [(report(n), INTAKE) for n in range(4)])
    monkeypatch.setattr(stages_module, "BATCH_BYTES", 1)  # each message a chunk of its own
    monkeypatch.setattr(stages_module, "BATCH_HOLD_SECONDS", 3600.0)
    prepared: list[int] = []
    prepare = stages_module.prepare

    async def noting(conn: Any, ctx: Any, row: InboundRow, **kwargs: Any) -> Any:
        # Each is recorded before the next is parsed: one in memory at a time.
        assert all(r.state == "done" for r in await store.list_inbound(conn) if r.id in prepared)
        prepared.append(row.id)
        return await prepare(conn, ctx, row, **kwargs)

    monkeypatch.setattr(stages_module, "prepare", noting)
    results = await process_batch(conn, ctx, await store.claim_inbound_batch(conn, limit=32))
    assert [type(r).__name__ for r in results] == ["Processed"] * 4 and prepared == ids


async def test_of_two_copies_the_one_recorded_second_is_the_duplicate(desk) -> None:
    # With several workers a later copy may be recorded before an earlier one.
    conn, ctx = desk
    # The same report by another path: intake keeps both (a header differs).
    first, second = await put(conn, [(report(7), INTAKE),
                                     (report(7, X_Forwarded_For="relay.example.com"), INTAKE)])
    assert first != second
    later = await store.claim_inbound_batch(conn, limit=1)  # the first copy...
    assert [r.id for r in later] == [first]
    other = await store.claim_inbound_batch(conn, limit=1)
    assert [r.id for r in other] == [second]
    results = await process_batch(conn, ctx, other)  # ...recorded after the second
    results += await process_batch(conn, ctx, later)
    rows = {r.id: r for r in await store.list_inbound(conn)}
    assert rows[second].outcome == "new" and rows[first].outcome == "duplicate"
    assert len(await store.list_tickets(conn)) == 1


@pytest.mark.sqlite_only
async def test_a_worker_holds_back_for_the_intake_write_under_way_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from gateway import intake_signal
    from gateway.intake_signal import IntakeSignal, hold_back

    monkeypatch.setattr(intake_signal, "HOLD_BACK_MAX_SECONDS", 3600.0)
    signal = IntakeSignal()
    with signal.writing():  # a write under way...
        waiting = asyncio.ensure_future(hold_back(signal))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        with signal.writing():  # ...the next already waiting (a steady stream)
            pass  # one of them finished: the worker's turn
        await asyncio.wait_for(waiting, 30)


@pytest.mark.sqlite_only  # the signal is SQLite's; no database is used
def test_a_transaction_is_long_while_intake_is_quiet_and_yields_when_it_asks() -> None:
    """The hold of a batch's transaction (SQLite workers): long while intake is quiet,
    ended the moment intake asks for the lock; short while intake keeps writing."""
    from gateway.intake_signal import IntakeSignal
    from gateway.stages import (
        BATCH_HOLD_INTAKE_SECONDS,
        BATCH_HOLD_QUIET_SECONDS,
        BATCH_HOLD_SECONDS,
        _hold,
        _room,
    )

    assert _hold(None, 0) == BATCH_HOLD_SECONDS  # no signal: inline or PostgreSQL
    signal = IntakeSignal()
    mark = signal.writes_done()
    hold = _hold(signal, mark)
    assert hold == BATCH_HOLD_QUIET_SECONDS > BATCH_HOLD_SECONDS
    assert _room(signal, hold, 0.010) and not _room(signal, hold, hold)
    with signal.writing():  # intake wants the lock: the long transaction ends now
        assert not _room(signal, hold, 0.001)
        assert _hold(signal, mark) == BATCH_HOLD_INTAKE_SECONDS
    # It wrote since we looked: the next transaction is a short one, kept to its bound.
    short = _hold(signal, mark)
    assert short == BATCH_HOLD_INTAKE_SECONDS
    assert _room(signal, short, 0.001) and not _room(signal, short, short)
    assert _hold(signal, signal.writes_done()) == BATCH_HOLD_QUIET_SECONDS
