"""Kept relay sessions and waking on commits, with a real aiosmtpd relay that counts
what a relay operator would see in its log: sessions opened, QUITs, RSETs; it can
close a kept session (421 or a reset) or go silent on it.

No timed assertions: every wait is bounded and waits for an outcome.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
import trustme
from aiosmtpd.smtp import SMTP, LoginPassword

from gateway import store
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.mailer import Mailer, SmtpRelay
from tests.conftest import Sink, database_for, wait_for, write_config
from tests.test_mailer import (PASSWORD, T0, FakeClock, Queued, Recorder, check_password,
                               client_tls, password_file, queue_mail, relay_config, row,
                               server_tls, stop_server)

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL


@dataclass
class CountingRelay(Sink):
    """The conftest sink as the relay, counting sessions, QUITs and RSETs.

    `drop`: what the second and later transactions of a session meet at MAIL:
    "421" (the relay says it is closing) or "reset" (the connection is aborted).
    `hang_session`: that session's second MAIL is never answered (a relay gone silent).
    """

    sessions: int = 0
    quits: int = 0
    rsets: int = 0
    rcpt_replies: list[str] = field(default_factory=list)
    drop: str = ""
    hang_session: int = 0
    servers: dict[Any, int] = field(default_factory=dict)  # protocol -> session number
    transactions: dict[Any, int] = field(default_factory=dict)

    async def handle_MAIL(self, server, session, envelope, address, options):  # noqa: ANN001
        done = self.transactions[server] = self.transactions.get(server, 0) + 1
        if done >= 2 and self.drop == "421":
            return "421 4.4.2 relay.test closing connection: idle too long"
        if done >= 2 and self.drop == "reset":
            server.transport.abort()
            return "250 2.1.0 Ok (never arrives)"
        if done >= 2 and self.servers[server] == self.hang_session:
            await asyncio.Event().wait()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: ANN001
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server, session, envelope):  # noqa: ANN001
        self.rsets += 1
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server, session, envelope):  # noqa: ANN001
        self.quits += 1
        return "221 2.0.0 Bye"

    def hang_up_all(self) -> None:
        """The relay closes every open session (its idle timeout, a restart)."""
        for server in self.servers:
            if server.transport is not None:
                server.transport.close()


@asynccontextmanager
async def counting_relay(**fields: Any) -> AsyncIterator[CountingRelay]:
    relay = CountingRelay(**fields)

    def factory() -> SMTP:
        relay.sessions += 1
        smtp = SMTP(relay, hostname="relay.test")
        relay.servers[smtp] = relay.sessions
        return smtp

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        relay.hang_up_all()
        await server.wait_closed()


def raws(relay: Sink) -> list[bytes]:
    return [raw for _, _, raw in relay.messages]


async def queue_many(conn: aiosqlite.Connection, count: int, first_ticket: int) -> list[Queued]:
    """`count` mails queued at once, one ticket each (so they may leave in parallel)."""
    now = store.utcnow()
    return [await queue_mail(conn, now, ticket=first_ticket + n) for n in range(count)]


async def all_sent(conn: aiosqlite.Connection) -> bool:
    return all(r.status == "sent" for r in await store.list_outbox(conn))


@pytest.mark.parametrize("connections", [1, 3])
async def test_many_mails_go_over_the_kept_sessions_and_stop_quits_them(
        conn: aiosqlite.Connection, tmp_path: Path, connections: int) -> None:
    async with counting_relay() as relay:
        config = relay_config(tmp_path, relay.port, connections=connections)
        queued = await queue_many(conn, 12, 100000)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config)
        await mailer.start()
        try:
            await wait_for(lambda: all_sent(conn), timeout=30)
            assert relay.quits == 0  # still open for the next mail
        finally:
            await mailer.stop(grace=2)
        assert 1 <= relay.sessions <= connections
        assert sorted(raws(relay)) == sorted(q.raw for q in queued)  # each once
        await wait_for(lambda: relay.quits == relay.sessions, timeout=30)
        assert [(await row(conn, q.id)).attempts for q in queued] == [1] * 12


async def test_a_refused_mail_is_reset_and_the_session_carries_the_next(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    async with counting_relay(rcpt_replies=["550 5.1.1 No such user"]) as relay:
        config = relay_config(tmp_path, relay.port, connections=1)
        refused, *others = await queue_many(conn, 3, 200000)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config)
        await mailer.start()
        try:
            await wait_for(lambda: len(relay.messages) == 2, timeout=30)
        finally:
            await mailer.stop(grace=2)
        assert raws(relay) == [q.raw for q in others]
        assert relay.sessions == 1 and relay.rsets >= 1
        failed = await row(conn, refused.id)
        assert failed.status == "failed" and "550 5.1.1 No such user" in (failed.last_error or "")


@pytest.mark.parametrize("drop", ["421", "reset"])
async def test_a_kept_session_the_relay_closed_costs_nothing(
        conn: aiosqlite.Connection, tmp_path: Path, drop: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The relay ends every session at its second MAIL: each mail after the first
    goes on a new session at once, no retry recorded, none lost, none twice."""
    async with counting_relay(drop=drop) as relay:
        config = relay_config(tmp_path, relay.port, connections=1)
        queued = await queue_many(conn, 3, 300000)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config)
        with caplog.at_level(logging.INFO, logger="gateway.mailer"):
            await mailer.start()
            try:
                await wait_for(lambda: all_sent(conn), timeout=30)
            finally:
                await mailer.stop(grace=2)
    assert raws(relay) == [q.raw for q in queued]
    assert relay.sessions == 3
    for q in queued:
        sent = await row(conn, q.id)
        assert (sent.status, sent.attempts, sent.last_error) == ("sent", 1, None)
    assert sum("closed a kept session" in r.getMessage() for r in caplog.records) == 2


async def test_sessions_the_relay_hung_up_between_mails_lose_nothing(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    async with counting_relay() as relay:
        config = relay_config(tmp_path, relay.port, connections=2)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config,
                        poll_interval=3600)
        await mailer.start()
        try:
            first = await queue_mail(conn, store.utcnow(), ticket=400001)
            mailer.wake()
            await wait_for(lambda: all_sent(conn), timeout=30)
            relay.hang_up_all()  # the relay's idle timeout, while we wait for mail
            second = await queue_mail(conn, store.utcnow(), ticket=400002)
            mailer.wake()
            await wait_for(lambda: len(relay.messages) == 2, timeout=30)
            await wait_for(lambda: all_sent(conn), timeout=30)
        finally:
            await mailer.stop(grace=2)
    assert raws(relay) == [first.raw, second.raw]
    assert relay.sessions == 2
    assert [(await row(conn, q.id)).attempts for q in (first, second)] == [1, 1]


async def test_an_idle_session_is_closed_with_quit_and_reopened_for_the_next_mail(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    async with counting_relay() as relay:
        config = relay_config(tmp_path, relay.port, connections=1)
        transport = SmtpRelay(config, local_hostname="gw.test", keep_alive=0.2)
        mailer = Mailer(conn, transport, config, poll_interval=3600)
        await mailer.start()
        try:
            first = await queue_mail(conn, store.utcnow(), ticket=500001)
            mailer.wake()
            await wait_for(lambda: relay.messages, timeout=30)
            await wait_for(lambda: relay.quits == 1, timeout=30)
            assert relay.sessions == 1
            second = await queue_mail(conn, store.utcnow(), ticket=500002)
            mailer.wake()
            await wait_for(lambda: len(relay.messages) == 2, timeout=30)
        finally:
            await mailer.stop(grace=2)
    assert raws(relay) == [first.raw, second.raw]
    assert relay.sessions == 2


async def test_keep_alive_0_is_a_new_session_per_mail(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    async with counting_relay() as relay:
        config = relay_config(tmp_path, relay.port, connections=1, keep_alive="0")
        queued = await queue_many(conn, 3, 600000)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config)
        await mailer.start()
        try:
            await wait_for(lambda: all_sent(conn), timeout=30)
            await wait_for(lambda: relay.quits == 3, timeout=30)
        finally:
            await mailer.stop(grace=2)
    assert raws(relay) == [q.raw for q in queued]
    assert relay.sessions == 3


def test_keep_alive_is_checked_by_the_config_loader(tmp_path: Path) -> None:
    def config_file(outbound: str) -> Path:
        path = tmp_path / "gw.toml"
        path.write_text(f'[storage]\ndatabase = "{tmp_path}/gw.db"\n'
                        f'[outbound]\nmaildir = "{tmp_path}/outbox"\n{outbound}')
        return path

    with pytest.raises(ConfigError) as caught:
        load_config(config_file('keep_alive = "a while"\n'))
    assert str(caught.value).startswith("outbound.keep_alive: ") and "\n" not in str(caught.value)
    assert load_config(config_file('keep_alive = "0"\n')).outbound.keep_alive == "0"
    assert load_config(config_file("")).outbound.keep_alive == "30s"


async def test_a_kept_session_gone_silent_does_not_stop_mail_on_the_others(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    """Session 1 answers its first mail, then never again: the mail on it is cut off
    by the session timeout and goes again later, the rest leave meanwhile."""
    async with counting_relay(hang_session=1) as relay:
        config = relay_config(tmp_path, relay.port, connections=3, retry_first="1s",
                              retry_max="1s")
        # The session timeout bounds every mail: long enough that on a loaded CI machine
        # the four others are surely through while the hung one still hangs.
        transport = SmtpRelay(config, local_hostname="gw.test", timeout=30, session_timeout=10)
        mailer = Mailer(conn, transport, config)
        await mailer.start()
        try:
            first = await queue_mail(conn, store.utcnow(), ticket=700000)
            mailer.wake()
            await wait_for(lambda: all_sent(conn), timeout=30)  # session 1 is kept
            burst = await queue_many(conn, 5, 700001)
            mailer.wake()
            # Four leave on other sessions while one mail hangs on session 1 (waited for
            # as marked: the relay records a mail before its 250 reaches the mailer).
            await wait_for(lambda: len(relay.messages) == 5, timeout=30)
            await wait_for(lambda: _statuses_are(conn, sent=5, sending=1), timeout=30)
            stuck = [r for r in await store.list_outbox(conn) if r.status == "sending"]
            assert len(stuck) == 1 and len(relay.messages) == 5
            # Cut off after 10 s, retried after 1 s on a new session: sent once.
            await wait_for(lambda: all_sent(conn), timeout=60)
        finally:
            await mailer.stop(grace=2)
    assert sorted(raws(relay)) == sorted(q.raw for q in [first, *burst])
    again = await row(conn, stuck[0].id)
    assert again.attempts == 2 and again.sent_at is not None


# --- woken by commits of other connections and processes ------------------------------

async def test_a_row_committed_on_another_connection_wakes_the_idle_mailer(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    """No wake() and a poll of an hour: only the commit (data_version) can wake it."""
    async with counting_relay() as relay:
        config = relay_config(tmp_path, relay.port)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config,
                        poll_interval=3600)
        await mailer.start()
        other = await store.connect(database_for(tmp_path))
        try:
            await asyncio.sleep(0.2)  # the mailer found nothing and is idle
            queued = [await queue_mail(other, store.utcnow(), ticket=800000 + n)
                      for n in range(3)]
            await wait_for(lambda: len(relay.messages) == 3, timeout=30)
        finally:
            await other.close()
            await mailer.stop(grace=2)
    assert sorted(raws(relay)) == sorted(q.raw for q in queued)


async def test_outbox_retry_from_the_cli_process_wakes_the_idle_mailer(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    async with counting_relay() as relay:
        relay.fail_next.append("554 5.7.1 Rejected for now")
        config = relay_config(tmp_path, relay.port)
        mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.test"), config,
                        poll_interval=3600)
        queued = await queue_mail(conn, store.utcnow())
        await mailer.start()
        try:
            await wait_for(lambda: _status_is(conn, queued.id, "failed"), timeout=30)
            config_file = write_config(tmp_path, sink=relay)
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "outbox", "retry", str(queued.id),
                "--config", str(config_file),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(cli.communicate(), 60)
            assert cli.returncode == 0, err.decode()
            assert b"queued again" in out
            await wait_for(lambda: relay.messages, timeout=30)
            await wait_for(lambda: _status_is(conn, queued.id, "sent"), timeout=30)
        finally:
            await mailer.stop(grace=2)
    assert raws(relay) == [queued.raw]


async def _statuses_are(conn: aiosqlite.Connection, **counts: int) -> bool:
    statuses = Counter(r.status for r in await store.list_outbox(conn))
    return statuses == Counter(counts)


async def _status_is(conn: aiosqlite.Connection, outbox_id: int, status: str) -> bool:
    return (await row(conn, outbox_id)).status == status


@dataclass
class QuitCounter(Recorder):
    quits: int = 0

    async def handle_QUIT(self, server, session, envelope):  # noqa: ANN001
        self.quits += 1
        return "221 2.0.0 Bye"


async def test_a_kept_session_keeps_its_tls_and_login(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    """The second mail rides the first one's STARTTLS and AUTH: still encrypted and
    authenticated, with no new handshake."""
    ca = trustme.CA()
    handler = QuitCounter()
    sessions = 0

    def factory() -> SMTP:
        nonlocal sessions
        sessions += 1
        return SMTP(handler, hostname="relay.test", tls_context=server_tls(ca),
                    require_starttls=True, authenticator=check_password, auth_required=True)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    config = relay_config(tmp_path, server.sockets[0].getsockname()[1], starttls=True,
                          username="gateway", password_file=password_file(tmp_path))
    transport = SmtpRelay(config, local_hostname="gw.test", tls_context=client_tls(ca))
    mailer = Mailer(conn, transport, config, clock=FakeClock())
    queued = [await queue_mail(conn, T0, ticket=900000 + n) for n in range(2)]
    try:
        assert await mailer.run_once() and await mailer.run_once()
        await mailer.stop()  # never started: closes the kept session all the same
    finally:
        await stop_server(server)
    assert sessions == 1 and handler.quits == 1
    assert [m[0] for m in handler.messages] == [q.raw for q in queued]
    assert all(over_tls and auth == LoginPassword(b"gateway", PASSWORD.encode())
               for _, over_tls, auth in handler.messages)
