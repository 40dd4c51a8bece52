"""Benchmark of gateway.sender_auth.verify_sender against dkimpy's own one-call verify.

    python bench/bench_sender_auth.py [--rounds N]

A DKIM-signed report (5 KB, and 1 MB with a base64 log) is checked `rounds` times with
`verify = "dns"` through the test DNS server on 127.0.0.1 (tests/dns_server.py): DMARC
record, key, DKIM verification, verdict. The baseline is `dkim.verify(raw, dnsfunc=...)`
on the same message and key through the same server: the signature check alone, no
DMARC. Also timed: a 20 MB signed message checked in a thread beside an event loop (the
loop's longest stall), the trusted Authentication-Results path (no DNS at all) and a
domain whose DNS never answers (bounded by `[auth] timeout`).
Goal: verify_sender <= 2x the baseline (the DMARC lookup is the one extra query).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dkim  # noqa: E402
import dns.resolver  # noqa: E402
from dns_server import DkimKey, DnsServer  # noqa: E402

from gateway.config import AuthConfig  # noqa: E402
from gateway.sender_auth import verify_sender  # noqa: E402

REPORT = ("From: Jan Kowalski <jan@example.com>\r\nTo: serwis@s4e.pl\r\n"
          "Subject: Awaria serwera\r\nMessage-ID: <b1@example.com>\r\n"
          "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")


def message(size: int) -> bytes:
    if size < 100_000:
        body = ("Opis problemu: serwer nie startuje po aktualizacji.\r\n" * (size // 54)).encode()
        return (REPORT + "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode() + body
    log = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (REPORT + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            "Content-Type: text/plain\r\n\r\nZgloszenie w zalaczniku.\r\n--b\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + log + b"--b--\r\n"


def timed(fn: Callable[[], object], rounds: int) -> float:
    """Median seconds of one call."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def loop_stall(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds fn takes in a thread, longest delay of a 5 ms timer on the loop meanwhile):
    how long the work holds the GIL at a stretch, as the SMTP intake would feel it."""
    worst, done = 0.0, False

    async def tick() -> None:
        nonlocal worst
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - started - 0.005)

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    await asyncio.to_thread(fn)
    elapsed = time.perf_counter() - started
    done = True
    await ticker
    return elapsed, worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()

    server = DnsServer()
    server.start()
    key = DkimKey.generate()
    server.add_dkim_key("example.com", "sel", key)
    server.add_txt("_dmarc.example.com", "v=DMARC1; p=reject")
    server.add_txt("example.com", "v=spf1 ip4:192.0.2.10 -all")
    server.time_out("slow.example")
    config = AuthConfig(verify="dns", resolver=server.address, timeout="2s")

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        return b"".join(answer.rrset[0].strings)

    print(f"rounds: {args.rounds} (median per call)")
    for label, size in (("5 KB", 5_000), ("1 MB", 1_000_000)):
        raw = key.sign(message(size), domain="example.com")
        verdict = verify_sender(raw, peer="198.51.100.7:25", mail_from="jan@example.com",
                                config=config)
        assert verdict.passed, verdict
        ours = timed(lambda raw=raw: verify_sender(raw, peer="198.51.100.7:25",
                                                   mail_from="jan@example.com",
                                                   config=config),
                     args.rounds)
        base = timed(lambda raw=raw: dkim.verify(raw, dnsfunc=dnsfunc), args.rounds)
        print(f"{label}: verify_sender {ours * 1000:.2f} ms, dkim.verify {base * 1000:.2f} ms,"
              f" ratio {ours / base:.2f}x")

    raw = key.sign(message(20_000_000), domain="example.com")
    for label, check in (
            ("verify_sender", lambda: verify_sender(raw, peer="198.51.100.7:25",
                                                    mail_from="jan@example.com", config=config)),
            ("dkim.verify", lambda: dkim.verify(raw, dnsfunc=dnsfunc))):
        elapsed, stall = asyncio.run(loop_stall(check))
        print(f"20 MB in a thread beside an event loop: {label} {elapsed:.2f} s, "
              f"longest loop stall {stall * 1000:.0f} ms")

    trusted = AuthConfig(trusted_authserv_ids=("mx.s4e.pl",))
    raw = (b"Authentication-Results: mx.s4e.pl; dmarc=pass header.from=example.com\r\n"
           + message(5_000))
    fast = timed(lambda: verify_sender(raw, peer="", mail_from="", config=trusted), args.rounds)
    print(f"trusted Authentication-Results, 5 KB: {fast * 1000:.3f} ms")

    slow = message(5_000).replace(b"jan@example.com", b"jan@slow.example")
    started = time.perf_counter()
    verdict = verify_sender(slow, peer="198.51.100.7:25", mail_from="jan@slow.example",
                            config=config)
    print(f"DNS never answers (timeout 2s): {time.perf_counter() - started:.2f} s, "
          f"{verdict.result}: {verdict.reason}")
    server.stop()


if __name__ == "__main__":
    main()
