"""Benchmark of gateway.parser.parse_report against the plain stdlib way of reading a mail.

    python bench/bench_parse.py [--corpus DIR] [--rounds N]

1. Messages per second over the real-world corpus (../shared/corpus by default), for
   parse_report and for the baseline: `email.message_from_bytes(raw, policy=default)`,
   `get_body()` and its content, and the decoded content of every other leaf part.
2. One generated 27 MB message (a Polish text body and a 20 MB log as base64): time and
   peak memory of each, every measurement in a fresh subprocess (tracemalloc peak of the
   call; growth of ru_maxrss over the process's peak before the call).
Goals: parse_report time <= 1.5x the baseline's, peak memory <= 5x the message size.
"""

from __future__ import annotations

import argparse
import base64
import email
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from email import policy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.parser import parse_report  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"
LOG_BYTES = 20_000_000

BODY = """Dzień dobry,

1. Imię i nazwisko osoby zgłaszającej problem: Jan Kowalski
2. Dane kontaktowe osoby zgłaszającej (mail, telefon): jan.kowalski@firma.pl, tel. 600 100 200
3. Adres instalacji sprzętu – realizacji naprawy: ul. Długa 5, 31-147 Kraków
4. Opis problemu: Serwer kopii zapasowych nie uruchamia się po aktualizacji.
5. Numer seryjny urządzenia / numer Commcell ID: SN-7788-AB
6. Logi z urządzenia, o ile są dostępne: w załączniku (cvd.log)

Pozdrawiam
Jan Kowalski
"""


def baseline(raw: bytes) -> None:
    """What a straightforward reader does: parse, take the body, read every other part."""
    msg = email.message_from_bytes(raw, policy=policy.default)
    body = msg.get_body(preferencelist=("plain", "html"))
    if body is not None:
        body.get_content()
    for part in msg.walk():
        if not part.is_multipart() and part is not body:
            part.get_payload(decode=True)


def run_parser(raw: bytes) -> None:
    parse_report(raw)


FUNCS = {"parse_report": run_parser, "baseline": baseline}


def big_message() -> bytes:
    line = b"2025-03-10 09:12:44.123 cvd 4711 ERROR [JobManager] job 123456 failed: 19:1131\n"
    log = (line * (LOG_BYTES // len(line) + 1))[:LOG_BYTES]
    return (
        b"From: Jan Kowalski <jan.kowalski@firma.pl>\r\nTo: serwis@s4e.pl\r\n"
        b"Subject: =?UTF-8?Q?Awaria_serwera_kopii?=\r\nMessage-ID: <big@firma.pl>\r\n"
        b"Date: Mon, 10 Mar 2025 09:12:40 +0100\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + BODY.encode().replace(b"\n", b"\r\n")
        + b"\r\n--b1\r\nContent-Type: text/plain; name=cvd.log\r\n"
        b"Content-Disposition: attachment; filename=cvd.log\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(log).replace(b"\n", b"\r\n")
        + b"\r\n--b1--\r\n"
    )


def corpus_rate(func, messages: list[bytes], rounds: int) -> tuple[float, int]:
    """Messages per second over `rounds` passes; and how many messages raised."""
    failures = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for raw in messages:
            try:
                func(raw)
            except Exception:
                failures += 1
    elapsed = time.perf_counter() - start
    return rounds * len(messages) / elapsed, failures // rounds


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_growth(func, raw: bytes) -> float:
    """Peak RSS during the call minus RSS before it. Linux: the peak (VmHWM) is reset
    first through /proc/self/clear_refs; elsewhere ru_maxrss, which misses a peak that
    stays below an earlier one."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before, field = _status_kib("VmRSS"), "VmHWM"
    except OSError:
        before, field = None, None
    if before is None or field is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    func(raw)
    after = _status_kib(field) if field else None
    if after is None:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024


def measure_child(name: str, path: str) -> dict[str, float]:
    """In a fresh process: RSS growth of a first call, best-of-3 time, tracemalloc peak."""
    raw = Path(path).read_bytes()
    func = FUNCS[name]
    growth = rss_growth(func, raw)
    times = []
    for _ in range(3):
        gc.collect()
        start = time.perf_counter()
        func(raw)
        times.append(time.perf_counter() - start)
    gc.collect()
    tracemalloc.start()
    func(raw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"time": min(times), "tracemalloc_peak": peak, "rss_growth": growth}


def measure(name: str, path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, path],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(*args.child)))
        return

    messages = [p.read_bytes() for p in sorted(args.corpus.rglob("*.eml"))]
    print(f"corpus: {len(messages)} messages, {sum(map(len, messages)):,} bytes, "
          f"{args.rounds} rounds")
    rates = {}
    for name, func in FUNCS.items():
        func(messages[0])  # warm up imports and caches
        rates[name], failures = corpus_rate(func, messages, args.rounds)
        print(f"  {name:13s} {rates[name]:9.0f} msg/s   (raised on {failures} messages)")
    print(f"  parse_report / baseline throughput: {rates['parse_report'] / rates['baseline']:.2f}x")

    raw = big_message()
    size = len(raw)
    with tempfile.NamedTemporaryFile(suffix=".eml") as tmp:
        tmp.write(raw)
        tmp.flush()
        print(f"\nbig message: {size / 1e6:.1f} MB ({LOG_BYTES / 1e6:.0f} MB log as base64)")
        results = {name: measure(name, tmp.name) for name in FUNCS}
    for name, r in results.items():
        print(f"  {name:13s} time {r['time']:6.3f} s   tracemalloc peak {r['tracemalloc_peak'] / 1e6:7.1f} MB"
              f" ({r['tracemalloc_peak'] / size:.2f}x size)   RSS growth {r['rss_growth'] / 1e6:7.1f} MB"
              f" ({r['rss_growth'] / size:.2f}x size)")
    ours, base = results["parse_report"], results["baseline"]
    print(f"  time ratio parse_report / baseline: {ours['time'] / base['time']:.2f}x (goal <= 1.5x)")
    print(f"  peak parse_report / message size: {ours['tracemalloc_peak'] / size:.2f}x tracemalloc, "
          f"{ours['rss_growth'] / size:.2f}x RSS (goal <= 5x)")


if __name__ == "__main__":
    main()
