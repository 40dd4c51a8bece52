#!/usr/bin/env python3
"""Outbound benchmark: reports in over SMTP, acknowledgements out at a relay sink.

Three processes, each on its own GIL:

* sink     a real aiosmtpd server on 127.0.0.1 (this file, `sink` command) that answers
           250 and records for every mail it receives its arrival time (time.time()),
           the In-Reply-To header (= the report's Message-ID) and the time of its EHLO;
* gateway  `python -m gateway serve` with its database on the real disk (WAL,
           synchronous=FULL), `[outbound] relay` = the sink, `retry_first = "1s"`;
* client   this process: raw-socket SMTP, one report per connection, at most
           `--sessions` (8) at a time. Every report is COMPLETE (the six fields of the
           procedure, numbered as in the procedure, in Polish, about 4 KB) and has its
           own Message-ID and its own sender address, so the automatic-answer cap
           (`max_auto_replies_per_hour`, 20 per sender) is never hit and every report
           must produce exactly one acknowledgement.

Modes (`--mode`, default `both`):

* max        N reports as fast as the sessions allow; acknowledgements per second end to
             end (first report sent -> last acknowledgement at the sink) and the
             distribution of 250 -> acknowledgement;
* sustained  an open-loop load paced at R reports/s for `--duration` s; p50/p99/max of
             250 -> acknowledgement, and the goal: p99 < 1 s at R. R is `--rate`, else
             half of `--intake-rate`, else half of the intake rate measured here first
             (the intake benchmark's 5 KB load at 20 sessions, one round).

* relay      the mailer alone (`Mailer` + `SmtpRelay` in this process, the sink in its
             own): `--count` rows queued in a fresh database, mails/s until the last one
             is at the sink; kept relay sessions (`keep_alive = "30s"`) against a new
             session per mail (`"0"`, the baseline), `--rounds` (3) alternating rounds.

The delay crosses processes: the client takes time.time() when it reads the 250, the
sink when it has the acknowledgement's DATA (same machine, same clock).

    python bench/bench_outbound.py              # both modes, about 2 minutes
    python bench/bench_outbound.py --quick      # short sanity run
    python bench/bench_outbound.py --mode sustained --rate 40 --duration 30
    python bench/bench_outbound.py --mode relay --count 300 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
from _load import HOST, INTAKE, ServerProcess, SmtpFailure

GOAL_P99_S = 1.0
DEFAULT_SESSIONS = 8

# --- the reports --------------------------------------------------------------------

_BODY = """\
Dzień dobry,

zgłaszam awarię biblioteki taśmowej podłączonej do serwera kopii zapasowych. Od wczoraj \
wieczorem zadania kopii kończą się błędem, a konsola zgłasza utratę połączenia z napędem. \
Restart usług i samego serwera nie pomógł. Proszę o pilny kontakt, w piątek zamykamy miesiąc \
i brak kopii jest dla nas poważnym zagrożeniem.

1. Imię i nazwisko osoby zgłaszającej problem: {name}
2. Dane kontaktowe osoby zgłaszającej (mail, telefon): {email}, tel. +48 {phone}
3. Adres instalacji sprzętu – realizacji naprawy: ul. Zażółcona {house}/4, 31-042 Kraków, \
budynek B, piętro 2
4. Opis problemu: zadania kopii zapasowej kończą się błędem „Błąd komunikacji z nośnikiem”, \
biblioteka taśmowa nie odpowiada na polecenia z konsoli, dioda błędu świeci na żółto.
5. Numer seryjny urządzenia / numer Commcell ID: SN-7F3K-{serial:04d}, CommCell ID 2A9F4
6. Logi z urządzenia, o ile są dostępne: fragment dziennika zdarzeń poniżej.

Fragment dziennika zdarzeń:
"""

_LOG = ("21:{m:02d}:{s:02d} [błąd] zadanie {job}: nośnik niedostępny (0x{code:04x}), "
        "ponowna próba za {retry} s")

_SIGNATURE = """
Z poważaniem,
{name}
Kierownik działu IT
Przykładowa Spółka z o.o., ul. Zażółcona 12/4, 31-042 Kraków
"""

_NAMES = ("Jan Kowalski", "Anna Nowak", "Piotr Wiśniewski", "Katarzyna Wójcik",
          "Tomasz Kamiński", "Małgorzata Lewandowska", "Paweł Zieliński", "Agnieszka Szymańska")


@dataclass(frozen=True)
class Report:
    message_id: str  # "<...>"
    sender: str
    data: bytes      # dot-stuffed, without the final CRLF.CRLF
    size: int


def make_report(tag: str, n: int, log_lines: int = 30) -> Report:
    """A complete report (all six fields), about 4 KB, its own Message-ID and sender."""
    rng = random.Random(n)
    name = _NAMES[n % len(_NAMES)]
    sender = f"zglaszajacy.{tag}.{n}@klient{n % 97}.example.com"
    message_id = f"<{tag}.{n}@bench.example.com>"
    text = _BODY.format(name=name, email=sender,
                        phone=f"{rng.randrange(500, 800)} {rng.randrange(1000):03d} "
                              f"{rng.randrange(1000):03d}",
                        house=n % 90 + 1, serial=n % 10_000)
    text += "\n".join(_LOG.format(m=rng.randrange(60), s=rng.randrange(60),
                                  job=rng.randrange(10_000, 99_999), code=rng.randrange(65536),
                                  retry=rng.choice((30, 60, 120)))
                      for _ in range(log_lines))
    text += "\n" + _SIGNATURE.format(name=name)
    body = "\r\n".join(text.splitlines()).encode("utf-8")
    headers = (
        "Received: from mail.example.com (mail.example.com [192.0.2.25])\r\n"
        "\tby mx.s4e.pl (Postfix) with ESMTPS id 4XyZ1k2m3nz9sQ\r\n"
        "\tfor <serwis@s4e.pl>; Tue, 24 Nov 2026 21:47:13 +0100 (CET)\r\n"
        f"From: {name} <{sender}>\r\n"
        "To: serwis@s4e.pl\r\n"
        "Subject: =?UTF-8?Q?Awaria_biblioteki_ta=C5=9Bmowej_=E2=80=93_zg=C5=82oszenie?=\r\n"
        f"Message-ID: {message_id}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        "User-Agent: Mozilla Thunderbird\r\n"
        "Content-Language: pl\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=UTF-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    data = _load._stuff(headers + body)
    return Report(message_id, sender, data, len(data))


async def deliver_report(port: int, report: Report) -> tuple[float, float]:
    """One SMTP transaction on a new connection with the report's own sender; returns
    (time.time() when the 250 was read, seconds from the final dot to the 250)."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=64 * 1024)
    try:
        writer.transport.set_write_buffer_limits(high=0)
        _load._expect(await _load._reply(reader), b"220", "banner")
        writer.write(b"EHLO client.bench.example.com\r\n")
        _load._expect(await _load._reply(reader), b"250", "EHLO")
        writer.write(b"MAIL FROM:<%s> SIZE=%d\r\n" % (report.sender.encode(), report.size))
        _load._expect(await _load._reply(reader), b"250", "MAIL")
        writer.write(b"RCPT TO:<%s>\r\n" % INTAKE.encode())
        _load._expect(await _load._reply(reader), b"250", "RCPT")
        writer.write(b"DATA\r\n")
        _load._expect(await _load._reply(reader), b"354", "DATA")
        writer.write(report.data)
        await writer.drain()
        started = time.perf_counter()
        writer.write(b"\r\n.\r\n")
        line = await _load._reply(reader)
        wall = time.time()
        elapsed = time.perf_counter() - started
        _load._expect(line, b"250", "end of DATA")
        writer.write(b"QUIT\r\n")
        _load._expect(await _load._reply(reader), b"221", "QUIT")
        return wall, elapsed
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (TimeoutError, OSError):
            pass


# --- the relay sink (its own process) -------------------------------------------------

_IN_REPLY_TO = re.compile(rb"^in-reply-to[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


class _SinkHandler:
    """Answers 250 and appends `arrival<TAB>ehlo<TAB>in-reply-to<TAB>rcpt` per mail."""

    def __init__(self, out) -> None:
        self.out = out

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.bench_ehlo = time.time()
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope) -> str:
        arrived = time.time()
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        end = raw.find(b"\r\n\r\n")
        head = raw[:end] if end >= 0 else raw
        match = _IN_REPLY_TO.search(head)
        irt = re.sub(rb"\s+", b"", match.group(1)).decode("ascii", "replace") if match else "-"
        ehlo = getattr(session, "bench_ehlo", arrived)
        rcpt = ",".join(envelope.rcpt_tos)
        self.out.write(f"{arrived:.6f}\t{ehlo:.6f}\t{irt}\t{rcpt}\n".encode())
        self.out.flush()
        return "250 2.0.0 OK"


async def _serve_sink(port: int, out_path: Path) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    with open(out_path, "ab", buffering=0) as out:  # noqa: ASYNC230 - before serving
        handler = _SinkHandler(out)
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.bench", data_size_limit=_load.MAX_SIZE,
                         enable_SMTPUTF8=True), HOST, port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()


@dataclass
class SinkRecord:
    arrived: float
    ehlo: float
    in_reply_to: str
    rcpt: str


class SinkReader:
    """Reads the sink's records as they are appended (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[SinkRecord] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return 0
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            parts = line.decode("utf-8", "replace").split("\t")
            if len(parts) >= 4:
                self.records.append(SinkRecord(float(parts[0]), float(parts[1]), parts[2],
                                               parts[3]))
        return len(lines)


def start_sink(workdir: Path) -> tuple[ServerProcess, SinkReader]:
    port = _load.free_port()
    out = workdir / "sink.tsv"
    server = ServerProcess("sink", [sys.executable, str(Path(__file__).resolve()), "sink",
                                    "--port", str(port), "--out", str(out)], port,
                           log_path=workdir / "sink.log")
    server.wait_ready()
    return server, SinkReader(out)


def start_gateway(workdir: Path, relay_port: int, gateway_path: str | None,
                  max_auto_replies: int | None) -> ServerProcess:
    """`python -m gateway serve` with [outbound] relay = the sink, retry_first = 1s."""
    port = _load.free_port()
    config = workdir / "gateway.toml"
    tickets = (f"[tickets]\nmax_auto_replies_per_hour = {max_auto_replies}\n"
               if max_auto_replies is not None else "")
    config.write_text(
        "[smtp]\n"
        f'listen = "{HOST}:{port}"\n'
        'hostname = "gw.bench"\n'
        f"max_message_size = {_load.MAX_SIZE}\n"
        "[storage]\n"
        'database = "var/gateway.db"\n'
        'attachments = "var/attachments"\n'
        "[outbound]\n"
        'transport = "smtp"\n'
        f'relay = "{HOST}:{relay_port}"\n'
        'retry_first = "1s"\n'
        'retry_max = "10s"\n' + tickets)
    env = dict(os.environ)
    if gateway_path:
        env["PYTHONPATH"] = gateway_path + os.pathsep + env.get("PYTHONPATH", "")
    server = ServerProcess("gateway", [sys.executable, "-m", "gateway", "serve", "--config",
                                       str(config)], port, cwd=workdir, env=env,
                           log_path=workdir / "gateway.log")
    server.wait_ready()
    return server


# --- one measured run -----------------------------------------------------------------

@dataclass
class Sent:
    report: Report
    scheduled: float = math.nan   # open loop: when it was due (time.time())
    started: float = math.nan     # time.time() when its connection opened
    acked_250: float = math.nan   # time.time() when the 250 was read
    dot_to_250: float = math.nan
    error: str = ""


@dataclass
class Run:
    mode: str
    sessions: int
    rate: float | None = None         # sustained: the offered rate
    duration: float | None = None
    sent: list[Sent] = field(default_factory=list)
    records: list[SinkRecord] = field(default_factory=list)
    unexpected: int = 0      # acknowledgements for no report of this run (nor warm-up)
    gateway_cpu: float = 0.0
    sink_cpu: float = 0.0
    client_cpu: float = 0.0
    other_cpu: float = 0.0
    cpu_window: float = 0.0
    late_starts: int = 0     # sustained: reports that started > 50 ms after due
    max_late: float = 0.0
    db: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # -- derived --
    def ok(self) -> list[Sent]:
        return [s for s in self.sent if not s.error]

    def arrivals(self) -> dict[str, list[float]]:
        by_id: dict[str, list[float]] = {}
        for rec in self.records:
            by_id.setdefault(rec.in_reply_to, []).append(rec.arrived)
        return by_id

    def delays(self) -> list[float]:
        """250 -> first acknowledgement, for every report answered 250; missing = inf."""
        by_id = self.arrivals()
        out = []
        for s in self.ok():
            times = by_id.get(s.report.message_id)
            out.append(min(times) - s.acked_250 if times else math.inf)
        return out

    def counts(self) -> tuple[int, int, int]:
        """(reports with exactly one ack, missing, duplicated) among reports answered 250."""
        by_id = Counter(rec.in_reply_to for rec in self.records)
        one = missing = dup = 0
        for s in self.ok():
            n = by_id.get(s.report.message_id, 0)
            one += n == 1
            missing += n == 0
            dup += n > 1
        return one, missing, dup

    def first_start(self) -> float:
        return min((s.started for s in self.sent), default=math.nan)

    def last_ack(self) -> float:
        ids = {s.report.message_id for s in self.ok()}
        return max((r.arrived for r in self.records if r.in_reply_to in ids), default=math.nan)

    def acks_per_s(self) -> float:
        acked = sum(1 for d in self.delays() if math.isfinite(d))
        span = self.last_ack() - self.first_start()
        return acked / span if span > 0 else math.nan

    def trend(self) -> tuple[float, float]:
        """p50 of 250 -> ack over the first and over the last quarter of the reports."""
        delays = self.delays()
        quarter = max(1, len(delays) // 4)
        return _pct(delays[:quarter], 0.5), _pct(delays[-quarter:], 0.5)

    def steady(self) -> bool:
        """False when the delay grew during the run: a backlog building up, so a longer
        run at this rate would end with a larger p99."""
        first, last = self.trend()
        return last <= 2 * first + 0.1

    def intake_per_s(self) -> float:
        walls = [s.acked_250 for s in self.ok()]
        span = max(walls, default=math.nan) - self.first_start()
        return len(walls) / span if span > 0 else math.nan


def _settle(args: argparse.Namespace, run: Run, what: str) -> None:
    if args.settle:
        load = _load.wait_for_quiet(args.settle)
        if load > 0.15:
            run.notes.append(f"{what}: the machine was still busy ({load:.2f} cores) after "
                             f"waiting {args.settle:.0f} s")


async def _wait_for_acks(reader: SinkReader, wanted: set[str], cap: float,
                         idle_cap: float) -> None:
    """Until every id in `wanted` has an acknowledgement, or `cap` s in all, or `idle_cap`
    s without a new one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cap
    last_progress = loop.time()
    seen = {r.in_reply_to for r in reader.records}
    while loop.time() < deadline:
        if reader.poll():
            seen.update(r.in_reply_to for r in reader.records[-50_000:])
            last_progress = loop.time()
        if wanted <= seen:
            # a duplicate would come right behind: give it a moment
            await asyncio.sleep(0.5)
            reader.poll()
            return
        if loop.time() - last_progress > idle_cap:
            return
        await asyncio.sleep(0.05)


async def _send_closed_loop(port: int, items: list[Sent], sessions: int, cap: float) -> None:
    """`sessions` senders, each sending the next report as soon as its last one is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cap
    queue = iter(items)

    async def sender() -> None:
        for item in queue:
            if loop.time() > deadline:
                item.error = "not sent: time cap"
                continue
            await _send_one(port, item)

    await asyncio.gather(*(sender() for _ in range(sessions)))


async def _send_one(port: int, item: Sent) -> None:
    item.started = time.time()
    try:
        item.acked_250, item.dot_to_250 = await asyncio.wait_for(
            deliver_report(port, item.report), 60)
    except (TimeoutError, OSError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, SmtpFailure) as err:
        item.error = f"{type(err).__name__}: {err}"


async def _send_open_loop(port: int, items: list[Sent], sessions: int, rate: float,
                          arrivals: str, run: Run) -> None:
    """Report i is due at t0 + offset_i (uniform spacing 1/rate, or Poisson); it starts
    then, or when one of the `sessions` connections is free if all are busy (counted as
    a late start: the gateway's intake did not keep up)."""
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    offsets, t = [], 0.0
    for _ in items:
        offsets.append(t)
        t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
    free = asyncio.Semaphore(sessions)
    tasks: list[asyncio.Task[None]] = []
    t0_loop, t0_wall = loop.time() + 0.05, time.time() + 0.05

    async def one(item: Sent) -> None:
        try:
            await _send_one(port, item)
        finally:
            free.release()

    for item, offset in zip(items, offsets, strict=True):
        delay = t0_loop + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await free.acquire()
        late = loop.time() - (t0_loop + offset)
        item.scheduled = t0_wall + offset
        if late > 0.05:
            run.late_starts += 1
        run.max_late = max(run.max_late, late)
        tasks.append(asyncio.create_task(one(item)))
    await asyncio.gather(*tasks)


def measure(args: argparse.Namespace, base: Path, tag: str, mode: str) -> Run:
    run = Run(mode, args.sessions)
    workdir = base / mode
    workdir.mkdir(parents=True, exist_ok=True)
    if mode == "max":
        count = args.count
    else:
        run.rate, run.duration = args.rate, args.duration
        count = max(1, round(args.rate * args.duration))
    warm = [Sent(make_report(f"{tag}.{mode}.warm", n)) for n in range(args.warmup)]
    run.sent = [Sent(make_report(f"{tag}.{mode}", n)) for n in range(count)]
    _settle(args, run, mode)
    sink, reader = start_sink(workdir)
    gateway = None
    try:
        gateway = start_gateway(workdir, sink.port, args.gateway_path, args.max_auto_replies)
        # warm-up: a few reports through the whole path, not counted
        asyncio.run(_send_closed_loop(gateway.port, warm, args.sessions, 60))
        warm_ok = {s.report.message_id for s in warm if not s.error}
        asyncio.run(_wait_for_acks(reader, warm_ok, 60, 20))
        got = {r.in_reply_to for r in reader.records}
        if not warm_ok or not warm_ok <= got:
            raise RuntimeError(f"warm-up: {len(warm_ok & got)} of {len(warm)} reports "
                               f"acknowledged; see {workdir}/gateway.log"
                               f"{gateway._log_tail()}")
        profiler = _start_profiler(args, gateway, workdir, mode)
        cpu0 = (_load.machine_busy_seconds(), _load.process_cpu_seconds(gateway.proc.pid),
                _load.process_cpu_seconds(sink.proc.pid), _load.own_cpu_seconds(), time.time())

        async def go() -> None:
            if mode == "max":
                await _send_closed_loop(gateway.port, run.sent, args.sessions, args.send_cap)
            else:
                await _send_open_loop(gateway.port, run.sent, args.sessions, args.rate,
                                      args.arrivals, run)
            wanted = {s.report.message_id for s in run.sent if not s.error}
            await _wait_for_acks(reader, wanted, args.drain_cap, args.idle_cap)

        asyncio.run(go())
        cpu1 = (_load.machine_busy_seconds(), _load.process_cpu_seconds(gateway.proc.pid),
                _load.process_cpu_seconds(sink.proc.pid), _load.own_cpu_seconds(), time.time())
        _stop_profiler(profiler, run)
        run.gateway_cpu = cpu1[1] - cpu0[1]
        run.sink_cpu = cpu1[2] - cpu0[2]
        run.client_cpu = cpu1[3] - cpu0[3]
        run.cpu_window = cpu1[4] - cpu0[4]
        run.other_cpu = max(0.0, (cpu1[0] - cpu0[0]) - run.gateway_cpu - run.sink_cpu
                            - run.client_cpu)
    finally:
        rc = gateway.stop() if gateway else None
        sink.stop()
        ServerProcess.kill_all()
    reader.poll()
    measured_ids = {s.report.message_id for s in run.sent}
    warm_ids = {s.report.message_id for s in warm}
    run.records = [r for r in reader.records if r.in_reply_to in measured_ids]
    known = measured_ids | warm_ids
    run.unexpected = sum(1 for r in reader.records if r.in_reply_to not in known)
    warm_dups = sum(n - 1 for i, n in Counter(r.in_reply_to for r in reader.records).items()
                    if n > 1 and i in warm_ids)
    if warm_dups:
        run.notes.append(f"{mode}: {warm_dups} duplicated acknowledgement(s) in the warm-up")
    if rc not in (0, None):
        run.notes.append(f"{mode}: the gateway exited {rc}")
    errors = [s.error for s in run.sent if s.error]
    if errors:
        run.notes.append(f"{mode}: {len(errors)} report(s) not answered 250, first: {errors[0]}")
    log_text = (workdir / "gateway.log").read_text("utf-8", "replace")
    bad = [ln for ln in log_text.splitlines()
           if ln.startswith(("ERROR", "CRITICAL", "Traceback", "WARNING"))]
    if bad:
        run.notes.append(f"{mode}: {len(bad)} warning/error line(s) in the gateway log, "
                         f"first: {bad[0][:200]}")
    run.db = db_breakdown(workdir / "var" / "gateway.db", run)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return run


def _start_profiler(args: argparse.Namespace, gateway: ServerProcess, workdir: Path,
                    mode: str) -> subprocess.Popen | None:
    if not args.profile:
        return None
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = args.profile.with_name(f"{args.profile.stem}-{mode}{args.profile.suffix or '.txt'}")
    fmt = "speedscope" if out.suffix == ".json" else ("flamegraph" if out.suffix == ".svg"
                                                      else "raw")
    try:
        return subprocess.Popen([pyspy, "record", "-p", str(gateway.proc.pid), "-o", str(out),
                                 "-f", fmt, "-r", "200", "--threads", "--nonblocking",
                                 *(["--gil"] if args.profile_gil else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as err:
        print(f"  (no profile: {err})", file=sys.stderr)
        return None


def _stop_profiler(proc: subprocess.Popen | None, run: Run) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        run.notes.append("py-spy did not stop in time: profile incomplete")


def _epoch(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else math.nan


def db_breakdown(db_path: Path, run: Run) -> dict:
    """Where each report's 250 -> acknowledgement went, from the gateway's own timestamps:

    queue+parse   250 -> outbox.created_at (waiting for the processor, reading the raw
                  bytes, parse_report, look-ups; `now` is taken just before the apply
                  transaction)
    apply         outbox.created_at -> inbound.processed_at (ticket, history, render,
                  compose, outbox rows: the transaction up to its last statement)
    commit+mail   inbound.processed_at -> arrival at the sink (COMMIT's fsync, waiting for
                  the mailer, claim, SMTP session to the relay)
    """
    if not db_path.exists():
        return {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT i.message_id, i.outcome, i.processed_at, o.kind, o.status, o.created_at,"
            " o.attempts FROM inbound i LEFT JOIN outbox o ON o.inbound_id = i.id").fetchall()
        states = dict(db.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
        kinds = dict(db.execute("SELECT kind, count(*) FROM outbox GROUP BY kind"))
        outcomes = dict(db.execute(
            "SELECT coalesce(outcome, state), count(*) FROM inbound GROUP BY 1"))
        retries = db.execute("SELECT count(*) FROM outbox WHERE attempts > 1").fetchone()[0]
        waiting = {r[0] for r in db.execute(
            "SELECT i.message_id FROM inbound i LEFT JOIN outbox o ON o.inbound_id = i.id"
            " WHERE i.state IN ('queued', 'processing')"
            " OR o.status IN ('pending', 'sending')")}
    finally:
        db.close()
    by_id = {r[0]: r for r in rows}
    arrivals = run.arrivals()
    stages: dict[str, list[float]] = {"queue+parse": [], "apply": [], "commit+mail": []}
    for s in run.ok():
        row = by_id.get(s.report.message_id)
        times = arrivals.get(s.report.message_id)
        if not row or not row[5] or not times:
            continue
        created, processed = _epoch(row[5]), _epoch(row[2])
        stages["queue+parse"].append(created - s.acked_250)
        stages["apply"].append(processed - created)
        stages["commit+mail"].append(min(times) - processed)
    arrived = set(arrivals)
    late = sum(1 for s in run.ok() if s.report.message_id not in arrived
               and s.report.message_id in waiting)
    return {"stages": stages, "outbox_status": states, "outbox_kind": kinds,
            "inbound_outcome": outcomes, "retried": retries, "late": late}


# --- intake rate, for the default R ---------------------------------------------------

def measure_intake_rate(args: argparse.Namespace, base: Path, tag: str) -> float:
    """The intake benchmark's 5 KB load at 20 sessions, one round, fresh gateway."""
    workdir = base / "intake"
    if args.settle:
        _load.wait_for_quiet(args.settle)
    port = _load.free_port()
    server = _load.start_gateway(port, workdir, args.gateway_path)
    template = _load.message_5k()
    try:
        warm = asyncio.run(_load.run_load(port, template, tag + ".iw", count=100, sessions=20,
                                          time_cap=60, server="gateway"))
        if warm.errors:
            raise RuntimeError(f"intake warm-up failed: {warm.errors[:3]}")
        result = asyncio.run(_load.run_load(port, template, tag + ".i",
                                            count=300 if args.quick else 1500, sessions=20,
                                            time_cap=60, server="gateway"))
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if result.errors:
        raise RuntimeError(f"intake measurement: {len(result.errors)} failures, first "
                           f"{result.errors[0]}")
    return result.rate


# --- output ---------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return "never"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _pct(values: list[float], q: float) -> float:
    return _load.percentile(values, q)


def print_runs(runs: list[Run]) -> None:
    print()
    head = (f"{'mode':<22} {'reports':>7} {'in/s':>7} {'acks/s':>7} {'250→ack p50':>12} "
            f"{'p90':>9} {'p99':>9} {'max':>9} {'1 ack':>6} {'miss':>5} {'dup':>4} "
            f"{'gw CPU/rep':>10}")
    print(head)
    print("-" * len(head))
    for run in runs:
        delays = run.delays()
        one, missing, dup = run.counts()
        title = "max" if run.mode == "max" else f"sustained {run.rate:.1f}/s"
        acked = len(run.ok())
        print(f"{title:<22} {len(run.sent):>7} {run.intake_per_s():7.1f} {run.acks_per_s():7.1f} "
              f"{_ms(_pct(delays, 0.5)):>12} {_ms(_pct(delays, 0.9)):>9} "
              f"{_ms(_pct(delays, 0.99)):>9} {_ms(max(delays, default=math.nan)):>9} "
              f"{one:>6} {missing:>5} {dup:>4} "
              f"{_ms(run.gateway_cpu / acked if acked else math.nan):>10}")
    print()
    print("where the 250→ack time goes (gateway DB timestamps; p50 / p99):")
    for run in runs:
        stages = run.db.get("stages", {})
        title = "max" if run.mode == "max" else f"sustained {run.rate:.1f}/s"
        parts = [f"{name} {_ms(_pct(v, 0.5))} / {_ms(_pct(v, 0.99))}"
                 for name, v in stages.items()]
        print(f"  {title:<22} " + ";  ".join(parts))
    print()
    print("per run:")
    for run in runs:
        title = "max" if run.mode == "max" else f"sustained {run.rate:.1f}/s"
        w = run.cpu_window or 1.0
        ehlo_to_data = [r.arrived - r.ehlo for r in run.records]
        dot = [s.dot_to_250 for s in run.ok()]
        print(f"  {title:<22} CPU cores: gateway {run.gateway_cpu / w:.2f}, sink "
              f"{run.sink_cpu / w:.2f}, client {run.client_cpu / w:.2f}, other "
              f"{run.other_cpu / w:.2f} over {w:.1f} s")
        print(f"  {'':<22} dot→250 p50 {_ms(_pct(dot, 0.5))} p99 {_ms(_pct(dot, 0.99))};"
              f" relay session EHLO→DATA p50 {_ms(_pct(ehlo_to_data, 0.5))}")
        db = run.db
        if db:
            print(f"  {'':<22} outbox {db.get('outbox_status')}, kinds {db.get('outbox_kind')},"
                  f" inbound {db.get('inbound_outcome')}, retried {db.get('retried')}")
        if run.mode == "sustained":
            first, last = run.trend()
            print(f"  {'':<22} trend: p50 250→ack first quarter {_ms(first)}, last quarter "
                  f"{_ms(last)} ({'steady' if run.steady() else 'GROWING: a backlog builds up'});"
                  f" late starts (>50 ms) {run.late_starts}, max {_ms(run.max_late)}")
        if run.unexpected:
            print(f"  {'':<22} {run.unexpected} acknowledgement(s) matching no report")
    print()


def describe(args: argparse.Namespace, base: Path, rate_source: str) -> None:
    mount, fstype = _load.filesystem_of(base)
    env = dict(os.environ)
    if args.gateway_path:
        env["PYTHONPATH"] = args.gateway_path + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import gateway, aiosmtpd, aiosmtplib, aiosqlite; print(gateway.__file__, "
            "aiosmtpd.__version__, aiosmtplib.__version__, aiosqlite.__version__)")
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60, cwd=base, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"cannot import the gateway: {probe.stderr.strip()[-500:]}")
    gw_file, smtpd_v, smtplib_v, aiosqlite_v = probe.stdout.split()
    sample = make_report("sample", 1)
    print(f"outbound benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"  machine   {os.cpu_count()} CPUs, {platform.machine()}, Python "
          f"{platform.python_version()}, aiosmtpd {smtpd_v}, aiosmtplib {smtplib_v}, "
          f"aiosqlite {aiosqlite_v}")
    print(f"  gateway   {Path(gw_file).parent}{_load.git_revision(Path(gw_file).parent)}")
    print("            python -m gateway serve; [outbound] relay = the sink, retry_first 1s")
    print(f"  database  {base} on {mount} ({fstype}); fresh database and sink per mode")
    print(f"  reports   complete (six fields), {sample.size:,} B, own Message-ID and sender "
          f"each; {args.sessions} sessions, one report per connection; warm-up "
          f"{args.warmup} not counted"
          + (f"; max_auto_replies_per_hour = {args.max_auto_replies}"
             if args.max_auto_replies is not None else ""))
    if "max" in args.modes:
        print(f"  max       {args.count} reports as fast as {args.sessions} sessions go")
    if "sustained" in args.modes:
        print(f"  sustained {args.rate:.1f} reports/s ({args.arrivals} arrivals) for "
              f"{args.duration:.0f} s = {round(args.rate * args.duration)} reports; "
              f"R {rate_source}")
    print(flush=True)


# --- relay mode: the mailer alone, kept sessions against a new session per mail ---------

RELAY_VARIANTS = (("kept", "30s"), ("new per mail", "0"))


def _outbox_mail(tag: str, n: int) -> tuple[str, str, bytes]:
    """An acknowledgement as the outbox holds it (~3 KB): Message-ID, In-Reply-To, raw."""
    message_id = f"<ack-{tag}-{n}@gw.bench>"
    in_reply_to = f"<report-{tag}-{n}@customer.bench>"
    body = ("Dzień dobry,\r\n\r\nprzyjęliśmy zgłoszenie i nadaliśmy mu numer.\r\n"
            + "Szczegóły zgłoszenia: awaria biblioteki taśmowej, kopie kończą się błędem.\r\n"
            * 36)
    raw = (f"From: crm@s4e.pl\r\nTo: customer-{n}@customer.bench\r\n"
           f"Subject: [#{n:06d}] Awaria biblioteki taśmowej\r\nMessage-ID: {message_id}\r\n"
           f"In-Reply-To: {in_reply_to}\r\nAuto-Submitted: auto-replied\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\n" + body).encode("utf-8")
    return message_id, in_reply_to, raw


async def _relay_round(args: argparse.Namespace, workdir: Path, reader: SinkReader,
                       sink: ServerProcess, tag: str, keep_alive: str) -> dict:
    """`args.count` rows queued in a fresh database, then the Mailer (this process)
    sends them to the sink; mails/s from start() to the last arrival at the sink, and
    the CPU time per mail of this process (the mailer and its SQLite thread) and of the
    sink (less disturbed by other load on the machine than wall time)."""
    from gateway import store
    from gateway.config import OutboundConfig
    from gateway.mailer import Mailer, SmtpRelay

    workdir.mkdir(parents=True)
    conn = await store.connect(workdir / "gateway.db")
    await store.migrate(conn)
    now = store.utcnow()
    wanted: set[str] = set()
    async with store.Tx(conn):
        for n in range(args.count):
            message_id, in_reply_to, raw = _outbox_mail(tag, n)
            wanted.add(in_reply_to)
            await store.enqueue_outbox(
                conn, ticket=n + 1, inbound_id=None, kind="acknowledgement",
                message_id=message_id, mail_from="crm@s4e.pl",
                rcpt_to=f"customer-{n}@customer.bench", subject=f"[#{n:06d}] Awaria",
                auto=True, raw=raw, now=now)
    config = OutboundConfig(transport="smtp", relay=f"{HOST}:{sink.port}",
                            connections=args.connections, keep_alive=keep_alive)
    mailer = Mailer(conn, SmtpRelay(config, local_hostname="gw.bench"), config)
    first = len(reader.records)
    cpu = _load.own_cpu_seconds()
    sink_cpu = _load.process_cpu_seconds(sink.proc.pid)
    started = time.time()
    await mailer.start()
    try:
        await _wait_for_acks(reader, wanted, args.drain_cap, args.idle_cap)
    finally:
        cpu = _load.own_cpu_seconds() - cpu  # includes _wait_for_acks' polling (small)
        sink_cpu = _load.process_cpu_seconds(sink.proc.pid) - sink_cpu
        await mailer.stop()
        rows = await conn.execute_fetchall(
            "SELECT count(*) FROM outbox WHERE status = 'sent'")
        await conn.close()
    records = [r for r in reader.records[first:] if r.in_reply_to in wanted]
    counts = Counter(r.in_reply_to for r in records)
    end = max((r.arrived for r in records), default=math.nan)
    return {"mails": len(wanted), "once": sum(1 for c in counts.values() if c == 1),
            "doubled": sum(1 for c in counts.values() if c > 1),
            "missing": len(wanted - set(counts)), "sent_rows": rows[0][0],
            "seconds": end - started, "per_s": len(counts) / (end - started),
            "sessions": len({r.ehlo for r in records}),
            "cpu_ms_per_mail": 1000 * cpu / len(wanted),
            "sink_cpu_ms_per_mail": 1000 * sink_cpu / len(wanted)}


def run_relay_mode(args: argparse.Namespace, base: Path, tag: str) -> int:
    if args.gateway_path:
        sys.path.insert(0, args.gateway_path)
    import aiosmtplib

    import gateway

    print(f"outbound benchmark, relay mode, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"  machine   {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"aiosmtplib {aiosmtplib.__version__}")
    print(f"  gateway   {Path(gateway.__file__).parent}"
          f"{_load.git_revision(Path(gateway.__file__).parent)}")
    mount, fstype = _load.filesystem_of(base)
    print(f"  mailer    this process: Mailer + SmtpRelay, [outbound] connections = "
          f"{args.connections}; database {base} on {mount} ({fstype}), fresh per round")
    print(f"  load      {args.count} outbox rows (~3 KB, one ticket each) queued, then "
          f"sent to the sink (its own process); {args.rounds} rounds of each variant, "
          "alternating", flush=True)
    sink, reader = start_sink(base)
    results: dict[str, list[dict]] = {label: [] for label, _ in RELAY_VARIANTS}
    try:
        for round_no in range(args.rounds):
            order = RELAY_VARIANTS if round_no % 2 == 0 else RELAY_VARIANTS[::-1]
            for label, keep_alive in order:
                busy = _load.wait_for_quiet(min(args.settle, 3.0)) if args.settle else 0.0
                name = f"{tag}-{round_no}-{keep_alive}"
                result = asyncio.run(_relay_round(args, base / f"relay-{name}", reader,
                                                  sink, name, keep_alive))
                result["busy_before"] = busy
                results[label].append(result)
                print(f"  round {round_no + 1} {label:>12}: {result['per_s']:7.1f} mails/s "
                      f"({result['mails']} in {result['seconds']:.2f} s, "
                      f"{result['sessions']} relay sessions; CPU/mail "
                      f"{result['cpu_ms_per_mail']:.2f} ms mailer, "
                      f"{result['sink_cpu_ms_per_mail']:.2f} ms sink; {result['once']} once, "
                      f"{result['missing']} missing, {result['doubled']} doubled; machine "
                      f"busy {busy:.2f} cores before)", flush=True)
    finally:
        sink.stop()
    kept = [r["per_s"] for r in results["kept"]]
    new = [r["per_s"] for r in results["new per mail"]]
    med_kept, med_new = _load.percentile(kept, 0.5), _load.percentile(new, 0.5)
    print(f"\n  median mails/s: kept {med_kept:.1f}, new session per mail {med_new:.1f}: "
          f"kept = {med_kept / med_new:.2f}x the baseline")
    pairs = [k / n for k, n in zip(kept, new, strict=True)]
    print("  per round (kept / new): " + ", ".join(f"{p:.2f}x" for p in pairs))
    for key, what in (("cpu_ms_per_mail", "mailer"), ("sink_cpu_ms_per_mail", "relay sink")):
        cpu_kept = _load.percentile([r[key] for r in results["kept"]], 0.5)
        cpu_new = _load.percentile([r[key] for r in results["new per mail"]], 0.5)
        print(f"  median CPU per mail, {what}: kept {cpu_kept:.2f} ms, new session per mail "
              f"{cpu_new:.2f} ms: kept = {cpu_kept / cpu_new:.2f}x the baseline")
    exact = all(r["once"] == r["mails"] and r["sent_rows"] == r["mails"]
                for rs in results.values() for r in rs)
    print(f"  every mail exactly once at the sink and marked sent: {'yes' if exact else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"relay": results, "median_kept_per_s": med_kept,
                                         "median_new_per_s": med_new}, indent=2) + "\n")
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["sink"]:
        sp = argparse.ArgumentParser(prog="bench_outbound.py sink")
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--out", type=Path, required=True)
        a = sp.parse_args(argv[1:])
        asyncio.run(_serve_sink(a.port, a.out))
        return 0
    parser = argparse.ArgumentParser(
        description="Outbound benchmark: acknowledgements per second end to end and the "
                    "delay from a report's 250 to its acknowledgement at a relay sink.")
    parser.add_argument("--mode", choices=("max", "sustained", "both", "relay"),
                        default="both",
                        help="max: N reports as fast as the sessions go; sustained: paced "
                             "at --rate; both (default): max, then sustained; relay: the "
                             "mailer alone, kept relay sessions against a new session per "
                             "mail")
    parser.add_argument("--rounds", type=int, default=3,
                        help="relay mode: rounds of each variant, alternating (3)")
    parser.add_argument("--connections", type=int, default=4,
                        help="relay mode: [outbound] connections (4)")
    parser.add_argument("--quick", action="store_true", help="a short sanity run")
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS,
                        help=f"parallel SMTP sessions ({DEFAULT_SESSIONS})")
    parser.add_argument("--count", type=int, default=None,
                        help="max mode: reports to send (600; --quick 80)")
    parser.add_argument("--rate", type=float, default=None,
                        help="sustained: reports/s (default: half of --intake-rate, or of "
                             "the intake rate measured first)")
    parser.add_argument("--intake-rate", type=float, default=None,
                        help="the gateway's intake rate at 5 KB from bench_intake.py "
                             "(msg/s); sustained runs at half of it")
    parser.add_argument("--duration", type=float, default=None,
                        help="sustained: seconds of load (20; --quick 5)")
    parser.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform",
                        help="sustained: evenly spaced (default) or Poisson arrivals")
    parser.add_argument("--warmup", type=int, default=None, help="reports not counted (16)")
    parser.add_argument("--max-auto-replies", type=int, default=None,
                        help="set [tickets] max_auto_replies_per_hour (not needed: every "
                             "report has its own sender)")
    parser.add_argument("--drain-cap", type=float, default=None,
                        help="after the last report, wait at most this long for the "
                             "acknowledgements (300 s; --quick 60)")
    parser.add_argument("--idle-cap", type=float, default=20.0,
                        help="stop waiting after this many seconds without a new "
                             "acknowledgement (20)")
    parser.add_argument("--send-cap", type=float, default=120.0,
                        help="max mode: stop sending after this many seconds (120)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the databases go (default a new folder in /var/tmp); "
                             "must be a real disk, not tmpfs")
    parser.add_argument("--gateway-path", default=None,
                        help="prepend to PYTHONPATH of the gateway process (a patched copy)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="py-spy record the gateway during each measured phase into "
                             "FILE-<mode> (.svg flamegraph, .json speedscope, else raw)")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: only samples holding the GIL")
    parser.add_argument("--settle", type=float, default=15.0, metavar="S",
                        help="wait up to S s for idle CPUs before each phase (15; 0: no)")
    parser.add_argument("--keep", action="store_true", help="keep databases, logs, sink data")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.count = args.count or (80 if quick else 600)
    if args.mode == "relay" and args.rounds < 1:
        parser.error("--rounds >= 1")
    args.duration = args.duration or (5.0 if quick else 20.0)
    args.warmup = 16 if args.warmup is None else args.warmup
    args.drain_cap = args.drain_cap or (60.0 if quick else 300.0)
    args.modes = ("max", "sustained") if args.mode == "both" else (args.mode,)
    if not 1 <= args.sessions <= 200 or args.count < 1 or args.duration <= 0:
        parser.error("--sessions 1..200, --count >= 1, --duration > 0")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")

    parent = args.dir or Path("/var/tmp" if Path("/var/tmp").is_dir() else tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    mount, fstype = _load.filesystem_of(parent)
    if fstype in ("tmpfs", "ramfs"):
        parser.error(f"{parent} is on {fstype} ({mount}): fsync would be free there; "
                     "give --dir on a real disk")
    base = Path(tempfile.mkdtemp(prefix="s4e-outbound-bench-", dir=parent))
    tag = uuid.uuid4().hex[:10]
    atexit.register(ServerProcess.kill_all)
    started = time.monotonic()
    runs: list[Run] = []
    try:
        if args.mode == "relay":
            return run_relay_mode(args, base, tag)
        rate_source = ""
        if "sustained" in args.modes:
            if args.rate is not None:
                rate_source = "given (--rate)"
            elif args.intake_rate is not None:
                args.rate = args.intake_rate / 2
                rate_source = f"= half of --intake-rate {args.intake_rate:.1f} msg/s"
            else:
                print("measuring the intake rate first (bench_intake's 5 KB load, 20 "
                      "sessions, one round)...", flush=True)
                intake = measure_intake_rate(args, base, tag)
                args.rate = intake / 2
                rate_source = f"= half of the intake rate measured now, {intake:.1f} msg/s"
        describe(args, base, rate_source)
        for mode in args.modes:
            run = measure(args, base, tag, mode)
            runs.append(run)
            one, missing, dup = run.counts()
            print(f"  {mode}: {len(run.sent)} reports, {one} acknowledged once, {missing} "
                  f"missing, {dup} duplicated, p99 250→ack {_ms(_pct(run.delays(), 0.99))}",
                  flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"bench_outbound: {err}", file=sys.stderr)
        return 1
    finally:
        ServerProcess.kill_all()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print_runs(runs)
    verdicts = []
    for run in runs:
        if run.mode != "sustained":
            continue
        one, missing, dup = run.counts()
        p99 = _pct(run.delays(), 0.99)
        met = p99 < GOAL_P99_S and missing == 0 and dup == 0
        verdicts.append({"goal": f"p99 250→ack < 1 s at {run.rate:.1f} msg/s",
                         "p99_s": p99, "met": met, "steady": run.steady()})
        print(f"  p99 250→ack < 1 s at {run.rate:.1f} msg/s: {'MET' if met else 'MISSED'}"
              f"  (p99 {_ms(p99)}"
              + ("" if run.steady() else "; the delay grew during the run: not sustainable")
              + ")")
        late = run.db.get("late", 0)
        print(f"  every report exactly one acknowledgement: "
              f"{'yes' if missing == dup == 0 and one == len(run.sent) else 'NO'} "
              f"({one} of {len(run.sent)}; {missing} missing"
              + (f", of which {late} still queued in the gateway when the wait ended"
                 if late else "")
              + f", {dup} duplicated, {run.unexpected} unexpected)")
    for run in runs:
        if run.mode == "max":
            print(f"  max: {run.acks_per_s():.1f} acknowledgements/s end to end "
                  f"(intake {run.intake_per_s():.1f} reports/s)")
    busy = [(r.other_cpu / r.cpu_window, r.mode) for r in runs if r.cpu_window]
    notes = [n for r in runs for n in r.notes]
    if busy and max(busy)[0] > 0.15:
        notes.append(f"other processes used up to {max(busy)[0]:.2f} CPU cores during a "
                     "run: figures disturbed")
    for note in notes:
        print(f"  NOTE: {note}")
    print(f"\n  {time.monotonic() - started:.0f} s in all" + (f"; kept {base}" if args.keep else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "runs": [{
                "mode": r.mode, "rate": r.rate, "duration": r.duration, "reports": len(r.sent),
                "intake_per_s": r.intake_per_s(), "acks_per_s": r.acks_per_s(),
                "p50_s": _pct(r.delays(), 0.5), "p99_s": _pct(r.delays(), 0.99),
                "max_s": max(r.delays(), default=math.nan),
                "once_missing_duplicated": r.counts(),
                "gateway_cpu_per_report_s": r.gateway_cpu / max(1, len(r.ok())),
                "stages_p50_s": {k: _pct(v, 0.5) for k, v in r.db.get("stages", {}).items()},
                "steady": r.steady() if r.mode == "sustained" else None,
                "notes": r.notes} for r in runs],
            "goals": verdicts}, indent=2, ensure_ascii=False, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
