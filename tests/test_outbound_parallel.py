"""Outbound robustness: a black-hole relay session cannot hold the queue (parallel
sessions and a session timeout), and a relay signed by a private CA (ca_file)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiosqlite
import pytest
from aiosmtpd.smtp import SMTP

from gateway import store
from gateway.mailer import Mailer, SmtpRelay
from tests.test_mailer import (Recorder, queue_mail, relay_config, row, server_tls,
                               stop_server)
from tests.conftest import wait_for

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL


class BlackHole(asyncio.Protocol):
    """Accepts the connection and never says a word."""

    def __init__(self, held: list[asyncio.Transport]) -> None:
        self.held = held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.held.append(transport)  # type: ignore[arg-type]


async def relay_whose_first_session_hangs(handler: Recorder) -> tuple[asyncio.AbstractServer, int, list]:
    held: list[asyncio.Transport] = []
    sessions = 0

    def factory() -> asyncio.Protocol:
        nonlocal sessions
        sessions += 1
        return BlackHole(held) if sessions == 1 else SMTP(handler, hostname="relay.test")

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], held


async def sent_row(conn: aiosqlite.Connection, outbox_id: int):  # noqa: ANN201
    """The outbox row once it is marked sent, else None."""
    found = await row(conn, outbox_id)
    return found if found.status == "sent" else None


async def test_a_black_hole_session_does_not_stop_the_other_mail(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    handler = Recorder()
    server, port, held = await relay_whose_first_session_hangs(handler)
    config = relay_config(tmp_path, port, connections=3, retry_first="1s", retry_max="1s")
    # The session timeout bounds every mail, not only the hung one: long enough that on
    # a loaded CI machine the four others are surely done and the hung one still hangs
    # when they are (with 2 s it had been cut off and was pending again).
    transport = SmtpRelay(config, local_hostname="gw.test", timeout=30, session_timeout=10)
    now = store.utcnow()
    stuck = await queue_mail(conn, now, ticket=111111)
    others = [await queue_mail(conn, now, ticket=200000 + n) for n in range(4)]
    mailer = Mailer(conn, transport, config)
    try:
        await mailer.start()
        # Every other mail leaves while the first session still hangs...
        await wait_for(lambda: len(handler.messages) == 4, timeout=30)
        assert held and (await row(conn, stuck.id)).status == "sending"
        assert sorted(m[0] for m in handler.messages) == sorted(q.raw for q in others)
        # ...and the hung one is cut off by the session timeout and goes again.
        await wait_for(lambda: len(handler.messages) == 5, timeout=60)
        # The relay records the mail before its 250 reaches the mailer, which marks the
        # row only then: wait for the mark rather than race it.
        stuck_row = await wait_for(lambda: sent_row(conn, stuck.id))
        assert stuck_row.attempts == 2
        assert handler.messages[-1][0] == stuck.raw
    finally:
        await mailer.stop(grace=2)
        for transport_ in held:
            transport_.close()
        await stop_server(server)


async def test_mails_of_one_ticket_keep_their_order_across_sessions(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    handler = Recorder()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, hostname="relay.test"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = relay_config(tmp_path, port, connections=4)
    now = store.utcnow()
    queued = [await queue_mail(conn, now, ticket=123456, subject=f"Mail {n}") for n in range(6)]
    mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config)
    try:
        await mailer.start()
        await wait_for(lambda: len(handler.messages) == 6, timeout=30)
    finally:
        await mailer.stop(grace=2)
        await stop_server(server)
    assert [m[0] for m in handler.messages] == [q.raw for q in queued]


async def test_relay_with_a_private_ca_is_verified_against_ca_file(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme", reason="trustme makes the private CA")
    ca = trustme.CA()
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = Recorder()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, hostname="relay.test", tls_context=server_tls(ca),
                     require_starttls=True), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = relay_config(tmp_path, port, starttls=True, ca_file=ca_file)
    queued = await queue_mail(conn, store.utcnow())
    mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config)
    try:
        assert await mailer.run_once()
        # Without ca_file the same relay is not trusted: retried, nothing sent.
        second = await queue_mail(conn, store.utcnow(), ticket=222222)
        plain = replace(config, ca_file=None)
        other = Mailer(conn, SmtpRelay(plain, local_hostname="gw.test"), plain)
        assert await other.run_once()
    finally:
        await stop_server(server)
    assert (await row(conn, queued.id)).status == "sent"
    assert [m[0] for m in handler.messages] == [queued.raw]
    second_row = await row(conn, second.id)
    assert second_row.status == "pending" and "CERTIFICATE_VERIFY_FAILED" in second_row.last_error


def test_unreadable_ca_file_is_a_one_line_error(tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        SmtpRelay(relay_config(tmp_path, 25, starttls=True, ca_file=bad))
    assert str(caught.value).startswith("outbound.ca_file: ") and "\n" not in str(caught.value)
