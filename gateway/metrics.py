"""Prometheus metrics on `[metrics] listen`: a registry per gateway and a tiny asyncio
HTTP endpoint serving GET /metrics (prometheus_client renders the text format)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter("s4e_gateway_messages", "Inbound messages routed, by outcome",
                                ["outcome"], registry=self.registry)
        self.smtp_replies = Counter("s4e_gateway_smtp_replies",
                                    "SMTP replies sent to clients, by code", ["code"],
                                    registry=self.registry)
        self.outbox_depth = Gauge("s4e_gateway_outbox_depth",
                                  "Outgoing mails waiting to be sent", registry=self.registry)
        self.outbox_oldest = Gauge("s4e_gateway_outbox_oldest_age_seconds",
                                   "Age of the oldest outgoing mail waiting to be sent",
                                   registry=self.registry)
        self.sends = Counter("s4e_gateway_outbox_sends", "Send attempts, by result",
                             ["result"], registry=self.registry)
        self.send_failures = Counter("s4e_gateway_send_failures",
                                     "Outgoing mails that failed (temporary or permanent)",
                                     registry=self.registry)
        self.processing = Histogram(
            "s4e_gateway_processing_seconds", "Time to process one inbound message",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)
        self.queued = Gauge("s4e_gateway_inbound_queued",
                            "Inbound messages stored but not processed yet",
                            registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """GET /metrics over HTTP/1.0-style one-shot connections; nothing else."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        bound = self.server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
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
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status, ctype = self.metrics.render(), "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            writer.write(body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
