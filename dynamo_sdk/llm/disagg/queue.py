"""The prefill queue: a NATS JetStream work-queue stream.

Work-queue retention hands each message to exactly one consumer of the shared durable pull
consumer and deletes it once acknowledged. A prefill worker acknowledges a request only after
its KV was sent (or the failure reported), so a request held by a worker that dies is
delivered again to another one after ``ack_wait``.
"""

from __future__ import annotations

import contextlib
import re

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType
from nats.js.errors import BadRequestError, NotFoundError

from dynamo_sdk.llm.disagg.protocol import RemotePrefillRequest

_DURABLE = "prefill-workers"


class PrefillQueue:
    def __init__(self, nc: NATS, namespace: str, ack_wait: float = 30.0) -> None:
        self.js = nc.jetstream()
        self.stream = re.sub(r"[^A-Za-z0-9_-]", "_", f"{namespace}-prefill")
        self.subject = f"dyn.{namespace}.prefill_queue"
        self.ack_wait = ack_wait
        self._sub: object | None = None

    async def ensure(self) -> None:
        """Create the stream if it does not exist (any worker may be first)."""
        try:
            await self.js.stream_info(self.stream)
        except NotFoundError:
            try:
                await self.js.add_stream(
                    name=self.stream,
                    subjects=[self.subject],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                )
            except BadRequestError:  # created meanwhile by another worker
                await self.js.stream_info(self.stream)

    async def close(self) -> None:
        """Drop this process's pull subscription (else draining the connection waits on it)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def put(self, request: RemotePrefillRequest) -> None:
        await self.js.publish(self.subject, msgspec.msgpack.encode(request), stream=self.stream)

    async def depth(self) -> int:
        """Requests queued and not yet acknowledged."""
        info = await self.js.stream_info(self.stream)
        return int(info.state.messages)

    async def pull(self, batch: int, timeout: float) -> list[tuple[Msg, RemotePrefillRequest]]:
        """Up to ``batch`` requests (an empty list after ``timeout`` seconds without one)."""
        if self._sub is None:
            self._sub = await self.js.pull_subscribe(
                self.subject,
                durable=_DURABLE,
                stream=self.stream,
                config=ConsumerConfig(ack_wait=self.ack_wait, max_deliver=3),
            )
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)  # type: ignore[attr-defined]
        except TimeoutError:
            return []
        out = []
        for msg in msgs:
            try:
                out.append((msg, msgspec.msgpack.decode(msg.data, type=RemotePrefillRequest)))
            except msgspec.DecodeError:
                await msg.term()  # a malformed request never becomes valid: drop it for good
        return out
