"""A real DNS server on 127.0.0.1 for tests (dnslib's server, UDP, ephemeral port),
serving zones that the test writes, plus DKIM keys to sign test mail with.

    from dns_server import DkimKey, DnsServer   # fixtures dns_server, dkim_key: conftest.py

    def test_x(dns_server: DnsServer, dkim_key: DkimKey) -> None:
        dns_server.add_txt("_dmarc.example.com", "v=DMARC1; p=reject")
        dns_server.add_txt("example.com", "v=spf1 ip4:192.0.2.10 -all")
        dns_server.add_dkim_key("example.com", "sel", dkim_key)
        dns_server.time_out("slow.example")     # no answer for it and names below it
        dns_server.servfail("broken.example")  # SERVFAIL for it and names below it
        signed = dkim_key.sign(raw, domain="example.com", selector="sel")
        config = AuthConfig(verify="dns", resolver=dns_server.address)

Names are compared lower-case without the trailing dot. A name with no records answers
NXDOMAIN, a name with records of other types NOERROR without data. `queries` lists the
(name, type) pairs asked, in order.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSError, DNSRecord
from dnslib.server import DNSLogger, DNSServer


def _name(name: str) -> str:
    return name.lower().rstrip(".")


@dataclass
class _Zones:
    records: dict[str, list[tuple[str, object]]] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        qname = _name(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype))
            silent = _under(qname, self.silent)
            failing = _under(qname, self.failing)
            records = list(self.records.get(qname, ()))
            exists = bool(records) or any(n.endswith("." + qname) for n in self.records)
        if silent:
            raise DNSError(f"test server: {qname} times out")  # dnslib then sends nothing
        reply = request.reply()
        if failing:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if not exists:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rtype, rdata in records:
            if rtype == qtype:
                reply.add_answer(RR(request.q.qname, getattr(QTYPE, rtype), rdata=rdata, ttl=60))
        return reply


def _under(name: str, domains: set[str]) -> bool:
    return any(name == d or name.endswith("." + d) for d in domains)


class _QuietLogger(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)


class DnsServer:
    """The running server: add records while it runs; `address` is "127.0.0.1:port"."""

    def __init__(self) -> None:
        self._zones = _Zones()
        self._server = DNSServer(self._zones, address="127.0.0.1", port=0, logger=_QuietLogger())
        self.port: int = self._server.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        thread = threading.Thread(target=self._server.server.serve_forever,
                                  kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()

    @property
    def queries(self) -> list[tuple[str, str]]:
        with self._zones.lock:
            return list(self._zones.queries)

    def _add(self, name: str, rtype: str, rdata: object) -> None:
        with self._zones.lock:
            self._zones.records.setdefault(_name(name), []).append((rtype, rdata))

    def add_txt(self, name: str, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        self._add(name, "TXT", TXT(chunks))

    def add_a(self, name: str, address: str) -> None:
        self._add(name, "AAAA" if ":" in address else "A",
                  AAAA(address) if ":" in address else A(address))

    def add_mx(self, name: str, exchange: str, preference: int = 10) -> None:
        self._add(name, "MX", MX(exchange, preference))

    def add_ptr(self, name: str, target: str) -> None:
        self._add(name, "PTR", PTR(target))

    def add_dkim_key(self, domain: str, selector: str, key: DkimKey) -> None:
        self.add_txt(f"{selector}._domainkey.{domain}", key.dns_record)

    def time_out(self, domain: str) -> None:
        with self._zones.lock:
            self._zones.silent.add(_name(domain))

    def servfail(self, domain: str) -> None:
        with self._zones.lock:
            self._zones.failing.add(_name(domain))


@dataclass(frozen=True)
class DkimKey:
    """An RSA key pair: `sign` a message with it, publish `dns_record` for it."""

    private_pem: bytes
    dns_record: str

    @classmethod
    def generate(cls, bits: int = 2048) -> DkimKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())

    def sign(self, raw: bytes, *, domain: str, selector: str = "sel",
             length: bool = False) -> bytes:
        """`raw` with a DKIM-Signature on top (relaxed/relaxed; `length` adds l=)."""
        header = dkim.sign(raw, selector.encode(), domain.encode(), self.private_pem,
                           canonicalize=(b"relaxed", b"relaxed"), length=length,
                           include_headers=[b"from", b"to", b"subject", b"date",
                                            b"message-id"])
        return header + raw


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dkim_key() -> DkimKey:
    return DkimKey.generate()
