"""The daemon as operators run it: `python -m gateway serve` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import INTAKE, make_mail, smtp_send


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_daemon(tmp_path: Path, port: int, smtp_extra: str = "",
                 preexec_fn=None, log: Path | None = None) -> subprocess.Popen:  # noqa: ANN001
    """`log`: the daemon's stderr goes to that file (appended), not to a pipe that a
    test running the daemon for long would have to drain."""
    config = tmp_path / "gw.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{port}"\n{smtp_extra}')
    stderr = subprocess.PIPE if log is None else log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        stdout=subprocess.PIPE if log is None else subprocess.DEVNULL, stderr=stderr,
        cwd=tmp_path, preexec_fn=preexec_fn)
    if log is not None:
        stderr.close()  # the child has its own descriptor
    return wait_listening(proc, port)


def wait_listening(proc: subprocess.Popen, port: int) -> subprocess.Popen:
    """Until the daemon answers 220 on `port` (it exited: its stderr in the error).
    60 s: a daemon starting on a loaded CI machine, imports and migrations included."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = proc.stderr.read().decode() if proc.stderr else "(its log file says)"
            raise AssertionError(f"daemon exited: {said}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if sock.recv(100).startswith(b"220"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("daemon did not start listening")


def test_serve_takes_mail_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = start_daemon(tmp_path, port)
    try:
        smtp_send(port, "jan@example.com", [INTAKE], make_mail(message_id="<one@example.com>"))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    db = sqlite3.connect(tmp_path / "var/gateway.db")
    assert db.execute("SELECT message_id FROM inbound").fetchall() == [("<one@example.com>",)]
    db.close()


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    proc = start_daemon(tmp_path, free_port())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def test_kill_9_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "daemon.log"
    proc = start_daemon(tmp_path, port, log=log)
    acknowledged: list[str] = []
    stopped: list[str] = []  # why a client stopped (before the kill: a failure to see)
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(400):  # bounded
            if stop.is_set():
                return
            mid = f"<c{n}.m{i}@example.com>"
            try:
                smtp_send(port, "load@example.com", [INTAKE],
                          make_mail(message_id=mid, body="log line\n" * 50))
            except (OSError, Exception) as err:  # the server died under us: not acknowledged
                with lock:
                    stopped.append(f"{type(err).__name__}: {err}")
                return
            with lock:
                acknowledged.append(mid)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # ample on a loaded CI machine: it ends at 60 mails
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 60, (stopped, log.read_text(errors="replace")[-4000:])

    proc = start_daemon(tmp_path, port, log=log)  # restart: the store opens and resumes
    try:
        db = sqlite3.connect(tmp_path / "var/gateway.db")
        stored = {row[0] for row in db.execute("SELECT message_id FROM inbound")}
        db.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    lost = [mid for mid in acknowledged if mid not in stored]
    assert lost == [], f"{len(lost)} acknowledged messages lost"
