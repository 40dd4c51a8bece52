"""Attachment bytes on disk: files named by their SHA-256 (never by the sender's file
name), written atomically, each stored once however often it arrives."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.model import Attachment


def save_attachments(folder: Path, attachments: Iterable[Attachment]) -> list[dict[str, Any]]:
    """Write attachment bytes under generated names (content hashes), never the
    sender's file name. Idempotent: the same bytes land in the same file."""
    saved = []
    for attachment in attachments:
        path = attachment_path(folder, attachment.sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(attachment.data)
            os.replace(tmp, path)
        saved.append({"id": uuid.uuid4().hex, "filename": attachment.filename,
                      "content_type": attachment.content_type, "size": attachment.size,
                      "sha256": attachment.sha256, "is_log": attachment.is_log})
    return saved


def attachment_path(folder: Path, sha256: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return folder / sha256[:2] / sha256
