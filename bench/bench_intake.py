#!/usr/bin/env python3
"""Intake benchmark: the gateway against a bare aiosmtpd under the same client load.

Each server runs in its own process (client and server never share a GIL):

* bare     plain aiosmtpd `SMTP(handler)` with its own line-by-line DATA reader and a
           handler that answers 250 without storing anything;
* gateway  `python -m gateway serve` as operators run it: SQLite in WAL mode with
           synchronous=FULL on the real disk, group commit, the processor running.

The client (this process) speaks SMTP over raw asyncio sockets: N parallel sessions,
one message per connection as MTAs deliver (EHLO, MAIL, RCPT, DATA, the message in
one write, CRLF.CRLF, QUIT), every message with its own Message-ID. Rounds alternate
bare, gateway, bare, gateway...; each round gets a fresh server process (for the
gateway also a fresh database), warmed up with a few messages that are not counted.

    python bench/bench_intake.py            # default run, about 1-2 minutes
    python bench/bench_intake.py --quick    # a short sanity check
    python bench/bench_intake.py --help

Prints, for 5 KB and 1 MB messages at 20 sessions and for a lone sender at 5 KB:
messages/s of both (median of the rounds), the ratio gateway/bare and the p50/p99
time from writing the final CRLF.CRLF to reading the 250 line (all measured
messages of all rounds pooled).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402
from _load import MessageTemplate, RoundResult, ServerProcess  # noqa: E402

GOAL_RATIO_5K = 0.7
GOAL_RATIO_1M = 1.0
GOAL_P99_MS = 25.0

# bare aiosmtpd; the gateway as `serve` runs it (on uvloop); with --default-loop also
# the same `gateway.daemon.serve` on asyncio's default loop; with --compare-path a
# second copy of the package (`serve` too), all in the same alternating rounds.
KINDS = ("bare", "gateway", "gw-asyncio", "gw-B")


@dataclass
class Scenario:
    key: str
    title: str
    template: MessageTemplate
    sessions: int
    count: int
    warmup: int
    time_cap: float
    rounds: dict[str, list[RoundResult]] = field(
        default_factory=lambda: {kind: [] for kind in KINDS})

    def median_rate(self, kind: str) -> float:
        rates = [r.rate for r in self.rounds[kind]]
        return statistics.median(rates) if rates else math.nan

    def latencies(self, kind: str) -> list[float]:
        return [x for r in self.rounds[kind] for x in r.latencies]

    def cpu_per_message(self, kind: str) -> float:
        """Median over the rounds of the server's CPU seconds per acknowledged message."""
        values = [r.server_cpu / r.acked for r in self.rounds[kind] if r.acked]
        return statistics.median(values) if values else math.nan

    def ratio(self, kind: str = "gateway") -> float:
        bare = self.median_rate("bare")
        return self.median_rate(kind) / bare if bare else math.nan


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    quick = args.quick
    small, big = _load.message_5k(), _load.message_1m()
    all_scenarios = {
        "5k": Scenario("5k", f"5 KB, {args.sessions} sessions", small, args.sessions,
                       300 if quick else 2000, 40 if quick else 100, 60),
        "1m": Scenario("1m", f"1 MB, {args.sessions} sessions", big, args.sessions,
                       30 if quick else 200, 10 if quick else 20, 90),
        "single": Scenario("single", "5 KB, 1 session", small, 1,
                           100 if quick else 400, 20 if quick else 40, 60),
    }
    chosen = [key.strip() for key in args.only.split(",")] if args.only else list(all_scenarios)
    unknown = [key for key in chosen if key not in all_scenarios]
    if unknown:
        sys.exit(f"--only: unknown scenario(s) {', '.join(unknown)} (5k, 1m, single)")
    return [all_scenarios[key] for key in chosen]


@dataclass
class Env:
    base: Path
    tag: str
    gateway_path: str | None
    processor: str
    keep: bool
    verbose: bool
    settle: float
    kinds: tuple[str, ...] = KINDS[:2]
    compare_path: str | None = None
    notes: list[str] = field(default_factory=list)


def run_round(env: Env, scenario: Scenario, kind: str, round_no: int) -> RoundResult:
    if env.settle:
        load = _load.wait_for_quiet(env.settle)
        if load > 0.15:
            env.notes.append(f"{scenario.title} {kind} round {round_no}: the machine was still "
                             f"busy ({load:.2f} cores) after waiting {env.settle:.0f} s")
    port = _load.free_port()
    workdir = env.base / f"{scenario.key}-{kind}-{round_no}"
    if kind == "bare":
        server = _load.start_bare(port)
    else:
        path = env.compare_path if kind == "gw-B" else env.gateway_path
        server = _load.start_gateway(port, workdir, path, env.processor,
                                     default_loop=kind == "gw-asyncio")
    tag = f"{env.tag}.{scenario.key}.{kind}.{round_no}"
    try:
        warm = asyncio.run(_load.run_load(
            port, scenario.template, tag + ".warm", count=scenario.warmup,
            sessions=scenario.sessions, time_cap=scenario.time_cap, server=kind))
        if warm.errors:
            raise RuntimeError(f"{kind}: warm-up failed: {warm.errors[:3]}")
        cpu0 = (_load.machine_busy_seconds(), _load.process_cpu_seconds(server.proc.pid),
                _load.own_cpu_seconds())
        result = asyncio.run(_load.run_load(
            port, scenario.template, tag, count=scenario.count,
            sessions=scenario.sessions, time_cap=scenario.time_cap, server=kind))
        cpu1 = (_load.machine_busy_seconds(), _load.process_cpu_seconds(server.proc.pid),
                _load.own_cpu_seconds())
        result.server_cpu = cpu1[1] - cpu0[1]
        result.client_cpu = cpu1[2] - cpu0[2]
        result.other_cpu = max(0.0, (cpu1[0] - cpu0[0]) - result.server_cpu - result.client_cpu)
    finally:
        returncode = server.stop()
    if returncode not in (0, None):
        env.notes.append(f"{scenario.title} {kind} round {round_no}: server exited {returncode}")
    if kind != "bare":
        stored, done = _load.gateway_db_counts(workdir)
        expected = warm.acked + result.acked
        if stored != expected:
            env.notes.append(f"{scenario.title} {kind} round {round_no}: {expected} messages "
                             f"acknowledged but {stored} stored")
        result.processed, result.stored = done, stored
        log = (workdir / "gateway.log").read_text("utf-8", "replace")
        bad = [line for line in log.splitlines()
               if line.startswith(("ERROR", "CRITICAL", "Traceback"))]
        if bad:
            env.notes.append(f"{scenario.title} {kind} round {round_no}: {len(bad)} error "
                             f"line(s) in its log, first: {bad[0][:200]}")
        if not env.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if result.errors:
        env.notes.append(f"{scenario.title} {kind} round {round_no}: {len(result.errors)} "
                         f"failed transaction(s), first: {result.errors[0]}")
    if result.acked < scenario.count:
        env.notes.append(f"{scenario.title} {kind} round {round_no}: only {result.acked} of "
                         f"{scenario.count} messages within the {scenario.time_cap:.0f} s cap")
    if env.verbose:
        extra = ""
        if kind != "bare":
            extra = f"  (processor finished {result.processed} of {result.stored} stored)"
        el = result.elapsed or 1.0
        print(f"  {scenario.title:<20} {kind:<10} round {round_no}: {result.rate:8.1f} msg/s, "
              f"p50 {_ms(_load.percentile(result.latencies, 0.5))} "
              f"p99 {_ms(_load.percentile(result.latencies, 0.99))}  CPU cores: server "
              f"{result.server_cpu / el:.2f} client {result.client_cpu / el:.2f} other "
              f"{result.other_cpu / el:.2f}{extra}", flush=True)
    return result


def _ms(seconds: float) -> str:
    return "    -" if math.isnan(seconds) else f"{seconds * 1000:6.1f} ms"


def print_table(scenarios: list[Scenario]) -> None:
    print()
    head = (f"{'load':<20} {'server':<10} {'msg/s per round':<26} {'median':>8} {'ratio':>7} "
            f"{'dot→250 p50':>12} {'p99':>9} {'max':>9} {'CPU/msg':>9} {'n':>6} {'err':>4}")
    print(head)
    print("-" * len(head))
    for sc in scenarios:
        for kind in KINDS:
            rounds = sc.rounds[kind]
            if not rounds:
                continue
            lat = sc.latencies(kind)
            per_round = " ".join(f"{r.rate:.0f}" for r in rounds)
            ratio = f"{sc.ratio(kind):.2f}×" if kind != "bare" else ""
            print(f"{sc.title if kind == 'bare' else '':<20} {kind:<10} {per_round:<26} "
                  f"{sc.median_rate(kind):8.1f} {ratio:>7} "
                  f"{_ms(_load.percentile(lat, 0.5)):>12} {_ms(_load.percentile(lat, 0.99)):>9} "
                  f"{_ms(max(lat) if lat else math.nan):>9} {_ms(sc.cpu_per_message(kind)):>9} "
                  f"{len(lat):>6} "
                  f"{sum(len(r.errors) for r in rounds):>4}")
    print()


def print_comparison(scenarios: list[Scenario], kind: str, title: str) -> None:
    """`kind` against the gateway: the ratio of the medians and, for the spread, the
    ratio within each round (the two ran one after the other)."""
    print(f"\n  {title}, msg/s:")
    for sc in scenarios:
        pairs = [b.rate / a.rate
                 for a, b in zip(sc.rounds["gateway"], sc.rounds[kind], strict=True)
                 if a.rate]
        median = sc.median_rate(kind) / sc.median_rate("gateway")
        cpu = sc.cpu_per_message(kind) / sc.cpu_per_message("gateway")
        print(f"    {sc.title:<20} {median:.2f}× (per round {' '.join(f'{x:.2f}' for x in pairs)}),"
              f" CPU per message {cpu:.2f}×")


def judge(scenarios: list[Scenario]) -> list[tuple[str, str, bool | None]]:
    by_key = {sc.key: sc for sc in scenarios}
    verdicts: list[tuple[str, str, bool | None]] = []
    if "5k" in by_key:
        sc = by_key["5k"]
        ratio = sc.ratio()
        verdicts.append((f"5 KB: gateway ≥ {GOAL_RATIO_5K}× bare", f"{ratio:.2f}×",
                         ratio >= GOAL_RATIO_5K))
        p99 = _load.percentile(sc.latencies("gateway"), 0.99) * 1000
        verdicts.append((f"5 KB: p99 dot→250 < {GOAL_P99_MS:.0f} ms at {sc.sessions} sessions",
                         f"{p99:.1f} ms", p99 < GOAL_P99_MS))
    if "1m" in by_key:
        sc = by_key["1m"]
        ratio = sc.ratio()
        verdicts.append((f"1 MB: gateway ≥ {GOAL_RATIO_1M}× bare", f"{ratio:.2f}×",
                         ratio >= GOAL_RATIO_1M))
        p99 = _load.percentile(sc.latencies("gateway"), 0.99) * 1000
        verdicts.append(("1 MB: p99 dot→250 (informational)", f"{p99:.1f} ms", None))
    if "single" in by_key:
        sc = by_key["single"]
        gw = _load.percentile(sc.latencies("gateway"), 0.5) * 1000
        bare = _load.percentile(sc.latencies("bare"), 0.5) * 1000
        verdicts.append(("lone sender, 5 KB (informational)",
                         f"{sc.ratio():.2f}× bare, dot→250 p50 {gw:.1f} ms vs {bare:.1f} ms",
                         None))
    return verdicts


def describe(env: Env, args: argparse.Namespace, scenarios: list[Scenario]) -> None:
    mount, fstype = _load.filesystem_of(env.base)
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway, aiosmtpd, aiosqlite, sqlite3; "
         "print(gateway.__file__, aiosmtpd.__version__, aiosqlite.__version__, "
         "sqlite3.sqlite_version)"],
        env={**os.environ, **({"PYTHONPATH": env.gateway_path + os.pathsep
                                + os.environ.get("PYTHONPATH", "")} if env.gateway_path else {})},
        capture_output=True, text=True, timeout=60, cwd=env.base)
    if probe.returncode != 0:
        raise RuntimeError(f"cannot import the gateway: {probe.stderr.strip()[-500:]}")
    gw_file, smtpd_v, aiosqlite_v, sqlite_v = probe.stdout.split()
    print(f"intake benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"  machine   {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, aiosmtpd {smtpd_v}, aiosqlite {aiosqlite_v}, "
          f"SQLite {sqlite_v}")
    how = ("python -m gateway serve" if env.processor == "production" else
           f"DIAGNOSIS: processor {env.processor}")
    print(f"  gateway   {Path(gw_file).parent}{_load.git_revision(Path(gw_file).parent)}")
    print(f"            {how}; SQLite WAL, synchronous=FULL")
    print(f"  database  {env.base}  on {mount} ({fstype}); a fresh database per gateway round")
    for sc in scenarios:
        print(f"  {sc.title:<20} message {sc.template.size:,} B, {sc.count} messages per round"
              f" (+{sc.warmup} warm-up), {args.rounds} round(s) per server, cap "
              f"{sc.time_cap:.0f} s")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Intake benchmark: the gateway vs a bare aiosmtpd, same client load.")
    parser.add_argument("--quick", action="store_true",
                        help="short run (fewer messages, one round) to check that it works")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per server and load (default 3, --quick 1)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions (20)")
    parser.add_argument("--only", default="", help="comma list of 5k, 1m, single")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the gateway databases go (default: a new folder in "
                             "/var/tmp); must be a real disk, not tmpfs")
    parser.add_argument("--gateway-path", default=None,
                        help="prepend to PYTHONPATH of the gateway process (to measure a "
                             "patched copy of the package)")
    parser.add_argument("--processor", choices=_load.PROCESSOR_MODES, default="production",
                        help="diagnosis: 'minimal' (the processor only marks messages done) "
                             "or 'off' (no processor) instead of the production pipeline")
    parser.add_argument("--settle", type=float, default=20.0, metavar="S",
                        help="before each round wait up to S seconds for other processes to "
                             "leave the CPUs idle (default 20; 0: do not wait)")
    parser.add_argument("--default-loop", action="store_true",
                        help="also measure the gateway on asyncio's default event loop "
                             "(gw-asyncio) in the same alternating rounds, against `serve` "
                             "on uvloop")
    parser.add_argument("--compare-path", default=None, metavar="DIR",
                        help="also measure a patched copy of the package (gw-B, as "
                             "--gateway-path) in the same alternating rounds")
    parser.add_argument("--keep", action="store_true", help="keep databases and logs")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round lines")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not 1 <= args.rounds <= 20 or not 1 <= args.sessions <= 200:
        parser.error("--rounds must be 1..20 and --sessions 1..200")

    parent = args.dir or Path("/var/tmp" if Path("/var/tmp").is_dir() else tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    mount, fstype = _load.filesystem_of(parent)
    if fstype in ("tmpfs", "ramfs"):
        parser.error(f"{parent} is on {fstype} ({mount}): fsync would be free there; "
                     "give --dir on a real disk")
    base = Path(tempfile.mkdtemp(prefix="s4e-intake-bench-", dir=parent))
    env = Env(base, uuid.uuid4().hex[:10], args.gateway_path, args.processor, args.keep,
              not args.quiet, args.settle,
              kinds=tuple(k for k in KINDS if k in ("bare", "gateway")
                          or (k == "gw-asyncio" and args.default_loop)
                          or (k == "gw-B" and args.compare_path)),
              compare_path=args.compare_path)
    atexit.register(ServerProcess.kill_all)
    scenarios = build_scenarios(args)
    started = time.monotonic()
    try:
        describe(env, args, scenarios)
        for sc in scenarios:
            for round_no in range(1, args.rounds + 1):
                for kind in env.kinds:
                    sc.rounds[kind].append(run_round(env, sc, kind, round_no))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ServerProcess.kill_all()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print_table(scenarios)
    verdicts = judge(scenarios)
    for goal, value, ok in verdicts:
        mark = "" if ok is None else ("MET" if ok else "MISSED")
        print(f"  {goal:<48} {value:<40} {mark}")
    if "gw-asyncio" in env.kinds:
        print_comparison(scenarios, "gw-asyncio",
                         "asyncio's default loop (gw-asyncio) / uvloop (gateway)")
    if "gw-B" in env.kinds:
        print_comparison(scenarios, "gw-B", f"{env.compare_path} (gw-B) / gateway")
    processed = [(r.processed, r.stored)
                 for sc in scenarios for r in sc.rounds["gateway"]]
    if processed:
        done = sum(p for p, _ in processed)
        stored = sum(s for _, s in processed)
        print(f"\n  the processor had finished {done} of {stored} stored messages when each "
              "round's gateway was stopped")
    busy = [(r.other_cpu / r.elapsed, sc.title, kind) for sc in scenarios
            for kind in env.kinds for r in sc.rounds[kind] if r.elapsed]
    if busy and max(busy)[0] > 0.15:
        share, title, kind = max(busy)
        env.notes.append(f"other processes used up to {share:.2f} CPU cores during a round "
                         f"({title}, {kind}): the figures are disturbed; run again on a quiet "
                         "machine")
    for note in env.notes:
        print(f"  NOTE: {note}")
    print(f"\n  {time.monotonic() - started:.0f} s in all"
          + (f"; kept {base}" if args.keep else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "scenarios": [{
                "key": sc.key, "title": sc.title, "message_bytes": sc.template.size,
                "sessions": sc.sessions,
                **{kind: {"rates": [r.rate for r in sc.rounds[kind]],
                          "median_rate": sc.median_rate(kind),
                          "cpu_ms_per_message": [r.server_cpu / r.acked * 1000
                                                 for r in sc.rounds[kind] if r.acked],
                          "p50_ms": _load.percentile(sc.latencies(kind), 0.5) * 1000,
                          "p99_ms": _load.percentile(sc.latencies(kind), 0.99) * 1000,
                          "errors": sum(len(r.errors) for r in sc.rounds[kind])}
                   for kind in env.kinds},
                "ratio": sc.ratio()} for sc in scenarios],
            "goals": [{"goal": g, "value": v, "met": ok} for g, v, ok in verdicts],
            "notes": env.notes}, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
