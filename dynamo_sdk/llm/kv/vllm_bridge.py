"""Bridge vLLM's own KV event publisher (ZMQ) to the project's KV events on NATS.

vLLM emits `BlockStored` / `BlockRemoved` / `AllBlocksCleared` from its block pool when
`kv_events_config` enables the ZMQ publisher; that works in the CPU build too. The Worker
points vLLM at a free loopback port, and this bridge subscribes there and hands converted
events to the worker's `KvPublisher`. The bridge binds the loopback port and vLLM connects to
it, so nothing listens beyond this host. vLLM must hash blocks with `sha256_cbor` for the
router's hashes to match (see `dynamo_sdk.llm.kv.hashing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_sdk.llm.kv.events import KvEvent, from_vllm

log = logging.getLogger(__name__)


def vllm_kv_event_args(port: int) -> dict[str, Any]:
    """Engine arguments that make vLLM publish its KV events on tcp://127.0.0.1:port."""
    from vllm.config import KVEventsConfig

    return {
        "enable_prefix_caching": True,
        "prefix_caching_hash_algo": "sha256_cbor",
        "kv_events_config": KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://127.0.0.1:{port}"
        ),
    }


class VllmKvEventBridge:
    """Subscribes to vLLM's ZMQ publisher and forwards our events to `on_events`."""

    def __init__(self, port: int, on_events: Callable[[list[KvEvent]], None]) -> None:
        self.port = port  # 0: a free loopback port, known once started
        self.on_events = on_events
        self._task: asyncio.Task[None] | None = None
        self.received = 0

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        # We bind (loopback only) and vLLM's publisher connects: it connects whenever its
        # endpoint names a host rather than a wildcard. Start the bridge before the engine.
        self._sock.bind(f"tcp://127.0.0.1:{self.port or '*'}")
        endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(endpoint.rsplit(":", 1)[1])
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            parts = await self._sock.recv_multipart()
            try:
                _ts, raw_events, *_ = msgspec.msgpack.decode(parts[-1])
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("undecodable vLLM KV event message: %s", exc)
                continue
            events = [e for e in (from_vllm(raw) for raw in raw_events) if e is not None]
            self.received += len(events)
            if events:
                self.on_events(events)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            self._sock.close(0)
            self._ctx.term()
