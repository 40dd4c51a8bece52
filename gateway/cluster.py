"""Several gateways on one PostgreSQL database, each an MX host (README "PostgreSQL").

What one node must know about the others, in one place:

- its name (`[cluster] node`) and the lease on what it claims (`[cluster] lease`):
  inbound messages and outgoing mail are claimed with `FOR UPDATE SKIP LOCKED`, the
  claim names the node and lasts until the lease ends; a live node renews it; a dead
  node's claims go back to the queue when it ends (`release_expired`);
- a node name is held by one running gateway at a time (a session advisory lock):
  a second gateway under the same name would take back the first one's claims;
- the timed jobs (rating window, held digest, keep_raw) run on one node at a time
  (another session advisory lock, taken by whichever node's jobs ask first and held
  while it lives).

With SQLite there is one node and none of this applies: `cluster_of` is None.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.store.dialect import is_postgres
from gateway.store.postgres import TIMED_JOBS_LOCK_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Cluster:
    node: str
    lease_seconds: int

    def lease_from(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_seconds)

    @property
    def renew_seconds(self) -> float:
        """How often a claim in hand is renewed: well inside its lease."""
        return max(self.lease_seconds / 4, 0.5)


def keep_renewed(cluster: Cluster | None, renew: Callable[[str, datetime], Awaitable[object]],
                 what: str, clock: Callable[[], datetime]) -> asyncio.Task[None] | None:
    """While the returned task runs, `renew(node, new lease end)` every renewal interval: a
    claim in hand (a message being processed, a mail being sent) stays this node's.
    None without a cluster. A failed renewal is logged; the work goes on."""
    if cluster is None:
        return None

    async def loop() -> None:
        while True:
            await asyncio.sleep(cluster.renew_seconds)
            try:
                await renew(cluster.node, cluster.lease_from(clock()))
            except Exception as err:  # noqa: BLE001 - e.g. the server restarting
                log.warning("%s: renewing the claim failed: %s", what,
                            " ".join(str(err).split())[:300])

    return asyncio.get_running_loop().create_task(loop(), name=f"lease of {what}")


@dataclass
class ExpiryWatch:
    """When to look for other nodes' expired claims: at most once per renewal
    interval, not before every claim."""

    cluster: Cluster
    _next: float = field(default=0.0)

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.cluster.renew_seconds
        return True


def cluster_of(config: Config) -> Cluster | None:
    if not config.storage.postgres:
        return None
    return Cluster(config.cluster.node_name, config.cluster.lease_seconds)


def _node_key(node: str) -> int:
    """A signed 64-bit advisory-lock key for a node name."""
    return int.from_bytes(hashlib.sha256(b"s4e-node\0" + node.encode()).digest()[:8],
                          "big", signed=True)


# A gateway restarted at once (systemd) may find its old server session still
# ending: the server frees a session's locks a moment after the client closed it.
NODE_NAME_WAIT_SECONDS = 5.0


async def hold_node_name(conn: Any, node: str, wait: float = NODE_NAME_WAIT_SECONDS) -> None:
    """Take the node's name for as long as `conn` lives; refuse a second gateway
    running under the same name (it would re-queue this one's claims)."""
    deadline = time.monotonic() + wait
    while True:
        rows = list(await conn.execute_fetchall("SELECT pg_try_advisory_lock(?)",
                                                (_node_key(node),)))
        if rows[0][0]:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(f"cluster.node: another running gateway uses the node name "
                              f"{node!r} on this database; give each gateway its own name")
        await asyncio.sleep(0.1)


async def may_run_timed_jobs(conn: Any) -> bool:
    """Whether this node runs the timed jobs: SQLite always (one node); PostgreSQL
    when this connection holds the timed-jobs lock (kept once taken; freed when the
    node's connection ends, for another node's next round)."""
    if not is_postgres(conn):
        return True
    rows = list(await conn.execute_fetchall("SELECT pg_try_advisory_lock(?)", (TIMED_JOBS_LOCK_KEY,)))
    return bool(rows[0][0])
