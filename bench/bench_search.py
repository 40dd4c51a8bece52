"""`tickets list --search`: SQLite FTS5 (migration 0005) against a plain LIKE scan, and
what the index triggers cost on the write path.

    .venv/bin/python bench/bench_search.py            # 20,000 tickets, about a minute
    .venv/bin/python bench/bench_search.py --quick    # 2,000 tickets, a few seconds

Builds a database with N tickets (Polish reports, three thread entries each) through
the real migrations, so the triggers fill the index as production does. Prints, per
query, the median time of `store.find_tickets` with FTS5 and of the same question asked
with `LIKE '%...%'` over tickets and messages (what a search without an index does),
and the time to write the tickets and messages with and without the index triggers.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import store  # noqa: E402

WORDS = ("serwer kopii zapasowych biblioteka taśmowa nie odpowiada dioda błędu świeci "
         "macierz dyskowa kontroler restart aktualizacja oprogramowania zasilacz wentylator "
         "hałasuje przegrzewa się konsola zgłasza połączenie sieć przełącznik").split()
CITIES = ("Kraków", "Warszawa", "Łódź", "Gdańsk", "Wrocław", "Poznań")


def fill(db_path: Path, tickets: int, *, with_index: bool) -> float:
    """Write `tickets` tickets with three messages each; seconds taken."""
    import sqlite3

    rng = random.Random(7)
    conn = sqlite3.connect(db_path, isolation_level=None)
    if not with_index:
        for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%search%'"
        ).fetchall():
            conn.execute(f"DROP TRIGGER {name}")
    started = time.perf_counter()
    conn.execute("BEGIN")
    for i in range(tickets):
        number = 100000 + i
        text = " ".join(rng.choice(WORDS) for _ in range(40))
        conn.execute(
            "INSERT INTO tickets (number, status, subject, reporter_name, reporter_email,"
            " reporter_phone, install_address, description, serial_number, created_at,"
            " updated_at) VALUES (?, 'accepted', ?, ?, ?, '+48600100200', ?, ?, ?, 't', 't')",
            (number, f"Awaria {rng.choice(WORDS)}", f"Jan Kowalski {i}", f"jan{i}@example.com",
             f"ul. Prosta {i}, {rng.choice(CITIES)}", text, f"SN-{i:06d}"))
        for j in range(3):
            conn.execute(
                "INSERT INTO ticket_messages (ticket, direction, from_addr, to_addrs, subject,"
                " message_id, body, date, kind) VALUES (?, 'in', 'a@example.com', '[]', 's',"
                " ?, ?, 't', 'customer')",
                (number, f"<{i}.{j}@example.com>", " ".join(rng.choice(WORDS) for _ in range(80))))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def like_scan(db_path: Path, needles: list[str]) -> int:
    import sqlite3

    conn = sqlite3.connect(db_path)
    where = " AND ".join(
        "(t.subject || ' ' || coalesce(t.description, '') || ' ' || coalesce(t.serial_number, '')"
        " || ' ' || coalesce(t.install_address, '') LIKE ? OR EXISTS (SELECT 1 FROM"
        " ticket_messages m WHERE m.ticket = t.number AND m.body LIKE ?))" for _ in needles)
    params = [p for n in needles for p in (f"%{n}%", f"%{n}%")]
    rows = conn.execute(f"SELECT t.number FROM tickets t WHERE {where}", params).fetchall()
    conn.close()
    return len(rows)


def fts_scan(db_path: Path, text: str) -> int:
    """The same question through the FTS5 tables (the subquery `find_tickets` uses)."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    expression = store.search_expression(text)
    rows = conn.execute(
        "SELECT t.number FROM tickets t WHERE t.number IN (SELECT rowid FROM ticket_search"
        " WHERE ticket_search MATCH ? UNION SELECT ticket FROM message_search"
        " WHERE message_search MATCH ?)", (expression, expression)).fetchall()
    conn.close()
    return len(rows)


async def listing(db_path: Path, **query: object) -> int:
    """`tickets list` end to end at the store: rows with "waiting since" for each."""
    conn = await store.connect(db_path)
    try:
        return len(await store.find_tickets(conn, **query))  # type: ignore[arg-type]
    finally:
        await conn.close()


def median_time(func, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


async def migrated(path: Path) -> None:
    conn = await store.connect(path)
    await store.migrate(conn)
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 tickets")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    count = 2_000 if args.quick else args.tickets
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        indexed, plain = Path(folder) / "indexed.db", Path(folder) / "plain.db"
        asyncio.run(migrated(indexed))
        asyncio.run(migrated(plain))
        write_plain = fill(plain, count, with_index=False)
        write_indexed = fill(indexed, count, with_index=True)
        print(f"{count} tickets, {3 * count} messages")
        print(f"write without index triggers: {write_plain:7.2f} s")
        print(f"write with index triggers:    {write_indexed:7.2f} s"
              f"  (x{write_indexed / write_plain:.2f})")
        queries = [("serial", "SN-001234", ["SN-001234"]),
                   ("phrase", '"biblioteka taśmowa"', ["biblioteka taśmowa"]),
                   ("two words", "Kraków wentylator", ["Kraków", "wentylator"])]
        print(f"{'query':<10} {'FTS5 ms':>9} {'LIKE ms':>9} {'LIKE/FTS5':>10}  hits")
        for label, text, needles in queries:
            fast, hits = median_time(lambda text=text: fts_scan(indexed, text), args.repeats)
            slow, like_hits = median_time(lambda needles=needles: like_scan(plain, needles),
                                          args.repeats)
            print(f"{label:<10} {fast * 1000:9.1f} {slow * 1000:9.1f} {slow / fast:10.1f}  "
                  f"{hits} (LIKE, substrings: {like_hits})")
        for label, query in (("list --search SN-001234", {"search": '"SN-001234" *'}),
                             ("list --waiting", {"waiting": True}),
                             ("list (all)", {})):
            took, rows = median_time(lambda query=query: asyncio.run(listing(indexed, **query)),
                                     args.repeats)
            print(f"find_tickets {label:<24} {took * 1000:8.1f} ms  {rows} tickets")


if __name__ == "__main__":
    main()
