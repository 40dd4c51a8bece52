"""The outbox worker and its transports, with real parts: a SQLite file in tmp_path, a
real aiosmtpd server as the relay (plain, STARTTLS with a trustme certificate, AUTH),
a port where nothing listens for "relay down", and real files for the maildir.

Time is a fake clock the tests move forward: retries are checked to the second
without sleeping. Rows are built as production builds them: `compose_message` with a
signed Message-ID, queued with `enqueue_outbox` inside a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import aiosqlite
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from gateway import store
from gateway.config import OutboundConfig
from gateway.errors import GatewayError
from gateway.mailer import (
    MaildirDrop,
    Mailer,
    PermanentFailure,
    SmtpRelay,
    TemporaryFailure,
    make_transport,
    next_retry,
)
from gateway.model import Outgoing
from gateway.msgid import make_message_id, new_key
from gateway.compose import compose_message
from tests.conftest import CRM, Sink, database_for, wait_for

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

T0 = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
KEY = new_key()
CUSTOMER = "jan.kowalski@example.com"
PASSWORD = "s3cret pass wörd"


class FakeClock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Queued:
    id: int
    message_id: str
    raw: bytes


async def queue_mail(conn: aiosqlite.Connection, now: datetime, *, ticket: int = 123456,
                     to: str = CUSTOMER, subject: str = "Awaria serwera",
                     rcpt_to: str | None = None) -> Queued:
    out = Outgoing(
        kind="acknowledgement", ticket=ticket, to=to,
        subject=f"[#{ticket:06d}] {subject}",
        body=f"Dzień dobry,\nprzyjęliśmy zgłoszenie #{ticket:06d}.\n",
        in_reply_to="<CAF1234@mail.example.com>", references=("<CAF1234@mail.example.com>",),
        auto=True)
    message_id = make_message_id(KEY, "s4e.pl", ticket)
    raw = compose_message(out, from_addr=CRM, message_id=message_id, date=now)
    async with store.Tx(conn):
        outbox_id = await store.enqueue_outbox(
            conn, ticket=ticket, inbound_id=None, kind=out.kind, message_id=message_id,
            mail_from=CRM, rcpt_to=rcpt_to or to, subject=out.subject, auto=True, raw=raw, now=now)
    return Queued(outbox_id, message_id, raw)


def relay_config(tmp_path: Path, port: int, **changes: object) -> OutboundConfig:
    values: dict[str, object] = dict(
        transport="smtp", relay=f"127.0.0.1:{port}", maildir=tmp_path / "outbox",
        retry_first="1m", retry_max="4m", give_up_after="5d")
    values.update(changes)
    return OutboundConfig(**values)  # type: ignore[arg-type]


def relay(config: OutboundConfig, **kwargs: object) -> SmtpRelay:
    return SmtpRelay(config, local_hostname="gw.test", **kwargs)  # type: ignore[arg-type]


def closed_port() -> socket.socket:
    """A bound socket that does not listen: connecting to it is refused at once. Pass it
    to `start_server(sock=...)` later to bring "the relay" up on that very port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def start_server(handler: object, *, sock: socket.socket | None = None,
                       **smtp_kwargs: object) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    factory = lambda: SMTP(handler, hostname="relay.test", **smtp_kwargs)  # noqa: E731
    if sock is not None:
        server = await loop.create_server(factory, sock=sock)
    else:
        server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def stop_server(server: asyncio.AbstractServer) -> None:
    server.close()
    await server.wait_closed()


async def drain(mailer: Mailer) -> int:
    """run_once until nothing is due; how many rows were handled."""
    count = 0
    while await mailer.run_once():
        count += 1
        assert count < 100, "run_once keeps finding due rows"
    return count


async def row(conn: aiosqlite.Connection, outbox_id: int) -> store.OutboxRow:
    found = await store.get_outbox(conn, outbox_id)
    assert found is not None
    return found


def due(r: store.OutboxRow) -> datetime:
    return datetime.fromisoformat(r.next_attempt_at)


@dataclass
class Recorder:
    """An aiosmtpd handler that records every command it sees and can refuse MAIL or
    RCPT; DATA is answered from `data_replies` (default 250)."""

    mail_reply: str = "250 2.1.0 Ok"
    rcpt_reply: str = "250 2.1.5 Ok"
    data_replies: list[str] = field(default_factory=list)
    mails: list[str] = field(default_factory=list)
    messages: list[tuple[bytes, bool, object]] = field(default_factory=list)

    async def handle_MAIL(self, server, session, envelope, address, options):  # noqa: ANN001
        self.mails.append(address)
        if self.mail_reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return self.mail_reply

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: ANN001
        if self.rcpt_reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return self.rcpt_reply

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append((envelope.original_content, session.ssl is not None,
                              session.auth_data))
        return "250 2.0.0 Ok: recorded"


# --- pure helpers -----------------------------------------------------------------

def test_next_retry_doubles_from_first_and_is_capped() -> None:
    assert [next_retry(n, 60, 3600) for n in range(1, 9)] == [
        60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert next_retry(0, 60, 3600) == 60
    assert next_retry(10_000, 60, 3600) == 3600


# --- SMTP relay through the worker ------------------------------------------------

async def test_happy_path_woken_mail_is_sent_once_with_its_headers(
        conn: aiosqlite.Connection, smtp_sink: Sink, tmp_path: Path) -> None:
    config = relay_config(tmp_path, smtp_sink.port)
    results: list[str] = []
    # A poll far longer than the wait below: arriving before it proves wake().
    mailer = Mailer(conn, relay(config), config, on_result=results.append, poll_interval=60)
    await mailer.start()
    try:
        await asyncio.sleep(0.1)  # the worker found nothing and went idle
        queued = await queue_mail(conn, store.utcnow())
        mailer.wake()
        await wait_for(lambda: smtp_sink.messages, timeout=20)
        await wait_for(lambda: results, timeout=20)
    finally:
        await mailer.stop()

    assert len(smtp_sink.messages) == 1
    mail_from, rcpts, received = smtp_sink.messages[0]
    assert (mail_from, rcpts) == (CRM, [CUSTOMER])
    assert received == queued.raw
    msg = smtp_sink.parsed()[0]
    assert msg["Message-ID"] == queued.message_id
    assert msg["From"].addresses[0].addr_spec == CRM
    assert msg["To"] == CUSTOMER
    assert msg["Subject"] == "[#123456] Awaria serwera"
    assert msg["In-Reply-To"] == "<CAF1234@mail.example.com>"
    assert msg["Auto-Submitted"] == "auto-replied"
    sent = await row(conn, queued.id)
    assert (sent.status, sent.attempts, sent.last_error) == ("sent", 1, None)
    assert sent.sent_at is not None
    assert results == ["sent"]


async def test_send_is_logged_on_one_line_per_mail(
        conn: aiosqlite.Connection, smtp_sink: Sink, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    config = relay_config(tmp_path, smtp_sink.port)
    mailer = Mailer(conn, relay(config), config, clock=FakeClock())
    queued = await queue_mail(conn, T0)
    with caplog.at_level(logging.INFO, logger="gateway.mailer"):
        assert await mailer.run_once()
    assert [r.getMessage() for r in caplog.records] == [
        f"{queued.message_id} outbox {queued.id} sent to {CUSTOMER} (ticket #123456)"]


async def test_relay_down_then_451_then_up_every_row_once_with_growing_delays(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    sock = closed_port()
    port = sock.getsockname()[1]
    config = relay_config(tmp_path, port, retry_first="1m", retry_max="4m")
    clock = FakeClock()
    results: list[str] = []
    mailer = Mailer(conn, relay(config), config, clock=clock, on_result=results.append)
    queued = [await queue_mail(conn, T0, ticket=100000 + i) for i in range(3)]

    sink = Sink(fail_next=["451 4.3.0 try later"] * 6)  # two rounds of 451 for 3 rows
    server = None
    delays = []
    try:
        for attempt in range(1, 6):
            if attempt == 3:  # the relay comes up, but answers 451 twice per row
                server, _ = await start_server(sink, sock=sock)
            assert await drain(mailer) == 3
            rows = [await row(conn, q.id) for q in queued]
            assert {r.attempts for r in rows} == {attempt}
            if attempt == 5:
                break
            assert {r.status for r in rows} == {"pending"}
            assert len({due(r) for r in rows}) == 1
            delay = (due(rows[0]) - clock.now).total_seconds()
            delays.append(delay)
            expected = "refused" if attempt <= 2 else "451 4.3.0 try later"
            assert all(expected in (r.last_error or "").lower() for r in rows), rows[0]
            clock.advance(delay - 1)
            assert not await mailer.run_once()  # not due a second early
            clock.advance(1)
    finally:
        if server:
            await stop_server(server)
        else:
            sock.close()

    assert delays == [60, 120, 240, 240]  # first, doubled, doubled, capped at retry_max
    assert sink.attempts == 9  # 6 x 451, then 3 accepted
    received = sorted(str(m["Message-ID"]) for m in sink.parsed())
    assert received == sorted(q.message_id for q in queued)  # none lost, none twice
    assert [raw for _, _, raw in sink.messages] == [q.raw for q in queued]
    assert all(r.status == "sent" for r in await store.list_outbox(conn))
    assert results == ["retry"] * 12 + ["sent"] * 3


async def test_worker_sleeps_until_the_next_retry_is_due(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    """No wake() and no poll: the worker wakes itself when the retry is due."""
    sock = closed_port()
    config = relay_config(tmp_path, sock.getsockname()[1], retry_first="1s", retry_max="1s")
    mailer = Mailer(conn, relay(config), config, poll_interval=60)
    queued = await queue_mail(conn, store.utcnow())
    sink = Sink()
    await mailer.start()
    server = None
    try:
        await wait_for(lambda: _attempts_at_least(conn, queued.id, 1), timeout=20)
        server, _ = await start_server(sink, sock=sock)
        await wait_for(lambda: sink.messages, timeout=20)
    finally:
        await mailer.stop()
        if server:
            await stop_server(server)
        else:
            sock.close()
    assert (await row(conn, queued.id)).status == "sent"
    assert len(sink.messages) == 1


async def test_rows_queued_by_another_process_are_found_without_wake(
        conn: aiosqlite.Connection, smtp_sink: Sink, tmp_path: Path) -> None:
    """The CLI (staff reply, `outbox retry`) queues on its own connection and cannot
    wake() the daemon's mailer: the commit check (or else the idle poll) finds its rows.
    test_outbound_kept proves the commit check alone, with a poll of an hour."""
    config = relay_config(tmp_path, smtp_sink.port)
    mailer = Mailer(conn, relay(config), config, poll_interval=0.2)
    await mailer.start()
    cli = await store.connect(database_for(tmp_path))
    try:
        await asyncio.sleep(0.1)
        queued = await queue_mail(cli, store.utcnow())
        await wait_for(lambda: smtp_sink.messages, timeout=20)
    finally:
        await mailer.stop()
        await cli.close()
    assert [raw for _, _, raw in smtp_sink.messages] == [queued.raw]


async def _attempts_at_least(conn: aiosqlite.Connection, outbox_id: int, n: int) -> bool:
    r = await row(conn, outbox_id)
    return r.attempts >= n and r.status == "pending"


async def test_5xx_fails_at_once_and_operator_retry_sends_it_once(
        conn: aiosqlite.Connection, smtp_sink: Sink, tmp_path: Path) -> None:
    config = relay_config(tmp_path, smtp_sink.port)
    clock = FakeClock()
    results: list[str] = []
    mailer = Mailer(conn, relay(config), config, clock=clock, on_result=results.append)
    queued = await queue_mail(conn, T0)
    smtp_sink.fail_next.append("550 5.7.1 Message rejected as spam")

    assert await mailer.run_once()
    failed = await store.list_outbox(conn, status="failed")
    assert [r.id for r in failed] == [queued.id]
    assert "550 5.7.1 Message rejected as spam" in (failed[0].last_error or "")
    assert results == ["failed"]
    clock.advance(7 * 86400)
    assert not await mailer.run_once()  # failed rows are never retried by themselves
    assert smtp_sink.messages == []

    assert await store.retry_outbox(conn, queued.id, clock.now)
    assert await mailer.run_once()
    assert not await mailer.run_once()
    assert [raw for _, _, raw in smtp_sink.messages] == [queued.raw]
    sent = await row(conn, queued.id)
    # An operator retry starts a fresh series: attempts count from 1 again.
    assert (sent.status, sent.attempts) == ("sent", 1)
    assert results == ["failed", "sent"]


@pytest.mark.parametrize(("mail_reply", "rcpt_reply", "data_reply", "expected"), [
    ("553 5.7.1 Sender address rejected", "250 OK", None, PermanentFailure),
    ("451 4.3.0 Sender check failed", "250 OK", None, TemporaryFailure),
    ("250 OK", "550 5.1.1 No such user", None, PermanentFailure),
    ("250 OK", "450 4.2.0 Greylisted", None, TemporaryFailure),
    ("250 OK", "250 OK", "552 5.3.4 Message too big", PermanentFailure),
    ("250 OK", "250 OK", "421 4.3.2 Shutting down", TemporaryFailure),
])
async def test_relay_replies_map_to_temporary_or_permanent(
        tmp_path: Path, mail_reply: str, rcpt_reply: str, data_reply: str | None,
        expected: type[Exception]) -> None:
    handler = Recorder(mail_reply=mail_reply, rcpt_reply=rcpt_reply,
                       data_replies=[data_reply] if data_reply else [])
    server, port = await start_server(handler)
    try:
        with pytest.raises(expected) as caught:
            await relay(relay_config(tmp_path, port)).send(CRM, CUSTOMER, b"x\r\n", "<a@b>")
    finally:
        await stop_server(server)
    reply = next(r for r in (mail_reply, rcpt_reply, data_reply) if not r.startswith("250"))
    assert reply.split(" ", 1)[1] in str(caught.value)
    assert handler.messages == []


async def test_give_up_after_fails_the_row_with_the_last_error(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    sock = closed_port()
    config = relay_config(tmp_path, sock.getsockname()[1], retry_first="1m", retry_max="1h",
                          give_up_after="5d")
    clock = FakeClock()
    results: list[str] = []
    mailer = Mailer(conn, relay(config), config, clock=clock, on_result=results.append)
    queued = await queue_mail(conn, T0)
    try:
        assert await mailer.run_once()
        assert due(await row(conn, queued.id)) == T0 + timedelta(minutes=1)

        # A minute before the deadline: the retry (2m) is moved to the deadline itself
        # rather than past it.
        clock.now = T0 + timedelta(days=5) - timedelta(minutes=1)
        assert await mailer.run_once()
        waiting = await row(conn, queued.id)
        assert waiting.status == "pending"
        assert due(waiting) == T0 + timedelta(days=5)

        clock.now = T0 + timedelta(days=5)
        assert await mailer.run_once()
    finally:
        sock.close()
    failed = await row(conn, queued.id)
    assert failed.status == "failed"
    assert failed.last_error is not None
    assert failed.last_error.startswith("gave up after 5d: relay 127.0.0.1:")
    assert "refused" in failed.last_error.lower()
    assert "\n" not in failed.last_error
    assert results == ["retry", "retry", "failed"]
    assert not await mailer.run_once()


# --- crashes and restarts ---------------------------------------------------------

async def test_crash_between_250_and_mark_sent_resends_the_identical_mail(
        conn: aiosqlite.Connection, smtp_sink: Sink, tmp_path: Path) -> None:
    config = relay_config(tmp_path, smtp_sink.port)
    transport = relay(config)
    queued = await queue_mail(conn, store.utcnow())
    other = await queue_mail(conn, store.utcnow(), ticket=222222)

    # The process that died: claimed, handed to the relay (250), never marked.
    claimed = await store.claim_due_outbox(conn, store.utcnow())
    assert claimed is not None and claimed.id == queued.id
    raw = await store.read_outbox_raw(conn, claimed.id)
    await transport.send(claimed.mail_from, claimed.rcpt_to, raw, claimed.message_id)
    assert (await row(conn, queued.id)).status == "sending"

    mailer = Mailer(conn, relay(config), config)
    await mailer.start()
    try:
        await wait_for(lambda: len(smtp_sink.messages) >= 3, timeout=20)
        await wait_for(lambda: _all_sent(conn), timeout=20)
    finally:
        await mailer.stop()

    raws = [raw for _, _, raw in smtp_sink.messages]
    assert sorted(raws) == sorted([queued.raw, queued.raw, other.raw])
    assert [str(m["Message-ID"]) for m in smtp_sink.parsed()].count(queued.message_id) == 2
    assert (await row(conn, queued.id)).attempts == 2
    assert (await row(conn, other.id)).attempts == 1


async def _all_sent(conn: aiosqlite.Connection) -> bool:
    return all(r.status == "sent" for r in await store.list_outbox(conn))


async def test_restart_while_relay_is_down_then_every_row_sent_exactly_once(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    sock = closed_port()
    config = relay_config(tmp_path, sock.getsockname()[1])
    clock = FakeClock()
    queued = [await queue_mail(conn, T0, ticket=300000 + i) for i in range(4)]
    sink = Sink()
    server = None
    try:
        first = Mailer(conn, relay(config), config, clock=clock)
        await first.start()
        await wait_for(lambda: _all_pending_after(conn, 1), timeout=20)
        await first.stop()

        # A new process; one more mail queued while none was running.
        queued.append(await queue_mail(conn, T0, ticket=300009))
        second = Mailer(conn, relay(config), config, clock=clock)
        await second.start()
        try:
            await wait_for(lambda: _attempts_are(conn, [1, 1, 1, 1, 1]), timeout=20)
            clock.advance(60)
            second.wake()
            await wait_for(lambda: _attempts_are(conn, [2, 2, 2, 2, 2]), timeout=20)
            assert sink.messages == []

            server, _ = await start_server(sink, sock=sock)  # the relay is back
            clock.advance(120)
            second.wake()
            await wait_for(lambda: _all_sent(conn), timeout=20)
        finally:
            await second.stop()
    finally:
        if server:
            await stop_server(server)
        else:
            sock.close()

    received = [str(m["Message-ID"]) for m in sink.parsed()]
    assert sorted(received) == sorted(q.message_id for q in queued)
    assert sorted(raw for _, _, raw in sink.messages) == sorted(q.raw for q in queued)


async def _all_pending_after(conn: aiosqlite.Connection, attempts: int) -> bool:
    rows = await store.list_outbox(conn)
    return all(r.status == "pending" and r.attempts == attempts for r in rows)


async def _attempts_are(conn: aiosqlite.Connection, expected: list[int]) -> bool:
    rows = await store.list_outbox(conn)
    return all(r.status == "pending" for r in rows) and [r.attempts for r in rows] == expected


async def test_pending_rows_survive_stop_and_start_and_go_once(
        conn: aiosqlite.Connection, smtp_sink: Sink, tmp_path: Path) -> None:
    config = relay_config(tmp_path, smtp_sink.port)
    first = Mailer(conn, relay(config), config)
    await first.start()
    await first.stop()
    queued = [await queue_mail(conn, store.utcnow(), ticket=400000 + i) for i in range(3)]
    assert smtp_sink.messages == []  # nobody running: nothing sent, nothing lost

    second = Mailer(conn, relay(config), config)
    await second.start()
    try:
        await wait_for(lambda: _all_sent(conn), timeout=20)
    finally:
        await second.stop()
    assert sorted(raw for _, _, raw in smtp_sink.messages) == sorted(q.raw for q in queued)


@dataclass
class SlowSink(Sink):
    delay: float = 0.3
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hang: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        self.started.set()
        if self.hang:
            await self.release.wait()
        else:
            await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


async def test_stop_finishes_the_send_in_hand(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    sink = SlowSink(delay=0.3)
    server, port = await start_server(sink)
    config = relay_config(tmp_path, port)
    mailer = Mailer(conn, relay(config), config)
    queued = await queue_mail(conn, store.utcnow())
    try:
        await mailer.start()
        await asyncio.wait_for(sink.started.wait(), 30)
        # A grace far beyond the relay's 0.3 s: on a loaded CI machine too, the send
        # in hand is finished, not cut off.
        await mailer.stop(grace=30)
        assert (await row(conn, queued.id)).status == "sent"
        assert len(sink.messages) == 1
    finally:
        await stop_server(server)


async def test_stop_is_bounded_and_a_cut_off_send_goes_again_on_start(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    sink = SlowSink(hang=True)
    server, port = await start_server(sink)
    config = relay_config(tmp_path, port)
    queued = await queue_mail(conn, store.utcnow())
    try:
        mailer = Mailer(conn, relay(config), config)
        await mailer.start()
        await asyncio.wait_for(sink.started.wait(), 30)
        # The relay hangs until released below: a stop that returns at all did not wait
        # for the send (no wall-clock assertion, which a loaded CI machine would fail).
        await asyncio.wait_for(mailer.stop(grace=0.3), 30)
        assert (await row(conn, queued.id)).status == "sending"

        sink.hang = False
        sink.release.set()
        again = Mailer(conn, relay(config), config)
        await again.start()
        try:
            await wait_for(lambda: _all_sent(conn), timeout=20)
        finally:
            await again.stop()
    finally:
        await stop_server(server)
    # The sink drops a transaction whose client left before its 250 (aiosmtpd cancels
    # the handler); a real relay might deliver it, and then there would be two
    # identical copies: at least once, never a different mail.
    assert [raw for _, _, raw in sink.messages] == [queued.raw]
    assert (await row(conn, queued.id)).attempts == 2


# --- other failures through the Transport seam ------------------------------------

class ScriptedTransport:
    """Another implementation of Transport: raises what it is given, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.sent: list[tuple[str, str, bytes, str]] = []

    async def send(self, mail_from: str, rcpt_to: str, raw: bytes, message_id: str) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append((mail_from, rcpt_to, raw, message_id))


async def test_unexpected_exception_is_retried_not_lost(
        conn: aiosqlite.Connection, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    config = relay_config(tmp_path, 25)
    clock = FakeClock()
    transport = ScriptedTransport(RuntimeError("bug in a transport"))
    mailer = Mailer(conn, transport, config, clock=clock)
    queued = await queue_mail(conn, T0)
    with caplog.at_level(logging.INFO, logger="gateway.mailer"):
        assert await mailer.run_once()
    pending = await row(conn, queued.id)
    assert pending.status == "pending"
    assert pending.last_error == "RuntimeError: bug in a transport"
    assert any(r.exc_info for r in caplog.records)  # logged with its traceback
    clock.advance(60)
    assert await mailer.run_once()
    assert [s[2] for s in transport.sent] == [queued.raw]


async def test_logged_and_stored_errors_have_no_line_breaks(
        conn: aiosqlite.Connection, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    config = relay_config(tmp_path, 25)
    transport = ScriptedTransport(TemporaryFailure("451 first\r\nX-Injected: yes"),
                                  PermanentFailure("550 no\nX-Injected: yes"))
    clock = FakeClock()
    mailer = Mailer(conn, transport, config, clock=clock)
    # The envelope recipient is stored apart from the To header; were one ever to carry
    # a line separator, the log must still show it on one line.
    queued = await queue_mail(conn, T0, rcpt_to="jan\u2028x@example.com")
    with caplog.at_level(logging.INFO, logger="gateway.mailer"):
        assert await mailer.run_once()
        clock.advance(60)
        assert await mailer.run_once()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{queued.message_id} outbox {queued.id} to jan\\u2028x@example.com (ticket #123456):"
        " temporary failure, retry in 1m: 451 first\\r\\nX-Injected: yes",
        f"{queued.message_id} outbox {queued.id} to jan\\u2028x@example.com (ticket #123456):"
        " failed: 550 no\\nX-Injected: yes",
    ]
    assert (await row(conn, queued.id)).last_error == "550 no\\nX-Injected: yes"


# --- maildir ----------------------------------------------------------------------

async def test_maildir_writes_one_complete_file_per_row(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    config = OutboundConfig(maildir=tmp_path / "outbox")
    transport = make_transport(config)
    assert isinstance(transport, MaildirDrop)
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "outbox" / sub).is_dir()
    queued = [await queue_mail(conn, T0, ticket=500000 + i) for i in range(3)]

    # The process that died had claimed two rows: the first was written completely
    # (never marked sent), the second only half-way, still in tmp/.
    first = await store.claim_due_outbox(conn, T0)
    second = await store.claim_due_outbox(conn, T0)
    assert first is not None and second is not None
    await transport.send(first.mail_from, first.rcpt_to, queued[0].raw, first.message_id)
    partial = tmp_path / "outbox" / "tmp" / MaildirDrop.file_name(second.message_id)
    partial.write_bytes(queued[1].raw[:40])
    assert len(list((tmp_path / "outbox" / "new").iterdir())) == 1

    mailer = Mailer(conn, make_transport(config), config, clock=FakeClock())
    await mailer.start()
    try:
        await wait_for(lambda: _all_sent(conn), timeout=20)
    finally:
        await mailer.stop()
    assert [(await row(conn, q.id)).attempts for q in queued] == [2, 2, 1]

    new = sorted((tmp_path / "outbox" / "new").iterdir())
    assert len(new) == 3  # the first row's file was replaced, not doubled
    assert list((tmp_path / "outbox" / "tmp").iterdir()) == []
    assert sorted(p.read_bytes() for p in new) == sorted(q.raw for q in queued)
    for path in new:
        assert path.suffix == ".eml"
        msg = message_from_bytes(path.read_bytes(), policy=policy.default)
        assert msg["Subject"].startswith("[#5000")
        assert "przyjęliśmy zgłoszenie" in msg.get_content()


async def test_maildir_that_cannot_be_written_is_a_temporary_failure(tmp_path: Path) -> None:
    drop = MaildirDrop(tmp_path / "outbox")
    (tmp_path / "outbox" / "new").rmdir()
    (tmp_path / "outbox" / "new").write_text("not a folder")
    with pytest.raises(TemporaryFailure, match="maildir"):
        await drop.send(CRM, CUSTOMER, b"Subject: x\r\n\r\nx\r\n", "<x@s4e.pl>")


def test_maildir_that_cannot_be_created_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(GatewayError) as caught:
        MaildirDrop(tmp_path / "file" / "outbox")
    assert str(caught.value).startswith("outbound.maildir: ")
    assert "\n" not in str(caught.value)


# --- STARTTLS and AUTH ------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def check_password(server, session, envelope, mechanism, auth_data):  # noqa: ANN001
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"gateway"
          and auth_data.password == PASSWORD.encode())
    # handled=False: aiosmtpd itself answers 235 or 535.
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


async def tls_auth_relay(ca: trustme.CA, handler: Recorder) -> tuple[asyncio.AbstractServer, int]:
    return await start_server(handler, tls_context=server_tls(ca), require_starttls=True,
                              authenticator=check_password, auth_required=True)


def password_file(tmp_path: Path, text: str = PASSWORD + "\n") -> Path:
    path = tmp_path / "relay.password"
    path.write_text(text, "utf-8")
    return path


async def test_starttls_and_auth_with_the_password_file(
        conn: aiosqlite.Connection, tmp_path: Path, ca: trustme.CA) -> None:
    handler = Recorder()
    server, port = await tls_auth_relay(ca, handler)
    config = relay_config(tmp_path, port, starttls=True, username="gateway",
                          password_file=password_file(tmp_path))
    mailer = Mailer(conn, relay(config, tls_context=client_tls(ca)), config, clock=FakeClock())
    queued = await queue_mail(conn, T0)
    try:
        assert await mailer.run_once()
    finally:
        await stop_server(server)
    assert (await row(conn, queued.id)).status == "sent"
    assert len(handler.messages) == 1
    raw, over_tls, auth = handler.messages[0]
    assert raw == queued.raw
    assert over_tls
    assert auth == LoginPassword(b"gateway", PASSWORD.encode())


async def test_wrong_password_is_temporary_and_sends_nothing(
        tmp_path: Path, ca: trustme.CA) -> None:
    handler = Recorder()
    server, port = await tls_auth_relay(ca, handler)
    config = relay_config(tmp_path, port, starttls=True, username="gateway",
                          password_file=password_file(tmp_path, "wrong\n"))
    try:
        with pytest.raises(TemporaryFailure, match="authentication failed: 535"):
            await relay(config, tls_context=client_tls(ca)).send(
                CRM, CUSTOMER, b"Subject: x\r\n\r\nx\r\n", "<x@s4e.pl>")
    finally:
        await stop_server(server)
    assert handler.mails == [] and handler.messages == []


async def test_untrusted_relay_certificate_is_temporary_and_sends_nothing(
        tmp_path: Path, ca: trustme.CA) -> None:
    handler = Recorder()
    server, port = await tls_auth_relay(ca, handler)
    config = relay_config(tmp_path, port, starttls=True, username="gateway",
                          password_file=password_file(tmp_path))
    try:
        with pytest.raises(TemporaryFailure, match="TLS failed"):
            await relay(config, tls_context=client_tls(trustme.CA())).send(
                CRM, CUSTOMER, b"Subject: x\r\n\r\nx\r\n", "<x@s4e.pl>")
    finally:
        await stop_server(server)
    assert handler.mails == [] and handler.messages == []


async def test_relay_without_starttls_gets_nothing_in_clear(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    handler = Recorder()
    server, port = await start_server(handler)  # no tls_context: no STARTTLS offered
    config = relay_config(tmp_path, port, starttls=True)
    mailer = Mailer(conn, relay(config), config, clock=FakeClock())
    queued = await queue_mail(conn, T0)
    try:
        assert await mailer.run_once()
    finally:
        await stop_server(server)
    pending = await row(conn, queued.id)
    assert pending.status == "pending"
    assert "does not offer STARTTLS" in (pending.last_error or "")
    assert handler.mails == [] and handler.messages == []


def test_missing_password_file_is_a_one_line_error(tmp_path: Path) -> None:
    config = relay_config(tmp_path, 587, starttls=True, username="gateway",
                          password_file=tmp_path / "nope.password")
    with pytest.raises(GatewayError) as caught:
        SmtpRelay(config)
    message = str(caught.value)
    assert message.startswith("outbound.password_file: ")
    assert str(tmp_path / "nope.password") in message
    assert "\n" not in message


def test_empty_password_file_is_refused(tmp_path: Path) -> None:
    config = relay_config(tmp_path, 587, username="gateway",
                          password_file=password_file(tmp_path, "\n"))
    with pytest.raises(GatewayError, match="outbound.password_file: .* is empty"):
        SmtpRelay(config)


def test_make_transport_picks_the_relay_when_one_is_set(tmp_path: Path) -> None:
    assert isinstance(make_transport(relay_config(tmp_path, 25)), SmtpRelay)
    assert isinstance(make_transport(OutboundConfig(relay="127.0.0.1:25")), SmtpRelay)
    assert isinstance(make_transport(OutboundConfig(maildir=tmp_path / "m")), MaildirDrop)
