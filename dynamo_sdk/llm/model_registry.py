"""Served models in etcd: workers announce them, Frontends and Processors watch.

`models/{name}:{instance_hex}` → `ModelEntry` JSON, bound to the worker's lease: a model
appears with its first worker and disappears when its last one is gone (cleanly or not).

A model is *live* (listed, routable) only while one of its entries' instances is registered
and not draining on its endpoint: a worker announces its model while it starts, before its
endpoint is registered, and a request sent in between would find no one to serve it.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from dynamo_sdk.llm.protocol import ModelEntry
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.discovery import InstanceWatcher, PrefixWatcher

MODEL_ROOT = "models/"
_decoder = msgspec.json.Decoder(ModelEntry)


async def register_model(runtime: DistributedRuntime, entry: ModelEntry) -> None:
    key = f"{MODEL_ROOT}{entry.name}:{runtime.instance_id:x}"
    await runtime.put_leased(key, msgspec.json.encode(entry))


class LiveModels:
    """The models a request can be served for right now, and what their workers announced.

    ``through``: the instances of a hop every request takes first (a Processor service): a
    model is live only while that hop has a live instance too.
    """

    def __init__(self, runtime: DistributedRuntime, through: InstanceWatcher | None = None) -> None:
        self.runtime = runtime
        self.through = through
        self._watcher: PrefixWatcher = runtime.watch_prefix(MODEL_ROOT)
        self._seen: set[str] = set()  # names ever live here (a restart's gap is waited out)
        self._decoded: dict[str, tuple[bytes, int, ModelEntry | None]] = {}  # key -> last value

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._watcher.ready.wait(), timeout)

    def _entries(self) -> list[tuple[int, ModelEntry]]:
        """(instance id, entry) of every announcement; each value is decoded once."""
        out = []
        values = self._watcher.values
        for key in [k for k in self._decoded if k not in values]:
            del self._decoded[key]
        for key, value in values.items():
            cached = self._decoded.get(key)
            if cached is None or cached[0] is not value:
                try:
                    entry: ModelEntry | None = _decoder.decode(value)
                    instance = int(key.rsplit(":", 1)[1], 16)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError, IndexError):
                    entry, instance = None, 0
                cached = self._decoded[key] = (value, instance, entry)
            if cached[2] is not None:
                out.append((cached[1], cached[2]))
        return out

    def announced(self) -> list[ModelEntry]:
        """Every entry in etcd, live or not yet (a worker announces its model as it starts,
        so what the model needs elsewhere, a tokenizer, can be loaded meanwhile)."""
        return [entry for _, entry in self._entries()]

    async def wait_for_change(self, timeout: float) -> None:
        """Until an announcement comes or goes (or ``timeout`` passes)."""
        await self._watcher.wait_for_change(timeout)

    def entries(self, name: str | None = None) -> list[ModelEntry]:
        """Live entries (of model ``name``): their instance is routable on their endpoint."""
        if self.through is not None and not self.through.instances:
            return []
        live = []
        for instance, entry in self._entries():
            if name is not None and entry.name != name:
                continue
            workers = self.runtime.watcher(entry.namespace, entry.component, entry.endpoint)
            if instance in workers.instances:
                live.append(entry)
        self._seen.update(e.name for e in live)
        return live

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def context_length(self, name: str) -> int | None:
        """The smallest context any live worker of `name` accepts (requests must fit all)."""
        lengths = [e.context_length for e in self.entries(name)]
        return min(lengths) if lengths else None

    def summary(self) -> str:
        """What is served, for the ready line: "model a, 2 workers; model b, 1 worker"."""
        counts: dict[str, int] = {}
        for entry in self.entries():
            counts[entry.name] = counts.get(entry.name, 0) + 1
        return "; ".join(
            f"model {name}, {n} worker{'s' if n != 1 else ''}" for name, n in sorted(counts.items())
        )

    async def wait_for(self, name: str, timeout: float) -> bool:
        """Whether ``name`` is (or within ``timeout`` becomes) live, for a request that came in
        a gap: while nothing is live yet (the graph is starting) or while a model seen live
        before has no worker (one restarts). A name never seen while others are live is not
        waited for: it is a typo or another deployment's."""
        deadline = time.monotonic() + timeout
        while True:
            if self.entries(name):
                return True
            waiting = name in self._seen or not self.entries()
            if not waiting or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
