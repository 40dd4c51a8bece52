"""Service contracts: the repair time each device is covered for (imported from the
contracts file by `contracts import`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

import aiosqlite


@dataclass(frozen=True, slots=True)
class ContractRow:
    device_id: str
    customer: str
    repair_hours: int
    imported_at: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ContractRow:
        return cls(row["device_id"], row["customer"], row["repair_hours"], row["imported_at"])


async def contract_hours(conn: aiosqlite.Connection, device_ids: Iterable[str]) -> int | None:
    """The shortest repair time of the contracts covering any of these devices."""
    best = None
    for device_id in device_ids:
        rows = list(await conn.execute_fetchall(
            "SELECT repair_hours FROM contracts WHERE device_id = ?", (device_id.strip(),)))
        if rows and (best is None or rows[0][0] < best):
            best = rows[0][0]
    return best


async def list_contracts(conn: aiosqlite.Connection) -> list[ContractRow]:
    return [ContractRow.from_row(r) for r in await conn.execute_fetchall(
        "SELECT device_id, customer, repair_hours, imported_at FROM contracts"
        " ORDER BY device_id COLLATE NOCASE")]
