"""The KV tiers of `engine: vllm`: vLLM's OffloadingConnector with the project's spec and stores.

vLLM 0.32's `OffloadingConnector` moves KV blocks between the device and an `OffloadingSpec`'s
tiers: a CPU primary tier (host memory, G2) that alone touches the device, and "secondary
tiers" (`SecondaryTierManager`s in vLLM's scheduler process) that copy chunks between that
host memory and storage. This module is that spec, named in the connector's extra config by
`vllm_engine.offload_transfer_config` (`spec_name`/`spec_module_path`, `secondary_tiers`):

* `DynamoOffloadingSpec`: vLLM's `TieringOffloadingSpec` (host memory in a shared-memory region
  the scheduler and the model worker both map), sized in blocks (``host_kv_blocks``) as well as
  bytes, with a model-worker side that also runs on vLLM's CPU platform: vLLM's own worker
  copies with CUDA/XPU kernels and refuses every other device, so there this spec copies
  with plain torch indexing (`TorchCopyWorker`). On CUDA and XPU vLLM's worker is used as is.
* `DiskTier` (G3): our `DiskStore` in a `ClaimedFolder` of ``disk_kv_path``, behind our
  `AdmissionFilter`; lookups answer from its in-memory index.
* `SharedTier` (G4): `open_shared_store(shared_kv)` (a shared folder, Redis, a vendor's store);
  lookups are a round trip, so they run on vLLM's `AsyncLookupManager` thread (the scheduler
  retries a block until its answer is in).

Both store our self-checking records (`record.encode_record`) under `block_key` keys whose
namespace is this engine's `LayoutIdentity`, so a torn, flipped or foreign file is counted,
deleted and recomputed, never loaded, and the torch engine's blocks never mix with vLLM's. A
store that fails is switched off with one log line; its blocks are recomputed from then on.
Reads and writes run on each tier's I/O threads: vLLM calls tiers on its scheduler thread and
wants every call there to return at once.

Every store and eviction is announced as vLLM `OffloadingEvent`s (medium ``STORAGE``, locality
``LOCAL`` for disk, ``REMOTE`` for shared), which the connector turns into KV events on vLLM's
publisher; `kv.events.from_vllm` maps them to ``DISK`` and ``SHARED``.

Imported only in vLLM's processes (vLLM imports it by name); it imports vLLM and torch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    Locality,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingWorker,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from dynamo_sdk.llm.kv.tiers.disk import AdmissionFilter, ClaimedFolder, DiskStore
from dynamo_sdk.llm.kv.tiers.keys import LayoutIdentity, block_key, split_key
from dynamo_sdk.llm.kv.tiers.record import (
    HEADER_BYTES,
    CorruptBlockError,
    decode_record,
    encode_record,
)
from dynamo_sdk.llm.kv.tiers.shared import open_shared_store
from dynamo_sdk.llm.kv.tiers.store import BlockStore, StoreError

log = logging.getLogger(__name__)

_GROUP0 = (0).to_bytes(4, "big")


class DynamoOffloadingSpec(TieringOffloadingSpec):
    """vLLM's tiering spec, sized in blocks too, whose model-worker side also runs on CPU.

    Extra config (besides vLLM's): ``host_kv_blocks`` (host slots; overrides the size from
    ``cpu_bytes_to_use``). Chunks are one device block each (vLLM's default when no
    ``block_size`` is given), so a chunk's key is a block's hash, as in our other engines.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        blocks = int(self.extra_config.get("host_kv_blocks") or 0)
        if blocks:
            self.num_chunks = blocks

    def identity(self) -> LayoutIdentity:
        """What must match for another engine's stored blocks to be this one's KV.

        vLLM does not give the spec its head count or head size; the bytes of a block per
        worker (with the model, the layer count and the layout's name) pin them down.
        """
        config = self.config
        layers = sum(len(group.layer_names) for group in config.groups)
        return LayoutIdentity(
            model=f"{config.model.name} (vllm {config.kv_cache_layout or 'default'} layout, "
            f"{config.worker_kv_bytes_per_block} bytes per block per worker)",
            dtype=str(config.model.dtype).removeprefix("torch."),
            block_size=int(self.tokens_per_block[0]) * int(self.blocks_per_chunk),
            num_layers=layers,
            num_kv_heads=0,
            head_dim=0,
            tp_size=int(config.parallel.world_size),
        )

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            return super().get_worker(kv_caches)  # vLLM's kernels and pinned memory
        if self._worker is None:
            rank = 0 if self.replicated_layout else self.config.parallel.rank
            region = SharedOffloadRegion(
                engine_id=self._engine_id,
                num_chunks=self.num_chunks,
                rank=rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
            )
            self._worker = TorchCopyWorker(kv_caches, region, self.blocks_per_chunk)  # type: ignore[assignment]
        return self._worker  # type: ignore[return-value]


class TorchCopyWorker(OffloadingWorker):
    """Copies blocks between the device cache and the host region with torch indexing.

    Synchronous: on the CPU platform there is no copy engine to overlap with, and a copy done
    when `submit_*` returns is trivially ordered with the steps around it. One KV cache group
    and one block per chunk only (what vLLM's CPU platform runs for dense models).
    """

    def __init__(
        self, kv_caches: CanonicalKVCaches, region: SharedOffloadRegion, blocks_per_chunk: int
    ) -> None:
        if blocks_per_chunk != 1 or len(kv_caches.group_data_refs) != 1:
            raise ValueError(
                "the KV host tier on vLLM's CPU platform needs one KV cache group and "
                f"host chunks of one block (got {len(kv_caches.group_data_refs)} groups, "
                f"{blocks_per_chunk} blocks per chunk)"
            )
        self._region = region  # owns the mapping the host views point into
        self._device = [
            t.tensor.view(torch.int8).view(-1, t.page_size_bytes) for t in kv_caches.tensors
        ]
        self._host = [region.create_next_worker_view(t.page_size_bytes) for t in kv_caches.tensors]
        self._done: list[TransferResult] = []

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        return self._copy(job_id, self._device, src_spec, self._host, dst_spec)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._copy(job_id, self._host, src_spec, self._device, dst_spec)

    def _copy(
        self,
        job_id: int,
        src: list[torch.Tensor],
        src_spec: LoadStoreSpec,
        dst: list[torch.Tensor],
        dst_spec: LoadStoreSpec,
    ) -> bool:
        assert isinstance(src_spec, (GPULoadStoreSpec, CPULoadStoreSpec))
        assert isinstance(dst_spec, (GPULoadStoreSpec, CPULoadStoreSpec))
        started = time.perf_counter()
        rows_from = torch.from_numpy(src_spec.block_ids).long()
        rows_to = torch.from_numpy(dst_spec.block_ids).long()
        if len(rows_from) != len(rows_to):
            raise ValueError(f"copy of {len(rows_from)} blocks into {len(rows_to)}")
        for s, d in zip(src, dst, strict=True):
            d[rows_to] = s[rows_from]
        size = len(rows_from) * sum(t.shape[1] for t in src)
        # size and time: vLLM's transfer metrics (and the worker's tier stats) count them
        self._done.append(TransferResult(job_id, True, size, time.perf_counter() - started))
        return True

    def get_finished(self) -> list[TransferResult]:
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return None  # every copy finished inside its submit call

    def shutdown(self) -> None:
        self._host.clear()
        self._region.cleanup()  # unmaps; removes the /dev/shm file if this side created it


def _digest(key: OffloadKey) -> bytes:
    """The 32 bytes our records and keys name a chunk by: vLLM's block hash itself (sha256
    hashes, group 0: so a restarted engine can announce what its disk holds), or a digest."""
    if len(key) == 36 and key[32:] == _GROUP0:
        return bytes(key[:32])
    return hashlib.sha256(key).digest()


class _StoreTier(SecondaryTierManager):
    """A vLLM secondary tier over one of our `BlockStore`s (the parts disk and shared share).

    ``primary_kv_view`` is vLLM's host region, one row per chunk; a record's payload is a
    whole row. Jobs run on ``io_threads`` threads; their results are collected by
    `get_finished_jobs` (vLLM polls it every step).
    """

    store: BlockStore | None = None
    label: ClassVar[str] = ""

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        io_threads: int = 2,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        assert isinstance(offloading_spec, DynamoOffloadingSpec)
        self._rows = np.asarray(primary_kv_view)  # (chunks, row bytes) int8, shared memory
        self._namespace = offloading_spec.identity().namespace()
        self._events: list[OffloadingEvent] | None = (
            [] if offloading_spec.kv_events_config.enable_kv_cache_events else None
        )
        self._events_lock = threading.Lock()
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix=f"kv-{tier_type}")
        self._jobs: list[tuple[int, Future[JobResult]]] = []
        self._load_keys: dict[int, list[OffloadKey]] = {}  # of the loads in flight
        self._suspect: set[str] = set()  # stored blocks a failed load did not deliver
        # our key -> vLLM's, to name evicted blocks in events (only this run's can be named)
        self._offload_keys: dict[str, OffloadKey] = {}
        self.corrupt_blocks = 0
        self.errors = 0

    @property
    def record_bytes(self) -> int:
        return self.block_size_bytes + HEADER_BYTES

    def key_of(self, key: OffloadKey) -> str:
        return block_key(self._namespace, _digest(key))

    def available(self) -> bool:
        return self.store is not None

    def _fail(self, exc: Exception) -> None:
        """Switch the tier off after a store failure (one log line); its blocks are
        recomputed from then on."""
        self.errors += 1
        if self.store is not None:
            log.error("KV %s tier off: %s", self.label, exc)
            self.store = None

    def _announce(self, keys: list[OffloadKey], removed: bool) -> None:
        if self._events is None or not keys:
            return
        event = OffloadingEvent(keys, self.medium or Medium.STORAGE, removed, self.locality)
        with self._events_lock:
            self._events.append(event)

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events is None:
            return ()
        with self._events_lock:
            events, self._events = self._events, []
        return events

    # -- transfers ---------------------------------------------------------------------------

    def admit(self, key: OffloadKey) -> bool:
        """Whether a block offered for storing is written (the disk tier filters)."""
        return True

    def submit_store(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        chunks = [int(c) for c in job_metadata.chunk_ids]
        wanted = [(k, c) for k, c in zip(keys, chunks, strict=True) if self.admit(k)]
        self._submit(job_metadata.job_id, lambda: self._store_all(job_metadata.job_id, wanted))

    def _store_all(self, job_id: int, items: list[tuple[OffloadKey, int]]) -> JobResult:
        store = self.store
        stored: list[OffloadKey] = []
        evicted: list[OffloadKey] = []
        try:
            if store is not None:
                for offload_key, chunk in items:
                    key = self.key_of(offload_key)
                    if key not in self._suspect and store.contains([key])[0]:
                        continue  # there already (a copy another engine or run stored)
                    self._suspect.discard(key)
                    record = encode_record(
                        self._namespace, _digest(offload_key), self._rows[chunk].tobytes()
                    )
                    self._offload_keys[key] = offload_key
                    for gone in store.put(key, record):
                        vllm_key = self._offload_keys.pop(gone, None)
                        if vllm_key is not None:
                            evicted.append(vllm_key)
                    stored.append(offload_key)
        except StoreError as exc:
            self._fail(exc)
        self._announce(evicted, removed=True)
        self._announce(stored, removed=False)
        # A store that did not happen is no failure for vLLM: the block stays in host memory.
        return JobResult(job_id, True, transfer_bytes=len(stored) * self.block_size_bytes)

    def submit_load(self, job_metadata: TransferJob) -> None:
        items = list(zip(job_metadata.keys, (int(c) for c in job_metadata.chunk_ids), strict=True))
        self._load_keys[job_metadata.job_id] = [k for k, _ in items]
        self._submit(job_metadata.job_id, lambda: self._load_all(job_metadata.job_id, items))

    def _load_all(self, job_id: int, items: list[tuple[OffloadKey, int]]) -> JobResult:
        """Read, check and copy each block into its host row; stops at the first one that is
        missing or bad (vLLM keeps the blocks before it)."""
        loaded: list[OffloadKey] = []
        store = self.store
        for offload_key, chunk in items:
            key = self.key_of(offload_key)
            try:
                data = store.get(key) if store is not None else None
                if data is None:
                    break
                payload = decode_record(data, self._namespace, _digest(offload_key))
                if len(payload) != self.block_size_bytes:
                    raise CorruptBlockError(f"{len(payload)}-byte block, expected another size")
            except CorruptBlockError as exc:
                log.warning("KV %s tier: %s: %s; deleted, recomputed", self.label, key, exc)
                self.corrupt_blocks += 1
                self._discard(store, key, offload_key)
                break
            except StoreError as exc:
                self._fail(exc)
                break
            self._rows[chunk] = np.frombuffer(payload, dtype=np.int8)
            loaded.append(offload_key)
        return JobResult(
            job_id,
            len(loaded) == len(items),
            successful_keys=tuple(loaded) if len(loaded) < len(items) else None,
            transfer_bytes=len(loaded) * self.block_size_bytes,
        )

    def _discard(self, store: BlockStore | None, key: str, offload_key: OffloadKey) -> None:
        try:
            if store is not None:
                store.discard(key)
        except StoreError as exc:
            self._fail(exc)
        self._offload_keys.pop(key, None)
        self._announce([offload_key], removed=True)

    def on_load_failed(self, keys: list[OffloadKey]) -> None:
        """Called on the scheduler thread with the blocks a load could not deliver."""

    def _submit(self, job_id: int, work: Callable[[], JobResult]) -> None:
        self._jobs.append((job_id, self._io.submit(work)))

    def get_finished_jobs(self) -> Iterable[JobResult]:
        finished: list[JobResult] = []
        pending: list[tuple[int, Future[JobResult]]] = []
        for job_id, future in self._jobs:
            if not future.done():
                pending.append((job_id, future))
                continue
            try:
                result = future.result()
            except Exception:  # a bug, not a store failure: fail the job, keep serving
                log.exception("KV %s tier: job %d failed", self.label, job_id)
                result = JobResult(job_id, False)
            keys = self._load_keys.pop(job_id, None)
            if keys is not None and not result.success:
                kept = set(result.successful_keys or ())
                failed = [k for k in keys if k not in kept]
                # unread after the bad one, maybe bad too: rewritten when they come back
                self._suspect.update(self.key_of(k) for k in failed)
                self.on_load_failed(failed)
            finished.append(result)
        self._jobs = pending
        return finished

    def has_pending_work(self) -> bool:
        return bool(self._jobs)

    def drain_jobs(self) -> None:
        for _, future in list(self._jobs):
            future.exception()  # waits; the result is collected by get_finished_jobs

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def shutdown(self) -> None:
        self._io.shutdown(wait=True)  # let writes in flight finish: a restart finds them
        self._rows = np.empty((0, 0), np.int8)  # let vLLM unmap its host region
        if self.store is not None:
            self.store.close()


class DiskTier(_StoreTier):
    """G3: our `DiskStore` in this worker's own sub-folder of ``path`` (`ClaimedFolder`).

    ``blocks`` or ``gb`` set the budget; a block is written once it was offered ``admission``
    times (an offer: a store from the host, or a hit in it). At start the blocks already in
    the folder (an earlier run's) are announced, so the router sends their prompts here.
    """

    medium: ClassVar[Medium] = Medium.STORAGE
    label = "disk"

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        path: str,
        blocks: int = 0,
        gb: float = 0.0,
        admission: int = 2,
        backpressure_detector: Any = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality.LOCAL
        self._admission = AdmissionFilter(admission)
        budget = blocks * self.record_bytes if blocks else int(gb * 1e9)
        try:
            self._folder: ClaimedFolder | None = ClaimedFolder(path)
            self.store = DiskStore(self._folder.path, budget)
        except (StoreError, ValueError) as exc:
            log.error("KV disk tier off: %s", exc)
            self._folder = None
            return
        log.info("KV disk tier: %s, %d blocks there", self.store.description, self.store.num_blocks)
        namespace = self._namespace
        known = []
        for key in self.store.keys():
            ns, digest = split_key(key)
            if ns == namespace:  # an earlier run's block of this layout, named by its hash
                self._offload_keys[key] = OffloadKey(digest + _GROUP0)
                known.append(self._offload_keys[key])
        self._announce(known, removed=False)

    def admit(self, key: OffloadKey) -> bool:
        return self._admission.admit(self.key_of(key))

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:  # a hit is an offer (vLLM touches every tier on a hit)
            self._admission.admit(self.key_of(key))

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        store = self.store
        found = store is not None and store.contains([self.key_of(key)])[0]
        return LookupResult.HIT if found else LookupResult.MISS

    def shutdown(self) -> None:
        super().shutdown()
        if self._folder is not None:
            self._folder.release()


class _SharedLookups(AsyncLookupManager):
    """Asks the shared store about a step's blocks in one round trip, off the scheduler."""

    def __init__(self, tier: SharedTier) -> None:
        super().__init__(tier_type=tier.tier_type)
        self._tier = tier

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        store = self._tier.store
        if store is None:
            return [False] * len(keys)
        try:
            return store.contains([self._tier.key_of(k) for k in keys])
        except StoreError as exc:
            self._tier._fail(exc)
            return [False] * len(keys)


class SharedTier(_StoreTier):
    """G4: `open_shared_store(uri)`; every worker of the same model and layout finds what
    another stored. Its hits are reported as vLLM's "external" cache-hit source."""

    medium: ClassVar[Medium] = Medium.STORAGE
    cache_hit_source: ClassVar[CacheHitSource] = CacheHitSource.EXTERNAL_UNSPECIFIED
    label = "shared"

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        uri: str,
        backpressure_detector: Any = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality.REMOTE
        try:
            self.store = open_shared_store(uri)
            log.info("KV shared tier: %s", self.store.description)
        except (StoreError, ValueError, ImportError) as exc:
            log.error("KV shared tier off: %s", exc)
        self._lookups = _SharedLookups(self)

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if self.store is None:
            return LookupResult.MISS
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def on_load_failed(self, keys: list[OffloadKey]) -> None:
        self._lookups.mark_miss(keys)  # its cached "found" answers are wrong now

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def shutdown(self) -> None:
        self._lookups.shutdown()
        super().shutdown()
