"""Which GPUs this machine has, and which worker gets which.

The supervisor pins every worker to its own GPUs through `CUDA_VISIBLE_DEVICES`, so that two
workers never load a model onto the same device by accident. Allocation is all-or-nothing and
happens before any process starts: a graph that does not fit fails with a message saying what
it asked for and what exists, instead of an out-of-memory error deep inside an engine.
A service may ask to also *see* the other workers' GPUs (``peer_gpus``), listed after its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

GPUS_ENV = "DYNAMO_GPUS"


class GPUAllocationError(RuntimeError):
    """The GPUs asked for cannot be given: bad `DYNAMO_GPUS` or not enough devices."""


def detect_gpus(environ: Mapping[str, str] | None = None) -> list[int]:
    """The GPU ids workers may use.

    `DYNAMO_GPUS` (e.g. `0,1,3`; empty means none) wins, so a user can share a machine or test
    allocation without GPUs. Otherwise NVML counts the devices; without NVML (no driver, no
    `nvidia-ml-py`) the answer is no GPUs, which is right for CPU-only graphs.
    """
    env = os.environ if environ is None else environ
    if GPUS_ENV in env:
        return parse_gpu_list(env[GPUS_ENV])
    return _nvml_gpus()


def parse_gpu_list(value: str) -> list[int]:
    """Parse `0,1,3` into distinct non-negative ids, refusing anything else by name."""
    if not value.strip():
        return []
    ids: list[int] = []
    for part in value.split(","):
        text = part.strip()
        if not text.isdigit():
            raise GPUAllocationError(
                f"{GPUS_ENV}={value!r} is not a comma-separated list of GPU ids like '0,1,3'"
            )
        gpu = int(text)
        if gpu in ids:
            raise GPUAllocationError(f"{GPUS_ENV}={value!r} lists GPU {gpu} twice")
        ids.append(gpu)
    return ids


def _nvml_gpus() -> list[int]:
    """Count devices through NVML; any failure means this machine offers no GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return []
    return list(range(count))


def allocate(
    requests: list[tuple[str, int, int]], gpus: list[int]
) -> dict[tuple[str, int], list[int]]:
    """Give each `(service, worker index, gpus per worker)` request its own GPUs, in order.

    Workers asking for no GPU get `[]`. If the total does not fit, nothing is allocated and the
    error lists every service's demand, since the fix is usually in the config.
    """
    for name, index, count in requests:
        if count < 0:
            raise GPUAllocationError(f"{name} worker {index} asks for {count} GPUs")
    needed = sum(count for _, _, count in requests)
    if needed > len(gpus):
        raise GPUAllocationError(_shortage_message(requests, gpus, needed))
    result: dict[tuple[str, int], list[int]] = {}
    cursor = 0
    for name, index, count in requests:
        key = (name, index)
        if key in result:
            raise GPUAllocationError(f"{name} worker {index} is listed twice")
        result[key] = list(gpus[cursor : cursor + count])
        cursor += count
    return result


def _shortage_message(requests: list[tuple[str, int, int]], gpus: list[int], needed: int) -> str:
    """`graph needs 3 GPUs (Worker: 2 workers x 1, Prefill: 1 x 1) but 2 are available (0,1)`."""
    demand: dict[str, list[int]] = {}
    for name, _, count in requests:
        if count > 0:
            demand.setdefault(name, []).append(count)
    parts = [_demand_text(name, counts) for name, counts in demand.items()]
    available = ",".join(map(str, gpus)) or "none"
    verb = "is" if len(gpus) == 1 else "are"
    return (
        f"graph needs {needed} GPUs ({', '.join(parts)}) but {len(gpus)} {verb} available "
        f"({available}); set {GPUS_ENV} or lower resources.gpu"
    )


def _demand_text(name: str, counts: list[int]) -> str:
    """One service's demand: `Worker: 2 workers x 1`, or `Prefill: 1 x 1` for a single worker."""
    if len(set(counts)) == 1:
        workers = f"{len(counts)} workers" if len(counts) > 1 else "1"
        return f"{name}: {workers} x {counts[0]}"
    return f"{name}: {sum(counts)} over {len(counts)} workers"


def cuda_visible_devices(ids: list[int], peers: list[int] | None = None) -> str:
    """The `CUDA_VISIBLE_DEVICES` value for a worker's own GPUs `ids`; empty hides every GPU.

    `peers` (other workers' GPUs) are listed after the worker's own, so its own stay
    `cuda:0..n-1` while the peers become reachable (a prefill worker writing KV into a decode
    worker's GPU memory through CUDA IPC must see that GPU). A worker with no GPU of its own
    sees none: it would otherwise run on another worker's device.
    """
    extra = [gpu for gpu in peers or [] if gpu not in ids] if ids else []
    return ",".join(str(gpu) for gpu in [*ids, *extra])
