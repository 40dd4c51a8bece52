"""Running it as ops do: systemd notification, SIGHUP, STARTTLS, LMTP, metrics, logs."""

from __future__ import annotations

import asyncio
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
import urllib.request
from pathlib import Path

import pytest

from gateway.cli import _EscapingFormatter
from gateway.config import load_config
from gateway.daemon import Gateway
from tests.conftest import CRM, INTAKE, REPORT_BODY, make_mail, send, wait_for, write_config
from tests.test_daemon_process import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_notify_socket_ready_watchdog_reload_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(20)
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{port}"\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    env.pop("WATCHDOG_PID", None)
    received: list[str] = []

    def until(marker: str) -> None:
        deadline = time.monotonic() + 20
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
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
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
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
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


async def test_metrics_are_scraped_over_http(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[metrics]\nlisten = "127.0.0.1:0"\n')
    gw = Gateway(load_config(path))
    await gw.start(port=0)
    try:
        await send(gw.port, "jan@example.com", [INTAKE], make_mail(body=REPORT_BODY,
                                                                   message_id="<m1@example.com>"))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await send(gw.port, "jan@example.com", ["x@gmail.com"], make_mail())
        url = f"http://127.0.0.1:{gw.metrics_port}/metrics"

        async def scraped() -> str | None:
            text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
            return text if 's4e_gateway_outbox_sends_total{result="sent"} 1.0' in text else None

        text = await wait_for(scraped)
        assert 's4e_gateway_messages_total{outcome="new"} 1.0' in text
        assert 's4e_gateway_smtp_replies_total{code="550"} 1.0' in text
        assert 's4e_gateway_smtp_replies_total{code="250"}' in text
        assert "s4e_gateway_processing_seconds_count 1.0" in text
        assert "s4e_gateway_outbox_depth" in text and "s4e_gateway_outbox_oldest_age_seconds" in text
        assert "s4e_gateway_send_failures_total 0.0" in text
        missing = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url.replace("/metrics", "/x"), timeout=5))
    except urllib.error.HTTPError as err:
        assert err.code == 404
    finally:
        await gw.stop(grace=1)


def test_log_lines_escape_cr_lf() -> None:
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1,
                               "%s outcome=%s", ("<a\r\nInjected: yes>", "new"), None)
    line = _EscapingFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\r" not in line
    assert line == "INFO gateway: <a\\r\\nInjected: yes> outcome=new"


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
