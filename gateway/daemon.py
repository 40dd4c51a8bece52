"""Wiring: store, migrations, the SMTP edge, the processor and the mailer; signals.

SIGTERM/SIGINT: new sessions get 421, sessions in flight may finish their
transaction within SHUTDOWN_GRACE seconds, then the workers stop and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass, field
from typing import Any

from gateway import store
from gateway.config import Config
from gateway.processor import Processor, Stages, record_received
from gateway.smtp_edge import REPLY_SHUTTING_DOWN, IntakeHandler, smtp_factory

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0


@dataclass
class Gateway:
    """A running gateway inside an event loop (the daemon, and the tests' fixture)."""

    config: Config
    stages: Stages = record_received
    handler: IntakeHandler | None = None
    processor: Processor | None = None
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _conns: list[Any] = field(default_factory=list)
    _writer: store.IntakeWriter | None = None

    @property
    def intake_conn(self) -> Any:
        """The connection intake commits on (tests use it to simulate a full disk)."""
        return self._conns[0]

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def start(self, *, port: int | None = None) -> None:
        cfg = self.config
        intake_conn = await store.connect(cfg.storage.database)
        self._conns.append(intake_conn)
        await store.migrate(intake_conn)
        work_conn = await store.connect(cfg.storage.database)
        self._conns.append(work_conn)

        self.processor = Processor(work_conn, self.stages)
        self._writer = store.IntakeWriter(intake_conn, on_commit=self.processor.wake)
        self._writer.start()
        await self.processor.start()

        self.handler = IntakeHandler(cfg, self._writer)
        tls = _tls_context(cfg)
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_server(
            smtp_factory(self.handler, cfg, tls), cfg.smtp.host,
            cfg.smtp.port if port is None else port))
        log.info("listening on %s:%d for %s", cfg.smtp.host, self.port,
                 ", ".join(sorted(self.handler.mailboxes)))

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        if self.handler:
            self.handler.draining = True
            await _wait_sessions(self.handler, grace)
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        if self.processor:
            await self.processor.stop()
        if self._writer:
            await self._writer.stop()
        for conn in self._conns:
            await conn.close()
        self._conns.clear()


async def _wait_sessions(handler: IntakeHandler, grace: float) -> None:
    """Idle sessions are told 421 and closed; those in a transaction get `grace`
    seconds to finish it (they are answered 421 at their next MAIL)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        for session in list(handler.sessions):
            if not session.in_transaction:
                await session.close_with(REPLY_SHUTTING_DOWN)
        if not handler.sessions or loop.time() >= deadline:
            break
        await asyncio.sleep(0.05)
    for session in list(handler.sessions):
        log.warning("closing a session still in a transaction after %.0fs", grace)
        await session.close_with(REPLY_SHUTTING_DOWN)


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.smtp.tls_cert or not config.smtp.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.smtp.tls_cert, config.smtp.tls_key)
    return context


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    try:
        await stop.wait()
        log.info("stopping: new sessions get 421, waiting for sessions in flight")
    finally:
        await gateway.stop()
    log.info("stopped")
