"""Working a ticket from the CLI: statuses, replies, ratings, contracts, phone calls."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from gateway import staff, store
from gateway.context import make_context
from tests.conftest import CRM, Desk, INTAKE, REPORT_BODY, body_text, make_mail, run_sql

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

JAN = "jan.kowalski@example.com"
REPORTER = "jan.kowalski@example.com"  # the e-mail the report's body gives


async def open_ticket(desk: Desk, body: str = REPORT_BODY, mid: str = "<r1@example.com>") -> str:
    row = await desk.mail(make_mail(body=body, message_id=mid), mail_from=JAN)
    assert row["outcome"] == "new"
    return row["ticket"]


async def test_status_changes_follow_the_procedure_and_notify_the_reporter(desk: Desk) -> None:
    number = await open_ticket(desk)
    await desk.cli("tickets", "set-status", number, "in_progress", "--note", "Diagnoza w toku.")
    await desk.cli("tickets", "set-status", number, "resolved")
    ticket = await desk.ticket(number)
    assert ticket["status"] == "resolved"
    assert [(h["from"], h["to"]) for h in ticket["history"]] == [
        (None, "accepted"), ("accepted", "in_progress"), ("in_progress", "resolved")]
    ack, *notices = desk.mails_to(REPORTER)
    in_progress, resolved = (body_text(m) for m in notices)
    assert "W realizacji" in in_progress and "Diagnoza w toku." in in_progress
    assert "Rozwiązane" in resolved and "Ocena" in resolved
    for m in notices:
        assert m["Subject"] == f"[#{number}] Awaria serwera"
        assert m["In-Reply-To"] and m["References"]


@pytest.mark.parametrize("path, target", [
    ([], "resolved"), ([], "awaiting_info"), (["in_progress"], "accepted"),
    (["closed"], "in_progress"), (["closed"], "closed"), ([], "done")])
async def test_illegal_transitions_are_one_line_errors(desk: Desk, path, target) -> None:
    number = await open_ticket(desk)
    for status in path:
        await desk.cli("tickets", "set-status", number, status)
    code, _, err = await desk.cli("tickets", "set-status", number, target, ok=False)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot go from" in err or "unknown status" in err


async def test_resolved_can_go_back_to_in_progress(desk: Desk) -> None:
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved", "in_progress"):
        await desk.cli("tickets", "set-status", number, status)
    assert (await desk.ticket(number))["status"] == "in_progress"


async def test_unknown_ticket_is_one_line(desk: Desk) -> None:
    code, _, err = await desk.cli("tickets", "show", "654321", ok=False)
    assert code == 1 and "ticket #654321 not found" in err


async def test_staff_reply_goes_in_the_thread_with_attachment(desk: Desk, tmp_path) -> None:
    number = await open_ticket(desk)
    message = tmp_path / "msg.txt"
    message.write_text("Proszę zrestartować kontroler i przesłać nowe logi.\n", "utf-8")
    attachment = tmp_path / "instrukcja.pdf"
    attachment.write_bytes(b"%PDF-1.4 test\x00\xff")
    await desk.cli("tickets", "reply", number, "--message-file", str(message),
                   "--attach", str(attachment))
    reply = desk.mails_to(REPORTER)[-1]
    assert reply["Subject"] == f"[#{number}] Awaria serwera"
    assert reply["Auto-Submitted"] is None  # a person wrote it
    assert "zrestartować kontroler" in body_text(reply)
    (part,) = list(reply.iter_attachments())
    assert part.get_filename() == "instrukcja.pdf" and part.get_content() == attachment.read_bytes()
    assert (await desk.ticket(number))["messages"][-1]["direction"] == "out"


async def test_reply_errors(desk: Desk, tmp_path) -> None:
    number = await open_ticket(desk)
    code, _, err = await desk.cli("tickets", "reply", number, "--message-file",
                                  str(tmp_path / "none.txt"), ok=False)
    assert code == 1 and "message file not found" in err
    message = tmp_path / "m.txt"
    message.write_text("x")
    code, _, err = await desk.cli("tickets", "reply", number, "--message-file", str(message),
                                  "--attach", str(tmp_path / "nope.log"), ok=False)
    assert code == 1 and "attachment not found" in err


@pytest.mark.parametrize("text, rating", [
    ("Ocena: 4\n\nDziękuję.", 4), ("Rating: 5", 5), ("Wszystko działa, ocena 3/5.", 3),
    ("5\n\nDziękujemy za pomoc.", 5), ("ocena 2", 2)])
async def test_rating_reply_closes_resolved_ticket(desk: Desk, text: str, rating: int) -> None:
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    row = await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria serwera", body=text + "\n",
                                    message_id="<rate@example.com>"), mail_from=JAN, rcpts=(CRM,))
    assert row["outcome"] == "follow_up"
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["rating"], ticket["closed_reason"]) == ("closed", rating, "rating")
    closing = desk.mails_to(REPORTER)[-1]
    assert "Zamknięte" in body_text(closing) and INTAKE in body_text(closing)
    assert closing["In-Reply-To"] == "<rate@example.com>"


async def test_rating_in_quoted_text_is_ignored(desk: Desk) -> None:
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    body = ("Niestety problem wrócił.\n\n> Prosimy o ocenę, np. Ocena: 5\n> Ocena: 5\n")
    await desk.mail(make_mail(subject=f"Re: [#{number}]", body=body, message_id="<q@example.com>"),
                    mail_from=JAN, rcpts=(CRM,))
    ticket = await desk.ticket(number)
    assert ticket["status"] == "resolved" and ticket["rating"] is None


@pytest.mark.parametrize("text", ["Dziękuję, działa.", "Ocena: 4,5", "6"])
async def test_reply_without_rating_asks_once_and_the_window_keeps_running(
        desk: Desk, text: str) -> None:
    """SPEC §4: stays resolved, goes to staff, one short request for a rating 1-5; the
    rating window keeps running and closes the ticket at its end."""
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    for mid in ("<t1@example.com>", "<t2@example.com>"):
        row = await desk.mail(make_mail(subject=f"Re: [#{number}]", body=text + "\n",
                                        message_id=mid), mail_from=JAN, rcpts=(CRM,))
        assert row["outcome"] == "follow_up"
    requests = [m for m in desk.mails_to(REPORTER) if "jedną liczbą całkowitą" in body_text(m)]
    assert len(requests) == 1 and requests[0]["In-Reply-To"] == "<t1@example.com>"
    assert (await desk.ticket(number))["status"] == "resolved"
    conn = await store.connect(desk.db)
    try:
        ctx = await make_context(conn, desk.gw.config)
        later = dataclasses.replace(ctx, clock=lambda: store.utcnow() + timedelta(days=15))
        assert await staff.close_expired_ratings(conn, later) == [int(number)]
    finally:
        await conn.close()
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["rating"]) == ("closed", None)
    assert "no rating within 14d" in ticket["history"][-1]["note"]


async def test_staff_notices_do_not_eat_the_automatic_answer_cap(desk_with_cap: Desk) -> None:
    desk = desk_with_cap
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved", "in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    second = await open_ticket(desk, mid="<second@example.com>")
    assert len(desk.mails_to(REPORTER)) >= 6  # two acknowledgements and four notices
    assert any(f"[#{second}]" in m["Subject"] for m in desk.mails_to(REPORTER))


async def test_rating_window_closes_unrated_tickets(desk: Desk) -> None:
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    conn = await store.connect(desk.db)
    try:
        ctx = await make_context(conn, desk.gw.config)
        assert await staff.close_expired_ratings(conn, ctx) == []
        later = dataclasses.replace(ctx, clock=lambda: store.utcnow() + timedelta(days=15))
        assert await staff.close_expired_ratings(conn, later) == [int(number)]
    finally:
        await conn.close()
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["closed_reason"], ticket["rating"]) == (
        "closed", "rating_window", None)
    assert ticket["history"][-1]["actor"] == "rating_window"


@pytest.fixture
def desk_options(request) -> str:
    return getattr(request, "param", "")


@pytest.fixture
async def desk_with_cap(tmp_path):
    from tests.conftest import running_desk

    async with running_desk(tmp_path, "[tickets]\nmax_auto_replies_per_hour = 2\n") as desk:
        yield desk


@pytest.mark.parametrize("desk_options", ['[tickets]\nrating_window = "0"\n'], indirect=True)
async def test_rating_window_zero_never_closes(desk: Desk) -> None:
    number = await open_ticket(desk)
    for status in ("in_progress", "resolved"):
        await desk.cli("tickets", "set-status", number, status)
    conn = await store.connect(desk.db)
    ctx = await make_context(conn, desk.gw.config)
    later = dataclasses.replace(ctx, clock=lambda: store.utcnow() + timedelta(days=400))
    assert await staff.close_expired_ratings(conn, later) == []
    await conn.close()


# --- contracts and the phone call ------------------------------------------------------

@pytest.mark.parametrize("text, error", [
    ("", "empty file"),
    ("serial,customer,hours\nSN-1,ACME,8\n", ":1: expected the header device_id,customer,repair_hours"),
    ("device_id,customer,repair_hours\nSN-1,ACME,8\nSN-2,ACME\n", ":3: expected 3 columns"),
    ("device_id,customer,repair_hours\nSN-1,ACME,osiem\n", ":2: repair_hours must be a whole number"),
    ("device_id,customer,repair_hours\n,ACME,8\n", ":2: device_id is empty"),
    ("device_id,customer,repair_hours\nSN-1,A,8\nsn-1,B,4\n", ":3: device_id 'sn-1' appears twice"),
])
async def test_contract_import_errors_name_the_line_and_import_nothing(desk: Desk, tmp_path,
                                                                       text, error) -> None:
    good = tmp_path / "good.csv"
    good.write_text("device_id,customer,repair_hours\nSN-OLD,Old,48\n")
    await desk.cli("contracts", "import", str(good))
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    code, _, err = await desk.cli("contracts", "import", str(bad), ok=False)
    assert code == 1 and error in err and err.count("\n") == 1
    conn = await store.connect(desk.db)
    assert await store.contract_hours(conn, ["SN-OLD"]) == 48  # nothing changed
    await conn.close()


async def test_contract_under_24h_requires_phone_confirmation(desk: Desk, tmp_path) -> None:
    contracts = tmp_path / "contracts.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-12345,ACME Sp. z o.o.,8\n"
                         "SN-2,Other,48\n", "utf-8")
    code, out, _ = await desk.cli("contracts", "import", str(contracts))
    assert "imported 2 contracts (1 with repair time under 24 h)" in out
    number = await open_ticket(desk)
    ticket = await desk.ticket(number)
    assert ticket["phone_confirmation_required"] is True and ticket["phone_confirmed"] is False
    ack = body_text(desk.mails_to(REPORTER)[0])
    assert "(0-12) 444-65-00" in ack and "801 090 101" in ack and "telefoniczne potwierdzenie" in ack
    await desk.cli("tickets", "confirm-phone", number)
    ticket = await desk.ticket(number)
    assert ticket["phone_confirmed"] is True
    assert ticket["history"][-1]["note"] == "phone confirmation recorded"
    code, _, err = await desk.cli("tickets", "confirm-phone", number, ok=False)
    assert code == 1 and "already recorded" in err


async def test_report_without_contract_needs_no_call(desk: Desk) -> None:
    number = await open_ticket(desk)
    assert (await desk.ticket(number))["phone_confirmation_required"] is False
    assert "444-65-00" not in body_text(desk.mails_to(REPORTER)[0])


@pytest.mark.parametrize("desk_options", ['[addresses]\nnotify = ["dyspozytor@s4e.pl"]\n'],
                         indirect=True)
async def test_staff_get_a_copy_of_new_tickets_urgent_when_phone_needed(desk: Desk, tmp_path) -> None:
    contracts = tmp_path / "c.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-12345,ACME,4\n")
    await desk.cli("contracts", "import", str(contracts))
    number = await open_ticket(desk)
    (copy,) = desk.mails_to("dyspozytor@s4e.pl")
    text = body_text(copy)
    assert f"#{number}" in copy["Subject"] and "nie uruchamia" in text  # staff see everything
    assert copy["Importance"] == "high"
    assert copy["In-Reply-To"] is None  # not a reply to the customer
    assert len(desk.mails_to(REPORTER)) == 1


async def test_tickets_list_filters_and_show_is_readable(desk: Desk) -> None:
    first = await open_ticket(desk, mid="<a@example.com>")
    second = await open_ticket(desk, mid="<b@example.com>")
    await desk.cli("tickets", "set-status", second, "in_progress")
    listed = await desk.cli_json("tickets", "list", "--status", "in_progress")
    assert [t["number"] for t in listed] == [second]
    assert set(listed[0]) == {"number", "status", "subject", "reporter_email", "created_at",
                              "assignee", "waiting_since"}
    _, out, _ = await desk.cli("tickets", "show", first)
    assert f"Ticket #{first}" in out and "Jan Kowalski" in out and "Thread:" in out
    code, _, err = await desk.cli("tickets", "list", "--status", "open", ok=False)
    assert code == 1 and "unknown status" in err


async def test_ticket_json_has_the_spec_fields(desk: Desk) -> None:
    raw = make_mail(body=REPORT_BODY, message_id="<att@example.com>")
    from email import message_from_bytes, policy
    msg = message_from_bytes(raw, policy=policy.default)
    msg.add_attachment(b"ERROR disk failure\n", maintype="text", subtype="plain",
                       filename="controller.log")
    msg.add_attachment(b"\x89PNG....", maintype="image", subtype="png", filename="ekran.png")
    row = await desk.mail(msg.as_bytes(), mail_from=JAN)
    ticket = await desk.ticket(row["ticket"])
    for key in ("number", "status", "subject", "reporter_name", "reporter_email", "reporter_phone",
                "install_address", "description", "serial_number", "commcell_id", "missing",
                "phone_confirmation_required", "phone_confirmed", "rating", "created_at",
                "updated_at", "attachments", "messages"):
        assert key in ticket, key
    import hashlib
    assert ticket["attachments"] == [
        {"filename": "controller.log", "content_type": "text/plain", "size": 19,
         "sha256": hashlib.sha256(b"ERROR disk failure\n").hexdigest(), "is_log": True,
         "original_filename": "controller.log"},
        {"filename": "ekran.png", "content_type": "image/png", "size": 8,
         "sha256": hashlib.sha256(b"\x89PNG....").hexdigest(), "is_log": False,
         "original_filename": "ekran.png"}]
    message = ticket["messages"][0]
    assert set(message) == {"direction", "from", "to", "subject", "message_id", "date",
                            "kind", "auth", "author"}
    assert (message["kind"], message["auth"]) == ("customer", "none")
    assert ticket["messages"][1]["kind"] == "notice" and ticket["messages"][1]["auth"] is None
    assert message["message_id"] == "<att@example.com>" and message["direction"] == "in"
    assert ticket["assignee"] is None
    # The bytes are kept under a generated name, retrievable by hash: files for SQLite,
    # rows every node reads for PostgreSQL.
    if desk.gw.config.storage.postgres:
        stored = [bytes(data) for (data,) in run_sql(desk.db, "SELECT data FROM attachment_blobs")]
        assert sorted(stored) == sorted([b"ERROR disk failure\n", b"\x89PNG...."])
        return
    att_dir = desk.gw.config.storage.attachments
    files = [p for p in att_dir.rglob("*") if p.is_file()]
    assert sorted(p.read_bytes() for p in files) == sorted([b"ERROR disk failure\n", b"\x89PNG...."])
    assert not any("controller" in p.name for p in files)
