"""TOML -> frozen `Config`. A wrong key, type or value fails in one line naming it.

Every field here is documented, with its default, in config.example.toml (a test
checks that they agree).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

ENV_VAR = "S4E_GATEWAY_CONFIG"

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ADDRESS = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


def parse_duration(text: str) -> int:
    """"30s" / "15m" / "2h" / "5d" -> seconds; "0" -> 0."""
    if text.strip() == "0":
        return 0
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f'expected a duration like "30s", "15m", "2h" or "5d", got {text!r}')
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'expected "host:port", got {text!r}')
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: str = "127.0.0.1:2525"
    hostname: str = "localhost"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    timeout: str = "5m"
    data_timeout: str = "10m"  # the whole DATA phase, however slowly it trickles
    max_connections: int = 200
    max_connections_per_ip: int = 20
    spool_threshold: int = 1024 * 1024  # larger messages go to a spool file as they arrive
    tls_cert: Path | None = None
    tls_key: Path | None = None
    lmtp_socket: Path | None = None

    @property
    def host(self) -> str:
        return parse_hostport(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.listen)[1]

    @property
    def timeout_seconds(self) -> int:
        return parse_duration(self.timeout)

    @property
    def data_timeout_seconds(self) -> int:
        return parse_duration(self.data_timeout)


@dataclass(frozen=True, slots=True)
class AddressesConfig:
    intake: str = "serwis@s4e.pl"
    crm: str = "crm@s4e.pl"
    staff_domains: tuple[str, ...] = ("s4e.pl",)
    notify: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StorageConfig:
    # A path: the embedded SQLite database. A "postgresql://..." URL: PostgreSQL,
    # which several gateways (each an MX host) may share (README "PostgreSQL").
    database: Path | str = Path("var/gateway.db")
    attachments: Path = Path("var/attachments")
    keep_raw: str = ""  # "" = keep the raw mail for ever; else a duration (closed tickets)

    @property
    def keep_raw_seconds(self) -> int | None:
        return parse_duration(self.keep_raw) if self.keep_raw else None

    @property
    def postgres(self) -> str | None:
        """The PostgreSQL URL, or None for SQLite."""
        return self.database if isinstance(self.database, str) else None

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file; with PostgreSQL, where this node keeps its local files
        (the lock files, named as for a database file in the attachments' folder)."""
        if isinstance(self.database, Path):
            return self.database
        return self.attachments.parent / "gateway.pg"


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    transport: str = ""  # "" = "smtp" when a relay is set, else "maildir"
    relay: str = ""
    starttls: bool = False
    username: str = ""
    password_file: Path | None = None
    maildir: Path = Path("var/outbox")
    retry_first: str = "1m"
    retry_max: str = "1h"
    give_up_after: str = "5d"
    ca_file: Path | None = None  # PEM CA(s) to verify the relay's STARTTLS certificate
    connections: int = 4  # relay sessions in parallel
    keep_alive: str = "30s"  # an idle relay session is kept this long; "0": one per mail

    @property
    def effective_transport(self) -> str:
        return self.transport or ("smtp" if self.relay else "maildir")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Several gateways on one PostgreSQL database (README "PostgreSQL")."""

    # This gateway's name among those sharing the database: its claims carry it. ""
    # = the host name. Two running gateways with the same name are refused.
    node: str = ""
    # A message or a mail claimed by a node that stopped answering goes to another
    # node after this long (a live node renews its claims long before).
    lease: str = "60s"

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()

    @property
    def lease_seconds(self) -> int:
        return parse_duration(self.lease)


@dataclass(frozen=True, slots=True)
class ProcessingConfig:
    """Where stored mail is parsed and routed (SPEC §7 [processing])."""

    # Worker processes beside the SMTP process; "auto": one per core beyond the first.
    # 0: processing runs inside the SMTP process (one-core machines, embedded tests).
    workers: int | str = "auto"

    @property
    def worker_count(self) -> int:
        if isinstance(self.workers, int):
            return self.workers
        return max(len(os.sched_getaffinity(0)) - 1, 0)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = ""  # off when empty


@dataclass(frozen=True, slots=True)
class TicketsConfig:
    language: str = "pl"
    reply_policy: str = "reporter"
    closed_action: str = "reply"
    rating_window: str = "14d"
    max_auto_replies_per_hour: int = 20
    phone_numbers: tuple[str, ...] = ("(0-12) 444-65-00", "801 090 101")
    contracts: Path | None = None
    timezone: str = "Europe/Warsaw"  # times shown to people
    templates: Path | None = None  # a folder overriding packaged templates by file name


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who really sent a message (SPEC §10)."""

    trusted_authserv_ids: tuple[str, ...] = ()
    verify: str = "off"  # "off" | "dns"
    resolver: str = ""  # "host:port" of the DNS resolver; "" = the system's
    trusted_relays: tuple[str, ...] = ()  # IPs/CIDRs whose mail counts as verified
    timeout: str = "3s"  # the whole time the DNS checks of one message may take

    @property
    def timeout_seconds(self) -> int:
        return parse_duration(self.timeout)


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The engineers' web desk (SPEC §11), its own process: `s4e-gateway web`."""

    listen: str = "127.0.0.1:8080"
    trusted_proxies: tuple[str, ...] = ()  # IPs/CIDRs whose remote_user_header counts
    remote_user_header: str = ""  # e.g. "X-Remote-User"; off when empty
    session_lifetime: str = "12h"  # a sign-in lasts this long
    secure_cookies: bool = False  # set when the desk is reached over HTTPS only
    login_attempts: int = 5  # failed sign-ins per user name (and 4x per client) ...
    login_window: str = "15m"  # ... within this long, then refused until they age out


@dataclass(frozen=True, slots=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    addresses: AddressesConfig = field(default_factory=AddressesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    web: WebConfig = field(default_factory=WebConfig)
    source: Path | None = None  # the file it was read from; None = built-in defaults


_SECTIONS: dict[str, type] = {
    "smtp": SmtpConfig,
    "addresses": AddressesConfig,
    "storage": StorageConfig,
    "outbound": OutboundConfig,
    "metrics": MetricsConfig,
    "processing": ProcessingConfig,
    "cluster": ClusterConfig,
    "tickets": TicketsConfig,
    "auth": AuthConfig,
    "web": WebConfig,
}

# Which keys hold what kind of value; everything else is a plain str.
_INTS = {"max_message_size", "max_recipients", "max_auto_replies_per_hour", "login_attempts",
         "max_connections", "max_connections_per_ip", "spool_threshold", "connections"}
_BOOLS = {"starttls", "secure_cookies"}
_PATHS = {"tls_cert", "tls_key", "lmtp_socket", "database", "attachments",
          "password_file", "maildir", "contracts", "templates", "ca_file"}
_LISTS = {"staff_domains", "notify", "phone_numbers", "trusted_authserv_ids", "trusted_relays",
          "trusted_proxies"}
_CHOICES = {
    ("outbound", "transport"): ("smtp", "maildir"),
    ("tickets", "language"): ("pl", "en"),
    ("tickets", "reply_policy"): ("reporter", "domain", "any"),
    ("tickets", "closed_action"): ("reply", "reject"),
    ("auth", "verify"): ("off", "dns"),
}
_DURATIONS = {"timeout", "data_timeout", "retry_first", "retry_max", "give_up_after",
              "rating_window", "session_lifetime", "login_window", "keep_raw", "keep_alive",
              "lease"}
_HOSTPORTS = {("smtp", "listen"), ("outbound", "relay"), ("metrics", "listen"),
              ("auth", "resolver"), ("web", "listen")}
_EMAILS = {("addresses", "intake"), ("addresses", "crm")}


def _convert(section: str, key: str, value: Any, base: Path) -> Any:
    """Check one value's type and content; raise ValueError with the reason."""
    if (section, key) == ("processing", "workers"):
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
            raise ValueError(f'expected "auto" or a number of processes 0-64, got {value!r}')
        return value
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {type(value).__name__}")
        if value < 0 or (key != "max_auto_replies_per_hour" and value == 0):
            raise ValueError(f"must be positive, got {value}")
        return value
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {type(value).__name__}")
        return value
    if key in _LISTS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        items = tuple(v.strip() for v in value)
        if key == "notify":
            for item in items:
                if not _ADDRESS.match(item):
                    raise ValueError(f"not an e-mail address: {item!r}")
        if key == "staff_domains":
            items = tuple(v.lower().lstrip("@") for v in items)
        if key in ("trusted_relays", "trusted_proxies"):
            for item in items:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"not an IP address or CIDR network: {item!r}") from None
        if key == "trusted_authserv_ids":
            items = tuple(v.lower() for v in items if v)
        return items
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if (section, key) == ("storage", "database") and value.startswith(
            ("postgresql://", "postgres://")):
        return value  # PostgreSQL; checked when connecting
    if key in _PATHS:
        if not value:
            return None if key not in ("database", "attachments", "maildir") else _fail("must not be empty")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if (section, key) in _CHOICES:
        choices = _CHOICES[(section, key)]
        if value not in choices and not (key == "transport" and value == ""):
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if key == "keep_raw" and value == "":
        return value  # keep for ever
    if key in _DURATIONS:
        seconds = parse_duration(value)
        if seconds == 0 and key not in ("rating_window", "keep_alive"):
            raise ValueError("must be longer than 0")
    if (section, key) in _HOSTPORTS and value:
        parse_hostport(value)
    if (section, key) == ("tickets", "timezone"):
        _check_timezone(value)
    if (section, key) in _EMAILS:
        if not _ADDRESS.match(value):
            raise ValueError(f"not an e-mail address: {value!r}")
        value = value.lower()
    return value


def _check_timezone(name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (e.g. \"Europe/Warsaw\", \"UTC\")") from None


def _fail(reason: str) -> Any:
    raise ValueError(reason)


def _build_section(name: str, table: Any, base: Path) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table [{name}]")
    known = {f.name for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key")
        try:
            values[key] = _convert(name, key, value, base)
        except ValueError as err:
            raise ConfigError(f"{name}.{key}: {err}") from None
    return cls(**values)


def _resolve_defaults(config: Config, base: Path) -> Config:
    """Make the default relative paths relative to `base` too."""
    storage = config.storage
    outbound = config.outbound
    if isinstance(storage.database, Path) and not storage.database.is_absolute():
        storage = replace(storage, database=base / storage.database)
    if not storage.attachments.is_absolute():
        storage = replace(storage, attachments=base / storage.attachments)
    if not outbound.maildir.is_absolute():
        outbound = replace(outbound, maildir=base / outbound.maildir)
    return replace(config, storage=storage, outbound=outbound)


def _check_consistency(config: Config) -> None:
    smtp, outbound = config.smtp, config.outbound
    if (smtp.tls_cert is None) != (smtp.tls_key is None):
        raise ConfigError("smtp.tls_key: tls_cert and tls_key must be set together")
    if outbound.effective_transport == "smtp" and not outbound.relay:
        raise ConfigError('outbound.relay: required when transport = "smtp"')
    if outbound.username and outbound.password_file is None:
        raise ConfigError("outbound.password_file: required when username is set")
    if parse_duration(outbound.retry_max) < parse_duration(outbound.retry_first):
        raise ConfigError("outbound.retry_max: must not be shorter than retry_first")
    if config.addresses.intake == config.addresses.crm:
        raise ConfigError("addresses.crm: must differ from addresses.intake")
    _check_web(config.web)


def _check_web(web: WebConfig) -> None:
    if web.remote_user_header and not re.fullmatch(r"[A-Za-z0-9-]+", web.remote_user_header):
        raise ConfigError(f"web.remote_user_header: not a header name: {web.remote_user_header!r}")
    if web.remote_user_header and not web.trusted_proxies:
        raise ConfigError("web.trusted_proxies: required when remote_user_header is set "
                          "(otherwise anyone could send the header)")


def load_config(path: Path | None) -> Config:
    """Read `path`, or return the built-in defaults (paths under ./var/) when None."""
    if path is None:
        return _resolve_defaults(Config(), Path.cwd())
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    base = path.resolve().parent
    sections = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
        sections[name] = _build_section(name, table, base)
    config = _resolve_defaults(Config(**sections, source=path.resolve()), base)
    _check_consistency(config)
    return config


def config_path_from(arg: str | None) -> Path | None:
    """--config wins, then $S4E_GATEWAY_CONFIG, then the built-in defaults."""
    if arg:
        return Path(arg)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


def check_files(config: Config) -> None:
    """What a start would trip over, named by its key: files that are missing or
    unreadable, folders that do not exist. Raises ConfigError."""
    smtp, outbound, tickets = config.smtp, config.outbound, config.tickets
    readable = [("smtp.tls_cert", smtp.tls_cert), ("smtp.tls_key", smtp.tls_key),
                ("outbound.password_file", outbound.password_file),
                ("outbound.ca_file", outbound.ca_file),
                ("tickets.contracts", tickets.contracts)]
    for key, path in readable:
        if path is None:
            continue
        if not path.is_file():
            raise ConfigError(f"{key}: {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: {path}: not readable (permission denied)")
    if tickets.templates is not None and not tickets.templates.is_dir():
        raise ConfigError(f"tickets.templates: {tickets.templates}: no such folder")
    if smtp.tls_cert and smtp.tls_key:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                smtp.tls_cert, smtp.tls_key)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"smtp.tls_cert: cannot load the certificate and key: {err}") from None
    if (smtp.lmtp_socket and not smtp.lmtp_socket.parent.is_dir()
            and not systemd_creates(smtp.lmtp_socket.parent)):
        raise ConfigError(f"smtp.lmtp_socket: folder {smtp.lmtp_socket.parent} does not exist")
    for key, path in (("storage.database", config.storage.sqlite_path.parent),
                      ("storage.attachments", config.storage.attachments),
                      ("outbound.maildir", outbound.maildir)):
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
            raise ConfigError(f"{key}: cannot create or write {path} ({existing} is not a "
                              "writable folder)")


RUNTIME_ROOT = Path("/run")


def systemd_creates(folder: Path, runtime_root: Path = RUNTIME_ROOT) -> bool:
    """A folder under /run that does not exist yet: systemd's RuntimeDirectory= makes
    it when the service starts (and removes it when it stops), so its absence while
    the service is stopped is no mistake."""
    return not folder.exists() and runtime_root in folder.parents


def risky_settings(config: Config) -> list[str]:
    """Warnings for settings that work but are probably a mistake."""
    warnings = []
    socket = config.smtp.lmtp_socket
    if socket and systemd_creates(socket.parent):
        warnings.append(
            f"smtp.lmtp_socket: folder {socket.parent} does not exist yet; fine under "
            f"systemd when the unit has RuntimeDirectory={socket.parent.relative_to(RUNTIME_ROOT)}"
            " (it is made at start), otherwise create it")
    if not is_loopback(config.smtp.host):
        warnings.append(
            f"smtp.listen: {config.smtp.listen} is not a loopback address; "
            "make sure only your MTA (or the world, if this is the MX) can reach it")
    outbound = config.outbound
    if outbound.effective_transport == "smtp" and outbound.relay:
        host = parse_hostport(outbound.relay)[0]
        if not outbound.starttls and not is_loopback(host):
            warnings.append(
                f"outbound.starttls: relay {outbound.relay} is not on loopback and "
                "STARTTLS is off: customer mail would cross the network in clear text")
    if (config.outbound.effective_transport == "smtp"
            and config.smtp.hostname in ("localhost", "localhost.localdomain")):
        warnings.append(
            'smtp.hostname: "localhost" is also the EHLO name sent to the relay; '
            "set the host's real name (some relays refuse EHLO localhost)")
    if config.smtp.max_message_size > 50 * 1024 * 1024:
        warnings.append(
            "smtp.max_message_size: larger than 50 MiB, more than most relays accept "
            "(Postfix message_size_limit defaults to 10 MiB)")
    if config.metrics.listen and not is_loopback(parse_hostport(config.metrics.listen)[0]):
        warnings.append(f"metrics.listen: {config.metrics.listen} is not a loopback address")
    if not is_loopback(parse_hostport(config.web.listen)[0]) and not config.web.secure_cookies:
        warnings.append(f"web.listen: {config.web.listen} is not a loopback address and "
                        "secure_cookies is off: put the desk behind HTTPS and set it")
    return warnings
