"""One processing worker: a process of its own that takes committed inbound mail from
the database and runs it through the stages (`stages.process_message`).

Started and supervised by the daemon (`worker_pool.WorkerPool`), never by hand. The
SMTP process only accepts, commits and answers; the workers parse, route, open and
update tickets and queue the answers. One more process of the same kind, the mail
process, runs the mailer, the timed jobs and the write-ahead-log checkpoints (once each,
and never starved by a burst of processing on the same event loop).

Talking to the daemon: the worker sends small tuples on its channel (`ready`, what it
processed and sent, for the metrics; systemd STATUS text). New mail is noticed by
SQLite's `PRAGMA data_version`, which changes when any other connection commits,
read every WATCH_SECONDS while idle: intake, the CLI and other workers all wake it
without a signal path between processes.

Signals: SIGTERM finishes the message in hand and exits; SIGHUP reloads the templates;
SIGINT is ignored (a Ctrl-C reaches the whole process group: the daemon decides).
If the daemon dies the worker notices within WATCH_SECONDS and stops the same way.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from gateway.config import Config
from gateway.direct_connection import (
    CHECKPOINT_SECONDS,
    LOCK_POLL_SECONDS,
    Checkpointer,
    connect_direct,
)
from gateway.intake_signal import IntakeSignal
from gateway.mailer import Mailer, make_transport
from gateway.cluster import cluster_of
from gateway.store.notify import CommitWatch
from gateway.store.postgres import INBOUND_CHANNEL, connect_postgres
from gateway.context import Context, load_renderer, make_context
from gateway.stages import BatchResult, process_batch, process_message
from gateway.processor import Processed, Processor
from gateway.timed_jobs import TimedJobs

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.02
T = TypeVar("T")


MAIL = "mail"  # the role of the process that runs the mailer, timed jobs and checkpoints
PROCESSING = "processing"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    config: Config
    slot: int  # processing: the slot it claims as; the mail process: -1
    role: str  # PROCESSING or MAIL
    housekeeping_seconds: float
    intake_signal: IntakeSignal | None = None  # SQLite: intake's commits go first

    @property
    def name(self) -> str:
        return "mailer" if self.role == MAIL else f"worker {self.slot}"


def workers_lock_path(database: Path) -> Path:
    """Every live worker holds this file shared; a daemon starting takes it
    exclusively first, so it never re-queues a message a worker of a dead daemon
    still has in hand."""
    return database.with_name(database.name + ".workers.lock")


async def inline(fn: Callable[..., T], *args: Any) -> T:
    """`Context.offload` in a worker: no SMTP sessions here to keep responsive."""
    return fn(*args)


def main(spec: WorkerSpec, channel: Any) -> None:
    """The process's entry point (multiprocessing, spawn)."""
    from gateway.cli import setup_logging

    setup_logging(logging.INFO, name=spec.name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = open(workers_lock_path(spec.config.storage.sqlite_path), "a+")
    fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        asyncio.run(Worker(spec, channel).run())
    except Exception:
        log.exception("%s stopped by an error", spec.name)
        sys.exit(70)
    finally:
        lock.close()


class Worker:
    def __init__(self, spec: WorkerSpec, channel: Any) -> None:
        self.spec = spec
        self._channel = channel
        self._stop = asyncio.Event()
        self._conns: list[Any] = []
        self._parent = os.getppid()
        self.context: Context | None = None
        self.processor: Processor | None = None
        self.mailer: Mailer | None = None

    def _send(self, *message: Any) -> None:
        try:
            self._channel.send(message)
        except OSError:  # the daemon is gone: the watch loop stops this worker
            pass

    async def _connect(self, *, synchronous: str = "FULL") -> aiosqlite.Connection:
        """A connection of this process. With SQLite it waits for the write lock without
        blocking the loop (lock_poll): in the mail process one relay session waiting to
        mark its mail must not stop the others' sends."""
        storage = self.spec.config.storage
        conn: Any
        if storage.postgres:
            conn = await connect_postgres(storage.postgres, application_name=(
                f"s4e-gateway {self.spec.name}"), synchronous="on" if synchronous == "FULL" else "off")
        else:
            conn = await connect_direct(storage.sqlite_path, synchronous=synchronous,
                                        lock_poll=LOCK_POLL_SECONDS)
        self._conns.append(conn)
        # The store's functions are typed for aiosqlite; DirectConnection has the part
        # of its interface they use.
        return cast(aiosqlite.Connection, conn)

    async def run(self) -> None:
        spec, cfg = self.spec, self.spec.config
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        work_conn = await self._connect()
        self.context = context = await make_context(work_conn, cfg, wake_mailer=self._wake_mailer)
        context.offload = inline

        async def stages(conn: Any, row: Any) -> Processed:
            return await process_message(conn, context, row)

        async def batch(conn: Any, rows: list[Any]) -> list[BatchResult]:
            return await process_batch(conn, context, rows, intake=spec.intake_signal)

        tasks: list[asyncio.Task[None]] = []
        if spec.role == MAIL:
            # NORMAL: a mark lost to a power cut sends a mail again (at least once); the
            # processing that queued it committed with FULL.
            self.mailer = Mailer(await self._connect(synchronous="NORMAL"), make_transport(
                cfg.outbound, local_hostname=cfg.smtp.hostname), cfg.outbound,
                on_result=lambda result: self._send("sent", result), cluster=cluster_of(cfg))
            await self.mailer.start()
            jobs = TimedJobs(await self._connect(), context, interval=spec.housekeeping_seconds,
                             on_status=lambda text: self._send("status", text))
            tasks.append(loop.create_task(jobs.run(), name="timed jobs"))
            if not cfg.storage.postgres:  # PostgreSQL checkpoints on its own
                tasks.append(loop.create_task(self._checkpoints(), name="checkpoints"))
        else:
            self.processor = Processor(work_conn, stages, on_processed=self._processed,
                                       attachments=context.attachments, slot=spec.slot,
                                       claims=await self._connect(synchronous="NORMAL"),
                                       cluster=cluster_of(cfg), batch=batch,
                                       peers=cfg.processing.worker_count)
            await self.processor.start()
        watch = await self._connect()
        tasks.append(loop.create_task(self._watch(watch), name="watch"))
        self._send("ready", spec.slot, os.getpid())
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.processor:
                await self.processor.stop()
            if self.mailer:
                await self.mailer.stop()
            for conn in self._conns:
                await conn.close()

    async def _checkpoints(self) -> None:
        """The mail process only: the write-ahead log into the database, off the
        message path."""
        checkpointer = Checkpointer(self.spec.config.storage.sqlite_path)
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_SECONDS)
                try:
                    await asyncio.to_thread(checkpointer.run_once)
                except sqlite3.Error as err:  # e.g. a full disk: the next round tries again
                    log.warning("checkpoint failed, next in %.0fs: %s", CHECKPOINT_SECONDS, err)
        finally:
            checkpointer.close()

    def _processed(self, result: Processed, seconds: float) -> None:
        self._send("processed", str(result.outcome or "received"), seconds)

    def _wake_mailer(self) -> None:
        if self.mailer:
            self.mailer.wake()

    def _reload(self) -> None:
        if self.context is None:
            return
        try:
            self.context.renderer = load_renderer(self.spec.config)
            log.info("templates reloaded")
        except Exception as err:  # noqa: BLE001 - keep serving with the old templates
            log.error("templates not reloaded, keeping the old ones: %s", err)

    async def _watch(self, conn: aiosqlite.Connection) -> None:
        """Wake the processor when another connection committed; stop when the daemon
        is gone."""
        commits = CommitWatch(conn, (INBOUND_CHANNEL,))
        commits.start()
        try:
            version = await commits.version()
            while True:
                await asyncio.sleep(WATCH_SECONDS)
                if os.getppid() != self._parent:
                    log.warning("the daemon is gone: finishing the message in hand and stopping")
                    self._stop.set()
                    return
                current = await commits.version()
                if current != version:
                    version = current
                    if self.processor:
                        self.processor.wake()
                    # (The mailer watches commits itself, and claims only what is due.)
        finally:
            await commits.stop()

