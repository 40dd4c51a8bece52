"""Disk growth per 1,000 reports: the database and the attachment files, measured.

    .venv/bin/python bench/bench_storage.py            # 300 text reports + 30 with 1 MiB, ~1-2 min
    .venv/bin/python bench/bench_storage.py --quick    # 40 + 5, ~15 s

A gateway runs in this process (real SMTP on 127.0.0.1, SQLite file, maildir outbox);
reports go in over SMTP one after another and are processed (ticket, acknowledgement
in the outbox). Two kinds: the Polish text report of bench/_load.py (~5 KB), and the
same report with a zip of logs (random bytes, a different file for every report, so
nothing is deduplicated; base64, 76-character CRLF lines as Thunderbird writes them).

Printed per 1,000 reports: database growth (after a WAL checkpoint), attachment
files, and the total; next to it what the same mail cost before attachments were
stored once (the raw kept whole in the database *and* the files), as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import smtplib
import sqlite3
import sys
import tempfile
import time
from email import message_from_bytes, policy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _load import _text_body, git_revision  # noqa: E402

from gateway.config import load_config  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402

INTAKE = "serwis@s4e.pl"


def make_report(n: int, attachment: int) -> bytes:
    body = _text_body(4 * 1024).decode("utf-8").replace("\r\n", "\n")
    head = (f"From: Jan Kowalski <jan.kowalski{n % 50}@example.com>\r\nTo: {INTAKE}\r\n"
            f"Subject: Awaria serwera kopii zapasowych nr {n}\r\n"
            f"Message-ID: <bench-storage.{n}.{time.time_ns()}@example.com>\r\n\r\n")
    msg = message_from_bytes(head.encode(), policy=policy.default)
    msg.set_content(body)
    if attachment:
        payload = random.Random(n).randbytes(attachment)  # incompressible, like a zip
        msg.add_attachment(payload, maintype="application", subtype="zip",
                           filename=f"logi_{n}.zip")
    return msg.as_bytes(policy=policy.SMTP)


def send(port: int, raw: bytes, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail(f"jan.kowalski{n % 50}@example.com", [INTAKE], raw)


def sizes(workdir: Path) -> tuple[int, int, int, int]:
    """(database bytes in use, attachment file bytes, bytes cut from raw, database file
    bytes) after a WAL checkpoint. Pages freed when a raw is cut are reused by the next
    mail: the file's size is the high-water mark of mail waiting to be processed."""
    db = sqlite3.connect(workdir / "gw.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cut = db.execute("SELECT coalesce(sum(i.size - length(r.raw)), 0) FROM inbound i"
                     " JOIN inbound_raw r USING (id)").fetchone()[0]
    (pages,), (free,), (page_size,) = (db.execute(f"PRAGMA {p}").fetchone()
                                       for p in ("page_count", "freelist_count", "page_size"))
    db.close()
    file_size = (workdir / "gw.db").stat().st_size
    files = sum(p.stat().st_size for p in (workdir / "att").rglob("*") if p.is_file())
    return (pages - free) * page_size, files, cut, file_size


async def run_kind(workdir: Path, count: int, attachment: int,
                   start: int) -> tuple[int, int, int, int]:
    config = workdir / "gw.toml"
    gw = Gateway(load_config(config))
    await gw.start(port=0)
    try:
        for n in range(start, start + count):
            await asyncio.to_thread(send, gw.port, make_report(n, attachment), n)
        db = sqlite3.connect(workdir / "gw.db")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # bounded: until everything is processed
            left = db.execute("SELECT count(*) FROM inbound WHERE state != 'done'").fetchone()[0]
            if not left:
                break
            await asyncio.sleep(0.2)
        db.close()
    finally:
        await gw.stop(grace=5)
    return sizes(workdir)


def per_thousand(value: int, count: int) -> str:
    return f"{value * 1000 / count / 1e6:9.1f} MB"


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        workdir = Path(tmp)
        (workdir / "gw.toml").write_text(
            '[smtp]\nlisten = "127.0.0.1:0"\nhostname = "gw.bench"\n'
            f'[storage]\ndatabase = "{workdir}/gw.db"\nattachments = "{workdir}/att"\n'
            f'[outbound]\nmaildir = "{workdir}/outbox"\n')
        empty = await run_kind(workdir, 0, 0, 0)
        rows = []
        previous, start = empty, 0
        for label, count, attachment in (("text report (~5 KB)", args.text, 0),
                                         (f"report + {args.attachment // 1024} KiB zip",
                                          args.with_attachment, args.attachment)):
            started = time.monotonic()
            now = await run_kind(workdir, count, attachment, start)
            start += count
            database = now[0] - previous[0]
            files = now[1] - previous[1]
            cut = now[2] - previous[2]
            rows.append((label, count, database, files, database + files,
                         database + cut + files, time.monotonic() - started, now[3]))
            previous = now
        if args.keep:  # for a look at the database afterwards
            shutil.copy(workdir / "gw.db", args.keep)
    print(f"s4e-gateway{git_revision(ROOT / 'gateway')}: disk growth per 1,000 reports")
    print(f"{'kind':<24} {'n':>5} {'database':>12} {'files':>12} {'total':>12}"
          f" {'before*':>12} {'ratio':>7}")
    for label, count, database, files, total, before, seconds, _ in rows:
        print(f"{label:<24} {count:>5} {per_thousand(database, count)} {per_thousand(files, count)}"
              f" {per_thousand(total, count)} {per_thousand(before, count)}"
              f" {total / before:7.2f}   ({seconds:.0f} s)")
    print("database: pages in use after a checkpoint (the file itself was "
          f"{rows[-1][-1] / 1e6:.1f} MB: pages freed by cutting a raw are reused by the next "
          "mail)")
    print("* before: the raw mail kept whole in the database as well as the attachment files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=int, default=300, help="text-only reports")
    parser.add_argument("--with-attachment", type=int, default=30,
                        help="reports with an attachment")
    parser.add_argument("--attachment", type=int, default=1024 * 1024,
                        help="attachment size in bytes")
    parser.add_argument("--quick", action="store_true", help="40 + 5 reports")
    parser.add_argument("--keep", metavar="FILE", help="keep a copy of the database")
    args = parser.parse_args(argv)
    if args.quick:
        args.text, args.with_attachment = 40, 5
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
