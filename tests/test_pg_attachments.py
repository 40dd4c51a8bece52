"""Attachment bytes where every node reads them, on a real PostgreSQL (#17): two real
daemons (`serve`, with their worker processes) on one database. A report with a log
taken by one MX host is downloaded and read back raw through the other; the same log
in a report to the other node is the same row; no node writes attachment files."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from gateway import store
from gateway.attachment_store import DatabaseAttachments, attachment_store
from gateway.config import load_config
from gateway.model import Attachment
from tests.conftest import INTAKE, Sink, run_cli_sync, send, wait_for
from tests.test_attachment_store import report_with
from tests.test_pg_cluster import nodes, query


async def cli(node_folder: Path, *argv: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run_cli_sync, *argv, "--config", str(node_folder / "gw.toml"))


async def routed(url: str, message_id: str) -> tuple[int, int]:
    async def found() -> tuple[int, int] | None:
        rows = query(url, "SELECT id, ticket FROM inbound WHERE message_id = %s"
                          " AND outcome IS NOT NULL", (message_id,))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None  # type: ignore[arg-type]

    return await wait_for(found, timeout=30)


async def test_two_nodes_read_each_others_attachments(tmp_path: Path, pg_url: str,
                                                      smtp_sink: Sink) -> None:
    log = os.urandom(600_000)
    sha = hashlib.sha256(log).hexdigest()
    async with nodes(tmp_path, pg_url, smtp_sink, "mx1", "mx2") as (mx1, mx2):
        raw = report_with([("serwer.log", "text/plain", log)], "<pg-a1@example.com>")
        await send(mx1.port, "jan.kowalski@example.com", [INTAKE], raw)
        inbound, number = await routed(pg_url, "<pg-a1@example.com>")
        # The other node's command line lists it and gives the same bytes.
        out = mx2.folder / "got.log"
        code, _, err = await cli(mx2.folder, "tickets", "attachment", f"{number:06d}", sha,
                                 "-o", str(out))
        assert code == 0, err
        assert out.read_bytes() == log
        code, shown, err = await cli(mx2.folder, "tickets", "show", f"{number:06d}", "--json")
        assert code == 0 and sha in shown, err
        # The raw read back through the other node is the message as received.
        config = load_config(mx2.folder / "gw.toml")
        conn = await store.connect(config.storage.database)
        try:
            assert hashlib.sha256(await store.read_raw(conn, inbound, attachment_store(config))
                                  ).digest() == hashlib.sha256(raw).digest()
        finally:
            await conn.close()
        # The same log in another report, to the other node: one row.
        await send(mx2.port, "jan.kowalski@example.com", [INTAKE],
                   report_with([("serwer.log", "text/plain", log)], "<pg-a2@example.com>"))
        await routed(pg_url, "<pg-a2@example.com>")
        assert query(pg_url, "SELECT sha256, size FROM attachment_blobs") == [(sha, len(log))]
        assert query(pg_url, "SELECT count(*) FROM attachments WHERE sha256 = %s", (sha,)) == [(2,)]
        cut = query(pg_url, "SELECT count(*) FROM inbound_raw WHERE spans IS NOT NULL")
        assert cut == [(2,)]  # both raws kept without the log's base64
    for node in (mx1, mx2):  # worker processes chose the database too: no files
        assert not any(p.is_file() for p in (node.folder / "att").rglob("*"))


async def test_four_connections_storing_the_same_bytes_at_once_store_one_row(pg_url: str) -> None:
    conns = [await store.connect(pg_url) for _ in range(4)]
    try:
        in_db = DatabaseAttachments()
        for size in (3, 100_000, 2_000_000):  # each: all four at the same moment
            data = os.urandom(size)
            attachment = Attachment("a.log", "text/plain", size,
                                    hashlib.sha256(data).hexdigest(), True, data)
            await asyncio.gather(*(in_db.save(c, [attachment]) for c in conns))
            assert await in_db.load(conns[3], attachment.sha256) == data
        assert query(pg_url, "SELECT count(*), sum(size) FROM attachment_blobs") == [
            (3, 2_100_003)]
    finally:
        for conn in conns:
            await conn.close()
