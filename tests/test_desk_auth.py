"""What a sender verdict allows (SPEC §10), through SMTP, the store and the relay sink,
with the gateway's own DKIM/SPF/DMARC checks against a real DNS server on 127.0.0.1.

Every test mail arrives from 127.0.0.1, which no SPF record here lists: a mail passes
only with an aligned DKIM signature (or a trusted Authentication-Results header), as a
forwarded or mailing-list copy would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import (CRM, REPORT_BODY, arrive, body_text, Desk, make_mail,
                            running_desk, Sink)
from tests.dns_server import DkimKey, DnsServer

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

JAN = "jan.kowalski@example.com"
ENGINEER = "anna.nowak@s4e.pl"
DESK = "dyspozytor@s4e.pl"


@pytest.fixture
def zones(dns_server: DnsServer, dkim_key: DkimKey) -> DnsServer:
    for domain in ("example.com", "s4e.pl"):
        dns_server.add_txt(f"_dmarc.{domain}", "v=DMARC1; p=reject")
        dns_server.add_txt(domain, "v=spf1 ip4:192.0.2.10 -all")
        dns_server.add_dkim_key(domain, "sel", dkim_key)
    return dns_server


def options(zones: DnsServer, extra: str = "") -> str:
    return (f'[addresses]\nnotify = ["{DESK}"]\n'
            f'[auth]\nverify = "dns"\nresolver = "{zones.address}"\n{extra}')


@pytest.fixture
async def desk(tmp_path: Path, smtp_sink: Sink, zones: DnsServer) -> AsyncIterator[Desk]:
    async with running_desk(tmp_path, options(zones), sink=smtp_sink) as running:
        yield running




def signed(key: DkimKey, raw: bytes, domain: str) -> bytes:
    return key.sign(raw, domain=domain, selector="sel")


async def open_ticket(desk: Desk, sink: Sink, key: DkimKey) -> str:
    report = signed(key, make_mail(body=REPORT_BODY, sender=f"Jan Kowalski <{JAN}>",
                                   message_id="<r1@example.com>"), "example.com")
    row = await desk.mail(report, mail_from=JAN)
    assert row["outcome"] == "new"
    await arrive(sink, JAN, 1)
    return row["ticket"]


async def test_a_signed_report_passes_and_staff_see_the_verdict(
        desk: Desk, smtp_sink: Sink, dkim_key: DkimKey) -> None:
    number = await open_ticket(desk, smtp_sink, dkim_key)
    ticket = await desk.ticket(number)
    assert ticket["messages"][0]["auth"] == "pass"
    (copy,) = await arrive(smtp_sink, DESK, 1)
    assert "weryfikacja nadawcy: pass" in body_text(copy)
    _, out, _ = await desk.cli("inbox", "list")
    assert "new" in out


async def test_a_forged_reporter_changes_nothing_and_is_held(
        desk: Desk, smtp_sink: Sink, dkim_key: DkimKey) -> None:
    """A forged From of the ticket's reporter: no new phone, no rating, no closing."""
    number = await open_ticket(desk, smtp_sink, dkim_key)
    for status in ("in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    await arrive(smtp_sink, JAN, 3)
    forged = make_mail(subject=f"Re: [#{number}] Awaria serwera", sender=f"Jan Kowalski <{JAN}>",
                       body="Ocena: 1\nTelefon: 700 000 000\nAdres instalacji: ul. Obca 9\n",
                       message_id="<forged@example.com>")
    row = await desk.mail(forged, mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "held"
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["rating"]) == ("resolved", None)
    assert ticket["reporter_phone"] == "+48600100200"
    assert "Obca" not in (ticket["install_address"] or "")
    # Routed: whatever it made the desk send is in the outbox by now (one transaction),
    # sent or still to go; a pause before looking at the relay proves less on a loaded CI
    # machine.
    assert len(desk.mails_to(JAN)) == 3  # nothing answered to the forged address
    (held,) = await desk.cli_json("held", "list")
    assert "sender verification failed" in held["reason"]


async def test_a_forged_engineer_never_reaches_the_customer(
        desk: Desk, smtp_sink: Sink, dkim_key: DkimKey) -> None:
    number = await open_ticket(desk, smtp_sink, dkim_key)
    forged = make_mail(subject=f"RE: [#{number}] Awaria serwera",
                       sender=f"Anna Nowak <{ENGINEER}>", to=CRM,
                       body="Prosimy o przelew na konto PL61 1090 1014 0000 0712 1981 2874.\n",
                       message_id="<fake@s4e.pl>")
    row = await desk.mail(forged, mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "held"
    # Routed: whatever it made the desk send is in the outbox by now (one transaction),
    # sent or still to go; a pause before looking at the relay proves less on a loaded CI
    # machine.
    assert len(desk.mails_to(JAN)) == 1
    assert all("przelew" not in body_text(m) for _, m in desk.outbox())


async def test_a_signed_engineer_reply_is_relayed(desk: Desk, smtp_sink: Sink,
                                                  dkim_key: DkimKey) -> None:
    number = await open_ticket(desk, smtp_sink, dkim_key)
    reply = signed(dkim_key, make_mail(subject=f"RE: [#{number}] Awaria serwera",
                                       sender=f"Anna Nowak <{ENGINEER}>", to=CRM,
                                       body="Wymieniliśmy dysk.\n", message_id="<eng@s4e.pl>"),
                   "s4e.pl")
    row = await desk.mail(reply, mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "staff_reply"
    mails = await arrive(smtp_sink, JAN, 2)
    assert body_text(mails[1]).startswith("Wymieniliśmy dysk.")


async def test_a_forwarded_copy_with_intact_dkim_still_passes(
        desk: Desk, smtp_sink: Sink, dkim_key: DkimKey) -> None:
    """The customer's server forwards: SPF breaks (127.0.0.1 is in no record), the DKIM
    signature survives, so the follow-up still completes the report."""
    incomplete = REPORT_BODY.replace("5. Numer seryjny urządzenia / numer Commcell ID: SN-12345\n", "")
    first = signed(dkim_key, make_mail(body=incomplete, sender=f"Jan Kowalski <{JAN}>",
                                       message_id="<i1@example.com>"), "example.com")
    row = await desk.mail(first, mail_from=JAN)
    number = row["ticket"]
    follow = signed(dkim_key, make_mail(subject=f"Re: [#{number}]", body="Numer seryjny: SN-777\n",
                                        sender=f"Jan Kowalski <{JAN}>",
                                        message_id="<i2@example.com>"), "example.com")
    row = await desk.mail(follow, mail_from="bounces@forwarder.example", rcpts=(CRM,))
    assert row["outcome"] == "follow_up"
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["serial_number"]) == ("accepted", "SN-777")
    (forwarded,) = [m for m in ticket["messages"] if m["message_id"] == "<i2@example.com>"]
    assert forwarded["auth"] == "pass"


async def test_dns_down_is_none_and_a_customer_is_served_as_before(
        tmp_path: Path, smtp_sink: Sink, dns_server: DnsServer) -> None:
    dns_server.time_out("example.com")
    async with running_desk(tmp_path, options(dns_server, 'timeout = "1s"\n'),
                            sink=smtp_sink) as desk:
        row = await desk.mail(make_mail(body=REPORT_BODY, sender=f"Jan Kowalski <{JAN}>",
                                        message_id="<dn@example.com>"), mail_from=JAN)
        assert row["outcome"] == "new"
        ticket = await desk.ticket(row["ticket"])
        assert ticket["messages"][0]["auth"] == "none"
        await arrive(smtp_sink, JAN, 1)


@pytest.mark.parametrize("authserv_id, outcome", [("mx.s4e.pl", "staff_reply"),
                                                  ("mx.attacker.example", "held")])
async def test_authentication_results_count_only_from_our_own_mta(
        tmp_path: Path, smtp_sink: Sink, dns_server: DnsServer, dkim_key: DkimKey,
        authserv_id: str, outcome: str) -> None:
    config = (f'[addresses]\nnotify = ["{DESK}"]\n'
              '[auth]\ntrusted_authserv_ids = ["mx.s4e.pl"]\n')
    async with running_desk(tmp_path, config, sink=smtp_sink) as desk:
        row = await desk.mail(make_mail(body=REPORT_BODY, sender=f"Jan Kowalski <{JAN}>",
                                        message_id="<ar1@example.com>"), mail_from=JAN)
        number = row["ticket"]
        reply = (f"Authentication-Results: {authserv_id}; dkim=pass header.d=s4e.pl;"
                 " dmarc=pass header.from=s4e.pl\r\n").encode() + make_mail(
            subject=f"RE: [#{number}] Awaria serwera", sender=f"Anna Nowak <{ENGINEER}>",
            to=CRM, body="Wymieniliśmy dysk.\n", message_id="<ar2@s4e.pl>")
        row = await desk.mail(reply, mail_from=ENGINEER, rcpts=(CRM,))
        assert row["outcome"] == outcome
