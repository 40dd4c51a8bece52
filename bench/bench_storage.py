"""Disk growth per 1,000 reports, and what keep_raw and attachment dedup save.

    .venv/bin/python bench/bench_storage.py            # 300 text reports, 4 x 30 with 1 MiB, ~2 min
    .venv/bin/python bench/bench_storage.py --quick    # 40 + 4 x 5, ~15 s
    .venv/bin/python bench/bench_storage.py --database postgresql://u@127.0.0.1:5432/empty_db

A gateway runs in this process (real SMTP on 127.0.0.1, SQLite file, maildir outbox,
`[processing] workers = 0`); reports go in over SMTP one after another and are
processed (ticket, acknowledgement in the outbox: one per report, to the reporter
writing from the address the report gives; the hourly answer cap lifted). Kinds: the
Polish text report of bench/_load.py (~5 KB); the same report with a zip of logs
(random bytes, a different file for every report: nothing to deduplicate; base64,
76-character CRLF lines as Thunderbird writes them); and the same report with one log
file that every report carries again (what dedup saves).

Printed per 1,000 reports: database growth (pages in use after a WAL checkpoint),
attachment bytes, the total, and what the same mail cost before attachments were
stored once (the raw kept whole in the database *and* the files), as a ratio; the
text report's bytes in the database as a multiple of its own size (#17's baseline:
18 KB per 4.4 KB report, 4.1x); what `[storage] keep_raw` gives back once the tickets
are closed (their raw mail dropped); what dedup saves; and the same attachment kinds
with the bytes in the database (`DatabaseAttachments`, as with PostgreSQL).

`--database postgresql://...`: the same kinds on that PostgreSQL database (it must be
empty: the benchmark fills it), sizes as PostgreSQL counts them (tables with their
indexes and TOAST, after VACUUM FULL: what is in use).
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
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _load import _text_body, git_revision  # noqa: E402

from gateway import store  # noqa: E402
from gateway.attachment_store import AttachmentStore, DatabaseAttachments  # noqa: E402
from gateway.config import Config, load_config  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.errors import expected_failure  # noqa: E402

INTAKE = "serwis@s4e.pl"
SENDER = "jan.kowalski@example.com"  # also the address the report's body gives
BASELINE = (18_000, 4_400)  # #17: 18 KB of SQLite per 4.4 KB report (4.1x)
LONG_AGO = "2000-01-01T00:00:00+00:00"


def make_report(n: int, attachment: int, *, same: bool = False) -> bytes:
    """Report `n`; with `attachment` bytes of logs: its own (a zip, random bytes) or,
    with `same`, the one log file every report carries."""
    body = _text_body(4 * 1024).decode("utf-8").replace("\r\n", "\n")
    head = (f"From: Jan Kowalski <{SENDER}>\r\nTo: {INTAKE}\r\n"
            f"Subject: Awaria serwera kopii zapasowych nr {n}\r\n"
            f"Message-ID: <bench-storage.{n}.{time.time_ns()}@example.com>\r\n\r\n")
    msg = message_from_bytes(head.encode(), policy=policy.default)
    msg.set_content(body)
    if attachment and same:
        payload = random.Random("the one log").randbytes(attachment)
        msg.add_attachment(payload, maintype="application", subtype="octet-stream",
                           filename="commserve.log")
    elif attachment:
        payload = random.Random(n).randbytes(attachment)  # incompressible, like a zip
        msg.add_attachment(payload, maintype="application", subtype="zip",
                           filename=f"logi_{n}.zip")
    return msg.as_bytes(policy=policy.SMTP)


def send(port: int, raw: bytes, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail(SENDER, [INTAKE], raw)


@dataclass(frozen=True, slots=True)
class Sizes:
    database: int  # bytes in use
    files: int  # attachment files
    blobs: int  # attachment bytes in the database (attachment_blobs), part of `database`
    cut: int  # bytes cut out of the stored raw mail
    received: int  # the reports' own bytes
    file_size: int  # the database file (SQLite), or the same as `database`

    def __sub__(self, other: Sizes) -> Sizes:
        return Sizes(self.database - other.database, self.files - other.files,
                     self.blobs - other.blobs, self.cut - other.cut,
                     self.received - other.received, self.file_size)


_COUNTED = ("SELECT coalesce(sum(size), 0) FROM attachment_blobs",
            "SELECT coalesce(sum(i.size - length(r.raw)), 0) FROM inbound i"
            " JOIN inbound_raw r ON r.id = i.id",
            "SELECT coalesce(sum(size), 0) FROM inbound")


def files_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def sqlite_sizes(config: Config) -> Sizes:
    """After a WAL checkpoint. Pages freed when a raw is cut (or dropped) are reused by
    the next mail: the file's size is the high-water mark."""
    path = config.storage.sqlite_path
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        blobs, cut, received = (db.execute(sql).fetchone()[0] for sql in _COUNTED)
        (pages,), (free,), (page_size,) = (db.execute(f"PRAGMA {p}").fetchone()
                                           for p in ("page_count", "freelist_count", "page_size"))
    finally:
        db.close()
    return Sizes((pages - free) * page_size, files_size(config.storage.attachments), blobs,
                 cut, received, path.stat().st_size)


def postgres_sizes(url: str, config: Config) -> Sizes:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        # FULL: rewritten without the dead versions (a cut or dropped raw), so that the
        # size is what is in use, as SQLite's pages in use (PostgreSQL reuses that space
        # for the next mail as SQLite reuses free pages).
        conn.execute("VACUUM FULL")
        blobs, cut, received = (conn.execute(sql).fetchone()[0] for sql in _COUNTED)
        (used,) = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind = 'r'").fetchone()
    return Sizes(int(used), files_size(config.storage.attachments), int(blobs), int(cut),
                 int(received), int(used))


@dataclass(frozen=True, slots=True)
class Kind:
    label: str
    count: int
    make: Callable[[int], bytes]
    attachment: int = 0  # bytes of attachment per report
    same: bool = False  # every report carries the same attachment


@dataclass(frozen=True, slots=True)
class Result:
    kind: Kind
    grown: Sizes
    kept_raw_dropped: int  # database bytes in use given back by keep_raw
    seconds: float


class Bench:
    def __init__(self, config: Config, measure: Callable[[], Sizes],
                 attachments: AttachmentStore | None = None) -> None:
        self.config = config
        self.measure = measure
        self.attachments = attachments
        self.start = 0

    async def run(self, kind: Kind) -> Result:
        """The kind's reports through a gateway, then keep_raw on them (their tickets
        closed long ago): what they cost, and what dropping their raw mail gives back."""
        before = self.measure()
        started = time.monotonic()
        gw = Gateway(self.config, attachments=self.attachments)
        await gw.start(port=0)
        try:
            for n in range(self.start, self.start + kind.count):
                await asyncio.to_thread(send, gw.port, kind.make(n), n)
            await settle(gw)
            seconds = time.monotonic() - started
            grown = self.measure()
            await drop_all_raw(gw)
        finally:
            await gw.stop(grace=5)
        self.start += kind.count
        after = self.measure()
        return Result(kind, grown - before, grown.database - after.database, seconds)


async def settle(gw: Gateway, limit: float = 600) -> None:
    """Until every report is processed and its answers are out (bounded)."""
    conn = gw._house_conn
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        async with gw._house_lock:
            rows = await conn.execute_fetchall(
                "SELECT (SELECT count(*) FROM inbound WHERE state != 'done'),"
                " (SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending'))")
        if not any(list(rows)[0]):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not processed within {limit:.0f} s")


async def drop_all_raw(gw: Gateway) -> None:
    """[storage] keep_raw on every ticket so far: closed long ago, raw mail dropped."""
    conn = gw._house_conn
    async with gw._house_lock:
        async with store.Tx(conn):
            await conn.execute("UPDATE tickets SET status = 'closed', closed_at = ?"
                               " WHERE status != 'closed' OR closed_at IS NULL", (LONG_AGO,))
        while await store.drop_old_raw(conn, store.utcnow(), store.utcnow(), limit=1000):
            pass


def per_thousand(value: float, count: int) -> str:
    return f"{value * 1000 / count / 1e6:9.1f} MB"


def write_config(workdir: Path, database: str) -> Config:
    path = workdir / "gw.toml"
    path.write_text(
        '[smtp]\nlisten = "127.0.0.1:0"\nhostname = "gw.bench"\n'
        f'[storage]\ndatabase = "{database}"\nattachments = "{workdir}/att"\n'
        f'[outbound]\nmaildir = "{workdir}/outbox"\n'
        # In this process: the attachment store passed to the Gateway is the one used
        # (worker processes would take the configuration's). Disk growth is the same.
        '[processing]\nworkers = 0\n'
        # Every report gets its acknowledgement (all come from the one reporter the
        # body names, as a customer writing from their own address).
        '[tickets]\nmax_auto_replies_per_hour = 1000000\n')
    return load_config(path)


def kinds(args: argparse.Namespace) -> list[Kind]:
    size = args.attachment
    return [Kind("text report (~5 KB)", args.text, lambda n: make_report(n, 0)),
            Kind(f"report + {size // 1024} KiB zip", args.with_attachment,
                 lambda n: make_report(n, size), size),
            Kind(f"report + the same {size // 1024} KiB log", args.with_attachment,
                 lambda n: make_report(n, size, same=True), size, True)]


def print_table(title: str, results: list[Result], *, files_label: str = "files") -> None:
    print(title)
    print(f"{'kind':<32} {'n':>5} {'database':>12} {files_label:>12} {'total':>12}"
          f" {'before*':>12} {'ratio':>7}")
    for r in results:
        g, count = r.grown, r.kind.count
        total = g.database + g.files
        # before: every raw whole in the database and every attachment's bytes once more
        before = g.database - g.blobs + g.cut + r.kind.count * r.kind.attachment
        print(f"{r.kind.label:<32} {count:>5} {per_thousand(g.database, count)}"
              f" {per_thousand(g.files, count)} {per_thousand(total, count)}"
              f" {per_thousand(before, count)} {total / before:7.2f}   ({r.seconds:.0f} s)")


def print_details(results: list[Result], where: str) -> None:
    text = results[0]
    per_report = text.grown.database / text.kind.count
    size = text.grown.received / text.kind.count
    base_db, base_size = BASELINE
    print(f"{where}: a text report of {size / 1e3:.1f} KB costs {per_report / 1e3:.1f} KB of"
          f" database, {per_report / size:.1f}x its size (#17's baseline: {base_db / 1e3:.0f} KB"
          f" per {base_size / 1e3:.1f} KB, {base_db / base_size:.1f}x; now"
          f" {per_report / size / (base_db / base_size):.2f} of that)")
    print("keep_raw (tickets closed, their raw mail dropped), database per 1,000 reports:")
    for r in results:
        left = r.grown.database - r.kept_raw_dropped
        print(f"  {r.kind.label:<32} {per_thousand(r.grown.database, r.kind.count)} ->"
              f" {per_thousand(left, r.kind.count)}  (saves"
              f" {per_thousand(r.kept_raw_dropped, r.kind.count)},"
              f" {r.kept_raw_dropped / r.grown.database:.0%})")
    same = next((r for r in results if r.kind.same), None)
    if same is not None:
        stored = same.grown.files + same.grown.blobs
        without = same.kind.count * same.kind.attachment
        print(f"dedup: {same.kind.count} reports with the same {same.kind.attachment // 1024}"
              f" KiB log keep it once: {stored / 1e6:.1f} MB of attachment bytes instead of"
              f" {without / 1e6:.1f} MB ({stored / without:.3f})")


async def run_sqlite(args: argparse.Namespace, workdir: Path,
                     attachments: AttachmentStore | None) -> list[Result]:
    config = write_config(workdir, str(workdir / "gw.db"))
    gw = Gateway(config)  # migrated, empty
    await gw.start(port=0)
    await gw.stop(grace=1)
    bench = Bench(config, lambda: sqlite_sizes(config), attachments)
    chosen = kinds(args) if attachments is None else kinds(args)[1:]
    return [await bench.run(kind) for kind in chosen]


def postgres_problem(url: str, workdir: Path) -> str | None:
    """Why the PostgreSQL run cannot go ahead; None when it can."""
    config = write_config(workdir, url)
    if config.storage.postgres is None:
        return f"{url}: not read as a PostgreSQL URL by the configuration"
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (.venv/bin/pip install 'psycopg[binary]')"
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            (tables,) = conn.execute("SELECT count(*) FROM information_schema.tables"
                                     " WHERE table_schema = current_schema()").fetchone()
    except psycopg.Error as err:
        return f"cannot connect to {url}: {' '.join(str(err).split())}"
    if tables:
        return f"{url} is not empty ({tables} tables): give an empty, throwaway database"
    return None


async def prepare_postgres(url: str, workdir: Path) -> str | None:
    """Migrate the PostgreSQL database (a gateway started and stopped); why not, if not."""
    try:
        gw = Gateway(write_config(workdir, url))
        await gw.start(port=0)
        await gw.stop(grace=1)
    except Exception as err:  # noqa: BLE001 - the reason is the answer
        return f"{url}: the gateway does not start on it: {expected_failure(err) or err}"
    return None


async def run_postgres(args: argparse.Namespace, workdir: Path) -> list[Result]:
    config = write_config(workdir, args.database)
    bench = Bench(config, lambda: postgres_sizes(args.database, config))
    return [await bench.run(kind) for kind in kinds(args)]


async def main_async(args: argparse.Namespace) -> int:
    revision = git_revision(ROOT / "gateway")
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        workdir = Path(tmp)
        problem = None
        if args.database:
            (workdir / "pg").mkdir()
            problem = (postgres_problem(args.database, workdir / "pg")
                       or await prepare_postgres(args.database, workdir / "pg"))
            if problem:
                print(f"postgresql: {problem}", file=sys.stderr)
                return 1
        (workdir / "files").mkdir()
        (workdir / "blobs").mkdir()
        files = await run_sqlite(args, workdir / "files", None)
        blobs = await run_sqlite(args, workdir / "blobs", DatabaseAttachments())
        if args.keep:  # for a look at the database afterwards
            shutil.copy(workdir / "files" / "gw.db", args.keep)
        postgres = await run_postgres(args, workdir / "pg") if args.database else []
    print(f"s4e-gateway{revision}: disk growth per 1,000 reports")
    print_table("SQLite, attachments as files (the default):", files)
    print("database: pages in use after a checkpoint (the file itself was "
          f"{files[-1].grown.file_size / 1e6:.1f} MB: pages freed by cutting or dropping a raw"
          " are reused by the next mail)")
    print("* before: the raw mail kept whole in the database as well as every attachment's"
          " bytes (no cut, no dedup)")
    print_details(files, "SQLite")
    print()
    print_table("SQLite, attachments in the database (attachment_blobs, as with PostgreSQL):",
                blobs, files_label="(files)")
    for r, f in zip(blobs, files[1:], strict=True):
        print(f"  {r.kind.label}: {per_thousand(r.grown.database, r.kind.count)} in the database"
              f" against {per_thousand(f.grown.database + f.grown.files, f.kind.count)}"
              " as database + files")
    if postgres:
        print()
        print_table("PostgreSQL (tables with their indexes and TOAST, after VACUUM FULL):",
                    postgres)
        print_details(postgres, "PostgreSQL")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=int, default=300, help="text-only reports")
    parser.add_argument("--with-attachment", type=int, default=30,
                        help="reports per kind with an attachment")
    parser.add_argument("--attachment", type=int, default=1024 * 1024,
                        help="attachment size in bytes")
    parser.add_argument("--quick", action="store_true", help="40 + 5 reports per kind")
    parser.add_argument("--keep", metavar="FILE", help="keep a copy of the SQLite database")
    parser.add_argument("--database", metavar="URL",
                        help="also on this PostgreSQL database (postgresql://...; empty)")
    args = parser.parse_args(argv)
    if args.database and not args.database.startswith(("postgresql://", "postgres://")):
        parser.error("--database: a postgresql://user@host:port/db URL")
    if args.quick:
        args.text, args.with_attachment = 40, 5
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
