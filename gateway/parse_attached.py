"""Text of a filled-in form sent as a PDF or Word (.docx) attachment, read like body text.

Hostile files get bounded work: only files up to MAX_FORM_BYTES, the first MAX_FORM_PAGES
pages of a PDF, a .docx whose document part is at most MAX_DOCX_XML bytes unpacked (a zip
bomb is refused before it is inflated), at most MAX_FORM_TEXT characters; any failure of
either library (including RecursionError on nested objects) gives None, never raises.
"""

from __future__ import annotations

import io
import logging
import zipfile

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 2 * 1024 * 1024  # a filled-in form is a few hundred KiB; scans have no text
MAX_FORM_PAGES = 5
MAX_DOCX_XML = 4 * 1024 * 1024
MAX_FORM_TEXT = 64 * 1024
MAX_FORMS = 3  # attachments read per mail

PDF_TYPES = frozenset({"application/pdf", "application/x-pdf"})
DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def form_kind(name: str, content_type: str) -> str | None:
    """ "pdf", "docx" or None for an attachment (by type, else by file name)."""
    lowered = name.lower()
    if content_type in PDF_TYPES or lowered.endswith(".pdf"):
        return "pdf"
    if content_type == DOCX_TYPE or lowered.endswith(".docx"):
        return "docx"
    return None


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader  # imported on first use: most mail has no PDF

    reader = PdfReader(io.BytesIO(data), strict=False)
    pages = []
    for page in reader.pages[:MAX_FORM_PAGES]:
        pages.append(page.extract_text() or "")
        if sum(map(len, pages)) > MAX_FORM_TEXT:
            break
    return "\n".join(pages)


def _docx_text(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("word/document.xml")
        if info.file_size > MAX_DOCX_XML:
            raise ValueError(f"document.xml of {info.file_size} bytes")
    import docx  # python-docx

    document = docx.Document(io.BytesIO(data))
    lines = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            # Two blanks between cells: "Numer seryjny  SN-1" reads as label and value.
            cells = list(dict.fromkeys(c.text.strip() for c in row.cells))
            lines.append("  ".join(c for c in cells if c))
    return "\n".join(lines)


def form_text(name: str, content_type: str, data: bytes) -> str | None:
    """The text of a PDF or .docx attachment, None when it is neither, too large or
    unreadable."""
    kind = form_kind(name, content_type)
    if kind is None or not data or len(data) > MAX_FORM_BYTES:
        return None
    try:
        text = _pdf_text(data) if kind == "pdf" else _docx_text(data)
    except Exception as exc:  # noqa: BLE001 - hostile files break these libraries in many ways
        log.info("%s attachment %r not read: %r", kind, name[:80], exc)
        return None
    return text[:MAX_FORM_TEXT]
