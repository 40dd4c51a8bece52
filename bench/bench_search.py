"""`tickets list --search`: SQLite FTS5 (migration 0005) against a plain LIKE scan, and
what the index triggers cost on the write path; with --postgresql, the same against
PostgreSQL's tsvector index (migrations/postgresql/0005_search.sql).

    .venv/bin/python bench/bench_search.py            # 20,000 tickets, about a minute
    .venv/bin/python bench/bench_search.py --quick    # 2,000 tickets, a few seconds
    .venv/bin/python bench/bench_search.py --quick --postgresql

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


def statements(tickets: int):
    """The INSERTs of `tickets` tickets with three messages each (the same every run)."""
    rng = random.Random(7)
    for i in range(tickets):
        number = 100000 + i
        text = " ".join(rng.choice(WORDS) for _ in range(40))
        yield ("INSERT INTO tickets (number, status, subject, reporter_name, reporter_email,"
               " reporter_phone, install_address, description, serial_number, created_at,"
               " updated_at) VALUES (?, 'accepted', ?, ?, ?, '+48600100200', ?, ?, ?, 't', 't')",
               (number, f"Awaria {rng.choice(WORDS)}", f"Jan Kowalski {i}", f"jan{i}@example.com",
                f"ul. Prosta {i}, {rng.choice(CITIES)}", text, f"SN-{i:06d}"))
        for j in range(3):
            yield ("INSERT INTO ticket_messages (ticket, direction, from_addr, to_addrs, subject,"
                   " message_id, body, date, kind) VALUES (?, 'in', 'a@example.com', '[]', 's',"
                   " ?, ?, 't', 'customer')",
                   (number, f"<{i}.{j}@example.com>",
                    " ".join(rng.choice(WORDS) for _ in range(80))))


def fill(db_path: Path, tickets: int, *, with_index: bool) -> float:
    """Write `tickets` tickets with three messages each; seconds taken."""
    import sqlite3

    conn = sqlite3.connect(db_path, isolation_level=None)
    if not with_index:
        for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%search%'"
        ).fetchall():
            conn.execute(f"DROP TRIGGER {name}")
    started = time.perf_counter()
    conn.execute("BEGIN")
    for sql, params in statements(tickets):
        conn.execute(sql, params)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def fill_postgres(url: str, tickets: int, *, with_index: bool) -> float:
    """As `fill`, into a migrated PostgreSQL database."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if not with_index:
            for table, name in conn.execute(
                    "SELECT event_object_table, trigger_name FROM information_schema.triggers"
                    " WHERE trigger_name LIKE '%search%'").fetchall():
                conn.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for sql, params in statements(tickets):
                cur.execute(sql.replace("?", "%s"), params)
        elapsed = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE")  # what autovacuum does soon after a load
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


async def listing(db_path: Path | str, **query: object) -> int:
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


async def migrated(path: Path | str) -> None:
    conn = await store.connect(path)
    await store.migrate(conn)
    await conn.close()


def postgres_figures(sqlite_db: Path, count: int, repeats: int) -> None:
    """The same tickets in PostgreSQL (a throwaway cluster, tests/pg_server.py): write
    time with and without the index triggers, find_tickets beside SQLite's."""
    import psycopg

    from tests.pg_server import running_server, skip_reason

    if reason := skip_reason():
        sys.exit(f"--postgresql: {reason}")
    with running_server() as server:
        urls = {}
        for name in ("indexed", "plain"):
            with psycopg.connect(server.url(), autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {name}")
            urls[name] = server.url(name)
            asyncio.run(migrated(urls[name]))
        write_plain = fill_postgres(urls["plain"], count, with_index=False)
        write_indexed = fill_postgres(urls["indexed"], count, with_index=True)
        print(f"PostgreSQL write without index triggers: {write_plain:7.2f} s")
        print(f"PostgreSQL write with index triggers:    {write_indexed:7.2f} s"
              f"  (x{write_indexed / write_plain:.2f})")
        print("find_tickets on an open connection (median of the repeats):")
        print(f"{'search':<22} {'SQLite ms':>9} {'PG ms':>9} {'PG/SQLite':>10}  tickets")
        asyncio.run(compare_listings(sqlite_db, urls["indexed"], repeats))


async def compare_listings(sqlite_db: Path, url: str, repeats: int) -> None:
    lite, pg = await store.connect(sqlite_db), await store.connect(url)
    try:
        for label, text in (("serial SN-001234", "SN-001234"),
                            ("phrase", '"biblioteka taśmowa"'),
                            ("two words", "Kraków wentylator"),
                            ("prefix (all match)", "przegrz")):
            expression = store.search_expression(text)
            figures = []
            for conn in (lite, pg):
                times, rows = [], 0
                for _ in range(repeats):
                    started = time.perf_counter()
                    rows = len(await store.find_tickets(conn, search=expression))
                    times.append(time.perf_counter() - started)
                figures.append((statistics.median(times), rows))
            (lite_s, lite_rows), (pg_s, pg_rows) = figures
            same = "" if pg_rows == lite_rows else f"  (SQLite: {lite_rows})"
            print(f"{label:<22} {lite_s * 1000:9.1f} {pg_s * 1000:9.1f} {pg_s / lite_s:10.2f}"
                  f"  {pg_rows}{same}")
    finally:
        await lite.close()
        await pg.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 tickets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--postgresql", action="store_true",
                        help="also PostgreSQL (a throwaway cluster; Debian's postgresql)")
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
        if args.postgresql:
            postgres_figures(indexed, count, args.repeats)


if __name__ == "__main__":
    main()
