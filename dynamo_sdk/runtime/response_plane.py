"""Response frames straight from callee to caller over TCP, past the NATS server.

Requests keep travelling over NATS: queue groups spread them over a component's instances,
instance subjects route them, and NATS is how every process reaches every other without
knowing addresses. Responses are different: a stream of many small frames to one process that
the request already named. Through NATS each frame goes callee -> server -> caller, and
nats-py hands it through a flusher task on one side and a read loop, a subscription queue and
a callback task on the other: four task wake-ups and two extra socket hops per token. So, as
in NVIDIA Dynamo's runtime, a caller listens on one TCP port (`ResponseListener`) and names it
in every request (`RequestFrame.reply_addr`); the callee keeps one connection per caller
process (`ReplyConnections`) and writes each frame to it the moment it is produced. The caller
parses frames in the connection's `data_received` and hands them straight to their stream.

On the wire, every message is ``u32 length | u16 reply length | reply subject | frame``, where
the reply subject is the call's unique id (the same string the NATS path would reply to) and
the frame is the msgpack `ResponseFrame` that NATS would have carried.

A callee that cannot connect to the named address (a firewall, a caller behind NAT), or one
that is not a registered caller's listener (every process registers its own under
``responders/`` in etcd, with its lease), answers on the NATS reply subject instead; the
caller listens on both. A callee whose connection to a
caller drops takes the caller for gone and cancels that caller's streams, which is how a
SIGKILLed caller stops engines from generating for nobody.

Both ends prove they hold the graph's secret (``DYN_GRAPH_SECRET``, which `dynamo serve`
generates for the processes it starts) before a frame moves: the listener opens with a hello
naming a fresh nonce, the callee answers with its own nonce and an HMAC-SHA256 over both, and
the listener answers with its HMAC over both the other way round. A process that cannot prove
it (no secret, another graph's, a port scanner writing forged frames) is cut off before any of
its bytes are read as frames, and a callee never sends a stream to a listener that did not
prove it either: the callee then answers that caller over NATS. Without a secret on either
side the hello says so and nothing is authenticated (processes started by hand, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IH")  # bytes after the u32, reply subject length
# The largest message a caller accepts; bigger means a corrupt stream. Callees check their
# frames against it first and send an error in place of an oversized one.
MAX_MESSAGE = 64 * 1024 * 1024
_RETRY_AFTER = 30.0  # seconds before trying TCP again to an address that refused us
# Well below the callers' stream timeout (DYN_STREAM_TIMEOUT, 5 s): a caller whose address
# cannot be reached still gets its first frame, over NATS, before it gives up on the stream.
CONNECT_TIMEOUT = 1.5
# A caller that has not read for this long (its socket buffers full) is taken for dead: its
# connection is aborted and its streams cancelled, rather than holding producers forever.
STALL_TIMEOUT = 30.0


# The handshake (see the module docstring): the listener's hello, the callee's proof (its
# nonce, then its MAC), the listener's proof (its MAC). Fixed sizes: nothing to parse wrong.
_HELLO = struct.Struct("<4sBB16s")  # magic, version, 1 if the listener authenticates, nonce
_MAGIC, _VERSION = b"DYRP", 1
_NONCE, _MAC = 16, 32
# A peer that has not finished the handshake by then is cut off (it holds a socket for nothing).
HANDSHAKE_TIMEOUT = 5.0


class HandshakeError(ConnectionError):
    """The other end of a response connection did not prove the graph's secret."""


def _mac(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def _tune(sock: socket.socket | None, keepalive: bool = False) -> None:
    """No Nagle delay; on the callee's side, keepalives that notice a vanished caller host."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def encode_message(reply: str, frame: bytes) -> bytes:
    token = reply.encode()
    return _HEADER.pack(len(frame) + len(token) + 2, len(token)) + token + frame


Deliver = Callable[[str, bytes, object], None]  # (reply subject, frame, the connection)


class _FrameReader(asyncio.Protocol):
    """The caller's end of one callee's connection: split the byte stream into frames."""

    def __init__(
        self,
        deliver: Deliver,
        live: set[_FrameReader] | None = None,
        on_lost: Callable[[object], None] | None = None,
        secret: bytes | None = None,
    ) -> None:
        self._deliver = deliver
        self._on_lost = on_lost
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._live = live if live is not None else set()
        self._secret = secret
        self._nonce = os.urandom(_NONCE)
        self._proven = secret is None  # no secret: frames follow the hello at once
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._live.add(self)
        _tune(transport.get_extra_info("socket"))
        auth = self._secret is not None
        self._transport.write(_HELLO.pack(_MAGIC, _VERSION, int(auth), self._nonce))
        if not self._proven:
            with contextlib.suppress(RuntimeError):  # no running loop: unit tests drive it
                loop = asyncio.get_running_loop()
                self._deadline = loop.call_later(HANDSHAKE_TIMEOUT, self._refuse, "timed out")

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
        if self._on_lost is not None and self._proven:
            self._on_lost(self)

    def _refuse(self, why: str) -> None:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        log.warning("refused a response connection from %s: %s (is DYN_GRAPH_SECRET the "
                    "same on every process of the graph?)", peer, why)  # fmt: skip
        self._buf.clear()
        if self._transport is not None:
            self._transport.abort()

    def _check_proof(self) -> bool:
        """The callee's nonce and MAC, once they are all here; False while waiting (or cut)."""
        if len(self._buf) < _NONCE + _MAC:
            return False
        assert self._secret is not None and self._transport is not None
        theirs, mac = bytes(self._buf[:_NONCE]), bytes(self._buf[_NONCE : _NONCE + _MAC])
        del self._buf[: _NONCE + _MAC]
        if not hmac.compare_digest(mac, _mac(self._secret, b"callee", self._nonce, theirs)):
            self._refuse("its proof of the graph's secret is wrong")
            return False
        self._transport.write(_mac(self._secret, b"caller", theirs, self._nonce))
        self._proven = True
        if self._deadline is not None:
            self._deadline.cancel()
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._proven and not self._check_proof():
            return
        offset, end = 0, len(buf)
        while end - offset >= 6:
            size, token_len = _HEADER.unpack_from(buf, offset)
            if size > MAX_MESSAGE or token_len + 2 > size:
                log.warning("response connection sent a corrupt frame header; closing it")
                assert self._transport is not None
                self._transport.close()
                buf.clear()
                return
            if end - offset - 4 < size:
                break
            start = offset + 6
            reply = bytes(buf[start : start + token_len]).decode()
            frame = bytes(buf[start + token_len : offset + 4 + size])
            offset += 4 + size
            self._deliver(reply, frame, self)
        if offset:
            del buf[:offset]


class ResponseListener:
    """The caller's TCP port: frames arriving on it go to `deliver(reply, frame, connection)`;
    `on_lost(connection)` runs when a callee's connection drops (its process died)."""

    def __init__(
        self,
        host: str,
        deliver: Deliver,
        on_lost: Callable[[object], None] | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.host = host
        self._deliver = deliver
        self._on_lost = on_lost
        self._secret = secret
        self._server: asyncio.AbstractServer | None = None
        self._readers: set[_FrameReader] = set()
        self.address = ""  # "host:port" once started: what requests name as reply_addr

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _FrameReader(self._deliver, self._readers, self._on_lost, self._secret),
            self.host,
            0,
            backlog=1024,
        )
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{port}"

    async def close(self) -> None:
        """Stop listening and drop every callee's connection: they cancel this caller's streams."""
        if self._server is not None:
            self._server.close()
            self._on_lost = None  # our own shutdown: the dispatcher fails its streams itself
            for reader in list(self._readers):
                reader._on_lost = None
                reader.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class _ReplyConnection(asyncio.Protocol):
    """The callee's end of the connection to one caller process.

    Messages written in one turn of the event loop leave in one `writelines` at the end of
    it: a frame is never held back behind an await, and many streams' frames share a syscall.
    """

    def __init__(
        self, on_lost: Callable[[_ReplyConnection], None], secret: bytes | None = None
    ) -> None:
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._out: list[bytes] = []
        self._writable = asyncio.Event()
        self._writable.set()
        self._secret = secret
        self._nonce = os.urandom(_NONCE)
        self._theirs = b""  # the listener's nonce, once its hello is in
        self._inbox = bytearray()
        # done when the listener has proved the graph's secret (or neither side has one)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # a failure nobody awaits any more (its opening timed out) is not an unhandled error
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _tune(transport.get_extra_info("socket"), keepalive=True)

    def data_received(self, data: bytes) -> None:
        """The listener's hello and proof; after them callers never write."""
        if self.handshake.done():
            return
        self._inbox += data
        if not self._theirs:
            if len(self._inbox) < _HELLO.size:
                return
            magic, version, auth, nonce = _HELLO.unpack_from(self._inbox)
            del self._inbox[: _HELLO.size]
            if magic != _MAGIC or version != _VERSION:
                return self._fail("it is not a response listener of this version")
            if bool(auth) != (self._secret is not None):
                return self._fail(
                    "it requires DYN_GRAPH_SECRET and this process has none"
                    if auth
                    else "it has no DYN_GRAPH_SECRET and this process has one"
                )
            if self._secret is None:
                return self.handshake.set_result(None)
            self._theirs = nonce
            assert self.transport is not None
            self.transport.write(self._nonce + _mac(self._secret, b"callee", nonce, self._nonce))
        if len(self._inbox) < _MAC:
            return
        assert self._secret is not None
        expected = _mac(self._secret, b"caller", self._nonce, self._theirs)
        if not hmac.compare_digest(bytes(self._inbox[:_MAC]), expected):
            return self._fail("its proof of the graph's secret is wrong")
        self._inbox.clear()
        self.handshake.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(why))
        self.abort()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._out.clear()
        self._writable.set()
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError("it closed the connection"))
        self._on_lost(self)

    @property
    def writable(self) -> bool:
        return not self.lost and self._writable.is_set()

    def write_now(self, message: bytes) -> bool:
        """Queue without waiting; False if the caller reads too slowly (await `write`)."""
        if not self.writable:
            return False
        self._queue(message)
        return True

    async def write(self, message: bytes) -> bool:
        """Queue, first waiting while the caller is behind; False if the connection dropped.

        A caller that reads nothing for `STALL_TIMEOUT` seconds is cut off (and its streams
        cancelled through `connection_lost`): a producer is never held forever.
        """
        if not self._writable.is_set():
            try:  # the caller reads slowly: hold the producer here
                await asyncio.wait_for(self._writable.wait(), STALL_TIMEOUT)
            except TimeoutError:
                log.warning("a caller read nothing for %.0f s; dropping its connection",
                            STALL_TIMEOUT)  # fmt: skip
                self.abort()
                return False
        if self.lost:
            return False
        self._queue(message)
        return True

    def _queue(self, message: bytes) -> None:
        if not self._out:  # the first message of this loop turn schedules the turn's write
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(message)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.lost and self.transport is not None:
            self.transport.writelines(out)

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class ReplyConnections:
    """The callee's connections to its callers, one per caller address, opened on first use.

    `on_caller_lost(address)` runs when a connection drops: the caller process is gone (or
    unreachable), so its streams should be cancelled.
    """

    def __init__(
        self,
        on_caller_lost: Callable[[str], None],
        allowed: Callable[[str], bool] | None = None,
        secret: bytes | None = None,
    ) -> None:
        self._on_caller_lost = on_caller_lost
        self._secret = secret
        self._allowed = allowed  # None: any address (no registry to check against)
        self._conns: dict[str, _ReplyConnection] = {}
        self._opening: dict[str, asyncio.Task[_ReplyConnection | None]] = {}
        self._refused: dict[str, float] = {}  # address -> when TCP to it last failed
        self._closed = False

    def allows(self, address: str) -> bool:
        """Whether a request naming ``address`` may be answered by connecting to it: only a
        registered caller's listener (`AddressWatcher`), so nobody can make this process
        open a connection to a host of their choosing."""
        return self._allowed is None or self._allowed(address)

    def ready(self, address: str) -> _ReplyConnection | None:
        """The open connection to `address`, if there is one (no awaiting)."""
        conn = self._conns.get(address)
        return conn if conn is not None and not conn.lost else None

    def refused(self, address: str) -> bool:
        """TCP to `address` failed lately: answer that caller over NATS for now."""
        refused_at = self._refused.get(address)
        return refused_at is not None and time.monotonic() - refused_at < _RETRY_AFTER

    def open_soon(self, address: str) -> asyncio.Task[_ReplyConnection | None] | None:
        """Start opening the connection to `address` unless it is open, opening or refused.

        Called when a request arrives, so the connection is usually open by the time the
        handler has a first item (and a quiet stream's heartbeats have a way out).
        """
        if self._closed or self.ready(address) is not None or self.refused(address):
            return None
        opening = self._opening.get(address)
        if opening is None:
            # A task of its own: every stream waiting for this connection may be cancelled
            # without cancelling the opening for the others.
            opening = asyncio.get_running_loop().create_task(self._open(address))
            self._opening[address] = opening
            opening.add_done_callback(lambda _: self._opening.pop(address, None))
        return opening

    async def get(self, address: str) -> _ReplyConnection | None:
        """The connection to `address`, opened if needed; None means "answer over NATS"."""
        conn = self.ready(address)
        if conn is not None:
            return conn
        opening = self.open_soon(address)
        if opening is None:  # shut down, or refused lately
            return None
        return await asyncio.shield(opening)

    async def _open(self, address: str) -> _ReplyConnection | None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        conn: _ReplyConnection | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(
                    lambda: _ReplyConnection(self._lost, self._secret), host, int(port)
                )
                await conn.handshake
        except (OSError, TimeoutError, ValueError) as exc:
            if conn is not None:
                conn.abort()
            self._refused[address] = time.monotonic()
            log.warning(
                "cannot open a response connection to %s (%s); answering that caller over NATS",
                address, exc or type(exc).__name__,
            )  # fmt: skip
            return None
        if self._closed:  # shut down while connecting
            conn.close()
            return None
        self._refused.pop(address, None)
        self._conns[address] = conn
        return conn

    def _lost(self, conn: _ReplyConnection) -> None:
        for address, known in list(self._conns.items()):
            if known is conn:
                del self._conns[address]
                if not self._closed:
                    self._on_caller_lost(address)

    def close(self) -> None:
        self._closed = True
        for task in list(self._opening.values()):
            task.cancel()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()


def listen_host(nats_url: str) -> str:
    """The address callees can reach this process at, for its `ResponseListener`.

    On one machine (NATS on a loopback address) it is 127.0.0.1. Otherwise it is the local
    address of the interface that routes to the NATS server: a host that reaches NATS is, in
    the deployments this runtime targets, also reachable from its peers. ``DYN_RESPONSE_HOST``
    overrides it.
    """
    first = nats_url.split(",")[0].strip()
    host = urlsplit(first if "://" in first else f"nats://{first}").hostname or "127.0.0.1"
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_loopback:
        return str(ip)
    family = socket.AF_INET6 if ip is not None and ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 4222))  # UDP connect sends nothing; it only picks a route
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())
