"""A full disk (a small tmpfs this test mounts): nothing answered 250 is lost or left
`failed`; once space returns every such message is processed, with no manual step."""

from __future__ import annotations

import asyncio
import errno
import os
import smtplib
import subprocess
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import INTAKE, REPORT_BODY, send, wait_for, write_config


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small file system to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def fill(folder: Path, spare: int = 0) -> Path:
    """Write a filler file until the file system says ENOSPC, then give back `spare`
    bytes (room for a commit or two, not for the work after it)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError:
            pass
    if spare:
        os.truncate(filler, max(filler.stat().st_size - spare, 0))
    return filler


def report(n: int) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Jan Kowalski <jan{n}@example.com>"
    msg["To"] = INTAKE
    msg["Subject"] = f"Awaria {n}"
    msg["Message-ID"] = f"<full{n}@example.com>"
    msg.set_content(REPORT_BODY)
    msg.add_attachment(os.urandom(200_000), maintype="application", subtype="gzip",
                       filename=f"logs{n}.gz")
    return msg.as_bytes()


async def deliver(port: int, n: int) -> str:
    try:
        await send(port, f"jan{n}@example.com", [INTAKE], report(n))
    except smtplib.SMTPResponseException as err:
        return str(err.smtp_code)
    return "250"


async def test_attachment_files_on_a_full_disk_wait_for_space(tmp_path, small_disk) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(f'"{tmp_path}/att"', f'"{small_disk}/att"'))
    filler = fill(small_disk)
    from gateway.config import load_config
    from gateway.daemon import Gateway
    from tests.conftest import Desk

    gw = Gateway(load_config(config))
    await gw.start(port=0)
    try:
        desk = Desk(gw, config)
        answers = [await deliver(gw.port, n) for n in range(3)]
        assert answers == ["250"] * 3  # the database has room: accepted
        await asyncio.sleep(2)  # the processor meets ENOSPC writing the attachments
        rows = await desk.inbox()
        assert len(rows) == 3 and all(r["outcome"] is None for r in rows), rows
        filler.unlink()  # space returns; nobody runs `inbox reprocess`
        await wait_for(lambda: _all_routed(desk, 3), timeout=60)
        names = set()
        for row in await desk.inbox():
            names.update(a["filename"] for a in (await desk.ticket(row["ticket"]))["attachments"])
        assert names == {"logs0.gz", "logs1.gz", "logs2.gz"}
    finally:
        await gw.stop(grace=2)


async def _all_routed(desk, count: int) -> bool:
    rows = await desk.inbox()
    return len(rows) == count and all(r["outcome"] == "new" for r in rows)


@pytest.mark.parametrize("spare", [0, 700_000])
async def test_database_on_a_full_disk_loses_nothing_it_accepted(tmp_path, small_disk,
                                                                 spare) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text()
                      .replace(f'"{tmp_path}/att"', f'"{small_disk}/att"')
                      .replace(f'"{tmp_path}/gw.db"', f'"{small_disk}/gw.db"'))
    from gateway.config import load_config
    from gateway.daemon import Gateway
    from tests.conftest import Desk

    gw = Gateway(load_config(config))
    await gw.start(port=0)
    try:
        desk = Desk(gw, config)
        assert await deliver(gw.port, 100) == "250"
        filler = fill(small_disk, spare)
        answers = {n: await deliver(gw.port, n) for n in range(8)}
        assert set(answers.values()) <= {"250", "451", "452"}, answers
        accepted = [n for n, code in answers.items() if code == "250"]
        filler.unlink()
        await wait_for(lambda: _all_routed(desk, len(accepted) + 1), timeout=90)
        ids = {r["message_id"] for r in await desk.inbox()}
        assert ids == {f"<full{n}@example.com>" for n in [100, *accepted]}
        # What got 451 is accepted when the sender tries again.
        refused = [n for n, code in answers.items() if code != "250"]
        assert all([await deliver(gw.port, n) == "250" for n in refused])
        await wait_for(lambda: _all_routed(desk, 9), timeout=60)
    finally:
        await gw.stop(grace=2)
