"""Message-IDs of the mail we send: they carry the ticket number and an HMAC over it,
so a reply's In-Reply-To/References proves which ticket it answers and a forged
reference is not trusted (SPEC §6).

    <t123456.4f9c2a1be07d.1c0ffee5a1b2c3d4e5f6@s4e.pl>
      ticket  random       HMAC-SHA256(key, "t123456.4f9c2a1be07d")[:20]

Mail not tied to a ticket (guidance, held notices) uses the prefix `g` instead of
`t123456`: still recognisable as ours when it comes back.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_OURS = re.compile(r"^<(t(\d{6})|g)\.([0-9a-f]{12})\.([0-9a-f]{20})@([^<>@\s]+)>$")


def new_key() -> str:
    return secrets.token_hex(32)


def _mac(key: str, body: str) -> str:
    return hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()[:20]


def make_message_id(key: str, domain: str, ticket: int | None) -> str:
    nonce = secrets.token_hex(6)
    head = f"t{ticket:06d}" if ticket is not None else "g"
    return f"<{head}.{nonce}.{_mac(key, f'{head}.{nonce}')}@{domain}>"


def verify_message_id(key: str, message_id: str) -> tuple[bool, int | None]:
    """(is it one of ours with a valid HMAC, the ticket it names)."""
    match = _OURS.match(message_id.strip())
    if not match:
        return False, None
    head, number, nonce, mac = match.group(1), match.group(2), match.group(3), match.group(4)
    if not hmac.compare_digest(mac, _mac(key, f"{head}.{nonce}")):
        return False, None
    return True, int(number) if number else None
