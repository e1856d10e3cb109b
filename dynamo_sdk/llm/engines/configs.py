"""Every engine's knobs, typed, in one module that imports neither PyTorch nor vLLM.

A worker's YAML section (or `dynamo run`'s flags) is decoded into one of these before an
engine is built, so `dynamo serve` can refuse a misspelt key or a wrong type before any worker
starts, and `dynamo run -h` can list every knob with its default. Each field's description is
what the help prints. Engines take their config object; nothing else defines their knobs.

vLLM has hundreds of engine arguments, which pass straight through (`VllmConfig`): their names
are checked against vLLM's own `EngineArgs`, read from its source without importing it
(importing vLLM takes 5-15 s), and vLLM checks the values when the worker builds it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from dynamo_sdk.llm.engines.base import EngineConfigError
from dynamo_sdk.sdk.config import explain


class EngineSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every engine's settings."""


class EchoConfig(EngineSettings):
    """`engine: echo`: no model; streams the latest chat message (a completion's prompt) back."""

    context_length: Annotated[int, Meta(ge=2, description="longest prompt + output")] = 8192
    token_delay: Annotated[
        float, Meta(ge=0.0, description="seconds between output tokens (decode time)")
    ] = 0.0


class KvTierConfig(EngineSettings):
    """The KV tiers below the device cache (`kv/tiers`): host memory, local disk, shared
    storage. All off by default; `docs/kv_tiers.md` explains each key and how to size them."""

    host_kv_gb: Annotated[
        float, Meta(ge=0.0, description="host-memory KV tier in GB (pinned on CUDA); 0 = off")
    ] = 0.0
    host_kv_blocks: Annotated[
        int, Meta(ge=0, description="host-memory KV tier in blocks (instead of host_kv_gb)")
    ] = 0
    disk_kv_gb: Annotated[
        float, Meta(ge=0.0, description="local-disk KV tier budget in GB; 0 = off")
    ] = 0.0
    disk_kv_blocks: Annotated[
        int, Meta(ge=0, description="local-disk KV tier budget in blocks (instead of GB)")
    ] = 0
    disk_kv_path: Annotated[
        str, Meta(description="folder of the disk tier; default ~/.cache/dynamo-py/kv")
    ] = ""
    shared_kv: Annotated[
        str, Meta(description="shared KV tier: file:///mnt/kv, redis://host:6379; '' = off")
    ] = ""
    offload_policy: Annotated[
        Literal["write_through", "write_back"],
        Meta(description="copy blocks down once computed, or only when evicted from above"),
    ] = "write_through"
    disk_kv_admission: Annotated[
        int, Meta(ge=1, description="offers (stored, reused) before a block goes to a full disk")
    ] = 2
    kv_load_timeout_s: Annotated[
        float, Meta(gt=0.0, description="a KV load slower than this is recomputed instead")
    ] = 5.0


class SchedulingConfig(KvTierConfig):
    """The knobs of the scheduler and paged block manager the mocker and the torch engine
    share (`engines/scheduler.py`, `kv/block_manager.py`), with the KV tiers below them."""

    block_size: Annotated[int, Meta(ge=1, description="tokens per KV block")] = 16
    max_num_seqs: Annotated[int, Meta(ge=1, description="sequences running at once")] = 256
    max_num_batched_tokens: Annotated[
        int, Meta(ge=1, description="tokens computed per step (chunked prefill budget)")
    ] = 8192
    enable_prefix_caching: Annotated[bool, Meta(description="reuse cached prompt blocks")] = True


class MockerConfig(SchedulingConfig):
    """`engine: mocker`: vLLM's scheduling and paged KV with a timing model and no model.

    Timing (simulated ms per forward pass): the prefill chunks' tokens times
    `prefill_ms_per_token` plus `prefill_ms_quadratic` * tokens * context, plus
    `decode_ms_base` + `decode_ms_per_seq` * decoding sequences + `decode_ms_per_ctx_token` *
    their context; every real sleep is divided by `speedup`.
    """

    num_blocks: Annotated[int, Meta(ge=1, description="KV cache blocks")] = 4096
    context_length: Annotated[
        int, Meta(ge=1, description="longest prompt + output (must fit the cache)")
    ] = 8192
    prefill_ms_per_token: Annotated[float, Meta(ge=0.0, description="prefill cost")] = 0.05
    prefill_ms_quadratic: Annotated[
        float, Meta(ge=0.0, description="attention's cost per token per context token")
    ] = 1e-6
    decode_ms_base: Annotated[float, Meta(ge=0.0, description="fixed cost of a step")] = 5.0
    decode_ms_per_seq: Annotated[float, Meta(ge=0.0, description="cost per decoding sequence")] = (
        0.1
    )
    decode_ms_per_ctx_token: Annotated[
        float, Meta(ge=0.0, description="cost per context token read while decoding")
    ] = 1e-4
    speedup: Annotated[
        float, Meta(gt=0.0, description="divides every real sleep (simulated time is kept)")
    ] = 1.0
    seed: Annotated[int, Meta(description="seed of the generated token ids")] = 0
    vocab_size: Annotated[
        int, Meta(ge=0, description="ids drawn from [0, vocab_size); 0 = the model's tokenizer")
    ] = 0
    # The KV tiers' timing (the tiers themselves are real: files, Redis; only time is made up)
    kv_bytes_per_block: Annotated[
        int, Meta(ge=1, description="simulated KV bytes per block (8B model, 16 tokens: 2 MiB)")
    ] = 2 * 1024 * 1024
    host_kv_gbps: Annotated[float, Meta(gt=0.0, description="host to device GB/s (PCIe)")] = 25.0
    disk_kv_gbps: Annotated[float, Meta(gt=0.0, description="disk read GB/s (NVMe)")] = 3.0
    shared_kv_gbps: Annotated[float, Meta(gt=0.0, description="shared storage GB/s")] = 1.0
    host_kv_latency_ms: Annotated[float, Meta(ge=0.0, description="per host load")] = 0.05
    disk_kv_latency_ms: Annotated[float, Meta(ge=0.0, description="per disk load")] = 0.2
    shared_kv_latency_ms: Annotated[float, Meta(ge=0.0, description="per shared load")] = 1.0

    def __post_init__(self) -> None:
        # As vLLM refuses a max_model_len its KV cache cannot hold: otherwise one long sequence
        # could need more blocks than exist and preempt itself forever.
        if self.context_length > self.num_blocks * self.block_size:
            raise ValueError(
                f"context_length {self.context_length} exceeds the KV cache ({self.num_blocks} "
                f"blocks x {self.block_size} tokens); raise num_blocks or lower context_length"
            )


class TorchConfig(SchedulingConfig):
    """`engine: torch`: the project's own engine (Llama, Mistral, Qwen2) on PyTorch."""

    device: Annotated[str, Meta(description="auto (cuda if available), cuda, cpu")] = "auto"
    dtype: Annotated[
        str, Meta(description="auto (the checkpoint's on GPU, float32 on CPU), bfloat16, ...")
    ] = "auto"
    load_format: Annotated[
        Literal["auto", "safetensors", "dummy"],
        Meta(description="dummy: random weights of the model's shape"),
    ] = "auto"
    num_blocks: Annotated[
        int, Meta(ge=0, description="KV cache blocks; 0 = sized from the memory budget")
    ] = 0
    gpu_memory_utilization: Annotated[
        float, Meta(gt=0.0, le=1.0, description="share of GPU memory to use (GPU)")
    ] = 0.9
    kv_cache_gb: Annotated[float, Meta(gt=0.0, description="KV cache size on CPU, in GiB")] = 0.25
    max_model_len: Annotated[int, Meta(ge=0, description="context length; 0 = the model's")] = 0
    enforce_eager: Annotated[bool, Meta(description="no CUDA graphs (GPU)")] = False
    cuda_graph_sizes: Annotated[
        list[int] | None, Meta(description="decode batch sizes to capture; default up to 256")
    ] = None
    seed: Annotated[int, Meta(description="seed of dummy weights")] = 0


class VllmConfig(KvTierConfig):
    """`engine: vllm`: vLLM's AsyncLLM. Any vLLM engine argument passes through, at the top
    level of the section (`max_model_len: 2048`) or under `engine_args`. The KV tier keys
    (`host_kv_gb`, `disk_kv_gb`, `shared_kv`, ...) configure vLLM's OffloadingConnector with
    the project's stores (`engines/vllm_offload.py`)."""

    engine_args: dict[str, Any] = {}
    kv_events: Annotated[
        bool, Meta(description="publish vLLM's KV events for the KV-aware router")
    ] = False


S = TypeVar("S", bound=EngineSettings)

CONFIG_TYPES: dict[str, type[EngineSettings]] = {
    "echo": EchoConfig,
    "mocker": MockerConfig,
    "torch": TorchConfig,
    "vllm": VllmConfig,
}


def decode_engine_config(
    engine: str, section: Mapping[str, Any], owner: str = ""
) -> EngineSettings:
    """``section`` (an engine's keys only) as the engine's config type.

    ``owner`` names where the keys came from in messages (a service name; default: the
    engine's). Raises `EngineConfigError` with the key and the keys the engine takes.
    """
    config_type = CONFIG_TYPES.get(engine)
    if config_type is None:
        known = ", ".join(sorted(CONFIG_TYPES))
        raise EngineConfigError(f"unknown engine {engine!r}; known engines: {known}")
    where = owner or f"{engine} engine"
    body = dict(section)
    if config_type is VllmConfig:
        body = _vllm_body(body, where)
    try:
        return msgspec.convert(body, config_type)
    except msgspec.ValidationError as exc:
        raise EngineConfigError(explain(where, config_type, str(exc))) from None


def _vllm_body(section: dict[str, Any], where: str) -> dict[str, Any]:
    """vLLM's keys: ``engine_args`` plus top-level engine arguments, merged and checked."""
    nested = section.pop("engine_args", None) or {}
    if not isinstance(nested, Mapping):
        raise EngineConfigError(
            f"{where}.engine_args must be a mapping, got {type(nested).__name__}"
        )
    ours = {k: section.pop(k) for k in list(section) if k in VllmConfig.__struct_fields__}
    top = {k.replace("-", "_"): v for k, v in section.items()}
    inner = {str(k).replace("-", "_"): v for k, v in nested.items()}
    both = sorted(set(top) & set(inner))
    if both:
        raise EngineConfigError(
            f"{where}: vLLM engine argument(s) given both at the top level and in engine_args: "
            f"{', '.join(both)}"
        )
    known = vllm_arg_names()
    unknown = sorted(k for k in (*top, *inner) if known and k not in known)
    if unknown:
        raise EngineConfigError(
            f"{where}: unknown vLLM engine argument(s) {', '.join(unknown)} (vLLM's "
            f"EngineArgs fields, at the top level or under engine_args; ours: kv_events)"
        )
    return {**ours, "engine_args": {**top, **inner}}


@functools.cache
def vllm_arg_names() -> frozenset[str]:
    """The fields of vLLM's `AsyncEngineArgs`, read from its source; empty when vLLM is not
    installed or its source does not parse as expected (then vLLM checks them itself)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return frozenset()
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("EngineArgs", "AsyncEngineArgs"):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
    return frozenset(names) if "model" in names else frozenset()


def settings(config_type: type[S], knobs: Mapping[str, Any]) -> S:
    """An engine's config from keyword arguments (``MockerEngine(num_blocks=64)``), checked
    as strictly as a YAML section."""
    name = next((n for n, t in CONFIG_TYPES.items() if t is config_type), config_type.__name__)
    return decode_engine_config(name, knobs)  # type: ignore[return-value]


def describe_config(config_type: type[EngineSettings]) -> list[tuple[str, str, str]]:
    """(key, default, description) of every knob, for help texts."""
    rows = []
    for field in msgspec.structs.fields(config_type):
        description = ""
        for meta in getattr(field.type, "__metadata__", ()):
            if isinstance(meta, Meta) and meta.description:
                description = meta.description
        default = field.default if field.default is not msgspec.NODEFAULT else "required"
        rows.append((field.name, repr(default), description))
    return rows
