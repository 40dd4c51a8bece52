"""The automatic-answer cap's count (SPEC: max_auto_replies_per_hour): per address,
and only as far as the cap, so a storm from one address costs each of its messages
the same however long it lasts."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import store
from gateway.model import Inbound
from tests.conftest import INTAKE, make_config, make_mail

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
UNIQUE = itertools.count()  # Message-IDs of the rows made here


@pytest.fixture
async def conn(tmp_path: Path) -> Any:
    db = await store.connect(make_config(tmp_path).storage.database)
    await store.migrate(db)
    try:
        yield db
    finally:
        await db.close()


async def answered(conn: Any, rcpt: str, count: int, *, at: datetime = NOW,
                   auto: bool = True, inbound: bool = True) -> None:
    """`count` answers to `rcpt`, each for an inbound message of its own."""
    writer = store.IntakeWriter(conn)
    writer.start()
    try:
        for _ in range(count):
            inbound_id = None
            if inbound:
                stored = await writer.store(Inbound(
                    "192.0.2.1", rcpt, (INTAKE,),
                    make_mail(message_id=f"<in.{next(UNIQUE)}@example.com>"), at))
                inbound_id = stored.id
            async with store.Tx(conn):
                await store.enqueue_outbox(
                    conn, ticket=None, inbound_id=inbound_id, kind="acknowledgement",
                    message_id=f"<ack.{next(UNIQUE)}@s4e.pl>",
                    mail_from="crm@s4e.pl", rcpt_to=rcpt, subject="Zgłoszenie", auto=auto,
                    raw=b"Subject: x\r\n\r\nx\r\n", now=at)
    finally:
        await writer.stop()


async def test_the_count_stops_at_the_cap(conn: Any) -> None:
    await answered(conn, "storm@example.com", 30)
    await answered(conn, "Anna+serwis@Example.com", 3)
    since = NOW - timedelta(hours=1)
    assert await store.auto_replies_since(conn, ["storm@example.com"], since, at_most=20) == 20
    assert await store.auto_replies_since(conn, ["storm@example.com"], since, at_most=100) == 30
    # Per address, without the +tag and case; the larger of the two.
    assert await store.auto_replies_since(conn, ["anna@example.com"], since, at_most=20) == 3
    assert await store.auto_replies_since(
        conn, ["anna@example.com", "storm@example.com"], since, at_most=25) == 25
    assert await store.auto_replies_since(conn, ["nobody@example.com", ""], since,
                                          at_most=20) == 0
    # A cap of 0 answers nobody: nothing to count.
    assert await store.auto_replies_since(conn, ["storm@example.com"], since, at_most=0) == 0


async def test_only_automatic_answers_to_inbound_mail_within_the_hour_count(conn: Any) -> None:
    await answered(conn, "jan@example.com", 2)
    await answered(conn, "jan@example.com", 4, at=NOW - timedelta(hours=2))
    await answered(conn, "jan@example.com", 3, auto=False)  # an engineer's answer
    await answered(conn, "jan@example.com", 5, inbound=False)  # a notice staff caused
    since = NOW - timedelta(hours=1)
    assert await store.auto_replies_since(conn, ["jan@example.com"], since, at_most=20) == 2
