"""Values kept with the data (the settings table): made once, then read back."""

from __future__ import annotations

from collections.abc import Callable

import aiosqlite


async def setting(conn: aiosqlite.Connection, key: str, create: Callable[[], str]) -> str:
    """A value kept with the data, made by `create()` the first time it is asked for."""
    await conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (key, create()))
    rows = list(await conn.execute_fetchall("SELECT value FROM settings WHERE key = ?", (key,)))
    return rows[0][0]
