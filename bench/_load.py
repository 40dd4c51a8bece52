"""Helpers for bench_intake.py: realistic messages, the raw-socket SMTP load
generator, and the two servers under test, each in its own process.

Run as a script it is the *bare* server: plain aiosmtpd `SMTP(handler)`, its own
line-by-line DATA reader, a handler that answers 250 without storing anything:

    python bench/_load.py bare-server --port 2526

or, for diagnosis only, the gateway with its processor reduced (the benchmark's
`--processor minimal|off`; the default runs `python -m gateway serve` itself):

    python bench/_load.py gateway-server --config gw.toml --processor off
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

HOST = "127.0.0.1"
INTAKE = "serwis@s4e.pl"
SENDER = "jan.kowalski@example.com"
MAX_SIZE = 25 * 1024 * 1024  # the gateway's default smtp.max_message_size; bare uses it too

# --- messages ---------------------------------------------------------------------------

_POLISH = """\
Dzień dobry,

zgłaszam awarię serwera kopii zapasowych w naszej serwerowni. Od wczoraj wieczorem \
zadania kopii nie kończą się poprawnie, a konsola zgłasza błąd połączenia z biblioteką \
taśmową. Próbowaliśmy ponownie uruchomić usługi oraz sam serwer, niestety bez skutku. \
Proszę o pilny kontakt, ponieważ jutro rano mamy zaplanowane zamknięcie miesiąca \
i brak kopii jest dla nas poważnym zagrożeniem.

Imię i nazwisko: Jan Kowalski
Telefon kontaktowy: +48 600 100 200
Adres e-mail: jan.kowalski@example.com
Adres instalacji: ul. Zażółcona 12/4, 31-042 Kraków, budynek B, piętro 2
Opis problemu: zadania kopii zapasowej kończą się błędem „Błąd komunikacji \
z nośnikiem”, biblioteka taśmowa nie odpowiada na polecenia z konsoli, dioda \
błędu świeci na żółto.
Numer seryjny: SN-7F3K-22-0419
CommCell ID: 2A9F4
Logi: w załączniku (jeżeli nie dotarły, prześlę ponownie).

Fragment dziennika zdarzeń:
"""

_LOG_LINE = "21:{m:02d}:{s:02d} [błąd] zadanie {job}: nośnik niedostępny (0x{code:04x}), {retry} s"

_SIGNATURE = """
Z poważaniem,
Jan Kowalski
Kierownik działu IT
Przykładowa Spółka z o.o., ul. Zażółcona 12/4, 31-042 Kraków
tel. +48 600 100 200
"""


def _crlf(text: str) -> bytes:
    lines = []
    for line in text.splitlines():
        lines.extend(textwrap.wrap(line, 72, break_long_words=False) or [""])
    return "\r\n".join(lines).encode("utf-8")


def _stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 dot-stuffing, for the bytes sent after DATA."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def _text_body(target: int) -> bytes:
    """Polish report text plus log lines until about `target` bytes (UTF-8, CRLF)."""
    rng = random.Random(5)
    text = _POLISH
    lines = []
    while len((text + "\n".join(lines) + _SIGNATURE).encode("utf-8")) < target:
        lines.append(_LOG_LINE.format(m=rng.randrange(60), s=rng.randrange(60),
                                      job=rng.randrange(10_000, 99_999),
                                      code=rng.randrange(65536), retry=rng.choice((30, 60, 120))))
    return _crlf(text + "\n".join(lines) + "\n" + _SIGNATURE)


# The reporter's address in the template (From and the report's e-mail field): each
# message gets a customer of its own in its place, as in a real burst (a storage array
# failing at many customers), so the per-address answer cap is the real one.
_TEMPLATE_ADDRESS = b"jan.kowalski@example.com"


def customer(n: int) -> bytes:
    """Message n's reporter, as long as the template's address (sizes stay exact)."""
    return b"k.%010d@example.com" % n


@dataclass(frozen=True)
class MessageTemplate:
    """A message as the bytes an MTA sends after DATA (dot-stuffed, no final CRLF),
    with a unique Message-ID, Date and reporter address spliced in per message."""

    label: str
    head: bytes      # trace headers, before Message-ID
    tail: bytes      # the rest of the header block and the body
    size: int        # of one complete message

    def make(self, tag: str, n: int) -> bytes:
        tail = customer(n).join(self.tail.split(_TEMPLATE_ADDRESS))
        return b"".join((self.head, b"Message-ID: <", tag.encode("ascii"), b".",
                         str(n).encode("ascii"), b"@bench.example.com>\r\nDate: ",
                         formatdate(localtime=False).encode("ascii"), b"\r\n", tail))


_RECEIVED = (
    "Received: from mail.example.com (mail.example.com [192.0.2.25])\r\n"
    "\tby mx.s4e.pl (Postfix) with ESMTPS id 4XyZ1k2m3nz9sQ\r\n"
    "\tfor <serwis@s4e.pl>; Tue, 24 Nov 2026 21:47:13 +0100 (CET)\r\n"
    "Received: from [10.1.2.3] (unknown [198.51.100.7])\r\n"
    "\tby mail.example.com (Postfix) with ESMTPSA id 8A1B2C3D4E\r\n"
    "\tfor <serwis@s4e.pl>; Tue, 24 Nov 2026 21:47:12 +0100 (CET)\r\n"
)

_COMMON = (
    "From: Jan Kowalski <jan.kowalski@example.com>\r\n"
    "To: serwis@s4e.pl\r\n"
    "Subject: =?UTF-8?Q?Awaria_serwera_kopii_zapasowych_=E2=80=93_pilne_zg=C5=82oszenie?=\r\n"
    "User-Agent: Mozilla Thunderbird\r\n"
    "Content-Language: pl\r\n"
    "MIME-Version: 1.0\r\n"
)


def message_5k() -> MessageTemplate:
    """About 5 KB: headers with two Received lines, a plain UTF-8 Polish report."""
    head = _RECEIVED.encode("ascii")
    fixed = len(head) + len(b"Message-ID: <t.0@bench.example.com>\r\nDate: ") + 33 + 60
    headers = (_COMMON + "Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
               "Content-Transfer-Encoding: 8bit\r\n\r\n").encode("ascii")
    body = _text_body(5 * 1024 - fixed - len(headers))
    tail = _stuff(headers + body)
    return MessageTemplate("5 KB", head, tail, len(MessageTemplate("", head, tail, 0).make("t", 0)))


def message_1m() -> MessageTemplate:
    """About 1 MiB: multipart/mixed, the Polish report and a base64 zip of logs
    (76-character lines, CRLF)."""
    head = _RECEIVED.encode("ascii")
    boundary = "------------0Hq9ZbV3sW1aXy7LmN2pQ4rT"
    text = _text_body(3 * 1024)
    part1 = ("This is a multi-part message in MIME format.\r\n"
             f"--{boundary}\r\nContent-Type: text/plain; charset=UTF-8; format=flowed\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\n").encode("ascii") + text + b"\r\n\r\n"
    part2 = (f"--{boundary}\r\nContent-Type: application/zip; name=\"logi_serwera.zip\"\r\n"
             "Content-Disposition: attachment; filename=\"logi_serwera.zip\"\r\n"
             "Content-Transfer-Encoding: base64\r\n\r\n").encode("ascii")
    headers = (_COMMON + f"Content-Type: multipart/mixed;\r\n boundary=\"{boundary}\"\r\n\r\n"
               ).encode("ascii")
    closing = f"\r\n--{boundary}--".encode("ascii")
    fixed = len(head) + 80 + len(headers) + len(part1) + len(part2) + len(closing)
    b64_len = 1024 * 1024 - fixed
    raw_len = (b64_len * 76 // 78) * 3 // 4
    payload = random.Random(1).randbytes(raw_len)  # incompressible, like a real zip
    b64 = base64.b64encode(payload)
    attachment = b"\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    tail = _stuff(headers + part1 + part2 + attachment + closing)
    return MessageTemplate("1 MB", head, tail, len(MessageTemplate("", head, tail, 0).make("t", 0)))


# --- the load generator ---------------------------------------------------------------

class SmtpFailure(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One (possibly multi-line) SMTP reply; returns its last line."""
    for _ in range(64):  # bounded: EHLO answers with about ten lines
        line = await reader.readuntil(b"\n")
        if line[3:4] != b"-":
            return line
    raise SmtpFailure("reply with too many lines")


def _expect(line: bytes, code: bytes, step: str) -> None:
    if not line.startswith(code):
        raise SmtpFailure(f"{step}: {line.decode('ascii', 'replace').strip()}")


async def deliver(port: int, message: bytes, size: int) -> float:
    """One SMTP transaction on a new connection, as an MTA delivers; returns the
    seconds from writing the final CRLF.CRLF to reading the 250 line."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=64 * 1024)
    try:
        # Flush the whole message into the socket before the clock starts.
        writer.transport.set_write_buffer_limits(high=0)
        _expect(await _reply(reader), b"220", "banner")
        writer.write(b"EHLO client.bench.example.com\r\n")
        _expect(await _reply(reader), b"250", "EHLO")
        writer.write(b"MAIL FROM:<%s> SIZE=%d\r\n" % (SENDER.encode(), size))
        _expect(await _reply(reader), b"250", "MAIL")
        writer.write(b"RCPT TO:<%s>\r\n" % INTAKE.encode())
        _expect(await _reply(reader), b"250", "RCPT")
        writer.write(b"DATA\r\n")
        _expect(await _reply(reader), b"354", "DATA")
        writer.write(message)
        await writer.drain()
        started = time.perf_counter()
        writer.write(b"\r\n.\r\n")
        line = await _reply(reader)
        elapsed = time.perf_counter() - started
        _expect(line, b"250", "end of DATA")
        writer.write(b"QUIT\r\n")
        _expect(await _reply(reader), b"221", "QUIT")
        return elapsed
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (TimeoutError, OSError):
            pass


@dataclass
class RoundResult:
    server: str
    sessions: int
    sent: int = 0
    acked: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    server_cpu: float = 0.0   # CPU seconds the server process used during the round
    client_cpu: float = 0.0   # CPU seconds this process used during the round
    other_cpu: float = 0.0    # CPU seconds everything else on the machine used meanwhile
    stored: int = 0      # gateway: rows in its database after the round (with warm-up)
    processed: int = 0   # gateway: of those, finished by the processor

    @property
    def rate(self) -> float:
        return self.acked / self.elapsed if self.elapsed else 0.0


async def run_load(port: int, template: MessageTemplate, tag: str, *, count: int,
                   sessions: int, time_cap: float, server: str = "",
                   message_timeout: float = 60.0) -> RoundResult:
    """`sessions` concurrent senders, one message per connection, until `count`
    messages were sent or `time_cap` seconds passed."""
    result = RoundResult(server, sessions)
    max_errors = max(10, count // 20)
    started = time.perf_counter()
    deadline = started + time_cap

    async def sender() -> None:
        while result.sent < count and time.perf_counter() < deadline:
            if len(result.errors) >= max_errors:
                return
            n = result.sent
            result.sent += 1
            try:
                latency = await asyncio.wait_for(
                    deliver(port, template.make(tag, n), template.size), message_timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, SmtpFailure) as err:
                result.errors.append(f"{type(err).__name__}: {err}")
            else:
                result.acked += 1
                result.latencies.append(latency)

    await asyncio.gather(*(sender() for _ in range(sessions)))
    result.elapsed = time.perf_counter() - started
    return result


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --- CPU accounting (to see whether something else ran on the machine) -----------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (not idle, not iowait)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user/nice
    return (sum(values[:8]) - idle) / _TICK


def wait_for_quiet(max_wait: float, threshold: float = 0.15, sample: float = 0.3) -> float:
    """Wait (at most `max_wait` s) until the machine's CPUs are idle but for
    `threshold` cores over `sample` seconds; returns the last load seen, in cores."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(sample)
        load = (machine_busy_seconds() - before) / sample
        if not load > threshold or time.monotonic() >= deadline:
            return load


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# --- the servers under test, each in its own process ----------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def filesystem_of(path: Path) -> tuple[str, str]:
    """(mount point, fs type) holding `path`, from /proc/self/mounts."""
    path = path.resolve()
    best = ("/", "unknown")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[0]):
            best = (mount, parts[2])
    return best


class ServerProcess:
    """A server under test in a subprocess; `stop()` never leaves it running."""

    live: set[ServerProcess] = set()

    def __init__(self, kind: str, argv: list[str], port: int, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.kind = kind
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)
        ServerProcess.live.add(self)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}"
                                   f"{self._log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    if sock.recv(200).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        # The 221: this probe's session has ended, so its slot does
                        # not count against the load's first sessions (per-IP cap).
                        with contextlib.suppress(OSError):
                            sock.recv(200)
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not answer on port {self.port}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
            self._log = subprocess.DEVNULL
        ServerProcess.live.discard(self)
        return self.proc.returncode

    @classmethod
    def kill_all(cls) -> None:
        for server in list(cls.live):
            if server.proc.poll() is None:
                server.proc.kill()
                try:
                    server.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            cls.live.discard(server)

    def _log_tail(self) -> str:
        if not self.log_path:
            return ""
        try:
            return "\n" + self.log_path.read_text("utf-8", "replace")[-2000:]
        except OSError:
            return ""


def start_bare(port: int) -> ServerProcess:
    server = ServerProcess("bare", [sys.executable, str(Path(__file__).resolve()),
                                    "bare-server", "--port", str(port)], port)
    server.wait_ready()
    return server


PROCESSOR_MODES = ("production", "minimal", "off")


def start_gateway(port: int, workdir: Path, gateway_path: str | None = None,
                  processor: str = "production",
                  wrapper: list[str] | None = None,
                  default_loop: bool = False) -> ServerProcess:
    """`python -m gateway serve` as operators run it, with a database in `workdir`
    (WAL, synchronous=FULL: the production settings are not configurable).

    processor="minimal" (the processor only marks each message done) or "off" (not
    running) start the same Gateway through this file instead, to tell the cost of
    intake itself from the processor's competition for the CPU and the write lock.
    default_loop: asyncio's default event loop instead of the one `serve` chooses
    (uvloop), to measure what the loop gives; the reduced processors run on the same
    loop as `serve` unless this is set."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gateway.toml"
    config.write_text(
        "[smtp]\n"
        f'listen = "{HOST}:{port}"\n'
        'hostname = "gw.bench"\n'
        f"max_message_size = {MAX_SIZE}\n"
        "[storage]\n"
        'database = "var/gateway.db"\n'
        'attachments = "var/attachments"\n'
        "[outbound]\n"
        'maildir = "var/outbox"\n')
    env = dict(os.environ)
    if gateway_path:
        env["PYTHONPATH"] = gateway_path + os.pathsep + env.get("PYTHONPATH", "")
    if processor == "production" and not default_loop:
        command = ["-m", "gateway", "serve", "--config", str(config)]
    elif processor == "production":
        command = [str(Path(__file__).resolve()), "gateway-serve-default-loop",
                   "--config", str(config)]
    else:
        command = [str(Path(__file__).resolve()), "gateway-server", "--config", str(config),
                   "--processor", processor, *(["--default-loop"] if default_loop else [])]
    argv = [*(wrapper or []), sys.executable, *command]
    server = ServerProcess("gateway", argv, port, cwd=workdir, env=env,
                           log_path=workdir / "gateway.log")
    server.wait_ready()
    return server


def gateway_db_counts(workdir: Path) -> tuple[int, int]:
    """(rows stored, rows the processor finished) in a stopped gateway's database."""
    db = sqlite3.connect(workdir / "var" / "gateway.db")
    try:
        total = db.execute("SELECT count(*) FROM inbound").fetchone()[0]
        done = db.execute("SELECT count(*) FROM inbound WHERE state = 'done'").fetchone()[0]
    finally:
        db.close()
    return total, done


# --- the bare server ------------------------------------------------------------------

class _Accept:
    """Answers 250 without storing anything."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


async def _serve_bare(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    handler = _Accept()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.bench", data_size_limit=MAX_SIZE,
                     enable_SMTPUTF8=True), HOST, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


async def _serve_gateway(config_path: Path, processor: str) -> None:
    """`gateway.daemon.serve` with the processor reduced (diagnosis only)."""
    from gateway.config import load_config
    from gateway.daemon import Gateway
    from gateway.processor import record_received

    gateway = Gateway(load_config(config_path), stages=record_received)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    if processor == "off" and gateway.processor is not None:
        await gateway.processor.stop()  # wake() then sets an event nobody waits on
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the servers of the intake benchmark")
    parser.add_argument("command", choices=["bare-server", "gateway-server",
                                            "gateway-serve-default-loop"])
    parser.add_argument("--port", type=int, help="bare-server: port to listen on")
    parser.add_argument("--config", type=Path, help="gateway-server: its config file")
    parser.add_argument("--processor", choices=PROCESSOR_MODES[1:], default="minimal")
    parser.add_argument("--default-loop", action="store_true",
                        help="gateway-server: asyncio's default loop, not the one `serve` runs on")
    args = parser.parse_args(argv)
    if args.command == "bare-server":
        if args.port is None:
            parser.error("bare-server needs --port")
        asyncio.run(_serve_bare(args.port))
    else:
        if args.config is None:
            parser.error(f"{args.command} needs --config")
        from gateway.cli import setup_logging

        setup_logging()
        if args.command == "gateway-serve-default-loop":
            # What `python -m gateway serve` runs, on asyncio's own loop.
            from gateway.config import load_config
            from gateway.daemon import serve

            asyncio.run(serve(load_config(args.config)))
        else:
            import gateway.cli

            # A copy of the package from before uvloop has no loop_factory_for.
            choose = getattr(gateway.cli, "loop_factory_for", lambda command: None)
            factory = None if args.default_loop else choose("serve")
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(_serve_gateway(args.config, args.processor))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def git_revision(package: Path) -> str:
    """" at <commit>" (and whether the package has uncommitted changes), if in git."""
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" at {head.stdout.strip()}" + (" + uncommitted changes" if dirty else "")
