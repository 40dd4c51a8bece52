"""Two gateways on one PostgreSQL database, each an MX host (SPEC: [storage] database =
"postgresql://..."; README "PostgreSQL"): real daemons (`python -m gateway serve` in
subprocesses, with their worker processes), a real PostgreSQL server of the tests' own
(tests/pg_server.py), real SMTP clients and one real relay sink both nodes send to.

What an operator is promised: the same message at both MX hosts is one ticket; a
node killed under load loses and doubles nothing (every 250'd report has one ticket
and one acknowledgement); a dead node's claim passes to another after its lease; the
timed jobs run on one node at a time."""

from __future__ import annotations

import asyncio
import os
import smtplib
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from gateway.config import ClusterConfig, OutboundConfig, StorageConfig
from gateway.daemon import Gateway
from gateway.errors import ConfigError
from tests.conftest import INTAKE, Sink, make_config, send, wait_for
from tests.pg_server import running_server
from tests.test_workers import _listening, answers_by_report, free_port, report, send_reports


@dataclass
class Node:
    name: str
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    folder: Path

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace")


def node_config(folder: Path, name: str, port: int, url: str, sink: Sink, *,
                workers: int = 1, lease: str = "60s", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "gw.toml"
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "{name}.gw.test"\n'
        f'[storage]\ndatabase = "{url}"\nattachments = "{folder}/att"\n'
        f'[outbound]\nrelay = "127.0.0.1:{sink.port}"\nretry_first = "1s"\nretry_max = "2s"\n'
        f'[processing]\nworkers = {workers}\n'
        f'[cluster]\nnode = "{name}"\nlease = "{lease}"\n'
        '[tickets]\nmax_auto_replies_per_hour = 10000\n' + extra)
    return config


async def start_node(folder: Path, name: str, url: str, sink: Sink, *, port: int | None = None,
                     **options: object) -> Node:
    port = port or free_port()
    config = node_config(folder, name, port, url, sink, **options)  # type: ignore[arg-type]
    log = folder / "daemon.log"
    with open(log, "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, cwd=folder, env=dict(os.environ))
    node = Node(name, proc, port, log, folder)
    try:
        await wait_for(lambda: _listening(port, proc), timeout=60)  # a loaded CI machine
    except AssertionError:
        raise AssertionError(f"node {name} did not start:\n{node.log_text()}") from None
    return node


async def stop_node(node: Node) -> None:
    if node.proc.returncode is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(node.proc.wait(), 30)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()


@asynccontextmanager
async def nodes(tmp_path: Path, url: str, sink: Sink, *names: str,
                **options: object) -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    try:
        for name in names:
            started.append(await start_node(tmp_path / name, name, url, sink, **options))
        yield started
    finally:
        for node in started:
            await stop_node(node)


def query(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def nothing_left_to_send(url: str) -> bool:
    """Every message processed and every outbox row sent: from then on the relay's
    counts are final. Waited for instead of a pause, which on a loaded CI machine may
    end before a late (doubled) mail would have come."""
    ((unsent,),) = query(url, "SELECT count(*) FROM outbox WHERE status <> 'sent'")
    ((open_,),) = query(url, "SELECT count(*) FROM inbound WHERE state NOT IN ('done', 'failed')")
    return unsent == 0 and open_ == 0


def tickets_by_reporter(url: str) -> Counter[str]:
    return Counter(str(email) for (email,) in query(url, "SELECT reporter_email FROM tickets"))


async def test_the_same_message_at_both_mx_hosts_is_one_ticket_and_one_answer(
        tmp_path: Path, pg_url: str, smtp_sink: Sink) -> None:
    async with in_process(tmp_path, pg_url, "mx1", smtp_sink) as mx1, \
            in_process(tmp_path, pg_url, "mx2", smtp_sink) as mx2:
        address, message_id, raw = report(1)
        # The sender's MTA tries both MX hosts (a timeout after DATA, then the other),
        # at the same moment: both answer 250, one message is stored.
        for _ in range(3):
            await asyncio.gather(send(mx1.port, address, [INTAKE], raw),
                                 send(mx2.port, address, [INTAKE], raw))
        await send(mx2.port, address, [INTAKE], raw)  # and a resend later
        await wait_for(lambda: answers_by_report(smtp_sink)[message_id] >= 1, timeout=30)
        await wait_for(lambda: nothing_left_to_send(pg_url), timeout=60)  # nothing more comes
        assert query(pg_url, "SELECT count(*) FROM inbound") == [(1,)]
        assert tickets_by_reporter(pg_url) == Counter({address: 1})
        assert answers_by_report(smtp_sink) == Counter({message_id: 1})


async def test_a_node_killed_under_load_loses_and_doubles_nothing(
        tmp_path: Path, pg_url: str, smtp_sink: Sink) -> None:
    async with nodes(tmp_path, pg_url, smtp_sink, "mx1", "mx2", lease="3s") as (mx1, mx2):
        first = asyncio.create_task(send_reports(mx1.port, range(0, 60), parallel=3))
        second = asyncio.create_task(send_reports(mx2.port, range(60, 120), parallel=3))
        await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= 10, timeout=60)
        mx1.proc.send_signal(signal.SIGKILL)  # the whole host gone: daemon first...
        await mx1.proc.wait()
        await asyncio.sleep(0.2)  # ... its orphaned workers notice and stop on their own
        accepted = await first + await second
        # The host comes back (same name, same folder) and takes its claims back.
        restarted = await start_node(mx1.folder, "mx1", pg_url, smtp_sink, lease="3s")
        try:
            await wait_for(lambda: sum(answers_by_report(smtp_sink).values()) >= len(accepted),
                           timeout=120)
            await wait_for(lambda: nothing_left_to_send(pg_url), timeout=60)  # nor doubled, late
        finally:
            await stop_node(restarted)
    # Every report the nodes answered 250 for: one ticket, one acknowledgement.
    answered = answers_by_report(smtp_sink)
    assert all(answered[m] == 1 for m in accepted), {m: answered[m] for m in accepted if answered[m] != 1}
    assert set(answered) <= set(accepted) | {m for m in answered if answered[m] == 1}
    reporters = tickets_by_reporter(pg_url)
    assert all(count == 1 for count in reporters.values()), reporters
    assert len(reporters) >= len(accepted)
    states = Counter(s for (s,) in query(pg_url, "SELECT state FROM inbound"))
    assert set(states) == {"done"}, states
    assert query(pg_url, "SELECT count(*) FROM outbox WHERE status <> 'sent'") == [(0,)]


def claimed_by_a_dead_node(url: str, n: int, lease: float) -> tuple[int, str, str]:
    """A report stored and claimed by node "mx1", which then died: its claim's lease
    ends `lease` seconds from now (negative: already over). Nothing renews it."""
    address, message_id, raw = report(n)
    now = datetime.now(UTC)
    ((inbound_id,),) = query(
        url, "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from,"
        " rcpt_tos, received_at, state, attempts, claimed_by, claimed_node, lease_until)"
        " VALUES (%s, %s, 's', %s, '127.0.0.1', %s, %s, %s, 'processing', 1, 0,"
        " 'mx1', %s) RETURNING id",
        (message_id, f"key-{n}", len(raw), address, f'["{INTAKE}"]', now.isoformat(),
         (now + timedelta(seconds=lease)).isoformat()))
    query(url, "INSERT INTO inbound_raw (id, raw) VALUES (%s, %s)", (inbound_id, raw))
    return inbound_id, address, message_id


async def test_a_claim_whose_node_died_is_taken_over_after_its_lease_and_not_before(
        tmp_path: Path, pg_url: str, smtp_sink: Sink) -> None:
    expired, address, message_id = claimed_by_a_dead_node(pg_url, 7, -1)
    running, _, still_leased = claimed_by_a_dead_node(pg_url, 8, 3600)
    async with nodes(tmp_path, pg_url, smtp_sink, "mx2", lease="2s") as (mx2,):
        await wait_for(lambda: answers_by_report(smtp_sink)[message_id] == 1, timeout=30)
        assert query(pg_url, "SELECT state, claimed_node, attempts FROM inbound WHERE id = %s",
                     (expired,)) == [("done", "mx2", 2)]
        assert "whose node's lease ran out: inbound " + str(expired) in mx2.log_text()
        await asyncio.sleep(3.0)  # more than mx2's own renewal interval
        # A claim whose lease still runs is another node's: never taken.
        assert query(pg_url, "SELECT state, claimed_node FROM inbound WHERE id = %s",
                     (running,)) == [("processing", "mx1")]
        assert answers_by_report(smtp_sink)[still_leased] == 0
    assert tickets_by_reporter(pg_url) == Counter({address: 1})


@asynccontextmanager
async def in_process(tmp_path: Path, url: str, node: str,
                     sink: Sink | None = None) -> AsyncIterator[Gateway]:
    """A node inside this process (workers = 0), for what needs no kill -9."""
    folder = tmp_path / node
    outbound = (OutboundConfig(relay=f"127.0.0.1:{sink.port}", retry_first="1s", retry_max="2s")
                if sink else OutboundConfig(maildir=folder / "outbox"))
    config = make_config(folder, storage=StorageConfig(database=url, attachments=folder / "att"),
                         cluster=ClusterConfig(node=node), outbound=outbound)
    gw = Gateway(config)
    gw.housekeeping_seconds = 3600  # the test runs the rounds itself
    try:
        await gw.start(port=0)
    except BaseException:
        await gw.stop(grace=0)  # what it had taken (its lock file, connections)
        raise
    try:
        yield gw
    finally:
        await gw.stop(grace=2)


async def test_the_timed_jobs_run_on_one_node_at_a_time(tmp_path: Path, pg_url: str) -> None:
    async with in_process(tmp_path, pg_url, "mx1") as mx1:
        async with in_process(tmp_path, pg_url, "mx2") as mx2:
            assert mx1.timed_jobs and mx2.timed_jobs
            # Both started a round at start-up; whichever asked first holds the jobs.
            ran = [await mx1.timed_jobs.run_once(), await mx2.timed_jobs.run_once()]
            ran += await asyncio.gather(mx1.timed_jobs.run_once(), mx2.timed_jobs.run_once())
            assert ran in ([True, False, True, False], [False, True, False, True]), ran
            holder, other = (mx1, mx2) if ran[0] else (mx2, mx1)
        if holder is mx2:  # the holder has stopped: the other one takes the jobs over
            assert await mx1.timed_jobs.run_once() is True
    if holder is mx1:
        async with in_process(tmp_path, pg_url, "mx2") as mx2:
            assert mx2.timed_jobs and await mx2.timed_jobs.run_once() is True


async def test_a_second_gateway_under_the_same_node_name_is_refused(
        tmp_path: Path, pg_url: str) -> None:
    async with in_process(tmp_path, pg_url, "mx1"):
        with pytest.raises(ConfigError) as refused:
            async with in_process(tmp_path / "elsewhere", pg_url, "mx1"):
                pass
    assert str(refused.value) == ("cluster.node: another running gateway uses the node name "
                                  "'mx1' on this database; give each gateway its own name")
    async with in_process(tmp_path / "elsewhere", pg_url, "mx1"):  # free again once stopped
        pass


async def test_while_postgresql_is_down_intake_answers_451_and_everything_recovers(
        tmp_path: Path, smtp_sink: Sink, pg_server: object) -> None:
    """A server of this test's own (`pg_server` only for its skip when PostgreSQL is
    absent), stopped and started under a running gateway: no 250 without a commit, no
    message marked failed, no restart of the gateway."""
    with running_server() as server:
        query(server.url(), "CREATE DATABASE down")
        url = server.url("down")
        async with in_process(tmp_path, url, "mx1", smtp_sink) as gw:
            before, before_id, raw = report(1)
            await send(gw.port, before, [INTAKE], raw)
            await wait_for(lambda: answers_by_report(smtp_sink)[before_id] == 1, timeout=30)
            server.stop()
            address, message_id, raw = report(2)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                await send(gw.port, address, [INTAKE], raw)
            assert refused.value.smtp_code == 451  # the sender's MTA tries again later
            server.start_again()
            await send(gw.port, address, [INTAKE], raw)  # that later try
            await wait_for(lambda: answers_by_report(smtp_sink)[message_id] == 1, timeout=60)
        assert Counter(s for (s,) in query(url, "SELECT state FROM inbound")) == {"done": 2}
        assert tickets_by_reporter(url) == Counter({before: 1, address: 1})


async def test_a_connection_lost_inside_a_transaction_is_never_finished_on_a_new_one(
        pg_url: str) -> None:
    """The server ends the session mid-transaction (a restart, a fail-over): what the
    transaction did is gone, and its remaining statements must fail rather than
    commit one by one on the fresh connection; after the ROLLBACK it works again."""
    import sqlite3

    from gateway import store

    conn = await store.connect(pg_url)
    try:
        ((pid,),) = await conn.execute_fetchall("SELECT pg_backend_pid()")
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO settings (key, value) VALUES ('a', '1')")
        query(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(sqlite3.OperationalError, match="postgresql: unavailable"):
            await conn.execute("INSERT INTO settings (key, value) VALUES ('b', '2')")
        with pytest.raises(sqlite3.OperationalError, match="lost during the transaction"):
            await conn.execute("INSERT INTO settings (key, value) VALUES ('c', '3')")
        await conn.execute("ROLLBACK")
        await conn.execute("INSERT INTO settings (key, value) VALUES ('d', '4')")  # autocommit
        assert query(pg_url, "SELECT key FROM settings WHERE key IN ('a', 'b', 'c', 'd')") == [("d",)]
    finally:
        await conn.close()
