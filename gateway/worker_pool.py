"""The daemon's side of the processing workers and the mail process: start them,
restart one that dies, stop them on SIGTERM, forward SIGHUP, and pass on what they
report (metrics, systemd STATUS).

systemd still sees one service: the workers are the daemon's children, READY is sent
once every worker said it is ready, and they stop with it. A worker that dies is
started again after RESTART_FIRST seconds, doubling to RESTART_MAX while it keeps
dying young; the message it had in hand goes back to the queue for its successor
(`Processor(slot=...)` takes back only its own slot's rows), which asks the crash
probe whether that message was the cause.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.intake_signal import IntakeSignal
from gateway.worker import MAIL, PROCESSING, WorkerSpec, main, workers_lock_path

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # for a worker to say it is ready
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
STABLE_SECONDS = 60.0  # a worker that ran this long starts its next restart from scratch
OLD_WORKERS_TIMEOUT = 120.0  # workers of a daemon that died finish their message

# ("processed", outcome, seconds) | ("sent", result) | ("status", text) | ("ready", slot, pid)
OnMessage = Callable[[tuple[Any, ...]], None]


@dataclass
class _Slot:
    number: int  # -1: the mail process
    process: Any = None
    channel: Connection | None = None
    started: float = 0.0
    ready: asyncio.Future[None] | None = None
    failures: int = 0
    restart: asyncio.TimerHandle | None = None


@dataclass
class WorkerPool:
    config: Config
    count: int
    on_message: OnMessage
    housekeeping_seconds: float = 30.0
    intake_signal: IntakeSignal | None = None  # given to the processing workers
    _slots: list[_Slot] = field(default_factory=list)
    _stopping: bool = False
    _reaping: set[asyncio.Task[None]] = field(default_factory=set)
    _context: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))

    async def start(self) -> None:
        """Start every worker and wait until each is ready (a failure to start is the
        daemon's failure to start: the reason is in the worker's log lines). The
        daemon has waited for the workers of an earlier run and re-queued what they
        left in hand (`wait_for_old_workers`, `store.recover_inbound`)."""
        self._slots = [_Slot(n) for n in range(self.count)] + [_Slot(-1)]
        for slot in self._slots:
            self._spawn(slot)
        try:
            for slot in self._slots:
                assert slot.ready is not None
                await asyncio.wait_for(asyncio.shield(slot.ready), START_TIMEOUT)
        except BaseException:
            await self.stop(grace=5.0)
            raise
        pids = [s.process.pid for s in self._slots]
        log.info("%d processing worker(s) running: pid %s; the mail process: pid %d",
                 self.count, ", ".join(map(str, pids[:-1])), pids[-1])

    def _spawn(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = self._context.Pipe(duplex=False)
        spec = WorkerSpec(self.config, slot.number, role=MAIL if slot.number < 0 else PROCESSING,
                          housekeeping_seconds=self.housekeeping_seconds,
                          intake_signal=self.intake_signal if slot.number >= 0 else None)
        process = self._context.Process(target=main, args=(spec, writer),
                                        name=f"s4e-gateway {spec.name}")
        process.start()
        writer.close()  # the child's end: EOF on ours when the child is gone
        slot.process, slot.channel, slot.started = process, reader, time.monotonic()
        slot.ready = loop.create_future()
        loop.add_reader(reader.fileno(), self._readable, slot)

    def _readable(self, slot: _Slot) -> None:
        channel = slot.channel
        assert channel is not None
        try:
            while channel.poll():
                message = channel.recv()
                if message[0] == "ready" and slot.ready is not None and not slot.ready.done():
                    slot.ready.set_result(None)
                self.on_message(message)
        except (EOFError, OSError):
            self._gone(slot)

    def _gone(self, slot: _Slot) -> None:
        """The worker's channel closed: it exited (or is about to)."""
        loop = asyncio.get_running_loop()
        assert slot.channel is not None
        loop.remove_reader(slot.channel.fileno())
        slot.channel.close()
        slot.channel = None
        if self._stopping:
            return  # stop() joins it
        # Joined on a thread: the SMTP sessions on this loop must not wait for it.
        task = loop.create_task(self._reap(slot), name=f"reap {_name(slot)}")
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _reap(self, slot: _Slot) -> None:
        """Collect the exit status; start the worker again after its backoff."""
        process = slot.process
        await asyncio.to_thread(process.join, 5.0)
        code = process.exitcode
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_exception(GatewayError(
                f"{_name(slot)} exited during start (exit code {code})"))
        if self._stopping:
            return
        lived = time.monotonic() - slot.started
        slot.failures = 1 if lived >= STABLE_SECONDS else slot.failures + 1
        delay = min(RESTART_FIRST * 2 ** (slot.failures - 1), RESTART_MAX)
        log.error("%s (pid %d) exited with %s after %.0fs; starting it again in %.0fs",
                  _name(slot), process.pid, _describe_exit(code), lived, delay)
        slot.restart = asyncio.get_running_loop().call_later(delay, self._respawn, slot)

    def _respawn(self, slot: _Slot) -> None:
        slot.restart = None
        if not self._stopping:
            self._spawn(slot)

    def reload(self) -> None:
        """SIGHUP: each worker reads its templates again."""
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                _signal(slot.process.pid, signal.SIGHUP)

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to every worker: each finishes the message in hand; after `grace`
        seconds those still running are killed (their message is re-queued on the
        next start and asked about by the crash probe)."""
        self._stopping = True
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.cancel()
            if slot.process is not None and slot.process.is_alive():
                _signal(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if process.is_alive():
                log.warning("%s still busy after %.0fs: killed", _name(slot), grace)
                process.kill()
            await asyncio.to_thread(process.join, 5.0)
            if slot.channel is not None:
                self._readable(slot)  # its last reports
                if slot.channel is not None:
                    asyncio.get_running_loop().remove_reader(slot.channel.fileno())
                    slot.channel.close()
                    slot.channel = None


def _name(slot: _Slot) -> str:
    return "the mail process" if slot.number < 0 else f"processing worker {slot.number}"


def _signal(pid: int, sig: int) -> None:
    import os

    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


async def wait_for_old_workers(config: Config) -> None:
    """Workers of a daemon that was killed finish the message in hand and exit; a
    new daemon waits for them before it re-queues what was left in hand."""
    path = workers_lock_path(config.storage.sqlite_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + OLD_WORKERS_TIMEOUT
        warned = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GatewayError(f"{path}: processing workers of an earlier run are "
                                       "still running; stop them first") from None
                if not warned:
                    log.warning("waiting for processing workers of an earlier run to finish")
                    warned = True
                await asyncio.sleep(0.05)
        fcntl.flock(handle, fcntl.LOCK_UN)
