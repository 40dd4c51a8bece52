"""Case (a) of deploy/postfix/: this host is the MX for s4e.pl, Postfix in front of the
gateway, configured from deploy/postfix/mx/ as written. A real Postfix of its own
(tests/postfix_instance.py), the real gateway, the customer's domain example.com
delivered by Postfix to a real aiosmtpd sink."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path

import pytest

from gateway.config import SmtpConfig
from tests.conftest import (CRM, INTAKE, Desk, Sink, body_text, make_mail,
                            sink_server, wait_for)
from tests.postfix_instance import MX_HOSTNAME, RECIPE, Postfix, read_main_cf, skip_reason
from tests.postfix_setup import (CUSTOMER, REPORT_BODY, customer,
                                 free_port, gateway_config_with, inbox, report,
                                 running_gateway, running_postfix, wait_deferred, wait_mail,
                                 wait_queue,
                                 wait_routed, write_gateway_config)

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")



@dataclass
class Mx:
    postfix: Postfix
    config_file: Path
    gw_port: int


def make_mx(root: Path, sink: Sink, *, transport: str = "transport",
            lmtp: bool = False, gateway_toml: str = "") -> Mx:
    """Postfix from deploy/postfix/mx/ and a gateway config behind it (not started)."""
    gw_port = free_port()
    postfix = Postfix(keep_log=root / "postfix.log")
    subs = {"[127.0.0.1]:2525": f"[127.0.0.1]:{gw_port}"}
    lmtp_socket = None
    if lmtp:
        # Like /run/s4e-gateway: a folder the postfix user can reach.
        (postfix.root / "run").mkdir(mode=0o755)
        lmtp_socket = postfix.root / "run" / "lmtp.sock"
        subs["/run/s4e-gateway/lmtp.sock"] = str(lmtp_socket)
    postfix.configure(
        "mx", tables={transport: "transport", "relay_recipients": "relay_recipients"},
        substitutions=subs,
        # The customer's domain: its MX is the sink (no DNS in the test).
        extra_tables={"transport": [f"example.com    smtp:[127.0.0.1]:{sink.port}"]})
    smtp_extra = f'lmtp_socket = "{lmtp_socket}"\n' if lmtp_socket else ""
    config_file = write_gateway_config(root / "gw", port=gw_port, relay_port=postfix.port,
                                       extra=smtp_extra)
    if gateway_toml:
        gateway_config_with(config_file, gateway_toml)
    return Mx(postfix, config_file, gw_port)


@asynccontextmanager
async def mx_running(tmp_path: Path, sink: Sink, **options) -> AsyncIterator[tuple[Mx, Desk]]:
    mx = make_mx(tmp_path, sink, **options)
    async with running_postfix(mx.postfix), running_gateway(mx.config_file) as desk:
        yield mx, desk


def acknowledgement_to(address: str):
    return lambda mail_from, msg: mail_from == CRM and address in str(msg["To"])


async def test_postfix_mx_report_becomes_ticket_and_acknowledgement_goes_out_through_postfix(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with mx_running(tmp_path, smtp_sink) as (mx, desk):
        assert await customer(mx.postfix, CUSTOMER, [INTAKE], report()) == {}

        ack = await wait_mail(smtp_sink, acknowledgement_to(CUSTOMER))
        (ticket,) = await desk.cli_json("tickets", "list")
        assert ticket["status"] == "accepted"
        assert ack["Subject"] == f"[#{ticket['number']}] Awaria serwera"
        assert ack["From"].addresses[0].addr_spec == CRM
        # It left through Postfix (its Received: header), not straight from the gateway.
        assert "by mx.s4e.pl (Postfix)" in " ".join(ack.get_all("Received"))
        (row,) = await wait_routed(desk)
        assert (row["mail_from"], row["rcpt_tos"], row["outcome"]) == (CUSTOMER, [INTAKE], "new")
        await wait_queue(mx.postfix, lambda q: q == [])


async def test_postfix_mx_refuses_unknown_s4e_recipients_at_rcpt_and_relays_nothing(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with mx_running(tmp_path, smtp_sink) as (mx, desk):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            await customer(mx.postfix, CUSTOMER, ["anna.nowak@s4e.pl"], report())
        code, text = err.value.recipients["anna.nowak@s4e.pl"]
        assert code == 550 and text.startswith(b"5.1.1")
        assert b"User unknown in relay recipient table" in text

        # Not an open relay: the world is refused to strangers.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            await customer(mx.postfix, CUSTOMER, ["someone@example.org"], report())
        code, text = err.value.recipients["someone@example.org"]
        assert code == 454 and b"Relay access denied" in text

        # A mail to serwis@ and an unknown address: only serwis@ is taken.
        refused = await customer(mx.postfix, CUSTOMER, [INTAKE, "nobody@s4e.pl"], report())
        assert list(refused) == ["nobody@s4e.pl"] and refused["nobody@s4e.pl"][0] == 550
        (row,) = await wait_routed(desk)
        assert row["rcpt_tos"] == [INTAKE]
        await wait_mail(smtp_sink, acknowledgement_to(CUSTOMER))
        await wait_queue(mx.postfix, lambda q: q == [])
        assert [rcpts for _, rcpts, _ in smtp_sink.messages] == [[CUSTOMER]]  # the ack only


async def test_postfix_mx_queues_while_the_gateway_is_stopped_and_delivers_after_restart(
        tmp_path: Path, smtp_sink: Sink) -> None:
    mx = make_mx(tmp_path, smtp_sink)
    async with running_postfix(mx.postfix):
        # The gateway is not running: Postfix accepts and keeps the mail.
        assert await customer(mx.postfix, CUSTOMER, [INTAKE], report()) == {}
        await wait_deferred(mx.postfix, "Connection refused")

        async with running_gateway(mx.config_file) as desk:
            await asyncio.to_thread(mx.postfix.flush)  # postqueue -f
            (row,) = await wait_routed(desk)
            assert row["outcome"] == "new"
            ack = await wait_mail(smtp_sink, acknowledgement_to(CUSTOMER))
            (ticket,) = await desk.cli_json("tickets", "list")
            assert ack["Subject"] == f"[#{ticket['number']}] Awaria serwera"
            await wait_queue(mx.postfix, lambda q: q == [])


async def test_postfix_mx_defers_on_the_gateways_451_and_retries(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with mx_running(tmp_path, smtp_sink) as (mx, desk):
        conn = desk.gw.intake_conn
        (pages,) = await conn.execute_fetchall("PRAGMA page_count")
        await conn.execute(f"PRAGMA max_page_count = {pages[0]}")  # the disk is "full"
        big = report(body=REPORT_BODY + "wiersz logu\n" * 20_000)
        assert await customer(mx.postfix, CUSTOMER, [INTAKE], big) == {}

        await wait_deferred(mx.postfix, "451 4.3.0")
        assert await inbox(desk) == []  # nothing half-stored

        await conn.execute("PRAGMA max_page_count = 1073741823")  # room again
        (row,) = await wait_routed(desk)  # Postfix's own retry (minimal_backoff_time)
        assert row["outcome"] == "new"
        await wait_mail(smtp_sink, acknowledgement_to(CUSTOMER))
        log = mx.postfix.log()
        assert "status=deferred" in log and "451 4.3.0" in log
        assert f"to=<{INTAKE}>, relay=127.0.0.1[127.0.0.1]:{mx.gw_port}" in log
        await wait_queue(mx.postfix, lambda q: q == [])


async def test_postfix_mx_defers_an_acknowledgement_the_customers_server_answers_451(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with mx_running(tmp_path, smtp_sink) as (mx, desk):
        smtp_sink.fail_next = ["451 4.7.1 Greylisted, try again later"]
        await customer(mx.postfix, CUSTOMER, [INTAKE], report())
        ack = await wait_mail(smtp_sink, acknowledgement_to(CUSTOMER))
        assert smtp_sink.attempts == 2  # deferred once by Postfix, then delivered
        assert ack["Subject"].startswith("[#")
        # The gateway's part ended at Postfix's 250: its outbox row is sent, once.
        await wait_for(lambda: [r["status"] for r, _ in desk.outbox()] == ["sent"])
        assert "Greylisted" in mx.postfix.log()


@pytest.mark.parametrize("smtputf8", [False, True], ids=["ascii", "smtputf8-client"])
async def test_postfix_mx_bounce_of_a_rejected_closed_ticket_mail_carries_polish_guidance(
        tmp_path: Path, smtputf8: bool) -> None:
    """The customer gets Postfix's bounce with the template's Polish guidance. With
    smtputf8 the customer's client asked for SMTPUTF8 (so the gateway's 550 also has
    its Polish lines) while the customer's own server lacks SMTPUTF8: the bounce still
    arrives, its headers being ASCII."""
    toml = '[tickets]\nclosed_action = "reject"\n'
    async with (sink_server(smtputf8=not smtputf8) as sink,
                mx_running(tmp_path, sink, gateway_toml=toml) as (mx, desk)):
        await customer(mx.postfix, CUSTOMER, [INTAKE], report())
        await wait_mail(sink, acknowledgement_to(CUSTOMER))
        (ticket,) = await desk.cli_json("tickets", "list")
        number = ticket["number"]
        await desk.cli("tickets", "set-status", number, "closed")

        late = make_mail(subject=f"Re: [#{number}] Awaria serwera", to=CRM,
                         body="Dzień dobry,\nznowu nie działa.\n",
                         sender=f"Jan Kowalski <{CUSTOMER}>")
        # Postfix takes the mail (250); the gateway refuses it at the end of DATA.
        assert await customer(mx.postfix, CUSTOMER, [CRM], late, smtputf8=smtputf8) == {}

        bounce = await wait_mail(sink, lambda mail_from, msg: mail_from in ("", "<>"))
        subject = str(make_header(decode_header(bounce["Subject"])))
        assert subject == "Niedoręczona wiadomość / Undelivered Mail Returned to Sender"
        assert bounce.get_content_type() == "multipart/report"
        raw = next(r for f, _, r in sink.messages if f in ("", "<>"))
        assert raw.split(b"\r\n\r\n")[0].isascii()  # headers need no SMTPUTF8
        text = " ".join(body_text(bounce).split())
        assert ("Nowe awarie, również związane z zamkniętym zgłoszeniem, prosimy zgłaszać "
                "na adres serwis@s4e.pl") in text
        assert ("Please report new failures, also ones related to a closed ticket, "
                "to serwis@s4e.pl") in text
        assert "550-5.7.1 This ticket is closed: the message was not added to it." in text
        if smtputf8:  # the gateway's reply had its Polish lines too
            assert "Zgłoszenie jest zamknięte: wiadomość nie została do niego dołączona." in text
        assert number not in text  # the 550 text does not repeat the number
        rows = await inbox(desk)  # stored before the 550, kept for the record
        assert [r["outcome"] for r in rows] == ["new", "closed_rejected"]
        await wait_queue(mx.postfix, lambda q: q == [])


async def test_postfix_mx_lmtp_over_the_gateways_unix_socket(tmp_path: Path,
                                                              smtp_sink: Sink) -> None:
    async with mx_running(tmp_path, smtp_sink, transport="transport.lmtp",
                          lmtp=True) as (mx, desk):
        # To both addresses: one LMTP transaction, one reply per recipient, stored once.
        assert await customer(mx.postfix, CUSTOMER, [INTAKE, CRM], report()) == {}
        (row,) = await wait_routed(desk)
        assert (sorted(row["rcpt_tos"]), row["outcome"]) == ([CRM, INTAKE], "new")
        await wait_mail(smtp_sink, acknowledgement_to(CUSTOMER))
        socket = f"relay={MX_HOSTNAME}[{mx.postfix.root}/run/lmtp.sock]"
        log = mx.postfix.log()
        for rcpt in (INTAKE, CRM):
            assert f"to=<{rcpt}>, {socket}" in log
        assert log.count("status=sent (250 2.0.0 Ok: queued as 1)") == 2
        await wait_queue(mx.postfix, lambda q: q == [])


def test_postfix_size_limits_of_the_recipe_agree_with_the_gateway() -> None:
    """Postfix's limit stays 64 KiB below the gateway's default max_message_size in
    both cases, and the example config says the gateway's is the larger one."""
    gateway_limit = SmtpConfig().max_message_size
    for case in ("mx", "company-mx"):
        params = read_main_cf((RECIPE / case / "main.cf").read_text())
        assert int(params["message_size_limit"]) == gateway_limit - 64 * 1024, case
    example = (Path(__file__).resolve().parent.parent / "config.example.toml").read_text()
    assert f"max_message_size = {gateway_limit}" in example
    assert "ABOVE Postfix's message_size_limit" in example


def sized_report(size: int) -> bytes:
    """A report of exactly `size` bytes as Postfix and the gateway count it (CRLF line
    ends, no line starting with a dot), most of it a base64 log attachment."""
    head = (f"From: Jan Kowalski <{CUSTOMER}>\r\nTo: {INTAKE}\r\nSubject: Awaria serwera\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            + REPORT_BODY.replace("\n", "\r\n") +
            "--b\r\nContent-Type: application/octet-stream; name=\"dump.bin\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    tail = b"\r\n--b--\r\n"
    line = b"QUJD" * 19 + b"\r\n"
    full, rest = divmod(size - len(head) - len(tail), len(line))
    raw = head + line * full + b"A" * rest + tail
    assert len(raw) == size
    return raw


async def test_postfix_mx_size_limit_is_postfixs_and_what_it_takes_the_gateway_takes(
        tmp_path: Path, smtp_sink: Sink) -> None:
    limit = int(read_main_cf((RECIPE / "mx" / "main.cf").read_text())["message_size_limit"])
    async with mx_running(tmp_path, smtp_sink) as (mx, desk):
        # Too big: refused by Postfix itself, in the customer's session (at MAIL FROM,
        # from the SIZE the client declares).
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            await customer(mx.postfix, CUSTOMER, [INTAKE], sized_report(limit + 1))
        assert err.value.smtp_code == 552 and err.value.smtp_error.startswith(b"5.3.4")

        # Just under (Postfix's limit also covers its queue file's envelope records):
        # taken by Postfix, and then by the gateway, Received: header and all.
        size = limit - 4096
        assert await customer(mx.postfix, CUSTOMER, [INTAKE], sized_report(size)) == {}
        (row,) = await wait_routed(desk, timeout=120)
        assert row["outcome"] == "new"
        assert size < row["size"] <= SmtpConfig().max_message_size
        assert f"to=<{INTAKE}>, relay=127.0.0.1[127.0.0.1]:{mx.gw_port}" in mx.postfix.log()
        await wait_queue(mx.postfix, lambda q: q == [])
