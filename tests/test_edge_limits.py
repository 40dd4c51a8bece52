"""The SMTP edge under hostile clients (SPEC §5): connection caps, the DATA deadline,
spooling of large messages, the size limit counted after unstuffing, no AUTH."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import smtplib
import socket
import ssl
from pathlib import Path

import pytest
import uvloop

from gateway.config import SmtpConfig
from gateway.daemon import Gateway
from gateway.smtp_edge import spool_dir_for
from tests.conftest import (INTAKE, REPORT_BODY, make_config, make_mail, running_desk, send,
                            wait_for)
from tests.test_intake import Dialog, inbound_rows, raw_of


def edge_config(tmp_path: Path, **smtp: object):
    return make_config(tmp_path, smtp=SmtpConfig(listen="127.0.0.1:0", hostname="gw.test", **smtp))


async def started(tmp_path: Path, **smtp: object) -> Gateway:
    gw = Gateway(edge_config(tmp_path, **smtp))
    await gw.start(port=0)
    return gw


async def greeting(port: int, local: str | None = None) -> tuple[Dialog, str]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(local, 0) if local else None)
    dialog = Dialog(reader, writer)
    return dialog, await dialog.reply()


async def hung_up(dialog: Dialog) -> bool:
    # 20 s for a loaded CI machine, and still less than the shortest session timeout
    # here (30 s): the hang-up seen is the one the test is about.
    return await asyncio.wait_for(dialog.reader.read(), 20) == b""


# --- connection caps ---------------------------------------------------------------------

async def test_connections_beyond_max_connections_get_421_and_are_closed(tmp_path) -> None:
    gw = await started(tmp_path, max_connections=3, max_connections_per_ip=10)
    try:
        held = [await greeting(gw.port) for _ in range(3)]
        assert all(text.startswith("220") for _, text in held)
        extra, text = await greeting(gw.port)
        assert text.startswith("421 4.7.0"), text
        assert await hung_up(extra)
        # A slot that frees up is usable again.
        await held[0][0].cmd("QUIT")
        await held[0][0].close()
        await wait_for(lambda: gw.handler.limits.open == 2)
        again, text = await greeting(gw.port)
        assert text.startswith("220"), text
        for dialog, _ in [*held[1:], (again, "")]:
            await dialog.close()
        assert gw.metrics.smtp_replies.labels(code="421")._value.get() == 1
    finally:
        await gw.stop(grace=1)


async def test_one_address_cannot_take_more_than_max_connections_per_ip(tmp_path) -> None:
    gw = await started(tmp_path, max_connections=10, max_connections_per_ip=2)
    try:
        held = [await greeting(gw.port) for _ in range(2)]
        extra, text = await greeting(gw.port)
        assert text.startswith("421 4.7.0") and "your address" in text, text
        assert await hung_up(extra)
        # Another client address is still served, and delivers.
        other, text = await greeting(gw.port, local="127.0.0.2")
        assert text.startswith("220"), text
        await other.cmd("EHLO other.test")
        await other.cmd("MAIL FROM:<b@example.com>")
        await other.cmd(f"RCPT TO:<{INTAKE}>")
        await other.cmd("DATA")
        assert (await other.cmd(b"Subject: ok\r\n\r\nok\r\n.\r\n")).startswith("250")
        for dialog, _ in [*held, (other, "")]:
            await dialog.close()
    finally:
        await gw.stop(grace=1)


def _sessions_one_after_another(port: int, count: int) -> list[str]:
    """A sender in another thread, as an MTA is another process: connect, QUIT, and
    the next connection as soon as the 221 is read. Returns each greeting."""
    greetings = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            stream = conn.makefile("rb")
            greetings.append(stream.readline().decode().rstrip())
            conn.sendall(b"QUIT\r\n")
            stream.readline()
    return greetings


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_sender_at_its_per_ip_limit_may_reconnect_once_it_read_221(tmp_path, loop) -> None:
    """The slot is given back at QUIT: uvloop (what `serve` runs on) closes the socket
    an event loop iteration later, when the sender may already be connecting again."""
    async def scenario() -> list[str]:
        gw = await started(tmp_path, max_connections=10, max_connections_per_ip=1)
        try:
            return await asyncio.to_thread(_sessions_one_after_another, gw.port, 200)
        finally:
            await gw.stop(grace=1)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as run:
        greetings = run.run(scenario())
    assert [g for g in greetings if not g.startswith("220 ")] == []


# --- the DATA deadline -------------------------------------------------------------------

async def test_trickling_data_is_cut_at_the_deadline_while_others_are_served(tmp_path) -> None:
    gw = await started(tmp_path, data_timeout="1s", timeout="30s")
    try:
        slow, _ = await greeting(gw.port)
        await slow.cmd("EHLO slow.test")
        await slow.cmd("MAIL FROM:<slow@example.com>")
        await slow.cmd(f"RCPT TO:<{INTAKE}>")
        assert (await slow.cmd("DATA")).startswith("354")

        async def trickle() -> str:
            slow.writer.write(b"Subject: slow\r\n\r\n")
            for _ in range(400):  # one byte every 50 ms: never idle, never done
                try:
                    slow.writer.write(b"x")
                    await slow.writer.drain()
                except ConnectionError:
                    break
                line = await _poll_line(slow)
                if line:
                    return line
            return ""

        trickled = asyncio.create_task(trickle())
        # Meanwhile a normal client delivers.
        await send(gw.port, "fast@example.com", [INTAKE], make_mail(message_id="<fast@example.com>"))
        answer = await trickled
        assert answer.startswith("421 4.4.2"), answer
        assert await hung_up(slow)
        rows = await inbound_rows(gw)
        assert [r.message_id for r in rows] == ["<fast@example.com>"]
    finally:
        await gw.stop(grace=1)


async def _poll_line(dialog: Dialog) -> str:
    try:
        line = await asyncio.wait_for(dialog.reader.readline(), 0.05)
    except TimeoutError:
        return ""
    return line.decode().rstrip("\r\n") or "EOF"


# --- spooling ----------------------------------------------------------------------------

def big_report(size: int) -> bytes:
    """A report with a log attachment of about `size` bytes."""
    from email.message import EmailMessage
    from email import policy

    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Jan Kowalski <jan.kowalski@example.com>"
    msg["To"] = INTAKE
    msg["Subject"] = "Awaria serwera"
    msg["Message-ID"] = "<big@example.com>"
    msg.set_content(REPORT_BODY)
    lines = [f".{i:07d} " + "." * (i % 70) for i in range(size // 40)]
    msg.add_attachment("\n".join(lines).encode(), maintype="text", subtype="plain",
                       filename="server.log")
    return msg.as_bytes()


async def test_large_message_is_spooled_while_it_arrives_and_stored_intact(tmp_path) -> None:
    gw = await started(tmp_path, spool_threshold=64 * 1024)
    spool = spool_dir_for(gw.config)
    try:
        dialog, _ = await greeting(gw.port)
        await dialog.cmd("EHLO big.test")
        await dialog.cmd("MAIL FROM:<jan.kowalski@example.com>")
        await dialog.cmd(f"RCPT TO:<{INTAKE}>")
        await dialog.cmd("DATA")
        lines = [b".line %06d" % i + b"." * (i % 90) for i in range(60_000)]
        raw = b"Subject: big\r\nMessage-ID: <spooled@example.com>\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
        wire = raw.replace(b"\r\n.", b"\r\n..")
        half = len(wire) // 2
        dialog.writer.write(wire[:half])
        await dialog.writer.drain()
        # Half the message is in: it waits in a spool file, not in memory.
        files = await wait_for(lambda: [p for p in spool.glob("*") if p.stat().st_size > 1_000_000])
        assert len(files) == 1
        answer = await dialog.cmd(wire[half:] + b".\r\n")
        assert answer.startswith("250"), answer
        await dialog.close()
        (row,) = await inbound_rows(gw)
        assert row.size == len(raw) and row.message_id == "<spooled@example.com>"
        stored = await raw_of(gw, row.id)
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(raw).hexdigest()
        # The database holds it now, and the spool file goes: removed right after the
        # 250 is sent (a loaded CI machine's client can look before that).
        await wait_for(lambda: list(spool.glob("*")) == [])
        # The same message once more (spooled again) is recognised as a redelivery.
        again = await send(gw.port, "jan.kowalski@example.com", [INTAKE], raw)
        assert again == {} and len(await inbound_rows(gw)) == 1
    finally:
        await gw.stop(grace=1)


async def test_spooled_report_is_processed_into_a_ticket_with_its_attachment(tmp_path) -> None:
    raw = big_report(3_000_000)
    async with running_desk(tmp_path) as desk:
        assert len(raw) > 2 * desk.gw.config.smtp.spool_threshold  # the default: 1 MiB
        row = await desk.mail(raw)
        assert row["outcome"] == "new" and row["size"] == len(raw)
        ticket = await desk.ticket(row["ticket"])
        assert ticket["serial_number"] == "SN-12345"
        (att,) = ticket["attachments"]
        assert att["filename"] == "server.log" and att["size"] > 2_000_000


async def test_a_client_leaving_mid_data_leaves_no_spool_file(tmp_path) -> None:
    gw = await started(tmp_path, spool_threshold=4096)
    try:
        dialog, _ = await greeting(gw.port)
        await dialog.cmd("EHLO x.test")
        await dialog.cmd("MAIL FROM:<a@example.com>")
        await dialog.cmd(f"RCPT TO:<{INTAKE}>")
        await dialog.cmd("DATA")
        dialog.writer.write(b"Subject: x\r\n\r\n" + b"y" * 600_000)
        await dialog.writer.drain()
        await wait_for(lambda: list(spool_dir_for(gw.config).glob("*")))
        await dialog.close()
        await wait_for(lambda: not list(spool_dir_for(gw.config).glob("*")))
        assert await inbound_rows(gw) == []
    finally:
        await gw.stop(grace=1)


# --- size after unstuffing ---------------------------------------------------------------

@pytest.mark.parametrize("threshold", [1024 * 1024, 1024])
async def test_size_limit_counts_the_message_after_unstuffing(tmp_path, caplog, threshold) -> None:
    limit = 20_000
    gw = await started(tmp_path, max_message_size=limit, spool_threshold=threshold)
    head = b"Subject: dots\r\n\r\n"
    line = b"." * 98 + b"\r\n"  # 100 bytes stored, 101 on the wire
    body = line * ((limit - len(head)) // len(line))
    exact = head + body + b"x" * (limit - len(head) - len(body) - 2) + b"\r\n"
    assert len(exact) == limit and len(exact.replace(b"\r\n.", b"\r\n..")) > limit
    try:
        dialog, _ = await greeting(gw.port)
        await dialog.cmd("EHLO dots.test")
        for raw, expect in ((exact, "250"), (exact[:-2] + b"y\r\n", "552 5.3.4")):
            await dialog.cmd("MAIL FROM:<a@example.com>")
            await dialog.cmd(f"RCPT TO:<{INTAKE}>")
            await dialog.cmd("DATA")
            with caplog.at_level(logging.INFO, logger="gateway.smtp_edge"):
                answer = await dialog.cmd(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            assert answer.startswith(expect), (len(raw), answer)
        await dialog.close()
        (row,) = await inbound_rows(gw)
        assert row.size == limit and await raw_of(gw, row.id) == exact
        refused = [r for r in caplog.records if "552" in r.getMessage()]
        assert len(refused) == 1 and f"{limit + 1} bytes" in refused[0].getMessage()
        assert gw.metrics.smtp_replies.labels(code="552")._value.get() == 1
    finally:
        await gw.stop(grace=1)


# --- AUTH, the intake line ---------------------------------------------------------------

async def test_no_auth_is_advertised_before_or_after_starttls(tmp_path) -> None:
    trustme = pytest.importorskip("trustme", reason="trustme is needed for a test certificate")
    ca = trustme.CA()
    cert = ca.issue_cert("gw.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    gw = await started(tmp_path, tls_cert=cert_path, tls_key=key_path)
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def dialogue() -> tuple[str, str, int]:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client:
            before = client.ehlo("client.test")[1].decode()
            client.starttls(context=context)
            after = client.ehlo("client.test")[1].decode()
            code, _ = client.docmd("AUTH", "PLAIN AGpvaG4AcGFzcw==")
            return before, after, code

    before, after, code = await asyncio.to_thread(dialogue)
    try:
        assert "STARTTLS" in before and "SIZE" in after
        assert "AUTH" not in before.upper() and "AUTH" not in after.upper()
        assert code == 502
    finally:
        await gw.stop(grace=1)


async def test_intake_line_names_message_id_envelope_and_size(gateway: Gateway, caplog) -> None:
    raw = make_mail(message_id="<line@example.com>")
    with caplog.at_level(logging.INFO, logger="gateway.smtp_edge"):
        await send(gateway.port, "jan@example.com", [INTAKE, "crm@s4e.pl"], raw)
    (line,) = [r.getMessage() for r in caplog.records if "queued" in r.getMessage()]
    assert line.startswith("<line@example.com> inbound ")
    assert "from=<jan@example.com>" in line and "serwis@s4e.pl" in line and "crm@s4e.pl" in line
    assert f"size={len(raw)}" in line


# --- findings of fuzz/fuzz_smtp.py -------------------------------------------------------

async def test_a_bare_cr_in_an_unknown_command_is_not_echoed(gateway: Gateway) -> None:
    dialog, _ = await greeting(gateway.port)
    answer = await dialog.cmd(b"\r.\r\n")
    assert answer.startswith("500 5.5.2") and "\r" not in answer, repr(answer)
    assert (await dialog.cmd("NOOP")).startswith("250")
    await dialog.close()


async def test_invalid_utf8_in_an_address_is_refused_not_deferred(gateway: Gateway) -> None:
    dialog, _ = await greeting(gateway.port)
    await dialog.cmd("EHLO client.example")
    assert (await dialog.cmd(b"MAIL FROM:<ja\x9an@example.com>\r\n")).startswith("553 5.1.7")
    assert (await dialog.cmd("MAIL FROM:<jan@example.com>")).startswith("250")
    assert (await dialog.cmd(b"RCPT TO:<serwis\xff@s4e.pl>\r\n")).startswith("553 5.1.3")
    await dialog.close()


async def test_an_unclosed_angle_address_is_refused_not_451(gateway: Gateway) -> None:
    dialog, _ = await greeting(gateway.port)
    await dialog.cmd("EHLO client.example")
    assert (await dialog.cmd("MAIL FROM:<")).startswith("553 5.1.3")
    assert (await dialog.cmd("MAIL FROM:<jan@example.com>")).startswith("250")
    assert (await dialog.cmd("RCPT TO:<")).startswith("553 5.1.3")
    assert (await dialog.cmd("RCPT TO:<a@ [TO:<serwis@s4e.pl>")).startswith("553 5.1.3")
    await dialog.cmd("RSET")
    assert (await dialog.cmd("MAIL FROM:<a@ [TO:<serwis@s4e.pl>")).startswith("553 5.1.3")
    await dialog.close()


async def test_invalid_utf8_echoed_by_vrfy_is_replaced_not_a_451(gateway: Gateway) -> None:
    dialog, _ = await greeting(gateway.port)
    await dialog.cmd("EHLO client.example")
    answer = await dialog.cmd(b"VRFY [R\xaf\xaf\r\n")
    assert answer.startswith("502") and "Could not VRFY" in answer, answer
    assert (await dialog.cmd("NOOP")).startswith("250")
    await dialog.close()
