"""Prometheus metrics and /healthz on `[metrics] listen`.

Counters are counted as events happen; every labelled series exists from start-up
with 0 (so `increase()` and alerts see the first event). Gauges (queues, held and
failed mail) are read from the database when Prometheus scrapes, never from a
snapshot that lags. `/healthz` answers 200 with a JSON body when the database takes
a write, the disk has room and the outbox is moving, 503 with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import __version__, store
from gateway.errors import expected_failure

log = logging.getLogger(__name__)

# The outbox is "stuck" when mail has been due this long and is still not sent: the
# mailer picks due mail within seconds, and a relay send times out well before.
OUTBOX_STUCK_AFTER = timedelta(minutes=15)
# The disk must hold at least this much besides two messages of max_message_size.
MIN_FREE_BYTES = 64 * 1024 * 1024
HEALTH_BUSY_TIMEOUT_MS = 2000  # a database locked longer than this is not healthy
# The test write's turn behind this process's writers; a cancelled BEGIN still takes
# up to HEALTH_BUSY_TIMEOUT_MS to return, so /healthz answers within about 5 s.
HEALTH_WRITE_TIMEOUT = 3.0


def known_reply_codes() -> tuple[str, ...]:
    """The SMTP reply codes the edge can give: the codes of its REPLY_* constants."""
    from gateway import smtp_edge

    codes = {value[:3] for name, value in vars(smtp_edge).items()
             if name.startswith("REPLY_") and isinstance(value, str) and value[:3].isdigit()}
    return tuple(sorted(codes))


def known_outcomes() -> tuple[str, ...]:
    from gateway.model import Outcome

    return (*(o.value for o in Outcome), "received")


def known_send_results() -> tuple[str, ...]:
    from gateway.mailer import RESULT_FAILED, RESULT_RETRY, RESULT_SENT

    return (RESULT_SENT, RESULT_RETRY, RESULT_FAILED)


class Metrics:
    def __init__(self, *, outcomes: Iterable[str] | None = None,
                 reply_codes: Iterable[str] | None = None,
                 send_results: Iterable[str] | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.messages = Counter("s4e_gateway_messages", "Inbound messages routed, by outcome",
                                ["outcome"], registry=registry)
        self.smtp_replies = Counter("s4e_gateway_smtp_replies",
                                    "SMTP replies sent to clients, by code", ["code"],
                                    registry=registry)
        self.sends = Counter("s4e_gateway_outbox_sends", "Send attempts, by result",
                             ["result"], registry=registry)
        self.send_failures = Counter("s4e_gateway_send_failures",
                                     "Outgoing mails that failed (temporary or permanent)",
                                     registry=registry)
        self.processing = Histogram(
            "s4e_gateway_processing_seconds", "Time to process one inbound message",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry)
        self.outbox_depth = Gauge("s4e_gateway_outbox_depth",
                                  "Outgoing mails waiting to be sent", registry=registry)
        self.outbox_oldest = Gauge("s4e_gateway_outbox_oldest_age_seconds",
                                   "Age of the oldest outgoing mail waiting to be sent",
                                   registry=registry)
        self.outbox_failed = Gauge("s4e_gateway_outbox_failed",
                                   "Outgoing mails that failed for good (outbox retry)",
                                   registry=registry)
        self.queued = Gauge("s4e_gateway_inbound_queued",
                            "Inbound messages stored but not processed yet", registry=registry)
        self.inbound_failed = Gauge("s4e_gateway_inbound_failed",
                                    "Inbound messages that could not be processed (inbox list"
                                    " --outcome failed)", registry=registry)
        self.held = Gauge("s4e_gateway_held", "Messages held for operators (held list)",
                          registry=registry)
        self.ticket_numbers_left = Gauge(
            "s4e_gateway_ticket_numbers_left",
            f"Six-digit ticket numbers not used yet, of {store.TICKET_NUMBERS} (never reused)",
            registry=registry)
        self.ticket_numbers_left.set(store.TICKET_NUMBERS)
        self.build_info = Gauge("s4e_gateway_build_info", "The running gateway's version",
                                ["version"], registry=registry)
        self.build_info.labels(version=__version__).set(1)
        for outcome in known_outcomes() if outcomes is None else outcomes:
            self.messages.labels(outcome=outcome)
        for code in known_reply_codes() if reply_codes is None else reply_codes:
            self.smtp_replies.labels(code=code)
        for result in known_send_results() if send_results is None else send_results:
            self.sends.labels(result=result)

    def update(self, counts: store.QueueCounts, now: datetime,
               numbers: store.NumberSpace | None = None) -> None:
        if numbers is not None:
            self.ticket_numbers_left.set(numbers.left)
        self.queued.set(counts.inbound_queued)
        self.inbound_failed.set(counts.inbound_failed)
        self.held.set(counts.held)
        self.outbox_depth.set(counts.outbox_waiting)
        self.outbox_failed.set(counts.outbox_failed)
        self.outbox_oldest.set(_age(counts.outbox_oldest_queued_at, now))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _age(moment: str | None, now: datetime) -> float:
    if not moment:
        return 0.0
    return max(0.0, (now - datetime.fromisoformat(moment)).total_seconds())


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    body: dict[str, Any]


class Probe:
    """Reads the database for a scrape or a health check, on a connection of its own
    (one request at a time: a health check writes in a transaction)."""

    def __init__(self, conn: aiosqlite.Connection, database: Path, min_free: int,
                 clock: Callable[[], datetime] = store.utcnow) -> None:
        self._conn = conn
        self._database = database
        self._min_free = min_free
        self._clock = clock
        self._lock = asyncio.Lock()

    async def refresh(self, metrics: Metrics) -> None:
        async with self._lock:
            metrics.update(await store.queue_counts(self._conn), self._clock(),
                           await store.number_space(self._conn))

    async def health(self) -> Health:
        async with self._lock:
            now = self._clock()
            problems: list[str] = []
            checks: dict[str, Any] = {}
            try:
                await asyncio.wait_for(store.probe_write(self._conn, now),
                                       HEALTH_WRITE_TIMEOUT)
                checks["database"] = "writable"
            except TimeoutError:
                checks["database"] = f"no write within {HEALTH_WRITE_TIMEOUT:.0f} s"
                problems.append(f"database not writable: {checks['database']}")
            except Exception as err:  # noqa: BLE001 - the reason is the answer
                reason = expected_failure(err) or f"{type(err).__name__}: {err}"
                checks["database"] = reason
                problems.append(f"database not writable: {reason}")
            try:
                free = shutil.disk_usage(self._database.parent).free
                checks["disk_free_bytes"] = free
                if free < self._min_free:
                    problems.append(f"disk nearly full: {free} bytes free under "
                                    f"{self._database.parent}, need {self._min_free}")
            except OSError as err:
                problems.append(f"disk: {err.strerror or err}")
            try:
                counts = await store.queue_counts(self._conn)
                due = _age(counts.outbox_oldest_due_at, now)
                checks.update(outbox_waiting=counts.outbox_waiting,
                              outbox_due_seconds=round(due, 1),
                              inbound_queued=counts.inbound_queued)
                if due > OUTBOX_STUCK_AFTER.total_seconds():
                    problems.append(f"outbox stuck: a mail due for {due:.0f}s is not sent")
            except Exception as err:  # noqa: BLE001
                problems.append(f"outbox not readable: {expected_failure(err) or err}")
        body = {"status": "ok" if not problems else "failing", "version": __version__,
                "problems": problems, "checks": checks}
        return Health(not problems, body)


def min_free_bytes(max_message_size: int) -> int:
    return 2 * max_message_size + MIN_FREE_BYTES


class MetricsServer:
    """GET /metrics and GET /healthz over one-shot HTTP connections; nothing else."""

    def __init__(self, metrics: Metrics, probe: Probe | None = None) -> None:
        self.metrics = metrics
        self.probe = probe
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        bound = self.server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics and /healthz", host, bound)
        return bound

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers: not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            else:
                status, ctype, body = await self._answer(path)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                         "Connection: close\r\n\r\n".encode())
            if parts and parts[0] != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def _answer(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            if self.probe is not None:
                try:
                    await self.probe.refresh(self.metrics)
                except Exception as err:  # noqa: BLE001 - counters still answer
                    log.error("metrics: gauges not read from the database: %s",
                              expected_failure(err) or f"{type(err).__name__}: {err}")
            return "200 OK", CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/healthz" and self.probe is not None:
            health = await self.probe.health()
            if not health.ok:
                log.warning("healthz: %s", "; ".join(health.body["problems"]))
            body = (json.dumps(health.body, ensure_ascii=False) + "\n").encode()
            return ("200 OK" if health.ok else "503 Service Unavailable",
                    "application/json", body)
        return "404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n"

