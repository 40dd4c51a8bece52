"""The engineers' desk by mail (SPEC §9), through SMTP, the store and the relay sink:
every customer message reaches an engineer, and an engineer who presses Reply answers the
customer in the thread."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway import store
from tests.conftest import (CRM, INTAKE, REPORT_BODY, arrive, body_text, Desk, make_mail,
                            received, running_desk, Sink, wait_for)

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

JAN = "jan.kowalski@example.com"
ENGINEER = "anna.nowak@s4e.pl"
DESK = "dyspozytor@s4e.pl"
# Loopback is the trusted relay here: mail from it counts as verified (SPEC §10), so an
# engineer's mail is staff mail. (Unverified staff mail: tests/test_routing.py.)
OPTIONS = f'[addresses]\nnotify = ["{DESK}"]\n[auth]\ntrusted_relays = ["127.0.0.1"]\n'


@pytest.fixture
async def desk(tmp_path: Path, smtp_sink: Sink) -> AsyncIterator[Desk]:
    async with running_desk(tmp_path, OPTIONS, sink=smtp_sink) as running:
        yield running




def report_with_log(message_id: str = "<r1@example.com>") -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Jan Kowalski <{JAN}>"
    msg["To"] = INTAKE
    msg["Subject"] = "Awaria macierzy"
    msg["Message-ID"] = message_id
    msg.set_content(REPORT_BODY)
    msg.add_attachment(b"2026-12-01 ERROR disk 3 failed\n" * 100, maintype="text",
                       subtype="plain", filename="cvlt.log")
    return msg.as_bytes()


def engineer_reply(number: str, parent: EmailMessage, text: str, *,
                   attachment: bytes | None = None, sender: str = ENGINEER,
                   message_id: str = "<eng1@s4e.pl>") -> bytes:
    """What Outlook sends when an engineer presses Reply on a staff copy."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Anna Nowak <{sender}>"
    msg["To"] = CRM
    msg["Subject"] = f"RE: [#{number}] Awaria macierzy"
    msg["Message-ID"] = message_id
    msg["In-Reply-To"] = parent["Message-ID"]
    msg["References"] = parent["Message-ID"]
    quoted = "\n".join("> " + line for line in body_text(parent).splitlines())
    msg.set_content(f"{text}\n\n-----Original Message-----\nFrom: Jan Kowalski via S4E\n"
                    f"Sent: Tuesday\nTo: {DESK}\nSubject: [#{number}] Awaria macierzy\n\n"
                    f"{quoted}\n")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf",
                           filename="raport serwisowy.pdf")
    return msg.as_bytes()


async def open_ticket(desk: Desk, sink: Sink) -> tuple[str, EmailMessage]:
    row = await desk.mail(report_with_log(), mail_from=JAN)
    assert row["outcome"] == "new"
    (copy,) = await arrive(sink, DESK, 1)
    return row["ticket"], copy


async def test_customer_report_engineer_reply_customer_receives_it_in_the_thread(
        desk: Desk, smtp_sink: Sink) -> None:
    number, copy = await open_ticket(desk, smtp_sink)
    (ack,) = await arrive(smtp_sink, JAN, 1)
    # The staff copy: from crm@ in the customer's name, Reply-To crm@, our Message-ID.
    assert copy["From"].addresses[0].addr_spec == CRM
    assert copy["From"].addresses[0].display_name == "Jan Kowalski via S4E"
    assert copy["Reply-To"] == CRM and copy["Auto-Submitted"] == "auto-generated"
    assert copy["Subject"] == f"[#{number}] Awaria macierzy"
    assert copy["Message-ID"].startswith(f"<t{number}.")
    text = body_text(copy)
    assert "Serwer nie uruchamia się po aktualizacji." in text
    assert "cvlt.log, 3 KB, plik z logami – w załączeniu" in text
    assert "weryfikacja nadawcy: pass" in text
    assert [p.get_filename() for p in copy.iter_attachments()] == ["cvlt.log"]

    # The engineer presses Reply, writes above the quoted copy and attaches a report.
    reply = engineer_reply(number, copy, "Dzień dobry,\nwymieniliśmy dysk 3.\n\nAnna Nowak",
                           attachment=b"%PDF-1.4 raport")
    row = await desk.mail(reply, mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "staff_reply"
    (_, answer) = await arrive(smtp_sink, JAN, 2)
    assert answer["From"].addresses[0].addr_spec == CRM
    assert "Anna Nowak" in answer["From"].addresses[0].display_name
    assert answer["Subject"] == f"[#{number}] Awaria macierzy"
    assert answer["In-Reply-To"] == "<eng1@s4e.pl>" or answer["In-Reply-To"] == ack["Message-ID"]
    assert ack["Message-ID"] in answer["References"] or "<r1@example.com>" in answer["References"]
    said = body_text(answer)
    assert said.startswith("Dzień dobry,\nwymieniliśmy dysk 3.\n\nAnna Nowak")
    assert "Original Message" not in said and "> " not in said and DESK not in said
    assert [p.get_filename() for p in answer.iter_attachments()] == ["raport serwisowy.pdf"]
    assert answer["Auto-Submitted"] is None  # a person wrote it
    ticket = await desk.ticket(number)
    kinds = [(m["direction"], m["kind"]) for m in ticket["messages"]]
    assert kinds[0] == ("in", "customer") and ("out", "staff_reply") in kinds
    assert ticket["messages"][0]["auth"] == "pass"


async def test_internal_note_is_recorded_and_never_sent(desk: Desk, smtp_sink: Sink) -> None:
    number, copy = await open_ticket(desk, smtp_sink)
    await arrive(smtp_sink, JAN, 1)
    note = engineer_reply(number, copy, "#wewnętrzne\nKlient ma zaległe faktury, uwaga.")
    row = await desk.mail(note, mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "staff_note"
    # Routed: whatever it made the desk send is in the outbox by now (one transaction),
    # sent or still to go; a pause before looking at the relay proves less on a loaded CI
    # machine.
    assert len(desk.mails_to(JAN)) == 1  # only the acknowledgement
    assert all("faktury" not in body_text(m) for _, m in desk.outbox())
    ticket = await desk.ticket(number)
    (entry,) = [m for m in ticket["messages"] if m["kind"] == "staff_note"]
    assert entry["from"] == ENGINEER


async def test_commands_change_status_and_assignee_as_the_cli_would(
        desk: Desk, smtp_sink: Sink) -> None:
    number, copy = await open_ticket(desk, smtp_sink)
    await arrive(smtp_sink, JAN, 1)
    mail = engineer_reply(number, copy, "Status: in_progress\nAssign: piotr@s4e.pl\n\n"
                                        "Rozpoczynamy diagnozę.")
    row = await desk.mail(mail, mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "staff_reply"
    mails = await arrive(smtp_sink, JAN, 3)
    bodies = [body_text(m) for m in mails[1:]]
    assert any(b.startswith("Rozpoczynamy diagnozę.") for b in bodies)
    assert any("W realizacji" in b for b in bodies)
    assert all("Status:" not in b.split("\n--")[0] and "Assign" not in b for b in bodies)
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["assignee"]) == ("in_progress", "piotr@s4e.pl")
    assert any(h["actor"] == ENGINEER and h["to"] == "in_progress" for h in ticket["history"])
    # The next customer message goes to the assignee, not to notify.
    follow = make_mail(subject=f"Re: [#{number}] Awaria macierzy", body="Jest gorzej.\n",
                       sender=f"Jan Kowalski <{JAN}>", message_id="<f1@example.com>")
    row = await desk.mail(follow, mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "follow_up"
    (to_assignee,) = await arrive(smtp_sink, "piotr@s4e.pl", 1)
    assert "Nowa wiadomość klienta w zgłoszeniu" in body_text(to_assignee)
    assert "Jest gorzej." in body_text(to_assignee)
    assert len(received(smtp_sink, DESK)) == 1


@pytest.mark.parametrize("text, problem", [
    ("Status: zrobione\n\nGotowe.", "zrobione"),
    ("Status: closed\nAssign: ktos@gmail.com\n\nGotowe.", "not a staff address"),
    ("Status: awaiting_info\n\nGotowe.", "cannot go from accepted to awaiting_info"),
])
async def test_a_bad_command_applies_nothing_and_tells_the_engineer(
        desk: Desk, smtp_sink: Sink, text: str, problem: str) -> None:
    number, copy = await open_ticket(desk, smtp_sink)
    await arrive(smtp_sink, JAN, 1)
    row = await desk.mail(engineer_reply(number, copy, text), mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "staff_note"
    (notice,) = await arrive(smtp_sink, ENGINEER, 1)
    assert "żadne polecenie nie zostało wykonane" in body_text(notice)
    assert problem in body_text(notice)
    assert len(received(smtp_sink, JAN)) == 1
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["assignee"]) == ("accepted", None)


async def test_an_empty_reply_is_not_sent(desk: Desk, smtp_sink: Sink) -> None:
    number, copy = await open_ticket(desk, smtp_sink)
    await arrive(smtp_sink, JAN, 1)
    row = await desk.mail(engineer_reply(number, copy, ""), mail_from=ENGINEER, rcpts=(CRM,))
    assert row["outcome"] == "staff_note"
    (notice,) = await arrive(smtp_sink, ENGINEER, 1)
    assert "nie zawiera żadnej treści" in body_text(notice)
    assert len(received(smtp_sink, JAN)) == 1


async def test_a_reply_to_a_closed_ticket_is_not_sent(desk: Desk, smtp_sink: Sink) -> None:
    number, copy = await open_ticket(desk, smtp_sink)
    await desk.cli("tickets", "set-status", number, "closed")
    await arrive(smtp_sink, JAN, 2)
    row = await desk.mail(engineer_reply(number, copy, "Jeszcze jedno."), mail_from=ENGINEER,
                          rcpts=(CRM,))
    assert row["outcome"] == "closed_guidance"
    (notice,) = await arrive(smtp_sink, ENGINEER, 1)
    assert "zgłoszenie jest zamknięte" in body_text(notice)
    # Routed: whatever it made the desk send is in the outbox by now (one transaction),
    # sent or still to go; a pause before looking at the relay proves less on a loaded CI
    # machine.
    assert len(desk.mails_to(JAN)) == 2


async def test_customer_follow_ups_reach_the_desk(desk: Desk, smtp_sink: Sink) -> None:
    number, _ = await open_ticket(desk, smtp_sink)
    follow = make_mail(subject=f"Re: [#{number}] Awaria macierzy",
                       body="Dosyłam zdjęcie.\n\n> stary cytat: tel. 999 999 999\n",
                       sender=f"Jan Kowalski <{JAN}>", message_id="<f2@example.com>")
    await desk.mail(follow, mail_from=JAN, rcpts=(CRM,))
    copies = await arrive(smtp_sink, DESK, 2)
    text = body_text(copies[1])
    assert "Nowa wiadomość klienta" in text and "Dosyłam zdjęcie." in text
    assert "999 999 999" not in text  # the new text only


async def test_set_status_accepted_from_awaiting_info_sends_the_acknowledgement(
        desk: Desk, smtp_sink: Sink) -> None:
    """The customer phoned in the missing serial: the engineer accepts the ticket."""
    incomplete = REPORT_BODY.replace("5. Numer seryjny urządzenia / numer Commcell ID: SN-12345\n", "")
    row = await desk.mail(make_mail(body=incomplete, sender=f"Jan Kowalski <{JAN}>",
                                    message_id="<inc@example.com>"), mail_from=JAN)
    number = row["ticket"]
    assert (await desk.ticket(number))["status"] == "awaiting_info"
    await desk.cli("tickets", "set-status", number, "accepted")
    mails = await arrive(smtp_sink, JAN, 2)
    assert "Przyjęte" in body_text(mails[1]) and "przyjął" in body_text(mails[1])


# --- who gets ticket mail (SPEC §4) ------------------------------------------------------

async def test_a_body_address_in_another_domain_is_a_contact_and_gets_nothing(
        desk: Desk, smtp_sink: Sink) -> None:
    body = REPORT_BODY.replace(JAN, "ofiara@victim.example")
    row = await desk.mail(make_mail(body=body, sender="Jan Kowalski <jan@example.com>",
                                    message_id="<c1@example.com>"), mail_from="jan@example.com")
    (ack,) = await arrive(smtp_sink, "jan@example.com", 1)
    assert ack["Cc"] is None
    ticket = await desk.ticket(row["ticket"])
    assert ticket["reporter_email"] == "jan@example.com"
    # Routed: whatever it made the desk send is in the outbox by now (one transaction),
    # sent or still to go; a pause before looking at the relay proves less on a loaded CI
    # machine.
    assert desk.mails_to("ofiara@victim.example") == []
    copy = (await arrive(smtp_sink, DESK, 1))[-1]
    assert "ofiara@victim.example" in body_text(copy)  # a contact for staff


async def test_the_cap_counts_per_recipient_without_the_plus_tag(tmp_path: Path) -> None:
    """Forged reports in victim+N@ variants: at most max_auto_replies_per_hour answers."""
    options = "[tickets]\nmax_auto_replies_per_hour = 3\n"
    async with running_desk(tmp_path, options) as desk:
        for n in range(6):
            victim = f"victim+{n}@example.org"
            await desk.mail(make_mail(body=REPORT_BODY.replace(JAN, victim),
                                      sender=victim, message_id=f"<v{n}@example.org>"),
                            mail_from=victim)
        answered = [row for row, _ in desk.outbox() if row["rcpt_to"].startswith("victim")]
        assert len(answered) == 3


# --- the rating window on a running daemon ------------------------------------------------

async def test_the_rating_window_closes_a_ticket_on_a_running_daemon(
        tmp_path: Path, smtp_sink: Sink) -> None:
    from gateway.config import load_config
    from gateway.daemon import Gateway
    from tests.conftest import write_config

    path = write_config(tmp_path, '[tickets]\nrating_window = "2s"\n', sink=smtp_sink)
    gw = Gateway(load_config(path), housekeeping_seconds=0.2)
    await gw.start(port=0)
    desk = Desk(gw, path)
    try:
        row = await desk.mail(make_mail(body=REPORT_BODY, sender=f"Jan Kowalski <{JAN}>",
                                        message_id="<w1@example.com>"), mail_from=JAN)
        number = row["ticket"]
        for status in ("in_progress", "resolved"):
            await desk.cli("tickets", "set-status", number, status)

        async def closed() -> bool:
            return (await desk.ticket(number))["status"] == "closed"

        await wait_for(closed, timeout=30)
        ticket = await desk.ticket(number)
        assert ticket["closed_reason"] == "rating_window"
        last = (await arrive(smtp_sink, JAN, 4))[-1]
        assert "Zamknięte" in body_text(last) and "nie otrzymaliśmy oceny" in body_text(last)
    finally:
        await gw.stop(grace=1)


# --- held mail digest ------------------------------------------------------------------------

async def test_held_mail_is_announced_to_notify_in_one_digest(tmp_path: Path) -> None:
    from gateway.digest import send_held_digest
    from gateway.context import make_context

    options = f'[addresses]\nnotify = ["{DESK}"]\n'
    async with running_desk(tmp_path, options) as desk:
        row = await desk.mail(make_mail(body=REPORT_BODY, sender=f"Jan Kowalski <{JAN}>",
                                        message_id="<d0@example.com>"), mail_from=JAN)
        number = row["ticket"]
        for n in range(3):
            stranger = f"obcy{n}@example.net"
            held = await desk.mail(make_mail(subject=f"Re: [#{number}]", sender=stranger,
                                             body="Ja też.\n", message_id=f"<d{n + 1}@x>"),
                                   mail_from=stranger, rcpts=(CRM,))
            assert held["outcome"] == "held"
        conn = await store.connect(desk.db)
        try:
            ctx = await make_context(conn, desk.gw.config)
            assert await send_held_digest(conn, ctx) == 3
            assert await send_held_digest(conn, ctx) == 0  # nothing new
            later = dataclasses.replace(ctx, clock=lambda: store.utcnow() + timedelta(minutes=30))
            await desk.mail(make_mail(subject=f"Re: [#{number}]", sender="obcy9@example.net",
                                      body="I ja.\n", message_id="<d9@x>"),
                            mail_from="obcy9@example.net", rcpts=(CRM,))
            assert await send_held_digest(conn, later) == 0  # not within the hour
            hour = dataclasses.replace(ctx, clock=lambda: store.utcnow() + timedelta(minutes=61))
            assert await send_held_digest(conn, hour) == 1
        finally:
            await conn.close()
        digests = [m for m in desk.mails_to(DESK) if "wstrzymane" in body_text(m)]
        assert len(digests) == 2
        assert "Wiadomości wstrzymane do decyzji operatora: 3" in body_text(digests[0])
        assert "obcy1@example.net" in body_text(digests[0])


# --- templates an operator can re-word ---------------------------------------------------------

async def test_template_folder_overrides_and_sighup_reloads(tmp_path: Path) -> None:
    folder = tmp_path / "tpl" / "pl"
    folder.mkdir(parents=True)
    (folder / "acknowledgement.txt.j2").write_text(
        "Dzień dobry, zgłoszenie {{ ticket }} przyjęte (wersja 1).\n", "utf-8")
    options = f'[tickets]\ntemplates = "{tmp_path / "tpl"}"\n'
    async with running_desk(tmp_path, options) as desk:
        await desk.mail(make_mail(body=REPORT_BODY, message_id="<t1@example.com>"))
        (first,) = desk.mails_to(JAN)
        assert "przyjęte (wersja 1)" in body_text(first)
        (folder / "acknowledgement.txt.j2").write_text(
            "Dzień dobry, zgłoszenie {{ ticket }} przyjęte (wersja 2).\n", "utf-8")
        await desk.gw.reload()  # what SIGHUP does
        await desk.mail(make_mail(body=REPORT_BODY, message_id="<t2@example.com>"))
        second = desk.mails_to(JAN)[-1]
        assert "przyjęte (wersja 2)" in body_text(second)


async def test_a_linked_new_ticket_drops_the_old_token_from_its_subject(desk: Desk,
                                                                        smtp_sink: Sink) -> None:
    number, _ = await open_ticket(desk, smtp_sink)
    await desk.cli("tickets", "set-status", number, "closed")
    again = make_mail(subject=f"Ponowna awaria (dot. #{number})", body=REPORT_BODY,
                      sender=f"Jan Kowalski <{JAN}>", message_id="<again@example.com>")
    row = await desk.mail(again, mail_from=JAN)
    assert row["outcome"] == "closed_new"
    ticket = await desk.ticket(row["ticket"])
    assert ticket["subject"] == f"Ponowna awaria (dot. {number})"
    assert ticket["linked_to"] == number


async def test_a_joe_job_sends_the_victim_nothing(tmp_path: Path) -> None:
    """200 forged reports naming one victim's address in the body (SPEC §4): the victim
    is only a contact for staff and gets 0 mails; the forged senders' answers are capped
    per recipient without the +tag."""
    import smtplib

    def send_all(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for n in range(200):
                forger = f"forger+{n}@example.net"
                body = REPORT_BODY.replace(JAN, "victim@victim.example")
                client.sendmail(forger, [INTAKE], make_mail(body=body, sender=forger,
                                                            message_id=f"<j{n}@example.net>"))

    async with running_desk(tmp_path, "") as desk:
        await asyncio.to_thread(send_all, desk.gw.port)

        async def all_routed() -> bool:
            rows = await desk.inbox()
            return len(rows) == 200 and all(r["outcome"] for r in rows)

        await wait_for(all_routed, timeout=120, interval=0.5)
        rows = [row for row, _ in desk.outbox()]
        assert [r for r in rows if "victim" in r["rcpt_to"]] == []
        assert len([r for r in rows if r["rcpt_to"].startswith("forger")]) == 20
        tickets = await desk.cli_json("tickets", "list")
        assert len(tickets) == 200  # every report is still a ticket for staff
