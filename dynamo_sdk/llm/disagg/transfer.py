"""Moving KV blocks between worker processes.

The interface is two halves: a decode worker's ``KvReceiver`` (it knows which blocks each
pending request may receive and writes what arrives into its cache) and a prefill worker's
``send_kv``. Every transfer carries the sender's ``KvLayout``; a layout that differs from the
receiver's is refused with a message naming the differences, before any byte is written.

Two transports, chosen per transfer by ``send_kv``:

* CUDA IPC, when the KV is on a GPU and the receiver's cache is a GPU tensor on the same
  machine that this process can see: the receiver advertises its cache tensor's IPC handle
  (a typed `CudaIpcHandle`, `cuda_ipc.py`: never a pickle) and GPU UUID in its endpoint; the
  sender checks the handle against the advertised layout, maps that memory once
  and copies its blocks straight into the receiver's blocks, device to device (NVLink or PCIe
  peer copies across GPUs), then tells the receiver over TCP that they are in place.
* TCP otherwise: host memory over a TCP connection; works between any two
  processes or machines, and is what CI runs. The payload moves between the socket and tensor
  memory directly (``sock_recv_into`` / ``sock_sendall`` on raw non-blocking sockets): asyncio
  streams cap their buffer at 64 KiB and copy every byte twice more, which held loopback
  transfers to about 0.1 GB/s.

Either way a sender keeps its connections to a receiver open for later transfers (a new
one costs a handshake), the layout and block ids are checked by the receiver, and a
connection that breaks mid-transfer (the prefill worker died) fails the request's transfer:
the decode worker then prefills the prompt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import torch

from dynamo_sdk.llm.disagg.protocol import (
    CudaIpcHandle,
    KvLayout,
    TransferEndpoint,
    TransferHeader,
)
from dynamo_sdk.llm.kv.block_copy import scatter_blocks

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LEN = struct.Struct(">I")
_OK, _REFUSED = b"\x01", b"\x00"
_SOCKET_BUFFER = 4 << 20  # large socket buffers: fewer wakeups per payload
_MAX_IDLE = 4  # connections kept open per receiver, per event loop
# Senders' idle connections, per event loop (a socket serves the loop that opened it).
_IDLE: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, int], list[_Connection]]
] = weakref.WeakKeyDictionary()


class TransferError(Exception):
    """A KV transfer was refused or broke off."""


@dataclass
class _Pending:
    block_ids: set[int]
    writing: bool = False  # a sender was granted an in-place write and has not finished
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class KvReceiver:
    """Decode side: accepts KV for the requests it ``expect``s and writes it into its blocks."""

    def __init__(
        self,
        layout: KvLayout,
        write: Callable[[list[int], torch.Tensor], None],
        host: str = "127.0.0.1",
        cache: torch.Tensor | None = None,
    ) -> None:
        """``cache``: the whole KV tensor ``[layers, 2, blocks, ...]``; on a GPU, senders on this
        machine that can see that GPU write into it directly (CUDA IPC)."""
        self.layout = layout
        self.host = host
        self.cache = cache
        self.port = 0
        self._write = write
        self._pending: dict[str, _Pending] = {}
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.bytes_received = 0
        self.connections_accepted = 0

    async def start(self, port: int = 0) -> TransferEndpoint:
        self._listener = socket.create_server((self.host, port), backlog=128)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept(self._listener))
        endpoint = TransferEndpoint(self.host, self.port, self.layout, node=node_id())
        if self.cache is not None and self.cache.is_cuda:
            from dynamo_sdk.llm.disagg.cuda_ipc import IpcHandleError, describe

            try:
                endpoint.cuda_ipc = describe(self.cache)
                endpoint.gpu_uuid = gpu_uuid(self.cache.device)
            except IpcHandleError as exc:  # e.g. expandable segments: senders use TCP
                log.warning("KV cache not shared through CUDA IPC: %s", exc)
        return endpoint

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.set_result(0)

    def expect(self, request_id: str, block_ids: list[int]) -> asyncio.Future[int]:
        """Accept KV for ``request_id`` into ``block_ids``; the future gives the tokens written
        (0 when the prefill failed or its connection broke)."""
        pending = _Pending(set(block_ids))
        self._pending[request_id] = pending
        return pending.done

    def forget(self, request_id: str) -> None:
        """Stop accepting KV for a request (done, timed out or cancelled)."""
        self._pending.pop(request_id, None)

    async def wait(self, request_id: str, timeout: float) -> int:
        """Tokens written for an ``expect``ed request, 0 if nothing came within ``timeout``.

        A sender already granted an in-place (CUDA IPC) write is waited for past the timeout
        (until it says done or its connection breaks): its copy lands in these blocks, which
        must not be reused before it has.
        """
        pending = self._pending[request_id]
        try:
            return await asyncio.wait_for(asyncio.shield(pending.done), timeout)
        except TimeoutError:
            if pending.writing:
                return await pending.done
            return 0
        except asyncio.CancelledError:
            if pending.writing:  # the request goes, its blocks too: not under a running copy
                await asyncio.shield(pending.done)
            raise
        finally:
            self.forget(request_id)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            self.connections_accepted += 1
            task = asyncio.create_task(self._handle(_Connection(sock)))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handle(self, conn: _Connection) -> None:
        """Serve transfers on one connection, one after another, until the sender closes it
        (senders keep a connection per receiver open: a new one costs a round trip or two).
        Anything but a completed transfer closes it: the stream may be out of step."""
        try:
            while await self._serve_one(conn):
                pass
        finally:
            conn.close()

    async def _serve_one(self, conn: _Connection) -> bool:
        """One transfer; True when it completed and the connection can take the next."""
        pending: _Pending | None = None
        try:
            header = await conn.recv_header()
            if header is None:  # the sender closed the connection between transfers
                return False
            pending = self._pending.get(header.request_id)
            if pending is None:
                await _refuse(conn, f"no transfer expected for {header.request_id}")
                return False
            if header.error is not None:
                log.warning("prefill of %s failed remotely: %s", header.request_id, header.error)
                _resolve(pending, 0)
                await _reply(conn, _OK)
                return True
            problem = _check(header, self.layout, pending)
            if problem is None and header.block_ids:
                most = len(pending.block_ids) * self.layout.block_size
                if header.num_tokens > most:  # more KV than the offered blocks can hold
                    problem = f"{header.num_tokens} tokens for {len(pending.block_ids)} blocks"
            if problem is not None:
                _resolve(pending, 0)
                await _refuse(conn, problem)
                return False
            if not header.block_ids:  # a notice: the KV is stored elsewhere (a vLLM connector)
                # ... unless blocks were offered: then nothing was written, whatever it says
                _resolve(pending, 0 if pending.block_ids else header.num_tokens)
                await _reply(conn, _OK)
                return True
            if header.in_place:  # CUDA IPC: grant the write, then wait for "written"
                pending.writing = True
                await _reply(conn, _OK)
                if await conn.recv_exactly(1) != _OK:
                    raise ConnectionError("in-place transfer abandoned by the sender")
                self.bytes_received += _nbytes(self.layout, len(header.block_ids))
            else:
                assert header.layout is not None
                payload = torch.empty(header.nbytes, dtype=torch.uint8)
                await conn.recv_into(payload.numpy().data)
                kv = _tensor(payload, header.layout, len(header.block_ids))
                self._write(header.block_ids, kv)
                self.bytes_received += header.nbytes
            _resolve(pending, header.num_tokens)
            await _reply(conn, _OK)
            return True
        except (ConnectionError, msgspec.DecodeError) as exc:
            log.warning("KV transfer broke off: %s", exc)
            if pending is not None:
                _resolve(pending, 0)
        except Exception as exc:
            log.exception("KV transfer failed")
            if pending is not None:
                _resolve(pending, 0)
            with contextlib.suppress(Exception):
                await _refuse(conn, f"{type(exc).__name__}: {exc}")
        return False


def _check(header: TransferHeader, layout: KvLayout, pending: _Pending) -> str | None:
    if header.layout is None:
        return "transfer without a KV layout"
    diff = header.layout.mismatch(layout)
    if diff is not None:
        return f"KV layout mismatch (sender vs receiver): {diff}"
    if not set(header.block_ids) <= pending.block_ids:
        return "transfer names blocks that were not offered for this request"
    expected = 0 if header.in_place else _nbytes(layout, len(header.block_ids))
    if header.nbytes != expected:
        return f"payload of {header.nbytes} bytes, {expected} expected"
    return None


def _resolve(pending: _Pending, tokens: int) -> None:
    if not pending.done.done():
        pending.done.set_result(tokens)


async def _reply(conn: _Connection, status: bytes, message: str = "") -> None:
    """A status byte and a length-prefixed message (replies don't end the connection)."""
    text = message.encode()
    with contextlib.suppress(OSError):
        await conn.send(status + _LEN.pack(len(text)) + text)


async def _refuse(conn: _Connection, message: str) -> None:
    log.warning("KV transfer refused: %s", message)
    await _reply(conn, _REFUSED, message)


def _nbytes(layout: KvLayout, num_blocks: int) -> int:
    per_block = 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim
    return per_block * num_blocks * DTYPES[layout.dtype].itemsize


def _tensor(payload: torch.Tensor, layout: KvLayout, num_blocks: int) -> torch.Tensor:
    """The received bytes (a flat uint8 tensor) seen as KV blocks, without a copy."""
    shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads,
             layout.head_dim)  # fmt: skip
    return payload.view(DTYPES[layout.dtype]).view(shape)


async def send_kv(
    endpoint: TransferEndpoint,
    header: TransferHeader,
    kv: torch.Tensor | None,
    timeout: float = 60.0,
) -> None:
    """Send ``kv`` (or, with ``header.error``, a failure report) to a decode worker.

    Raises ``TransferError`` if the receiver refuses it (layout, blocks, unknown request).
    """
    if header.error is None:
        assert kv is not None and header.layout is not None
        diff = header.layout.mismatch(endpoint.layout)
        if diff is not None:  # fail fast, without moving the bytes
            raise TransferError(f"KV layout mismatch (sender vs receiver): {diff}")
        remote = _peer_cache(endpoint) if kv.is_cuda else None
        if remote is not None:  # CUDA IPC: straight into the receiver's blocks, once granted
            check_block_ids(remote, header.block_ids)
            if kv.shape[2] != len(header.block_ids):
                raise TransferError(f"{kv.shape[2]} blocks of KV for {len(header.block_ids)} ids")
            header.in_place = True
            await _send_in_place(endpoint, header, remote, kv, timeout)
            return
        host = kv.detach().cpu().contiguous().view(-1).view(torch.uint8)
        payload = host.numpy().data
        header.nbytes = len(payload)
    else:
        payload = memoryview(b"")

    async def exchange(conn: _Connection) -> None:
        await asyncio.wait_for(conn.send(payload), timeout)
        _check_reply(await asyncio.wait_for(conn.recv_reply(), timeout))

    await _transfer(endpoint, header, timeout, exchange)


async def send_notice(
    endpoint: TransferEndpoint, header: TransferHeader, timeout: float = 30.0
) -> None:
    """Tell a decode worker that ``header.num_tokens`` of a prompt's KV are ready where a KV
    connector can load them (no blocks, no payload); the receiver still checks the layout.

    Raises ``TransferError`` if the receiver refuses (e.g. it no longer waits for the request).
    """
    assert not header.block_ids and header.layout is not None
    header.nbytes = 0

    async def exchange(conn: _Connection) -> None:
        _check_reply(await asyncio.wait_for(conn.recv_reply(), timeout))

    await _transfer(endpoint, header, timeout, exchange)


async def _send_in_place(
    endpoint: TransferEndpoint,
    header: TransferHeader,
    remote: torch.Tensor,
    kv: torch.Tensor,
    timeout: float,
) -> None:
    """Ask first, then write: the receiver grants the write only while the request still
    waits for these blocks (so a late sender can never overwrite blocks given to another
    request), then waits for "written" before it uses them."""

    async def exchange(conn: _Connection) -> None:
        _check_reply(await asyncio.wait_for(conn.recv_reply(), timeout))
        await _copy_in_place(remote, header.block_ids, kv)
        await asyncio.wait_for(conn.send(_OK), timeout)
        _check_reply(await asyncio.wait_for(conn.recv_reply(), timeout))

    await _transfer(endpoint, header, timeout, exchange)


async def _transfer(
    endpoint: TransferEndpoint,
    header: TransferHeader,
    timeout: float,
    exchange: Callable[[_Connection], Awaitable[None]],
) -> None:
    """Send ``header`` and run ``exchange`` on a connection to ``endpoint``: an idle one kept
    from an earlier transfer when there is one, which goes back to the pool once the receiver
    has answered OK. A kept connection the receiver closed meanwhile fails before any answer
    arrives; then the transfer is tried once more on a new connection."""
    pool = _IDLE.setdefault(asyncio.get_running_loop(), {}).setdefault(
        (endpoint.host, endpoint.port), []
    )
    for kept in (True, False):
        conn = pool.pop() if kept and pool else None
        reused = conn is not None
        if conn is None:
            conn = await _connect(endpoint, timeout)
        conn.answered = False
        try:
            head = msgspec.msgpack.encode(header)
            await asyncio.wait_for(conn.send(_LEN.pack(len(head)) + head), timeout)
            await exchange(conn)
        except (ConnectionError, OSError) as exc:
            conn.close()
            if reused and not conn.answered:
                log.debug("kept transfer connection to %s:%d was closed (%s); reconnecting",
                          endpoint.host, endpoint.port, exc)  # fmt: skip
                continue
            raise
        except BaseException:
            conn.close()
            raise
        if len(pool) < _MAX_IDLE:
            pool.append(conn)
        else:
            conn.close()
        return


async def _connect(endpoint: TransferEndpoint, timeout: float) -> _Connection:
    loop = asyncio.get_running_loop()
    family, address = await _resolve_address(loop, endpoint.host, endpoint.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    conn = _Connection(sock)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
    except BaseException:
        conn.close()
        raise
    return conn


async def _resolve_address(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> tuple[int, tuple[Any, ...]]:
    """Receivers advertise IP addresses: take those as they are (``getaddrinfo`` runs in a
    thread pool, a hop worth ~0.1-0.2 ms per transfer); resolve anything else."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return infos[0][0], infos[0][4]
    return (socket.AF_INET6, (host, port)) if ip.version == 6 else (socket.AF_INET, (host, port))


class _Connection:
    """One transfer connection on a raw non-blocking socket.

    Bytes go from tensor memory to the socket and from the socket into tensor memory with no
    buffer in between (asyncio streams would copy each payload byte twice more, 64 KiB at a
    time). A peer that closes early raises ``ConnectionError``.
    """

    _MAX_MESSAGE = 1 << 16  # replies and headers are small; anything larger is a broken peer

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        self.sock = sock
        self.answered = False  # a reply to the current transfer arrived
        self._loop = asyncio.get_running_loop()

    async def send(self, data: bytes | memoryview) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely."""
        got = 0
        while got < len(view):
            n = await self._loop.sock_recv_into(self.sock, view[got:])
            if n == 0:
                raise ConnectionError(f"connection closed after {got} of {len(view)} bytes")
            got += n

    async def recv_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.recv_into(memoryview(buf))
        return bytes(buf)

    async def recv_header(self) -> TransferHeader | None:
        """The next transfer's header; None when the peer closed the connection before it."""
        first = await self._loop.sock_recv(self.sock, _LEN.size)
        if not first:
            return None
        rest = await self.recv_exactly(_LEN.size - len(first)) if len(first) < _LEN.size else b""
        (size,) = _LEN.unpack(first + rest)
        if size > self._MAX_MESSAGE:
            raise ConnectionError(f"transfer header of {size} bytes")
        return msgspec.msgpack.decode(await self.recv_exactly(size), type=TransferHeader)

    async def recv_reply(self) -> bytes:
        """A reply: its status byte, then its message (empty for OK)."""
        head = await self.recv_exactly(1 + _LEN.size)
        self.answered = True
        (size,) = _LEN.unpack(head[1:])
        if size > self._MAX_MESSAGE:
            raise ConnectionError(f"transfer reply of {size} bytes")
        return head[:1] + (await self.recv_exactly(size) if size else b"")

    def close(self) -> None:
        self.sock.close()


def _check_reply(reply: bytes) -> None:
    if not reply.startswith(_OK):
        raise TransferError(reply[1:].decode(errors="replace") or "receiver closed the connection")


async def _copy_in_place(remote: torch.Tensor, block_ids: list[int], kv: torch.Tensor) -> None:
    """Scatter ``kv`` into the peer's blocks on a stream of its own (on the peer's GPU), so the
    copy neither waits behind nor holds up this process's model steps on the default stream,
    and wait for it off the event loop. ``kv`` stays referenced until the copy is done."""
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(kv.device))  # kv is fully computed
    stream = _transfer_stream(remote.device)
    stream.wait_event(ready)
    done = torch.cuda.Event()
    with torch.cuda.device(remote.device), torch.cuda.stream(stream):
        idx = torch.tensor(block_ids, dtype=torch.long).to(remote.device, non_blocking=True)
        scatter_blocks(remote, idx, kv.to(remote.device, non_blocking=True))
        done.record(stream)
    await asyncio.to_thread(done.synchronize)


@functools.cache
def _transfer_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def transport_for(endpoint: TransferEndpoint, kv: torch.Tensor) -> Literal["cuda_ipc", "tcp"]:
    """Which transport ``send_kv`` uses for ``kv`` to ``endpoint``: "cuda_ipc" or "tcp"."""
    return "cuda_ipc" if kv.is_cuda and _peer_cache(endpoint) is not None else "tcp"


@functools.cache
def node_id() -> str:
    """This machine: its hostname and boot id (containers on one host share the boot id)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


_PEERS: dict[tuple[str, int, CudaIpcHandle], torch.Tensor | None] = {}


def _peer_cache(endpoint: TransferEndpoint) -> torch.Tensor | None:
    """The receiver's KV cache mapped into this process (once per endpoint), or None when
    CUDA IPC cannot reach it (another machine, its GPU not visible here, no handle)."""
    handle = endpoint.cuda_ipc
    if handle is None or endpoint.node != node_id() or not torch.cuda.is_available():
        return None
    key = (endpoint.host, endpoint.port, handle)
    if key not in _PEERS:
        _PEERS[key] = _open_ipc(endpoint, handle)
    return _PEERS[key]


def _open_ipc(endpoint: TransferEndpoint, handle: CudaIpcHandle) -> torch.Tensor | None:
    """Map the receiver's cache, after checking the handle describes what its layout says (a
    contiguous ``[layers, 2, blocks, block_size, kv_heads, head_dim]`` tensor of its dtype):
    a handle that claims more than that is refused, not mapped."""
    from dynamo_sdk.llm.disagg.cuda_ipc import IpcHandleError, rebuild

    problem = _ipc_mismatch(handle, endpoint.layout)
    if problem is not None:
        log.warning("CUDA IPC handle of %s:%d refused (%s); using TCP", endpoint.host,
                    endpoint.port, problem)  # fmt: skip
        return None
    visible = {gpu_uuid(torch.device("cuda", i)): i for i in range(torch.cuda.device_count())}
    index = visible.get(endpoint.gpu_uuid)
    if index is None:
        return None
    try:
        tensor = rebuild(handle, index)  # its device index in this process's numbering
    except (RuntimeError, IpcHandleError) as exc:  # e.g. no peer access between these GPUs
        log.warning("CUDA IPC to %s:%d unavailable (%s); using TCP", endpoint.host,
                    endpoint.port, exc)  # fmt: skip
        return None
    return tensor


def _ipc_mismatch(handle: CudaIpcHandle, layout: KvLayout) -> str | None:
    """Why ``handle`` is not the KV cache ``layout`` describes, or None."""
    shape = handle.shape
    if len(shape) != 6:
        return f"a {len(shape)}-dimensional tensor, not a KV cache"
    want = (layout.num_layers, 2, shape[2], layout.block_size, layout.num_kv_heads,
            layout.head_dim)  # fmt: skip
    if shape != want or shape[2] < 1:
        return f"shape {shape}, layout says {want}"
    if handle.dtype != layout.dtype:
        return f"dtype {handle.dtype}, layout says {layout.dtype}"
    contiguous, step = [], 1
    for n in reversed(shape):
        contiguous.append(step)
        step *= n
    if handle.stride != tuple(reversed(contiguous)):
        return f"strides {handle.stride}: not contiguous"
    return None


def check_block_ids(cache: torch.Tensor, block_ids: list[int]) -> None:
    """Refuse block ids outside a mapped peer cache before any copy: an index past it would
    be a device-side fault that poisons this process's CUDA context."""
    blocks = cache.shape[2]
    bad = [b for b in block_ids if not 0 <= b < blocks]
    if bad:
        raise TransferError(f"block ids {bad[:4]} outside the receiver's {blocks} blocks")
