"""Consistent copies of the database while the daemon runs (SQLite's online backup
API), the attachments beside them, and the copy `migrate` takes first.

The copy is one read transaction: in WAL mode writers go on meanwhile and the copy
is the database as of its start. Attachment files are named by their SHA-256 and
never change, so copying them after the database gives every attachment the copy
refers to (files that arrived since are harmless extras).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from typing import Any

from gateway import store
from gateway.attachments import fsync_path
from gateway.errors import GatewayError, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DatabaseCopy:
    path: Path
    schema_version: int
    tickets: int
    size: int


@dataclass(frozen=True, slots=True)
class FilesCopy:
    copied: int
    present: int
    size: int


def copy_database(source: Path, dest: Path) -> DatabaseCopy:
    """Copy `source` to `dest` atomically (a temporary file, checked, then renamed):
    a single self-contained file (rollback journal, not WAL)."""
    if not source.is_file():
        raise StoreError(f"{source}: no database to back up")
    if dest.resolve() == source.resolve():
        raise GatewayError(f"{dest}: is the database itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        src = sqlite3.connect(source, timeout=10)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # all pages in one step: one consistent snapshot
                dst.execute("PRAGMA journal_mode = DELETE")
                (check,) = dst.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise StoreError(f"{dest}: the copy does not check out: {check}")
                version = _scalar(dst, "SELECT max(version) FROM schema_version", 0)
                tickets = _scalar(dst, "SELECT count(*) FROM tickets", 0)
            finally:
                dst.close()
        finally:
            src.close()
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
    except sqlite3.Error as err:
        raise StoreError(f"backup of {source} failed: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return DatabaseCopy(dest, version, tickets, dest.stat().st_size)


def copy_attachments(source: Path, dest: Path) -> FilesCopy:
    """Copy attachment files missing under `dest` (same name = same content)."""
    copied = present = size = 0
    if not source.is_dir():
        return FilesCopy(0, 0, 0)
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue  # a write in progress (".name.tmp") is not an attachment yet
        target = dest / path.relative_to(source)
        if target.exists() and target.stat().st_size == path.stat().st_size:
            present += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        copied += 1
        size += target.stat().st_size
    return FilesCopy(copied, present, size)


def copy_before_migrate(database: Path, version: int, now: datetime | None = None) -> Path:
    """The copy `migrate` takes before it changes the schema, next to the database:
    gateway.db.v0004-20261201T211500Z.bak"""
    moment = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    dest = database.with_name(f"{database.name}.v{version:04d}-{moment}.bak")
    return copy_database(database, dest).path


async def migrate_with_copy(conn: Any, database: Path) -> tuple[list[str], Path | None]:
    """store.migrate, after a copy of the database when there is a schema to change
    (not for a new, empty database). A failed copy stops the migration."""
    migrations = store.load_migrations()
    latest = migrations[-1].version if migrations else 0
    current = await store.schema_version(conn)
    copy = None
    if 0 < current < latest:
        copy = await asyncio.to_thread(copy_before_migrate, database, current)
        log.info("database schema version %d copied to %s before migrating", current, copy)
    return await store.migrate(conn), copy


def _scalar(conn: sqlite3.Connection, sql: str, default: int) -> int:
    try:
        row = conn.execute(sql).fetchone()
    except sqlite3.OperationalError:  # e.g. no tickets table in a very old schema
        return default
    return row[0] if row and row[0] is not None else default
