"""`s4e-gateway web`: uvicorn serving the desk on `[web] listen` until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from pathlib import Path

from gateway import store
from gateway.config import Config, parse_hostport
from gateway.errors import ConfigError, StoreError
from gateway.web.app import create_app

log = logging.getLogger(__name__)


async def check_database(config: Config) -> None:
    """The desk never migrates: the daemon (or `migrate`) owns the schema."""
    path = config.storage.database
    if isinstance(path, Path) and not path.exists():
        raise StoreError(f"{path}: no database yet: run `s4e-gateway migrate` or start the gateway")
    conn = await store.connect(path)
    try:
        await store.check_schema(conn)
    finally:
        await conn.close()


def bind(config: Config) -> socket.socket:
    host, port = parse_hostport(config.web.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"web.listen: cannot listen on {config.web.listen}: "
                          f"{err.strerror or err}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (it re-raises SIGTERM after shutting
    down, so the process would die by the signal): serve_web stops it instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(config: Config, app: ASGIApp | None = None) -> uvicorn.Server:
    # proxy_headers off: the peer address decides whether the SSO header counts.
    settings = uvicorn.Config(app or create_app(config), log_config=None, access_log=False,
                              proxy_headers=False, server_header=False, lifespan="off",
                              timeout_graceful_shutdown=5)
    return _Server(settings)


async def serve_web(config: Config) -> None:
    await check_database(config)
    sock = bind(config)
    server = make_server(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, setattr, server, "should_exit", True)
    log.info("web desk listening on http://%s/", config.web.listen)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
    log.info("web desk stopped")
