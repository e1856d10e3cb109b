"""Served models in etcd: workers announce them, Frontends and Processors watch.

`models/{name}:{instance_hex}` → `ModelEntry` JSON, bound to the worker's lease: a model
appears with its first live worker and disappears when its last one is gone (cleanly or not).
"""

from __future__ import annotations

import asyncio

import msgspec

from dynamo_sdk.llm.protocol import ModelEntry
from dynamo_sdk.runtime import DistributedRuntime
from dynamo_sdk.runtime.discovery import PrefixWatcher

MODEL_ROOT = "models/"
_decoder = msgspec.json.Decoder(ModelEntry)


async def register_model(runtime: DistributedRuntime, entry: ModelEntry) -> None:
    key = f"{MODEL_ROOT}{entry.name}:{runtime.instance_id:x}"
    await runtime.put_leased(key, msgspec.json.encode(entry))


class ModelWatcher:
    """The models live workers serve right now."""

    def __init__(self, runtime: DistributedRuntime) -> None:
        self._watcher: PrefixWatcher = runtime.watch_prefix(MODEL_ROOT)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._watcher.ready.wait(), timeout)

    def entries(self) -> list[ModelEntry]:
        out = []
        for value in self._watcher.values.values():
            try:
                out.append(_decoder.decode(value))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        return out

    def model_names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def summary(self) -> str:
        """What is served, for the ready line: "model a, 2 workers; model b, 1 worker"."""
        counts: dict[str, int] = {}
        for entry in self.entries():
            counts[entry.name] = counts.get(entry.name, 0) + 1
        return "; ".join(
            f"model {name}, {n} worker{'s' if n != 1 else ''}" for name, n in sorted(counts.items())
        )

    def context_length(self, name: str) -> int | None:
        """The smallest context any live worker of `name` accepts (requests must fit all)."""
        lengths = [e.context_length for e in self.entries() if e.name == name]
        return min(lengths) if lengths else None
