"""A private Postfix instance for the integration tests, built from deploy/postfix/.

Everything lives in one folder of its own: config_directory, queue_directory,
data_directory and the log file. That folder is made under the system's temporary
folder, mode 0755, not in pytest's tmp_path: Postfix's daemons drop to the postfix
user and must reach it (pytest's base folder is root-only). It is removed on stop;
the log is first copied to `keep_log` (the test's tmp_path). The SMTP server listens on a free loopback port, no
DNS is asked, local delivery and the default transport are switched off, so no system
mail is touched. The recipe's own files are used as written; only paths, ports and the
site-specific mailbox server are substituted, and a few timers are shortened so retries
happen within seconds.

`master` runs in the foreground as our child process (`master -d`): we know its pid,
stop it with SIGTERM and reap it, even when a test fails.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "postfix"
POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None)
MX_HOSTNAME = "mx.s4e.pl"

# Postfix's own services, as in Debian's master.cf, chroot off (the instance's queue
# is not set up as a chroot jail). The recipe's master.cf lines replace same-named ones.
BASE_MASTER = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def skip_reason() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if POSTFIX is None:
        return "postfix is not installed (.ci/run installs Debian's postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its daemons drop to the postfix user)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the postfix user does not exist (install Debian's postfix package)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_main_cf(text: str) -> dict[str, str]:
    """main.cf syntax: `name = value`, continuation lines start with whitespace,
    comments and blank lines ignored. Later definitions win, as in Postfix."""
    params: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name is not None:
            params[name] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        params[name] = value.strip()
    return params


def read_master_cf(text: str) -> list[list[str]]:
    """master.cf entries as lists of fields (continuation lines joined)."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and entries:
            entries[-1].extend(line.split())
        else:
            entries.append(line.split())
    return entries


@dataclass
class Postfix:
    """One private Postfix instance under `root`."""

    keep_log: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="s4e-postfix-")))
    port: int = field(default_factory=free_port)
    master: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.chmod(0o755)

    @property
    def confdir(self) -> Path:
        return self.root / "etc"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def log_file(self) -> Path:
        return self.root / "postfix.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # --- building the configuration from the recipe ----------------------------------

    def configure(self, case: str, *, tables: dict[str, str], substitutions: dict[str, str],
                  extra_tables: dict[str, list[str]] | None = None,
                  overrides: dict[str, str] | None = None) -> None:
        """Install deploy/postfix/<case>/ into this instance.

        tables: the recipe's table files to install, {source name: name in /etc/postfix}
        (e.g. {"transport.lmtp": "transport"}); substitutions: text replaced in every
        recipe file; extra_tables: test-only lines appended to a table (routes to the
        sinks); overrides: main.cf settings of the test environment.
        """
        try:
            self._configure(RECIPE / case, tables, substitutions, extra_tables or {},
                            overrides or {})
        except BaseException:
            self.stop()  # removes the instance's folder
            raise

    def _configure(self, recipe: Path, tables: dict[str, str], substitutions: dict[str, str],
                   extra_tables: dict[str, list[str]], overrides: dict[str, str]) -> None:
        self.confdir.mkdir(parents=True)
        (self.root / "data").mkdir()
        self.queue.mkdir()
        os.chown(self.root / "data", pwd.getpwnam("postfix").pw_uid, -1)
        subs = {"/etc/postfix/": f"{self.confdir}/", **substitutions}

        def subst(text: str) -> str:
            for old, new in subs.items():
                text = text.replace(old, new)
            return text

        for source, target in tables.items():
            text = subst((recipe / source).read_text())
            for line in extra_tables.get(target, []):
                text += line + "\n"
            (self.confdir / target).write_text(text)
        shutil.copy(RECIPE / "s4e-bounce.cf", self.confdir / "s4e-bounce.cf")

        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": MX_HOSTNAME,
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.root),
            "alias_maps": "",
            "alias_database": "",
        }
        params.update(read_main_cf(subst((recipe / "main.cf").read_text())))
        params.update({
            # The test environment: no DNS, nothing delivered locally or to the world,
            # no copies to a postmaster, and retries within seconds.
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "local_transport": "error:local delivery is off in this test",
            "default_transport": "error:no mail to the world from this test",
            "notify_classes": "",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "lmtp_connect_timeout": "5s",
            **overrides,
        })
        (self.confdir / "main.cf").write_text(
            "".join(f"{name} = {value}\n" for name, value in params.items()))

        entries = {(e[0], e[1]): e for e in read_master_cf(BASE_MASTER)}
        for entry in read_master_cf(subst((recipe / "master.cf").read_text())):
            entry = list(entry)
            entry[4] = "n"  # chroot: see BASE_MASTER
            if entry[:2] == ["smtp", "inet"]:
                entry[0] = f"127.0.0.1:{self.port}"
            entries[(entry[0], entry[1])] = entry
        (self.confdir / "master.cf").write_text(
            "".join("  ".join(e) + "\n" for e in entries.values()))

        for name in tables.values():
            if f"hash:{self.confdir}/{name}" in (self.confdir / "main.cf").read_text():
                self._run("postmap", "-c", str(self.confdir), f"hash:{self.confdir / name}")

    # --- running ----------------------------------------------------------------------

    def _run(self, program: str, *args: str) -> str:
        path = program if "/" in program else shutil.which(program) or f"/usr/sbin/{program}"
        result = subprocess.run([path, *args], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "MAIL_CONFIG": str(self.confdir)})
        if result.returncode != 0:
            raise PostfixError(f"{program} {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}\n{self.log()[-3000:]}")
        return result.stdout

    def postconf(self, *args: str) -> str:
        return self._run("postconf", "-c", str(self.confdir), *args)

    def start(self, timeout: float = 60.0) -> None:  # a loaded CI machine
        """`postfix check` (creates the queue's folders, checks permissions), then
        master in the foreground; returns once its SMTP port answers."""
        self._run("postfix", "-c", str(self.confdir), "check")
        daemons = self.postconf("-h", "daemon_directory").strip()
        self.master = subprocess.Popen(
            [f"{daemons}/master", "-c", str(self.confdir), "-d"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # Its own process group: on SIGTERM master signals the group it leads.
            start_new_session=True,
            env={**os.environ, "MAIL_CONFIG": str(self.confdir)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                err = self.master.stderr.read().decode(errors="replace") if self.master.stderr else ""
                raise PostfixError(f"postfix master exited: {err.strip()}\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.settimeout(5)
                    if sock.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise PostfixError(f"postfix did not answer on port {self.port}\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Stop master (if running), keep the log, remove the instance's folder."""
        try:
            self._stop_master()
        finally:
            if self.log_file.exists():
                shutil.copy(self.log_file, self.keep_log)
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_master(self) -> None:
        if self.master is None or self.master.poll() is not None:
            return
        self.master.send_signal(signal.SIGTERM)  # master stops its children, then exits
        try:
            self.master.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.master.kill()
            self.master.wait(timeout=5)
        if self.master.stderr:
            self.master.stderr.close()

    def flush(self) -> None:
        """`postqueue -f`: attempt delivery of everything queued, now."""
        self._run("postqueue", "-c", str(self.confdir), "-f")

    def queued(self) -> list[dict]:
        """`postqueue -j`: one dict per queued message (queue_name, recipients with
        their delay_reason, ...)."""
        out = self._run("postqueue", "-c", str(self.confdir), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]


class PostfixError(RuntimeError):
    pass
