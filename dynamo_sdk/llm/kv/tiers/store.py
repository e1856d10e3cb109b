"""The interface of a tier that keeps blocks as bytes: local disk (G3) and shared storage (G4).

A store keeps *records* (``record.encode_record``: header, checksum, payload) under text keys
(``keys.block_key``). It is mechanism only: the tier stack decides what to store and when,
checks every record it reads (``record.decode_record``) and tells the router what moved.

Stores are called from the stack's I/O threads, never from the engine's event loop, so they
may block; they must be safe to call from several threads at once. A failure to reach or use
the storage is a `StoreError`: the stack logs it once, counts it and carries on without that
tier (a request whose load fails is recomputed), so a store never raises anything else.

Adding a storage system (a vendor's object store, a key-value service): subclass `BlockStore`
and register a URI scheme, in code (``register_shared_store("mykv", MyStore.from_uri)``) or by
an entry point in the ``dynamo_sdk.kv_shared_stores`` group of the vendor's own package; then
``shared_kv: mykv://...`` in a worker's YAML selects it. `docs/kv_tiers.md` walks through one.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import ClassVar


class StoreError(Exception):
    """A store could not do what was asked (I/O error, full, unreachable, timed out)."""


class BlockStore(abc.ABC):
    """Block records by key; thread-safe; failures raise `StoreError` only."""

    medium: ClassVar[str]
    """The tier's name in KV events and metrics: ``"DISK"`` or ``"SHARED"``."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the blocks live, for log lines (``disk /var/kv (2.0 GB)``, ``redis://h:6379``)."""

    @abc.abstractmethod
    def put(self, key: str, record: bytes) -> list[str]:
        """Store a record (replacing one under the same key); returns the keys it evicted to
        make room (a store with its own budget), so the router can be told they are gone."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The record under ``key``, or None if it is not there."""

    def get_into(self, key: str, head: bytearray, body: memoryview) -> int | None:
        """Read the record under ``key`` into ``head`` (its first ``len(head)`` bytes) and
        ``body`` (the rest); returns the record's size in storage (more or less than the two
        buffers hold: the caller's checks reject it), or None if it is not there.

        The default goes through `get`; a file-backed store reads straight into the buffers
        (a load then lands in the host tier's memory with no copy in between)."""
        data = self.get(key)
        if data is None:
            return None
        view = memoryview(data)
        n = min(len(head), len(view))
        head[:n] = view[:n]
        m = min(len(body), len(view) - n)
        body[:m] = view[n : n + m]
        return len(view)

    @abc.abstractmethod
    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` are stored (one round trip for a remote store)."""

    @abc.abstractmethod
    def discard(self, key: str) -> None:
        """Remove a record (one that failed its checks); absent keys are ignored."""

    def keys(self) -> Iterable[str]:
        """The keys stored now, where the store can list them cheaply (a local disk, to
        re-announce its blocks after a restart); a shared store may return nothing."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional to override
        """Release connections and files (the default has nothing to release)."""
