"""The engineer at a terminal (SPEC §8): notes, assignment, field corrections, search,
the waiting list, inbox/held inspection and release, contracts, safe file names.
Everything through the real CLI on a running desk, asserting what it prints and the
mail that leaves."""

from __future__ import annotations

import getpass
import json
import sqlite3
import subprocess
import sys
from datetime import datetime
from email import message_from_bytes, policy
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway import store
from gateway.names import display_filename
from tests.conftest import CRM, INTAKE, REPORT_BODY, Desk, body_text, make_mail, run_sql, wait_for

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

JAN = "jan.kowalski@example.com"
REPORTER = JAN  # the e-mail the report's body gives, in the sender's own domain
ENGINEER = "anna.nowak@s4e.pl"

NO_SERIAL = REPORT_BODY.replace(
    "5. Numer seryjny urządzenia / numer Commcell ID: SN-12345\n", "")


@pytest.fixture
def desk_options(request) -> str:
    return getattr(request, "param", "")


async def open_ticket(desk: Desk, body: str = REPORT_BODY, mid: str = "<r1@example.com>",
                      subject: str = "Awaria serwera", sender: str = JAN) -> str:
    row = await desk.mail(make_mail(subject=subject, body=body, message_id=mid,
                                    sender=f"Jan Kowalski <{sender}>"), mail_from=sender)
    assert row["outcome"] == "new", row
    return row["ticket"]


def note_file(tmp_path: Path, text: str, name: str = "note.txt") -> str:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return str(path)


def one_line_error(result: tuple[int, str, str], expected: str) -> None:
    code, _, err = result
    assert code == 1, result
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err


# --- set-status from awaiting_info, --by ------------------------------------------------

async def test_accepting_an_awaiting_info_ticket_sends_the_acknowledgement(
        desk_with_relay: Desk, smtp_sink) -> None:
    desk = desk_with_relay
    number = await open_ticket(desk, body=NO_SERIAL)
    assert (await desk.ticket(number))["missing"] == ["device_id"]
    _, out, _ = await desk.cli("tickets", "set-status", number, "accepted", "--by", ENGINEER)
    assert f"#{number}: accepted" in out

    def delivered() -> list:
        return [m for m in smtp_sink.parsed() if m["To"] == REPORTER]

    request, ack = await wait_for(lambda: len(delivered()) == 2 and delivered())
    assert "Przyjęte" not in body_text(request)
    text = body_text(ack)
    assert "przyjął Państwa zgłoszenie" in text and f"#{number}" in text
    assert ack["Subject"] == f"[#{number}] Awaria serwera"
    ticket = await desk.ticket(number)
    assert ticket["status"] == "accepted" and ticket["missing"] == []
    assert ticket["history"][-1]["actor"] == ENGINEER


async def test_who_acted_comes_from_by_then_environment_then_login(desk: Desk, tmp_path,
                                                                   monkeypatch) -> None:
    number = await open_ticket(desk)
    monkeypatch.setenv("S4E_GATEWAY_USER", "dyspozytor@s4e.pl")
    await desk.cli("tickets", "note", number, "--message-file", note_file(tmp_path, "a"),
                   "--by", ENGINEER)
    await desk.cli("tickets", "set-status", number, "in_progress")
    monkeypatch.delenv("S4E_GATEWAY_USER")
    await desk.cli("tickets", "confirm-phone", number)
    actors = [h["actor"] for h in (await desk.ticket(number))["history"]]
    assert actors == ["gateway", ENGINEER, "dyspozytor@s4e.pl", getpass.getuser()]


async def test_empty_by_is_refused(desk: Desk) -> None:
    number = await open_ticket(desk)
    one_line_error(await desk.cli("tickets", "set-status", number, "in_progress", "--by", " ",
                                  ok=False), "--by is empty")
    assert (await desk.ticket(number))["status"] == "accepted"


# --- notes, assignment, fields ---------------------------------------------------------------

async def test_internal_note_is_recorded_and_never_sent(desk: Desk, tmp_path) -> None:
    number = await open_ticket(desk)
    queued = len(desk.outbox())
    _, out, _ = await desk.cli("tickets", "note", number, "--message-file",
                               note_file(tmp_path, "Klient dzwonił: kontroler\nwymieniony.\n"),
                               "--by", ENGINEER)
    assert "internal note recorded" in out
    assert len(desk.outbox()) == queued  # nothing leaves
    note = (await desk.ticket(number))["messages"][-1]
    assert (note["kind"], note["from"], note["auth"]) == ("staff_note", ENGINEER, None)
    _, shown, _ = await desk.cli("tickets", "show", number)
    assert "staff_note" in shown and "| Klient dzwonił: kontroler" in shown
    assert "| wymieniony." in shown


async def test_assign_shows_in_ticket_and_filters_the_list(desk: Desk) -> None:
    first = await open_ticket(desk, mid="<a@example.com>")
    second = await open_ticket(desk, mid="<b@example.com>")
    _, out, _ = await desk.cli("tickets", "assign", first, "Anna.Nowak@S4E.pl", "--by", "kierownik")
    assert f"#{first}: assigned to {ENGINEER}" in out
    ticket = await desk.ticket(first)
    assert ticket["assignee"] == ENGINEER
    assert ticket["history"][-1] == {**ticket["history"][-1], "actor": "kierownik",
                                     "note": f"assigned to {ENGINEER}"}
    listed = await desk.cli_json("tickets", "list", "--assignee", ENGINEER.upper())
    assert [(t["number"], t["assignee"]) for t in listed] == [(first, ENGINEER)]
    everything = await desk.cli_json("tickets", "list")
    assert {t["number"]: t["assignee"] for t in everything} == {first: ENGINEER, second: None}


async def test_set_field_normalises_the_phone_and_records_history(desk: Desk) -> None:
    number = await open_ticket(desk)
    _, out, _ = await desk.cli("tickets", "set-field", number, "reporter_phone",
                               "tel. 601 200 300", "--by", ENGINEER)
    assert "reporter_phone = +48601200300" in out
    ticket = await desk.ticket(number)
    assert ticket["reporter_phone"] == "+48601200300"
    assert ticket["history"][-1]["note"] == "reporter_phone: '+48600100200' -> '+48601200300'"
    assert ticket["history"][-1]["actor"] == ENGINEER


async def test_set_field_completes_a_report_then_accepting_acknowledges(desk: Desk) -> None:
    number = await open_ticket(desk, body=NO_SERIAL)
    queued = len(desk.outbox())
    _, out, _ = await desk.cli("tickets", "set-field", number, "serial_number", "SN-777")
    assert "report complete" in out and f"tickets set-status {number} accepted" in out
    ticket = await desk.ticket(number)
    assert (ticket["serial_number"], ticket["missing"], ticket["status"]) == (
        "SN-777", [], "awaiting_info")
    assert len(desk.outbox()) == queued  # a correction sends nothing by itself
    listed = await desk.cli_json("tickets", "list", "--search", "SN-777")
    assert [t["number"] for t in listed] == [number]  # the index follows the change
    await desk.cli("tickets", "set-field", number, "serial_number", "")
    assert (await desk.ticket(number))["missing"] == ["device_id"]


async def test_set_field_on_a_contract_device_requires_the_phone_call(desk: Desk, tmp_path) -> None:
    contracts = tmp_path / "c.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-FAST,ACME,4\n")
    await desk.cli("contracts", "import", str(contracts))
    number = await open_ticket(desk)
    assert (await desk.ticket(number))["phone_confirmation_required"] is False
    await desk.cli("tickets", "set-field", number, "serial_number", "SN-FAST")
    assert (await desk.ticket(number))["phone_confirmation_required"] is True


# --- search and the waiting list ------------------------------------------------------------

async def test_search_finds_serials_phrases_and_message_text(desk: Desk) -> None:
    first = await open_ticket(desk, mid="<a@example.com>")
    other = REPORT_BODY.replace("SN-12345", "SN-99999").replace(
        "Serwer nie uruchamia się po aktualizacji.", "Drukarka Żółta zacina papier.")
    second = await open_ticket(desk, body=other, mid="<b@example.com>", subject="Drukarka")
    await desk.mail(make_mail(subject=f"Re: [#{first}] Awaria serwera",
                              body="Dodatkowo wentylator hałasuje.\n",
                              message_id="<f@example.com>"), mail_from=JAN, rcpts=(CRM,))

    async def found(text: str) -> list[str]:
        return [t["number"] for t in await desk.cli_json("tickets", "list", "--search", text)]

    assert await found("SN-12345") == [first]
    assert await found("sn-99999") == [second]
    assert await found("SN-123") == [first]  # a word matches as a prefix
    assert await found('"nie uruchamia"') == [first]
    assert await found('"uruchamia nie"') == []  # a phrase keeps its order
    assert await found("wentylator") == [first]  # text of a follow-up
    assert await found("halasuje") == [first]  # without diacritics, ł too
    assert await found("zolta drukarka") == [second]
    assert await found("Kowalski") == [first, second]
    assert await found("Kraków") == [first, second]
    assert await found("Przyjęte") == []  # our notices are not indexed
    listed = await desk.cli_json("tickets", "list", "--search", "Kowalski", "--status", "accepted")
    assert len(listed) == 2


@pytest.mark.parametrize("text", ['"', 'a" OR "b', "NEAR(a b)", "serwer AND", "*", "a:b",
                                  "-x", "(", "^start", "x' OR 1=1 --"])
async def test_search_text_never_breaks_the_query(desk: Desk, text: str) -> None:
    await open_ticket(desk)
    code, out, err = await desk.cli("tickets", "list", f"--search={text}", ok=False)
    if code == 1:
        one_line_error((code, out, err), "nothing to search for")
    else:
        assert code == 0 and ("no tickets" in out or "NUMBER" in out)


async def test_search_with_nothing_to_search_is_one_line(desk: Desk) -> None:
    one_line_error(await desk.cli("tickets", "list", "--search", " -- ", ok=False),
                   "nothing to search for")


async def test_waiting_lists_tickets_whose_customer_spoke_last(desk: Desk, tmp_path) -> None:
    answered = await open_ticket(desk, mid="<a@example.com>")
    fresh = await open_ticket(desk, mid="<b@example.com>")
    again = await open_ticket(desk, mid="<c@example.com>")
    message = note_file(tmp_path, "Proszę o logi.\n")
    for number in (answered, again):
        await desk.cli("tickets", "reply", number, "--message-file", message)
    await desk.cli("tickets", "note", fresh, "--message-file", message)  # answers nobody
    await desk.cli("tickets", "set-status", fresh, "in_progress")  # a notice answers nobody
    await desk.mail(make_mail(subject=f"Re: [#{again}] Awaria serwera",
                              body="Logi w załączeniu.\n", message_id="<c2@example.com>"),
                    mail_from=JAN, rcpts=(CRM,))
    waiting = await desk.cli_json("tickets", "list", "--waiting")
    assert [t["number"] for t in waiting] == [fresh, again]  # oldest wait first
    thread = (await desk.ticket(again))["messages"]
    assert waiting[1]["waiting_since"] == [m for m in thread if m["kind"] == "customer"][-1]["date"]
    await desk.cli("tickets", "assign", again, ENGINEER)
    _, out, _ = await desk.cli("tickets", "list", "--waiting")
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["NUMBER", "STATUS", "CREATED", "ASSIGNEE", "WAITING"]
    assert len(rows) == 2 and ENGINEER in rows[1] and answered not in out
    await desk.cli("tickets", "set-status", fresh, "closed")
    assert [t["number"] for t in await desk.cli_json("tickets", "list", "--waiting")] == [again]
    closed = [t for t in await desk.cli_json("tickets", "list") if t["number"] == fresh]
    assert closed[0]["waiting_since"] is None  # nobody waits on a closed ticket


@pytest.mark.sqlite_only  # builds a schema-4 SQLite file by hand
def test_search_backfills_tickets_stored_before_the_index(tmp_path) -> None:
    """A database of schema 4 with a ticket: after `migrate` the search finds it."""
    from tests.conftest import run_cli_sync, write_config

    db = sqlite3.connect(tmp_path / "gw.db")
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
               " applied_at TEXT NOT NULL)")
    for migration in store.load_migrations()[:4]:
        for statement in store.split_statements(migration.sql):
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (?, ?, 'x')",
                   (migration.version, migration.name))
    db.execute("INSERT INTO tickets (number, status, subject, reporter_email, serial_number,"
               " created_at, updated_at) VALUES (345678, 'accepted', 'Stara awaria',"
               " 'a@example.com', 'SN-OLD-1', 't', 't')")
    db.execute("INSERT INTO ticket_messages (ticket, direction, from_addr, to_addrs, subject,"
               " message_id, body, date) VALUES (345678, 'in', 'a@example.com', '[]', 's',"
               " '<m@x>', 'Macierz dyskowa zgłasza błąd', 't')")
    db.commit()
    db.close()
    config = str(write_config(tmp_path))
    migrated = run_cli_sync("migrate", "--config", config)
    assert migrated[0] == 0, migrated
    for text in ("SN-OLD-1", "macierz", "Stara"):
        code, out, err = run_cli_sync("tickets", "list", "--search", text, "--json",
                                      "--config", config)
        assert code == 0, err
        assert [t["number"] for t in json.loads(out)] == ["345678"], text


# --- readable output --------------------------------------------------------------------------

async def test_show_indents_continuation_lines_and_uses_the_time_zone(desk: Desk) -> None:
    body = REPORT_BODY.replace(
        "4. Opis problemu: Serwer nie uruchamia się po aktualizacji.",
        "4. Opis problemu: Serwer nie uruchamia się po aktualizacji.\n"
        "Po restarcie dioda miga na czerwono.")
    number = await open_ticket(desk, body=body)
    ticket = await desk.ticket(number)
    assert "\n" in ticket["description"]
    _, out, _ = await desk.cli("tickets", "show", number)
    lines = out.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("  Description:"))
    column = lines[first].index("Serwer")
    assert lines[first + 1].startswith(" " * column) and "dioda" in lines[first + 1]
    created = datetime.fromisoformat(ticket["created_at"]).astimezone(ZoneInfo("Europe/Warsaw"))
    assert f"Created:        {created:%Y-%m-%d %H:%M}  (times: Europe/Warsaw)" in out
    assert lines[0] == f"Ticket #{number}  [accepted]  Awaria serwera"
    assert any(ln.split()[:2] == ["AT", "FROM"] for ln in lines)  # history has a header


async def test_show_names_the_dispatcher_and_a_contact(desk: Desk) -> None:
    number = await open_ticket(desk)
    run_sql(desk.db, "UPDATE tickets SET dispatcher = 'dyspozytor@example.com',"  # as the
            " contact_email = 'kierownik@other.example' WHERE number = ?",  # router records
            (int(number),))  # them (SPEC §4)
    ticket = await desk.ticket(number)
    assert (ticket["dispatcher"], ticket["contact_email"]) == (
        "dyspozytor@example.com", "kierownik@other.example")
    _, out, _ = await desk.cli("tickets", "show", number)
    assert "Dispatcher:     dyspozytor@example.com (gets a copy of every mail)" in out
    assert "Contact:        kierownik@other.example (named in the report; never mailed)" in out


@pytest.mark.parametrize("desk_options", ['[tickets]\ntimezone = "Asia/Tokyo"\n'], indirect=True)
async def test_lists_have_header_rows_and_local_times(desk: Desk, tmp_path) -> None:
    number = await open_ticket(desk)
    await desk.mail(make_mail(subject="Re: [#000001]", body="x\n", message_id="<h@example.com>"),
                    mail_from="obcy@example.org", rcpts=(CRM,))
    contracts = tmp_path / "c.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-1,ACME,8\n")
    await desk.cli("contracts", "import", str(contracts))
    created = (await desk.ticket(number))["created_at"]
    tokyo = f"{datetime.fromisoformat(created).astimezone(ZoneInfo('Asia/Tokyo')):%Y-%m-%d %H:%M}"
    expected = {("tickets", "list"): ["NUMBER", "STATUS", "CREATED"],
                ("inbox", "list"): ["ID", "RECEIVED", "STATE"],
                ("held", "list"): ["ID", "STATUS", "HELD"],
                ("outbox", "list"): ["ID", "STATUS", "QUEUED"],
                ("contracts", "list"): ["DEVICE", "CUSTOMER", "REPAIR"]}
    for argv, header in expected.items():
        _, out, _ = await desk.cli(*argv)
        first, *rows = out.splitlines()
        assert first.split()[:3] == header and rows, (argv, out)
    _, out, _ = await desk.cli("tickets", "list")
    assert tokyo in out.splitlines()[1]
    # JSON keeps ISO UTC.
    assert (await desk.cli_json("tickets", "list"))[0]["created_at"] == created
    assert created.endswith("+00:00")


async def test_contracts_list(desk: Desk, tmp_path) -> None:
    _, out, _ = await desk.cli("contracts", "list")
    assert out.strip() == "no contracts"
    contracts = tmp_path / "c.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-2,Beta,48\nsn-1,ACME Sp. z o.o.,8\n")
    await desk.cli("contracts", "import", str(contracts))
    listed = await desk.cli_json("contracts", "list")
    assert [(c["device_id"], c["customer"], c["repair_hours"]) for c in listed] == [
        ("sn-1", "ACME Sp. z o.o.", 8), ("SN-2", "Beta", 48)]


# --- the inbox: why did this customer get no answer? ----------------------------------------

async def test_inbox_show_tells_what_came_and_what_was_answered(desk: Desk) -> None:
    row = await desk.mail(make_mail(subject="Re: [#000001] pytanie", body="Halo?\n",
                                    message_id="<why@example.org>", sender="obcy@example.org"),
                          mail_from="obcy@example.org", rcpts=(CRM,))
    data = await desk.cli_json("inbox", "show", str(row["id"]))
    assert (data["outcome"], data["mail_from"], data["rcpt_tos"]) == (
        "unknown_guidance", "obcy@example.org", [CRM])
    assert data["held"]["status"] == "held" and data["text"].strip() == "Halo?"
    assert {"name": "Message-ID", "value": "<why@example.org>"} in data["headers"]
    assert [(a["kind"], a["to"]) for a in data["answers"]] == [("held_notice", "obcy@example.org")]
    _, out, _ = await desk.cli("inbox", "show", str(row["id"]))
    assert "Outcome:" in out and "unknown_guidance" in out and "held_notice" in out
    assert "| Halo?" in out and "Sender verdict:" in out


async def test_inbox_raw_is_the_stored_eml_unchanged(desk: Desk) -> None:
    raw = make_mail(subject="Zażółć", body="Treść \u00e9\n", message_id="<raw@example.com>")
    row = await desk.mail(raw)
    done = subprocess.run([sys.executable, "-m", "gateway", "inbox", "show", str(row["id"]),
                           "--raw", "--config", str(desk.config_file)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (stored,), = run_sql(desk.db, "SELECT raw FROM inbound_raw WHERE id = ?", (row["id"],))
    assert done.stdout == bytes(stored)
    assert message_from_bytes(done.stdout, policy=policy.default)["Subject"] == "Zażółć"


async def test_inbox_show_without_the_raw_message_still_tells_the_story(desk: Desk) -> None:
    number = await open_ticket(desk)
    row = (await desk.inbox())[0]
    run_sql(desk.db, "DELETE FROM inbound_raw WHERE id = ?", (row["id"],))  # as keep_raw does
    data = await desk.cli_json("inbox", "show", str(row["id"]))
    assert (data["outcome"], data["ticket"]) == ("new", number)
    assert data["notes"] == ["the raw message is no longer stored"]
    assert [a["kind"] for a in data["answers"]] == ["acknowledgement"]


async def test_inbox_list_by_address(desk: Desk) -> None:
    await open_ticket(desk, mid="<a@example.com>")  # From and envelope: JAN
    other = await desk.mail(make_mail(message_id="<b@example.com>", body=REPORT_BODY,
                                      sender="Jan <Jan.Kowalski@Example.com>"),
                            mail_from="bounces+x@relay.example.net")  # From header only
    await desk.mail(make_mail(message_id="<c@example.com>", body=REPORT_BODY,
                              sender="Ewa <ewa@example.pl>"), mail_from="ewa@example.pl")
    by_jan = await desk.cli_json("inbox", "list", "--address", "JAN.KOWALSKI@example.com")
    assert [r["message_id"] for r in by_jan] == ["<a@example.com>", "<b@example.com>"]
    assert by_jan[1]["id"] == other["id"]
    to_crm = await desk.cli_json("inbox", "list", "--address", CRM)
    assert to_crm == []
    to_intake = await desk.cli_json("inbox", "list", "--address", INTAKE)
    assert len(to_intake) == 3
    one_line_error(await desk.cli("inbox", "list", "--address", "jan", ok=False),
                   "not an e-mail address")


# --- held mail --------------------------------------------------------------------------------

STRANGER = "ewa.nowicka@example.org"


async def held_report(desk: Desk, mid: str = "<held@example.com>",
                      subject: str = "Awaria [#000001]", sender: str = JAN) -> int:
    """A full report sent to crm@ by mistake (naming a number that does not exist, or
    from someone not on the ticket it names): held."""
    await desk.mail(make_mail(subject=subject, body=REPORT_BODY, message_id=mid,
                              sender=sender), mail_from=sender, rcpts=(CRM,))
    (held,) = [h for h in await desk.cli_json("held", "list") if h["subject"] == subject]
    return held["id"]


async def test_held_show_and_release_as_new_ticket(desk: Desk) -> None:
    held_id = await held_report(desk)
    shown = await desk.cli_json("held", "show", str(held_id))
    assert shown["status"] == "held" and shown["message"]["outcome"] == "unknown_guidance"
    assert "SN-12345" in shown["message"]["text"]
    _, out, _ = await desk.cli("held", "show", str(held_id))
    assert f"Held message {held_id}  [held]" in out and "Reason:" in out
    _, out, _ = await desk.cli("held", "release", str(held_id), "--new-ticket", "--by", ENGINEER)
    number = out.strip().rsplit("#", 1)[1]
    assert f"held {held_id}: released as a new ticket #{number}" in out
    ticket = await desk.ticket(number)
    assert (ticket["status"], ticket["serial_number"], ticket["subject"]) == (
        "accepted", "SN-12345", "Awaria [#000001]")
    ack = desk.mails_to(REPORTER)[-1]
    assert ack["Subject"].startswith(f"[#{number}]") and "zarejestrowane" in body_text(ack)
    assert ticket["history"][-1]["actor"] == ENGINEER
    assert ticket["history"][-1]["note"] == f"opened from held message {held_id}"
    held = await desk.cli_json("held", "show", str(held_id))
    assert (held["status"], held["decided_by"]) == ("released", ENGINEER)
    assert held["message"]["outcome"] == "new" and held["message"]["ticket"] == number
    one_line_error(await desk.cli("held", "release", str(held_id), "--new-ticket", ok=False),
                   "was already released")


async def test_release_new_ticket_never_appends_to_the_named_open_ticket(desk: Desk) -> None:
    number = await open_ticket(desk)
    held_id = await held_report(desk, subject=f"Re: [#{number}] też mam awarię", sender=STRANGER)
    before = len((await desk.ticket(number))["messages"])
    # ...sent by a stranger: held (not appended). Released as a new report:
    _, out, _ = await desk.cli("held", "release", str(held_id), "--new-ticket")
    new = out.strip().rsplit("#", 1)[1]
    assert new != number
    assert len((await desk.ticket(number))["messages"]) == before
    assert (await desk.ticket(new))["status"] == "accepted"


async def test_release_into_a_closed_ticket_is_refused(desk: Desk) -> None:
    number = await open_ticket(desk)
    held_id = await held_report(desk, subject=f"Re: [#{number}] pytanie", sender=STRANGER)
    await desk.cli("tickets", "set-status", number, "closed")
    one_line_error(await desk.cli("held", "release", str(held_id), ok=False),
                   "its ticket is closed; release it with --new-ticket")
    assert (await desk.cli_json("held", "show", str(held_id)))["status"] == "held"
    messages = (await desk.ticket(number))["messages"]
    assert all(m["message_id"] != "<held@example.com>" for m in messages)


async def test_held_drop_records_who(desk: Desk) -> None:
    held_id = await held_report(desk)
    await desk.cli("held", "drop", str(held_id), "--by", ENGINEER)
    held = await desk.cli_json("held", "show", str(held_id))
    assert (held["status"], held["decided_by"]) == ("dropped", ENGINEER)


# --- file names and the size of staff mail ----------------------------------------------------

@pytest.mark.parametrize("name, shown", [
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\jan\\raport.log", "raport.log"),
    ("faktura\u202efdp.exe", "faktura\ufffdfdp.exe"),
    ("log\x1b[2J\x07.txt", "log\ufffd[2J\ufffd.txt"),
    ("a\u2066b\u2069.log", "a\ufffdb\ufffd.log"),
    ("..", "unnamed"),
    ("", "unnamed"),
    ("zażółć.log", "zażółć.log"),
])
def test_display_filename(name: str, shown: str) -> None:
    assert display_filename(name) == shown


def test_display_filename_caps_the_length_keeping_the_extension() -> None:
    shown = display_filename("x" * 500 + ".log")
    assert len(shown) == 120 and shown.endswith("\u2026.log")


async def test_hostile_attachment_names_are_shown_safely(desk: Desk) -> None:
    msg = message_from_bytes(make_mail(body=REPORT_BODY, message_id="<n@example.com>"),
                             policy=policy.default)
    msg.add_attachment(b"MZ", maintype="application", subtype="octet-stream",
                       filename="faktura\u202efdp.exe")
    msg.add_attachment(b"log", maintype="text", subtype="plain", filename="../../etc/passwd")
    row = await desk.mail(msg.as_bytes(), mail_from=JAN)
    attachments = (await desk.ticket(row["ticket"]))["attachments"]
    assert [(a["filename"], a["original_filename"]) for a in attachments] == [
        ("faktura\ufffdfdp.exe", "faktura\u202efdp.exe"), ("passwd", "../../etc/passwd")]
    for argv in (("tickets", "show", row["ticket"]), ("inbox", "show", str(row["id"]))):
        _, out, _ = await desk.cli(*argv)
        assert "\u202e" not in out and "../" not in out and "faktura\ufffdfdp.exe" in out


async def test_reply_larger_than_the_relay_limit_is_refused(desk: Desk, tmp_path) -> None:
    import asyncio

    from tests.conftest import run_cli_sync

    number = await open_ticket(desk)
    limited = tmp_path / "limited.toml"  # the same desk, a relay path taking 200 kB
    limited.write_text(desk.config_file.read_text().replace(
        "[smtp]\n", "[smtp]\nmax_message_size = 200000\n", 1))
    message = note_file(tmp_path, "W załączeniu instrukcja.\n")
    big = tmp_path / "duzy.bin"
    big.write_bytes(b"\x00" * 160_000)  # 213 kB once base64-encoded
    queued = len(desk.outbox())
    argv = ("tickets", "reply", number, "--message-file", message, "--config", str(limited))
    one_line_error(await asyncio.to_thread(run_cli_sync, *argv, "--attach", str(big)),
                   "over the limit of 0.2 MiB ([smtp] max_message_size): nothing sent")
    assert len(desk.outbox()) == queued
    assert "reply sent" not in (await desk.ticket(number))["history"][-1]["note"]
    small = tmp_path / "maly.bin"
    small.write_bytes(b"\x00" * 100_000)
    assert (await asyncio.to_thread(run_cli_sync, *argv, "--attach", str(small)))[0] == 0
    assert len(desk.outbox()) == queued + 1


# --- every bad input: one line, exit 1 -----------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["tickets", "note", "654321", "--message-file", "{note}"], "ticket #654321 not found"),
    (["tickets", "assign", "654321", ENGINEER], "ticket #654321 not found"),
    (["tickets", "set-field", "654321", "description", "x"], "ticket #654321 not found"),
    (["tickets", "set-field", "{ticket}", "colour", "red"],
     "unknown field 'colour' (one of: reporter_name, reporter_email, reporter_phone,"),
    (["tickets", "set-field", "{ticket}", "reporter_email", "nie-adres"],
     "reporter_email: not an e-mail address"),
    (["tickets", "set-field", "{ticket}", "serial_number", "A\nB"], "serial_number: one line only"),
    (["tickets", "set-status", "{ticket}", "gotowe"], "unknown status 'gotowe'"),
    (["tickets", "list", "--status", "gotowe"], "unknown status 'gotowe'"),
    (["tickets", "assign", "{ticket}", "anna"], "not an e-mail address: 'anna'"),
    (["tickets", "assign", "{ticket}", "anna@example.com"], "is not a staff address"),
    (["tickets", "list", "--assignee", "anna"], "not an e-mail address"),
    (["tickets", "note", "{ticket}", "--message-file", "{empty}"], "the note is empty"),
    (["tickets", "note", "{ticket}", "--message-file", "{missing}"], "note file not found"),
    (["tickets", "note", "12345", "--message-file", "{note}"], "not a ticket number"),
    (["held", "show", "99"], "held message 99 not found"),
    (["held", "release", "99"], "held message 99 not found"),
    (["held", "release", "99", "--new-ticket"], "held message 99 not found"),
    (["held", "drop", "99"], "held message 99 not found"),
    (["inbox", "show", "99"], "inbound message 99 not found"),
    (["inbox", "show", "99", "--raw"], "inbound message 99 not found"),
])
async def test_bad_input_is_one_line(desk: Desk, tmp_path, argv: list[str], expected: str) -> None:
    ticket = await open_ticket(desk) if "{ticket}" in argv else ""
    values = {"{ticket}": ticket, "{note}": note_file(tmp_path, "tekst"),
              "{empty}": note_file(tmp_path, " \n\n", "empty.txt"),
              "{missing}": str(tmp_path / "nie-ma.txt")}
    before = desk.outbox()
    one_line_error(await desk.cli(*[values.get(a, a) for a in argv], ok=False), expected)
    assert len(desk.outbox()) == len(before)
    if ticket:
        history = (await desk.ticket(ticket))["history"]
        assert [h["actor"] for h in history] == ["gateway"]  # nothing applied


# --- the real-world corpus --------------------------------------------------------------------

CORPUS_FILES = sorted(Path(__file__).parent.joinpath("data").rglob("*.eml"))


def test_inbox_show_reads_the_headers_of_every_corpus_mail() -> None:
    """`inbox show` must work for whatever was stored: the corpus of odd real mail."""
    from gateway.parser import parse_report
    from gateway.staff import header_lines
    from tests.test_parser_corpus import CORPUS_FILES as SHARED

    files = [*SHARED, *CORPUS_FILES]
    assert files
    for path in files:
        raw = path.read_bytes()
        for name, value in header_lines(raw):
            assert "\n" not in value and "\r" not in value, (path, name)
        for attachment in parse_report(raw).attachments:
            shown = display_filename(attachment.filename)
            assert shown and "/" not in shown and "\\" not in shown, (path, shown)
            assert not any(ord(c) < 32 or 0x202a <= ord(c) <= 0x202e for c in shown), path


def test_broken_headers_are_shown_not_fatal() -> None:
    from gateway.staff import header_lines

    raw = (b"From: \"unclosed <a@b\r\nSubject: =?x-unknown?q?abc?= =?utf-8?b?!!!?=\r\n"
           b"To: ,,,@@@\r\nMessage-ID: <a@b>\r\nX-Other: hidden\r\n\r\nbody\r\n")
    names = [name for name, _ in header_lines(raw)]
    assert names == ["From", "Subject", "To", "Message-ID"]
