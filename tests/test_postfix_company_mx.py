"""Case (b) of deploy/postfix/: the MX for s4e.pl is the company server that also holds
the staff's mailboxes; only serwis@ and crm@ go to the gateway on its own host. A real
Postfix configured from deploy/postfix/company-mx/ as written (the mailbox server and
gw.s4e.pl are real aiosmtpd servers and the real gateway on loopback)."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.conftest import CRM, INTAKE, Sink, make_mail, sink_server
from tests.postfix_instance import Postfix, skip_reason
from tests.postfix_setup import (CUSTOMER, customer, free_port, report, running_gateway,
                                 running_postfix, wait_mail, wait_queue, wait_routed,
                                 write_gateway_config)

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

STAFF = "anna.nowak@s4e.pl"


async def test_postfix_company_mx_gateway_addresses_to_gateway_the_rest_to_the_mailboxes(
        tmp_path: Path, smtp_sink: Sink) -> None:
    gw_port = free_port()
    postfix = Postfix(keep_log=tmp_path / "postfix.log")
    async with sink_server() as mailboxes:
        postfix.configure(
            "company-mx", tables={"transport": "transport", "s4e_mailboxes": "s4e_mailboxes"},
            substitutions={"[gw.s4e.pl]:2525": f"[127.0.0.1]:{gw_port}"},
            extra_tables={"transport": [f"example.com    smtp:[127.0.0.1]:{smtp_sink.port}"]},
            # The site's mailbox server (Dovecot's LMTP in the recipe) is a sink here.
            overrides={"virtual_transport": f"smtp:[127.0.0.1]:{mailboxes.port}"})
        config = write_gateway_config(tmp_path / "gw", port=gw_port, relay_port=postfix.port)
        async with running_postfix(postfix), running_gateway(config) as desk:
            assert await customer(postfix, CUSTOMER, [INTAKE], report()) == {}
            # An engineer's own mailbox keeps working, beside the gateway's addresses.
            note = make_mail(subject="Pytanie o ofertę", to=STAFF,
                             sender=f"Jan Kowalski <{CUSTOMER}>")
            assert await customer(postfix, CUSTOMER, [STAFF], note) == {}
            # Unknown addresses are refused during the customer's own session.
            with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
                await customer(postfix, CUSTOMER, ["nobody@s4e.pl"], note)
            code, text = err.value.recipients["nobody@s4e.pl"]
            assert code == 550 and text.startswith(b"5.1.1")
            assert b"User unknown in virtual mailbox table" in text

            (row,) = await wait_routed(desk)
            assert (row["rcpt_tos"], row["outcome"]) == ([INTAKE], "new")
            staff_mail = await wait_mail(mailboxes, lambda _, msg: msg["Subject"] == "Pytanie o ofertę")
            assert staff_mail["To"] == STAFF
            assert [rcpts for _, rcpts, _ in mailboxes.messages] == [[STAFF]]
            # The acknowledgement leaves through the company MX (mynetworks).
            ack = await wait_mail(smtp_sink, lambda mail_from, msg: mail_from == CRM)
            (ticket,) = await desk.cli_json("tickets", "list")
            assert ack["Subject"] == f"[#{ticket['number']}] Awaria serwera"
            await wait_queue(postfix, lambda q: q == [])
            # A mail to crm@ goes to the gateway too, never to the mailbox server.
            info = make_mail(subject="Pytanie", to=CRM, sender=f"Jan Kowalski <{CUSTOMER}>")
            assert await customer(postfix, CUSTOMER, [CRM], info) == {}
            rows = await wait_routed(desk, count=2)
            assert rows[-1]["rcpt_tos"] == [CRM]
            assert len(mailboxes.messages) == 1
