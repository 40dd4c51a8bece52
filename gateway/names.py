"""File names from customers, made safe to show.

A sender chooses an attachment's name freely: `../../etc/passwd`, a name with an
escape sequence that rewrites an operator's terminal, or `invoice\u202efdp.exe`,
which a bidi override shows as `invoiceexe.pdf`. `display_filename` gives the name
to show in the CLI, JSON and the web desk; the original stays stored (a download
name goes through its own encoding).
"""

from __future__ import annotations

import re
import unicodedata

MAX_DISPLAY_NAME = 120
REPLACEMENT = "\ufffd"

# Bidi embeddings, overrides and isolates, and the invisible marks that reorder or
# hide text: shown as U+FFFD so a reader sees that something was there.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _safe_char(char: str) -> str:
    if char in _BIDI:
        return REPLACEMENT
    category = unicodedata.category(char)
    if category in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        return REPLACEMENT
    return char


def display_filename(name: str, *, limit: int = MAX_DISPLAY_NAME) -> str:
    """The last path part of `name`, with control, format and bidi characters shown
    as U+FFFD, cut to `limit` characters keeping the extension; never empty."""
    base = re.split(r"[/\\]", name or "")[-1]
    text = "".join(_safe_char(c) for c in base).strip()
    text = re.sub(rf"{REPLACEMENT}+", REPLACEMENT, text)
    if text in ("", ".", ".."):
        return "unnamed"
    if len(text) > limit:
        stem, dot, ext = text.rpartition(".")
        if dot and stem and len(ext) <= 10:
            text = text[: limit - len(ext) - 2] + "\u2026." + ext
        else:
            text = text[: limit - 1] + "\u2026"
    return text
