"""The worker between intake and the tickets: claims committed, unprocessed inbound
messages in arrival order and runs each through the stages.

A message that breaks a stage is marked `failed` and kept (visible in `inbox list`,
re-processable with `inbox reprocess`); the loop goes on.

A failure of the environment (database locked, disk full, I/O error, no descriptors)
is not the message's fault: the message stays in hand and is tried again with a
growing pause (RETRY_FIRST doubling to RETRY_MAX), one log line per failure, never
`failed`, and no manual step once the disk has room again.

A message left mid-way by a crash is claimed again on start. Whether the crash was
its own is asked of a fresh interpreter (`probe`: the parser run on its bytes in a
subprocess): a message that kills the probe is quarantined as `failed`; one that
passes was in hand by chance (an unrelated crash, kill -9, a watchdog restart) and is
processed normally. MAX_CLAIMS ends a crash loop the probe cannot see.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosqlite

from gateway import store
from gateway.attachment_store import AttachmentStore
from gateway.cluster import Cluster, ExpiryWatch, keep_renewed
from gateway.errors import ClaimLost, StoreError
from gateway.model import InboundState, Outcome
from gateway.store import InboundRow

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # kept for callers: crash claims after which a message is suspect
MAX_CLAIMS = 10  # unfinished claims after which a message is quarantined regardless
IDLE_POLL_SECONDS = 1.0  # also picks up rows queued by another process (the CLI)
RETRY_FIRST = 1.0  # after an environmental failure; doubles up to RETRY_MAX
RETRY_MAX = 60.0
PROBE_TIMEOUT = 120.0

_ENV_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE,
                         errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EBUSY})
_ENV_SQLITE = ("locked", "busy", "disk", "full", "i/o", "readonly", "unable to open",
               "out of memory",
               "postgresql: unavailable")  # store/postgres.py: the server gone, lock timeout


def is_environmental(err: BaseException) -> bool:
    """A failure of the machine, not of the message: worth waiting out."""
    if isinstance(err, sqlite3.OperationalError):
        text = str(err).lower()
        return any(part in text for part in _ENV_SQLITE)
    if isinstance(err, MemoryError):
        return False  # could well be the message (a decompression bomb)
    if isinstance(err, OSError):
        return err.errno in _ENV_ERRNOS
    return False


# Does processing these bytes crash a fresh interpreter? True: it survived.
Probe = Callable[[bytes], Awaitable[bool]]


async def probe_in_subprocess(raw: bytes) -> bool:
    """The parser on `raw` in a child interpreter (`python -m gateway.probe`)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.probe", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.wait_for(proc.communicate(raw), PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
    return proc.returncode == 0


@dataclass(frozen=True, slots=True)
class Processed:
    outcome: Outcome | None
    ticket: int | None = None


# One message through the stages: reads what it needs, applies the decision in one
# transaction that also marks the inbound row done. Raises on failure.
Stages = Callable[[aiosqlite.Connection, InboundRow], Awaitable[Processed]]
# What becomes of each message of a batch: Processed, the error that failed it (its
# writes undone), or None: not tried, still in hand.
BatchResult = Processed | Exception | None
# Several messages at once (stages.process_batch); never raises.
BatchStages = Callable[[aiosqlite.Connection, list[InboundRow]], Awaitable[list[BatchResult]]]
BATCH_SIZE = 32  # messages claimed at once when `batch` is given


async def record_received(conn: aiosqlite.Connection, row: InboundRow) -> Processed:
    """The minimal stage: the message is safely stored and known as received."""
    await store.mark_inbound(conn, row.id, state=InboundState.DONE, outcome=None)
    return Processed(outcome=None)


class Processor:
    def __init__(self, conn: aiosqlite.Connection, stages: Stages = record_received,
                 on_processed: Callable[[Processed, float], None] | None = None, *,
                 probe: Probe = probe_in_subprocess,
                 retry_first: float = RETRY_FIRST,
                 attachments: AttachmentStore | None = None, slot: int | None = None,
                 claims: aiosqlite.Connection | None = None,
                 cluster: Cluster | None = None, batch: BatchStages | None = None,
                 peers: int = 1) -> None:
        """`attachments`: the attachment store, where a raw's attachment bytes are.
        `slot`: the worker process this runs in (None: the SMTP process, the only one
        processing); it claims as that slot and takes back only that slot's rows.
        `cluster` (PostgreSQL): claims name this node and carry a lease, renewed while
        the message is in hand; other nodes' expired claims are taken back.
        `batch`: claims up to BATCH_SIZE messages at once and runs them through it
        instead of `stages` (a worker under load: one commit for many reports).
        `peers`: the processes claiming from the same queue; each claims its share of
        a short queue, so a burst is spread over all of them."""
        self._slot = slot
        self._cluster = cluster
        self._expiry = ExpiryWatch(cluster) if cluster else None
        # Claims may go on a connection of their own: a worker claims with
        # synchronous=NORMAL (the attempt count must survive a crash of the process,
        # which the page cache does, not a power cut) and commits reports with FULL.
        self._claims = claims or conn
        self._conn = conn
        self._attachments = attachments
        self._stages = stages
        self._batch = batch
        self._peers = max(1, peers)
        self._on_processed = on_processed
        self._probe = probe
        self._retry_first = retry_first
        self._env_failures = 0  # environmental failures in a row
        self._in_hand: list[InboundRow] = []  # kept across environmental failures
        self._vetted: int | None = None  # the left-unfinished message the probe passed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        recovered = await store.recover_inbound(
            self._conn, self._slot, node=self._cluster.node if self._cluster else None)
        if recovered:
            log.warning("re-claiming %d message(s) left mid-way by an earlier stop", recovered)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="processor")

    async def stop(self) -> None:
        """Finish the message in hand, then stop. One held back by an environmental
        failure goes back to the queue uncounted (best effort: else start recovers it)."""
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task
            self._task = None
        rows, self._in_hand = self._in_hand, []
        for row in rows:
            try:
                await self._conn.execute(
                    f"UPDATE inbound SET state = '{InboundState.QUEUED}',"
                    " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,"
                    " claimed_by = NULL, claimed_node = NULL, lease_until = NULL"
                    f" WHERE id = ? AND state = '{InboundState.PROCESSING}'", (row.id,))
            except sqlite3.Error as err:
                log.warning("%s inbound %d: left for the next start: %s",
                            row.message_id or "<no-id>", row.id, _one_line(err))

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                worked = await self.run_once()
            except Exception as err:  # noqa: BLE001 - e.g. database locked: try again soon
                await self._environment_failed(self._in_hand, err)
                continue
            if worked:
                # Let SMTP sessions waiting for their 250 in before the next message.
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                pass

    async def run_once(self) -> bool:
        """Process the queued messages of one claim (one, or a batch); False when there
        was none."""
        rows, self._in_hand = self._in_hand, []
        try:
            if not rows:
                await self._release_expired()
                rows = await self._claim()
                if not rows:
                    return False
            # A message an earlier process left unfinished is vetted once, also when
            # it comes back in hand after the vetting itself failed (e.g. no process
            # could be started for the probe).
            if (len(rows) == 1 and rows[0].attempts > 1 and rows[0].id != self._vetted
                    and not await self._survives(rows[0])):
                return True
        except BaseException:
            self._in_hand = rows  # claimed: kept for the retry, not left mid-way
            raise
        if len(rows) == 1 and rows[0].attempts > 1:
            self._vetted = rows[0].id
        started = asyncio.get_running_loop().time()
        renewing = self._keep_leases(rows)  # (PostgreSQL)
        try:
            results = await self._run_stages(rows)
        finally:
            if renewing is not None:
                renewing.cancel()
        await self._rollback()
        seconds = (asyncio.get_running_loop().time() - started) / len(rows)
        # Everything not recorded goes back in hand first: a failure below (marking a
        # message failed on a full disk) must not strand the rest in 'processing'.
        self._in_hand = [row for row, r in zip(rows, results, strict=True) if _kept(r)]
        environmental: Exception | None = next(
            (r for r in results if isinstance(r, Exception) and _kept(r)), None)
        for row, result in zip(rows, results, strict=True):
            if result is None or _kept(result):
                continue
            if isinstance(result, ClaimLost):
                log.warning("%s inbound %d: %s", row.message_id or "<no-id>", row.id, result)
                continue
            if isinstance(result, Exception):  # one bad message must not stop the loop
                try:
                    await self._fail(row, result)
                except Exception as err:  # noqa: BLE001 - e.g. disk full: try it again
                    if not is_environmental(err):
                        raise
                    environmental = environmental or err
                    self._in_hand.append(row)
                    continue
                result = Processed(Outcome.FAILED)
            if self._on_processed:
                self._on_processed(result, seconds)
        if environmental is not None:
            await self._environment_failed(self._in_hand, environmental)
        else:
            self._env_failures = 0
        return True

    async def _run_stages(self, rows: list[InboundRow]) -> list[BatchResult]:
        if self._batch is not None:
            return await self._batch(self._conn, rows)
        try:
            return [await self._stages(self._conn, rows[0])]
        except Exception as err:  # noqa: BLE001 - judged by run_once
            return [err]

    async def _claim(self) -> list[InboundRow]:
        node, until = None, None
        if self._cluster is not None:
            node, until = self._cluster.node, self._cluster.lease_from(store.utcnow())
        limit = 1
        if self._batch is not None:
            limit = BATCH_SIZE
            if self._peers > 1:
                share = -(-await store.queued_span(self._claims) // self._peers)
                limit = max(1, min(BATCH_SIZE, share))
        return await store.claim_inbound_batch(self._claims, self._slot, limit=limit,
                                               node=node, lease_until=until)

    async def _release_expired(self) -> None:
        """PostgreSQL: messages of a node that stopped renewing its claims go back to
        the queue."""
        if self._expiry is None or not self._expiry.due():
            return
        released = await store.release_expired_inbound(self._claims, store.utcnow())
        if released:
            log.warning("taking over %d message(s) whose node's lease ran out: inbound %s",
                        len(released), ", ".join(map(str, released[:20])))

    def _keep_leases(self, rows: list[InboundRow]) -> asyncio.Task[None] | None:
        """PostgreSQL: the claims on `rows` stay this node's while the stages work."""
        ids = [row.id for row in rows]
        return keep_renewed(self._cluster, lambda node, until: store.renew_inbound_leases(
            self._claims, ids, node, until), _which(rows), store.utcnow)

    async def _survives(self, row: InboundRow) -> bool:
        """A message an earlier process left unfinished: was that crash its own?"""
        name = row.message_id or "<no-id>"
        if row.attempts > MAX_CLAIMS:
            await self._quarantine(row, f"abandoned after {MAX_CLAIMS} attempts that did not finish")
            return False
        raw = await store.read_raw(self._conn, row.id, self._attachments)
        if await self._probe(raw):
            log.warning("%s inbound %d: left unfinished %d time(s) by an earlier stop; a fresh "
                        "process handles it, so processing it now", name, row.id,
                        row.attempts - 1)
            return True
        await self._quarantine(row, f"abandoned: processing it crashes the process "
                                    f"({row.attempts - 1} unfinished attempt(s), probe failed)")
        return False

    async def _quarantine(self, row: InboundRow, error: str) -> None:
        await store.mark_inbound(self._conn, row.id, state=InboundState.FAILED,
                                 outcome=Outcome.FAILED, error=error)
        log.error("%s inbound %d: quarantined as failed: %s", row.message_id or "<no-id>",
                  row.id, error)

    async def _environment_failed(self, rows: list[InboundRow], err: Exception) -> None:
        """Pause, the messages in hand kept; one line, no traceback, for what is expected."""
        self._env_failures += 1
        delay = min(self._retry_first * 2 ** min(self._env_failures - 1, 16), RETRY_MAX)
        what = f"{rows[0].message_id or '<no-id>'} {_which(rows)}" if rows else "processor"
        if is_environmental(err):
            log.warning("%s: %s: %s; kept queued, retry in %.0fs", what,
                        type(err).__name__, _one_line(err), delay)
        else:
            log.exception("%s: claiming a message failed; retry in %.0fs", what, delay)
        # (PostgreSQL) the messages in hand stay this node's while it waits.
        renewing = self._keep_leases(rows) if rows else None
        try:
            await asyncio.wait_for(self._wake_on_stop(), delay)
        except TimeoutError:
            pass
        finally:
            if renewing is not None:
                renewing.cancel()

    async def _wake_on_stop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    async def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                await self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    async def _fail(self, row: InboundRow, err: Exception) -> None:
        if isinstance(err, StoreError):  # e.g. no ticket number left: one line, no traceback
            log.error("%s inbound %d: outcome=failed: %s", row.message_id or "<no-id>",
                      row.id, err)
        else:
            # (exc_info from err itself: this runs after the stages returned it)
            log.error("%s inbound %d: outcome=failed: %s: %s", row.message_id or "<no-id>",
                      row.id, type(err).__name__, err, exc_info=err)
        await store.mark_inbound(self._conn, row.id, state=InboundState.FAILED,
                                 outcome=Outcome.FAILED,
                                 error=f"{type(err).__name__}: {err}"[:2000])


def _kept(result: BatchResult) -> bool:
    """Not recorded, to be tried again: not tried, or stopped by the machine."""
    return result is None or (isinstance(result, Exception) and is_environmental(result))


def _which(rows: list[InboundRow]) -> str:
    return f"inbound {rows[0].id}" + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:500]
