"""vLLM's `AsyncLLM` behind the Engine protocol: token ids in, token id deltas out.

vLLM does the batching, paged KV cache and prefix caching; this adapter only translates the
project's `PreprocessedRequest` into vLLM's prompt and `SamplingParams`, streams its delta
`RequestOutput`s back as `EngineOutput`s, and makes sure a request the caller stops reading is
aborted in the engine so its KV blocks are freed. Detokenizing stays in the Processor, so vLLM
is asked for token ids only.

vLLM is imported lazily: the rest of the package (and the echo engine) must work on machines
where importing vLLM is slow or impossible.

On vLLM's CPU build the KV cache gets an explicit size (`kv_cache_memory_bytes`) unless the
user chose one: see `cpu_memory_args`. Without it vLLM 0.32 wants 92% of the memory to be
free, and refuses to start on any machine that runs anything else.

The KV tiers below the device (`host_kv_gb`, `disk_kv_gb`, `shared_kv`, ...) become vLLM's
`OffloadingConnector` with the project's spec and stores (`offload_transfer_config`,
`vllm_offload.py`); their stats come back with vLLM's scheduler stats: hits per tier as its
connector's cache-hit sources, the host tier's transfers as its `vllm:kv_offload_*` metrics,
and the disk and shared tiers' own totals as our `vllm:dynamo_kv_tier_*` metrics
(`add_tier_stats`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_sdk.llm.disagg.kv_storage import storage_root
from dynamo_sdk.llm.engines.base import (
    NO_OPTIONS,
    Engine,
    EngineConfigError,
    EngineError,
    EngineStats,
    GenerateOptions,
    KvConnector,
)
from dynamo_sdk.llm.engines.configs import KvTierConfig, VllmConfig
from dynamo_sdk.llm.engines.tiering import GB, check_host_size, default_disk_path
from dynamo_sdk.llm.kv.events import MEDIUM_DISK, MEDIUM_HOST, MEDIUM_SHARED, KvEventFanout
from dynamo_sdk.llm.kv.layout import KvLayout
from dynamo_sdk.llm.kv.tiers.stats import KvTierStats
from dynamo_sdk.llm.kv.vllm_bridge import VllmKvEventBridge, vllm_kv_event_args
from dynamo_sdk.llm.protocol import (
    EngineOutput,
    FinishReason,
    PreprocessedRequest,
    TokenLogprob,
)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

log = logging.getLogger(__name__)

# vLLM's finish reasons as strings; anything else (a future reason, an error) maps to "error".
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
}

# Defaults that differ from vLLM's own: vLLM's periodic stats log line is noise for a worker
# that exports the same numbers itself (our stat logger still receives the stats).
_DEFAULT_ENGINE_ARGS: dict[str, Any] = {"disable_log_stats": True}


# vLLM's CPU build sizes the KV cache from `kv_cache_memory_bytes`, which its legacy env
# VLLM_CPU_KVCACHE_SPACE (GiB) sets (vllm/platforms/cpu.py, check_and_update_config). Without
# either it treats `gpu_memory_utilization` (default 0.92) as a fraction of the NUMA node's
# total memory and refuses to start unless that much is free (vllm/v1/worker/cpu_worker.py,
# CPUWorker.__init__): never true on a machine running anything else. So when the user chose
# none of the three, the KV cache gets vLLM's documented VLLM_CPU_KVCACHE_SPACE default
# (vllm/envs.py), capped at a share of the memory free at start (weights and activations come
# out of the rest).
CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
CPU_KV_CACHE_GIB = 4
CPU_KV_CACHE_MAX_SHARE = 0.5
_GIB = 1 << 30
_MIB = 1 << 20

# How long `shutdown()` lets vLLM's engine-core process exit before vLLM kills it (vLLM's own
# default). It exits after its model-worker process, and each exit is a full garbage
# collection over torch's and vLLM's objects: 3-5 s together on a 2-core machine.
STOP_TIMEOUT_S = 5.0


def cpu_memory_args(
    engine_args: Mapping[str, Any], environ: Mapping[str, str], available_bytes: int
) -> dict[str, Any]:
    """The engine args to add on vLLM's CPU platform so that the KV cache has a set size.

    Nothing when the user chose how vLLM sizes it: `kv_cache_memory_bytes`, the
    VLLM_CPU_KVCACHE_SPACE env (which vLLM applies itself, over the engine arg), or
    `gpu_memory_utilization` (vLLM's fraction of all memory; on CPU its check then applies).
    Otherwise `kv_cache_memory_bytes`: CPU_KV_CACHE_GIB, or CPU_KV_CACHE_MAX_SHARE of
    `available_bytes` (the memory free now) when that is less, in whole MiB.
    """
    if CPU_KVCACHE_ENV in environ:  # even empty: vLLM 0.32 reads it (and fails on "")
        return {}
    if any(
        engine_args.get(k) is not None for k in ("kv_cache_memory_bytes", "gpu_memory_utilization")
    ):
        return {}
    size = min(CPU_KV_CACHE_GIB * _GIB, int(available_bytes * CPU_KV_CACHE_MAX_SHARE))
    return {"kv_cache_memory_bytes": max(size // _MIB, 1) * _MIB}


def _on_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform here (imports vLLM's platform detection)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _cpu_available_memory() -> int:
    """Free memory in bytes as vLLM's CPU worker counts it: its NUMA node's, within cgroup limits.

    Those helpers are vLLM internals; where they are missing, the machine's free memory.
    """
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        node = get_allowed_cpu_list()[0].numa_node
        return int(get_memory_node_info(node).available_memory)
    except Exception:
        import psutil

        return int(psutil.virtual_memory().available)


def engine_arg_names() -> frozenset[str]:
    """The field names `AsyncEngineArgs` accepts in this vLLM version (imports vLLM)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except Exception as exc:  # ImportError, or vLLM failing its own platform checks
        raise EngineError(f"vLLM is not usable here: {type(exc).__name__}: {exc}") from exc
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def normalize_engine_args(engine_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map `max-model-len` to `max_model_len` and reject keys vLLM does not know.

    Checked up front, so a typo in a config fails in milliseconds with the bad key named,
    instead of as a TypeError after a worker has been scheduled, or silently never.
    """
    normalized: dict[str, Any] = {}
    for key, value in (engine_args or {}).items():
        name = key.replace("-", "_")
        if name in normalized:
            raise EngineError(f"vLLM engine arg {name!r} given twice (as {key!r})")
        normalized[name] = value
    if "model" in normalized:
        raise EngineError("give the model as the engine's model, not in engine_args")
    unknown = sorted(set(normalized) - engine_arg_names())
    if unknown:
        raise EngineError(
            f"unknown vLLM engine arg(s): {', '.join(unknown)} "
            "(see vllm.engine.arg_utils.AsyncEngineArgs for the accepted names)"
        )
    return normalized


OFFLOAD_CONNECTOR = "OffloadingConnector"
OFFLOAD_MODULE = "dynamo_sdk.llm.engines.vllm_offload"


def offload_transfer_config(config: KvTierConfig, kv_events: bool = False) -> dict[str, Any] | None:
    """The ``kv_transfer_config`` that gives a vLLM engine the KV tiers ``config`` asks for:
    vLLM's `OffloadingConnector` with our spec (host memory) and our disk and shared stores as
    its secondary tiers (`vllm_offload.py`); None when no tier is set.

    `EngineConfigError` for what vLLM's connector cannot do: tiers without host memory (blocks
    reach disk and shared storage through it), and ``offload_policy: write_back`` (vLLM copies
    every computed block to the host and on down right away: write_through).
    """
    if config.host_kv_gb and config.host_kv_blocks:
        raise EngineConfigError("give host_kv_blocks or host_kv_gb, not both")
    if config.disk_kv_gb and config.disk_kv_blocks:
        raise EngineConfigError("give disk_kv_blocks or disk_kv_gb, not both")
    host = bool(config.host_kv_gb or config.host_kv_blocks)
    disk = bool(config.disk_kv_gb or config.disk_kv_blocks)
    if not host:
        if disk or config.shared_kv:
            raise EngineConfigError(
                "disk_kv and shared_kv need a host tier (host_kv_gb or host_kv_blocks): blocks "
                "reach disk and shared storage through host memory"
            )
        return None
    if config.offload_policy != "write_through":
        raise EngineConfigError(
            "engine: vllm supports offload_policy: write_through only (vLLM's "
            "OffloadingConnector copies every computed block down at once)"
        )
    tiers: list[dict[str, Any]] = []
    if disk:
        tiers.append(
            {
                "type": "DiskTier",
                "module_path": OFFLOAD_MODULE,
                "path": config.disk_kv_path or str(default_disk_path()),
                "blocks": config.disk_kv_blocks,
                "gb": config.disk_kv_gb,
                "admission": config.disk_kv_admission,
            }
        )
    if config.shared_kv:
        tiers.append({"type": "SharedTier", "module_path": OFFLOAD_MODULE, "uri": config.shared_kv})
    for tier in tiers:  # a slower load is failed, and vLLM recomputes its blocks
        tier["load_timeout_s"] = config.kv_load_timeout_s
    extra: dict[str, Any] = {
        "spec_name": "DynamoOffloadingSpec",
        "spec_module_path": OFFLOAD_MODULE,
        # vLLM requires a size in bytes; host_kv_blocks, when given, replaces it in our spec
        "cpu_bytes_to_use": int(config.host_kv_gb * GB) or 1,
        "host_kv_blocks": config.host_kv_blocks,
        "secondary_tiers": tiers,
        # host/disk events with their blocks' parents and tokens, as the device's carry
        "self_describing_kv_events": kv_events,
    }
    return {
        "kv_connector": OFFLOAD_CONNECTOR,
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def vllm_block_bytes(llm: Any) -> int:
    """Bytes of one KV block of a started vLLM engine, all layers, K and V, summed over its
    workers (tensor and pipeline ranks: what host memory holds per block, and what vLLM's
    transfer counters add up); 0 where this formula does not hold (MLA, hybrid models)."""
    try:
        model, parallel = llm.model_config, llm.vllm_config.parallel_config
        if getattr(model, "use_mla", False) or getattr(model, "is_hybrid", False):
            return 0
        cache = llm.vllm_config.cache_config
        dtype = str(cache.cache_dtype)
        elem = 1 if dtype.startswith("fp8") else int(model.dtype.itemsize)
        per_token = model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
        per_worker = 2 * per_token * model.get_head_size() * int(cache.block_size) * elem
        return int(per_worker * int(parallel.world_size))
    except Exception:  # another attention shape: skip what needs the size
        log.debug("vLLM block size not derived", exc_info=True)
        return 0


def _tiers_of(config: KvTierConfig) -> list[KvTierStats]:
    """The tiers an engine reports (`EngineStats.kv_tiers`): host, and disk and shared as set."""
    return [
        KvTierStats(medium=MEDIUM_HOST, capacity_blocks=config.host_kv_blocks),
        KvTierStats(
            medium=MEDIUM_DISK,
            enabled=bool(config.disk_kv_gb or config.disk_kv_blocks),
            capacity_blocks=config.disk_kv_blocks,
        ),
        KvTierStats(medium=MEDIUM_SHARED, enabled=bool(config.shared_kv)),
    ]


# vLLM's cache-hit sources (vllm/v1/metrics/cache_hit_source.py) as our tiers' mediums; our
# shared tier reports its hits as "external_unspecified" (vLLM has no name for it)
_MEDIUM_OF_SOURCE = {
    "host": MEDIUM_HOST,
    "disk": MEDIUM_DISK,
    "external_unspecified": MEDIUM_SHARED,
}


class _StatsState:
    """What the stat logger saw; read by `VllmEngine.stats()` (same event loop, no locks)."""

    def __init__(self) -> None:
        self.tier_hits: dict[str, int] = {}  # prompt tokens loaded from each tier below
        self.offload: dict[str, float] = {}  # vLLM's host<->device transfer totals, by metric
        # the disk and shared tiers' own totals (`add_tier_stats`), per vLLM engine (each
        # data-parallel engine core has its own tiers): engine -> medium -> field -> value
        self.below: dict[int, dict[str, dict[str, float]]] = {}
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.max_running = 0


# vLLM's OffloadingConnector metrics (vllm/.../offloading/metrics.py) that fill our host tier's
# stats: device<->host transfer bytes and seconds, and one histogram sample per transfer
OFFLOAD_LOAD_BYTES = "vllm:kv_offload_load_bytes"
OFFLOAD_LOAD_TIME = "vllm:kv_offload_load_time"
OFFLOAD_LOAD_SIZE = "vllm:kv_offload_load_size"
OFFLOAD_STORE_BYTES = "vllm:kv_offload_store_bytes"
_OFFLOAD_METRICS = (OFFLOAD_LOAD_BYTES, OFFLOAD_LOAD_TIME, OFFLOAD_LOAD_SIZE, OFFLOAD_STORE_BYTES)


def add_offload_stats(totals: dict[str, float], payload: Any) -> None:
    """Add one step's connector stats (``{"types": .., "data": {name: {labels: value}}}``,
    counters as numbers, histograms as lists of samples) to ``totals``, summed over labels;
    a histogram adds its sample count. Anything else in the payload is left alone."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return
    for name in _OFFLOAD_METRICS:
        by_labels = data.get(name)
        if not isinstance(by_labels, dict):
            continue
        for value in by_labels.values():
            n = len(value) if isinstance(value, list) else value
            if isinstance(n, int | float):
                totals[name] = totals.get(name, 0) + n


# Our disk and shared tiers' stats (`vllm_offload._StoreTier.get_stats`): vLLM connector
# metrics named after `KvTierStats` fields, labelled by the tier's medium (DISK, SHARED). The
# tiers run in vLLM's engine-core process, so they ride with its scheduler stats (the path
# its own `vllm:kv_offload_*` metrics take); the "vllm:" prefix is what vLLM unregisters from
# Prometheus when a second engine starts in one process.
TIER_METRIC_PREFIX = "vllm:dynamo_kv_tier_"
TIER_COUNTERS = (
    ("offload_blocks", "Blocks written to the tier"),
    ("offload_bytes", "KV bytes written to the tier"),
    ("onboard_blocks", "Blocks loaded from the tier into host memory"),
    ("onboard_bytes", "KV bytes loaded from the tier into host memory"),
    ("loads", "Loads from the tier that delivered blocks"),
    ("load_seconds", "Time those loads took, in seconds"),
    ("evicted_blocks", "Blocks the tier evicted to make room"),
    ("corrupt_blocks", "Blocks that failed their checks on load (deleted, recomputed)"),
    ("errors", "Tier operations that failed, and loads abandoned after kv_load_timeout_s"),
)
TIER_GAUGES = (
    ("used_blocks", "Blocks the tier holds"),
    ("capacity_blocks", "Blocks the tier can hold (0: unbounded)"),
    ("enabled", "1 while the tier works"),
)
_TIER_COUNTER_FIELDS = frozenset(name for name, _ in TIER_COUNTERS)
_TIER_GAUGE_FIELDS = frozenset(name for name, _ in TIER_GAUGES)


def tier_metric(field: str) -> str:
    """The vLLM metric name of one of our tiers' `KvTierStats` fields."""
    return TIER_METRIC_PREFIX + field


def _label(labelvalues: Any) -> str | None:
    """The one label value of a tier metric (vLLM keys values by a tuple of label values)."""
    if isinstance(labelvalues, tuple) and len(labelvalues) == 1:
        value = labelvalues[0]
        return value if isinstance(value, str) else None
    return None


def add_tier_stats(totals: dict[str, dict[str, float]], payload: Any) -> None:
    """Fold one step's connector stats into ``totals`` (medium -> field -> value): our tiers'
    counters are added, their gauges replaced (the payload carries a gauge when it changed).
    Anything else in the payload is left alone (`add_offload_stats` reads vLLM's own)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return
    for name, by_labels in data.items():
        if not isinstance(name, str) or not name.startswith(TIER_METRIC_PREFIX):
            continue
        field = name.removeprefix(TIER_METRIC_PREFIX)
        counter = field in _TIER_COUNTER_FIELDS
        if not (counter or field in _TIER_GAUGE_FIELDS) or not isinstance(by_labels, dict):
            continue
        for labels, value in by_labels.items():
            medium = _label(labels)
            if medium is None or not isinstance(value, int | float):
                continue
            fields = totals.setdefault(medium, {})
            fields[field] = (fields.get(field, 0) + value) if counter else value


def _combined(
    per_engine: Mapping[int, Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """One worker's tier fields from its engines' (data parallelism: each engine core has its
    own tiers): sums, except that a tier is enabled only while it works in every engine."""
    out: dict[str, dict[str, float]] = {}
    for tiers in per_engine.values():
        for medium, fields in tiers.items():
            into = out.setdefault(medium, {})
            for field, value in fields.items():
                if field == "enabled":
                    into[field] = min(into.get(field, value), value)
                else:
                    into[field] = into.get(field, 0) + value
    return out


def _make_stat_logger_factory(state: _StatsState) -> Any:
    """A per-engine stat logger factory (vLLM calls it with `(vllm_config, engine_index)`).

    vLLM's metrics are reported through loggers it drives after every engine step; a custom
    `StatLoggerBase` is the supported way to see them without scraping its Prometheus output.
    The class is built here so importing this module does not import vLLM.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class DynamoStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                state.running = scheduler_stats.num_running_reqs
                state.waiting = scheduler_stats.num_waiting_reqs
                state.kv_usage = scheduler_stats.kv_cache_usage
                state.max_running = max(state.max_running, state.running)
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:
                    state.prefix_queries += prefix.queries
                    state.prefix_hits += prefix.hits
                external = getattr(scheduler_stats, "connector_prefix_cache_stats", None)
                for source, hits in (getattr(external, "hits_by_source", None) or {}).items():
                    medium = _MEDIUM_OF_SOURCE.get(str(getattr(source, "value", source)))
                    if medium is not None:
                        state.tier_hits[medium] = state.tier_hits.get(medium, 0) + int(hits)
                connector_stats = getattr(scheduler_stats, "kv_connector_stats", None)
                add_offload_stats(state.offload, connector_stats)
                add_tier_stats(state.below.setdefault(self.engine_index, {}), connector_stats)
            if iteration_stats is not None:
                state.prompt_tokens += iteration_stats.num_prompt_tokens
                state.generation_tokens += iteration_stats.num_generation_tokens

        def log_engine_initialized(self) -> None:
            pass

    factory: type[StatLoggerBase] = DynamoStatLogger
    return factory


def _with_fields(tier: KvTierStats, fields: Mapping[str, float], **more: Any) -> KvTierStats:
    """``tier`` with the fields its vLLM tier reported (`add_tier_stats`), typed as
    `KvTierStats` has them; a capacity of 0 (none reported) keeps the configured one."""
    values: dict[str, Any] = dict(more)
    for field, value in fields.items():
        if field == "enabled":
            values[field] = bool(value)
        elif field == "load_seconds":
            values[field] = float(value)
        elif field != "capacity_blocks" or value:
            values[field] = int(value)
    return msgspec.structs.replace(tier, **values)


def reported_tiers(
    configured: Sequence[KvTierStats],
    hits: Mapping[str, int],
    below: Mapping[int, Mapping[str, Mapping[str, float]]],
) -> list[KvTierStats]:
    """The tiers `VllmEngine.stats()` reports: the ``configured`` ones (`_tiers_of`) with
    their hit tokens (vLLM's cache-hit sources) and what the disk and shared tiers of each
    engine reported (``below``: engine -> medium -> field, from `add_tier_stats`)."""
    combined = _combined(below)
    return [
        _with_fields(t, combined.get(t.medium, {}), hit_tokens=hits.get(t.medium, 0))
        for t in configured
    ]


class VllmEngine(Engine):
    """vLLM v1 `AsyncLLM` serving one model, as an `Engine`.

    It takes its `VllmConfig` (what the registry decodes from YAML) or vLLM engine arguments
    as a mapping. Capabilities: `kv_events()` with `kv_events: true` (vLLM's own publisher,
    bridged from ZMQ by `kv/vllm_bridge.py`; block hashes `sha256_cbor` so the router's match),
    and `kv_connector()` when its `kv_transfer_config` selects the project's storage connector
    (disaggregated prefill through shared storage, `disagg/connector.py`).
    """

    def __init__(
        self,
        model: str,
        config: VllmConfig | Mapping[str, Any] | None = None,
        *,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> None:
        kv_events = False
        tiers: dict[str, Any] | None = None
        self._tier_config: KvTierConfig | None = None
        self._block_bytes = 0  # one device block's KV, once started (tier stats in blocks)
        if isinstance(config, VllmConfig):
            engine_args: Mapping[str, Any] | None = config.engine_args
            kv_events = config.kv_events
            tiers = offload_transfer_config(config, kv_events)
            self._tier_stats = _tiers_of(config) if tiers is not None else []
            self._tier_config = config if tiers is not None else None
        else:
            self._tier_stats = []
            engine_args = config
        self.model = model
        self._engine_args = {**_DEFAULT_ENGINE_ARGS, **normalize_engine_args(engine_args)}
        self._events = KvEventFanout("vllm") if kv_events else None
        self._bridge: VllmKvEventBridge | None = None
        own_transfer = self._engine_args.get("kv_transfer_config")
        if tiers is not None and own_transfer is not None:
            raise EngineConfigError(
                "the KV tier keys (host_kv_gb/host_kv_blocks, disk_kv_*, shared_kv) configure "
                "vLLM's kv_transfer_config themselves (its OffloadingConnector); vLLM takes one "
                "connector, so they cannot be combined with a kv_transfer_config of your own "
                "(such as disaggregation's storage connector)"
            )
        self._connector = _storage_connector(own_transfer)
        if self._connector is not None:
            self._connector.engine = self
        if tiers is not None:
            self._engine_args["kv_transfer_config"] = tiers
        # what shutdown() may take, at most: a host draining this engine reserves it
        self.stop_timeout = stop_timeout
        # the configured limit until start() reads the engine's resolved one
        self.context_length: int = int(self._engine_args.get("max_model_len") or 0)
        self._llm: AsyncLLM | None = None
        self._stats = _StatsState()
        self._inflight = 0

    @staticmethod
    def _check_host_tier(llm: Any, config: KvTierConfig) -> None:
        """The torch engine's start check, once vLLM has sized its device cache: a host tier
        no larger than it is refused (vLLM offloads write-through only)."""
        # the front end sums the device blocks of data-parallel engines; the tier is each's
        parallel = llm.vllm_config.parallel_config
        dp = max(1, int(getattr(parallel, "data_parallel_size", 1) or 1))
        device_blocks = int(llm.vllm_config.cache_config.num_gpu_blocks or 0) // dp
        host = config.host_kv_blocks
        if not host:
            block_bytes = vllm_block_bytes(llm)
            if not block_bytes:
                return
            host = int(config.host_kv_gb * GB // block_bytes)
        check_host_size(host, device_blocks, "write_through")

    def effective_engine_args(self) -> dict[str, Any]:
        """The engine args `start()` gives vLLM: the configured ones plus this adapter's
        platform defaults (on CPU, a KV cache size; see `cpu_memory_args`). Imports vLLM.
        """
        args = dict(self._engine_args)
        if _on_cpu_platform():
            added = cpu_memory_args(args, os.environ, _cpu_available_memory())
            if added:
                log.info(
                    "vLLM on CPU: KV cache %.2f GiB (set kv_cache_memory_bytes, "
                    "%s or gpu_memory_utilization to change it)",
                    added["kv_cache_memory_bytes"] / _GIB,
                    CPU_KVCACHE_ENV,
                )
            args.update(added)
        return args

    async def start(self) -> None:
        """Build the engine in a thread: loading weights and profiling memory takes tens of
        seconds, and the worker's event loop must keep its etcd lease and NATS alive meanwhile.
        """
        if self._llm is not None:
            return
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except Exception as exc:
            raise EngineError(f"vLLM is not usable here: {type(exc).__name__}: {exc}") from exc
        factory = _make_stat_logger_factory(self._stats)
        event_args: dict[str, Any] = {}
        if self._events is not None:  # bound before vLLM starts, so its publisher connects
            self._bridge = VllmKvEventBridge(0, self._events.publish)
            await self._bridge.start()
            event_args = vllm_kv_event_args(self._bridge.port)

        def build() -> AsyncLLM:
            engine_args = {**self.effective_engine_args(), **event_args}
            kv_transfer = engine_args.get("kv_transfer_config")
            if isinstance(kv_transfer, Mapping):  # from YAML: vLLM wants its config object
                from vllm.config import KVTransferConfig

                engine_args["kv_transfer_config"] = KVTransferConfig(**kv_transfer)
            args = AsyncEngineArgs(model=self.model, **engine_args)
            return AsyncLLM.from_engine_args(args, stat_loggers=[factory])

        try:
            llm = await asyncio.to_thread(build)
        except Exception as exc:
            raise EngineError(
                f"vLLM failed to start model {self.model!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self._llm = llm
        if self._tier_config is not None:
            self._block_bytes = vllm_block_bytes(llm)
            try:
                self._check_host_tier(llm, self._tier_config)
            except EngineConfigError:
                await self.shutdown()
                raise
        self.context_length = int(llm.model_config.max_model_len)
        log.info("vLLM engine ready: model=%s context_length=%d", self.model, self.context_length)

    def kv_events(self) -> KvEventFanout | None:
        return self._events

    def kv_block_size(self) -> int:
        llm = self._llm
        return int(llm.vllm_config.cache_config.block_size) if llm is not None else 0

    def kv_connector(self) -> KvConnector | None:
        return self._connector

    def kv_layout(self) -> KvLayout:
        """The shape of this engine's KV blocks, from vLLM's config.

        Disaggregated decode and prefill engines must agree on it: a KV connector moves blocks
        whose token count, head count and dtype the other side reads back as they are.
        """
        llm = self._llm
        if llm is None:
            raise EngineError("VllmEngine.kv_layout() called before start()")
        config = llm.vllm_config
        model, cache = config.model_config, config.cache_config
        dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
        return KvLayout(
            num_layers=int(model.get_num_layers(config.parallel_config)),
            block_size=int(cache.block_size),
            num_kv_heads=int(model.get_num_kv_heads(config.parallel_config)),
            head_dim=int(model.get_head_size()),
            dtype=str(dtype).removeprefix("torch."),
        )

    async def shutdown(self) -> None:
        """Stop vLLM's engine-core process, waiting at most `stop_timeout` for it to exit.

        In a thread: that takes seconds (see STOP_TIMEOUT_S), during which the worker's event
        loop must go on answering health probes and keeping its etcd lease and NATS
        connection. vLLM's shutdown hands its own loop-side cleanup (its output socket and
        output-handler task) to this loop with call_soon_threadsafe.
        """
        if self._bridge is not None:
            await self._bridge.stop()
        llm, self._llm = self._llm, None
        if llm is None:
            return
        started = time.monotonic()
        await asyncio.to_thread(llm.shutdown, self.stop_timeout)
        log.info("vLLM engine stopped in %.1f s", time.monotonic() - started)

    def healthy(self) -> bool:
        """False once vLLM's engine core died (`AsyncLLM.errored`): it serves nothing again."""
        llm = self._llm
        return llm is None or not bool(getattr(llm, "errored", False))

    def stats(self) -> EngineStats:
        """The latest scheduler stats, clamped by what this adapter knows is in flight.

        vLLM reports scheduler stats only with step outputs, so after the last request finishes
        or is aborted the last report can still say "1 running"; an idle engine must not look
        busy to the router or planner.
        """
        s = self._stats
        running = min(s.running, self._inflight)
        waiting = min(s.waiting, self._inflight - running)
        tiers = reported_tiers(self._tier_stats, s.tier_hits, s.below)
        if tiers and s.offload:  # the host tier: what vLLM's connector moved to and from it
            loaded = s.offload.get(OFFLOAD_LOAD_BYTES, 0)
            stored = s.offload.get(OFFLOAD_STORE_BYTES, 0)
            per_block = self._block_bytes or 1
            tiers[0] = msgspec.structs.replace(
                tiers[0],
                onboard_bytes=int(loaded),
                onboard_blocks=int(loaded // per_block),
                offload_bytes=int(stored),
                offload_blocks=int(stored // per_block),
                loads=int(s.offload.get(OFFLOAD_LOAD_SIZE, 0)),
                load_seconds=float(s.offload.get(OFFLOAD_LOAD_TIME, 0.0)),
            )
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_usage=s.kv_usage,
            prefix_cache_hit_rate=(s.prefix_hits / s.prefix_queries) if s.prefix_queries else 0.0,
            prefix_queried_tokens=s.prefix_queries,
            prefix_hit_tokens=s.prefix_hits,
            prompt_tokens_total=s.prompt_tokens,
            generation_tokens_total=s.generation_tokens,
            max_batch_running=s.max_running,
            kv_tiers=tiers,
        )

    async def generate(
        self, request: PreprocessedRequest, options: GenerateOptions = NO_OPTIONS
    ) -> AsyncIterator[EngineOutput]:
        """Stream `EngineOutput` deltas for one request.

        If the consumer stops early (closes this generator, or its task is cancelled), the
        request is aborted in vLLM so its KV blocks return to the pool at once rather than
        after it has generated up to max_tokens for nobody.

        ``options.kv_transfer_params`` go with the request to the configured KV connector
        (vLLM's per-request channel to it); ``options.on_kv_transfer`` receives what the
        connector reports back when the request finishes (disaggregated prefill: tokens
        stored or loaded). vLLM's blocks cannot be filled from outside: no ``remote_prefill``.
        """
        llm = self._llm
        if llm is None:
            raise EngineError("VllmEngine.generate() called before start()")
        if options.remote_prefill is not None:
            raise EngineError("the vLLM engine takes remote KV through its connector only")
        kv_transfer_params, on_kv_transfer = options.kv_transfer_params, options.on_kv_transfer
        params = sampling_params_for(request)
        if kv_transfer_params is not None:
            extra = dict(params.extra_args or {})
            extra["kv_transfer_params"] = kv_transfer_params
            params.extra_args = extra
        request_id = request.request_id
        want_logprobs = request.output.logprobs is not None
        top_n = request.output.logprobs or 0
        prompt = _token_prompt(list(request.token_ids))
        stream = llm.generate(prompt, params, request_id)
        finished = False
        first = True
        self._inflight += 1
        try:
            async for out in stream:
                completion = out.outputs[0]
                token_ids = list(completion.token_ids)
                finish: FinishReason | None = None
                if out.finished:
                    finished = True
                    if on_kv_transfer is not None and out.kv_transfer_params:
                        on_kv_transfer(dict(out.kv_transfer_params))
                    reason = completion.finish_reason
                    finish = _FINISH_REASONS.get(reason, "error") if reason else "stop"
                if not token_ids and finish is None and not first:
                    continue
                delta = EngineOutput(token_ids=token_ids, finish_reason=finish)
                if first:
                    cached = getattr(out, "num_cached_tokens", None)
                    delta.cached_tokens = int(cached) if cached is not None else None
                    first = False
                if want_logprobs and token_ids:
                    delta.logprobs, delta.top_logprobs = _convert_logprobs(
                        token_ids, completion.logprobs, top_n
                    )
                yield delta
        except EngineError:
            raise
        except Exception as exc:  # GeneratorExit/CancelledError are BaseException: not here
            raise EngineError(
                f"vLLM failed request {request_id}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._inflight -= 1
            if not finished:
                await self._abort(stream, request_id)

    async def _abort(self, stream: AsyncIterator[Any], request_id: str) -> None:
        """Close vLLM's stream (it aborts on close) and abort by id too, in case it never ran.

        Both are idempotent in vLLM; failures are logged, never raised, because this runs while
        the caller is already unwinding from a cancellation or an error.
        """
        try:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        except Exception:
            log.debug("closing vLLM stream for %s failed", request_id, exc_info=True)
        llm = self._llm
        if llm is None:
            return
        try:
            await llm.abort(request_id)
        except Exception:
            log.warning("aborting vLLM request %s failed", request_id, exc_info=True)


def _token_prompt(token_ids: list[int]) -> Any:
    """The prompt as an already-rendered token input.

    vLLM 0.32 deprecates raw prompts (`TokensPrompt`) at `generate()` and wants rendered
    `EngineInput`s; token ids need no rendering, so `tokens_input()` builds one directly
    (prompt length is still validated by vLLM). Older vLLMs lack it: fall back to the raw form.
    """
    try:
        from vllm.inputs import tokens_input
    except ImportError:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=token_ids)
    return tokens_input(token_ids)


def sampling_params_for(request: PreprocessedRequest) -> SamplingParams:
    """vLLM `SamplingParams` for a request: unset options keep vLLM's defaults."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = request.sampling
    stop = request.stop
    kwargs: dict[str, Any] = {
        "max_tokens": stop.max_tokens,
        "min_tokens": stop.min_tokens,
        "ignore_eos": stop.ignore_eos,
        "stop_token_ids": list(stop.stop_token_ids),
        "logprobs": request.output.logprobs,
        "output_kind": RequestOutputKind.DELTA,
        "detokenize": False,  # the Processor detokenizes; vLLM would only duplicate the work
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        value = getattr(s, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except Exception as exc:  # vLLM validates ranges (e.g. top_p in (0, 1])
        raise EngineError(f"request {request.request_id}: invalid sampling options: {exc}") from exc


def _convert_logprobs(
    token_ids: list[int], logprobs: Any, top_n: int
) -> tuple[list[float], list[list[TokenLogprob]]]:
    """Per new token: the sampled token's logprob, and the top `top_n` alternatives.

    vLLM gives one `{token_id: Logprob}` dict per position holding the top-n tokens plus the
    sampled one (which may rank below n), so the dict is sorted and cut back to n here.
    """
    sampled: list[float] = []
    tops: list[list[TokenLogprob]] = []
    positions = list(logprobs) if logprobs is not None else []
    for i, token in enumerate(token_ids):
        entry = positions[i] if i < len(positions) else None
        if not entry:
            sampled.append(float("nan"))
            tops.append([])
            continue
        own = entry.get(token)
        sampled.append(float(own.logprob) if own is not None else float("nan"))
        ranked = sorted(entry.items(), key=lambda item: item[1].logprob, reverse=True)
        tops.append([TokenLogprob(int(tid), float(lp.logprob)) for tid, lp in ranked[:top_n]])
    return sampled, tops


class _StorageConnector:
    """The project's storage connector as this engine's `kv_connector()` (see kv_storage)."""

    def __init__(self, engine_root: str) -> None:
        self._root = engine_root
        self.engine: VllmEngine | None = None

    @property
    def storage_root(self) -> str:
        return self._root

    def kv_layout(self) -> KvLayout:
        assert self.engine is not None
        return self.engine.kv_layout()


def _storage_connector(kv_transfer_config: Any) -> _StorageConnector | None:
    """The connector a ``kv_transfer_config`` selects, when it is the project's (None: no
    KV transfer configured); another connector's config is refused with what to set."""
    if kv_transfer_config is None:
        return None
    try:
        return _StorageConnector(storage_root(kv_transfer_config))
    except ValueError as exc:
        raise EngineConfigError(str(exc)) from None
