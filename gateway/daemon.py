"""Wiring: store, migrations, the SMTP edge, the processing workers (or, with
`[processing] workers = 0`, the processor, the mailer and the timed jobs in this
process), metrics, systemd notification and signals.

SIGTERM/SIGINT: new sessions get 421, sessions in flight may finish their
transaction within SHUTDOWN_GRACE seconds, then the workers stop and the process
exits 0. SIGHUP reloads the templates and the contracts file.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import staff, store
from gateway.attachment_store import AttachmentStore
from gateway.backup import migrate_with_copy
from gateway.cluster import cluster_of, hold_node_name
from gateway.intake_signal import IntakeSignal
from gateway.config import Config, check_files, parse_hostport
from gateway.errors import ConfigError
from gateway.mailer import Mailer, Transport, make_transport
from gateway.metrics import (HEALTH_BUSY_TIMEOUT_MS, Metrics, MetricsServer, Probe,
                             min_free_bytes)
from gateway.closed_refusal import closed_ticket_refusal
from gateway.context import Context, load_renderer, make_context
from gateway.stages import BatchResult, process_batch, process_message
from gateway.processor import Processed, Processor, Stages
from gateway.smtp_edge import (REPLY_SHUTTING_DOWN, IntakeHandler, clear_spool, smtp_factory,
                               start_edge_server)
from gateway.systemd import Notifier, watchdog_interval
from gateway.timed_jobs import TimedJobs, drop_old_raw, queue_status
from gateway.worker_pool import WorkerPool, wait_for_old_workers

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0
HOUSEKEEPING_SECONDS = 30.0  # how often the timed jobs run
# While SMTP transactions are open the processor waits up to this long before each
# message: answering 250 quickly is the first promise (a slow 250 makes MTAs time out
# and send again), processing catches up in the lulls and never stops entirely.
INTAKE_FIRST_MAX = 0.05


@dataclass
class Gateway:
    """A running gateway inside an event loop (the daemon, and the tests' fixture)."""

    config: Config
    stages: Stages | None = None  # None: the production pipeline
    transport: Transport | None = None  # None: from [outbound]
    # None: from the configuration (the choice of this process; worker processes always
    # take the configuration's: tests that pass another store run with workers = 0)
    attachments: AttachmentStore | None = None
    notifier: Notifier = field(default_factory=lambda: Notifier(""))
    handler: IntakeHandler | None = None
    context: Context | None = None
    processor: Processor | None = None
    mailer: Mailer | None = None
    metrics: Metrics = field(default_factory=Metrics)
    metrics_port: int | None = None
    workers: WorkerPool | None = None  # None: processing runs in this process
    servers: list[Any] = field(default_factory=list)  # EdgeServer, asyncio.Server (LMTP)
    _conns: list[Any] = field(default_factory=list)
    _writer: store.IntakeWriter | None = None
    _metrics_server: MetricsServer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The timed jobs and SIGHUP reload share a connection of their own, one at a time
    # (two coroutines must never interleave transactions on one connection).
    _house_conn: Any = None
    _house_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timed_jobs: TimedJobs | None = None
    _lock: Any = None
    # How often the timed jobs run (rating window, held digest, gauges); tests shorten it.
    housekeeping_seconds: float = HOUSEKEEPING_SECONDS
    _tls: ssl.SSLContext | None = None

    @property
    def intake_conn(self) -> Any:
        """The connection intake commits on (tests use it to simulate a full disk)."""
        return self._conns[0]

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def _connect(self) -> Any:
        conn = await store.connect(self.config.storage.database)
        self._conns.append(conn)
        return conn

    async def start(self, *, port: int | None = None) -> None:
        cfg = self.config
        check_files(cfg)
        self._lock = _single_instance(cfg.storage.sqlite_path)
        intake_conn = await self._connect()
        cluster = cluster_of(cfg)
        if cluster:
            # One gateway per node name on the database (it holds this while it runs).
            await hold_node_name(intake_conn, cluster.node)
            await store.migrate(intake_conn)
        else:
            await migrate_with_copy(intake_conn, cfg.storage.sqlite_path)
        work_conn, mail_conn, check_conn, house_conn = [await self._connect() for _ in range(4)]
        self._house_conn = house_conn
        # This process's writers take SQLite's write lock in turn, intake first.
        store.share_write_gate(intake_conn, work_conn, mail_conn)
        self.context = context = await make_context(work_conn, cfg, wake_mailer=self._wake_mailer,
                                                    attachments=self.attachments)
        await self._load_contracts(house_conn)

        async def reject_check(inbound: Any, utf8: bool) -> str | None:
            return await closed_ticket_refusal(check_conn, context, inbound, utf8)

        # Workers of a daemon that was killed finish their message before anything
        # left in hand goes back to the queue.
        await wait_for_old_workers(cfg)
        recovered = await store.recover_inbound(
            intake_conn, node=cluster.node if cluster else None)
        if recovered:
            log.warning("re-claiming %d message(s) left mid-way by an earlier stop", recovered)
        count = cfg.processing.worker_count
        signal = None
        if count and self.stages is None and self.transport is None:
            # SQLite: intake's commits go ahead of the workers' (intake_signal.py).
            signal = None if cluster else IntakeSignal()
            self.workers = WorkerPool(cfg, count, self._from_worker,
                                      housekeeping_seconds=self.housekeeping_seconds,
                                      intake_signal=signal)
            # The mail process checkpoints SQLite's write-ahead log: no commit here
            # waits for one.
            for conn in self._conns if not cluster else ():
                await conn.execute("PRAGMA wal_autocheckpoint = 0")
            await self.workers.start()
        else:
            await self._start_processing(work_conn, mail_conn)
        # Workers notice commits themselves (SQLite's data_version); the processor here
        # is woken directly.
        writer = store.IntakeWriter(intake_conn,
                                    on_commit=self.processor.wake if self.processor else None,
                                    signal=signal)
        self._writer = writer
        writer.start()
        if self.processor:
            await self.processor.start()

        self.handler = IntakeHandler(
            cfg, writer, on_reply=self._count_reply,
            reject_check=reject_check if cfg.tickets.closed_action == "reject" else None)
        loop = asyncio.get_running_loop()
        if clear_spool(self.handler.spool_dir):
            log.info("removed spool files of sessions an earlier stop cut off mid-DATA")
        self._tls = _tls_context(cfg)
        handler = self.handler

        def new_session() -> Any:
            # The TLS context is looked up per connection: after a SIGHUP reload new
            # sessions get the renewed certificate, sessions in flight keep theirs.
            return smtp_factory(handler, cfg, self._tls)()

        with _naming("smtp.listen", cfg.smtp.listen):
            self.servers.append(await start_edge_server(
                new_session, self.handler, cfg.smtp.host,
                cfg.smtp.port if port is None else port))
        if cfg.smtp.lmtp_socket:
            cfg.smtp.lmtp_socket.unlink(missing_ok=True)
            with _naming("smtp.lmtp_socket", str(cfg.smtp.lmtp_socket)):
                self.servers.append(await loop.create_unix_server(
                    smtp_factory(self.handler, cfg, lmtp=True), str(cfg.smtp.lmtp_socket)))
            # Postfix's lmtp client runs as another user (see deploy/postfix/README.md).
            os.chmod(cfg.smtp.lmtp_socket, 0o666)
            log.info("LMTP on %s", cfg.smtp.lmtp_socket)
        if cfg.metrics.listen:
            probe_conn = await self._connect()
            if cluster:
                await probe_conn.execute(f"SET lock_timeout = {HEALTH_BUSY_TIMEOUT_MS}")
            else:
                await probe_conn.execute(f"PRAGMA busy_timeout = {HEALTH_BUSY_TIMEOUT_MS}")
            # Its test write takes its turn behind intake like this process's others.
            probe_conn.write_gate = intake_conn.write_gate
            probe = Probe(probe_conn, cfg.storage.sqlite_path,
                          min_free_bytes(cfg.smtp.max_message_size))
            self._metrics_server = MetricsServer(self.metrics, probe)
            host, mport = parse_hostport(cfg.metrics.listen)
            with _naming("metrics.listen", cfg.metrics.listen):
                self.metrics_port = await self._metrics_server.start(host, mport)
        if self.workers is None:
            self.timed_jobs = TimedJobs(house_conn, context, on_status=self.notifier.status,
                                        interval=self.housekeeping_seconds,
                                        lock=self._house_lock)
            self._tasks.append(loop.create_task(self.timed_jobs.run(), name="timed jobs"))
        interval = watchdog_interval()
        if interval:
            self._tasks.append(loop.create_task(self._watchdog(interval), name="watchdog"))
        log.info("listening on %s:%d for %s", cfg.smtp.host, self.port,
                 ", ".join(sorted(self.handler.mailboxes)))
        self.notifier.ready(await queue_status(house_conn))

    async def _start_processing(self, work_conn: Any, mail_conn: Any) -> None:
        """`[processing] workers = 0` (or a test's own stages or transport): the
        processor and the mailer run on this event loop."""
        cfg, context = self.config, self.context
        assert context is not None

        async def pipeline(conn: Any, row: Any) -> Processed:
            await self._intake_first()
            return await process_message(conn, context, row)

        async def batch(conn: Any, rows: list[Any]) -> list[BatchResult]:
            await self._intake_first()
            return await process_batch(conn, context, rows)

        self.mailer = Mailer(mail_conn, self.transport or make_transport(
            cfg.outbound, local_hostname=cfg.smtp.hostname), cfg.outbound,
            on_result=self._count_send, cluster=cluster_of(cfg))
        await self.mailer.start()
        self.processor = Processor(work_conn, self.stages or pipeline,
                                   on_processed=self._count_processed,
                                   attachments=context.attachments,
                                   cluster=cluster_of(cfg),
                                   claims=await self._connect() if cfg.storage.postgres else None,
                                   batch=batch if self.stages is None else None)

    def _from_worker(self, message: tuple[Any, ...]) -> None:
        """What a worker process reports: the metrics it moves, systemd STATUS."""
        match message:
            case ("processed", outcome, seconds):
                self.metrics.messages.labels(outcome=outcome).inc()
                self.metrics.processing.observe(seconds)
            case ("sent", result):
                self._count_send(result)
            case ("status", text):
                self.notifier.status(text)
            case _:
                pass

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        self.notifier.stopping()
        if self.handler:
            self.handler.draining = True
            await _wait_sessions(self.handler, grace)
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        if self.config.smtp.lmtp_socket:
            self.config.smtp.lmtp_socket.unlink(missing_ok=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics_server:
            await self._metrics_server.stop()
        if self.workers:
            await self.workers.stop(grace)
        if self.processor:
            await self.processor.stop()
        if self.mailer:
            await self.mailer.stop()
        if self._writer:
            await self._writer.stop()
        for conn in self._conns:
            await conn.close()
        self._conns.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def reload(self) -> None:
        """SIGHUP: templates, contracts and the TLS certificate and key are read again;
        a broken one keeps the old (logged), so a typo never stops the desk."""
        self.notifier.reloading()
        assert self.context is not None
        self._reload_tls()
        if self.workers:
            self.workers.reload()
        try:
            self.context.renderer = load_renderer(self.config)
            log.info("templates reloaded")
        except Exception as err:  # noqa: BLE001 - keep serving with the old templates
            log.error("templates not reloaded, keeping the old ones: %s", err)
        async with self._house_lock:
            await self._load_contracts(self._house_conn)
            self.notifier.ready(await queue_status(self._house_conn))

    def _reload_tls(self) -> None:
        cfg = self.config.smtp
        if not cfg.tls_cert or not cfg.tls_key:
            return
        try:
            context = _tls_context(self.config)
        except ConfigError as err:
            log.error("TLS certificate not reloaded, keeping the old one: %s", err)
            return
        self._tls = context
        log.info("TLS certificate reloaded from %s (new sessions use it)", cfg.tls_cert)

    async def _load_contracts(self, conn: Any) -> None:
        path = self.config.tickets.contracts
        if not path:
            return
        try:
            contracts = staff.read_contracts(path)
            count = await staff.import_contracts(conn, contracts, store.utcnow())
            log.info("contracts loaded from %s: %d", path, count)
        except Exception as err:  # noqa: BLE001 - keep the contracts already loaded
            log.error("contracts not loaded, keeping the previous ones: %s", err)

    async def _intake_first(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INTAKE_FIRST_MAX
        while (self.handler and loop.time() < deadline
               and any(session.in_transaction for session in self.handler.sessions)):
            await asyncio.sleep(0.002)

    def _wake_mailer(self) -> None:
        if self.mailer:
            self.mailer.wake()

    def _count_reply(self, code: str) -> None:
        self.metrics.smtp_replies.labels(code=code).inc()

    def _count_processed(self, result: Processed, seconds: float) -> None:
        self.metrics.messages.labels(outcome=str(result.outcome or "received")).inc()
        self.metrics.processing.observe(seconds)

    def _count_send(self, result: str) -> None:
        self.metrics.sends.labels(result=result).inc()
        if result != "sent":
            self.metrics.send_failures.inc()

    async def _drop_old_raw(self, conn: Any) -> int:
        """One round of [storage] keep_raw (tests call it instead of waiting)."""
        return await drop_old_raw(conn, self.config)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: if the loop stalls, the pings stop.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


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


@contextmanager
def _naming(key: str, value: str) -> Iterator[None]:
    """A bind that fails names the setting: "smtp.listen: cannot listen on ..."."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"{key}: cannot listen on {value}: {err.strerror or err}") from None


def _single_instance(database: Path) -> Any:
    """One daemon per database: a second would re-queue the first one's work."""
    database.parent.mkdir(parents=True, exist_ok=True)
    handle = open(database.with_name(database.name + ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"storage.database: {database} is in use by another running "
                          "gateway") from None
    return handle


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.smtp.tls_cert or not config.smtp.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.smtp.tls_cert, config.smtp.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"smtp.tls_cert: cannot load the certificate and key: {err}") from None
    return context


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads."""
    gateway = Gateway(config, notifier=Notifier())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gateway.reload()))
    try:
        await gateway.start()
        await stop.wait()
        log.info("stopping: new sessions get 421, waiting for sessions in flight")
    finally:
        await gateway.stop()
        gateway.notifier.close()
    log.info("stopped")
