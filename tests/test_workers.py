"""Processing in worker processes ([processing] workers): the daemon as operators run it
(`python -m gateway serve` in a subprocess), with a real relay sink, real SMTP clients
and real signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import INTAKE, REPORT_BODY, Sink, make_mail, send, wait_for

RUNNING = re.compile(r"(\d+) processing worker\(s\) running: pid ([\d, ]+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    config: Path

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace")

    def worker_pids(self) -> list[int]:
        """The pids of the latest "N processing worker(s) running" line."""
        found = RUNNING.findall(self.log_text())
        assert found, self.log_text()
        return [int(p) for p in found[-1][1].split(",")]

    def children(self) -> set[int]:
        pids: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            text = (task / "children").read_text().split()
            pids.update(int(p) for p in text)
        return pids


def write_config(tmp_path: Path, port: int, sink: Sink, workers: int | str) -> Path:
    config = tmp_path / "gw.toml"
    workers_value = f'"{workers}"' if isinstance(workers, str) else workers
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "gw.test"\n'
        f'[storage]\ndatabase = "{tmp_path}/gw.db"\nattachments = "{tmp_path}/att"\n'
        f'[outbound]\nrelay = "127.0.0.1:{sink.port}"\nretry_first = "1s"\nretry_max = "2s"\n'
        f'[processing]\nworkers = {workers_value}\n'
        '[tickets]\nmax_auto_replies_per_hour = 10000\n')
    return config


@asynccontextmanager
async def daemon(tmp_path: Path, sink: Sink, workers: int | str = 2,
                 env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    port = free_port()
    config = write_config(tmp_path, port, sink, workers)
    log = tmp_path / "daemon.log"
    with open(log, "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, cwd=tmp_path,
            env={**os.environ, **(env or {})})
    running = Daemon(proc, port, log, config)
    try:
        await wait_for(lambda: _listening(port, proc), timeout=60)  # a loaded CI machine
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _listening(port: int, proc: asyncio.subprocess.Process) -> bool:
    if proc.returncode is not None:
        raise AssertionError("daemon exited")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            return sock.recv(100).startswith(b"220")
    except OSError:
        return False


def report(n: int) -> tuple[str, str, bytes]:
    """A complete report of its own sender (so each gets its own acknowledgement)."""
    address = f"user{n}@example.com"
    message_id = f"<report-{n}@example.com>"
    body = REPORT_BODY.replace("jan.kowalski@example.com", address)
    return address, message_id, make_mail(sender=f"User {n} <{address}>", body=body,
                                          message_id=message_id)


def answers_by_report(sink: Sink) -> Counter[str]:
    """How many mails the relay got in reply to each report."""
    counts: Counter[str] = Counter()
    for msg in sink.parsed():
        if msg["In-Reply-To"]:
            counts[str(msg["In-Reply-To"]).strip()] += 1
    return counts


def tickets(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT number, reporter_email FROM tickets ORDER BY number").fetchall()


def inbound_states(db: Path) -> Counter[str]:
    with sqlite3.connect(db) as conn:
        return Counter(s for (s,) in conn.execute("SELECT state FROM inbound"))


def nothing_left_to_send(db: Path) -> bool:
    """Every message processed and every outbox row sent: from then on the relay's
    counts are final. Waited for instead of a pause, which on a loaded CI machine may
    end before a late (doubled) mail would have come."""
    with sqlite3.connect(db) as conn:
        (unsent,), = conn.execute("SELECT count(*) FROM outbox WHERE status != 'sent'")
        (open_,), = conn.execute(
            "SELECT count(*) FROM inbound WHERE state NOT IN ('done', 'failed')")
    return unsent == 0 and open_ == 0


async def send_reports(port: int, numbers: range, parallel: int = 4) -> list[str]:
    """Send the reports over `parallel` connections; the Message-IDs answered 250."""
    accepted: list[str] = []
    queue = list(numbers)

    async def client() -> None:
        while queue:
            n = queue.pop(0)
            address, message_id, raw = report(n)
            try:
                await send(port, address, [INTAKE], raw)
            except Exception:  # noqa: BLE001 - not acknowledged: not counted
                continue
            accepted.append(message_id)

    await asyncio.gather(*(client() for _ in range(parallel)))
    return accepted


async def test_workers_process_every_report_once_and_the_smtp_process_only_accepts(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with daemon(tmp_path, smtp_sink, workers=2) as gw:
        pids = gw.worker_pids()
        assert len(pids) == 2 and set(pids) <= gw.children()
        # Both workers are stopped while the mail comes in: the SMTP process accepts
        # alone, and a backlog is there for both to share (a worker that has just
        # finished would otherwise win every race for a light trickle of mail).
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            accepted = await send_reports(gw.port, range(40))
            assert len(accepted) == 40
            assert inbound_states(tmp_path / "gw.db") == Counter({"queued": 40})
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= 40, timeout=60)
        await wait_for(lambda: nothing_left_to_send(tmp_path / "gw.db"), timeout=60)
    assert gw.proc.returncode == 0
    assert answers_by_report(smtp_sink) == Counter({m: 1 for m in accepted})
    assert sorted(email for _, email in tickets(tmp_path / "gw.db")) == sorted(
        f"user{n}@example.com" for n in range(40))
    assert inbound_states(tmp_path / "gw.db") == Counter({"done": 40})
    text = gw.log_text()
    # Both workers did some of the work, and said so in their own log lines.
    assert "[worker 0]" in text and "[worker 1]" in text
    assert "Traceback" not in text
    # The SMTP process itself routed nothing.
    assert not re.search(r"^<\d>INFO gateway\.stages", text, re.M)
    for pid in pids:  # SIGTERM stopped the workers with the daemon
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def test_a_killed_worker_is_started_again_and_nothing_is_lost_or_doubled(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with daemon(tmp_path, smtp_sink, workers=2) as gw:
        first = gw.worker_pids()
        sending = asyncio.create_task(send_reports(gw.port, range(60)))
        await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= 5, timeout=60)
        os.kill(first[1], signal.SIGKILL)  # mid-load
        accepted = await sending
        await wait_for(lambda: len(RUNNING.findall(gw.log_text())) >= 1
                       and "exited with signal SIGKILL" in gw.log_text(), timeout=30)
        await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= len(accepted),
                       timeout=90)
        # The worker is back: the daemon's children include a new worker process.
        await wait_for(lambda: len(gw.children() - {first[0]}) >= 1 and first[1] not in gw.children(),
                       timeout=30)
        await wait_for(lambda: nothing_left_to_send(tmp_path / "gw.db"), timeout=60)
    assert gw.proc.returncode == 0
    assert len(accepted) == 60
    assert answers_by_report(smtp_sink) == Counter({m: 1 for m in accepted})
    assert len(tickets(tmp_path / "gw.db")) == 60
    assert inbound_states(tmp_path / "gw.db") == Counter({"done": 60})
    assert "processing worker 1" in gw.log_text() and "starting it again" in gw.log_text()


async def test_ready_is_sent_after_the_workers_are_up(tmp_path: Path, smtp_sink: Sink) -> None:
    notify = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with daemon(tmp_path, smtp_sink, workers=2,
                          env={"NOTIFY_SOCKET": str(notify)}) as gw:
            while True:
                datagram = (await asyncio.wait_for(loop.sock_recv(server, 4096), 30)).decode()
                if "READY=1" in datagram:
                    break
            # At READY both workers had reported ready: their pids are logged, alive.
            pids = gw.worker_pids()
            assert len(pids) == 2 and set(pids) <= gw.children()
    finally:
        server.close()


async def test_killing_the_daemon_stops_its_workers_and_a_new_one_resumes(
        tmp_path: Path, smtp_sink: Sink) -> None:
    async with daemon(tmp_path, smtp_sink, workers=1) as gw:
        pids = gw.worker_pids()
        accepted = await send_reports(gw.port, range(30))
        gw.proc.kill()  # kill -9 of the daemon only: its worker notices and stops
        await gw.proc.wait()
        await wait_for(lambda: not any(_alive(p) for p in pids), timeout=30)
    async with daemon(tmp_path, smtp_sink, workers=1):
        await wait_for(lambda: inbound_states(tmp_path / "gw.db") == Counter({"done": 30}),
                       timeout=60)
        await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= 30, timeout=60)
        await wait_for(lambda: nothing_left_to_send(tmp_path / "gw.db"), timeout=60)
    assert len(accepted) == 30
    # At least once toward the relay (a kill between the relay's 250 and the mark may
    # send one again), but one ticket per report and never two different answers.
    assert len(tickets(tmp_path / "gw.db")) == 30
    assert set(answers_by_report(smtp_sink)) == set(accepted)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status


@pytest.mark.parametrize("value, message", [
    ("-1", "processing.workers: expected \"auto\" or a number of processes 0-64, got -1"),
    ('"many"', "processing.workers: expected \"auto\" or a number of processes 0-64, got 'many'"),
])
def test_a_wrong_workers_value_is_one_line_naming_the_key(tmp_path: Path, value: str,
                                                          message: str) -> None:
    import subprocess

    config = tmp_path / "gw.toml"
    config.write_text(f"[processing]\nworkers = {value}\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


async def test_sigterm_with_a_backlog_leaves_nothing_half_done(tmp_path: Path,
                                                               smtp_sink: Sink) -> None:
    async with daemon(tmp_path, smtp_sink, workers=2) as gw:
        pids = gw.worker_pids()
        accepted = await send_reports(gw.port, range(40), parallel=8)
        gw.proc.send_signal(signal.SIGTERM)  # with most of the 40 still queued
        assert await asyncio.wait_for(gw.proc.wait(), 60) == 0
    assert not any(_alive(p) for p in pids)
    states = inbound_states(tmp_path / "gw.db")
    # Each message is either done (its ticket and answer committed together) or still
    # queued for the next start; none is left claimed.
    assert set(states) <= {"done", "queued"} and sum(states.values()) == len(accepted) == 40
    with sqlite3.connect(tmp_path / "gw.db") as conn:
        done_without_answer = conn.execute(
            "SELECT count(*) FROM inbound i WHERE state = 'done' AND NOT EXISTS"
            " (SELECT 1 FROM outbox o WHERE o.inbound_id = i.id)").fetchone()[0]
    assert done_without_answer == 0
    async with daemon(tmp_path, smtp_sink, workers=2):
        await wait_for(lambda: inbound_states(tmp_path / "gw.db") == Counter({"done": 40}),
                       timeout=60)
        await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= 40, timeout=60)
        await wait_for(lambda: nothing_left_to_send(tmp_path / "gw.db"), timeout=60)
    assert answers_by_report(smtp_sink) == Counter({m: 1 for m in accepted})


def test_the_checkpointer_copies_the_log_and_only_when_something_was_committed(
        tmp_path: Path) -> None:
    from gateway.direct_connection import Checkpointer

    db = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA wal_autocheckpoint = 0")  # as the workers and intake run
    db.execute("CREATE TABLE t (v TEXT)")
    checkpointer = Checkpointer(tmp_path / "x.db")
    try:
        for _ in range(50):
            db.execute("INSERT INTO t VALUES (?)", ("x" * 4000,))
        main_file = tmp_path / "x.db"
        assert main_file.stat().st_size < 50_000  # the rows are only in the log yet
        assert checkpointer.run_once()
        assert main_file.stat().st_size > 200_000  # copied into the database
        assert not checkpointer.run_once()  # no commit since: no work
        db.execute("INSERT INTO t VALUES ('y')")
        assert checkpointer.run_once()
    finally:
        checkpointer.close()
        db.close()
