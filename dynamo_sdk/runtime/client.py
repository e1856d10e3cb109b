"""The caller side: typed clients of remote endpoints, and the response streams they return.

An `EndpointClient` calls one endpoint (the SDK's `depends()` clients are built of them);
`client(req)` is a `ResponseStream` (an async iterator; awaitable for one-answer endpoints).
Routing: calling the endpoint publishes to its queue-group subject (NATS picks an instance);
`.round_robin()`, `.random()` and `.direct(instance_id)` pick one from discovery and use its
instance subject.

Every call has its own reply subject under the process's one wildcard inbox, and names the
process's TCP response listener (`response_plane`) so the callee can skip the NATS server on the
way back. Frames from either path are routed to the call's stream; a watchdog fails streams
whose instance went silent or left discovery, so a dead callee is an error, never a hang.
Closing a stream early (break, cancellation, garbage collection) sends a cancel to the callee.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
import weakref
from collections.abc import Callable, Generator
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.nuid import NUID

from dynamo_sdk.runtime import codec
from dynamo_sdk.runtime.discovery import InstanceWatcher
from dynamo_sdk.runtime.errors import (
    InstanceNotFoundError,
    NoInstancesError,
    RemoteError,
    StreamLostError,
)
from dynamo_sdk.runtime.protocol import (
    FrameKind,
    RequestFrame,
    cancel_subject,
    instance_subject,
    request_encoder,
    response_decoder,
    subject_prefix,
)
from dynamo_sdk.runtime.response_plane import ResponseListener
from dynamo_sdk.runtime.server import cancel_frame

log = logging.getLogger(__name__)

_END = object()


class CallDispatcher:
    """Owns the process's reply inbox and response listener; routes frames to open streams."""

    def __init__(
        self,
        nc: NATS,
        stream_timeout: float,
        listen_host: str | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.nc = nc
        self.stream_timeout = stream_timeout
        # None: responses come over NATS only (DYN_RESPONSE_TRANSPORT=nats); callees connecting
        # to the listener must prove `secret` (the graph's, DYN_GRAPH_SECRET) when there is one
        self._listener = (
            ResponseListener(listen_host, self._deliver, self._connection_lost, secret)
            if listen_host
            else None
        )
        self.reply_addr = ""
        self._nuid = NUID()
        self._prefix = f"_INBOX.{self._nuid.next().decode()}"
        self._calls = itertools.count(1)
        # Weak: a stream the caller dropped (break out of `async for`) must be collectable, so
        # that its finalizer can tell the callee to stop.
        self._streams: weakref.WeakValueDictionary[str, ResponseStream] = (
            weakref.WeakValueDictionary()
        )
        self._sub: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        # told `(instance_id, why)` when a call saw an instance fail (the runtime takes it out
        # of routing at once instead of when its lease runs out)
        self._failure_listeners: list[Callable[[int, str], None]] = []

    def on_instance_failed(self, listener: Callable[[int, str], None]) -> None:
        self._failure_listeners.append(listener)

    def _instance_failed(self, instance_id: int, why: str) -> None:
        if instance_id:
            for listener in self._failure_listeners:
                listener(instance_id, why)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_frame)
        await self.nc.flush()
        if self._listener is not None:
            await self._listener.start()
            self.reply_addr = self._listener.address
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for stream in list(self._streams.values()):
            stream._fail(StreamLostError("the runtime was shut down"))
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._listener is not None:
            await self._listener.close()

    def new_call(self) -> tuple[str, str]:
        # The inbox prefix is unique per process and a counter makes each call's token unique
        # in it; the reply subject is therefore unique everywhere and doubles as the request
        # id that cancels name (callees of a component all hear every cancel).
        token = format(next(self._calls), "x")
        return token, f"{self._prefix}.{token}"

    def register(self, token: str, stream: ResponseStream) -> None:
        self._streams[token] = stream

    def unregister(self, token: str) -> None:
        self._streams.pop(token, None)

    def fail_instance(self, instance_id: int) -> None:
        for stream in list(self._streams.values()):
            if stream.instance_id == instance_id:
                stream._fail(
                    StreamLostError(
                        f"{stream.target}: instance {instance_id:x} left discovery mid-stream "
                        "(its process died or lost its lease)"
                    )
                )

    def _deliver(self, reply: str, frame: bytes, connection: object = None) -> None:
        """A frame from the TCP response plane."""
        prefix, _, token = reply.rpartition(".")
        if prefix != self._prefix:  # meant for another process (a stale or misrouted peer)
            log.debug("dropped a response frame for %s: not one of this process's calls", reply)
            return
        stream = self._streams.get(token)
        if stream is not None:
            stream.connection = connection
            stream._on_frame(frame)

    def _connection_lost(self, connection: object) -> None:
        """A callee's connection dropped: its process is gone, so its open streams fail now
        rather than after the watchdog's silence timeout."""
        failed = set()
        for stream in list(self._streams.values()):
            if stream.connection is connection:
                failed.add(stream.instance_id)
                stream._fail(
                    StreamLostError(
                        f"{stream.target}: the connection from instance {stream.instance_id:x} "
                        "closed mid-stream (its process died or shut down)"
                    )
                )
        for instance_id in failed:
            self._instance_failed(instance_id, "its connection closed mid-stream")

    async def _on_frame(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[1]
        stream = self._streams.get(token)
        if stream is None:
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            stream._fail(
                NoInstancesError(f"{stream.target}: no instance is listening (NATS no responders)")
            )
            self._instance_failed(stream.instance_id, "NATS has no responder for it")
            return
        stream._on_frame(msg.data)

    async def _watch(self) -> None:
        interval = max(self.stream_timeout / 4.0, 0.05)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in list(self._streams.values()):
                if now - stream.last_frame > self.stream_timeout:
                    who = f"instance {stream.instance_id:x}" if stream.instance_id else "the callee"
                    stream._fail(
                        StreamLostError(
                            f"{stream.target}: no frame from {who} for {self.stream_timeout:.1f} s "
                            "(it died or is unreachable)"
                        )
                    )
                    self._instance_failed(stream.instance_id, "it went silent mid-stream")


class ResponseStream:
    """The answer to one call: iterate it (`async for`) or `await` it for a single answer."""

    def __init__(
        self,
        endpoint: EndpointClient,
        request: Any,
        *,
        mode: str,
        instance_id: int | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._request = request
        self._mode = mode
        self._pinned = instance_id
        self.target = endpoint.target
        self.instance_id: int = 0
        self.request_id = ""  # globally unique: the call's reply subject
        self._token = ""  # this process's key for the call
        self.last_frame = time.monotonic()
        self.connection: object = None  # the TCP connection its frames arrive on, if any
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._started = False
        self._done = False
        self._ended = False  # the callee's END frame arrived: nothing left to cancel
        self._error: BaseException | None = None
        self._decoder = endpoint.response_decoder
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- public API -------------------------------------------------------------------

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        if not self._started:
            await self._start()
        while True:
            if self._items:
                item = self._items.popleft()
                if item is _END:
                    self._finish()
                    raise StopAsyncIteration
                return item
            if self._error is not None:
                self._finish()
                raise self._error
            if self._done:
                raise StopAsyncIteration
            assert self._loop is not None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                await self.aclose()
                raise
            finally:
                self._waiter = None

    async def next_batch(self) -> list[Any]:
        """Every item that has arrived and not been taken yet (waiting for one when there is
        none); [] once the stream ended. A consumer that falls behind takes several items at a
        time instead of one call per item (tokens that arrived in one read, say)."""
        try:
            first = await self.__anext__()
        except StopAsyncIteration:
            return []
        batch = [first]
        items = self._items
        while items and items[0] is not _END:
            batch.append(items.popleft())
        return batch

    def __await__(self) -> Generator[Any, None, Any]:
        return self._single().__await__()

    async def _single(self) -> Any:
        items = [item async for item in self]
        if len(items) != 1:
            raise RemoteError(
                self.target, "ProtocolError", f"expected one answer, got {len(items)}"
            )
        return items[0]

    async def aclose(self) -> None:
        """Stop early: the callee is told to cancel the request (unless it already ended)."""
        if self._started and not self._done:
            self._done = True
            self._endpoint.dispatcher.unregister(self._token)
            if not self._ended:
                with contextlib.suppress(Exception):
                    await self._endpoint.nc.publish(
                        self._endpoint.cancel_subject, cancel_frame(self.request_id)
                    )

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._ended:
            return
        if (
            self._started
            and not self._done
            and self._loop is not None
            and not self._loop.is_closed()
        ):
            self._done = True
            self._endpoint.dispatcher.unregister(self._token)
            ep = self._endpoint
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(
                    _publish_soon,
                    self._loop,
                    ep.nc,
                    ep.cancel_subject,
                    cancel_frame(self.request_id),
                )

    # ---- internals --------------------------------------------------------------------

    async def _start(self) -> None:
        self._started = True
        self._loop = asyncio.get_running_loop()
        ep = self._endpoint
        subject, self.instance_id = await ep._pick_subject(self._mode, self._pinned)
        token, reply = ep.dispatcher.new_call()
        self._token, self.request_id = token, reply
        self.last_frame = time.monotonic()
        ep.dispatcher.register(token, self)
        payload = request_encoder.encode(
            RequestFrame(reply, msgspec.Raw(codec.encode(self._request)), ep.dispatcher.reply_addr)
        )
        try:
            await ep.nc.publish(subject, payload, reply=reply)
        except Exception:
            ep.dispatcher.unregister(token)
            raise

    def _finish(self) -> None:
        self._done = True
        self._endpoint.dispatcher.unregister(self._token)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_frame(self, data: bytes) -> None:
        self.last_frame = time.monotonic()
        try:
            frame = response_decoder.decode(data)
        except msgspec.DecodeError as exc:
            self._fail(RemoteError(self.target, "ProtocolError", f"undecodable frame: {exc}"))
            return
        if not self.instance_id:
            self.instance_id = frame.instance_id
        decode = self._decoder.decode
        try:
            for raw in frame.items:
                self._items.append(decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            self._fail(RemoteError(self.target, "ResponseDecodeError", str(exc)))
            return
        if frame.kind == FrameKind.END:
            self._items.append(_END)
            self._ended = True
            self._endpoint.dispatcher.unregister(self._token)
        elif frame.kind == FrameKind.ERROR:
            err = frame.error
            self._fail(
                RemoteError(self.target, err.type, err.message, err.code)
                if err is not None
                else RemoteError(self.target, "Error", "")
            )
            return
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = error
            self._endpoint.dispatcher.unregister(self._token)
            self._wake()


def _publish_soon(loop: asyncio.AbstractEventLoop, nc: NATS, subject: str, data: bytes) -> None:
    if not nc.is_closed:
        loop.create_task(nc.publish(subject, data))


class EndpointClient:
    """Calls one endpoint of a remote component."""

    def __init__(
        self,
        nc: NATS,
        dispatcher: CallDispatcher,
        watcher: InstanceWatcher,
        *,
        namespace: str,
        component: str,
        endpoint: str,
        response_type: Any = Any,
        wait_for_instances: float = 0.0,
    ) -> None:
        self.nc = nc
        self.dispatcher = dispatcher
        self.watcher = watcher
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.target = f"{namespace}/{component}/{endpoint}"
        self.queue_subject = subject_prefix(namespace, component, endpoint)
        self.cancel_subject = cancel_subject(namespace, component)
        self.response_decoder = codec.decoder_for(response_type)
        self.wait_for_instances = wait_for_instances
        self._rr = itertools.count()

    def __call__(self, request: Any) -> ResponseStream:
        """Call any live instance (NATS queue group balances)."""
        return ResponseStream(self, request, mode="any")

    def round_robin(self, request: Any) -> ResponseStream:
        return ResponseStream(self, request, mode="round_robin")

    def random(self, request: Any) -> ResponseStream:
        return ResponseStream(self, request, mode="random")

    def direct(self, instance_id: int, request: Any) -> ResponseStream:
        return ResponseStream(self, request, mode="direct", instance_id=instance_id)

    def instance_ids(self) -> list[int]:
        """Live instances as discovery knows them now."""
        return sorted(self.watcher.instances)

    async def wait_for_instance_ids(self, timeout: float | None = None) -> list[int]:
        """Wait (up to `timeout`, default the client's wait) until at least one instance is live."""
        await self._live_ids(self.wait_for_instances if timeout is None else timeout)
        return self.instance_ids()

    async def _live_ids(self, wait: float) -> list[int]:
        if self.watcher.ready.is_set() and self.watcher.instances:  # the hot path: no awaits
            return list(self.watcher.instances)
        await asyncio.wait_for(self.watcher.ready.wait(), max(wait, 10.0))
        deadline = time.monotonic() + wait
        while not self.watcher.instances:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoInstancesError(
                    f"no live instance of {self.target}"
                    + (f" after waiting {wait:.1f} s" if wait > 0 else "")
                    + " (is the service running? workers register in etcd once started)"
                )
            await self.watcher.wait_for_change(left)
        return sorted(self.watcher.instances)

    async def _pick_subject(self, mode: str, instance_id: int | None) -> tuple[str, int]:
        """The subject to publish a call to, and the instance it names (0: NATS picks)."""
        ids = await self._live_ids(self.wait_for_instances)
        if mode == "any":
            return self.queue_subject, 0
        if mode == "direct":
            assert instance_id is not None
            if instance_id not in self.watcher.instances:
                raise InstanceNotFoundError(
                    f"{self.target}: instance {instance_id:x} is not live "
                    f"(live: {', '.join(f'{i:x}' for i in ids)})"
                )
            chosen = instance_id
        elif mode == "round_robin":
            ids.sort()
            chosen = ids[next(self._rr) % len(ids)]
        elif mode == "random":
            chosen = random.choice(ids)
        else:
            raise ValueError(f"unknown routing mode {mode!r}")
        return instance_subject(self.namespace, self.component, self.endpoint, chosen), chosen
