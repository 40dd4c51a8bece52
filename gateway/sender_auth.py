"""Who really sent a message (SPEC §10): the sender verdict `pass` / `fail` / `none`.

    verify_sender(raw, peer=..., mail_from=..., config=config.auth, helo=...) -> Verdict

Sources, in this order; the first one that decides wins:

1. `trusted_relays`: the connecting IP lies in one of them -> `pass`.
2. `Authentication-Results` header fields whose authserv-id is in
   `trusted_authserv_ids` (compared case-insensitively); all others are ignored, since
   anyone can write one. Rule: every header field carrying a trusted id counts, wherever
   it stands, because the MTA in front removes inbound ones carrying its id before it adds
   its own (deploy/authentication.md). `dmarc=fail` -> `fail`; `dmarc=pass`, or a
   `dkim=pass` / `spf=pass` whose domain is aligned with the From domain -> `pass`.
   A fail beats a pass when trusted fields disagree.
3. With `verify = "dns"` the gateway's own checks through `resolver`: DMARC record
   (`_dmarc.<From domain>`, else the organisational domain's, with `sp=`), DKIM (dkimpy;
   a signature whose `l=` leaves part of the body unsigned is not a pass), SPF (pyspf) for
   the envelope sender (the HELO name for a null one) and the connecting IP, only when
   that identity is aligned with From and the client is not on loopback. An aligned
   DKIM or SPF pass -> `pass`; a DMARC record and nothing aligned -> `fail`, whatever its
   `p=` (a forged reporter's mail must not change tickets; `p=none` only means the domain
   asks receivers not to reject, and held mail can still be released by an operator);
   no record and nothing aligned -> `none`. A DNS timeout or SERVFAIL that could have
   changed the outcome -> `none` with the reason.

No From, or a From that is no address -> `none`; several From fields or addresses ->
`fail` (which of them would the verdict be about?). Work is bounded: header sections over
`MAX_HEADER_BYTES` are not verified, at most `MAX_AUTH_RESULTS` header fields and
`MAX_SIGNATURES` aligned signatures are looked at, and all DNS lookups of one message share
`[auth] timeout`. Blocking (call it in a thread); it never raises.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from functools import cache
from typing import Any

import authres
import dkim
import dkim.util
import dns.exception
import dns.name
import dns.rcode
import dns.resolver
import spf
from dkim.canonicalization import CanonicalizationPolicy
from publicsuffixlist import PublicSuffixList

from gateway.config import AuthConfig, parse_hostport
from gateway.model import AuthResult, Verdict

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 256 * 1024  # a longer header section is not verified at all
MAX_HEADER_LINES = 5000  # nor one of more lines (real mail: a few hundred at most)
MAX_AUTH_RESULTS = 50  # Authentication-Results fields read, topmost first
MAX_SIGNATURES = 5  # aligned DKIM signatures verified
MAX_REASON = 240  # characters of a reason shown to staff
DNS_TRY_SECONDS = 1.0  # one try at the resolver; retried within the message's budget

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# dkimpy logs every broken signature at ERROR without saying which message it was; the
# verdict's reason carries that instead. A logger of its own, never registered globally.
_DKIMPY_LOG = logging.Logger("gateway.sender_auth.dkimpy", level=logging.CRITICAL + 1)

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_DOMAIN = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{2,63}", re.ASCII)
_LEADING_COMMENTS = re.compile(r"^\s*(?:\([^()]*\)\s*)*")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,200}>)", re.IGNORECASE | re.MULTILINE)


def verify_sender(raw: bytes, *, peer: str, mail_from: str, config: AuthConfig,
                  helo: str = "") -> Verdict:
    """The verdict on one stored message; `peer` is "ip:port", "" or a socket path."""
    try:
        return _verify(raw, peer, mail_from.strip().strip("<>"), config, helo.strip())
    except Exception as err:  # a verdict must never stop a message from being processed
        log.warning("%s sender verification broke: %s: %s", _message_id(raw),
                    type(err).__name__, str(err)[:200])
        return Verdict(AuthResult.NONE, f"verification error ({type(err).__name__})")


def _verify(raw: bytes, peer: str, mail_from: str, config: AuthConfig, helo: str) -> Verdict:
    header = header_section(raw)
    fields = header_fields(header) if header is not None else []
    sender = read_from_domain(fields)
    ip = peer_ip(peer)
    if ip is not None and in_networks(ip, config.trusted_relays):
        return Verdict(AuthResult.PASS, f"received from trusted relay {ip}", sender.domain)
    if header is None:
        return _none(f"header section over {MAX_HEADER_BYTES // 1024} KiB or "
                     f"{MAX_HEADER_LINES} lines: not verified")
    if not sender.domain:
        result = AuthResult.FAIL if sender.ambiguous else AuthResult.NONE
        return Verdict(result, sender.problem)
    domain = sender.domain
    trusted = {a.lower() for a in config.trusted_authserv_ids}
    verdict, note = judge_authentication_results(
        read_authentication_results(fields, trusted), domain)
    if verdict is not None:
        return verdict
    if config.verify == "dns":
        signed = any(name == "dkim-signature" for name, _ in fields)
        return verify_by_dns(raw, domain, ip, mail_from, helo, config, signed)
    if note:
        return Verdict(AuthResult.NONE, note, domain)
    if trusted:
        ids = ", ".join(sorted(trusted))
        return Verdict(AuthResult.NONE, _cut(f"no Authentication-Results from {ids}"), domain)
    return Verdict(AuthResult.NONE, "not checked: [auth] verify is off and no authserv-id "
                   "is trusted", domain)


def _none(reason: str, domain: str = "") -> Verdict:
    return Verdict(AuthResult.NONE, _cut(reason), domain)


def _cut(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


# --- the message's headers ---------------------------------------------------------


def header_section(raw: bytes) -> bytes | None:
    """The header section without the blank line; None when over MAX_HEADER_BYTES or
    MAX_HEADER_LINES (every later step is linear in it, dkimpy's parser more than that)."""
    match = _BLANK_LINE.search(raw, 0, MAX_HEADER_BYTES + 4)
    if match is not None:
        header = raw[: match.start()]
    elif len(raw) <= MAX_HEADER_BYTES:
        header = raw
    else:
        return None
    return header if header.count(b"\n") < MAX_HEADER_LINES else None


def header_fields(header: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) per field, in order; lines that are no field
    (an mbox "From " line, junk) are skipped."""
    fields: list[tuple[str, list[str]]] = []
    for line in header.split(b"\n"):
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text[:1] in (" ", "\t"):
            if fields:
                fields[-1][1].append(text.strip())
            continue
        name, colon, value = text.partition(":")
        if colon and name and " " not in name.strip():
            fields.append((name.strip().lower(), [value.strip()]))
    return [(name, " ".join(p for p in parts if p)) for name, parts in fields]


@dataclass(frozen=True, slots=True)
class FromDomain:
    domain: str  # "" when there is no single usable From address
    problem: str = ""
    ambiguous: bool = False  # several From fields or addresses


def read_from_domain(fields: Sequence[tuple[str, str]]) -> FromDomain:
    values = [value for name, value in fields if name == "from"]
    if not values:
        return FromDomain("", "no From header")
    if len(values) > 1:
        return FromDomain("", f"{len(values)} From headers: cannot tell who sent it",
                          ambiguous=True)
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if not addresses:
        return FromDomain("", "From header holds no address")
    if len(addresses) > 1:
        return FromDomain("", _cut(f"several From addresses ({', '.join(addresses[:3])}): "
                                   "cannot tell who sent it"), ambiguous=True)
    local, at, domain = addresses[0].rpartition("@")
    normal = normalise_domain(domain) if at and local else None
    if normal is None:
        return FromDomain("", _cut(f"From address {addresses[0]!r} has no usable domain"))
    return FromDomain(normal)


def normalise_domain(domain: str) -> str | None:
    """Lower-case A-label form, or None for an address literal or a malformed name."""
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if len(name) <= 253 and _DOMAIN.fullmatch(name) else None


def _message_id(raw: bytes) -> str:
    match = _MESSAGE_ID.search(raw, 0, 65536)
    return match.group(1).decode("ascii", "replace") if match else "<no message-id>"


# --- alignment -------------------------------------------------------------------


@cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # the list shipped with the package: nothing is downloaded


def organisational_domain(domain: str) -> str:
    """example.com for mail.example.com, example.co.uk for a.example.co.uk (RFC 7489 §3.2)."""
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(domain: str, from_domain: str, strict: bool = False) -> bool:
    domain = domain.lower().rstrip(".")
    if strict:
        return domain == from_domain
    return bool(domain) and organisational_domain(domain) == organisational_domain(from_domain)


# --- 1. trusted relays -----------------------------------------------------------


def peer_ip(peer: str) -> IpAddress | None:
    """The client's IP from the stored "ip:port" text; None for "" or a socket path."""
    host, sep, port = peer.strip().rpartition(":")
    if not sep or not port.isdigit():
        host = peer.strip()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(ip: IpAddress, networks: Sequence[str]) -> bool:
    for text in networks:
        try:
            if ip in ipaddress.ip_network(text, strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False


# --- 2. trusted Authentication-Results --------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One `method=result` of a trusted Authentication-Results field."""

    authserv_id: str
    method: str  # "dmarc", "dkim", "spf", ...
    result: str  # "pass", "fail", ...
    domain: str  # header.from / header.d (or header.i) / smtp.mailfrom (or smtp.helo)


def read_authentication_results(fields: Sequence[tuple[str, str]],
                                trusted: set[str]) -> list[MethodResult]:
    """The results of the A-R fields whose authserv-id is trusted; unreadable ones skipped."""
    if not trusted:
        return []
    results: list[MethodResult] = []
    values = [value for name, value in fields if name == "authentication-results"]
    for value in values[:MAX_AUTH_RESULTS]:
        if _authserv_id(value) not in trusted:
            continue  # not ours: written by anyone
        try:
            parsed = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception:  # authres raises its own SyntaxError and friends on junk
            log.info("unreadable Authentication-Results field skipped: %.80r", value)
            continue
        authserv_id = _without_job_id(str(parsed.authserv_id or ""))
        if authserv_id not in trusted:
            continue
        for result in parsed.results:
            method = str(result.method or "").lower()
            props = {f"{p.type}.{p.name}".lower(): str(p.value or "")
                     for p in (result.properties or ())}
            results.append(MethodResult(authserv_id, method, str(result.result or "").lower(),
                                        _result_domain(method, props)))
    return results


def _authserv_id(value: str) -> str:
    """The first token of an A-R value, comments skipped: a cheap filter before parsing."""
    rest = _LEADING_COMMENTS.sub("", value, count=1)
    return _without_job_id(re.split(r"[\s;(]", rest, maxsplit=1)[0])


def _without_job_id(authserv_id: str) -> str:
    """"mx.s4e.pl/4XyZ" (OpenDKIM/OpenDMARC with AuthservIDWithJobID) -> "mx.s4e.pl"."""
    return authserv_id.split("/", 1)[0].lower()


def _result_domain(method: str, props: dict[str, str]) -> str:
    if method == "dmarc":
        value = props.get("header.from", "")
    elif method == "dkim":
        value = props.get("header.d", "") or props.get("header.i", "")
    elif method == "spf":
        value = props.get("smtp.mailfrom", "") or props.get("smtp.helo", "")
    else:
        return ""
    return normalise_domain(value.rpartition("@")[2]) or ""


def judge_authentication_results(results: Sequence[MethodResult],
                                 from_domain: str) -> tuple[Verdict | None, str]:
    """(verdict, "") when trusted results decide; (None, what they said) otherwise."""
    relevant = [r for r in results if r.method != "dmarc" or r.domain in ("", from_domain)]
    for r in relevant:
        if r.method == "dmarc" and r.result == "fail":
            others = _summary(x for x in relevant if x.method in ("dkim", "spf"))
            detail = f" ({others})" if others else ""
            return Verdict(AuthResult.FAIL, _cut(f"{r.authserv_id}: dmarc=fail{detail}"),
                           from_domain), ""
    for r in relevant:
        if r.method == "dmarc" and r.result == "pass":
            return Verdict(AuthResult.PASS, f"{r.authserv_id}: dmarc=pass", from_domain), ""
    for r in relevant:
        if r.method in ("dkim", "spf") and r.result == "pass" and aligned(r.domain, from_domain):
            label = "d=" if r.method == "dkim" else ""
            return Verdict(AuthResult.PASS, _cut(f"{r.authserv_id}: {r.method}=pass "
                                                 f"{label}{r.domain} aligned"), from_domain), ""
    said = [r for r in relevant if r.method in ("dmarc", "dkim", "spf")]
    if not said:
        return None, ""
    return None, _cut(f"{said[0].authserv_id}: nothing aligned with {from_domain} "
                      f"({_summary(said)})")


def _summary(results: Any) -> str:
    parts = [f"{r.method}={r.result}" + (f" {r.domain}" if r.domain else "") for r in results]
    return ", ".join(parts[:4])


# --- 3. the gateway's own DNS checks ----------------------------------------------


class DnsTrouble(Exception):
    """A lookup without a usable answer (timeout, SERVFAIL, no resolver); str = reason."""


class DnsBudget:
    """One resolver and one deadline shared by every lookup of one message."""

    def __init__(self, resolver: str, seconds: float) -> None:
        self.deadline = time.monotonic() + max(seconds, 0.5)
        self.resolver = _make_resolver(resolver)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def query(self, name: str, rdtype: str, limit: float | None = None) -> list[Any]:
        """The answer's records ([] for NXDOMAIN / no data); DnsTrouble otherwise."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return []  # a name that cannot exist (label over 63 octets...): no record
        left = self.remaining() if limit is None else min(self.remaining(), limit)
        if left <= 0.05:
            raise DnsTrouble(f"dns timeout looking up {name} (time for checks used up)")
        try:
            answer = self.resolver.resolve(qname, rdtype, lifetime=left, search=False,
                                           raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.Timeout:
            raise DnsTrouble(f"dns timeout looking up {name}") from None
        except dns.resolver.NoNameservers as err:
            raise DnsTrouble(f"dns error looking up {name}: {_rcode_text(err)}") from None
        except (dns.exception.DNSException, OSError) as err:
            raise DnsTrouble(f"dns error looking up {name}: {type(err).__name__}") from None
        return list(answer.rrset) if answer.rrset is not None else []

    def txt(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in self.query(name, "TXT")]


def _make_resolver(text: str) -> dns.resolver.Resolver:
    try:
        if not text:
            resolver = dns.resolver.Resolver()  # the system's, from /etc/resolv.conf
        else:
            host, port = parse_hostport(text)
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [host]
            resolver.port = port
    except dns.resolver.NoResolverConfiguration:
        raise DnsTrouble("no dns resolver configured (/etc/resolv.conf)") from None
    except ValueError as err:
        raise DnsTrouble(f"dns resolver {text!r} unusable: {err}") from None
    resolver.timeout = DNS_TRY_SECONDS
    resolver.use_edns(0, 0, 1232)
    return resolver


def _rcode_text(err: dns.resolver.NoNameservers) -> str:
    for entry in (err.kwargs or {}).get("errors", ()):
        answer = entry[-1] if isinstance(entry, tuple) else None
        rcode = getattr(answer, "rcode", None)
        if callable(rcode):
            return dns.rcode.to_text(rcode())
    return "no usable answer (SERVFAIL)"


@dataclass(frozen=True, slots=True)
class DmarcPolicy:
    record_domain: str  # where the record was found
    policy: str  # "none" | "quarantine" | "reject": p=, or sp= for a subdomain
    strict_dkim: bool  # adkim=s
    strict_spf: bool  # aspf=s


def lookup_dmarc(budget: DnsBudget, from_domain: str) -> DmarcPolicy | None:
    """The DMARC policy for `from_domain` (RFC 7489 §6.6.3), None when there is none."""
    tags = _dmarc_record(budget, from_domain)
    record_domain = from_domain
    organisational = organisational_domain(from_domain)
    if tags is None and organisational != from_domain:
        tags = _dmarc_record(budget, organisational)
        record_domain = organisational
    if tags is None:
        return None
    policy = tags.get("p", "none")
    if record_domain != from_domain:
        policy = tags.get("sp", policy)
    if policy not in ("none", "quarantine", "reject"):
        policy = "none"
    return DmarcPolicy(record_domain, policy, tags.get("adkim") == "s", tags.get("aspf") == "s")


def _dmarc_record(budget: DnsBudget, domain: str) -> dict[str, str] | None:
    records = [r for r in budget.txt(f"_dmarc.{domain}")
               if r[:8].lower() == b"v=dmarc1" and r[8:9] in (b"", b";", b" ", b"\t")]
    if len(records) != 1:
        return None  # none, or several: RFC 7489 says treat as none
    tags: dict[str, str] = {}
    for part in records[0].decode("ascii", "replace").split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip().lower())
    return tags


@dataclass(frozen=True, slots=True)
class DkimCheck:
    domain: str  # d=
    result: str  # "pass" | "fail" | "partial" | "temperror" | "not aligned"
    detail: str = ""

    def describe(self) -> str:
        if self.result == "not aligned":
            return f"dkim d={self.domain} not aligned"
        detail = f" ({self.detail})" if self.detail else ""
        return f"dkim d={self.domain} {self.result}{detail}"


def check_dkim(raw: bytes, from_domain: str, strict: bool, budget: DnsBudget) -> list[DkimCheck]:
    """Verify the aligned DKIM signatures, topmost first, until one passes."""
    header, body_start = _split_body(raw)
    try:
        signer = HeaderOnlyDKIM(header + b"\r\n\r\n", logger=_DKIMPY_LOG)
    except Exception as err:  # dkimpy's header parser on malformed mail
        return [DkimCheck("?", "fail", f"message unreadable: {type(err).__name__}")]
    signatures = [value for name, value in signer.headers if name.lower() == b"dkim-signature"]
    checks: list[DkimCheck] = []
    verified = 0
    for index, value in enumerate(signatures):
        try:
            tags = dkim.util.parse_tag_value(re.sub(rb"\r?\n[ \t]", b" ", value))
            domain = tags.get(b"d", b"").decode("ascii").strip().lower().rstrip(".")
        except Exception:
            checks.append(DkimCheck("?", "fail", "unreadable signature"))
            continue
        if not aligned(domain, from_domain, strict):
            checks.append(DkimCheck(domain, "not aligned"))
            continue
        if verified == MAX_SIGNATURES:
            break
        verified += 1
        check = _verify_signature(signer, index, domain, budget)
        if check.result == "pass":  # the header signature holds: now the body
            check = check_body_hash(raw, body_start, signer.signature_fields, domain)
        checks.append(check)
        if check.result == "pass":
            break
    return checks


def _split_body(raw: bytes) -> tuple[bytes, int]:
    """(header section, offset of the body); the caller has bounded the header's size."""
    match = _BLANK_LINE.search(raw, 0, MAX_HEADER_BYTES + 4)
    if match is None:
        return raw, len(raw)
    return raw[: match.start()], match.end()


class HeaderOnlyDKIM(dkim.DKIM):
    """dkimpy checks the header signature only; `check_body_hash` checks the body.

    dkimpy canonicalizes and hashes the whole body in single regex calls, which hold
    the GIL for seconds on a 25 MiB message and so stall the SMTP intake that shares the
    process. Given only the header and a signature without `bh=`, it skips the body
    (its `verify_sig_process` hashes the body only when `bh` is present); the signed
    header field itself, `bh=` included, is still covered by the signature. Relies on
    dkimpy's internals: pinned below 1.2.
    """

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        without_body = {key: value for key, value in sig.items() if key != b"bh"}
        return bool(super().verify_sig_process(without_body, include_headers, sig_header,
                                               dnsfunc))


def _verify_signature(signer: dkim.DKIM, index: int, domain: str,
                      budget: DnsBudget) -> DkimCheck:
    trouble: list[str] = []
    missing: list[str] = []

    def key_txt(name: bytes, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace").rstrip(".")
        try:
            records = budget.txt(text)
        except DnsTrouble as err:
            trouble.append(str(err))
            raise dkim.DnsTimeoutError(str(err)) from None
        if not records:
            missing.append(text)
        return records[0] if records else None

    try:
        ok = signer.verify(index, dnsfunc=key_txt)
    except dkim.DKIMException as err:
        return DkimCheck(domain, "fail", _short(str(err)))
    except Exception as err:  # dkimpy on odd input: a failed signature, not a crash
        return DkimCheck(domain, "fail", type(err).__name__)
    if trouble:
        return DkimCheck(domain, "temperror", trouble[0])
    if missing:
        return DkimCheck(domain, "fail", f"no key at {missing[0]}")
    if not ok:
        return DkimCheck(domain, "fail", "signature does not verify")
    return DkimCheck(domain, "pass")


def check_body_hash(raw: bytes, body_start: int, tags: dict[bytes, bytes],
                    domain: str) -> DkimCheck:
    """The body against the signature's bh= (RFC 6376 §3.7). A signature whose l= leaves
    part of the body unsigned is not a pass: anything could have been appended."""
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        hasher = dkim.HASH_ALGORITHMS[tags[b"a"]]
        expected = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]))
        limit = int(tags[b"l"]) if b"l" in tags else None
    except Exception as err:  # dkimpy validated the tags; this is only belt and braces
        return DkimCheck(domain, "fail", f"unreadable signature ({type(err).__name__})")
    relaxed = policy.body_algorithm.name == b"relaxed"
    digest, length = canonical_body_digest(raw, body_start, relaxed, hasher, limit)
    if digest != expected:
        return DkimCheck(domain, "fail", "body hash mismatch")
    if limit is not None and limit < length:
        return DkimCheck(domain, "partial", f"l= signs {limit} of {length} body bytes")
    if limit is not None and limit > length:
        return DkimCheck(domain, "fail", f"l={limit} is longer than the body ({length} bytes)")
    return DkimCheck(domain, "pass")


BODY_CHUNK = 256 * 1024  # canonicalized and hashed a piece at a time: short GIL holds
_LINE_END = re.compile(rb"\r?\n")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")


def canonical_body_digest(raw: bytes, start: int, relaxed: bool, hasher: Callable[[], Any],
                          limit: int | None = None,
                          chunk: int = BODY_CHUNK) -> tuple[bytes, int]:
    """(digest of the canonical body, or of its first `limit` bytes; its whole length).

    The same result as dkimpy's canonicalize_body over the body it parses (lines joined
    with CRLF; simple or relaxed, RFC 6376 §3.4.3-3.4.4), computed piece by piece. Pieces
    end at a line end, so no CRLF or run of blanks is split; empty lines at a piece's end
    are held back until more content follows, since trailing empty lines do not count.
    """
    digest = hasher()
    length = 0
    held = 0  # CRLFs of empty lines not yet known to be followed by content

    def emit(data: bytes) -> None:
        nonlocal length
        room = len(data) if limit is None else max(0, min(len(data), limit - length))
        if room:
            digest.update(data[:room] if room < len(data) else data)
        length += len(data)

    position, end = start, len(raw)
    while position < end:
        newline = raw.find(b"\n", min(position + chunk, end) - 1)
        stop = end if newline < 0 else newline + 1
        piece = raw[position:stop]
        position = stop
        # Each substitution only where it changes something: cheap tests in C first.
        if piece.count(b"\n") != piece.count(b"\r\n"):
            piece = _LINE_END.sub(b"\r\n", piece)
        if relaxed and (b" \r\n" in piece or b"\t" in piece):
            piece = _TRAILING_WSP.sub(b"\r\n", piece)
        if relaxed and (b"  " in piece or b"\t" in piece):
            piece = _WSP.sub(b" ", piece)
        trailing = 0
        while piece.endswith(b"\r\n", 0, len(piece) - 2 * trailing):
            trailing += 1
        content = piece[: len(piece) - 2 * trailing]
        if content:
            if held:
                emit(b"\r\n" * held)
            emit(content)
            held = trailing
        else:
            held += trailing
    if length:
        emit(b"\r\n")  # the last line's end, or the one added to a body without one
    elif not relaxed:
        emit(b"\r\n")  # an empty body is one CRLF in simple, nothing in relaxed
    return digest.digest(), length


def _short(text: str) -> str:
    return text.split(" (", 1)[0][:80]


@dataclass(frozen=True, slots=True)
class SpfCheck:
    result: str  # pyspf's: pass, fail, softfail, neutral, none, permerror, temperror;
    #              or "skipped", "not aligned" (not evaluated)
    domain: str  # the checked identity's domain
    detail: str = ""

    def describe(self) -> str:
        if self.result == "skipped":
            return f"spf not checked ({self.detail})"
        if self.result == "not aligned":
            return f"spf {self.domain} not aligned"
        if self.result == "temperror":
            return f"spf temperror ({self.detail})"
        return f"spf {self.result}"


def check_spf(ip: IpAddress | None, mail_from: str, helo: str, from_domain: str,
              strict: bool, budget: DnsBudget) -> SpfCheck:
    """SPF for the envelope sender, or the HELO name for a null one (RFC 7208 §2.3).

    Only an identity aligned with the From domain is evaluated: any other cannot make
    DMARC pass, and evaluating it would let a sender whose own DNS is slow turn a DMARC
    fail into a temperror.
    """
    identity = mail_from or (f"postmaster@{helo}" if helo else "")
    if ip is None:
        return SpfCheck("skipped", "", "no client IP")
    if ip.is_loopback:  # Postfix on this host handed it over: its IP says nothing
        return SpfCheck("skipped", "", f"client {ip} is a relay on this host")
    if not identity:
        return SpfCheck("skipped", "", "no envelope sender or HELO")
    domain = identity.rpartition("@")[2].lower().rstrip(".")
    if not aligned(domain, from_domain, strict):
        return SpfCheck("not aligned", domain)
    trouble: list[str] = []
    query_class = _spf_query_class(_spf_lookup(budget, trouble))
    left = max(budget.remaining(), 0.1)
    try:
        query = query_class(i=str(ip), s=identity, h=helo or domain, timeout=left,
                            querytime=left)
        result, _code, explanation = query.check()
    except Exception as err:  # pyspf on odd input: no SPF result, not a crash
        return SpfCheck("temperror", domain, f"spf check broke: {type(err).__name__}")
    if result == "temperror":
        return SpfCheck(result, domain, trouble[0] if trouble else _short(str(explanation)))
    return SpfCheck(str(result), domain)


def _spf_lookup(budget: DnsBudget, trouble: list[str]) -> Callable[..., list[Any]]:
    """pyspf's DNSLookup(name, qtype, strict, timeout) through the message's budget."""

    def lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
        try:
            records = budget.query(name, qtype, limit=timeout)
        except DnsTrouble as err:
            trouble.append(str(err))
            raise spf.TempError(str(err)) from None
        answers: list[Any] = []
        for rdata in records:
            if qtype in ("A", "AAAA"):
                answers.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                answers.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                answers.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                answers.append(((name, qtype), rdata.strings))
        return answers

    return lookup


def _spf_query_class(lookup: Callable[..., list[Any]]) -> type:
    """spf.query whose `dns` method calls `lookup` instead of the module's DNSLookup.

    pyspf offers no resolver hook: `query.dns` calls the module global `DNSLookup`.
    Replacing that global would leak between calls and threads, so this builds a copy of
    `query.dns` whose globals name our lookup, and a subclass that uses it. Relies on
    pyspf's internals: the dependency is pinned below 2.1.
    """
    original = spf.query.dns
    namespace = dict(original.__globals__)
    namespace["DNSLookup"] = lookup
    method = types.FunctionType(original.__code__, namespace, original.__name__,
                                original.__defaults__, original.__closure__)
    return type("BudgetedQuery", (spf.query,), {"dns": method})


def verify_by_dns(raw: bytes, from_domain: str, ip: IpAddress | None, mail_from: str,
                  helo: str, config: AuthConfig, signed: bool = True) -> Verdict:
    """The gateway's own DKIM / SPF / DMARC evaluation (RFC 7489 §4.2); `signed`: the
    message has a DKIM-Signature field (else dkimpy need not parse it)."""
    try:
        budget = DnsBudget(config.resolver, config.timeout_seconds)
        policy = lookup_dmarc(budget, from_domain)
    except DnsTrouble as err:
        return _none(str(err), from_domain)
    dmarc = "dmarc=pass" if policy is not None else "pass"
    no_record = "" if policy is not None else f"; no dmarc record for {from_domain}"
    strict_dkim = policy.strict_dkim if policy else False
    strict_spf = policy.strict_spf if policy else False

    dkim_checks = check_dkim(raw, from_domain, strict_dkim, budget) if signed else []
    for check in dkim_checks:
        if check.result == "pass":
            return Verdict(AuthResult.PASS, _cut(f"{dmarc} (dkim d={check.domain} aligned"
                                                 f"{no_record})"), from_domain)
    spf_check = check_spf(ip, mail_from, helo, from_domain, strict_spf, budget)
    if spf_check.result == "pass":
        return Verdict(AuthResult.PASS, _cut(f"{dmarc} (spf {spf_check.domain} aligned"
                                             f"{no_record})"), from_domain)

    dkim_text = ", ".join(c.describe() for c in dkim_checks[:3]) or "no dkim signature"
    summary = f"{spf_check.describe()}, {dkim_text}"
    troubles = [c.detail for c in dkim_checks if c.result == "temperror"]
    if spf_check.result == "temperror":
        troubles.append(spf_check.detail)
    if troubles and policy is not None:
        return _none(f"dmarc temperror: {troubles[0]}", from_domain)
    if policy is None:
        return _none(f"no dmarc record for {from_domain}: {summary}", from_domain)
    return Verdict(AuthResult.FAIL, _cut(f"dmarc=fail: p={policy.policy}, {summary}"),
                   from_domain)
