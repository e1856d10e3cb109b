"""Moving KV blocks between worker processes.

The interface is two halves: a decode worker's ``KvReceiver`` (it knows which blocks each
pending request may receive and writes what arrives into its cache) and a prefill worker's
``send_kv``. Every transfer carries the sender's ``KvLayout``; a layout that differs from the
receiver's is refused with a message naming the differences, before any byte is written.

``TcpKvTransport`` (here) sends host-memory copies over one TCP connection per transfer: it
works between any two processes or machines and is what CI runs. A connection that breaks
mid-payload (the prefill worker died) fails the request's transfer, and the decode worker
prefills the prompt itself. GPU-to-GPU transports (CUDA IPC or NCCL on one node) plug in
behind the same two halves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import torch

from dynamo_sdk.llm.disagg.protocol import KvLayout, TransferEndpoint, TransferHeader

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LEN = struct.Struct(">I")
_OK, _REFUSED = b"\x01", b"\x00"


class TransferError(Exception):
    """A KV transfer was refused or broke off."""


@dataclass
class _Pending:
    block_ids: set[int]
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
    ) -> None:
        self.layout = layout
        self.host = host
        self.port = 0
        self._write = write
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self.bytes_received = 0

    async def start(self, port: int = 0) -> TransferEndpoint:
        self._server = await asyncio.start_server(self._handle, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return TransferEndpoint(self.host, self.port, self.layout)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: _Pending | None = None
        try:
            (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
            header = msgspec.msgpack.decode(await reader.readexactly(size), type=TransferHeader)
            pending = self._pending.get(header.request_id)
            if pending is None:
                return await _refuse(writer, f"no transfer expected for {header.request_id}")
            if header.error is not None:
                log.warning("prefill of %s failed remotely: %s", header.request_id, header.error)
                _resolve(pending, 0)
                return await _reply(writer, _OK)
            problem = _check(header, self.layout, pending)
            if problem is not None:
                _resolve(pending, 0)
                return await _refuse(writer, problem)
            payload = await reader.readexactly(header.nbytes)
            assert header.layout is not None
            kv = _tensor(payload, header.layout, len(header.block_ids))
            self._write(header.block_ids, kv)
            self.bytes_received += header.nbytes
            _resolve(pending, header.num_tokens)
            await _reply(writer, _OK)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as exc:
            log.warning("KV transfer broke off: %s", exc)
            if pending is not None:
                _resolve(pending, 0)
        except Exception as exc:
            log.exception("KV transfer failed")
            if pending is not None:
                _resolve(pending, 0)
            with contextlib.suppress(Exception):
                await _refuse(writer, f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()


def _check(header: TransferHeader, layout: KvLayout, pending: _Pending) -> str | None:
    if header.layout is None:
        return "transfer without a KV layout"
    diff = header.layout.mismatch(layout)
    if diff is not None:
        return f"KV layout mismatch (sender vs receiver): {diff}"
    if not set(header.block_ids) <= pending.block_ids:
        return "transfer names blocks that were not offered for this request"
    expected = _nbytes(layout, len(header.block_ids))
    if header.nbytes != expected:
        return f"payload of {header.nbytes} bytes, {expected} expected"
    return None


def _resolve(pending: _Pending, tokens: int) -> None:
    if not pending.done.done():
        pending.done.set_result(tokens)


async def _reply(writer: asyncio.StreamWriter, status: bytes, message: str = "") -> None:
    writer.write(status + message.encode())
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _refuse(writer: asyncio.StreamWriter, message: str) -> None:
    log.warning("KV transfer refused: %s", message)
    await _reply(writer, _REFUSED, message)


def _nbytes(layout: KvLayout, num_blocks: int) -> int:
    per_block = 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim
    return per_block * num_blocks * DTYPES[layout.dtype].itemsize


def _tensor(payload: bytes, layout: KvLayout, num_blocks: int) -> torch.Tensor:
    shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads,
             layout.head_dim)  # fmt: skip
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return flat.view(DTYPES[layout.dtype]).view(shape)


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
        payload = kv.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        header.nbytes = len(payload)
    else:
        payload = b""
    head = msgspec.msgpack.encode(header)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port), timeout
    )
    try:
        writer.write(_LEN.pack(len(head)) + head)
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), timeout)
        reply = await asyncio.wait_for(reader.read(4096), timeout)
    finally:
        writer.close()
    if not reply.startswith(_OK):
        raise TransferError(reply[1:].decode(errors="replace") or "receiver closed the connection")
