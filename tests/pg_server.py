"""A throwaway PostgreSQL cluster for the tests: Debian's initdb and pg_ctl, a data folder
under the system's temporary folder, a free loopback port, removed on stop.

As root (CI, this machine), initdb refuses to run: the cluster then belongs to the
unprivileged `postgres` user that Debian's package creates, and every server program
runs as that user. The folder is made under the system's temporary folder, not in
pytest's tmp_path, whose base is root-only and out of that user's reach.

The server listens on 127.0.0.1 only; its Unix socket lives in the folder (never in
/var/run/postgresql, where a system cluster may be). One superuser, `s4e`, signs in
without a password from the loopback address and the socket (trust); nobody else can.

Settings for tests, not for production: fsync off (a commit still takes its locks,
becomes visible and orders as always, only the flush to disk is skipped, so only an
operating-system crash could lose data, and this cluster is thrown away anyway;
synchronous_commit keeps its default, so a commit still waits for its WAL write),
max_connections 200 (several daemons with workers and their pools per test).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

USER = "s4e"

# The database of the test running on PostgreSQL now (tests/conftest.py's store_backend).
CURRENT: dict[str, str | None] = {"url": None}
RUN_AS = "postgres"  # the server user when we are root

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "'32MB'",
    # no background noise in the log, no stats files to write at shutdown
    "log_min_messages": "warning",
    "log_checkpoints": "off",
}


DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"


def find_bindir(path: str | None = None, pattern: str = DEBIAN_BINDIRS) -> Path | None:
    """The folder with initdb and pg_ctl: on PATH (or `path`), else the newest of
    Debian's /usr/lib/postgresql/*/bin (not on PATH on a fresh Debian box)."""
    initdb = shutil.which("initdb", path=path)
    if initdb and shutil.which("pg_ctl", path=path):
        return Path(os.path.realpath(initdb)).parent
    candidates = [Path(p) for p in glob.glob(pattern)
                  if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()]
    candidates.sort(key=lambda p: _version_key(p.parent.name))
    return candidates[-1] if candidates else None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def skip_reason(path: str | None = None, pattern: str = DEBIAN_BINDIRS) -> str | None:
    """Why a throwaway cluster cannot run here, or None."""
    if find_bindir(path, pattern) is None:
        return "PostgreSQL not installed (initdb/pg_ctl not found)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and the {RUN_AS} user does not exist (install postgresql)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PgServer:
    bindir: Path
    folder: Path  # data/, the socket and the log
    port: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        user = RUN_AS if os.geteuid() == 0 else None
        return subprocess.run([str(self.bindir / argv[0]), *argv[1:]], user=user,
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.folder, env=_server_env())

    def init(self) -> None:
        # Locale C with UTF-8: the most neutral choice, and the hardest for the search
        # (its character classes and case folding name an ICU collation themselves).
        done = self._run("initdb", "-D", str(self.data), "-U", USER, "--encoding=UTF8",
                         "--locale=C", "--auth=reject", "--no-sync", "--no-instructions")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        (self.data / "pg_hba.conf").write_text(
            f"local all {USER} trust\n"
            f"host  all {USER} 127.0.0.1/32 trust\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"unix_socket_directories = '{self.folder}'\n")
            for key, value in SETTINGS.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> None:
        """pg_ctl start on a free port; another port when a process took that one
        between our check and the server's bind."""
        for _attempt in range(3):
            self.port = free_port()
            done = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                             "-w", "-t", "60", "-o", f"-p {self.port}")
            if done.returncode == 0:
                return
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                break
        raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()}\n{log[-2000:]}")

    def start_again(self) -> None:
        """Start a stopped cluster on the port it had (clients reconnect to it)."""
        done = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                         "-w", "-t", "60", "-o", f"-p {self.port}")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()}")

    def stop(self) -> None:
        """Fast shutdown (disconnects clients, no checkpoint wait worth the name with
        fsync off); if pg_ctl cannot, the postmaster gets SIGQUIT. Returns when no server
        process of this cluster is left."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        done = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30")
        if done.returncode != 0 and _alive(pid):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.strip().isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _server_env() -> dict[str, str]:
    # Nothing from the caller's PG* variables may point the programs elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8" if Path("/usr/lib/locale/C.utf8").exists() else "C"
    return env


@contextmanager
def running_server() -> Iterator[PgServer]:
    """A started cluster, stopped and removed afterwards, even when the block fails."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL not installed (initdb/pg_ctl not found)")
    folder = Path(tempfile.mkdtemp(prefix="s4e-pg-"))
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        server = PgServer(bindir, folder)
        server.init()
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)



def pg_migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of migrations/postgresql/, in order."""
    from gateway.store import load_migrations

    return [(m.version, m.name, m.sql) for m in load_migrations("postgresql")]


def migrate(url: str) -> list[str]:
    """`store.migrate` on the database at `url` (as the daemon and `migrate` do):
    the files applied."""
    import asyncio

    from gateway import store

    async def run() -> list[str]:
        conn = await store.connect(url)
        try:
            return await store.migrate(conn)
        finally:
            await conn.close()
    return asyncio.run(run())
