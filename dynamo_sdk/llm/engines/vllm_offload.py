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
wants every call there to return at once. A load still running ``load_timeout_s``
(``kv_load_timeout_s``) after it was submitted is reported failed, and vLLM recomputes what it
had not delivered: vLLM itself would wait for it forever.

Each tier counts what the torch engine's tiers count (`KvTierStats`: blocks and bytes written
and loaded, loads and their time, evictions, corrupt records, errors, used and capacity
blocks) and hands the counts to vLLM as connector stats (`get_stats`, polled every step on
the scheduler thread), which vLLM sends to the front end with its scheduler stats; there
`vllm_engine.add_tier_stats` adds them up.

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
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadingMetricMetadata,
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

from dynamo_sdk.llm.engines.vllm_engine import TIER_COUNTERS, TIER_GAUGES, tier_metric
from dynamo_sdk.llm.kv.events import MEDIUM_DISK, MEDIUM_SHARED
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


class _LoadJob:
    """One load in flight: its blocks, its request, and how far its I/O thread got.

    A load that outlives the timeout is abandoned on the scheduler thread while its I/O
    thread may still be reading. Its host rows go back to vLLM at once (which may hand them
    to other blocks), so the thread copies a block into its row only under ``lock`` and only
    while the job is not ``abandoned``: once `_StoreTier._abandon` has set that, nothing
    writes into those rows any more, and ``loaded`` (what was delivered) no longer changes.
    """

    __slots__ = ("abandoned", "items", "job_id", "loaded", "lock", "req_id", "started")

    def __init__(self, job_id: int, req_id: str, items: list[tuple[OffloadKey, int]]) -> None:
        self.job_id = job_id
        self.req_id = req_id
        self.items = items  # (vLLM's key, host row), in the prompt's order
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.loaded: list[OffloadKey] = []
        self.abandoned = False


class _StoreTier(SecondaryTierManager):
    """A vLLM secondary tier over one of our `BlockStore`s (the parts disk and shared share).

    ``primary_kv_view`` is vLLM's host region, one row per chunk; a record's payload is a
    whole row. Jobs run on ``io_threads`` threads; their results are collected by
    `get_finished_jobs` (vLLM polls it every step), which also fails a load that has run for
    ``load_timeout_s``.
    """

    store: BlockStore | None = None
    label: ClassVar[str] = ""
    stats_medium: ClassVar[str] = ""  # the `KvTierStats` medium this tier reports as

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        io_threads: int = 2,
        load_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        assert isinstance(offloading_spec, DynamoOffloadingSpec)
        if load_timeout_s <= 0:
            raise ValueError(f"load_timeout_s must be positive, got {load_timeout_s}")
        self._load_timeout_s = float(load_timeout_s)
        self._rows = np.asarray(primary_kv_view)  # (chunks, row bytes) int8, shared memory
        self._namespace = offloading_spec.identity().namespace()
        self._events: list[OffloadingEvent] | None = (
            [] if offloading_spec.kv_events_config.enable_kv_cache_events else None
        )
        self._events_lock = threading.Lock()
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix=f"kv-{tier_type}")
        # Scheduler-thread state: the jobs in flight, the loads among them, and per request
        # the blocks a load of it failed to deliver (answered as misses for that request, so
        # vLLM recomputes them instead of loading them again, and again).
        self._jobs: list[tuple[int, Future[JobResult]]] = []
        self._loads: dict[int, _LoadJob] = {}
        self._given_up: dict[str, set[OffloadKey]] = {}
        self._suspect: set[str] = set()  # stored blocks a failed load did not deliver
        # our key -> vLLM's, to name evicted blocks in events (only this run's can be named)
        self._offload_keys: dict[str, OffloadKey] = {}
        # Counts since the last `get_stats` (I/O, lookup and scheduler threads add to them),
        # and the gauges it last reported (sent again only when they change).
        self._stats_lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._sent_gauges: dict[str, float] = {}

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
        self._count(errors=1)
        if self.store is not None:
            log.error("KV %s tier off: %s", self.label, exc)
            self.store = None

    # -- stats -------------------------------------------------------------------------------

    def _count(self, **deltas: float) -> None:
        """Add to this tier's counts (any thread)."""
        with self._stats_lock:
            for field, delta in deltas.items():
                self._counts[field] = self._counts.get(field, 0) + delta

    def gauges(self) -> dict[str, float]:
        """The tier's usage now (`TIER_GAUGES` fields); a subclass adds what it knows."""
        return {"enabled": 1.0 if self.store is not None else 0.0}

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        """What `get_stats` reports, for vLLM's Prometheus logger (which refuses metrics it
        was not told of): `TIER_COUNTERS` and `TIER_GAUGES`, labelled by the tier's medium."""
        labels = ("tier",)
        metrics: dict[str, OffloadingMetricMetadata] = {
            tier_metric(name): OffloadingCounterMetadata(documentation=text, labelnames=labels)
            for name, text in TIER_COUNTERS
        }
        for name, text in TIER_GAUGES:
            metrics[tier_metric(name)] = OffloadingGaugeMetadata(
                documentation=text, labelnames=labels
            )
        return metrics

    def get_stats(self) -> OffloadingConnectorStats | None:
        """The counts since the last call and the gauges that changed (None: neither).

        vLLM calls this every step on the scheduler thread and sends what it returns with
        that step's scheduler stats to the front end, where the engine adds it up: the path
        vLLM's own offloading metrics take out of this process."""
        with self._stats_lock:
            counts, self._counts = self._counts, {}
        gauges = {k: v for k, v in self.gauges().items() if self._sent_gauges.get(k) != v}
        if not counts and not gauges:
            return None
        stats = OffloadingConnectorStats()
        labels = (self.stats_medium,)
        for field, value in counts.items():
            stats.increase_counter(tier_metric(field), value, labels)
        for field, value in gauges.items():
            stats.set_gauge(tier_metric(field), value, labels)
        self._sent_gauges.update(gauges)
        return stats

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
        started = time.perf_counter()
        store = self.store
        stored: list[OffloadKey] = []
        evicted: list[OffloadKey] = []
        num_evicted = 0  # all the store evicted (``evicted``: those this run can name)
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
                    gone = store.put(key, record)
                    num_evicted += len(gone)
                    for evicted_key in gone:
                        vllm_key = self._offload_keys.pop(evicted_key, None)
                        if vllm_key is not None:
                            evicted.append(vllm_key)
                    stored.append(offload_key)
        except StoreError as exc:
            self._fail(exc)
        nbytes = len(stored) * self.block_size_bytes
        self._count(offload_blocks=len(stored), offload_bytes=nbytes, evicted_blocks=num_evicted)
        self._announce(evicted, removed=True)
        self._announce(stored, removed=False)
        # A store that did not happen is no failure for vLLM: the block stays in host memory.
        return JobResult(
            job_id, True, transfer_time=time.perf_counter() - started, transfer_bytes=nbytes
        )

    def submit_load(self, job_metadata: TransferJob) -> None:
        items = list(zip(job_metadata.keys, (int(c) for c in job_metadata.chunk_ids), strict=True))
        load = _LoadJob(job_metadata.job_id, job_metadata.req_context.req_id, items)
        self._loads[load.job_id] = load
        self._submit(load.job_id, lambda: self._load_all(load))

    def _load_all(self, load: _LoadJob) -> JobResult:
        """(I/O thread) Read, check and copy each block into its host row; stops at the first
        one that is missing or bad (vLLM keeps the blocks before it), or once the job was
        abandoned (its rows are no longer its own)."""
        store = self.store
        for offload_key, chunk in load.items:
            if load.abandoned:  # unlocked peek: saves a read the job could not deliver
                break
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
                self._count(corrupt_blocks=1)
                self._discard(store, key, offload_key)
                break
            except StoreError as exc:
                self._fail(exc)
                break
            with load.lock:
                if load.abandoned:
                    break
                self._rows[chunk] = np.frombuffer(payload, dtype=np.int8)
                load.loaded.append(offload_key)
        return self._load_result(load, time.monotonic())

    def _load_result(self, load: _LoadJob, now: float) -> JobResult:
        with load.lock:
            loaded = tuple(load.loaded)
        whole = len(loaded) == len(load.items)
        return JobResult(
            load.job_id,
            whole,
            successful_keys=None if whole else loaded,
            transfer_time=now - load.started,
            transfer_bytes=len(loaded) * self.block_size_bytes,
        )

    def _abandon(self, load: _LoadJob, now: float) -> JobResult:
        """(scheduler thread) End a load that has run ``load_timeout_s``: what it delivered
        is kept, the rest fails, and vLLM recomputes it. Counted as an error, with one line."""
        with load.lock:
            load.abandoned = True  # from here on the I/O thread writes no row of it
        result = self._load_result(load, now)
        if not result.success:
            self._count(errors=1)
            log.warning(
                "KV %s tier: a load of %d blocks took over kv_load_timeout_s (%.3g s); "
                "recomputing the %d it had not delivered",
                self.label,
                len(load.items),
                self._load_timeout_s,
                len(load.items) - len(result.successful_keys or ()),
            )
        return result

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

    def gave_up(self, key: OffloadKey, req_context: ReqContext) -> bool:
        """Whether a load of ``key`` for this request failed: then it is a miss for the
        request (else vLLM would look it up, find it, and load it again, and again)."""
        failed = self._given_up.get(req_context.req_id)
        return failed is not None and key in failed

    def _submit(self, job_id: int, work: Callable[[], JobResult]) -> None:
        self._jobs.append((job_id, self._io.submit(work)))

    def get_finished_jobs(self) -> Iterable[JobResult]:
        """The jobs done since the last call, and the loads that ran out of time."""
        finished: list[JobResult] = []
        pending: list[tuple[int, Future[JobResult]]] = []
        now = time.monotonic()
        for job_id, future in self._jobs:
            load = self._loads.get(job_id)
            timed_out = False
            if load is not None and (
                load.abandoned  # by drain_jobs
                or (not future.done() and now - load.started > self._load_timeout_s)
            ):
                # its thread finishes the read it is in and stops; its result is not awaited
                result = self._abandon(load, now)
                timed_out = not result.success
            elif future.done():
                try:
                    result = future.result()
                except Exception:  # a bug, not a store failure: fail the job, keep serving
                    log.exception("KV %s tier: job %d failed", self.label, job_id)
                    result = JobResult(job_id, False)
            else:
                pending.append((job_id, future))
                continue
            if load is not None:
                del self._loads[job_id]
                self._finish_load(load, result, timed_out)
            finished.append(result)
        self._jobs = pending
        return finished

    def _finish_load(self, load: _LoadJob, result: JobResult, timed_out: bool) -> None:
        """Count a finished load, and remember for its request what it did not deliver."""
        keys = [k for k, _ in load.items]
        kept = keys if result.success else list(result.successful_keys or ())
        if kept:
            self._count(
                loads=1,
                onboard_blocks=len(kept),
                onboard_bytes=len(kept) * self.block_size_bytes,
                load_seconds=result.transfer_time or 0.0,
            )
        if result.success:
            return
        delivered = set(kept)
        failed = [k for k in keys if k not in delivered]
        if not timed_out:  # unread after a bad one, maybe bad too: rewritten when back
            self._suspect.update(self.key_of(k) for k in failed)
        self._given_up.setdefault(load.req_id, set()).update(failed)
        self.on_load_failed(failed)

    def has_pending_work(self) -> bool:
        return bool(self._jobs)

    def drain_jobs(self) -> None:
        """Wait for every job (vLLM then reuses the host rows): a store to its end, a load
        until its timeout at most. A load still reading then is abandoned: it writes no row
        from here on, and the next `get_finished_jobs` reports it failed."""
        for job_id, future in list(self._jobs):
            load = self._loads.get(job_id)
            if load is None:
                future.exception()  # waits; the result is collected by get_finished_jobs
                continue
            left = load.started + self._load_timeout_s - time.monotonic()
            try:
                future.exception(timeout=max(left, 0.0))
            except FutureTimeoutError:
                with load.lock:
                    load.abandoned = True

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._given_up.pop(req_context.req_id, None)

    def shutdown(self) -> None:
        # Let writes in flight finish (a restart finds them); an abandoned load's thread
        # stops after the read it is in.
        self._io.shutdown(wait=True)
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
    stats_medium = MEDIUM_DISK

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        path: str,
        blocks: int = 0,
        gb: float = 0.0,
        admission: int = 2,
        **common: Any,  # `_StoreTier`'s: backpressure_detector, io_threads, load_timeout_s
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, **common)
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
        store = self.store  # any block while the disk has room, as the torch engine's stack
        room = isinstance(store, DiskStore) and store.has_room(self.record_bytes)
        return self._admission.admit(self.key_of(key), room=room)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:  # a hit is an offer (vLLM touches every tier on a hit)
            self._admission.admit(self.key_of(key))

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        store = self.store
        if store is None or self.gave_up(key, req_context):
            return LookupResult.MISS
        return LookupResult.HIT if store.contains([self.key_of(key)])[0] else LookupResult.MISS

    def gauges(self) -> dict[str, float]:
        gauges = super().gauges()
        store = self.store
        if isinstance(store, DiskStore):
            gauges["used_blocks"] = store.num_blocks
            gauges["capacity_blocks"] = store.budget_bytes // self.record_bytes
        return gauges

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
    stats_medium = MEDIUM_SHARED

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        uri: str,
        **common: Any,  # `_StoreTier`'s: backpressure_detector, io_threads, load_timeout_s
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, **common)
        self.locality = Locality.REMOTE
        try:
            self.store = open_shared_store(uri)
            log.info("KV shared tier: %s", self.store.description)
        except (StoreError, ValueError, ImportError) as exc:
            log.error("KV shared tier off: %s", exc)
        self._lookups = _SharedLookups(self)

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if self.store is None or self.gave_up(key, req_context):
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
        super().on_request_finished(req_context)
        self._lookups.cleanup(req_context.req_id)

    def shutdown(self) -> None:
        self._lookups.shutdown()
        super().shutdown()
