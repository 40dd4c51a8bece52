"""Memory of the daemon under many connections (issue 13): RSS of `python -m gateway
serve` with 1,000 idle connections, and with 100 sessions sending 5 MB at once.

    .venv/bin/python bench/bench_memory.py            # both scenarios, about a minute
    .venv/bin/python bench/bench_memory.py --idle 300 --senders 20 --size 2000000

The daemon runs in its own process with its default limits except max_connections
and max_connections_per_ip (raised above the connection counts, else the caps answer
421 first) and the descriptor limit (raised to its hard limit). RSS is read from
/proc/PID/status (VmRSS) every 20 ms; the figures are the peak during each phase and
the value once it is over. Goals: <= 150 MB idle, <= 300 MB for the senders.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
INTAKE = "serwis@s4e.pl"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """Peak RSS of `pid` while a phase runs (a thread polling /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_daemon(folder: Path, port: int, connections: int) -> subprocess.Popen:
    config = folder / "gw.toml"
    config.write_text(f'[smtp]\nlisten = "{HOST}:{port}"\nmax_connections = {connections}\n'
                      f"max_connections_per_ip = {connections}\n")
    log = open(folder / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            stdout=log, stderr=log, cwd=folder, preexec_fn=raise_nofile)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                if sock.recv(100).startswith(b"220"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the daemon did not start listening (see daemon.log)")


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 300)
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def idle_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(HOST, port)
        greeting = await reply(reader)
        if not greeting.startswith(b"220"):
            raise SystemExit(f"connection refused: {greeting!r}")
        writers.append(writer)
    return writers


def make_message(size: int, n: int) -> bytes:
    head = (f"From: Jan Kowalski <jan{n}@example.com>\r\nTo: {INTAKE}\r\n"
            f"Subject: Awaria {n}\r\nMessage-ID: <mem{n}-{time.time_ns()}@example.com>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSerwer nie działa.\r\n"
            "--b\r\nContent-Type: application/gzip; name=logs.gz\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    data = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return head + data + b"--b--\r\n"


async def send_one(port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await reply(reader)
        for command in (b"EHLO bench.example", b"MAIL FROM:<jan@example.com>",
                        f"RCPT TO:<{INTAKE}>".encode(), b"DATA"):
            writer.write(command + b"\r\n")
            await writer.drain()
            await reply(reader)
        writer.write(message)
        writer.write(b".\r\n")
        await writer.drain()
        answer = await reply(reader)
        writer.write(b"QUIT\r\n")
        return answer
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        port = free_port()
        proc = start_daemon(folder, port, max(args.idle, args.senders) + 50)
        try:
            await asyncio.sleep(1)
            base = rss_mb(proc.pid)
            print(f"daemon started: RSS {base:.0f} MB")
            with Sampler(proc.pid) as idle:
                writers = await idle_connections(port, args.idle)
                await asyncio.sleep(2)
                held = rss_mb(proc.pid)
            print(f"{args.idle} idle connections: RSS {held:.0f} MB (peak {idle.peak:.0f} MB,"
                  f" goal <= 150 MB)")
            for writer in writers:
                writer.close()
            await asyncio.sleep(2)
            messages = [make_message(args.size, n) for n in range(args.senders)]
            with Sampler(proc.pid) as senders:
                started = time.monotonic()
                answers = await asyncio.gather(*(send_one(port, m) for m in messages))
                took = time.monotonic() - started
                after = rss_mb(proc.pid)
            ok = sum(a.startswith(b"250") for a in answers)
            print(f"{args.senders} sessions x {args.size / 1e6:.1f} MB at once: peak RSS "
                  f"{senders.peak:.0f} MB, {after:.0f} MB after the last 250 (goal <= 300 MB);"
                  f" {ok}/{args.senders} answered 250 in {took:.1f} s")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle connections (1000)")
    parser.add_argument("--senders", type=int, default=100, help="sessions at once (100)")
    parser.add_argument("--size", type=int, default=5_000_000, help="bytes per message (5 MB)")
    args = parser.parse_args()
    raise_nofile()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
