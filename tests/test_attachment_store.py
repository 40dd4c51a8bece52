"""Attachment bytes where every node reads them (#17): the attachment_blobs table
(`DatabaseAttachments`) beside the files (`FileAttachments`, the SQLite default).

The database store is what PostgreSQL uses; here it runs on SQLite end to end, passed
in where the gateway and the web desk take it: a report over SMTP, its ticket, the
downloads, the raw read back byte for byte, the same log in two reports stored once.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest

from gateway import store
from gateway.attachment_store import (AttachmentStore, DatabaseAttachments, FileAttachments,
                                      attachment_store, attachments_in_database)
from gateway.attachments import AttachmentMissing
from gateway.config import load_config
from gateway.daemon import Gateway
from gateway.model import Attachment
from tests.conftest import REPORT_BODY, Desk, make_mail, wait_for, write_config
from tests.webdesk import add_user, running_web, signed_in


def report_with(files: Iterable[tuple[str, str, bytes]], message_id: str) -> bytes:
    msg = message_from_bytes(make_mail(body=REPORT_BODY, message_id=message_id),
                             policy=policy.default)
    for filename, ctype, data in files:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=policy.SMTP)


@asynccontextmanager
async def desk_storing(tmp_path: Path, attachments: AttachmentStore | None) -> AsyncIterator[Desk]:
    """A gateway from a real config file, keeping attachment bytes in `attachments`."""
    path = write_config(tmp_path)
    gw = Gateway(load_config(path), attachments=attachments)
    await gw.start(port=0)
    try:
        yield Desk(gw, path)
    finally:
        await gw.stop(grace=2)


def blobs(db: Path) -> list[tuple[str, bytes, int]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT sha256, data, size FROM attachment_blobs ORDER BY sha256").fetchall()
    finally:
        conn.close()


def inbound_sha(db: Path, inbound_id: int) -> tuple[str, int, str | None]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT i.sha256, length(r.raw), r.spans FROM inbound i"
                            " JOIN inbound_raw r USING (id) WHERE i.id = ?", (inbound_id,)).fetchone()
    finally:
        conn.close()


async def test_attachments_in_the_database_end_to_end(tmp_path: Path) -> None:
    log = os.urandom(1024 * 1024)  # a 1 MB log: incompressible, cut out of the raw
    shot = b"\x89PNG\r\n\x1a\n" + os.urandom(300)  # small: stays inside the raw as well
    in_db = DatabaseAttachments()
    async with desk_storing(tmp_path, in_db) as desk:
        row = await desk.mail(report_with([("serwer.log", "text/plain", log),
                                           ("ekran.png", "image/png", shot)], "<db1@example.com>"))
        assert row["outcome"] == "new"
        ticket = await desk.ticket(row["ticket"])
        listed = {a["filename"]: (a["size"], a["sha256"], a["is_log"]) for a in ticket["attachments"]}
        assert listed == {"serwer.log": (len(log), hashlib.sha256(log).hexdigest(), True),
                          "ekran.png": (len(shot), hashlib.sha256(shot).hexdigest(), False)}
        # The bytes are rows of the database, and no file was written.
        assert {(sha, data) for sha, data, _ in blobs(desk.db)} == {
            (hashlib.sha256(log).hexdigest(), log), (hashlib.sha256(shot).hexdigest(), shot)}
        folder = desk.gw.config.storage.attachments
        assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))
        # The raw kept without the log's base64, and put back exactly as received.
        sha, stored, spans = inbound_sha(desk.db, row["id"])
        assert spans and stored < 30_000
        conn = await store.connect(desk.db)
        try:
            raw = await store.read_raw(conn, row["id"], in_db)
            with pytest.raises(store.StoreError, match="attachment .* is missing"):
                await store.read_raw(conn, row["id"], FileAttachments(folder))
        finally:
            await conn.close()
        assert hashlib.sha256(raw).hexdigest() == sha

        # The web desk reads the same bytes from the database.
        await add_user(desk, tmp_path)
        async with running_web(desk, attachments=in_db) as web, signed_in(web) as client:
            url = f"/tickets/{row['ticket']}/attachments/{hashlib.sha256(log).hexdigest()}"
            download = await client.get(url)
            assert download.status_code == 200 and download.content == log
            raw_download = await client.get(f"/inbox/{row['id']}/raw")
            assert raw_download.status_code == 200 and raw_download.content == raw

            # The same log in a second report: one row still, both tickets list it.
            second = await desk.mail(report_with([("serwer.log", "text/plain", log)],
                                                 "<db2@example.com>"))
            assert second["ticket"] != row["ticket"]
            assert len(blobs(desk.db)) == 2
            again = await client.get(f"/tickets/{second['ticket']}/attachments/"
                                     f"{hashlib.sha256(log).hexdigest()}")
            assert again.status_code == 200 and again.content == log
            sha2, _, spans2 = inbound_sha(desk.db, second["id"])
            assert spans2
            again_raw = await client.get(f"/inbox/{second['id']}/raw")
            assert hashlib.sha256(again_raw.content).hexdigest() == sha2

            # Damaged bytes are an error that says so, never wrong bytes.
            db = sqlite3.connect(desk.db)
            db.execute("UPDATE attachment_blobs SET data = ? WHERE sha256 = ?",
                       (b"x" + log[1:], hashlib.sha256(log).hexdigest()))
            db.commit()
            db.close()
            broken = await client.get(url)
            assert broken.status_code == 404 and "damaged in the database" in broken.text
            assert (await client.get(f"/inbox/{row['id']}/raw")).status_code != 200

        # Reprocessing reads the raw through the same store.
        conn = await store.connect(desk.db)
        try:
            db = sqlite3.connect(desk.db)
            db.execute("UPDATE attachment_blobs SET data = ? WHERE sha256 = ?",
                       (log, hashlib.sha256(log).hexdigest()))
            db.commit()
            db.close()
            from gateway.staff import reprocess
            inbound = await store.get_inbound(conn, row["id"])
            assert inbound is not None
            result = await reprocess(conn, desk.gw.config, inbound, attachments=in_db)
            assert result.ticket == int(row["ticket"])
        finally:
            await conn.close()


async def test_the_same_bytes_saved_at_once_by_two_connections_are_one_row(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    attachment = Attachment("a.log", "text/plain", len(data), hashlib.sha256(data).hexdigest(),
                            True, data)
    first, second = await store.connect(tmp_path / "gw.db"), None
    try:
        await store.migrate(first)
        second = await store.connect(tmp_path / "gw.db")
        in_db = DatabaseAttachments()
        # Two nodes storing the same report's attachment at the same moment: neither fails.
        await asyncio.gather(in_db.save(first, [attachment, attachment]),
                             in_db.save(second, [attachment]))
        assert [(sha, size) for sha, _, size in blobs(tmp_path / "gw.db")] == [
            (attachment.sha256, len(data))]
        assert await in_db.load(second, attachment.sha256) == data
        with pytest.raises(AttachmentMissing, match="not in the database"):
            await in_db.load(first, "0" * 64)
        # Inside a caller's transaction the bytes commit with the caller's change.
        other = Attachment("b.log", "text/plain", 3, hashlib.sha256(b"abc").hexdigest(), True, b"abc")
        async with store.Tx(first):
            await in_db.save(first, [other])
        assert await in_db.load(second, other.sha256) == b"abc"
    finally:
        await first.close()
        if second is not None:
            await second.close()


class FullStore:
    """A database store on a full disk, until `room` is set: save fails as ENOSPC."""

    where = "database"

    def __init__(self) -> None:
        self.inner = DatabaseAttachments()
        self.room = False
        self.refused = 0

    async def save(self, conn: Any, attachments: Iterable[Attachment]) -> None:
        if not self.room:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        await self.inner.save(conn, attachments)

    async def load(self, conn: Any, sha256: str) -> bytes:
        return await self.inner.load(conn, sha256)


async def test_the_raw_is_cut_only_after_the_bytes_are_stored(tmp_path: Path) -> None:
    log = os.urandom(100_000)
    full = FullStore()
    raw = report_with([("serwer.log", "text/plain", log)], "<full@example.com>")
    async with desk_storing(tmp_path, full) as desk:
        from tests.conftest import send

        await send(desk.gw.port, "jan.kowalski@example.com", ["serwis@s4e.pl"], raw)
        await wait_for(lambda: full.refused >= 1)
        (row,) = await desk.inbox()
        # Not stored: the raw stays whole, nothing is cut, no ticket yet, the message waits.
        sha, stored, spans = inbound_sha(desk.db, row["id"])
        assert spans is None and stored == row["size"] and row["outcome"] is None
        assert blobs(desk.db) == []
        full.room = True  # room again: the processor's retry takes it through

        async def done() -> dict | None:
            rows = await desk.inbox()
            return rows[0] if rows[0]["outcome"] else None

        routed = await wait_for(done, timeout=30)
        assert routed["outcome"] == "new"
        _, stored, spans = inbound_sha(desk.db, row["id"])
        assert spans and stored < 20_000 and [b[1] for b in blobs(desk.db)] == [log]
        conn = await store.connect(desk.db)
        try:
            assert hashlib.sha256(await store.read_raw(conn, row["id"], full)).hexdigest() == sha
        finally:
            await conn.close()


async def test_cli_downloads_an_attachment_and_the_raw_from_the_files(tmp_path: Path) -> None:
    log = os.urandom(50_000)
    async with desk_storing(tmp_path, None) as desk:
        row = await desk.mail(report_with([("serwer.log", "text/plain", log)], "<cli@example.com>"))
        sha = hashlib.sha256(log).hexdigest()
        out = tmp_path / "got.log"
        _, _, err = await desk.cli("tickets", "attachment", row["ticket"], sha[:10], "-o", str(out))
        assert out.read_bytes() == log and f"{len(log)} B" in err
        # One clear line for each wrong request, exit 1, no traceback.
        for argv, message in (
                ((row["ticket"], sha[:10], "-o", str(out)), "exists already; not overwritten"),
                ((row["ticket"], "xyz"), "not a SHA-256"),
                ((row["ticket"], "0" * 64), f"ticket #{row['ticket']} has no attachment"),
                (("654321", sha), "654321")):
            code, _, err = await desk.cli("tickets", "attachment", *argv, ok=False)
            assert code == 1 and message in err and "Traceback" not in err, (argv, err)
        # A lost file is said to be lost.
        (lost,) = [p for p in desk.gw.config.storage.attachments.rglob("*") if p.is_file()]
        lost.unlink()
        code, _, err = await desk.cli("tickets", "attachment", row["ticket"], sha, ok=False)
        assert code == 1 and "is missing" in err and "Traceback" not in err


def test_the_store_follows_the_configuration(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert not attachments_in_database(config)  # SQLite: the files, as ever
    chosen = attachment_store(config)
    assert isinstance(chosen, FileAttachments) and chosen.folder == tmp_path / "att"
