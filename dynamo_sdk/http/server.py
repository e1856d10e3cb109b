"""Listening sockets and uvicorn servers that live inside a worker's own event loop."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Generator
from typing import Any

import uvicorn


class PortInUseError(OSError):
    """The port an HTTP server was configured for is taken by another process."""


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket; with ``reuse_port`` (SO_REUSEPORT) several worker processes of one
    service share the port and the kernel spreads connections over them.

    A port some other process holds is a `PortInUseError` naming the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"port {port} is already in use") from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the worker's own event loop: the worker, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(app: Any, host: str, port: int) -> EmbeddedUvicorn:
    """An uvicorn server for ``app``; start it with ``serve(sockets=[listen_socket(...)])``."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    return EmbeddedUvicorn(config)


def check_port_free(host: str, port: int) -> None:
    """Fail with `PortInUseError` if anything listens on (host, port) now.

    Binds without SO_REUSEPORT: a process holding the port with SO_REUSEPORT (another
    Frontend) would otherwise be joined silently and take half the traffic.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(exc.errno, f"port {port} is already in use") from None
            raise
