"""Listening sockets and uvicorn servers that live inside a worker's own event loop.

Every server made here is hardened the same way (`ServerLimits`): an idle keep-alive
connection is closed after `keep_alive_timeout_s`, requests beyond `max_connections` open
connections get uvicorn's 503, and a request's headers must arrive whole within
`header_timeout_s` and `max_header_bytes`. uvicorn has no header timeout of its own (its
keep-alive timer is cancelled by the first byte of the next request, and a fresh connection
has no timer at all), and its httptools parser has no header-size limit, so a client that
sends headers a byte at a time, or never sends anything, held a connection (and its memory)
for ever: `_HeaderGuard` is the missing timer, and the httptools protocol below counts header
bytes (h11 has its own limit, `h11_max_incomplete_event_size`), on uvicorn's own classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import uvicorn

SERVER_LIMITS_ATTR = "server_limits"  # an app may carry its own `ServerLimits` as this attribute


class PortInUseError(OSError):
    """The port an HTTP server was configured for is taken by another process."""


@dataclass(frozen=True)
class ServerLimits:
    """How long and how much one HTTP connection may take before it is closed.

    The defaults cost nothing for a well-behaved client: 10 s for headers that take
    microseconds, 64 KiB of headers where OpenAI clients send under 1 KiB (nginx allows
    32 KiB, Node 16 KiB), 5 s of keep-alive idleness (uvicorn's own default; raise it above
    a load balancer's idle timeout when there is one in front), 2048 connections per HTTP
    process (four times the 512 concurrent streams of the soak benchmark even if every one
    landed on the same process).
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    keep_alive_timeout_s: int = 5
    max_connections: int | None = 2048


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


class _Config(uvicorn.Config):
    """uvicorn's config plus the limits `_HeaderGuard` enforces (its protocols read them)."""

    def __init__(self, app: Any, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits


_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 30\r\nconnection: close\r\n\r\nrequest headers took too long\n"
)
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8"
    b"\r\ncontent-length: 26\r\nconnection: close\r\n\r\nrequest headers too large\n"
)


class _HeaderGuard(asyncio.Protocol):
    """A header timeout for one of uvicorn's HTTP/1.1 protocol classes.

    A connection is "waiting for headers" from when it opens, and from the first byte of
    each next request on a kept-alive connection, until uvicorn has parsed that request's
    headers (both of uvicorn's protocols then make a new `cycle`: that change is the signal,
    so nothing here depends on either parser's internals). While it waits one timer runs:
    past `header_timeout_s` the connection is closed, with a 408 if part of a request came (a
    connection that never sent a byte is closed silently, as uvicorn's keep-alive timeout
    does). A request whose headers come in one read, the usual case, costs two attribute
    checks: the timer is only armed for a fresh connection or for headers that span reads.
    """

    # set by uvicorn's protocol classes (the other base of each concrete class below)
    config: Any
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    _waiting = True
    _partial = False  # part of a request arrived while waiting
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._waiting = True
        self._partial = False
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if not self._waiting and (before is None or before.response_complete):
            self._waiting = True  # the first bytes of the next request on this connection
        super().data_received(data)
        if not self._waiting:
            return
        if self.cycle is not before:  # its headers are parsed: the app has the request now
            self._waiting = False
            self._partial = False
            self._disarm()
        elif not self.transport.is_closing():
            self._partial = True
            if self._header_timer is None:
                self._arm()

    def _arm(self) -> None:
        timeout = self.config.limits.header_timeout_s
        self._header_timer = self.loop.call_later(timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self._waiting or self.transport.is_closing():
            return
        responding = self.cycle is not None and not self.cycle.response_complete
        if self._partial and not responding:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


class _HeadersTooLarge(Exception):
    """Raised from a parser callback: llhttp stops at once, uvicorn answers (431, here)."""


@functools.cache
def _protocol_class() -> type[asyncio.Protocol]:
    """The guarded protocol over the parser uvicorn would pick itself ("auto": httptools
    where it is installed, else h11, whose own `h11_max_incomplete_event_size` bounds the
    headers)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class GuardedH11(_HeaderGuard, H11Protocol):
            pass

        return GuardedH11

    class GuardedHttpTools(_HeaderGuard, HttpToolsProtocol):
        """Also counts the request line's URL and the headers as llhttp parses them (it has
        no limit of its own) and stops a request past `max_header_bytes` with a 431."""

        _header_bytes = 0
        _too_large = False

        def on_message_begin(self) -> None:
            self._header_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > self.config.limits.max_header_bytes:
                self._too_large = True
                raise _HeadersTooLarge

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            self.transport.write(_HEADERS_TOO_LARGE)
            self.transport.close()

    return GuardedHttpTools


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the worker's own event loop: the worker, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(
    app: Any, host: str, port: int, limits: ServerLimits | None = None
) -> EmbeddedUvicorn:
    """An uvicorn server for ``app``; start it with ``serve(sockets=[listen_socket(...)])``.

    Its limits are ``limits``, else those the app carries as `SERVER_LIMITS_ATTR` (the
    OpenAI Frontend's app carries its config's, so every host of it, `dynamo serve` or
    `dynamo run`, applies them), else the defaults.
    """
    chosen = limits or getattr(app, SERVER_LIMITS_ATTR, None) or ServerLimits()
    config = _Config(
        app,
        chosen,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        http=_protocol_class(),
        timeout_keep_alive=chosen.keep_alive_timeout_s,
        limit_concurrency=chosen.max_connections,
        h11_max_incomplete_event_size=chosen.max_header_bytes,
    )
    return EmbeddedUvicorn(config)


def inherited_socket(fd: int) -> socket.socket:
    """A listening socket a parent process bound and passed down as file descriptor `fd`."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
