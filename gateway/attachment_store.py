"""Where attachment bytes live: files on this host, or a table every node reads.

Every reader and writer of attachment bytes goes through an `AttachmentStore`: the
stages that save a report's attachments before its raw is cut, the raw put back for
`inbox show --raw`, reprocessing, held release and the duplicate check, the web desk's
downloads, `tickets attachment`, `backup`. Two implementations:

- `FileAttachments`: files named by SHA-256 under `[storage] attachments`
  (gateway/attachments.py). The SQLite default: one host, one folder.
- `DatabaseAttachments`: the `attachment_blobs` table (migration 0010). With
  PostgreSQL several gateway hosts share one database, and each must read the bytes
  another one stored; a folder would be on one host only.

Both are content-addressed: the same bytes are stored once (also when two nodes store
them at the same moment), checked against their hash when read (damage is an error,
never silently wrong bytes), and durable when `save` returns, so that the stages may
then keep the raw without them (gateway/attachments.py, `cut_attachments`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from gateway.attachments import AttachmentMissing, read_attachment, write_attachment_files
from gateway.config import Config
from gateway.model import Attachment
from gateway.store.connection import Tx, iso, utcnow

# Rows looked up per query when checking which bytes are stored already.
_LOOKUP_BATCH = 100


class AttachmentStore(Protocol):
    """Attachment bytes by SHA-256. `conn` is the store connection of the caller (the
    files ignore it)."""

    where: str  # "files" | "database": what `backup` and the logs say

    async def save(self, conn: Any, attachments: Iterable[Attachment]) -> None:
        """Store the bytes not stored yet; durable when this returns."""
        ...

    async def load(self, conn: Any, sha256: str) -> bytes:
        """The bytes, checked against their hash; AttachmentMissing if missing or damaged."""
        ...


class FileAttachments:
    """Files named by their SHA-256 under one folder ([storage] attachments)."""

    where = "files"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def save(self, conn: Any, attachments: Iterable[Attachment]) -> None:
        items = list(attachments)
        if items:
            await asyncio.to_thread(write_attachment_files, self.folder, items)

    async def load(self, conn: Any, sha256: str) -> bytes:
        return await asyncio.to_thread(read_attachment, self.folder, sha256)

    def __repr__(self) -> str:
        return f"FileAttachments({str(self.folder)!r})"


class DatabaseAttachments:
    """The attachment_blobs table of the gateway's database: one row per distinct
    content, inserted with ON CONFLICT DO NOTHING, so two nodes storing the same bytes
    at once store them once and neither fails."""

    where = "database"

    async def save(self, conn: Any, attachments: Iterable[Attachment]) -> None:
        unique = {a.sha256: a for a in attachments}
        if not unique:
            return
        present = await _stored(conn, unique)
        missing = [a for sha, a in unique.items() if sha not in present]
        if not missing:
            return  # the usual case for a log that arrives again: no bytes sent at all
        if conn.in_transaction:  # the caller's commit makes them durable with its change
            await _insert(conn, missing)
            return
        async with Tx(conn):  # committed (synchronous commit) before the raw is cut
            await _insert(conn, missing)

    async def load(self, conn: Any, sha256: str) -> bytes:
        rows = list(await conn.execute_fetchall(
            "SELECT data FROM attachment_blobs WHERE sha256 = ?", (sha256,)))
        if not rows:
            raise AttachmentMissing(f"attachment {sha256[:12]}...: not in the database "
                                    "(attachment_blobs)")
        data = bytes(rows[0][0])
        if hashlib.sha256(data).hexdigest() != sha256:
            raise AttachmentMissing(f"attachment {sha256[:12]}...: damaged in the database "
                                    "(its content does not match its hash)")
        return data

    def __repr__(self) -> str:
        return "DatabaseAttachments()"


async def _stored(conn: Any, shas: Iterable[str]) -> set[str]:
    wanted, found = list(shas), set[str]()
    for i in range(0, len(wanted), _LOOKUP_BATCH):
        batch = wanted[i:i + _LOOKUP_BATCH]
        rows = await conn.execute_fetchall(
            "SELECT sha256 FROM attachment_blobs WHERE sha256 IN"
            f" ({', '.join('?' * len(batch))})", batch)
        found.update(r[0] for r in rows)
    return found


async def _insert(conn: Any, attachments: Iterable[Attachment]) -> None:
    now = iso(utcnow())
    for attachment in attachments:
        await conn.execute(
            "INSERT INTO attachment_blobs (sha256, data, size, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (sha256) DO NOTHING",
            (attachment.sha256, attachment.data, attachment.size, now))


def attachments_in_database(config: Config) -> bool:
    """True when attachment bytes belong in the database: when it is PostgreSQL, which
    several gateway hosts may share (#17); with SQLite (one host) the files."""
    return config.storage.postgres is not None


def attachment_store(config: Config) -> AttachmentStore:
    """The attachment store this configuration uses (see attachments_in_database)."""
    if attachments_in_database(config):
        return DatabaseAttachments()
    return FileAttachments(config.storage.attachments)
