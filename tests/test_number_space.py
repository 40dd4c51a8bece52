"""The six-digit ticket numbers (#17): the gauge of numbers left, the warning from
80 % used (log at start and when crossed, check-config), and what a report meets when
none is left: it is stored, fails with one clear line, and follow-ups still work.

The databases are filled by direct SQL: 720,000 or 900,000 ticket rows."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path


from gateway import store
from gateway.config import load_config
from gateway.daemon import Gateway
from gateway.number_space import NumberSpaceWatch, warning
from tests.conftest import (REPORT_BODY, Desk, make_mail, run_cli_sync, wait_for,
                            write_config)
from tests.test_operations import scrape, samples

LEFT = "s4e_gateway_ticket_numbers_left"
OLD = "2026-01-01T00:00:00+00:00"


async def filled(db: Path, numbers: tuple[int, int], *, keep_free: int | None = None,
                 recent: int = 0) -> None:
    """A migrated database whose tickets take every number from numbers[0] to
    numbers[1] (but `keep_free`); the last `recent` of them made today."""
    conn = await store.connect(db)
    await store.migrate(conn)
    await conn.close()
    raw = sqlite3.connect(db, isolation_level=None)
    try:
        raw.execute("PRAGMA synchronous = OFF")
        (trigger,) = raw.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'ticket_search_insert'").fetchone()
        raw.execute("BEGIN")
        raw.execute("DROP TRIGGER ticket_search_insert")  # no search rows for filler tickets
        raw.execute(
            "WITH RECURSIVE n(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM n WHERE x < ?)"
            " INSERT INTO tickets (number, status, subject, reporter_email, created_at, updated_at)"
            " SELECT x, 'closed', 'old', 'old@example.com', ?, ? FROM n WHERE x IS NOT ?",
            (*numbers, OLD, OLD, keep_free))
        raw.execute("UPDATE tickets SET created_at = ? WHERE number > ?",
                    (store.iso(store.utcnow()), numbers[1] - recent))
        raw.execute(trigger)
        raw.execute("COMMIT")
    finally:
        raw.close()


@asynccontextmanager
async def desk_on(tmp_path: Path) -> AsyncIterator[Desk]:
    path = write_config(tmp_path, '[metrics]\nlisten = "127.0.0.1:0"\n')
    gw = Gateway(load_config(path), housekeeping_seconds=0.2)
    await gw.start(port=0)
    try:
        yield Desk(gw, path)
    finally:
        await gw.stop(grace=1)


async def rounds(desk: Desk, count: int) -> None:
    """`count` rounds of the daemon's own timed jobs, one after another."""
    assert desk.gw.timed_jobs is not None
    for _ in range(count):
        await desk.gw.timed_jobs.run_once()


class Recorded(logging.Handler):
    """What these loggers said at WARNING and above. On the loggers themselves, not the
    root: the in-process CLI replaces the root's handlers (caplog's among them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def recorded(*names: str) -> Iterator[Recorded]:
    handler = Recorded()
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        yield handler
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)


def said(log: Recorded) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "gateway.number_space"]


def report(n: int) -> bytes:
    return make_mail(body=REPORT_BODY, message_id=f"<r{n}@example.com>")


async def test_crossing_80_percent_is_said_once_and_the_gauge_counts_down(
        tmp_path: Path) -> None:
    await filled(tmp_path / "gw.db", (100_000, 100_000 + 720_000 - 2), recent=2999)  # 719,999
    code, _, err = await asyncio.to_thread(run_cli_sync, "check-config", "--config",
                                           str(write_config(tmp_path)))
    assert code == 0 and "ticket numbers" not in err  # below 80 %: nothing to say
    with recorded("gateway.number_space") as logged:
        async with desk_on(tmp_path) as desk:
            assert samples((await scrape(desk.gw))[2])[LEFT] == 180_001
            # Rounds of the timed jobs at 79.99 %, run here rather than waited for: a
            # pause may hold no round at all on a loaded CI machine.
            await rounds(desk, 2)
            assert said(logged) == []
            first = await desk.mail(report(1))
            assert first["outcome"] == "new"
            assert samples((await scrape(desk.gw))[2])[LEFT] == 180_000
            await wait_for(lambda: said(logged))
            (line,) = said(logged)
            assert line.startswith("ticket numbers: 720,000 of 900,000 six-digit numbers used "
                                   "(80.0%), 180,000 left; at the last 30 days' pace (100 a day)"
                                   " about 1,800 days")
            assert "When the ticket numbers run out" in line
            await desk.mail(report(2))
            await rounds(desk, 2)  # more rounds, another ticket: not said again
            assert len(said(logged)) == 1
            assert samples((await scrape(desk.gw))[2])[LEFT] == 179_999
    # check-config says it too, and still exits 0 (a warning, not a configuration error).
    code, out, err = await asyncio.to_thread(run_cli_sync, "check-config", "--config",
                                             str(write_config(tmp_path)))
    assert code == 0 and "config ok" in out
    assert "warning: ticket numbers: 720,001 of 900,000 six-digit numbers used (80.0%)" in err


async def test_a_restart_above_80_percent_says_it_at_start(
        tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    await filled(db, (100_000, 100_000 + 810_000 - 1))  # 90 %, no recent tickets
    conn = await store.connect(db)
    try:
        watch = NumberSpaceWatch()
        with recorded("gateway.number_space") as logged:
            await watch.check(conn, store.utcnow())
            await watch.check(conn, store.utcnow())
        (line,) = said(logged)
        assert line == ("ticket numbers: 810,000 of 900,000 six-digit numbers used (90.0%), "
                        "90,000 left: see README, \"When the ticket numbers run out\"")
    finally:
        await conn.close()


async def test_the_last_number_is_found_and_then_reports_are_kept_but_fail(
        tmp_path: Path) -> None:
    await filled(tmp_path / "gw.db", (100_000, 999_999), keep_free=543_210)
    with recorded("gateway.number_space", "gateway.processor") as logged:
        async with desk_on(tmp_path) as desk:
            assert samples((await scrape(desk.gw))[2])[LEFT] == 1
            # The one number left is found, though random draws all but never hit it.
            last = await desk.mail(report(1))
            assert (last["outcome"], last["ticket"]) == ("new", "543210")
            assert samples((await scrape(desk.gw))[2])[LEFT] == 0
            # Now none is left: the report is stored (250), fails with one clear line.
            lost = await desk.mail(report(2))
            assert lost["outcome"] == "failed" and lost["ticket"] is None
            failed = await desk.cli_json("inbox", "list", "--outcome", "failed")
            assert [r["id"] for r in failed] == [lost["id"]]
            shown = await desk.cli_json("inbox", "show", str(lost["id"]))
            assert "no ticket number left: all 900,000 six-digit numbers are taken" in shown["error"]
            lines = [r for r in logged.records if r.name == "gateway.processor"
                     and "outcome=failed" in r.getMessage()]
            assert len(lines) == 1 and lines[0].exc_info is None  # one line, no traceback
            assert "<r2@example.com> inbound" in lines[0].getMessage()
            # The timed jobs say it as an error.
            await wait_for(lambda: any("all 900,000 six-digit numbers are used" in m
                                       for m in said(logged)))
            # A follow-up to an existing ticket needs no new number: it still goes through.
            follow = await desk.mail(make_mail(subject="Re: [#543210] Awaria serwera",
                                               body="Jeszcze jedno: dysk 2 też.",
                                               message_id="<f1@example.com>"))
            assert (follow["outcome"], follow["ticket"]) == ("follow_up", "543210")
    code, _, err = await asyncio.to_thread(run_cli_sync, "check-config", "--config",
                                           str(write_config(tmp_path)))
    assert code == 0 and "warning: ticket numbers: all 900,000 six-digit numbers are used" in err


def test_the_warning_reads_the_pace() -> None:
    assert warning(store.NumberSpace(719_999, 0)) is None
    assert warning(store.NumberSpace(720_000, 0)) is not None
    text = warning(store.NumberSpace(880_000, 300_000))  # 10,000 a day, 20,000 left
    assert text is not None and "97.8%" in text and "(10,000 a day) about 2 days:" in text
    text = warning(store.NumberSpace(890_000, 300_000))
    assert text is not None and "(10,000 a day) about 1 day:" in text
    text = warning(store.NumberSpace(895_000, 300_000))
    assert text is not None and "(10,000 a day) less than a day:" in text
