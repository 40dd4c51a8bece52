#!/usr/bin/env python3
"""End to end: reports in by SMTP -> acknowledgements out at the relay sink.

Three processes besides this one (the client): the gateway (`python -m gateway serve`,
SQLite on the real disk, WAL, synchronous=FULL), and a relay sink (aiosmtpd that notes
when each acknowledgement arrived and which report it answers, by In-Reply-To). The
gateway runs in two modes side by side, alternating rounds:

* workers   `[processing] workers = "auto"` (the default: processing in its own
            process(es), one per core beyond the first);
* inline    `[processing] workers = 0` (processing on the SMTP process's event loop,
            as before the workers existed: the baseline).

Open load: reports arrive at a fixed rate R for `--seconds` (each on a new connection,
at most `--inflight` sessions at once). A rate is *sustained* when every report was
answered 250, every acknowledgement arrived, p99 of 250 -> acknowledgement is under
1 s and the backlog at the end of the window is under one second's worth of reports.
Each round steps R up through `--rates` until a rate is not sustained; the highest
sustained rate is the round's figure. Every round checks that each report got exactly
one acknowledgement.

Then the burst: `--burst` reports (default 10,000) as fast as 20 sessions deliver them,
to the workers mode: the time until the last acknowledgement.

For the ratio the issue asks for, bare aiosmtpd's intake rate (5 KB, 20 sessions, no
storage: bench/_load.py bare-server) is measured in the same run.

    python bench/bench_end_to_end.py              # 3 rounds per mode + the burst
    python bench/bench_end_to_end.py --quick      # a short check that it works
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402
from _load import HOST, MessageTemplate, ServerProcess, deliver, percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL_RATE = 350.0
GOAL_BARE_RATIO = 0.3
GOAL_BURST_SECONDS = 60.0


# --- the relay sink (its own process) ------------------------------------------------

def sink_main(port: int, out: Path) -> None:
    """aiosmtpd on `port`; per mail one line "arrival-time<TAB>In-Reply-To" in `out`."""
    from email.parser import BytesHeaderParser

    from aiosmtpd.smtp import SMTP

    headers = BytesHeaderParser()
    log = open(out, "a", buffering=1)

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            now = time.time()
            raw = envelope.original_content or b""  # type: ignore[attr-defined]
            parent = headers.parsebytes(raw).get("In-Reply-To", "") or ""
            log.write(f"{now:.6f}\t{' '.join(parent.split())}\n")
            return "250 2.0.0 Ok"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Handler(), hostname="sink.bench", enable_SMTPUTF8=True), HOST, port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_sink(port: int, out: Path) -> ServerProcess:
    sink = ServerProcess("sink", [sys.executable, __file__, "sink", "--port", str(port),
                                  "--out", str(out)], port)
    sink.wait_ready()
    return sink


def read_acks(out: Path) -> list[tuple[float, str]]:
    rows = []
    for line in out.read_text().splitlines():
        when, _, parent = line.partition("\t")
        rows.append((float(when), parent))
    return rows


# --- the gateway ------------------------------------------------------------------------

def start_gateway(workdir: Path, port: int, sink_port: int, workers: str) -> ServerProcess:
    config = workdir / "gateway.toml"
    config.write_text(
        f'[smtp]\nlisten = "{HOST}:{port}"\nhostname = "gw.bench"\n'
        # every client is 127.0.0.1 here: the per-address cap would refuse the load
        'max_connections = 1000\nmax_connections_per_ip = 1000\n'
        f'[storage]\ndatabase = "{workdir}/gw.db"\nattachments = "{workdir}/att"\n'
        f'[outbound]\nrelay = "{HOST}:{sink_port}"\n'
        # Each report has a customer of its own (_load.customer): the default cap.
        f'[processing]\nworkers = {workers}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = ServerProcess("gateway", [sys.executable, "-m", "gateway", "serve", "--config",
                                       str(config)], port, cwd=workdir, env=env,
                           log_path=workdir / "gateway.log")
    server.wait_ready(60)
    return server


# --- one rate -----------------------------------------------------------------------------

@dataclass
class RateResult:
    mode: str
    rate: float
    sent: int = 0
    accepted: dict[str, float] = field(default_factory=dict)  # Message-ID -> 250 time
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    missing: int = 0
    doubled: int = 0
    backlog_end: int = 0

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def sustained(self) -> bool:
        return (self.errors == 0 and self.missing == 0 and self.doubled == 0
                and self.p99 < 1.0 and self.backlog_end <= max(self.rate, 1))


def message_id_of(tag: str, n: int) -> str:
    return f"<{tag}.{n}@bench.example.com>"


async def offered_load(port: int | list[int], template: MessageTemplate, tag: str, rate: float,
                       seconds: float, inflight: int, result: RateResult) -> None:
    """Reports arriving every 1/rate s for `seconds`, at most `inflight` at once;
    with several ports (gateways), each report to the next in turn."""
    ports = port if isinstance(port, list) else [port]
    gate = asyncio.Semaphore(inflight)
    start = time.perf_counter()
    count = int(rate * seconds)
    tasks = []

    async def one(n: int) -> None:
        async with gate:
            try:
                await asyncio.wait_for(deliver(ports[n % len(ports)], template.make(tag, n),
                                               template.size), 30)
            except Exception as err:  # noqa: BLE001 - a rate with errors is not sustained
                result.errors += 1
                kind = f"{type(err).__name__}: {err}"[:80]
                result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
                return
            result.accepted[message_id_of(tag, n)] = time.time()

    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
        result.sent += 1
    await asyncio.gather(*tasks)


def settle(result: RateResult, acks_file: Path, window_end: float, wait: float) -> None:
    """Wait (at most `wait` s) for every acknowledgement; then score the rate."""
    deadline = time.monotonic() + wait
    while True:
        acks = [(t, p) for t, p in read_acks(acks_file) if p in result.accepted]
        if len(acks) >= len(result.accepted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    seen: dict[str, float] = {}
    for when, parent in acks:
        if parent in seen:
            result.doubled += 1
            continue
        seen[parent] = when
    result.missing = len(set(result.accepted) - set(seen))
    result.latencies = [seen[m] - t for m, t in result.accepted.items() if m in seen]
    result.backlog_end = sum(1 for m, t in result.accepted.items()
                             if t <= window_end and seen.get(m, float("inf")) > window_end)


async def run_rate(mode: str, workers: str, rate: float, args: argparse.Namespace,
                   template: MessageTemplate, round_no: int) -> RateResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"e2e-{mode}-", dir=args.dir))
    sink_port, port = _load.free_port(), _load.free_port()
    acks = workdir / "acks.tsv"
    sink = start_sink(sink_port, acks)
    gateway = start_gateway(workdir, port, sink_port, workers)
    result = RateResult(mode, rate)
    try:
        warm = RateResult(mode, 20)  # not counted: imports, first connections
        await offered_load(port, template, f"warm{round_no}", 20, 1.0, args.inflight, warm)
        settle(warm, acks, time.time(), 20)
        await offered_load(port, template, f"r{round_no}x{int(rate)}", rate, args.seconds,
                           args.inflight, result)
        window_end = time.time()
        settle(result, acks, window_end, 30)
    finally:
        gateway.stop()
        sink.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


async def burst(args: argparse.Namespace, template: MessageTemplate,
                workers: str = '"auto"') -> tuple[float, int, int, int]:
    """(seconds to the last acknowledgement, accepted, acknowledged, doubled)."""
    workdir = Path(tempfile.mkdtemp(prefix="e2e-burst-", dir=args.dir))
    sink_port, port = _load.free_port(), _load.free_port()
    acks = workdir / "acks.tsv"
    sink = start_sink(sink_port, acks)
    gateway = start_gateway(workdir, port, sink_port, workers)
    try:
        started = time.time()
        load = await _load.run_load(port, template, "burst", count=args.burst, sessions=20,
                                    time_cap=600, server="gateway")
        ids = {message_id_of("burst", n) for n in range(load.sent)}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            got = [(t, p) for t, p in read_acks(acks) if p in ids]
            if len(got) >= load.acked:
                break
            time.sleep(0.2)
        parents = [p for _, p in got]
        last = max((t for t, _ in got), default=started)
        return last - started, load.acked, len(set(parents)), len(parents) - len(set(parents))
    finally:
        gateway.stop()
        sink.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


async def bare_rate(args: argparse.Namespace, template: MessageTemplate) -> float:
    port = _load.free_port()
    bare = _load.start_bare(port)
    try:
        await _load.run_load(port, template, "bwarm", count=100, sessions=20, time_cap=30)
        result = await _load.run_load(port, template, "bare", count=args.bare_count,
                                      sessions=20, time_cap=60, server="bare")
        return result.rate
    finally:
        bare.stop()


async def main(args: argparse.Namespace) -> int:
    template = _load.message_5k()
    modes = {m: w for m, w in {"workers": '"auto"', "inline": "0"}.items() if m in args.modes}
    best: dict[str, list[float]] = {m: [] for m in modes}
    p99s: dict[str, list[float]] = {m: [] for m in modes}
    bares: list[float] = []
    exactly_once = True
    for round_no in range(args.rounds):
        _load.wait_for_quiet(args.settle)
        bares.append(await bare_rate(args, template))
        for mode, workers in modes.items():
            top, top_p99 = 0.0, float("nan")
            for rate in args.rates:
                _load.wait_for_quiet(args.settle)
                r = await run_rate(mode, workers, rate, args, template, round_no)
                exactly_once &= r.doubled == 0 and r.missing == 0
                print(f"round {round_no + 1} {mode:7s} {rate:5.0f}/s: sent {r.sent}, 250 "
                      f"{len(r.accepted)}, errors {r.errors}, missing {r.missing}, doubled "
                      f"{r.doubled}, p50 {percentile(r.latencies, 0.5) * 1000:.0f} ms, p99 "
                      f"{r.p99 * 1000:.0f} ms, backlog at end {r.backlog_end}"
                      f" -> {'sustained' if r.sustained else 'NOT sustained'}", flush=True)
                if r.error_kinds:
                    print(f"    errors: {r.error_kinds}")
                if not r.sustained:
                    break
                top, top_p99 = rate, r.p99
            best[mode].append(top)
            p99s[mode].append(top_p99)
    if bares:
        report_rates(modes, bares, best)
    for workers in args.burst_workers if args.burst else ():
        _load.wait_for_quiet(args.settle)
        seconds, accepted, answered, doubled = await burst(args, template, workers)
        exactly_once &= doubled == 0 and answered == accepted
        print(f"burst of {args.burst} (workers = {workers}): {accepted} answered 250, "
              f"{answered} acknowledged, {doubled} doubled, last acknowledgement after "
              f"{seconds:.1f} s (goal < {GOAL_BURST_SECONDS:.0f} s: "
              f"{'MET' if seconds < GOAL_BURST_SECONDS and answered == accepted else 'MISSED'})",
              flush=True)
    print(f"exactly one acknowledgement per report in every run: {exactly_once}")
    print(json.dumps({"bare": bares, "best": best, "p99": p99s}))
    return 0 if exactly_once else 1


def report_rates(modes: dict[str, str], bares: list[float], best: dict[str, list[float]]) -> None:
    bare = statistics.median(bares)
    print()
    print(f"bare aiosmtpd intake, 5 KB, 20 sessions: {bare:.0f} msg/s (rounds: "
          f"{', '.join(f'{b:.0f}' for b in bares)})")
    for mode in modes:
        rate = statistics.median(best[mode])
        print(f"{mode:7s}: highest sustained {rate:.0f} reports/s (rounds: "
              f"{', '.join(f'{b:.0f}' for b in best[mode])}), "
              f"{rate / bare:.2f}x bare intake")
    workers_rate = statistics.median(best["workers"]) if best.get("workers") else 0.0
    inline_rate = statistics.median(best["inline"]) if best.get("inline") else 0.0
    if inline_rate:
        print(f"workers / inline: {workers_rate / inline_rate:.2f}x")
    print(f"goal >= {GOAL_RATE:.0f}/s: {'MET' if workers_rate >= GOAL_RATE else 'MISSED'}; "
          f"goal >= {GOAL_BARE_RATIO}x bare: "
          f"{'MET' if workers_rate / bare >= GOAL_BARE_RATIO else 'MISSED'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sink = sub.add_parser("sink", help="(internal) the relay sink process")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["workers", "inline"],
                        help="comma list of workers, inline (default both)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[50, 100, 150, 200, 250, 300, 350, 400, 500])
    parser.add_argument("--seconds", type=float, default=8.0, help="per rate")
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--burst-workers", type=lambda s: s.split(","), default=['"auto"'],
                        help='[processing] workers for each burst, comma list (e.g. \'"auto",2\')')
    parser.add_argument("--bare-count", type=int, default=2000)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rates, args.seconds, args.burst = 1, [50, 100], 3.0, 500
        args.bare_count, args.settle = 300, 1.0
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.command == "sink":
        sink_main(ARGS.port, ARGS.out)
    else:
        atexit.register(ServerProcess.kill_all)
        sys.exit(asyncio.run(main(ARGS)))
