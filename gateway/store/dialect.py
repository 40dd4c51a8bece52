"""Which database a connection speaks: SQLite (aiosqlite, the worker's
DirectConnection) or PostgreSQL (`store.postgres.PgConnection`).

Branch on it only where the SQL must differ; most of the store's SQL runs on both."""

from __future__ import annotations

from typing import Any

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def dialect_of(conn: Any) -> str:
    return str(getattr(conn, "dialect", SQLITE))


def is_postgres(conn: Any) -> bool:
    return dialect_of(conn) == POSTGRESQL


def insertion_order(conn: Any) -> str:
    """The column that orders a table's rows as inserted where the key does not
    (attachments: a random id): SQLite's rowid, PostgreSQL's `seq` (migration 0009)."""
    return "seq" if is_postgres(conn) else "rowid"
