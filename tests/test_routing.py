"""Every row of SPEC §4's routing table and every outcome, through the real SMTP edge
and store, seen through the CLI's JSON and the mail that leaves."""

from __future__ import annotations

import asyncio
import re
from itertools import pairwise

import pytest

from tests.conftest import CRM, Desk, INTAKE, REPORT_BODY, Sink, body_text, make_mail, run_sql, wait_for

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

JAN = "jan.kowalski@example.com"
REPORTER = "jan.kowalski@example.com"  # the e-mail the report's body gives: acknowledgements go there
STRANGER = "mallory@evil.example"


def number_of(subject: str) -> str:
    match = re.search(r"\[#(\d{6})\]", subject)
    assert match, subject
    return match.group(1)


async def open_ticket(desk: Desk, body: str = REPORT_BODY, subject: str = "Awaria serwera",
                      sender: str = f"Jan Kowalski <{JAN}>", mid: str = "<r1@example.com>") -> str:
    row = await desk.mail(make_mail(subject=subject, body=body, sender=sender, message_id=mid),
                          mail_from=JAN)
    assert row["outcome"] == "new", row
    return row["ticket"]


async def close(desk: Desk, number: str) -> None:
    await desk.cli("tickets", "set-status", number, "closed", "--note", "test")


# --- new reports --------------------------------------------------------------------

async def test_complete_report_opens_accepted_ticket_and_acknowledges(desk: Desk) -> None:
    number = await open_ticket(desk)
    ticket = await desk.ticket(number)
    assert ticket["status"] == "accepted" and ticket["missing"] == []
    assert (ticket["reporter_name"], ticket["reporter_email"], ticket["reporter_phone"],
            ticket["install_address"], ticket["serial_number"]) == (
        "Jan Kowalski", "jan.kowalski@example.com", "+48600100200", "ul. Prosta 1, 30-001 Kraków",
        "SN-12345")
    (ack,) = desk.mails_to(REPORTER)
    assert ack["Subject"] == f"[#{number}] Awaria serwera"
    assert ack["From"].addresses[0].addr_spec == CRM and ack["Reply-To"] == CRM
    assert ack["In-Reply-To"] == "<r1@example.com>"
    assert ack["Auto-Submitted"] == "auto-replied" and ack["X-Auto-Response-Suppress"] == "All"
    text = body_text(ack)
    assert f"#{number}" in text and "Przyjęte" in text and "Szanowni Państwo" in text
    assert "nie uruchamia" not in text  # never the customer's free text
    assert [m["direction"] for m in ticket["messages"]] == ["in", "out"]


async def test_number_is_six_digits_not_sequential(desk: Desk) -> None:
    numbers = [await open_ticket(desk, mid=f"<n{i}@example.com>") for i in range(4)]
    assert all(re.fullmatch(r"\d{6}", n) for n in numbers)
    assert len(set(numbers)) == 4
    diffs = {int(b) - int(a) for a, b in pairwise(numbers)}
    assert diffs != {1}


async def test_incomplete_report_asks_for_missing_then_follow_up_completes_it(desk: Desk) -> None:
    row = await desk.mail(make_mail(body="Dzień dobry,\nserwer nie działa.\n\nJan Kowalski\n",
                                    message_id="<inc@example.com>"), mail_from=JAN)
    number = row["ticket"]
    ticket = await desk.ticket(number)
    assert ticket["status"] == "awaiting_info"
    assert ticket["missing"] == ["reporter_phone", "install_address", "device_id"]
    (ask,) = desk.mails_to(JAN)
    text = body_text(ask)
    assert "Oczekuje na uzupełnienie" in text
    assert "Adres instalacji sprzętu – realizacji naprawy" in text
    assert "Numer seryjny urządzenia / numer Commcell ID" in text

    reply = ("Uzupełniam brakujące dane:\n\n"
             "Telefon: 600 100 200\nAdres instalacji: ul. Prosta 1, Kraków\n"
             "Numer seryjny: SN-777\n\n> Dzień dobry,\n> serwer nie działa.\n")
    row = await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria serwera", body=reply,
                                    message_id="<inc2@example.com>", In_Reply_To=ask["Message-ID"]),
                          mail_from=JAN, rcpts=(CRM,))
    assert (row["outcome"], row["ticket"]) == ("follow_up", number)
    ticket = await desk.ticket(number)
    assert ticket["status"] == "accepted" and ticket["missing"] == []
    assert ticket["serial_number"] == "SN-777" and ticket["reporter_phone"] == "+48600100200"
    # Guesses from the follow-up never overwrite what the report said.
    assert ticket["description"].startswith("serwer nie działa.")
    assert "Uzupełniam" not in ticket["description"]
    assert ticket["reporter_name"] == "Jan Kowalski"
    acks = desk.mails_to(JAN)
    assert len(acks) == 2 and "Przyjęte" in body_text(acks[1])
    assert len(await desk.cli_json("tickets", "list")) == 1


async def test_follow_up_to_serwis_with_token_is_appended_not_a_second_ticket(desk: Desk) -> None:
    number = await open_ticket(desk)
    row = await desk.mail(make_mail(subject=f"RE: [#{number}] Awaria serwera",
                                    body="Dosyłam logi.\n", message_id="<f1@example.com>"),
                          mail_from=JAN, rcpts=(INTAKE,))
    assert (row["outcome"], row["ticket"]) == ("follow_up", number)
    assert len(await desk.cli_json("tickets", "list")) == 1
    ticket = await desk.ticket(number)
    assert [m["direction"] for m in ticket["messages"]] == ["in", "out", "in"]


@pytest.mark.parametrize("subject", [
    "Re: Odp: AW: PD: Fwd: #{n}", "[#{n}] Awaria", "Odp: zgłoszenie #{n}, pilne", "#{n}"])
async def test_token_forms_are_recognised(desk: Desk, subject: str) -> None:
    number = await open_ticket(desk)
    row = await desk.mail(make_mail(subject=subject.format(n=number), body="Uzupełniam.\n",
                                    message_id="<tok@example.com>"), mail_from=JAN, rcpts=(CRM,))
    assert (row["outcome"], row["ticket"]) == ("follow_up", number)


@pytest.mark.parametrize("subject", ["#{n}7", "#{n}-1 ok" if False else "nr {n}", "＃{n}"])
async def test_not_a_token_means_no_ticket(desk: Desk, subject: str) -> None:
    number = await open_ticket(desk)
    row = await desk.mail(make_mail(subject=subject.format(n=number), body="Pytanie.\n",
                                    message_id="<nt@example.com>"), mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "unknown_guidance"


async def test_full_width_digits_are_not_a_token(desk: Desk) -> None:
    row = await desk.mail(make_mail(subject="#１２３４５６", body="x\n", message_id="<fw@example.com>"),
                          mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "unknown_guidance"


async def test_reply_in_thread_without_token_is_matched_by_message_id(desk: Desk) -> None:
    number = await open_ticket(desk)
    (ack,) = desk.mails_to(REPORTER)
    row = await desk.mail(make_mail(subject="Re: Awaria serwera", body="Dziękuję.\n",
                                    message_id="<th@example.com>", In_Reply_To=ack["Message-ID"],
                                    References=f"<r1@example.com> {ack['Message-ID']}"),
                          mail_from=JAN, rcpts=(CRM,))
    assert (row["outcome"], row["ticket"]) == ("follow_up", number)


async def test_forged_reference_is_not_trusted(desk: Desk) -> None:
    number = await open_ticket(desk)
    forged = f"<t{number}.aaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbb@s4e.pl>"
    row = await desk.mail(make_mail(subject="Re: Awaria", body="x\n", message_id="<fg@example.com>",
                                    In_Reply_To=forged), mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "unknown_guidance" and row["ticket"] is None


# --- closed tickets -------------------------------------------------------------------

async def test_crm_mail_on_closed_ticket_gets_guidance_and_is_not_entered(desk: Desk) -> None:
    number = await open_ticket(desk)
    await close(desk, number)
    before = len((await desk.ticket(number))["messages"])
    row = await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria serwera",
                                    body="Znowu nie działa.\n", message_id="<late@example.com>"),
                          mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "closed_guidance"
    ticket = await desk.ticket(number)
    assert len(ticket["messages"]) == before and ticket["status"] == "closed"
    guidance = desk.mails_to(JAN)[-1]
    text = body_text(guidance)
    assert f"#{number}" in text and "zamknięte" in text and INTAKE in text
    assert guidance["In-Reply-To"] == "<late@example.com>"


async def test_serwis_mail_naming_closed_ticket_opens_linked_ticket(desk: Desk) -> None:
    old = await open_ticket(desk)
    await close(desk, old)
    row = await desk.mail(make_mail(subject=f"Re: [#{old}] Awaria serwera", body=REPORT_BODY,
                                    message_id="<again@example.com>"), mail_from=JAN)
    assert row["outcome"] == "closed_new" and row["ticket"] != old
    new = await desk.ticket(row["ticket"])
    assert new["linked_to"] == old and new["status"] == "accepted"
    assert f"#{old}" not in new["subject"]
    ack = desk.mails_to(REPORTER)[-1]
    assert ack["Subject"] == f"[#{row['ticket']}] Awaria serwera"
    assert (await desk.ticket(old))["status"] == "closed"


async def test_crm_mail_without_ticket_gets_unknown_guidance(desk: Desk) -> None:
    row = await desk.mail(make_mail(subject="Pytanie", body="Czy mogę zgłosić awarię tutaj?\n",
                                    message_id="<q@example.com>"), mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "unknown_guidance"
    (guidance,) = desk.mails_to(JAN)
    assert INTAKE in body_text(guidance) and "#" not in guidance["Subject"]
    assert await desk.cli_json("inbox", "list", "--outcome", "unknown_guidance")


# --- strangers --------------------------------------------------------------------------

async def test_stranger_is_held_not_appended_then_released(desk: Desk) -> None:
    number = await open_ticket(desk)
    row = await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria", sender=STRANGER,
                                    body="Wpisuję się do cudzego zgłoszenia.\n",
                                    message_id="<str@example.com>"),
                          mail_from=STRANGER, rcpts=(CRM,))
    assert row["outcome"] == "held"
    assert len((await desk.ticket(number))["messages"]) == 2
    (held,) = await desk.cli_json("held", "list")
    assert (held["from"], held["ticket"], held["status"]) == (STRANGER, number, "held")
    (notice,) = desk.mails_to(STRANGER)
    assert number not in body_text(notice) and number not in notice["Subject"]

    await desk.cli("held", "release", str(held["id"]))
    ticket = await desk.ticket(number)
    assert [m["from"] for m in ticket["messages"]][-1] == STRANGER
    assert await desk.cli_json("held", "list") == []
    code, _, err = await desk.cli("held", "release", str(held["id"]), ok=False)
    assert code == 1 and "already released" in err


async def test_held_drop(desk: Desk) -> None:
    number = await open_ticket(desk)
    await desk.mail(make_mail(subject=f"[#{number}]", sender=STRANGER, body="x\n",
                              message_id="<d@example.com>"), mail_from=STRANGER, rcpts=(CRM,))
    (held,) = await desk.cli_json("held", "list")
    await desk.cli("held", "drop", str(held["id"]))
    assert await desk.cli_json("held", "list") == []
    assert len((await desk.ticket(number))["messages"]) == 2
    await desk.cli("inbox", "reprocess", str(held["inbound_id"]))
    assert await desk.cli_json("held", "list") == []  # a drop stays dropped


async def test_stranger_cannot_probe_numbers(desk: Desk) -> None:
    open_number = await open_ticket(desk, mid="<o@example.com>")
    closed_number = await open_ticket(desk, mid="<c@example.com>")
    await close(desk, closed_number)
    missing_number = next(str(n) for n in range(100000, 999999)
                          if str(n) not in (open_number, closed_number))
    outcomes = []
    for i, n in enumerate((open_number, closed_number, missing_number)):
        row = await desk.mail(make_mail(subject=f"Re: [#{n}] Awaria", sender=STRANGER,
                                        body="Jaki jest status?\n", message_id=f"<p{i}@evil.example>"),
                              mail_from=STRANGER, rcpts=(CRM,))
        outcomes.append(row["outcome"])
    assert outcomes == ["held", "closed_guidance", "unknown_guidance"]
    # All three are kept for operators, as the notice promises.
    assert len(await desk.cli_json("held", "list")) == 3
    answers = desk.mails_to(STRANGER)
    assert len(answers) == 3
    assert len({body_text(m) for m in answers}) == 1
    assert len({m["Subject"] for m in answers}) == 1
    for m in answers:
        for n in (open_number, closed_number, missing_number):
            assert n not in body_text(m) and n not in m["Subject"]


async def test_stranger_cannot_probe_numbers_through_serwis_either(desk: Desk) -> None:
    open_number = await open_ticket(desk, mid="<o@example.com>")
    closed_number = await open_ticket(desk, mid="<c@example.com>")
    await close(desk, closed_number)
    missing_number = next(str(n) for n in range(100000, 999999)
                          if str(n) not in (open_number, closed_number))
    for i, n in enumerate((open_number, closed_number, missing_number)):
        row = await desk.mail(make_mail(subject=f"Zgłoszenie #{n}", sender=STRANGER,
                                        body="Serwer nie działa.\n", message_id=f"<s{i}@evil.example>"),
                              mail_from=STRANGER)
        assert row["outcome"] in ("new", "closed_new") and row["ticket"] not in (
            open_number, closed_number)
    answers = desk.mails_to(STRANGER)
    assert [m["Subject"].startswith("[#") for m in answers] == [True] * 3
    assert len({re.sub(r"#\d{6}", "#N", body_text(m)) for m in answers}) == 1
    assert len((await desk.ticket(open_number))["messages"]) == 2  # nothing appended


async def test_forged_staff_from_with_own_reply_to_gets_nothing(desk: Desk) -> None:
    row = await desk.mail(make_mail(body="Serwer nie działa.\n\nJan Kowalski\n",
                                    message_id="<victim@example.com>"), mail_from=JAN)
    number = row["ticket"]
    before = await desk.ticket(number)
    forged = make_mail(subject=f"RE: [#{number}] x", sender="helpdesk@s4e.pl",
                       body="Opis problemu: test\nTelefon: 700 000 000\n",
                       message_id="<forged@evil.example>", Reply_To="attacker@evil.example")
    await desk.mail(forged, mail_from="attacker@evil.example", rcpts=(CRM,))
    assert desk.mails_to("attacker@evil.example") == []
    after = await desk.ticket(number)
    for field in ("description", "reporter_phone", "reporter_name", "status", "missing"):
        assert after[field] == before[field], field


async def test_a_token_inside_the_subject_stays_in_the_ticket_subject(desk: Desk) -> None:
    number = await open_ticket(desk, subject="Ponowna awaria (dot. #610190)")
    assert (await desk.ticket(number))["subject"] == "Ponowna awaria (dot. #610190)"
    assert desk.mails_to(REPORTER)[0]["Subject"] == f"[#{number}] Ponowna awaria (dot. #610190)"


async def test_helpdesk_robot_gets_one_guidance_a_day(desk: Desk) -> None:
    for i in range(3):
        row = await desk.mail(make_mail(subject="Re: Twoje zgłoszenie", sender="robot@customer.pl",
                                        body="Dziękujemy za wiadomość.\n",
                                        message_id=f"<robot{i}@customer.pl>"),
                              mail_from="robot@customer.pl", rcpts=(CRM,))
        assert row["outcome"] == "unknown_guidance"
    assert len(desk.mails_to("robot@customer.pl")) == 1


async def test_unverified_staff_domain_mail_is_held_never_relayed(desk: Desk) -> None:
    """Anyone can write From: ...@s4e.pl: without a verified sender it is held and the
    customer gets nothing (SPEC §9, §10)."""
    number = await open_ticket(desk)
    before = len(desk.mails_to(REPORTER))
    row = await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria", sender="inz@s4e.pl",
                                    body="Proszę wpłacić 100 zł na konto...\n",
                                    message_id="<st@s4e.pl>"),
                          mail_from="inz@s4e.pl", rcpts=(CRM,))
    assert row["outcome"] == "held"
    assert len(desk.mails_to(REPORTER)) == before
    assert all("wpłacić" not in body_text(m) for m in desk.mails_to(REPORTER))
    (held,) = await desk.cli_json("held", "list")
    assert held["from"] == "inz@s4e.pl" and "not verified" in held["reason"]


async def test_cc_of_first_message_is_authorised(desk: Desk) -> None:
    raw = make_mail(body=REPORT_BODY, message_id="<cc1@example.com>", Cc="Anna <anna@example.com>")
    row = await desk.mail(raw, mail_from=JAN)
    number = row["ticket"]
    row = await desk.mail(make_mail(subject=f"Re: [#{number}]", sender="anna@example.com",
                                    body="Potwierdzam.\n", message_id="<cc2@example.com>"),
                          mail_from="anna@example.com", rcpts=(CRM,))
    assert row["outcome"] == "follow_up"


# --- automatic mail -------------------------------------------------------------------

AUTO_CASES = {
    "auto-submitted": dict(headers={"Auto-Submitted": "auto-replied"}),
    "precedence bulk": dict(headers={"Precedence": "bulk"}),
    "precedence junk": dict(headers={"Precedence": "junk"}),
    "precedence list": dict(headers={"Precedence": "list"}),
    "list-id": dict(headers={"List-Id": "<klienci.example.com>"}),
    "x-autoreply": dict(headers={"X-Autoreply": "yes"}),
    "x-autorespond": dict(headers={"X-Autorespond": "yes"}),
    "mailer-daemon": dict(sender="MAILER-DAEMON@mx.example.com"),
    "postmaster": dict(sender="postmaster@example.com"),
    "null sender": dict(mail_from=""),
    "precedence auto_reply": dict(headers={"Precedence": "auto_reply"}),
    "x-loop": dict(headers={"X-Loop": "helpdesk@customer.pl"}),
    "out-of-office subject": dict(subject="Automatyczna odpowiedź: Awaria"),
    "automatic reply subject": dict(subject="Automatic reply: [#123456] Awaria"),
}


@pytest.mark.parametrize("case", list(AUTO_CASES))
@pytest.mark.parametrize("rcpt", [INTAKE, CRM])
async def test_automatic_mail_is_stored_never_answered(desk: Desk, case: str, rcpt: str) -> None:
    spec = AUTO_CASES[case]
    sender = spec.get("sender", JAN)
    headers = {k.replace("-", "_"): v for k, v in spec.get("headers", {}).items()}
    raw = make_mail(subject=spec.get("subject", "Awaria serwera"), body=REPORT_BODY,
                    sender=sender, message_id="<auto@example.com>", **headers)
    row = await desk.mail(raw, mail_from=spec.get("mail_from", sender), rcpts=(rcpt,))
    assert row["outcome"] == "ignored_auto"
    assert desk.outbox() == []
    assert await desk.cli_json("tickets", "list") == []


def dsn_for(message_id: str, rcpt: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.com\r\nTo: crm@s4e.pl\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn1@mx.example.com>\r\n"
        "MIME-Version: 1.0\r\nAuto-Submitted: auto-replied\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Serwis S4E <crm@s4e.pl>\r\nTo: {rcpt}\r\nMessage-ID: {message_id}\r\n"
        "Subject: [#123456] Awaria\r\n\r\n--B--\r\n").encode()


async def sent(desk: Desk) -> None:
    """Until the desk's one mail has left: a bounce comes after that. Routed is not yet
    sent (the mailer runs after the commit), and on a loaded CI machine the DSN could
    be processed while the acknowledgement still waited."""
    async def left() -> bool:
        return [o["status"] for o in await desk.cli_json("outbox", "list")] == ["sent"]
    await wait_for(left)


async def test_dsn_for_our_acknowledgement_marks_it_bounced(desk: Desk) -> None:
    number = await open_ticket(desk)
    (ack,) = desk.mails_to(REPORTER)
    await sent(desk)
    row = await desk.mail(dsn_for(ack["Message-ID"], REPORTER), mail_from="", rcpts=(CRM,))
    assert row["outcome"] == "ignored_auto"
    (out,) = await desk.cli_json("outbox", "list")
    assert out["status"] == "bounced"
    assert (await desk.ticket(number))["reporter_bounced"] is True
    assert len(desk.outbox()) == 1  # the bounce itself is never answered


async def test_our_own_mail_coming_back_is_ignored(desk: Desk) -> None:
    await open_ticket(desk)
    (row, _) = desk.outbox()[0]
    ((raw,),) = run_sql(desk.db, "SELECT raw FROM outbox_raw WHERE id = ?", (row["id"],))
    raw = bytes(raw)
    # A misconfigured forward sends our acknowledgement back to crm@.
    result = await desk.mail(raw, mail_from=JAN, rcpts=(CRM,))
    assert result["outcome"] == "ignored_auto"
    assert len(desk.outbox()) == 1


@pytest.fixture
def desk_options(request) -> str:
    return getattr(request, "param", "")


@pytest.mark.parametrize("desk_options", ["[tickets]\nmax_auto_replies_per_hour = 2\n"],
                         indirect=True)
async def test_auto_reply_cap_still_opens_tickets(desk: Desk) -> None:
    for i in range(4):
        await desk.mail(make_mail(body=REPORT_BODY, message_id=f"<cap{i}@example.com>"),
                        mail_from=JAN)
    assert len(await desk.cli_json("tickets", "list")) == 4
    assert len(desk.mails_to(REPORTER)) == 2
    tickets = [await desk.ticket(t["number"]) for t in await desk.cli_json("tickets", "list")]
    notes = [h["note"] for t in tickets for h in t["history"]]
    assert sum("automatic answer limit" in (n or "") for n in notes) == 2


async def test_same_message_via_another_path_is_a_duplicate(desk: Desk) -> None:
    await open_ticket(desk, mid="<same@example.com>")
    # The same message again, its headers changed on the way (a forwarder's stamp).
    again = make_mail(body=REPORT_BODY, message_id="<same@example.com>",
                      X_Forwarded_For="jan@old-domain.example")
    row = await desk.mail(again, mail_from=JAN)
    assert row["outcome"] == "duplicate"
    assert len(await desk.cli_json("tickets", "list")) == 1
    assert len(desk.outbox()) == 1


@pytest.mark.parametrize("change", [{"sender": "Anna Nowak <anna.nowak@example.com>"},
                                    {"subject": "Awaria serwera w oddziale 2"}])
async def test_same_message_id_and_body_from_another_sender_is_another_message(
        desk: Desk, change: dict) -> None:
    """An alarm script sends the same text with one Message-ID for two sites: a
    different From or Subject makes it another message, not a duplicate."""
    await open_ticket(desk, mid="<script@monitor.example>")
    row = await desk.mail(make_mail(body=REPORT_BODY, message_id="<script@monitor.example>",
                                    **change), mail_from=JAN)
    assert row["outcome"] == "new"
    assert len(await desk.cli_json("tickets", "list")) == 2


async def test_same_message_id_on_different_content_is_another_message(desk: Desk) -> None:
    # Devices and scripts reuse Message-IDs: a different alarm is a different report.
    await open_ticket(desk, mid="<alarm@monitor.example>")
    row = await desk.mail(make_mail(body=REPORT_BODY.replace("SN-12345", "SN-999"),
                                    message_id="<alarm@monitor.example>"), mail_from=JAN)
    assert row["outcome"] == "new"
    assert len(await desk.cli_json("tickets", "list")) == 2


@pytest.mark.parametrize("desk_options", ['[tickets]\nclosed_action = "reject"\n'], indirect=True)
async def test_closed_action_reject_refuses_at_end_of_data(desk: Desk) -> None:
    import smtplib

    number = await open_ticket(desk)
    await close(desk, number)
    before = len((await desk.ticket(number))["messages"])
    with pytest.raises(smtplib.SMTPDataError) as err:
        await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria", body="Dalej źle.\n",
                                  message_id="<rej@example.com>"), mail_from=JAN, rcpts=(CRM,))
    assert err.value.smtp_code == 550
    # The guidance, but not the number: whoever connected may have forged the From.
    assert INTAKE.encode() in err.value.smtp_error and b"closed" in err.value.smtp_error
    assert number.encode() not in err.value.smtp_error
    rows = await desk.cli_json("inbox", "list", "--outcome", "closed_rejected")
    assert len(rows) == 1 and rows[0]["message_id"] == "<rej@example.com>"
    assert len((await desk.ticket(number))["messages"]) == before
    # To serwis@ it is still a new report.
    row = await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria", body=REPORT_BODY,
                                    message_id="<rej2@example.com>"), mail_from=JAN)
    assert row["outcome"] == "closed_new"


@pytest.mark.parametrize("desk_options", ['[tickets]\nreply_policy = "domain"\n'], indirect=True)
async def test_reply_policy_domain_admits_the_reporters_colleagues(desk: Desk) -> None:
    number = await open_ticket(desk)
    row = await desk.mail(make_mail(subject=f"[#{number}]", sender="anna@example.com", body="x\n",
                                    message_id="<dom@example.com>"),
                          mail_from="anna@example.com", rcpts=(CRM,))
    assert row["outcome"] == "follow_up"
    row = await desk.mail(make_mail(subject=f"[#{number}]", sender=STRANGER, body="x\n",
                                    message_id="<dom2@example.com>"), mail_from=STRANGER, rcpts=(CRM,))
    assert row["outcome"] == "held"


# --- concurrency and reprocessing ---------------------------------------------------------

async def test_twenty_reports_at_once_get_twenty_distinct_numbers(desk: Desk) -> None:
    from tests.conftest import send, wait_for

    mails = [make_mail(body=REPORT_BODY, message_id=f"<many{i}@example.com>",
                       sender=f"user{i}@example.com") for i in range(20)]
    await asyncio.gather(*(send(desk.gw.port, f"user{i}@example.com", [INTAKE], m)
                           for i, m in enumerate(mails)))

    async def all_routed():
        rows = await desk.inbox()
        return len(rows) == 20 and all(r["outcome"] for r in rows) and rows

    rows = await wait_for(all_routed, timeout=30)
    assert {r["outcome"] for r in rows} == {"new"}
    assert len({r["ticket"] for r in rows}) == 20
    assert len(await desk.cli_json("tickets", "list")) == 20


async def test_two_replies_at_once_are_both_appended(desk: Desk) -> None:
    from tests.conftest import send, wait_for

    number = await open_ticket(desk)
    replies = [make_mail(subject=f"Re: [#{number}]", body=f"Uwaga {i}\n",
                         message_id=f"<two{i}@example.com>") for i in range(2)]
    await asyncio.gather(*(send(desk.gw.port, JAN, [CRM], m) for m in replies))

    async def both():
        return len((await desk.ticket(number))["messages"]) == 4

    await wait_for(both)


async def test_reprocess_is_idempotent(desk: Desk) -> None:
    number = await open_ticket(desk)
    row = await desk.mail(make_mail(subject=f"[#{number}]", body="Dosyłam.\n",
                                    message_id="<rp@example.com>"), mail_from=JAN, rcpts=(CRM,))
    for inbound_id in (1, row["id"]):
        code, out, _ = await desk.cli("inbox", "reprocess", str(inbound_id))
        assert f"ticket #{number}" in out
    assert len(await desk.cli_json("tickets", "list")) == 1
    assert len((await desk.ticket(number))["messages"]) == 3
    assert len(desk.outbox()) == 1


async def test_reprocess_unknown_id_is_one_line(desk: Desk) -> None:
    code, _, err = await desk.cli("inbox", "reprocess", "999", ok=False)
    assert code == 1 and "not found" in err and err.count("\n") == 1


async def test_a_forged_bounce_from_a_normal_sender_marks_nothing(desk: Desk) -> None:
    """A stranger names our Message-ID in a DSN-looking mail with a normal envelope
    sender: 0 rows marked bounced, the reporter not flagged (SPEC §4)."""
    number = await open_ticket(desk)
    (ack,) = desk.mails_to(REPORTER)
    await sent(desk)
    row = await desk.mail(dsn_for(ack["Message-ID"], REPORTER), mail_from="mallory@example.net",
                          rcpts=(CRM,))
    assert row["outcome"] == "ignored_auto"
    (out,) = await desk.cli_json("outbox", "list")
    assert out["status"] == "sent"
    assert (await desk.ticket(number))["reporter_bounced"] is False


async def test_bounced_rows_say_why(desk: Desk) -> None:
    await open_ticket(desk)
    (ack,) = desk.mails_to(REPORTER)
    await sent(desk)
    await desk.mail(dsn_for(ack["Message-ID"], REPORTER), mail_from="", rcpts=(CRM,))
    (out,) = await desk.cli_json("outbox", "list")
    assert out["status"] == "bounced" and "delivery status notification" in out["last_error"]


async def test_a_dsn_never_cancels_mail_not_yet_sent(desk_with_relay: Desk,
                                                    smtp_sink: Sink) -> None:
    """The relay defers: the acknowledgement waits in the outbox. A DSN naming it (even
    a real-looking one) must not cancel it for good: it is delivered once the relay
    takes it."""
    desk = desk_with_relay
    smtp_sink.fail_next = ["451 4.3.0 try later"] * 2
    await open_ticket(desk)
    ((row, ack),) = desk.outbox()
    await desk.mail(dsn_for(ack["Message-ID"], REPORTER), mail_from="", rcpts=(CRM,))
    await wait_for(lambda: len(smtp_sink.messages) == 1, timeout=30)
    # The relay records the mail before its 250 reaches the mailer, which marks the row
    # only then: wait for the mark rather than race it.
    await sent(desk)
