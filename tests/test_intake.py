"""The SMTP edge through a real socket into a real SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import sqlite3

import pytest

from gateway import store
from gateway.config import SmtpConfig
from gateway.daemon import Gateway
from tests.conftest import CRM, INTAKE, make_config, make_mail, run_sql, send

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL


class Dialog:
    """A hand-driven SMTP client for what smtplib will not do (smuggling, drops)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Dialog:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        dialog = cls(reader, writer)
        return dialog

    async def reply(self) -> str:
        lines = []
        while True:
            # Generous for a loaded CI machine: no test expects a reply not to come.
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def cmd(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def inbound_rows(gw: Gateway) -> list[store.InboundRow]:
    conn = await store.connect(gw.config.storage.database)
    try:
        return await store.list_inbound(conn)
    finally:
        await conn.close()


async def raw_of(gw: Gateway, inbound_id: int) -> bytes:
    conn = await store.connect(gw.config.storage.database)
    try:
        return await store.read_raw(conn, inbound_id)
    finally:
        await conn.close()


# --- RCPT ------------------------------------------------------------------------

@pytest.mark.parametrize("rcpt, code", [
    ("serwis@s4e.pl", 250),
    ("crm@s4e.pl", 250),
    ("SERWIS@S4E.PL", 250),
    ("Crm@S4e.Pl", 250),
    ("x@gmail.com", 550),
    ("serwis@s4e.pl.evil.example", 550),
    ("other@s4e.pl", 550),
    ("serwis@evil.example", 550),
    ("serwis%evil.example@s4e.pl", 550),
    ("@relay.example:serwis@s4e.pl", 250),  # source route ignored (RFC 5321 C.)
])
async def test_rcpt_only_for_intake_and_crm(gateway: Gateway, rcpt: str, code: int) -> None:
    dialog = await Dialog.open(gateway.port)
    await dialog.reply()
    await dialog.cmd("EHLO client.test")
    assert (await dialog.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    answer = await dialog.cmd(f"RCPT TO:<{rcpt}>")
    assert answer.startswith(str(code)), answer
    if code == 550:
        assert answer.startswith("550 5.1.1")
    await dialog.close()


async def test_relay_attempt_stores_nothing(gateway: Gateway) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await send(gateway.port, "a@example.com", ["x@gmail.com"], make_mail(to="x@gmail.com"))
    assert await inbound_rows(gateway) == []


async def test_ehlo_advertises_size_8bitmime_smtputf8(gateway: Gateway) -> None:
    dialog = await Dialog.open(gateway.port)
    await dialog.reply()
    ehlo = await dialog.cmd("EHLO client.test")
    assert f"SIZE {gateway.config.smtp.max_message_size}" in ehlo
    assert "8BITMIME" in ehlo and "SMTPUTF8" in ehlo
    await dialog.close()


async def test_smtputf8_sender_and_8bit_body_are_kept(gateway: Gateway) -> None:
    raw = ("From: Zażółć <gęślą@przykład.pl>\r\nTo: serwis@s4e.pl\r\nSubject: Łódź\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           "\r\nŻółta lampka miga.\r\n").encode()

    def deliver() -> None:
        with smtplib.SMTP("127.0.0.1", gateway.port) as client:
            client.sendmail("gęślą@przykład.pl", [INTAKE], raw, ["SMTPUTF8", "BODY=8BITMIME"])

    await asyncio.to_thread(deliver)
    (row,) = await inbound_rows(gateway)
    assert row.mail_from == "gęślą@przykład.pl"
    assert await raw_of(gateway, row.id) == raw


# --- size and recipients ---------------------------------------------------------

async def test_size_declared_too_big_is_refused(tmp_path) -> None:
    gw = Gateway(make_config(tmp_path, smtp=SmtpConfig(
        listen="127.0.0.1:0", max_message_size=10_000)))
    await gw.start(port=0)
    try:
        dialog = await Dialog.open(gw.port)
        await dialog.reply()
        await dialog.cmd("EHLO client.test")
        answer = await dialog.cmd("MAIL FROM:<a@example.com> SIZE=20000")
        assert answer.startswith("552 5.3.4"), answer
        await dialog.close()
    finally:
        await gw.stop(grace=1)


async def test_data_over_size_limit_is_refused_and_not_stored(tmp_path) -> None:
    gw = Gateway(make_config(tmp_path, smtp=SmtpConfig(
        listen="127.0.0.1:0", max_message_size=10_000)))
    await gw.start(port=0)
    try:
        dialog = await Dialog.open(gw.port)
        await dialog.reply()
        await dialog.cmd("EHLO client.test")
        await dialog.cmd("MAIL FROM:<a@example.com>")  # no SIZE: caught during DATA
        await dialog.cmd(f"RCPT TO:<{INTAKE}>")
        await dialog.cmd("DATA")
        answer = await dialog.cmd(b"Subject: big\r\n\r\n" + b"A" * 76 * 1000 + b"\r\n.\r\n")
        assert answer.startswith("552 5.3.4"), answer
        # The session stays in sync and a message within the limit is accepted.
        await dialog.cmd("MAIL FROM:<a@example.com>")
        await dialog.cmd(f"RCPT TO:<{INTAKE}>")
        await dialog.cmd("DATA")
        assert (await dialog.cmd(b"Subject: small\r\n\r\nok\r\n.\r\n")).startswith("250")
        await dialog.close()
        rows = await inbound_rows(gw)
        assert len(rows) == 1 and await raw_of(gw, rows[0].id) == b"Subject: small\r\n\r\nok\r\n"
    finally:
        await gw.stop(grace=1)


async def test_too_many_recipients_get_452(tmp_path) -> None:
    gw = Gateway(make_config(tmp_path, smtp=SmtpConfig(
        listen="127.0.0.1:0", max_recipients=3)))
    await gw.start(port=0)
    try:
        dialog = await Dialog.open(gw.port)
        await dialog.reply()
        await dialog.cmd("EHLO client.test")
        await dialog.cmd("MAIL FROM:<a@example.com>")
        answers = [await dialog.cmd(f"RCPT TO:<{r}>") for r in
                   (INTAKE, CRM, "x@example.com", INTAKE)]
        assert [a[:3] for a in answers] == ["250", "250", "550", "452"]
        assert answers[3].startswith("452 4.5.3")
        await dialog.close()
    finally:
        await gw.stop(grace=1)


# --- DATA: smuggling, dot-stuffing, drops ----------------------------------------

@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"])
async def test_smuggled_end_of_data_never_ends_data(gateway: Gateway, fake_end: bytes) -> None:
    dialog = await Dialog.open(gateway.port)
    await dialog.reply()
    await dialog.cmd("EHLO client.test")
    await dialog.cmd("MAIL FROM:<a@example.com>")
    await dialog.cmd(f"RCPT TO:<{INTAKE}>")
    assert (await dialog.cmd("DATA")).startswith("354")
    smuggled = (b"From: a@example.com\r\nTo: serwis@s4e.pl\r\nSubject: first\r\n\r\nbody"
                + fake_end
                + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<crm@s4e.pl>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n")
    answer = await dialog.cmd(smuggled)
    assert answer.startswith("250"), answer
    assert (await dialog.cmd("QUIT")).startswith("221")
    await dialog.close()
    rows = await inbound_rows(gateway)
    assert len(rows) == 1
    raw = await raw_of(gateway, rows[0].id)
    # The fake end stays part of the one message (a dot opening a CRLF line is unstuffed).
    assert fake_end.replace(b"\r\n.", b"\r\n") in raw and b"Subject: smuggled" in raw


async def test_dot_stuffing_is_undone_and_lone_dot_message(gateway: Gateway) -> None:
    dialog = await Dialog.open(gateway.port)
    await dialog.reply()
    await dialog.cmd("EHLO client.test")
    await dialog.cmd("MAIL FROM:<a@example.com>")
    await dialog.cmd(f"RCPT TO:<{INTAKE}>")
    await dialog.cmd("DATA")
    answer = await dialog.cmd(b"Subject: dots\r\n\r\n..leading dot\r\n...\r\nend\r\n.\r\n")
    assert answer.startswith("250")
    # Empty message: the terminator right after 354, then a pipelined command.
    await dialog.cmd("MAIL FROM:<b@example.com>")
    await dialog.cmd(f"RCPT TO:<{CRM}>")
    await dialog.cmd("DATA")
    dialog.writer.write(b".\r\nNOOP\r\n")
    assert (await dialog.reply()).startswith("250")
    assert (await dialog.reply()).startswith("250")  # the NOOP was not swallowed
    await dialog.close()
    rows = await inbound_rows(gateway)
    assert [await raw_of(gateway, r.id) for r in rows] == [
        b"Subject: dots\r\n\r\n.leading dot\r\n..\r\nend\r\n", b""]


async def test_client_dropping_mid_data_leaves_nothing(gateway: Gateway) -> None:
    dialog = await Dialog.open(gateway.port)
    await dialog.reply()
    await dialog.cmd("EHLO client.test")
    await dialog.cmd("MAIL FROM:<a@example.com>")
    await dialog.cmd(f"RCPT TO:<{INTAKE}>")
    await dialog.cmd("DATA")
    dialog.writer.write(b"Subject: half\r\n\r\n" + b"x" * 300_000 + b"\r\n")
    await dialog.writer.drain()
    await dialog.close()
    await asyncio.sleep(0.3)
    assert await inbound_rows(gateway) == []
    await send(gateway.port, "a@example.com", [INTAKE], make_mail())
    assert len(await inbound_rows(gateway)) == 1


async def test_long_lines_are_accepted_not_cut(gateway: Gateway) -> None:
    raw = b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n"
    await send(gateway.port, "a@example.com", [INTAKE], raw)
    (row,) = await inbound_rows(gateway)
    assert await raw_of(gateway, row.id) == raw


async def test_idle_session_times_out(tmp_path) -> None:
    gw = Gateway(make_config(tmp_path, smtp=SmtpConfig(listen="127.0.0.1:0", timeout="1s")))
    await gw.start(port=0)
    try:
        dialog = await Dialog.open(gw.port)
        await dialog.reply()
        # The server hung up: within 30 s for the loaded CI machine, far from the
        # default 5 min the 1 s timeout replaced.
        assert await asyncio.wait_for(dialog.reader.read(), 30) == b""
    finally:
        await gw.stop(grace=1)


# --- what gets stored ------------------------------------------------------------

async def test_message_is_committed_with_envelope_hash_and_message_id(gateway: Gateway) -> None:
    raw = make_mail(message_id="<abc.1@example.com>")
    await send(gateway.port, "jan@example.com", [INTAKE], raw)
    (row,) = await inbound_rows(gateway)
    assert (row.mail_from, row.rcpt_tos, row.message_id) == (
        "jan@example.com", (INTAKE,), "<abc.1@example.com>")
    ((sha, size),) = run_sql(gateway.config.storage.database, "SELECT sha256, size FROM inbound")
    assert sha == hashlib.sha256(raw).hexdigest() and size == len(raw)


async def test_duplicate_delivery_is_stored_once(gateway: Gateway) -> None:
    raw = make_mail(message_id="<dup.1@example.com>")
    await send(gateway.port, "jan@example.com", [INTAKE], raw)
    await send(gateway.port, "jan@example.com", [INTAKE], raw)  # still 250
    # The same message relayed again along another path: new trace headers only.
    relayed = b"Received: from mx2.example.com by gw; Tue, 1 Dec 2026 10:00:00 +0000\r\n" + raw
    await send(gateway.port, "jan@example.com", [CRM], relayed)
    rows = await inbound_rows(gateway)
    assert len(rows) == 1
    # Different content under the same Message-ID is another message.
    await send(gateway.port, "jan@example.com", [INTAKE],
               make_mail(message_id="<dup.1@example.com>", body="inna treść\n"))
    assert len(await inbound_rows(gateway)) == 2


async def test_one_message_to_serwis_and_crm_is_one_stored_message(gateway: Gateway) -> None:
    raw = make_mail(message_id="<both@example.com>", Cc=CRM)
    await send(gateway.port, "jan@example.com", [INTAKE, CRM, "SERWIS@s4e.pl"], raw)
    (row,) = await inbound_rows(gateway)
    assert row.rcpt_tos == (INTAKE, CRM)


async def test_null_reverse_path_is_stored_as_empty_sender(gateway: Gateway) -> None:
    await send(gateway.port, "", [CRM], make_mail(subject="Undelivered Mail"))
    (row,) = await inbound_rows(gateway)
    assert row.mail_from == ""


@pytest.mark.sqlite_only  # SQLite's page limit stands in for a full disk
async def test_unwritable_database_answers_451_and_recovers(gateway: Gateway) -> None:
    conn = gateway.intake_conn
    (pages,) = await conn.execute_fetchall("PRAGMA page_count")
    await conn.execute(f"PRAGMA max_page_count = {pages[0]}")  # the disk is "full"
    big = make_mail(body=("wiersz logu\n" * 20_000))
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(gateway.port, "a@example.com", [INTAKE], big)
    assert err.value.smtp_code == 451
    assert err.value.smtp_error.startswith(b"4.3.0")
    assert b"Error" not in err.value.smtp_error and b"sqlite" not in err.value.smtp_error.lower()
    await conn.execute("PRAGMA max_page_count = 1073741823")
    await send(gateway.port, "a@example.com", [INTAKE], big)  # the retry succeeds
    assert len(await inbound_rows(gateway)) == 1


@pytest.mark.sqlite_only  # SQLite's write lock (PostgreSQL's intake takes no lock)
async def test_locked_database_answers_451(gateway: Gateway) -> None:
    await gateway.intake_conn.execute("PRAGMA busy_timeout = 200")
    locker = sqlite3.connect(gateway.config.storage.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(smtplib.SMTPDataError) as err:
            await send(gateway.port, "a@example.com", [INTAKE], make_mail())
        assert err.value.smtp_code == 451
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await send(gateway.port, "a@example.com", [INTAKE], make_mail())
    assert len(await inbound_rows(gateway)) == 1


async def test_parallel_sessions_all_committed(gateway: Gateway) -> None:
    mails = [make_mail(subject=f"nr {i}", message_id=f"<p{i}@example.com>") for i in range(40)]
    await asyncio.gather(*(send(gateway.port, "a@example.com", [INTAKE], m) for m in mails))
    rows = await inbound_rows(gateway)
    assert sorted(r.message_id for r in rows) == sorted(f"<p{i}@example.com>" for i in range(40))


# --- shutdown --------------------------------------------------------------------

async def test_shutdown_lets_transaction_finish_and_refuses_new_sessions(tmp_path) -> None:
    gw = Gateway(make_config(tmp_path))
    await gw.start(port=0)
    in_flight = await Dialog.open(gw.port)
    await in_flight.reply()
    await in_flight.cmd("EHLO client.test")
    await in_flight.cmd("MAIL FROM:<a@example.com>")
    await in_flight.cmd(f"RCPT TO:<{INTAKE}>")
    await in_flight.cmd("DATA")
    idle = await Dialog.open(gw.port)
    await idle.reply()

    # A grace that a loaded CI machine cannot use up before the transaction below is
    # finished: stop waits for it, and returns as soon as no session is left.
    stopping = asyncio.create_task(gw.stop(grace=30))
    await asyncio.sleep(0.2)
    late = await Dialog.open(gw.port)
    assert (await late.reply()).startswith("421")
    assert (await idle.reply()).startswith("421")
    answer = await in_flight.cmd(b"Subject: in flight\r\n\r\nfinish me\r\n.\r\n")
    assert answer.startswith("250")
    assert (await in_flight.cmd("MAIL FROM:<a@example.com>")).startswith("421")
    await in_flight.close()
    await asyncio.wait_for(stopping, 60)
    conn = await store.connect(gw.config.storage.database)
    assert len(await store.list_inbound(conn)) == 1
    await conn.close()


async def test_replies_carry_enhanced_status_codes(gateway: Gateway) -> None:
    dialog = await Dialog.open(gateway.port)
    await dialog.reply()
    assert "ENHANCEDSTATUSCODES" in await dialog.cmd("EHLO client.test")
    assert await dialog.cmd("NOOP") == "250 2.0.0 OK"
    assert (await dialog.cmd("RCPT TO:<serwis@s4e.pl>")).startswith("503 5.5.1")
    assert (await dialog.cmd("FOO")).startswith("500 5.5.2")
    assert (await dialog.cmd("MAIL FROM:<a\x00b@example.com>")).startswith("553 5.1.7")
    assert (await dialog.cmd("MAIL FROM:<a@example.com>")).startswith("250 2.1.0")
    assert (await dialog.cmd("RCPT TO:<serwis\x01@s4e.pl>")).startswith("553 5.1.3")
    assert await dialog.cmd("QUIT") == "221 2.0.0 Bye"
    await dialog.close()
    assert await inbound_rows(gateway) == []
