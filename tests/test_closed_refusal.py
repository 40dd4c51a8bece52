"""closed_action = "reject": the 550 text in the client's charset, and a hostile
header block that cannot stall the other sessions."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from gateway.closed_refusal import read_head_facts
from tests.conftest import CRM, INTAKE, Desk, make_mail, send
from tests.test_routing import JAN, close, open_ticket

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL



@pytest.fixture
def desk_options() -> str:
    return '[tickets]\nclosed_action = "reject"\n'


def deliver(port: int, raw: bytes, utf8: bool) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        client.mail(JAN, ["SMTPUTF8"] if utf8 else [])
        client.rcpt(CRM)
        code, text = client.data(raw)
        return code, text.decode("utf-8")


@pytest.mark.parametrize("utf8", [True, False])
async def test_refusal_is_polish_with_diacritics_only_for_smtputf8(desk: Desk, utf8: bool) -> None:
    number = await open_ticket(desk)
    await close(desk, number)
    raw = make_mail(subject=f"Re: [#{number}] Awaria", body="Dalej źle.\n",
                    message_id=f"<rej-{utf8}@example.com>")
    code, text = await asyncio.to_thread(deliver, desk.gw.port, raw, utf8)
    assert code == 550
    if utf8:
        assert "Zgłoszenie jest zamknięte: wiadomość nie została do niego dołączona." in text
        assert "prosimy zgłaszać na serwis@s4e.pl" in text
        assert "This ticket is closed" in text
    else:
        assert text.isascii()
        assert "Zgloszenie jest zamkniete: wiadomosc nie zostala do niego dolaczona." in text
        assert "This ticket is closed" in text and INTAKE in text
    assert number not in text


async def test_hostile_from_does_not_stall_other_sessions(desk: Desk) -> None:
    number = await open_ticket(desk)
    await close(desk, number)
    quotes = '"' * 48 * 1024
    hostile = (f"From: {quotes}\r\nTo: {CRM}\r\nSubject: Re: [#{number}]\r\n"
               "Message-ID: <hostile@example.com>\r\n\r\nx\r\n").encode()
    # The old check parsed this From on the event loop for 47 s; every client here
    # gives up after 10 s, so a stall fails the test.
    results = await asyncio.gather(
        send(desk.gw.port, JAN, [CRM], hostile),
        *(send(desk.gw.port, JAN, [INTAKE], make_mail(message_id=f"<other{i}@example.com>"))
          for i in range(5)))
    assert results == [{}] * 6  # all 250: an unreadable From is left to the router


def test_facts_of_a_huge_from_are_read_and_cut() -> None:
    facts = read_head_facts(b"From: " + b'"' * 48 * 1024 + b"\r\nSubject: Re: #123456\r\n\r\n")
    assert facts is not None and facts.subject == "Re: #123456" and facts.sender == ""
    facts = read_head_facts(b"From: =?utf-8?q?Jan?= <Jan@Example.com>\r\n"
                            b"Subject: =?utf-8?q?Odp=3A_=23123456_awaria?=\r\nAuto-Submitted: auto-replied\r\n\r\n")
    assert facts == type(facts)(subject="Odp: #123456 awaria", sender="jan@example.com", auto=True)
