"""Differential check: how gateway.parser reads each message against the stdlib's reading
(`email` with policy.default), every difference given its reason. A table, not a speed
figure; exits 1 when a difference has no reason (then look at it: a bug on one side).

    python bench/diff_stdlib.py [--corpus DIR ...] [--verbose]

Defaults: ../shared/corpus and tests/data. Three comparisons per message:

* parts: every leaf part, decoded (`parse_mime` tree and `decode_body` against
  `msg.walk()` and `get_payload(decode=True)`), as a multiset of SHA-256;
* body text: the stdlib's `get_body(("plain", "html")).get_content()` (HTML laid out
  by our own `html_to_text`, so only the part chosen and its decoding are compared)
  against the text of the parts ours reads as text, before quoted history is cut;
* attachments: the stdlib's leaves other than its body against `Report.attachments`.
"""

from __future__ import annotations

import argparse
import email
import hashlib
import re
import sys
from collections import Counter
from dataclasses import dataclass
from email import policy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.parse_html import html_to_text  # noqa: E402
from gateway.parse_mime import Part, decode_body, parse_tree  # noqa: E402
from gateway.parse_text import fold, normalize_text  # noqa: E402
from gateway.parser import _Collector, parse_report  # noqa: E402

DEFAULT_DIRS = [ROOT.parent / "shared" / "corpus", ROOT / "tests" / "data"]
_BLANKS = re.compile(r"\s+")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def squash(text: str) -> str:
    return fold(_BLANKS.sub(" ", normalize_text(text)).strip())


@dataclass
class Theirs:
    leaves: list[tuple[str, str, str, bytes]]  # (content type, filename, sha, data)
    body_text: str | None
    body_sha: str | None
    body_has_name: bool
    error: str = ""


def stdlib_reading(raw: bytes) -> Theirs:
    try:
        msg = email.message_from_bytes(raw, policy=policy.default)
        leaves = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            leaves.append((part.get_content_type(), part.get_filename() or "", sha(data), data))
        body = msg.get_body(preferencelist=("plain", "html"))
        text = body_sha = None
        named = False
        if body is not None and not body.is_multipart():
            content = body.get_content()
            text = content if isinstance(content, str) else None
            if text is not None and body.get_content_type() == "text/html":
                text = html_to_text(text)[0]
            payload = body.get_payload(decode=True)
            body_sha = sha(payload if isinstance(payload, bytes) else b"")
            named = bool(body.get_filename())
        return Theirs(leaves, text, body_sha, named)
    except Exception as exc:  # noqa: BLE001 - the stdlib failing is a finding of its own
        return Theirs([], None, None, False, f"{type(exc).__name__}: {exc}"[:100])


def _all_parts(leaves: list[tuple[str, str, Part]]) -> list[Part]:
    return [p for _, _, p in leaves]


def our_leaves(part: Part | None, out: list[tuple[str, str, Part]]) -> list[tuple[str, str, Part]]:
    if part is None:
        return out
    if part.children:
        for child in part.children:
            our_leaves(child, out)
    else:  # a leaf, or a multipart with no parts at all (kept to explain the difference)
        data = b"" if part.content_type.startswith("multipart/") else decode_body(part)
        out.append((part.content_type, sha(data), part))
    return out


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    reason: str  # "" when both agree
    detail: str = ""


def parts_rows(name: str, raw: bytes, theirs: Theirs, ours: list[tuple[str, str, Part]],
               notes: tuple[str, ...]) -> list[Row]:
    if theirs.error:
        return [Row(name, "parts", "stdlib raised; ours read the message", theirs.error)]
    a = Counter(h for _, h, _ in ours)
    b = Counter(h for _, _, h, _ in theirs.leaves)
    if a == b:
        return [Row(name, "parts", "")]
    lowered = raw.lower()
    reasons = []
    if any("without usable boundary" in n for n in notes):
        reasons.append("multipart without a usable boundary: ours reads its body as text")
    if any("cut at" in n for n in notes):
        reasons.append("MIME tree cut at a limit (depth 20 / 500 parts)")
    if re.search(rb"content-type:\s*message/rfc822[^\n]*\n(?:[^\n]+\n)*?content-transfer-encoding:\s*(?:base64|quoted)", lowered) \
            or re.search(rb"content-transfer-encoding:\s*(?:base64|quoted)[^\n]*\n(?:[^\n]+\n)*?content-type:\s*message/rfc822", lowered):
        reasons.append("encoded message/rfc822: ours decodes it and reads the message inside")
    their_b64 = {h for ct, _, h, d in theirs.leaves}
    lenient = [p for _, h, p in ours if h not in their_b64 and p.cte == "base64"]
    if lenient:
        reasons.append("base64 with bad padding or stray characters: ours decodes leniently")
    if any(p.cte in ("x-uuencode", "uuencode", "x-uue", "uue") for _, _, p in ours):
        reasons.append("x-uuencode: ours decodes it (stdlib too, but not without 'begin')")
    if b"multipart/digest" in lowered:
        reasons.append("multipart/digest: parts default to message/rfc822")
    if b"message/delivery-status" in lowered:
        reasons.append("message/delivery-status: stdlib splits it into header blocks, ours keeps one part")
    if b"message/external-body" in lowered:
        reasons.append("message/external-body: stdlib reads the phantom headers as a message, ours keeps the part")
    if re.search(rb"(?m)^[\x21-\x39\x3b-\x7e]+[ \t]+:", raw.split(b"\n\n", 1)[0]):
        reasons.append("obsolete 'Name : value' header: ours reads it as a header, stdlib ends the header there")
    boundaries = re.findall(rb'boundary="?([^";\s]+)', raw, re.I)
    if len(boundaries) != len(set(boundaries)):
        reasons.append("a nested multipart reuses its parent's boundary: both sides split it differently")
    if any(not p.children and p.content_type.startswith("multipart/") for p in _all_parts(ours)):
        reasons.append("a multipart with no parts (only its closing delimiter)")
    empty = sha(b"")
    if not reasons and (a - b).keys() <= {empty} and (b - a).keys() <= {empty}:
        reasons.append("empty parts between back-to-back delimiters: ours keeps them, stdlib drops them")
    if not reasons:
        return [Row(name, "parts", "UNEXPLAINED", f"ours {sum(a.values())} parts, stdlib {sum(b.values())}")]
    return [Row(name, "parts", reasons[0], "; ".join(reasons[1:]))]


def text_row(name: str, raw: bytes, theirs: Theirs, ours_text: str, notes: tuple[str, ...]) -> Row:
    if theirs.error:
        return Row(name, "body text", "stdlib raised; ours read the message")
    if theirs.body_text is None:
        if not ours_text.strip():
            return Row(name, "body text", "")
        return Row(name, "body text", "stdlib finds no text body (none at the top level); ours reads "
                   "every inline text part")
    a, b = squash(ours_text), squash(theirs.body_text)
    if a == b:
        return Row(name, "body text", "")
    if theirs.body_has_name and b not in a:
        return Row(name, "body text", "a text part with a file name is an attachment for ours, the body for stdlib")
    if any(n.startswith("charset") for n in notes) or ("\ufffd" in b and "\ufffd" not in a):
        return Row(name, "body text", "charset chosen by the content (Polish 8-bit, wrong labels)",
                   "; ".join(notes)[:80])
    if re.search(rb"(?im)^content-type:[^\n]*(?:\n[ \t][^\n]*)*format=flowed", raw):
        return Row(name, "body text", "format=flowed undone (RFC 3676)")
    if re.search(rb"(?m)^begin [0-7]{3,4} ", raw):
        return Row(name, "body text", "an inline uuencoded file is cut out of the text")
    if b and b in a:
        return Row(name, "body text", "ours joins every inline text part (stdlib: the first one)")
    if re.search(rb"(?i)content-type:\s*text/html", raw):
        return Row(name, "body text", "HTML layout (quotes dropped, history marked) differs")
    if a and a in b:
        return Row(name, "body text", "stdlib's body holds more (a part ours keeps as a file)")
    return Row(name, "body text", "UNEXPLAINED", f"ours {a[:40]!r} / stdlib {b[:40]!r}")


def attachment_row(name: str, raw: bytes, theirs: Theirs, ours_files: list[tuple[str, str]],
                   ours_parts: list[tuple[str, str, Part]], ours_text: str) -> Row:
    if theirs.error:
        return Row(name, "attachments", "stdlib raised; ours read the message")
    theirs_files = Counter(h for _, _, h, _ in theirs.leaves if h != theirs.body_sha)
    ours_c = Counter(h for _, h in ours_files)
    if ours_c == theirs_files:
        return Row(name, "attachments", "")
    by_hash = {h: (ct, p) for ct, h, p in ours_parts}
    reasons = Counter()
    empty_multipart = any(p.content_type.startswith("multipart/") and not p.children
                          for _, _, p in ours_parts)
    theirs_types = {h: ct for ct, _, h, _ in theirs.leaves}
    for h, _n in (theirs_files - ours_c).items():
        ct, part = by_hash.get(h, ("", None))
        if ct.startswith("multipart/") or (part is None and theirs_types.get(h, "").startswith("multipart/")
                                           and empty_multipart):
            reasons["a multipart with no parts: nothing to keep (stdlib: its preamble)"] += 1
        elif part is None and b"message/delivery-status" in raw.lower():
            reasons["message/delivery-status kept as one file (stdlib: its header blocks)"] += 1
        elif part is None:
            reasons["decoded differently (see parts)"] += 1
        elif ct in ("text/plain", "text/html"):
            reasons["text part: shown as body text (or the alternative not shown)"] += 1
        elif ct == "application/ms-tnef" or "winmail" in (part.param("name") or "").lower():
            reasons["winmail.dat unpacked into its files"] += 1
        elif ct.startswith("message/"):
            reasons["enclosed message read as a forward"] += 1
        else:
            reasons["UNEXPLAINED missing"] += 1
    extra = ours_c - theirs_files
    for h, _n in extra.items():
        ct, part = by_hash.get(h, ("", None))
        if b"ms-tnef" in raw.lower() or b"winmail.dat" in raw.lower():
            reasons["files unpacked from winmail.dat"] += 1
        elif re.search(rb"(?m)^begin [0-7]{3,4} ", raw):
            reasons["a uuencoded file cut out of a text part"] += 1
        elif ct == "message/delivery-status":
            reasons["message/delivery-status kept as one file (stdlib: its header blocks)"] += 1
        elif part is not None and ct.startswith("text/"):
            reasons["a text part the stdlib took as its body is a file for ours"] += 1
        elif part is not None:
            reasons["kept as a file where the stdlib shows it as body"] += 1
        else:
            reasons["decoded differently (see parts)"] += 1
    unexplained = [r for r in reasons if r.startswith("UNEXPLAINED")]
    top = unexplained[0] if unexplained else reasons.most_common(1)[0][0]
    return Row(name, "attachments", "UNEXPLAINED" if unexplained else top,
               ", ".join(f"{r} x{n}" for r, n in reasons.items()))


def compare(path: Path, base: Path) -> list[Row]:
    raw = path.read_bytes()
    name = str(path.relative_to(base))
    theirs = stdlib_reading(raw)
    notes: list[str] = []
    root = parse_tree(raw, notes)
    ours_text = _Collector(list(notes)).message(root).text if root is not None else ""
    report = parse_report(raw)
    ours_parts = our_leaves(root, [])
    return [
        *parts_rows(name, raw, theirs, ours_parts, report.notes),
        text_row(name, raw, theirs, ours_text, report.notes),
        attachment_row(name, raw, theirs, [(a.filename, a.sha256) for a in report.attachments],
                       ours_parts, ours_text),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, action="append")
    parser.add_argument("--verbose", action="store_true", help="list every differing message")
    args = parser.parse_args()
    rows: list[Row] = []
    total = 0
    for folder in args.corpus or DEFAULT_DIRS:
        if not folder.is_dir():
            print(f"(no corpus at {folder})")
            continue
        for path in sorted(folder.rglob("*.eml")):
            total += 1
            rows += compare(path, folder)
    print(f"{total} messages compared with the stdlib (email, policy.default)\n")
    whats = ("parts", "body text", "attachments")
    for what in whats:
        same = sum(1 for r in rows if r.what == what and not r.reason)
        print(f"{what}: {same} of {total} the same")
    counts = Counter((r.what, r.reason) for r in rows if r.reason)
    width = max((len(reason) for _, reason in counts), default=10)
    print(f"\n{'':12s} {'reason of the difference':{width}s} messages")
    for (what, reason), n in sorted(counts.items(), key=lambda kv: (whats.index(kv[0][0]), -kv[1])):
        print(f"{what:12s} {reason:{width}s} {n:8d}")
    if args.verbose:
        print()
        for r in rows:
            if r.reason:
                print(f"{r.name:45s} {r.what:12s} {r.reason}  {r.detail}")
    unexplained = [r for r in rows if r.reason == "UNEXPLAINED"]
    for r in unexplained:
        print(f"UNEXPLAINED {r.name} {r.what}: {r.detail}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
