"""List commands at volume: streamed JSON and first pages, wall time and peak memory.

    .venv/bin/python bench/bench_lists.py                 # 200,000 messages, 100,000 tickets, ~3 min
    .venv/bin/python bench/bench_lists.py --rows 1000000  # the issue's size (#17), ~10 min
    .venv/bin/python bench/bench_lists.py --rows 20000    # a few seconds, to check it works

Builds a SQLite database through the real migrations, filled by direct SQL inserts
(not SMTP: a million messages through intake would take an hour) with realistic
rows: N inbound messages (envelope, a stored parsed report of ~1 KB; no raw bytes:
no list reads them), N/2 tickets (90 % closed, the rest open) with two thread
entries each (the customer's report and the acknowledgement), one of the inbound
messages per ticket linked to it. The full-text index triggers are dropped for the
fill (no list here searches).

Then runs each command as operators do, `python -m gateway ... --config F` with
standard output to /dev/null, and prints its wall time and peak RSS (the child's
own `ru_maxrss`, from `os.wait4`): `inbox list --json` and `tickets list --json`
(every row, streamed), first pages (the 50-row tables), a page from the middle
(`--after`), and, in the same run, the unpaged path the commands had before
(the whole list read into memory, then one JSON dump). The issue's baseline
(tickets list at 500k: 11.7 s, 1.27 GB; inbox list at 1M: 11.4 s, 1.0 GB) is
printed beside as a ratio; it was measured at --rows 1000000.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import migrated  # noqa: E402

BASELINE = {"inbox": (11.4, 1.0e9, 1_000_000), "tickets": (11.7, 1.27e9, 500_000)}
BATCH = 20_000

REPORT_TEXT = ("Dzień dobry,\n1. Imię i nazwisko osoby zgłaszającej problem: Jan Kowalski\n"
               "2. Dane kontaktowe: jan.kowalski{i}@example.com, tel. 600 100 200\n"
               "3. Adres instalacji sprzętu: ul. Prosta {i}, 30-001 Kraków\n"
               "4. Opis problemu: Serwer kopii zapasowych nie uruchamia się po aktualizacji;"
               " dioda błędu świeci na pomarańczowo, konsola zgłasza błąd kontrolera.\n"
               "5. Numer seryjny urządzenia / numer Commcell ID: SN-{i:06d}\n\nPozdrawiam")


def stamp(i: int, base: float = 1_700_000_000.0) -> str:
    """Increasing ISO UTC times, 5 s apart."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(base + 5 * i))


def ticket_number(i: int) -> int:
    return 100_000 + (i * 245_489) % 900_000  # unique for i < 900,000, not in order


def batches(db: sqlite3.Connection, count: int) -> Iterator[range]:
    """range(count) in slices of BATCH rows, each slice written in one transaction."""
    for start in range(0, count, BATCH):
        db.execute("BEGIN")
        yield range(start, min(start + BATCH, count))
        db.execute("COMMIT")


def fill(path: Path, rows: int) -> float:
    """N inbound messages, N/2 tickets with two messages each; seconds taken."""
    started = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"
                              " AND name LIKE '%search%'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    tickets = rows // 2
    statuses = ["closed"] * 18 + ["resolved", "in_progress"]
    for batch in batches(db, tickets):
        db.executemany(
            "INSERT INTO tickets (number, status, subject, reporter_name, reporter_email,"
            " reporter_phone, install_address, description, serial_number, participants,"
            " created_at, updated_at, closed_at, last_customer_at) VALUES"
            " (?, ?, ?, ?, ?, '+48 600 100 200', ?, ?, ?, ?, ?, ?, ?, ?)",
            [(ticket_number(i), statuses[i % 20], f"Awaria serwera kopii zapasowych {i}",
              f"Jan Kowalski {i}", f"jan.kowalski{i}@example.com",
              f"ul. Prosta {i}, 30-001 Kraków",
              "Serwer kopii zapasowych nie uruchamia się po aktualizacji.", f"SN-{i:06d}",
              json.dumps([f"jan.kowalski{i}@example.com", "serwis@s4e.pl"]),
              stamp(2 * i), stamp(2 * i + 1), stamp(2 * i + 1) if i % 20 < 18 else None,
              stamp(2 * i)) for i in batch])
        db.executemany(
            "INSERT INTO ticket_messages (ticket, direction, from_addr, to_addrs, subject,"
            " message_id, body, date, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [row for i in batch for row in (
                (ticket_number(i), "in", f"jan.kowalski{i}@example.com", '["serwis@s4e.pl"]',
                 f"Awaria serwera kopii zapasowych {i}", f"<r{i}@example.com>",
                 REPORT_TEXT.format(i=i), stamp(2 * i), "customer"),
                (ticket_number(i), "out", "serwis@s4e.pl", f'["jan.kowalski{i}@example.com"]',
                 f"[#{ticket_number(i)}] Potwierdzenie przyjęcia zgłoszenia",
                 f"<ack{i}@s4e.pl>", "Dziękujemy, zgłoszenie przyjęte.", stamp(2 * i + 1),
                 "notice"))])
    for batch in batches(db, rows):
        db.executemany(
            "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from,"
            " rcpt_tos, received_at, state, attempts, outcome, ticket, report, processed_at,"
            " auth) VALUES (?, ?, ?, ?, '192.0.2.25', ?, '[\"serwis@s4e.pl\"]', ?, 'done', 1,"
            " ?, ?, ?, ?, 'none')",
            [(f"<r{i}@example.com>", f"{i:064x}", f"{i * 7919:064x}", 4400 + i % 900,
              f"jan.kowalski{i}@example.com", stamp(i),
              "new" if i < tickets else "ignored_auto", ticket_number(i) if i < tickets else None,
              json.dumps({"message_id": f"<r{i}@example.com>",
                          "sender": f"jan.kowalski{i}@example.com",
                          "subject": f"Awaria serwera kopii zapasowych {i}",
                          "text": REPORT_TEXT.format(i=i), "fields": [
                              ["reporter_name", f"Jan Kowalski {i}"],
                              ["serial_number", f"SN-{i:06d}"]],
                          "missing": [], "attachments": []}, ensure_ascii=False),
              stamp(i)) for i in batch])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - started


# Children are started by this small process, not by the benchmark: a child's
# ru_maxrss starts from the RSS of the process that forked it (Linux keeps the
# peak across exec), and the benchmark holds the fill's batches.
LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    argv = json.loads(line)
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        child = subprocess.Popen(argv, stdout=sink, stderr=subprocess.PIPE)
        err = child.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(child.pid, 0)
    took = time.perf_counter() - started
    print(json.dumps([took, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status),
                      err[-500:]]), flush=True)
"""


class Launcher:
    """Runs one command at a time: wall seconds and peak RSS (bytes) of the child."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str]) -> tuple[float, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        took, rss, code, err = json.loads(self.proc.stdout.readline())
        if code != 0:
            raise SystemExit(f"{' '.join(argv)}: exit {code}: {err.strip()}")
        return took, rss

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


# The commands' old path, for the same-run comparison: the whole list in memory (one
# SELECT without LIMIT), then one JSON dump of it.
UNPAGED = """
import asyncio, json, sys
from pathlib import Path
from gateway import store
from gateway.staff import ticket_summary

async def main(path, what):
    conn = await store.connect(Path(path))
    if what == "inbox":
        rows = [r.as_json() for r in await store.list_inbound(conn)]
    else:
        rows = [ticket_summary(t.ticket, t.waiting_since) for t in await store.find_tickets(conn)]
    await conn.close()
    print(json.dumps(rows, ensure_ascii=False, indent=2))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000,
                        help="inbound messages (tickets: half as many); default 200,000")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the database goes (default /var/tmp)")
    parser.add_argument("--no-unpaged", action="store_true",
                        help="skip the old unpaged path (it needs ~1 GB at 1M rows)")
    args = parser.parse_args()
    if not 100 <= args.rows <= 2_000_000:
        raise SystemExit("--rows: between 100 and 2,000,000")
    python = sys.executable
    launcher = Launcher()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_lists.") as folder:
        db = Path(folder) / "gw.db"
        config = Path(folder) / "gw.toml"
        config.write_text(f'[storage]\ndatabase = "{db}"\nattachments = "{folder}/att"\n')
        asyncio.run(migrated(db))
        took = fill(db, args.rows)
        size = db.stat().st_size
        print(f"filled {args.rows:,} inbound messages and {args.rows // 2:,} tickets "
              f"({args.rows:,} thread entries) in {took:.1f} s; database {size / 1e6:.0f} MB")
        middle = args.rows // 2
        ticket_middle = f"{ticket_number(args.rows // 4):06d}"
        cli = [python, "-m", "gateway"]
        cases = [
            ("", "start-up only (s4e-gateway --version)", [*cli, "--version"]),
            ("inbox", "inbox list --json (all, streamed)", [*cli, "inbox", "list", "--json"]),
            ("inbox", "unpaged, old path (same run)", [python, "-c", UNPAGED, str(db), "inbox"]),
            ("", "inbox list (first page)", [*cli, "inbox", "list"]),
            ("", f"inbox list --after {middle}", [*cli, "inbox", "list", "--after", str(middle)]),
            ("", "inbox list --outcome new (first page)",
             [*cli, "inbox", "list", "--outcome", "new"]),
            ("tickets", "tickets list --json (all, streamed)",
             [*cli, "tickets", "list", "--json"]),
            ("tickets", "unpaged, old path (same run)",
             [python, "-c", UNPAGED, str(db), "tickets"]),
            ("", "tickets list (first page)", [*cli, "tickets", "list"]),
            ("", f"tickets list --after {ticket_middle}",
             [*cli, "tickets", "list", "--after", ticket_middle]),
            ("", "tickets list --status in_progress", [*cli, "tickets", "list", "--status",
                                                       "in_progress"]),
            ("", "tickets list --waiting (first page)", [*cli, "tickets", "list", "--waiting"]),
            ("", "tickets list --waiting --json (all)",
             [*cli, "tickets", "list", "--waiting", "--json"]),
        ]
        print(f"{'command':<42} {'wall s':>8} {'peak RSS MB':>12}   vs the issue's baseline")
        for kind, label, argv in cases:
            if args.no_unpaged and "unpaged" in label:
                continue
            if argv[:3] == cli and argv[3] != "--version":
                argv = [*argv, "--config", str(config)]
            wall, rss = launcher.run(argv)
            note = ""
            if kind:
                base_wall, base_rss, base_rows = BASELINE[kind]
                rows = args.rows if kind == "inbox" else args.rows // 2
                scale = "" if rows == base_rows else f" (baseline at {base_rows:,} rows)"
                note = (f"   time x{wall / base_wall:.2f}, memory x{rss / base_rss:.3f}"
                        f" of {base_wall} s, {base_rss / 1e9:.2f} GB{scale}")
            print(f"{label:<42} {wall:8.2f} {rss / 1e6:12.1f}{note}", flush=True)
    launcher.close()


if __name__ == "__main__":
    main()
