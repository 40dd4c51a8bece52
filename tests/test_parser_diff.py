"""The differential check against the stdlib (bench/diff_stdlib.py) over the corpus and
tests/data: every difference has a reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import diff_stdlib  # noqa: E402

FOLDERS = [d for d in diff_stdlib.DEFAULT_DIRS if d.is_dir()]


@pytest.mark.parametrize("folder", FOLDERS, ids=[d.name for d in FOLDERS])
def test_every_difference_from_the_stdlib_is_explained(folder: Path) -> None:
    rows = [row for path in sorted(folder.rglob("*.eml")) for row in diff_stdlib.compare(path, folder)]
    assert rows
    assert [r for r in rows if r.reason == "UNEXPLAINED"] == []


def test_short_base64_quantum_is_padded_like_the_stdlib() -> None:
    from gateway.parser import parse_report

    raw = (b"From: a@b.pl\nContent-Type: multipart/mixed; boundary=B\n\n--B\n\nx\n--B\n"
           b"Content-Type: application/octet-stream; name=p.bin\nContent-Transfer-Encoding: base64\n\n"
           b"XXX\n--B--\n")
    [att] = parse_report(raw).attachments
    assert att.data == b"]u"  # what email.message.get_payload(decode=True) gives
