"""The migrations runner: the numbered `migrations/NNNN_name.sql` files, applied in
order, one transaction each; a database newer than the code is refused."""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

import aiosqlite

from gateway.errors import SchemaTooNewError, StoreError
from gateway.store.connection import iso, utcnow
from gateway.store.dialect import POSTGRESQL, SQLITE, dialect_of, is_postgres

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str = SQLITE) -> tuple[Migration, ...]:
    """The numbered .sql files shipped with the package, in order: `migrations/` for
    SQLite, `migrations/postgresql/` (the same numbers and names) for PostgreSQL."""
    found = []
    folder = resources.files("gateway.migrations")
    if dialect == POSTGRESQL:
        folder = folder / "postgresql"
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"migrations are not numbered 0001..{len(found):04d}: {versions}")
    return tuple(found)


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements (sqlite3 knows where one ends)."""
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
            ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()):
        raise StoreError(f"incomplete SQL statement at the end of a migration: {buffer[:60]!r}")
    return statements


async def schema_version(conn: aiosqlite.Connection) -> int:
    if is_postgres(conn):
        rows = list(await conn.execute_fetchall("SELECT to_regclass('schema_version')"))
        if rows[0][0] is None:
            return 0
    else:
        rows = list(await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"))
        if not rows:
            return 0
    rows = list(await conn.execute_fetchall("SELECT max(version) FROM schema_version"))
    return rows[0][0] or 0


async def migrate(conn: aiosqlite.Connection) -> list[str]:
    """Apply the migrations the database lacks, each in its own transaction.

    Refuses a database newer than the code. Safe against a concurrent migrate: the
    version is read again under the write lock.
    """
    migrations = load_migrations(dialect_of(conn))
    latest = migrations[-1].version if migrations else 0
    applied: list[str] = []
    # Under the write lock: two PostgreSQL nodes starting at once would race on it.
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    for migration in migrations:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await schema_version(conn)
            if current > latest:
                raise SchemaTooNewError(
                    f"database schema version {current} is newer than this gateway "
                    f"(knows up to {latest}): upgrade s4e-gateway, do not downgrade")
            if migration.version <= current:
                await conn.execute("ROLLBACK")
                continue
            if is_postgres(conn):
                await conn.executescript(migration.sql)  # type: ignore[attr-defined]
            else:
                for statement in split_statements(migration.sql):
                    await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, iso(utcnow())))
            await conn.execute("COMMIT")
            applied.append(migration.name)
            log.info("migration %s applied", migration.name)
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
    current = await schema_version(conn)
    if current > latest:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this gateway "
            f"(knows up to {latest}): upgrade s4e-gateway, do not downgrade")
    return applied


async def check_schema(conn: aiosqlite.Connection) -> None:
    """For commands that must not migrate: the schema must be exactly current."""
    migrations = load_migrations(dialect_of(conn))
    latest = migrations[-1].version if migrations else 0
    current = await schema_version(conn)
    if current > latest:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this gateway "
            f"(knows up to {latest}): upgrade s4e-gateway, do not downgrade")
    if current < latest:
        raise StoreError(
            f"database schema version {current} is older than this gateway ({latest}): "
            "run `s4e-gateway migrate`")
