#!/usr/bin/env python3
"""Intake and end to end on PostgreSQL, one node and two, side by side with SQLite.

Three set-ups, alternating within each round, each on fresh storage:

* sqlite   one gateway on the embedded SQLite file (the default; synchronous=FULL);
* pg-1     one gateway on PostgreSQL;
* pg-2     two gateways (two nodes, `[cluster] node` mx1 and mx2) on one PostgreSQL
           database, the load split over both as two MX hosts would get it.

Every gateway is `python -m gateway serve` with `[processing] workers = "auto"`, all
relaying to one sink process that notes each acknowledgement (bench_end_to_end.py's).
PostgreSQL is a throwaway cluster on loopback (tests/pg_server.py) with fsync and
full_page_writes ON and synchronous_commit on: a commit is on disk before the 250, as
with SQLite's FULL. Everything shares this machine's cores: two nodes here show the
cost of coordination, not the gain of a second host.

Two figures per set-up and round:

* intake: 5 KB reports over 20 sessions (split over the nodes), one per connection,
  `--intake-count` of them, with processing running: messages/s answered 250, p99;
* end to end: the highest sustained rate of reports -> acknowledgements (as
  bench_end_to_end.py: all 250, all acknowledged once, p99 250 -> ack < 1 s, backlog
  at the end under one second's worth), stepping through `--rates`.

    python bench/bench_cluster.py             # 2 rounds
    python bench/bench_cluster.py --quick     # does it work
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _load  # noqa: E402
from _load import HOST, MessageTemplate, ServerProcess, percentile  # noqa: E402
from bench_end_to_end import (RateResult, offered_load, settle,  # noqa: E402
                              start_sink)

MODES = ("sqlite", "pg-1", "pg-2")


# --- storage --------------------------------------------------------------------------

@contextmanager
def postgres_server() -> Iterator[object]:
    """A throwaway cluster with durable commits (the tests' own has fsync off)."""
    from tests import pg_server

    original = dict(pg_server.SETTINGS)
    pg_server.SETTINGS.update({"fsync": "on", "full_page_writes": "on"})
    try:
        with pg_server.running_server() as server:
            yield server
    finally:
        pg_server.SETTINGS.clear()
        pg_server.SETTINGS.update(original)


_databases = iter(range(1, 10_000))


def fresh_database(server: object) -> str:
    import psycopg

    name = f"bench_{next(_databases)}"
    with psycopg.connect(server.url(), autocommit=True) as admin:  # type: ignore[attr-defined]
        admin.execute(f"CREATE DATABASE {name}")
    return server.url(name)  # type: ignore[attr-defined, no-any-return]


# --- gateways ---------------------------------------------------------------------------

def start_node(workdir: Path, name: str, database: str, sink_port: int) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = _load.free_port()
    config = workdir / "gateway.toml"
    config.write_text(
        f'[smtp]\nlisten = "{HOST}:{port}"\nhostname = "{name}.bench"\n'
        'max_connections = 1000\nmax_connections_per_ip = 1000\n'
        f'[storage]\ndatabase = "{database}"\nattachments = "{workdir}/att"\n'
        f'[outbound]\nrelay = "{HOST}:{sink_port}"\n'
        '[processing]\nworkers = "auto"\n'
        f'[cluster]\nnode = "{name}"\n')
    server = ServerProcess(name, [sys.executable, "-m", "gateway", "serve", "--config",
                                  str(config)], port, cwd=workdir,
                           env={"PYTHONPATH": str(HERE.parent), "PATH": "/usr/bin:/bin"},
                           log_path=workdir / "gateway.log")
    server.wait_ready(60)
    return server


def start_mode(mode: str, workdir: Path, sink_port: int, pg: object) -> list[ServerProcess]:
    if mode == "sqlite":
        return [start_node(workdir / "mx1", "mx1", f"{workdir}/gw.db", sink_port)]
    url = fresh_database(pg)
    names = ("mx1",) if mode == "pg-1" else ("mx1", "mx2")
    return [start_node(workdir / name, name, url, sink_port) for name in names]


# --- load -------------------------------------------------------------------------------

async def intake(ports: list[int], template: MessageTemplate, tag: str,
                 count: int) -> tuple[float, float]:
    """(messages/s answered 250, p99 seconds) with 20 sessions split over `ports`."""
    share = 20 // len(ports)
    started = time.perf_counter()
    results = await asyncio.gather(*(
        _load.run_load(port, template, f"{tag}p{port}", count=count // len(ports),
                       sessions=share, time_cap=120, server="gateway") for port in ports))
    elapsed = time.perf_counter() - started
    acked = sum(r.acked for r in results)
    latencies = [x for r in results for x in r.latencies]
    return acked / elapsed, percentile(latencies, 0.99)


async def one_mode(mode: str, round_no: int, args: argparse.Namespace, template: MessageTemplate,
                   pg: object) -> tuple[float, float, float, bool]:
    """(intake msg/s, intake p99, highest sustained e2e rate, exactly once)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"cluster-{mode}-", dir=args.dir))
    sink_port = _load.free_port()
    acks = workdir / "acks.tsv"
    sink = start_sink(sink_port, acks)
    exactly_once = True
    try:
        nodes = start_mode(mode, workdir, sink_port, pg)
        ports = [n.port for n in nodes]
        try:
            rate, p99 = await intake(ports, template, f"i{round_no}{mode}", args.intake_count)
            print(f"round {round_no + 1} {mode:6s} intake: {rate:5.0f} msg/s, p99 dot->250 "
                  f"{p99 * 1000:.1f} ms", flush=True)
        finally:
            for node in nodes:
                node.stop()
        top = 0.0
        for rate_step in args.rates:
            _load.wait_for_quiet(args.settle)
            nodes = start_mode(mode, workdir / f"r{int(rate_step)}", sink_port, pg)
            ports = [n.port for n in nodes]
            result = RateResult(mode, rate_step)
            try:
                tag = f"e{round_no}{mode}x{int(rate_step)}"
                await offered_load(ports, template, tag, rate_step, args.seconds,
                                   args.inflight, result)
                window_end = time.time()
                settle(result, acks, window_end, 30)
            finally:
                for node in nodes:
                    node.stop()
            exactly_once &= result.doubled == 0 and result.missing == 0
            print(f"round {round_no + 1} {mode:6s} {rate_step:5.0f}/s: 250 {len(result.accepted)}"
                  f"/{result.sent}, missing {result.missing}, doubled {result.doubled}, p99 "
                  f"{result.p99 * 1000:.0f} ms, backlog {result.backlog_end} -> "
                  f"{'sustained' if result.sustained else 'NOT sustained'}", flush=True)
            if not result.sustained:
                break
            top = rate_step
        return rate, p99, top, exactly_once
    finally:
        sink.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


async def main(args: argparse.Namespace) -> int:
    template = _load.message_5k()
    intake_rates: dict[str, list[float]] = {m: [] for m in MODES}
    intake_p99: dict[str, list[float]] = {m: [] for m in MODES}
    e2e: dict[str, list[float]] = {m: [] for m in MODES}
    exactly_once = True
    with postgres_server() as pg:
        for round_no in range(args.rounds):
            for mode in MODES:
                _load.wait_for_quiet(args.settle)
                rate, p99, top, once = await one_mode(mode, round_no, args, template, pg)
                intake_rates[mode].append(rate)
                intake_p99[mode].append(p99)
                e2e[mode].append(top)
                exactly_once &= once
    print()
    base_intake = statistics.median(intake_rates["sqlite"])
    base_e2e = statistics.median(e2e["sqlite"])
    for mode in MODES:
        rate = statistics.median(intake_rates[mode])
        top = statistics.median(e2e[mode])
        print(f"{mode:6s}: intake {rate:5.0f} msg/s ({rate / base_intake:.2f}x sqlite), "
              f"p99 {statistics.median(intake_p99[mode]) * 1000:.1f} ms; end to end "
              f"{top:.0f} reports/s ({top / base_e2e if base_e2e else float('nan'):.2f}x sqlite)"
              f"  [rounds: intake {', '.join(f'{r:.0f}' for r in intake_rates[mode])};"
              f" e2e {', '.join(f'{r:.0f}' for r in e2e[mode])}]")
    print(f"exactly one acknowledgement per report in every run: {exactly_once}")
    return 0 if exactly_once else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[20, 40, 60, 80, 100, 130, 160])
    parser.add_argument("--seconds", type=float, default=6.0, help="per rate")
    parser.add_argument("--intake-count", type=int, default=1500)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rates, args.seconds, args.intake_count = 1, [10, 20], 2.0, 200
        args.settle = 1.0
    return args


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    finally:
        ServerProcess.kill_all()
