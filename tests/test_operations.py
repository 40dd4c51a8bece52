"""Running it as ops do: systemd notification, SIGHUP, STARTTLS, LMTP, metrics, logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.attachment_store import FileAttachments
from gateway.cli import _EscapingFormatter
from gateway.config import load_config
from gateway.daemon import Gateway
from tests.conftest import CRM, INTAKE, REPORT_BODY, make_mail, run_sql, send, wait_for, write_config, write_lock_held
from tests.test_daemon_process import free_port

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL

ROOT = Path(__file__).resolve().parent.parent


def test_notify_socket_ready_watchdog_reload_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(60)  # a daemon starting on a loaded CI machine
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{port}"\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    env.pop("WATCHDOG_PID", None)
    received: list[str] = []

    def until(marker: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = notify.recv(4096).decode()
            received.append(message)
            if marker in message.split("\n"):
                return
        raise AssertionError(f"{marker} not received: {received}")

    try:
        until("READY=1")
        ready = received[-1]
        assert "STATUS=listening" in ready and f"MAINPID={proc.pid}" in ready
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert sock.recv(100).startswith(b"220")  # READY means listening
        until("WATCHDOG=1")
        until("WATCHDOG=1")  # pinged repeatedly from the loop
        proc.send_signal(signal.SIGHUP)
        until("RELOADING=1")
        assert "MONOTONIC_USEC=" in received[-1]
        until("READY=1")
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        notify.close()


async def test_sighup_reloads_contracts(tmp_path: Path) -> None:
    contracts = tmp_path / "contracts.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-1,ACME,48\n")
    path = write_config(tmp_path, f'[tickets]\ncontracts = "{contracts}"\n')
    gw = Gateway(load_config(path))
    await gw.start(port=0)
    try:
        from gateway import store
        conn = await store.connect(gw.config.storage.database)
        assert await store.contract_hours(conn, ["SN-12345"]) is None
        contracts.write_text("device_id,customer,repair_hours\nSN-12345,ACME,8\n")
        await gw.reload()
        assert await store.contract_hours(conn, ["SN-12345"]) == 8
        contracts.write_text("device_id,customer\nbroken\n")
        await gw.reload()  # a broken file keeps the contracts already loaded
        assert await store.contract_hours(conn, ["SN-12345"]) == 8
        await conn.close()
    finally:
        await gw.stop(grace=1)


async def test_starttls_with_a_generated_certificate(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("gw.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    path = write_config(tmp_path, "")
    text = path.read_text().replace(
        'hostname = "gw.test"\n',
        f'hostname = "gw.test"\ntls_cert = "{cert_path}"\ntls_key = "{key_path}"\n')
    path.write_text(text)
    gw = Gateway(load_config(path))
    await gw.start(port=0)
    try:
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)

        def deliver() -> str:
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client:
                client.ehlo("client.test")
                assert client.has_extn("starttls")
                client.starttls(context=client_context)
                client.ehlo("client.test")
                client.sendmail("jan@example.com", [INTAKE], make_mail(message_id="<tls@example.com>"))
                return client.sock.version()

        assert (await asyncio.to_thread(deliver)).startswith("TLS")
        from gateway import store
        conn = await store.connect(gw.config.storage.database)
        assert [r.message_id for r in await store.list_inbound(conn)] == ["<tls@example.com>"]
        await conn.close()
    finally:
        await gw.stop(grace=1)


async def test_lmtp_over_a_unix_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "lmtp.sock"
    path = write_config(tmp_path, "")
    path.write_text(path.read_text().replace(
        'hostname = "gw.test"\n', f'hostname = "gw.test"\nlmtp_socket = "{sock_path}"\n'))
    gw = Gateway(load_config(path))
    await gw.start(port=0)
    try:
        assert oct(sock_path.stat().st_mode & 0o777) == "0o666"

        def deliver() -> dict:
            client = smtplib.LMTP(str(sock_path))
            try:
                return client.sendmail("jan@example.com", [INTAKE, CRM, "x@example.com"],
                                       make_mail(body=REPORT_BODY, message_id="<lmtp@example.com>"))
            finally:
                client.quit()

        refused = await asyncio.to_thread(deliver)
        assert list(refused) == ["x@example.com"]
        from gateway import store
        conn = await store.connect(gw.config.storage.database)
        rows = await store.list_inbound(conn)
        assert [(r.message_id, r.rcpt_tos) for r in rows] == [("<lmtp@example.com>", (INTAKE, CRM))]
        await conn.close()
    finally:
        await gw.stop(grace=1)
    assert not sock_path.exists()


def http_get(url: str) -> tuple[int, str, str]:
    """Blocking GET: (status, content type, body); HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # a loaded CI machine
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


async def scrape(gw: Gateway, path: str = "/metrics") -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, f"http://127.0.0.1:{gw.metrics_port}{path}")


def samples(text: str) -> dict[str, float]:
    """The exposition parsed by prometheus_client's own parser: {"name{labels}": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


@contextlib.asynccontextmanager
async def metrics_gateway(tmp_path: Path, **options: object) -> AsyncIterator[Gateway]:
    """A gateway with its metrics listener on 127.0.0.1 (ephemeral port)."""
    gw = Gateway(load_config(write_config(tmp_path, '[metrics]\nlisten = "127.0.0.1:0"\n')),
                 **options)
    await gw.start(port=0)
    try:
        yield gw
    finally:
        await gw.stop(grace=1)


async def test_metrics_are_scraped_over_http(tmp_path: Path) -> None:
    from gateway import __version__

    async with metrics_gateway(tmp_path) as gw:
        status, ctype, text = await scrape(gw)
        assert status == 200 and ctype.startswith("text/plain"), (status, text)
        before = samples(text)
        # Every labelled series exists from the start, with 0.
        for outcome in ("new", "follow_up", "held", "failed", "duplicate", "staff_reply"):
            assert before[f's4e_gateway_messages_total{{outcome="{outcome}"}}'] == 0
        for code in ("250", "451", "550", "552", "421"):
            assert before[f's4e_gateway_smtp_replies_total{{code="{code}"}}'] == 0
        for result in ("sent", "retry", "failed"):
            assert before[f's4e_gateway_outbox_sends_total{{result="{result}"}}'] == 0
        assert before[f's4e_gateway_build_info{{version="{__version__}"}}'] == 1
        for gauge in ("s4e_gateway_held", "s4e_gateway_inbound_failed", "s4e_gateway_outbox_failed",
                      "s4e_gateway_outbox_depth", "s4e_gateway_inbound_queued"):
            assert before[gauge] == 0, gauge

        await send(gw.port, "jan@example.com", [INTAKE], make_mail(body=REPORT_BODY,
                                                                   message_id="<m1@example.com>"))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await send(gw.port, "jan@example.com", ["x@gmail.com"], make_mail())

        async def scraped() -> dict[str, float] | None:
            # A scrape reads the gauges from the database, then renders the counters: a
            # send committed between the two shows as sent with the row still waiting.
            found = samples((await scrape(gw))[2])
            done = (found['s4e_gateway_outbox_sends_total{result="sent"}'] == 1
                    and found["s4e_gateway_outbox_depth"] == 0)
            return found if done else None

        after = await wait_for(scraped)
        assert after['s4e_gateway_messages_total{outcome="new"}'] == 1
        assert after['s4e_gateway_smtp_replies_total{code="550"}'] == 1
        assert after['s4e_gateway_smtp_replies_total{code="250"}'] >= 1
        assert after["s4e_gateway_processing_seconds_count"] == 1
        assert after["s4e_gateway_send_failures_total"] == 0

        # Gauges are read from the database at the scrape: no housekeeping lag.
        database = gw.config.storage.database
        ((inbound_id,),) = run_sql(database, "SELECT id FROM inbound")
        run_sql(database, "INSERT INTO held (inbound_id, sender, subject, reason, created_at)"
                " VALUES (?, 'x@example.com', 's', 'test', '2026-01-01T00:00:00+00:00')",
                (inbound_id,))
        run_sql(database, "UPDATE outbox SET status = 'failed'")
        now = samples((await scrape(gw))[2])
        assert now["s4e_gateway_held"] == 1 and now["s4e_gateway_outbox_failed"] == 1

        status, _, body = await scrape(gw, "/nothing-here")
        assert status == 404 and "/metrics" in body


# What dashboards and alerts query (README, "Metrics"): family name -> type.
SCRAPED_FAMILIES = {
    "s4e_gateway_messages": "counter",
    "s4e_gateway_smtp_replies": "counter",
    "s4e_gateway_outbox_sends": "counter",
    "s4e_gateway_send_failures": "counter",
    "s4e_gateway_processing_seconds": "histogram",
    "s4e_gateway_inbound_queued": "gauge",
    "s4e_gateway_inbound_failed": "gauge",
    "s4e_gateway_held": "gauge",
    "s4e_gateway_outbox_depth": "gauge",
    "s4e_gateway_outbox_oldest_age_seconds": "gauge",
    "s4e_gateway_outbox_failed": "gauge",
    "s4e_gateway_build_info": "gauge",
}


async def scrape_exposition(tmp_path: Path) -> str:
    """/metrics of a fresh gateway, checked as a scraper needs it: 200, the text
    exposition format, every family the README names with its type."""
    from prometheus_client.parser import text_string_to_metric_families

    async with metrics_gateway(tmp_path) as gw:
        status, ctype, text = await scrape(gw)
    assert status == 200, (status, text)
    assert ctype.startswith("text/plain; version=") and ctype.endswith("charset=utf-8"), ctype
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {name: families.get(name) for name in SCRAPED_FAMILIES} == SCRAPED_FAMILIES
    return text


async def test_metrics_answer_200_in_the_text_format_with_the_documented_names(
        tmp_path: Path) -> None:
    text = await scrape_exposition(tmp_path)
    for series in ("s4e_gateway_messages_total", "s4e_gateway_processing_seconds_bucket",
                   "s4e_gateway_processing_seconds_count", "s4e_gateway_outbox_depth"):
        assert any(line.startswith(series) for line in text.splitlines()), series


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="no promtool (.ci/run takes it out of Debian's prometheus package)")
async def test_metric_names_pass_promtool(tmp_path: Path) -> None:
    text = await scrape_exposition(tmp_path)  # an empty 200 would pass promtool
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_healthz_200_when_healthy_503_when_the_outbox_is_stuck(tmp_path: Path) -> None:
    import json

    class StuckRelay:
        """A relay that never answers: the mail stays `sending`."""

        async def send(self, mail_from: str, rcpt_to: str, raw: bytes, message_id: str) -> None:
            await asyncio.Event().wait()

    async with metrics_gateway(tmp_path, transport=StuckRelay()) as gw:
        status, ctype, body = await scrape(gw, "/healthz")
        assert status == 200 and ctype == "application/json", body
        health = json.loads(body)
        assert health["status"] == "ok" and health["problems"] == []
        assert health["checks"]["database"] == "writable"

        # A mail that has been due for an hour and is still not sent.
        database = gw.config.storage.database
        ((outbox_id,),) = run_sql(
            database, "INSERT INTO outbox (kind, message_id, mail_from, rcpt_to, subject, auto,"
            " next_attempt_at, queued_at, created_at) VALUES ('acknowledgement',"
            " '<x@gw>', 'crm@s4e.pl', 'jan@example.com', 's', 1, ?, ?, ?) RETURNING id",
            ("2020-01-01T00:00:00+00:00",) * 3)
        run_sql(database, "INSERT INTO outbox_raw (id, raw) VALUES (?, ?)", (outbox_id, b"\0"))
        gw.mailer.wake()
        status, _, body = await scrape(gw, "/healthz")
        health = json.loads(body)
        assert status == 503, body
        assert health["status"] == "failing"
        assert any(p.startswith("outbox stuck") for p in health["problems"]), health


async def test_healthz_503_when_the_database_cannot_be_written(tmp_path: Path) -> None:
    import json

    async with metrics_gateway(tmp_path) as gw:
        with write_lock_held(gw.config.storage.database):  # e.g. a stuck process
            status, _, body = await scrape(gw, "/healthz")
            assert status == 503, body
            # "database is locked", or no turn within the deadline when this process's
            # own writers wait on the same lock first (a loaded machine)
            problem = json.loads(body)["problems"][0]
            assert problem.startswith(("database not writable: database: ",
                                       "database not writable: no write within")), problem
        assert (await scrape(gw, "/healthz"))[0] == 200


def test_log_lines_escape_cr_lf_and_start_with_their_priority() -> None:
    formatter = _EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1,
                               "%s outcome=%s", ("<a\r\nInjected: yes>", "new"), None)
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line
    assert line == "<6>INFO gateway: <a\\r\\nInjected: yes> outcome=new"
    for level, prefix in ((logging.ERROR, "<3>"), (logging.CRITICAL, "<3>"),
                          (logging.WARNING, "<4>"), (logging.DEBUG, "<7>")):
        record = logging.LogRecord("gateway", level, __file__, 1, "x", (), None)
        assert formatter.format(record).startswith(prefix)
    try:
        raise ValueError("a real bug")
    except ValueError:
        record = logging.LogRecord("gateway", logging.ERROR, __file__, 1, "bug", (),
                                   sys.exc_info())
    lines = formatter.format(record).split("\n")
    # A real bug keeps its traceback, every line filed under the record's priority.
    assert lines[0] == "<3>ERROR gateway: bug" and lines[1] == "<3>Traceback (most recent call last):"
    assert all(ln.startswith("<3>") for ln in lines) and lines[-1] == "<3>ValueError: a real bug"


def formatted_errors(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    """The captured records of `level` and above as the daemon writes them to stderr."""
    formatter = _EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    return [formatter.format(r) for r in caplog.records
            if r.levelno >= level and r.name.startswith("gateway")]


async def test_disk_full_while_processing_leaves_the_message_queued(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SPEC §4: a failure of the environment is never `failed`; the message is retried."""
    import sqlite3

    from gateway import store
    from gateway.processor import Processed

    calls: list[int] = []

    async def disk_full_once(conn, row) -> Processed:  # the stages, with a full disk first
        calls.append(row.id)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        await store.mark_inbound(conn, row.id, state="done", outcome="new")
        return Processed(None)

    gw = Gateway(load_config(write_config(tmp_path, "")), stages=disk_full_once)
    await gw.start(port=0)
    caplog.set_level(logging.INFO)
    conn = await store.connect(gw.config.storage.database)
    try:
        await send(gw.port, "jan@example.com", [INTAKE], make_mail(message_id="<full@example.com>"))

        async def done():
            rows = await store.list_inbound(conn)
            return rows if rows and rows[0].state == "done" else None

        (row,) = await wait_for(done, timeout=30)
        assert calls == [row.id, row.id] and row.outcome == "new"
    finally:
        await conn.close()
        await gw.stop(grace=1)
    lines = formatted_errors(caplog, logging.WARNING)
    assert lines == ["<4>WARNING gateway.processor: <full@example.com> inbound 1: "
                     "OperationalError: database or disk is full; kept queued, retry in 1s"]


def test_configuration_error_exits_78_from_serve_and_check_config(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[smtp]\nlisten = "localhost"\n')
    for command in ("serve", "check-config"):
        result = subprocess.run([sys.executable, "-m", "gateway", command, "--config", str(config)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 78, (command, result.stderr)
        assert "smtp.listen" in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1
    # The daemon's line carries its priority for the journal.
    serve = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert serve.stderr.startswith("<3>")
    # Another user error stays exit 1.
    other = subprocess.run([sys.executable, "-m", "gateway", "tickets", "show", "12",
                            "--config", str(tmp_path / "missing.toml")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert other.returncode == 1, other.stderr
    unit = (ROOT / "deploy/s4e-gateway.service").read_text()
    assert "\nRestartPreventExitStatus=78\n" in unit


def test_daemon_log_lines_carry_syslog_priorities(tmp_path: Path) -> None:
    port, dead_relay = free_port(), free_port()
    contracts = tmp_path / "contracts.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-1,ACME,48\n")
    config = tmp_path / "gw.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{port}"\n'
                      f'[outbound]\nrelay = "127.0.0.1:{dead_relay}"\n'
                      f'[tickets]\ncontracts = "{contracts}"\n')
    # The notify socket says when the reload below is done (READY=1 after RELOADING=1):
    # SIGTERM a fixed second after SIGHUP could stop a loaded CI machine's daemon first.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        from tests.test_daemon_process import wait_listening
        wait_listening(proc, port)
        from tests.conftest import smtp_send
        smtp_send(port, "jan@example.com", [INTAKE],
                  make_mail(body=REPORT_BODY, message_id="<prio@example.com>"))
        import sqlite3
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the acknowledgement meets the dead relay
            db = sqlite3.connect(tmp_path / "var/gateway.db")
            tried = db.execute("SELECT count(*) FROM outbox WHERE attempts > 0"
                               " AND status = 'pending'").fetchone()[0]
            db.close()
            if tried:
                break
            time.sleep(0.2)
        # A broken contracts file: the reload keeps the old ones and says so (error).
        contracts.write_text("device_id,customer\nbroken\n")
        proc.send_signal(signal.SIGHUP)
        said: list[str] = []  # READY=1 of the start, then the reload's two
        while "RELOADING=1" not in said or "READY=1" not in said[said.index("RELOADING=1"):]:
            said += notify.recv(4096).decode().split("\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        notify.close()
    lines = err.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    assert lines and all(ln[:3] in ("<3>", "<4>", "<6>", "<7>") for ln in lines), lines
    assert any(ln.startswith("<6>") and "listening on" in ln for ln in lines)
    assert any(ln.startswith("<4>") and "temporary failure" in ln for ln in lines), "\n".join(lines)
    assert any(ln.startswith("<3>") and "contracts not loaded" in ln for ln in lines), "\n".join(lines)
    assert "Traceback" not in err.decode()


async def test_sighup_reloads_the_tls_certificate(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(cert) -> None:
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))

    old = ca.issue_cert("gw.test", "127.0.0.1", organization_name="Old certificate")
    install(old)
    path = write_config(tmp_path, "")
    path.write_text(path.read_text().replace(
        'hostname = "gw.test"\n',
        f'hostname = "gw.test"\ntls_cert = "{cert_path}"\ntls_key = "{key_path}"\n'))
    gw = Gateway(load_config(path))
    await gw.start(port=0)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    def peer_organisation() -> str:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as client:
            client.starttls(context=client_context)
            subject = dict(item[0] for item in client.sock.getpeercert()["subject"])
            client.noop()
            return subject["organizationName"]

    try:
        assert await asyncio.to_thread(peer_organisation) == "Old certificate"
        install(ca.issue_cert("gw.test", "127.0.0.1", organization_name="Renewed certificate"))
        await gw.reload()
        assert await asyncio.to_thread(peer_organisation) == "Renewed certificate"
        # A broken new pair (the key of another certificate) keeps the one in use.
        other = ca.issue_cert("gw.test", "127.0.0.1", organization_name="Mismatch")
        other.private_key_pem.write_to_path(str(key_path))
        await gw.reload()
        assert await asyncio.to_thread(peer_organisation) == "Renewed certificate"
    finally:
        await gw.stop(grace=1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "deploy/s4e-gateway.service").read_text()
    executable = Path(sys.executable).with_name("s4e-gateway")
    if not executable.exists():
        pytest.skip("console script not installed next to the interpreter")
    unit = unit.replace("/opt/s4e-gateway/bin/s4e-gateway", str(executable))
    copy = tmp_path / "s4e-gateway.service"
    copy.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=60)
    problems = [ln for ln in (result.stdout + result.stderr).splitlines()
                if "s4e-gateway.service" in ln]
    assert problems == [] and result.returncode == 0, result.stdout + result.stderr


def test_check_config_accepts_an_lmtp_socket_systemd_will_create(tmp_path: Path) -> None:
    import uuid

    folder = Path("/run") / f"s4e-gateway-test-{uuid.uuid4().hex[:8]}"
    assert not folder.exists()
    config = tmp_path / "gw.toml"
    config.write_text(f'[smtp]\nlmtp_socket = "{folder}/lmtp.sock"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                             str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"smtp.lmtp_socket: folder {folder} does not exist yet" in result.stderr
    assert f"RuntimeDirectory={folder.name}" in result.stderr
    # Anywhere else a missing folder is still an error naming the key.
    config.write_text(f'[smtp]\nlmtp_socket = "{tmp_path}/nowhere/lmtp.sock"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                             str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 and "smtp.lmtp_socket: folder" in result.stderr


@pytest.mark.sqlite_only  # backup copies a SQLite file
async def test_backup_while_the_gateway_takes_mail(tmp_path: Path) -> None:
    import hashlib
    import json
    import sqlite3
    from email import message_from_bytes, policy

    from tests.conftest import running_desk

    (tmp_path / "gw").mkdir()
    async with running_desk(tmp_path / "gw") as desk:
        msg = message_from_bytes(make_mail(body=REPORT_BODY, message_id="<first@example.com>"),
                                 policy=policy.default)
        log_bytes = b"ERROR controller 0: battery failed\n" * 200
        msg.add_attachment(log_bytes, maintype="text", subtype="plain", filename="ctrl.log")
        first = await desk.mail(msg.as_bytes())

        async def more_mail() -> None:  # the gateway keeps taking mail during the copy
            for i in range(15):
                await send(desk.gw.port, "jan@example.com", [INTAKE],
                           make_mail(body=REPORT_BODY, message_id=f"<load{i}@example.com>"))

        load = asyncio.create_task(more_mail())
        dest = tmp_path / "backup"
        _, out, _ = await desk.cli("backup", str(dest))
        await load
        assert f"database: {dest / 'gateway.db'}" in out and "attachments:" in out
        # Again into the same folder: the database is replaced, attachments are there.
        _, out, _ = await desk.cli("backup", str(dest))
        assert "0 copied" in out and "1 already there" in out

    db = sqlite3.connect(dest / "gateway.db")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one self-contained file
    db.close()
    assert not (dest / "gateway.db-wal").exists()
    # The copy opens with the gateway's own CLI and holds the tickets.
    copy_config = tmp_path / "copy.toml"
    copy_config.write_text(f'[storage]\ndatabase = "{dest}/gateway.db"\n'
                           f'attachments = "{dest}/attachments"\n')
    from tests.conftest import run_cli_sync
    code, out, err = await asyncio.to_thread(run_cli_sync, "tickets", "list", "--json",
                                             "--config", str(copy_config))
    assert code == 0, err
    numbers = [t["number"] for t in json.loads(out)]
    assert first["ticket"] in numbers
    db = sqlite3.connect(dest / "gateway.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    files = [p for p in (dest / "attachments").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in files] == [log_bytes]
    assert files[0].name == hashlib.sha256(log_bytes).hexdigest()


@pytest.mark.sqlite_only  # backup copies a SQLite file
def test_backup_to_a_file_and_errors_are_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli_sync

    config = write_config(tmp_path, "")
    assert run_cli_sync("migrate", "--config", str(config))[0] == 0
    code, out, err = run_cli_sync("backup", str(tmp_path / "copy.db"), "--config", str(config))
    assert code == 0 and "attachments not copied" in out, err
    code, _, err = run_cli_sync("backup", str(tmp_path / "gw.db"), "--config", str(config))
    assert code == 1 and "is the database itself" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    other = write_config(empty, "")
    code, _, err = run_cli_sync("backup", str(tmp_path / "x.db"), "--config", str(other))
    assert code == 1 and "no database to back up" in err and err.count("\n") == 1


def old_database(path: Path, version: int = 3) -> None:
    """A database an older gateway left: schema `version`, one row of data."""
    import sqlite3

    from gateway import store

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
               " applied_at TEXT NOT NULL)")
    for migration in store.load_migrations()[:version]:
        db.executescript(migration.sql)
        db.execute("INSERT INTO schema_version VALUES (?, ?, 'then')",
                   (migration.version, migration.name))
    db.execute("INSERT INTO settings VALUES ('old', 'data')")
    db.commit()
    db.close()


@pytest.mark.sqlite_only  # the copy is of a SQLite file
def test_migrate_copies_the_database_before_changing_the_schema(tmp_path: Path) -> None:
    import sqlite3

    from tests.conftest import run_cli_sync

    config = write_config(tmp_path, "")
    old_database(tmp_path / "gw.db")

    code, out, err = run_cli_sync("migrate", "--config", str(config))
    assert code == 0, err
    (copy,) = tmp_path.glob("gw.db.v0003-*.bak")
    assert f"copy of the database before migrating: {copy}" in out
    old = sqlite3.connect(copy)
    assert old.execute("SELECT max(version) FROM schema_version").fetchone() == (3,)
    assert old.execute("SELECT value FROM settings WHERE key = 'old'").fetchone() == ("data",)
    old.close()
    # Up to date: nothing to change, no copy.
    code, out, _ = run_cli_sync("migrate", "--config", str(config))
    assert code == 0 and "copy" not in out and len(list(tmp_path.glob("*.bak"))) == 1


# --- storage: attachments once, keep_raw ------------------------------------------------

def mail_with_attachment(data: bytes, *, message_id: str, filename: str = "logs.zip",
                         body: str = REPORT_BODY) -> bytes:
    from email import message_from_bytes, policy

    msg = message_from_bytes(make_mail(body=body, message_id=message_id), policy=policy.default)
    msg.add_attachment(data, maintype="application", subtype="zip", filename=filename)
    return msg.as_bytes(policy=policy.SMTP)


def test_cut_and_restore_give_the_raw_back_byte_for_byte() -> None:
    import base64
    import hashlib

    from gateway.attachments import Span, cut_attachments, encode, restore_raw
    from gateway.model import Attachment

    data = os.urandom(20_000)
    att = Attachment("a.bin", "application/octet-stream", len(data),
                     hashlib.sha256(data).hexdigest(), False, data)
    text = base64.b64encode(data)
    for line, eol in ((76, b"\r\n"), (76, b"\n"), (72, b"\r\n"), (64, b"\n")):
        body = eol.join(text[i:i + line] for i in range(0, len(text), line))
        raw = b"Subject: x" + eol + eol + b"--b" + eol + body + eol + b"--b--" + eol
        raw += b"again:" + eol + body + eol  # the same attachment twice: both cut
        stored, spans = cut_attachments(raw, [att])
        assert len(spans) == 2 and len(stored) < 200
        assert restore_raw(stored, spans, lambda sha: data) == raw
        assert encode(data, spans[0]) == body
    # Encoded otherwise (here: 50-character lines): nothing is cut, the raw stays whole.
    odd = b"\r\n".join(text[i:i + 50] for i in range(0, len(text), 50))
    assert cut_attachments(b"x\r\n\r\n" + odd, [att]) == (b"x\r\n\r\n" + odd, ())
    # Small attachments stay inside the raw.
    small = Attachment("s", "text/plain", 10, hashlib.sha256(b"0123456789").hexdigest(), True,
                       b"0123456789")
    assert cut_attachments(b"x\n\n0123456789\n", [small]) == (b"x\n\n0123456789\n", ())
    assert Span(0, "0" * 64, "plain", 0, "\r\n") == Span(0, "0" * 64, "plain", 0, "\r\n")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=3000), before=st.binary(max_size=200),
       after=st.binary(max_size=200), line=st.sampled_from([76, 72, 64, 50]),
       eol=st.sampled_from([b"\r\n", b"\n"]), plain=st.booleans())
def test_cut_raw_always_restores_exactly(data, before, after, line, eol, plain) -> None:
    import base64
    import hashlib

    from gateway.attachments import cut_attachments, restore_raw
    from gateway.model import Attachment

    att = Attachment("a", "application/octet-stream", len(data),
                     hashlib.sha256(data).hexdigest(), False, data)
    text = base64.b64encode(data)
    body = data if plain else eol.join(text[i:i + line] for i in range(0, len(text), line))
    raw = before + body + after + body[: len(body) // 2]
    stored, spans = cut_attachments(raw, [att], min_size=1)
    assert restore_raw(stored, spans, lambda sha: data) == raw
    assert len(stored) <= len(raw)


def test_a_repetitive_body_is_cut_in_a_few_passes_not_one_per_line() -> None:
    """The same base64 line 20,000 times: every line looks like a start. Found once
    (when the encoding is exactly ours); otherwise left in the raw, never a check per
    line (which made a 26 MB message take hours)."""
    import base64
    import hashlib

    from gateway.attachments import cut_attachments, restore_raw
    from gateway.model import Attachment

    line = b"QUJD" * 19
    body = b"\r\n".join([line] * 20_000)
    data = base64.b64decode(b"".join([line] * 20_000))
    att = Attachment("dump.bin", "application/octet-stream", len(data),
                     hashlib.sha256(data).hexdigest(), False, data)
    raw = b"Subject: x\r\n\r\n--b\r\n\r\n" + body + b"\r\n--b--\r\n"
    stored, spans = cut_attachments(raw, [att])
    assert len(spans) == 1 and restore_raw(stored, spans, lambda sha: data) == raw
    # The same bytes wrapped otherwise near the end (one line broken in two): not our
    # encoding, so it stays, after a bounded look.
    lines = [line] * 20_000
    lines[-2:-1] = [line[:40], line[40:]]
    odd = raw.replace(body, b"\r\n".join(lines))
    assert cut_attachments(odd, [att]) == (odd, ())


def test_every_corpus_mail_round_trips_through_the_cut_raw() -> None:
    from gateway.attachments import cut_attachments, restore_raw
    from gateway.parser import parse_report
    from tests.test_parser_corpus import CORPUS_FILES

    if not CORPUS_FILES:
        pytest.skip("no corpus (../shared/corpus or $S4E_CORPUS)")
    for path in CORPUS_FILES:
        raw = path.read_bytes()
        report = parse_report(raw)
        by_hash = {a.sha256: a.data for a in report.attachments}
        stored, spans = cut_attachments(raw, report.attachments, min_size=64)
        assert restore_raw(stored, spans, by_hash.__getitem__) == raw, path


@pytest.mark.sqlite_only  # attachment files (PostgreSQL: test_pg_attachments)
async def test_an_attachment_is_stored_once_and_the_raw_comes_back_exactly(tmp_path: Path) -> None:
    import hashlib
    import sqlite3

    from gateway import store
    from tests.conftest import running_desk

    data = os.urandom(3 * 1024 * 1024)  # a 3 MB zip of logs: incompressible
    async with running_desk(tmp_path) as desk:
        row = await desk.mail(mail_with_attachment(data, message_id="<big@example.com>"))
        ticket = await desk.ticket(row["ticket"])
        assert [a["size"] for a in ticket["attachments"]] == [len(data)]
        db = sqlite3.connect(desk.db)
        (stored, spans, sha) = db.execute(
            "SELECT length(r.raw), r.spans, i.sha256 FROM inbound_raw r JOIN inbound i USING (id)"
        ).fetchone()
        db.close()
        # The database keeps the mail without the 4 MB of base64; the file has the bytes.
        assert stored < 20_000 and spans
        files = [p for p in desk.gw.config.storage.attachments.rglob("*") if p.is_file()]
        assert [p.read_bytes() == data for p in files] == [True]
        conn = await store.connect(desk.db)
        try:
            raw = await store.read_raw(conn, row["id"], FileAttachments(desk.gw.config.storage.attachments))
            assert hashlib.sha256(raw).hexdigest() == sha  # exactly as received
            with pytest.raises(store.StoreError, match="needs the attachment store"):
                await store.read_raw(conn, row["id"])
        finally:
            await conn.close()
        # What an engineer downloads is the message as received, attachment and all.
        shown = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "inbox", "show", str(row["id"]),
                             "--raw", "--config", str(desk.config_file)],
            capture_output=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert hashlib.sha256(shown.stdout).hexdigest() == sha
        # Reprocessing works on it as on any message.
        _, out, _ = await desk.cli("inbox", "reprocess", str(row["id"]))
        assert f"outcome new ticket #{row['ticket']}" in out
        # A lost attachment file: one clear error, never wrong bytes.
        files[0].unlink()
        conn = await store.connect(desk.db)
        try:
            with pytest.raises(store.StoreError, match=r"^inbound message \d+: attachment .* is missing"):
                await store.read_raw(conn, row["id"], FileAttachments(desk.gw.config.storage.attachments))
        finally:
            await conn.close()


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_keep_raw_drops_raw_mail_of_old_closed_tickets_only(tmp_path: Path) -> None:
    import sqlite3

    from tests.conftest import running_desk

    data = os.urandom(50_000)
    async with running_desk(tmp_path, storage='keep_raw = "30d"\n') as desk:
        old = await desk.mail(mail_with_attachment(data, message_id="<old@example.com>"))
        recent = await desk.mail(mail_with_attachment(data[::-1], message_id="<recent@example.com>"))
        still_open = await desk.mail(make_mail(body=REPORT_BODY, message_id="<open@example.com>"))
        for row in (old, recent):
            await desk.cli("tickets", "set-status", row["ticket"], "closed")
        db = sqlite3.connect(desk.db)
        db.execute("UPDATE tickets SET closed_at = '2020-01-01T00:00:00+00:00' WHERE number = ?",
                   (int(old["ticket"]),))
        db.commit()
        before = await desk.ticket(old["ticket"])
        await wait_for(lambda: db.execute("SELECT count(*) FROM outbox WHERE status != 'sent'")
                       .fetchone()[0] == 0)  # the closing notices have left

        assert await desk.gw._drop_old_raw(desk.gw._house_conn) >= 1  # one housekeeping round

        kept = {r[0] for r in db.execute("SELECT id FROM inbound_raw")}
        assert kept == {recent["id"], still_open["id"]}
        sent_raw = db.execute("SELECT count(*) FROM outbox o JOIN outbox_raw r USING (id)"
                              " WHERE o.ticket = ?", (int(old["ticket"]),)).fetchone()[0]
        assert sent_raw == 0  # what was sent for it is history too
        db.close()
        after = await desk.ticket(old["ticket"])
        assert after == before  # text, thread and attachments stay
        assert after["description"] and after["attachments"][0]["size"] == len(data)
        assert any(p.read_bytes() == data
                   for p in desk.gw.config.storage.attachments.rglob("*") if p.is_file())
        from gateway import store
        conn = await store.connect(desk.db)
        try:
            with pytest.raises(store.StoreError, match=r"raw mail dropped on .* \(storage.keep_raw\)"):
                await store.read_raw(conn, old["id"], FileAttachments(desk.gw.config.storage.attachments))
            assert await store.read_raw(conn, recent["id"], FileAttachments(desk.gw.config.storage.attachments))
        finally:
            await conn.close()
        assert await desk.gw._drop_old_raw(desk.gw._house_conn) == 0  # nothing more to do


def test_keep_raw_is_a_duration_or_empty(tmp_path: Path) -> None:
    from tests.conftest import run_cli_sync

    config = tmp_path / "gw.toml"
    config.write_text('[storage]\nkeep_raw = "for ever"\n')
    code, _, err = run_cli_sync("check-config", "--config", str(config))
    assert code == 78 and "storage.keep_raw: expected a duration" in err
    config.write_text('[storage]\nkeep_raw = "365d"\n')
    assert load_config(config).storage.keep_raw_seconds == 365 * 86400
    config.write_text('[storage]\nkeep_raw = ""\n')
    assert load_config(config).storage.keep_raw_seconds is None


async def test_healthz_503_when_the_disk_has_no_room(tmp_path: Path) -> None:
    import json

    from gateway import store
    from gateway.metrics import MetricsServer, Metrics, Probe

    config = load_config(write_config(tmp_path))
    conn = await store.connect(config.storage.database)
    await store.migrate(conn)
    # Room wanted: more than any disk has (the real check, with another threshold).
    server = MetricsServer(Metrics(), Probe(conn, config.storage.sqlite_path, min_free=2**62))
    port = await server.start("127.0.0.1", 0)
    try:
        status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/healthz")
    finally:
        await server.stop()
        await conn.close()
    assert status == 503
    (problem,) = json.loads(body)["problems"]
    assert problem.startswith("disk nearly full:") and str(tmp_path) in problem


def test_systemctl_reload_sighup_gives_new_sessions_the_renewed_certificate(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    from tests.test_daemon_process import wait_listening

    ca = trustme.CA()
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(organisation: str) -> None:
        cert = ca.issue_cert("gw.test", "127.0.0.1", organization_name=organisation)
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))

    install("Before renewal")
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert_path}"\n'
                      f'tls_key = "{key_path}"\n')
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    def organisation() -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.starttls(context=client_context)
            return dict(item[0] for item in client.sock.getpeercert()["subject"])["organizationName"]

    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, port)
        assert organisation() == "Before renewal"
        install("After renewal")
        assert organisation() == "Before renewal"  # files alone change nothing
        proc.send_signal(signal.SIGHUP)  # what `systemctl reload` sends (ExecReload)
        deadline = time.monotonic() + 60  # a loaded CI machine
        while organisation() != "After renewal":
            assert time.monotonic() < deadline, "the renewed certificate was not loaded"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert "<6>INFO gateway.daemon: TLS certificate reloaded" in err.decode()


@pytest.mark.sqlite_only  # the copy is of a SQLite file
async def test_serve_copies_the_database_before_its_own_migration(tmp_path: Path) -> None:
    import sqlite3

    old_database(tmp_path / "gw.db", version=2)
    gw = Gateway(load_config(write_config(tmp_path)))
    await gw.start(port=0)
    await gw.stop(grace=1)
    (copy,) = tmp_path.glob("gw.db.v0002-*.bak")
    db = sqlite3.connect(copy)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone() == (2,)
    db.close()
