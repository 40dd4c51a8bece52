"""Lists that scale (#17): every list pages by a keyset cursor, the CLI's tables show
50 rows and say how to get the next page, JSON streams every row, the web desk pages
the same way, and a walk over a whole list never holds one long read (the WAL can be
checkpointed between its pages)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import smtplib
import sqlite3
from contextlib import redirect_stdout
from pathlib import Path

import aiosqlite
import pytest

from gateway import cli, store
from gateway.model import OutboxStatus
from tests.conftest import CRM, INTAKE, Desk, make_mail
from tests.webdesk import STRANGER, Web, add_user, open_ticket, running_web, signed_in

STAMP = "2026-11-{day:02d}T{hour:02d}:{minute:02d}:00+00:00"


def stamp(i: int) -> str:
    """Distinct, increasing ISO times (one a minute from 1 November)."""
    return STAMP.format(day=1 + i // 1440, hour=i // 60 % 24, minute=i % 60)


def insert_inbound(db: sqlite3.Connection, count: int, *, outcome_every: int = 3) -> list[int]:
    """`count` received messages as intake stores them; every `outcome_every`th one
    routed as a new ticket, the others still queued."""
    ids = []
    for i in range(count):
        routed = i % outcome_every == 0
        cur = db.execute(
            "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from, rcpt_tos,"
            " received_at, state, outcome) VALUES (?, ?, ?, 1234, '127.0.0.1', ?, ?, ?, ?, ?)",
            (f"<m{i}@example.com>", f"k{i}", "0" * 64, f"jan{i}@example.com",
             json.dumps([INTAKE]), stamp(i), "done" if routed else "queued",
             "new" if routed else None))
        ids.append(cur.lastrowid)
    db.commit()
    return ids


def insert_tickets(db: sqlite3.Connection, count: int, *, same_time: int = 0,
                   phone_pending: bool = False, first: int = 100_000) -> list[int]:
    """`count` tickets opened a minute apart (the first `same_time` of them in the
    same second), numbers not in creation order."""
    numbers = []
    for i in range(count):
        number = first + (i * 245_489) % 900_000  # a permutation, not in creation order
        db.execute(
            "INSERT INTO tickets (number, status, subject, reporter_email, created_at, updated_at,"
            " phone_confirmation_required) VALUES (?, 'accepted', ?, ?, ?, ?, ?)",
            (number, f"Awaria {i}", f"jan{i}@example.com", stamp(0 if i < same_time else i),
             stamp(i), int(phone_pending)))
        numbers.append(number)
    db.commit()
    return numbers


# --- the store: keyset pages and walks --------------------------------------------------

async def test_walk_reads_every_row_once_across_pages(conn: aiosqlite.Connection,
                                                      tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "gw.db") as db:
        ids = insert_inbound(db, 2 * store.PAGE_ROWS + 234)
    walked = [r.id async for r in store.iter_inbound(conn)]
    assert walked == ids  # three pages, oldest first, none twice
    routed = [r.id async for r in store.iter_inbound(conn, outcome="new")]
    assert routed == ids[::3]
    assert [r.id async for r in store.iter_inbound(conn, after=ids[600], limit=10)] == ids[601:611]
    assert [r.id async for r in store.iter_inbound(conn, outcome="new", after=ids[600],
                                                   limit=3)] == ids[603:612:3]
    assert [r.id async for r in store.iter_inbound(conn, after=ids[-1])] == []
    page = await store.list_inbound(conn, after=ids[9], limit=5, address="JAN11@example.com")
    assert [r.id for r in page] == [ids[11]]


async def test_ticket_pages_keep_the_order_when_tickets_share_a_second(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "gw.db") as db:
        insert_tickets(db, 40, same_time=10)
    whole = [t.ticket.number for t in await store.find_tickets(conn)]
    assert len(whole) == 40 and whole[:10] == sorted(whole[:10])  # the tie: by number

    async def fetch(after: store.TicketCursor | None, size: int) -> list[store.ListedTicket]:
        return await store.find_tickets(conn, after=after, limit=size)

    paged = [t.ticket.number async for t in store.walk(fetch, lambda t: t.cursor(False),
                                                       page_rows=3)]
    assert paged == whole
    after = await store.ticket_cursor(conn, whole[4])
    assert [t.ticket.number for t in await store.find_tickets(conn, after=after, limit=8)] \
        == whole[5:13]
    assert [t.number for t in await store.list_tickets(conn, after=after, limit=8)] \
        == whole[5:13]


async def test_a_walk_lets_the_wal_be_checkpointed_between_its_pages(
        conn: aiosqlite.Connection, tmp_path: Path) -> None:
    """What the issue measured (the WAL grew 14 -> 58 MB beside `inbox list`): a
    reader that holds its read open stops the checkpoint; a walk holds none between
    pages."""
    path = tmp_path / "gw.db"
    with sqlite3.connect(path) as db:
        ids = insert_inbound(db, 300)
    writer = sqlite3.connect(path, timeout=0, isolation_level=None)

    def write_and_checkpoint(i: int) -> int:
        insert_inbound_one(writer, i)
        busy, _, _ = writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy

    async def fetch(after: int | None, size: int) -> list[store.InboundRow]:
        return await store.list_inbound(conn, after=after, limit=size)

    walk = store.walk(fetch, lambda r: r.id, page_rows=100)
    seen = [(await anext(walk)).id]
    assert write_and_checkpoint(1000) == 0  # between pages: nothing pins the WAL
    assert (path.parent / "gw.db-wal").stat().st_size == 0
    seen += [r.id async for r in walk]
    assert seen[:300] == ids and len(seen) == 301  # the row written meanwhile: after the cursor

    # the contrast: one SELECT read while the writer goes on
    reader = sqlite3.connect(path)
    rows = reader.execute("SELECT id FROM inbound ORDER BY id")
    rows.fetchone()
    try:
        assert write_and_checkpoint(1001) == 1  # the open read keeps its snapshot
    finally:
        rows.close()
        reader.close()
        writer.close()


def insert_inbound_one(db: sqlite3.Connection, i: int) -> None:
    db.execute(
        "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from, rcpt_tos,"
        " received_at) VALUES (?, ?, ?, 1, '127.0.0.1', 'a@example.com', '[]', ?)",
        (f"<w{i}@example.com>", f"w{i}", "0" * 64, stamp(i)))


@pytest.mark.parametrize("rows", [[], [{"id": 1}], [
    {"id": 1, "subject": "Zażółć gęślą jaźń", "rcpt_tos": ["a@b.pl", "c@d.pl"],
     "ticket": None, "nested": {"text": "line\nbreak \"quoted\"\u2028"}},
    {"id": 2, "rcpt_tos": [], "size": 12.5}, {"id": 3}]])
def test_streamed_json_is_a_json_list_one_object_a_line(rows: list[dict]) -> None:
    async def source():
        for row in rows:
            yield row

    out = io.StringIO()
    with redirect_stdout(out):
        asyncio.run(cli.stream_json(source()))
    text = out.getvalue()
    assert json.loads(text) == rows
    lines = text.rstrip("\n").split("\n")  # not splitlines(): U+2028 is in a value
    assert (lines[0], lines[-1]) == (("[]", "[]") if not rows else ("[", "]"))
    assert [json.loads(ln.strip().rstrip(",")) for ln in lines[1:-1]] == rows
    assert "gęślą" in text or not rows[1:]  # UTF-8 as it is, not \u escapes


# --- the CLI ------------------------------------------------------------------------------

def send_many(port: int, count: int) -> None:
    """`count` automatic mails in one SMTP session (stored, answered by nobody)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for i in range(count):
            client.sendmail("robot@example.com", [INTAKE], make_mail(
                subject=f"Raport {i}", sender="robot@example.com",
                message_id=f"<auto{i}@example.com>", auto_submitted="auto-generated"))


def table_ids(out: str) -> list[int]:
    lines = out.splitlines()
    return [int(line.split()[0]) for line in lines[1:] if line and line[0].isdigit()]


async def test_inbox_list_shows_fifty_and_the_way_to_the_next_page(desk: Desk) -> None:
    await asyncio.to_thread(send_many, desk.gw.port, 53)
    everything = [r["id"] for r in await desk.cli_json("inbox", "list")]
    assert len(everything) == 53  # --json: every row, as before

    _, out, err = await desk.cli("inbox", "list")
    assert table_ids(out) == everything[:50] and err == ""
    assert out.splitlines()[-1] == f"next: --after {everything[49]}"
    _, out, _ = await desk.cli("inbox", "list", "--after", str(everything[49]))
    assert table_ids(out) == everything[50:] and "next:" not in out
    _, out, _ = await desk.cli("inbox", "list", "--limit", "2", "--after", str(everything[48]))
    assert table_ids(out) == everything[49:51]
    assert out.splitlines()[-1] == f"next: --limit 2 --after {everything[50]}"
    _, out, _ = await desk.cli("inbox", "list", "--limit", "3", "--after", str(everything[49]))
    assert table_ids(out) == everything[50:] and "next:" not in out  # exactly the rest
    _, out, _ = await desk.cli("inbox", "list", "--after", str(everything[-1]))
    assert out == "no messages\n"

    page = await desk.cli_json("inbox", "list", "--limit", "5", "--after", str(everything[9]))
    assert [r["id"] for r in page] == everything[10:15]
    assert set(page[0]) == {"id", "message_id", "mail_from", "rcpt_tos", "received_at",
                            "size", "outcome", "ticket"}
    rest = await desk.cli_json("inbox", "list", "--after", str(everything[40]))
    assert [r["id"] for r in rest] == everything[41:]
    mine = await desk.cli_json("inbox", "list", "--address", "robot@example.com",
                               "--limit", "2", "--after", str(everything[0]))
    assert [r["id"] for r in mine] == everything[1:3]


async def test_tickets_held_and_outbox_lists_page(desk: Desk, tmp_path: Path) -> None:
    numbers = [await open_ticket(desk, mid=f"<r{i}@example.com>") for i in range(3)]
    _, out, _ = await desk.cli("tickets", "list", "--limit", "2")
    assert [ln.split()[0] for ln in out.splitlines()[1:3]] == [f"#{n}" for n in numbers[:2]]
    assert out.splitlines()[-1] == f"next: --limit 2 --after {numbers[1]}"
    page = await desk.cli_json("tickets", "list", "--after", numbers[1])
    assert [t["number"] for t in page] == numbers[2:]
    page = await desk.cli_json("tickets", "list", "--after", f"#{numbers[0]}", "--limit", "1")
    assert [t["number"] for t in page] == numbers[1:2]

    found = await desk.cli_json("tickets", "list", "--search", "SN-12345", "--limit", "2")
    assert [t["number"] for t in found] == numbers[:2]
    found = await desk.cli_json("tickets", "list", "--search", "SN-12345", "--after", numbers[1])
    assert [t["number"] for t in found] == numbers[2:]

    # --waiting: by how long the customer waits, paged on that
    _, out, _ = await desk.cli("tickets", "list", "--waiting", "--limit", "1")
    assert out.splitlines()[1].split()[0] == f"#{numbers[0]}"
    assert out.splitlines()[-1] == f"next: --limit 1 --after {numbers[0]}"
    page = await desk.cli_json("tickets", "list", "--waiting", "--after", numbers[0])
    assert [t["number"] for t in page] == numbers[1:]
    reply = tmp_path / "reply.txt"
    reply.write_text("Już sprawdzamy.\n", "utf-8")
    await desk.cli("tickets", "reply", numbers[1], "--message-file", str(reply),
                   "--by", "anna.nowak@s4e.pl")
    code, out, err = await desk.cli("tickets", "list", "--waiting", "--after", numbers[1],
                                    ok=False)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"#{numbers[1]}" in err and "no longer waits" in err

    # outbox: the three acknowledgements and the reply (ids: the mailer changes statuses)
    _, out, _ = await desk.cli("outbox", "list", "--limit", "3")
    mails = [m["id"] for m in await desk.cli_json("outbox", "list")]
    assert table_ids(out) == mails[:3] and len(mails) >= 4
    assert out.splitlines()[-1] == f"next: --limit 3 --after {mails[2]}"
    rest = await desk.cli_json("outbox", "list", "--after", str(mails[2]))
    assert [m["id"] for m in rest] == mails[3:]

    # held: a stranger's follow-ups
    for i in range(3):
        await desk.mail(make_mail(subject=f"Re: [#{numbers[0]}]", sender=STRANGER, body="x\n",
                                  message_id=f"<h{i}@example.com>"),
                        mail_from=STRANGER, rcpts=(CRM,))
    held = await desk.cli_json("held", "list")
    _, out, _ = await desk.cli("held", "list", "--limit", "2")
    assert table_ids(out) == [h["id"] for h in held[:2]]
    assert out.splitlines()[-1] == f"next: --limit 2 --after {held[1]['id']}"
    assert await desk.cli_json("held", "list", "--after", str(held[1]["id"])) == held[2:]


async def test_bad_paging_values_get_one_line_and_exit_1(desk: Desk) -> None:
    number = await open_ticket(desk)
    absent = "100001" if number != "100001" else "100002"
    cases = [
        (("inbox", "list", "--limit", "0"), "--limit: must be 1 or more"),
        (("inbox", "list", "--limit", "abc"), "--limit: not a whole number: 'abc'"),
        (("inbox", "list", "--limit", "-5"), "--limit: must be 1 or more"),
        (("inbox", "list", "--after", "-1"), "--after: must be 0 or more"),
        (("inbox", "list", "--after", "x", "--json"), "--after: not a row id: 'x'"),
        (("held", "list", "--limit", "0"), "--limit: must be 1 or more"),
        (("held", "list", "--after", "-1"), "--after: must be 0 or more"),
        (("outbox", "list", "--limit", "2.5"), "--limit: not a whole number"),
        (("outbox", "list", "--after", "-1"), "--after: must be 0 or more"),
        (("tickets", "list", "--limit", "0"), "--limit: must be 1 or more"),
        (("tickets", "list", "--after", "-1"), "not a ticket number: '-1'"),
        (("tickets", "list", "--after", "12", "--json"), "not a ticket number: '12'"),
        (("tickets", "list", "--after", absent), f"ticket #{absent} not found"),
    ]
    for argv, expected in cases:
        code, out, err = await desk.cli(*argv, ok=False)
        assert (code, out) == (1, ""), argv
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, (argv, err)


# --- the web desk -------------------------------------------------------------------------

@pytest.fixture
async def web(desk: Desk, tmp_path: Path):
    await add_user(desk, tmp_path)
    async with running_web(desk) as running:
        yield running


def ticket_links(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'<a href="/tickets/(\d{6})">', html)]


async def test_web_ticket_lists_page_by_fifty(web: Web) -> None:
    with sqlite3.connect(web.desk.db) as db:
        numbers = insert_tickets(db, 53, phone_pending=True)
    async with signed_in(web) as client:
        page = (await client.get("/tickets")).text
        assert ticket_links(page) == numbers[:50]
        assert "50 zgłoszeń na tej stronie" in page
        assert f'href="/tickets?after={numbers[49]}" rel="next"' in page
        assert "Pierwsza strona" not in page
        page = (await client.get("/tickets", params={"after": f"{numbers[49]}"})).text
        assert ticket_links(page) == numbers[50:] and 'rel="next"' not in page
        assert '<a href="/tickets">Pierwsza strona</a>' in page
        page = (await client.get("/tickets", params={"status": "accepted"})).text
        assert f'href="/tickets?status=accepted&amp;after={numbers[49]}"' in page
        bad = await client.get("/tickets", params={"after": "12"})
        assert bad.status_code == 400 and "not a ticket number" in bad.text

        # the attention list: phone calls to confirm, oldest first, 50 a page
        page = (await client.get("/")).text
        assert ticket_links(page) == numbers[:50]
        since = stamp(49).replace(":", "%3A").replace("+", "%2B")
        assert f'href="/?since={since}&amp;after={numbers[49]}" rel="next"' in page
        page = (await client.get("/", params={"since": stamp(49),
                                              "after": f"{numbers[49]}"})).text
        assert ticket_links(page) == numbers[50:] and 'rel="next"' not in page


async def test_web_held_list_pages(web: Web) -> None:
    number = await open_ticket(web.desk)
    with sqlite3.connect(web.desk.db) as db:
        inbound = insert_inbound(db, 52)
        for i, inbound_id in enumerate(inbound):
            db.execute("INSERT INTO held (inbound_id, ticket, sender, subject, reason, created_at)"
                       " VALUES (?, ?, ?, ?, 'not a participant', ?)",
                       (inbound_id, int(number), STRANGER, f"Re: [#{number}] {i}", stamp(i)))
        held = [r[0] for r in db.execute("SELECT id FROM held ORDER BY id")]
    async with signed_in(web) as client:
        page = (await client.get("/held")).text
        assert page.count('<tr><td><a href="/held/') == 50
        assert f'href="/held?after={held[49]}" rel="next"' in page
        page = (await client.get("/held", params={"after": str(held[49])})).text
        assert [f'<a href="/held/{h}">' in page for h in held[48:]] == [False, False, True, True]
        assert (await client.get("/held", params={"after": "-1"})).status_code == 400


async def test_web_outbox_pages_undelivered_mail(web: Web) -> None:
    with sqlite3.connect(web.desk.db) as db:
        for i in range(60):
            db.execute(
                "INSERT INTO outbox (kind, message_id, mail_from, rcpt_to, subject, auto, status,"
                " attempts, next_attempt_at, last_error, queued_at, created_at) VALUES"
                " ('acknowledgement', ?, 'serwis@s4e.pl', ?, 'Potwierdzenie', 1, ?, 5, ?,"
                " '550 5.1.1 no such user', ?, ?)",
                (f"<o{i}@s4e.pl>", f"jan{i}@example.com", "sent" if i % 10 == 0 else
                 "bounced" if i % 2 else "failed", stamp(i), stamp(i), stamp(i)))
        undelivered = [r[0] for r in db.execute(
            "SELECT id FROM outbox WHERE status IN ('failed', 'bounced') ORDER BY id")]
    async with signed_in(web) as client:
        page = (await client.get("/outbox")).text
        shown = [int(n) for n in re.findall(r'action="/outbox/(\d+)/retry"', page)]
        assert shown == undelivered[:50] and len(undelivered) > 50
        assert f'href="/outbox?after={undelivered[49]}" rel="next"' in page
        page = (await client.get("/outbox", params={"after": str(undelivered[49])})).text
        shown = [int(n) for n in re.findall(r'action="/outbox/(\d+)/retry"', page)]
        assert shown == undelivered[50:] and 'rel="next"' not in page


# --- the same SQL on PostgreSQL (tests/pg_server.py; skips with a reason without it) -------

@pytest.fixture(params=["sqlite", "postgresql"])
def either_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database of each dialect (PostgreSQL: migrated from the template)."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "gw.db")


@pytest.fixture
async def either(either_database: str):
    conn = await store.connect(either_database if "://" in either_database
                               else Path(either_database))
    await store.migrate(conn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_keyset_pages_on_either_database(either) -> None:
    from gateway.web.queries import attention_page

    conn = either
    ids = []
    for i in range(30):
        rows = await conn.execute_fetchall(
            "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from, rcpt_tos,"
            " received_at, state, outcome, report) VALUES (?, ?, ?, 1, '127.0.0.1', ?, ?, ?,"
            " 'done', ?, ?) RETURNING id",
            (f"<m{i}@example.com>", f"k{i}", "0" * 64, f"jan{i % 3}@example.com",
             json.dumps([INTAKE, f"Copy{i % 5}@Example.com"]), stamp(i),
             "new" if i % 2 else "held", json.dumps({"sender": f"From{i % 7}@example.com"})))
        ids.append(list(rows)[0][0])

    async def inbound_page(after: int | None, size: int, **filters: str) -> list[int]:
        return [r.id for r in await store.list_inbound(conn, after=after, limit=size, **filters)]

    walked = [r async for r in store.walk(lambda a, n: inbound_page(a, n), lambda r: r,
                                          page_rows=7)]
    assert walked == ids
    assert await inbound_page(ids[3], 4, outcome="new") == ids[5:12:2]
    assert await inbound_page(None, 30, address="jan1@EXAMPLE.com") == ids[1::3]
    assert await inbound_page(ids[0], 30, address="copy4@example.com") == ids[4::5]
    assert await inbound_page(None, 30, address="from6@example.com") == ids[6::7]

    numbers = []
    for i in range(12):
        number = 100_000 + (i * 245_489) % 900_000
        await conn.execute(
            "INSERT INTO tickets (number, status, subject, reporter_email, created_at, updated_at,"
            " phone_confirmation_required) VALUES (?, ?, ?, 'jan@example.com', ?, ?, ?)",
            (number, "closed" if i == 11 else "accepted", f"Awaria {i}",
             stamp(0 if i < 4 else i), stamp(i), int(i == 10)))
        numbers.append(number)
        if i < 10:  # the customer writes, in reverse order of the tickets
            await conn.execute(
                "INSERT INTO ticket_messages (ticket, direction, kind, from_addr, to_addrs,"
                " subject, message_id, date) VALUES (?, 'in', 'customer', 'jan@example.com',"
                " '[]', 's', ?, ?)", (number, f"<t{i}@example.com>", stamp(100 - i)))
    await conn.execute(
        "INSERT INTO ticket_messages (ticket, direction, kind, from_addr, to_addrs, subject,"
        " message_id, date) VALUES (?, 'out', 'staff_reply', 'anna@s4e.pl', '[]', 's', ?, ?)",
        (numbers[9], "<reply@s4e.pl>", stamp(200)))
    whole = [t.ticket.number for t in await store.find_tickets(conn)]
    assert whole == sorted(numbers[:4]) + numbers[4:]
    paged = [t.ticket.number async for t in store.walk(
        lambda a, n: store.find_tickets(conn, after=a, limit=n), lambda t: t.cursor(False),
        page_rows=5)]
    assert paged == whole
    waiting = [t.ticket.number for t in await store.find_tickets(conn, waiting=True)]
    assert waiting == numbers[8::-1]  # the last to write waits least; #9 was answered
    after = await store.ticket_cursor(conn, numbers[5], waiting=True)
    assert [t.ticket.number for t in await store.find_tickets(
        conn, waiting=True, after=after, limit=2)] == [numbers[4], numbers[3]]
    assert await store.ticket_cursor(conn, numbers[9], waiting=True) is None
    assert [t.number for t in await store.list_tickets(
        conn, "accepted", after=await store.ticket_cursor(conn, whole[8]), limit=5)] \
        == whole[9:11]

    attention = await attention_page(conn, limit=4)
    assert [a.ticket.number for a in attention] == [numbers[10], *numbers[8:5:-1]]
    assert attention[0].phone_pending and not attention[0].customer_waiting
    rest = await attention_page(conn, after=attention[-1].cursor(), limit=20)
    assert [a.ticket.number for a in rest] == numbers[5::-1]

    for i, inbound_id in enumerate(ids[:6]):
        await conn.execute(
            "INSERT INTO held (inbound_id, sender, subject, reason, status, created_at)"
            " VALUES (?, 'x@example.com', 's', 'r', ?, ?)",
            (inbound_id, "held" if i % 3 else "dropped", stamp(i)))
        await conn.execute(
            "INSERT INTO outbox (kind, message_id, mail_from, rcpt_to, subject, auto, status,"
            " next_attempt_at, queued_at, created_at) VALUES ('notice', ?, 'serwis@s4e.pl',"
            " 'jan@example.com', 's', 1, ?, 't', 't', 't')",
            (f"<o{i}@s4e.pl>", ("sent", "failed", "bounced")[i % 3]))
    held = [h.id for h in await store.list_held(conn, None)]
    assert [h.id for h in await store.list_held(conn, after=held[1], limit=2)] \
        == [held[2], held[4]]
    mails = [m.id for m in await store.list_outbox(conn)]
    assert [m.id for m in await store.list_outbox(
        conn, statuses=(OutboxStatus.FAILED, OutboxStatus.BOUNCED),
        after=mails[1], limit=3)] == [mails[2], mails[4], mails[5]]
