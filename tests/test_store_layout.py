"""The store package: the one place of aiosqlite's private API, typed rows, named
queue states (a real SQLite file in tmp_path, migrations applied)."""

from __future__ import annotations

import ast
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite
import pytest

import gateway
from gateway import store
from gateway.model import HeldStatus, Inbound, InboundState, OutboxStatus

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
RAW = (b"From: anna@example.com\r\nTo: serwis@s4e.pl\r\nSubject: Awaria\r\n"
       b"Message-ID: <a1@example.com>\r\n\r\nSerwer nie dziala.\r\n")


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    db = await store.connect(tmp_path / "gw.db")
    await store.migrate(db)
    try:
        yield db
    finally:
        await db.close()


def _private_aiosqlite_uses(path: Path) -> list[str]:
    """`x._execute` anywhere, and `x._conn` where x is not `self` (our own classes
    name their connection `self._conn`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value.id if isinstance(node.value, ast.Name) else ""
        if node.attr == "_execute" or (node.attr == "_conn" and owner != "self"):
            found.append(f"{owner}.{node.attr}")
    return found


def test_aiosqlite_private_api_is_called_in_one_place_only() -> None:
    root = Path(gateway.__file__).parent
    uses = {str(p.relative_to(root)): _private_aiosqlite_uses(p) for p in root.rglob("*.py")}
    assert {p: u for p, u in uses.items() if u} == {
        "store/connection.py": ["conn._execute", "conn._conn"]}


async def test_run_on_thread_runs_on_the_connections_thread(conn: aiosqlite.Connection) -> None:
    """Fails when aiosqlite's private `_execute` / `_conn` change (pinned <0.23)."""
    ident, answer = await store.run_on_thread(
        conn, lambda db: (threading.get_ident(), db.execute("SELECT 41 + 1").fetchone()[0]))
    assert answer == 42
    assert ident != threading.get_ident()


async def test_inbound_rows_carry_named_states(conn: aiosqlite.Connection) -> None:
    writer = store.IntakeWriter(conn)
    writer.start()
    try:
        stored = await writer.store(Inbound("127.0.0.1", "anna@example.com",
                                            ("serwis@s4e.pl",), RAW, NOW))
    finally:
        await writer.stop()
    row = await store.get_inbound(conn, stored.id)
    assert row is not None and row.state is InboundState.QUEUED
    claimed = await store.claim_inbound(conn)
    assert claimed is not None and claimed.state is InboundState.PROCESSING
    await store.mark_inbound(conn, stored.id, state=InboundState.DONE, outcome="new")
    details = await store.inbound_details(conn, stored.id)
    assert isinstance(details, store.InboundDetails)
    assert details.state is InboundState.DONE
    assert details.rcpt_tos == ("serwis@s4e.pl",)
    assert await store.count_inbound_by_state(conn) == {InboundState.DONE: 1}
    assert await store.inbound_report(conn, stored.id) == store.StoredReport(None, None)


async def test_outbox_rows_carry_named_states_and_json_keeps_the_words(
        conn: aiosqlite.Connection) -> None:
    outbox_id = await store.enqueue_outbox(
        conn, ticket=None, inbound_id=None, kind="acknowledgement", message_id="<o1@s4e.pl>",
        mail_from="crm@s4e.pl", rcpt_to="anna@example.com", subject="[#123456] Awaria",
        auto=True, raw=b"Subject: x\r\n\r\nx\r\n", now=NOW)
    row = await store.claim_due_outbox(conn, NOW)
    assert row is not None and row.id == outbox_id and row.status is OutboxStatus.SENDING
    await store.mark_outbox_sent(conn, [outbox_id], NOW)
    sent = await store.get_outbox(conn, outbox_id)
    assert sent is not None and sent.status is OutboxStatus.SENT
    assert json.loads(json.dumps(sent.as_json()))["status"] == "sent"
    assert '"status": "sent"' in json.dumps(sent.as_json())
    assert [r.id for r in await store.list_outbox(conn, OutboxStatus.SENT)] == [outbox_id]
    assert await store.list_outbox(conn, OutboxStatus.PENDING) == []


async def test_ticket_thread_history_attachments_held_and_contracts_are_typed_rows(
        conn: aiosqlite.Connection) -> None:
    number = await store.create_ticket(
        conn, values={"status": "accepted", "subject": "Awaria",
                      "reporter_email": "anna@example.com"}, now=NOW, draw=lambda: 123456)
    await store.add_ticket_message(
        conn, ticket=number, direction="out", from_addr="crm@s4e.pl",
        to_addrs=["anna@example.com", "biuro@example.com"], subject="[#123456] Awaria",
        message_id="<o1@s4e.pl>", date=NOW, body="Przyjęliśmy zgłoszenie.", kind="notice")
    await store.add_history(conn, ticket=number, from_status=None, to_status="accepted",
                            actor="gateway", note=None, now=NOW)
    await conn.execute("INSERT INTO contracts (device_id, customer, repair_hours, imported_at)"
                       " VALUES ('SN-1', 'Firma', 8, ?)", (store.iso(NOW),))

    (message,) = await store.ticket_thread(conn, number)
    assert message == store.MessageRow(
        message.id, number, "out", None, None, "crm@s4e.pl",
        ("anna@example.com", "biuro@example.com"), "[#123456] Awaria", "<o1@s4e.pl>",
        "Przyjęliśmy zgłoszenie.", store.iso(NOW), "notice", None, None, None)
    (history,) = await store.ticket_history(conn, number)
    assert (history.to_status, history.actor, history.at) == ("accepted", "gateway",
                                                              store.iso(NOW))
    assert await store.ticket_attachments(conn, number) == []
    (contract,) = await store.list_contracts(conn)
    assert contract == store.ContractRow("SN-1", "Firma", 8, store.iso(NOW))
    with pytest.raises(dataclasses.FrozenInstanceError):
        contract.repair_hours = 24  # type: ignore[misc]


async def test_held_rows_move_from_held_to_released_once(conn: aiosqlite.Connection) -> None:
    writer = store.IntakeWriter(conn)
    writer.start()
    try:
        stored = await writer.store(Inbound("127.0.0.1", "anna@example.com",
                                            ("crm@s4e.pl",), RAW, NOW))
    finally:
        await writer.stop()
    await store.add_held(conn, inbound_id=stored.id, ticket=None, sender="anna@example.com",
                         subject="Awaria", reason="unknown sender", now=NOW)
    (held,) = await store.list_held(conn)
    assert isinstance(held, store.HeldRow) and held.status is HeldStatus.HELD
    assert await store.decide_held(conn, held.id, HeldStatus.RELEASED, NOW, actor="ops")
    assert not await store.decide_held(conn, held.id, HeldStatus.DROPPED, NOW, actor="ops")
    assert await store.list_held(conn) == []
    decided = await store.held_of_inbound(conn, stored.id)
    assert decided is not None
    assert (decided.status, decided.decided_by) == (HeldStatus.RELEASED, "ops")


async def test_a_transaction_cancelled_while_it_waits_for_the_lock_holds_nothing(
        tmp_path: Path) -> None:
    # A timeout around a write (the /healthz probe) cancels BEGIN while SQLite still
    # waits for the lock in its thread; the lock then frees and BEGIN succeeds after
    # all. The connection must not be left holding the write lock with nobody to commit.
    import asyncio
    import sqlite3

    db = await store.connect(tmp_path / "gw.db")
    await store.migrate(db)
    other = sqlite3.connect(tmp_path / "gw.db", isolation_level=None,
                            check_same_thread=False)
    # The order is the test's, not a timer's (a loaded CI machine once ran the 0.1 s
    # timeout after the 0.3 s release): BEGIN is sent, the write is cancelled, and only
    # then does the lock free.
    began = asyncio.Event()
    execute = db.execute

    def noting_begin(sql: str, *args: object):  # noqa: ANN202 - aiosqlite's own type
        if sql == "BEGIN IMMEDIATE":
            began.set()
        return execute(sql, *args)

    db.execute = noting_begin  # type: ignore[method-assign]
    try:
        other.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with store.Tx(db):
                await db.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")

        writing = asyncio.create_task(write())
        await asyncio.wait_for(began.wait(), 30)
        writing.cancel()  # as the timeout around the write does
        other.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert not db.in_transaction
        other.execute("BEGIN IMMEDIATE")  # the lock is free: nobody kept it
        other.execute("ROLLBACK")
        await write()  # and the connection writes on
        assert [tuple(row) for row in await db.execute_fetchall(
            "SELECT value FROM settings WHERE key = 'k'")] == [("v",)]
    finally:
        other.close()
        await db.close()
