"""The whole S4E procedure end to end, as a customer and an engineer live it: every
step seen in the customer's mailbox (the relay sink), in one thread, in Polish."""

from __future__ import annotations

import re
from email.message import EmailMessage

from tests.conftest import CRM, INTAKE, REPORT_BODY, Desk, Sink, body_text, make_mail, wait_for

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

JAN = "jan.kowalski@example.com"
# Jan reports for his colleague: the report names her address in his own domain, so she
# is the reporter and he, the dispatcher, gets every mail in Cc.
REPORTER = "jan@example.com"
REPORT_BODY = REPORT_BODY.replace(JAN, REPORTER)


def to_reporter(sink: Sink) -> list[bytes]:
    return [raw for _, rcpts, raw in sink.messages if REPORTER in rcpts]


async def arrived(sink: Sink, count: int) -> list[EmailMessage]:
    """The mail the reporter got (the sender, a colleague in the same domain, gets the
    same mail as the dispatcher in Cc)."""
    from email import message_from_bytes, policy

    await wait_for(lambda: len(to_reporter(sink)) >= count, timeout=30)
    return [message_from_bytes(raw, policy=policy.default) for raw in to_reporter(sink)]


async def test_the_procedure_from_report_to_closing(desk_with_relay: Desk, smtp_sink: Sink,
                                                    tmp_path) -> None:
    desk, sink = desk_with_relay, smtp_sink
    # 1. The customer reports the failure to serwis@ with the six pieces of information.
    report = make_mail(subject="Awaria macierzy dyskowej", body=REPORT_BODY,
                       message_id="<report@example.com>")
    row = await desk.mail(report, mail_from=JAN)
    number = row["ticket"]
    assert re.fullmatch(r"\d{6}", number)

    # 2. Acceptance: crm@ answers, the subject carries the number.
    (ack,) = await arrived(sink, 1)
    assert ack["Subject"] == f"[#{number}] Awaria macierzy dyskowej"
    # To the reporter the report names (the procedure's "Zgłaszający").
    assert ack["From"].addresses[0].addr_spec == CRM and ack["To"] == REPORTER
    assert ack["In-Reply-To"] == "<report@example.com>"
    assert "Przyjęte" in body_text(ack)
    thread = [ack["Message-ID"]]
    # The sender named a colleague in his own domain as the reporter: he is the
    # dispatcher and gets the same mail, shown in Cc.
    assert ack["Cc"] == JAN
    await wait_for(lambda: len(sink.messages) >= 2, timeout=30)
    copies = [m for m in sink.parsed() if m["Message-ID"] != ack["Message-ID"]]
    assert [c["Subject"] for c in copies] == [ack["Subject"]] and copies[0]["Cc"] == JAN

    # 3. The engineer starts the diagnosis: the customer is told, in the thread.
    await desk.cli("tickets", "set-status", number, "in_progress", "--note",
                   "Inżynier analizuje logi.")
    notice = (await arrived(sink, 2))[1]
    assert notice["Subject"] == f"[#{number}] Awaria macierzy dyskowej"
    assert notice["In-Reply-To"] in ("<report@example.com>", *thread)
    assert "W realizacji" in body_text(notice) and "Inżynier analizuje logi." in body_text(notice)
    thread.append(notice["Message-ID"])

    # 4. A staff reply with an attachment.
    message = tmp_path / "odp.txt"
    message.write_text("Proszę wgrać poprawkę z załącznika.\n", "utf-8")
    patch = tmp_path / "poprawka.zip"
    patch.write_bytes(b"PK\x03\x04fake zip")
    await desk.cli("tickets", "reply", number, "--message-file", str(message), "--attach", str(patch))
    staff_reply = (await arrived(sink, 3))[2]
    assert "Proszę wgrać poprawkę" in body_text(staff_reply)
    assert [p.get_filename() for p in staff_reply.iter_attachments()] == ["poprawka.zip"]
    assert staff_reply["Subject"] == f"[#{number}] Awaria macierzy dyskowej"

    # 5. Resolved with the customer's consent: the notice asks for a rating.
    await desk.cli("tickets", "set-status", number, "resolved", "--note", "Poprawka wgrana.")
    resolved = (await arrived(sink, 4))[3]
    assert "Rozwiązane" in body_text(resolved) and "Ocena" in body_text(resolved)

    # 6. The customer rates by replying in the thread; the ticket closes.
    rating = make_mail(subject=f"Re: [#{number}] Awaria macierzy dyskowej",
                       body="Ocena: 5\n\nDziękuję, działa.\n\n> Prosimy o ocenę\n",
                       message_id="<rating@example.com>",
                       In_Reply_To=resolved["Message-ID"])
    row = await desk.mail(rating, mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "follow_up"
    closed = (await arrived(sink, 5))[4]
    assert "Zamknięte" in body_text(closed)
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["rating"]) == ("closed", 5)

    # 7. A late reply to crm@ does not enter the closed ticket; guidance to serwis@.
    late = make_mail(subject=f"Re: [#{number}] Awaria macierzy dyskowej",
                     body="Jeszcze jedno pytanie.\n", message_id="<late@example.com>")
    row = await desk.mail(late, mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "closed_guidance"
    # The guidance answers the sender (it is about no open ticket): no copy to anyone.
    # (the dispatcher had five copies of the thread so far: this is his sixth mail)
    await wait_for(lambda: sum(1 for _, rcpts, _ in sink.messages if rcpts == [JAN]) == 6,
                   timeout=30)
    guidance = sink.parsed()[-1]
    assert guidance["To"] == JAN and guidance["Cc"] is None
    assert INTAKE in body_text(guidance) and f"#{number}" in body_text(guidance)
    messages_before = len(ticket["messages"])
    assert len((await desk.ticket(number))["messages"]) == messages_before

    # 8. A new report with the old number goes to serwis@ and opens a linked ticket.
    again = make_mail(subject=f"Fwd: [#{number}] Awaria macierzy dyskowej", body=REPORT_BODY,
                      message_id="<again@example.com>")
    row = await desk.mail(again, mail_from=JAN)
    assert row["outcome"] == "closed_new"
    new = await desk.ticket(row["ticket"])
    assert new["linked_to"] == number and new["status"] == "accepted"
    new_ack = (await arrived(sink, 6))[5]
    assert new_ack["Subject"] == f"[#{row['ticket']}] Awaria macierzy dyskowej"

    # Every mail to the customer came from crm@, is threaded and loop-safe.
    for mail in sink.parsed():
        assert mail["From"].addresses[0].addr_spec == CRM
        assert mail["Message-ID"] and mail["In-Reply-To"] and mail["References"]
    assert [m["Auto-Submitted"] for m in await arrived(sink, 6)] == [
        "auto-replied", "auto-replied", None, "auto-replied", "auto-replied", "auto-replied"]
    # Exactly one mail per outbox row, each sent: six to the reporter, the same six to
    # the dispatcher, and the guidance to the dispatcher's own late mail.
    outbox = await desk.cli_json("outbox", "list")
    assert [o["status"] for o in outbox] == ["sent"] * 13
    assert len(sink.messages) == 13
    assert sum(1 for _, rcpts, _ in sink.messages if rcpts == [JAN]) == 7


async def test_relay_down_then_back_every_report_gets_one_ack(desk_with_relay: Desk,
                                                              smtp_sink: Sink) -> None:
    desk, sink = desk_with_relay, smtp_sink
    sink.fail_next = ["451 4.3.0 try again later"] * 3
    for i in range(3):
        body = REPORT_BODY.replace("jan@example.com", f"c{i}@example.com")
        await desk.mail(make_mail(body=body, message_id=f"<down{i}@example.com>",
                                  sender=f"c{i}@example.com"), mail_from=f"c{i}@example.com")
    await wait_for(lambda: len(sink.messages) == 3, timeout=30)
    assert sorted(m["To"] for m in sink.parsed()) == [f"c{i}@example.com" for i in range(3)]
    # The sink records a mail before its 250 reaches the mailer, which marks the row
    # only then: wait for the marks rather than race them.

    async def all_sent() -> bool:
        return [o["status"] for o in await desk.cli_json("outbox", "list")] == ["sent"] * 3

    await wait_for(all_sent, timeout=30)
