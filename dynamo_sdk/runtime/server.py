"""The callee side: serve one endpoint of one instance over NATS.

Each instance subscribes to the endpoint's queue-group subject (NATS spreads requests over the
group) and to its own instance subject (direct routing). Every request runs in its own task;
items are streamed back over TCP to the caller's response listener when the request names one
(`response_plane`), else to the request's NATS reply subject. Items produced while the generator
does not pause are sent together in one frame; the buffer is flushed as soon as the generator
waits, so a slow stream (tokens) still leaves item by item with no added latency.

A request is cancelled when its caller says so (a `CancelFrame` on the component's cancel
subject), or when its caller is gone (the TCP connection to it dropped, or NATS answered "no
responders" to a heartbeat): the handler's task is cancelled, so the generator sees
`CancelledError` at its current `await` (or `GeneratorExit` if it was parked at a `yield`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dynamo_sdk.runtime import codec
from dynamo_sdk.runtime.context import bind_request
from dynamo_sdk.runtime.errors import BadRequestError, ErrorCode, code_of
from dynamo_sdk.runtime.protocol import (
    CancelFrame,
    ErrorInfo,
    FrameKind,
    ResponseFrame,
    cancel_decoder,
    cancel_subject,
    instance_subject,
    request_decoder,
    subject_prefix,
)
from dynamo_sdk.runtime.response_plane import MAX_MESSAGE, ReplyConnections, encode_message

log = logging.getLogger(__name__)

Handler = Callable[[Any], AsyncIterator[Any] | Awaitable[Any]]

MAX_ITEMS_PER_FRAME = 256
# Bursts bigger than this leave through `_send`, which splits them to fit a frame.
_HOT_PATH_BYTES = 1 << 20
_frame_encoder = msgspec.msgpack.Encoder()


class _Stream:
    __slots__ = (
        "addr", "buf", "ended", "flush_scheduled", "last_sent", "pending", "reply", "request_id",
        "task",
    )  # fmt: skip

    def __init__(self, request_id: str, reply: str, addr: str = "") -> None:
        self.request_id = request_id
        self.reply = reply
        self.addr = addr  # the caller's response listener; "" = answer on NATS
        self.buf: list[msgspec.Raw] = []
        self.flush_scheduled = False
        self.pending: asyncio.Task[None] | None = None
        self.last_sent = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.ended = False  # an error frame ended it (a too-large item): nothing more is sent


class EndpointServer:
    """Serves `handler` for one (namespace, component, endpoint) as one instance."""

    def __init__(
        self,
        nc: NATS,
        *,
        namespace: str,
        component: str,
        endpoint: str,
        instance_id: int,
        handler: Handler,
        request_type: Any,
        streaming: bool,
        heartbeat_interval: float = 1.0,
        replies: ReplyConnections | None = None,
    ) -> None:
        self.nc = nc
        self.replies = replies  # None: every answer goes over NATS
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.instance_id = instance_id
        self.handler = handler
        self.streaming = streaming
        self.heartbeat_interval = heartbeat_interval
        self.queue_subject = subject_prefix(namespace, component, endpoint)
        self.instance_subject = instance_subject(namespace, component, endpoint, instance_id)
        self._decoder = codec.decoder_for(request_type)
        self._active: dict[str, _Stream] = {}
        self._recently_cancelled: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._subs: list[Any] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Heartbeats are published with a reply subject here: when the caller's inbox has no
        # subscriber any more (its process died), NATS answers "no responders" on it.
        self._probe_inbox = f"_INBOX.{nc.new_inbox().rsplit('.', 1)[-1]}.probe"
        self._probe_ids: dict[str, str] = {}  # probe token -> request id
        self._probe_counter = 0
        self._accepting = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.served = 0

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        self._accepting = True
        self._subs.append(
            await self.nc.subscribe(
                self.queue_subject, queue=self.queue_subject, cb=self._on_request
            )
        )
        self._subs.append(await self.nc.subscribe(self.instance_subject, cb=self._on_request))
        self._subs.append(
            await self.nc.subscribe(
                cancel_subject(self.namespace, self.component), cb=self._on_cancel
            )
        )
        self._subs.append(await self.nc.subscribe(f"{self._probe_inbox}.*", cb=self._on_probe))
        await self.nc.flush()
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def stop_accepting(self) -> None:
        """Unsubscribe from request subjects: new calls go to other instances (or fail fast)."""
        self._accepting = False
        for sub in self._subs[:2]:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already gone
                pass
        del self._subs[:2]

    async def drain(self, grace: float) -> int:
        """Let in-flight streams finish for up to `grace` seconds, then cancel the rest.

        Returns how many streams had to be cancelled.
        """
        await self.stop_accepting()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            pass
        cancelled = 0
        for stream in list(self._active.values()):
            if stream.task is not None and not stream.task.done():
                stream.task.cancel("worker shutting down")
                cancelled += 1
        tasks = [s.task for s in self._active.values() if s.task is not None]
        if tasks:
            # Bounded: a cancelled stream whose caller stopped reading may still be trying to
            # say so; shutting down must not wait on it.
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            if stuck:
                log.warning("%s: %d stream(s) did not stop within 5 s of being cancelled",
                            self.queue_subject, len(stuck))  # fmt: skip
        return cancelled

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()

    # ---- request handling -------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("%s: request without a reply subject dropped", self.queue_subject)
            return
        try:
            frame = request_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            error = ErrorInfo("BadRequestError", str(exc), ErrorCode.INVALID_REQUEST)
            await self._send(_Stream("", msg.reply), FrameKind.ERROR, [], error)
            return
        if frame.request_id in self._active:
            # An id is unique to its call (the caller's reply subject), so a second request
            # under a live stream's id is forged, by someone who read the first on NATS. Run,
            # it would take the live stream's place here (the victim's cancel would stop the
            # forgery and a drain would not wait for the victim); answered, even with an
            # error, its reply subject may be the victim's. Dropped unanswered.
            log.warning("%s: a second request under the live id %.64s dropped",
                        self.queue_subject, frame.request_id)  # fmt: skip
            return
        addr = frame.reply_addr
        if addr and (self.replies is None or not self.replies.allows(addr)):
            addr = ""  # not a registered caller's listener: answer over NATS
        if not self._accepting:
            await self._send(
                _Stream(frame.request_id, msg.reply, addr),
                FrameKind.ERROR,
                [],
                ErrorInfo(
                    "WorkerShuttingDown",
                    f"instance {self.instance_id:x} is draining",
                    ErrorCode.SHUTTING_DOWN,
                ),
            )
            return
        if frame.request_id in self._recently_cancelled:
            return
        stream = _Stream(frame.request_id, msg.reply, addr)
        if addr and self.replies is not None:
            self.replies.open_soon(addr)
        self._active[frame.request_id] = stream
        self._idle.clear()
        stream.task = asyncio.get_running_loop().create_task(self._run(stream, frame.payload))

    def caller_lost(self, addr: str) -> None:
        """The connection to the caller at `addr` dropped: its process is gone; stop its work."""
        for stream in list(self._active.values()):
            if stream.addr == addr and stream.task is not None and not stream.task.done():
                log.info("%s: caller of %s is gone; cancelling", self.queue_subject,
                         stream.request_id)  # fmt: skip
                stream.task.cancel("caller gone")

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            request_id = cancel_decoder.decode(msg.data).request_id
        except msgspec.DecodeError:
            return
        stream = self._active.get(request_id)
        if stream is not None and stream.task is not None:
            stream.task.cancel("cancelled by caller")
        else:
            # The cancel may overtake its request; remember it briefly so the request is dropped.
            now = time.monotonic()
            self._recently_cancelled[request_id] = now
            while self._recently_cancelled:
                oldest, at = next(iter(self._recently_cancelled.items()))
                if now - at < 30 and len(self._recently_cancelled) < 10_000:
                    break
                del self._recently_cancelled[oldest]

    async def _run(self, stream: _Stream, payload: msgspec.Raw) -> None:
        bind_request(self.endpoint, stream.request_id)
        agen: Any = None
        try:
            try:
                request = self._decoder.decode(payload)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                raise BadRequestError(f"bad request for {self.queue_subject}: {exc}") from exc
            if self.streaming:
                agen = self.handler(request)
                loop = asyncio.get_running_loop()
                async for item in agen:
                    stream.buf.append(msgspec.Raw(codec.encode(item)))
                    if len(stream.buf) >= MAX_ITEMS_PER_FRAME:
                        await self._flush(stream, FrameKind.DATA)
                        # publish() only buffers: yield once so the frame reaches the socket
                        # even when the generator never pauses on its own.
                        await asyncio.sleep(0)
                    elif not stream.flush_scheduled:
                        stream.flush_scheduled = True
                        loop.call_soon(self._flush_when_idle, stream)
            else:
                result = await self.handler(request)  # type: ignore[misc]
                stream.buf.append(msgspec.Raw(codec.encode(result)))
            await self._flush(stream, FrameKind.END)
            self.served += 1
        except asyncio.CancelledError:
            task = asyncio.current_task()
            reason = task.cancelling() if task is not None else 0
            if reason and not self._accepting:
                await self._flush(
                    stream,
                    FrameKind.ERROR,
                    ErrorInfo(
                        "WorkerShuttingDown",
                        "the worker shut down before the stream ended",
                        ErrorCode.SHUTTING_DOWN,
                    ),
                )
        except Exception as exc:
            log.debug("%s: handler raised", self.queue_subject, exc_info=True)
            error = ErrorInfo(type(exc).__name__, str(exc), code_of(exc))
            await self._flush(stream, FrameKind.ERROR, error)
        finally:
            if agen is not None:
                try:
                    await agen.aclose()
                except BaseException:
                    pass
            self._active.pop(stream.request_id, None)
            if not self._active:
                self._idle.set()

    def _flush_when_idle(self, stream: _Stream) -> None:
        """Runs once the generator paused: ship what it produced so far, in order."""
        stream.flush_scheduled = False
        if not stream.buf:
            return
        if stream.pending is not None and not stream.pending.done():
            return  # the stream's sender is still busy: it takes these items next, in order
        if stream.addr and self.replies is not None:
            # The hot path of a token stream: nothing queued before this frame and the
            # connection open, so write it now rather than in a task of its own.
            conn = self.replies.ready(stream.addr)
            small = sum(len(item) for item in stream.buf) < _HOT_PATH_BYTES
            if conn is not None and conn.writable and small:
                items, stream.buf = stream.buf, []
                conn.write_now(self._message(stream, FrameKind.DATA, items))
                stream.last_sent = time.monotonic()
                return
        stream.pending = asyncio.get_running_loop().create_task(self._sender(stream))

    async def _sender(self, stream: _Stream) -> None:
        """Send what the generator buffered, frame after frame, until the buffer is empty.

        At most one per stream: while a frame waits (a connection opening, a caller slow to
        read), the generator's items gather in `stream.buf`; once that holds
        MAX_ITEMS_PER_FRAME the generator itself waits in `_flush`, so a stalled caller holds
        its producer back instead of piling up frames in memory.
        """
        while stream.buf:
            items, stream.buf = stream.buf, []
            await self._send(stream, FrameKind.DATA, items, None)
            stream.last_sent = time.monotonic()

    async def _flush(
        self, stream: _Stream, kind: FrameKind, error: ErrorInfo | None = None
    ) -> None:
        # Take the items first: the sender finishing its frame must find nothing left, or it
        # would send these after ours; a scheduled `_flush_when_idle` finds nothing either.
        items, stream.buf = stream.buf, []
        while stream.pending is not None and not stream.pending.done():
            await stream.pending
        await self._send(stream, kind, items, error)
        stream.last_sent = time.monotonic()

    def _frame(self, kind: FrameKind, items: list[msgspec.Raw], error: ErrorInfo | None) -> bytes:
        frame = ResponseFrame(kind=kind, instance_id=self.instance_id, items=items, error=error)
        return _frame_encoder.encode(frame)

    def _message(self, stream: _Stream, kind: FrameKind, items: list[msgspec.Raw]) -> bytes:
        return encode_message(stream.reply, self._frame(kind, items, None))

    async def _send(
        self,
        stream: _Stream,
        kind: FrameKind,
        items: list[msgspec.Raw],
        error: ErrorInfo | None,
        probe: str = "",
    ) -> None:
        if stream.ended:
            return
        conn = None
        if stream.addr and self.replies is not None:
            conn = self.replies.ready(stream.addr) or await self.replies.get(stream.addr)
            if conn is None:
                stream.addr = ""  # unreachable over TCP: this stream answers over NATS now
        limit = MAX_MESSAGE - 6 - len(stream.reply) if conn is not None else self.nc.max_payload
        # A frame is its items plus a few bytes of msgpack per item: split a burst too big for
        # one frame before encoding it (encoding it whole at every halving would hold the
        # event loop for seconds on a burst of large items).
        size = sum(len(item) for item in items) + 64 + len(error.message.encode() if error else b"")
        if size > limit and len(items) > 1:  # many items: several frames
            half = len(items) // 2
            await self._send(stream, FrameKind.DATA, items[:half], None)
            await self._send(stream, kind, items[half:], error)
            return
        data = self._frame(kind, items, error) if size <= limit else b""
        if len(data) > limit or size > limit:
            path = "TCP" if conn is not None else "NATS"
            message = f"a response item of {size:,} bytes exceeds the {path} limit ({limit:,})"
            log.warning("%s: %s; failing the stream", self.queue_subject, message)
            data = self._frame(FrameKind.ERROR, [], ErrorInfo("ResponseTooLarge", message))
            stream.ended = True
            if stream.task is not None and not stream.task.done():
                stream.task.cancel("response too large")
        if conn is not None:
            # False: the connection dropped, so the caller is gone and `caller_lost` cancels
            # the stream; there is no one left to answer.
            await conn.write(encode_message(stream.reply, data))
            return
        try:
            await self.nc.publish(stream.reply, data, reply=probe)
        except Exception as exc:  # connection closing: the caller's watchdog reports it
            log.debug("%s: could not send a frame: %s", self.queue_subject, exc)

    async def _heartbeats(self) -> None:
        """Every interval, one heartbeat per running stream, sent as a probe.

        The caller's watchdog takes it as "still alive"; NATS's no-responders answer to it
        tells this side that the caller is gone, and its stream is cancelled (a Frontend that
        crashed must not leave engines generating for nobody).
        """
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = time.monotonic()
            live: dict[str, str] = {}
            for stream in list(self._active.values()):
                stream.last_sent = now
                if stream.addr and self.replies is not None:
                    # Over TCP a dead caller shows as a dropped connection. Never wait here: one
                    # caller slow to read, or a connection still opening, must not hold up the
                    # heartbeats of every other stream.
                    conn = self.replies.ready(stream.addr)
                    if conn is not None:
                        if conn.writable:
                            conn.write_now(self._message(stream, FrameKind.HEARTBEAT, []))
                        continue
                    if not self.replies.refused(stream.addr):
                        self.replies.open_soon(stream.addr)
                        continue
                    stream.addr = ""  # unreachable over TCP: heartbeat (and answer) over NATS
                self._probe_counter += 1
                token = format(self._probe_counter, "x")
                live[token] = stream.request_id
                await self._send(
                    stream,
                    FrameKind.HEARTBEAT,
                    [],
                    None,
                    probe=f"{self._probe_inbox}.{token}",
                )
            self._probe_ids = live

    async def _on_probe(self, msg: Msg) -> None:
        if msg.data or not msg.headers or msg.headers.get("Status") != "503":
            return
        request_id = self._probe_ids.pop(msg.subject.rsplit(".", 1)[-1], None)
        stream = self._active.get(request_id) if request_id is not None else None
        if stream is not None and stream.task is not None and not stream.task.done():
            log.info("%s: caller of %s is gone; cancelling", self.queue_subject, request_id)
            stream.task.cancel("caller gone")


def cancel_frame(request_id: str) -> bytes:
    return _frame_encoder.encode(CancelFrame(request_id))
