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


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket (no SO_REUSEPORT: a port another process holds is refused, as a
    `PortInUseError` naming the port, instead of silently shared with it).

    Several workers of one service share one such socket, bound once by the supervisor and
    inherited by each (`inherited_socket`): whichever worker is free accepts the next
    connection, where SO_REUSEPORT would hash connections to workers however busy they are.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def inherited_socket(fd: int) -> socket.socket:
    """A listening socket a parent process bound and passed down as file descriptor `fd`."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
