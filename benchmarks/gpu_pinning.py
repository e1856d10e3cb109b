"""Start a benchmark's worker process pinned to GPUs the way ``dynamo serve`` pins workers.

The supervisor gives each worker ``CUDA_VISIBLE_DEVICES`` = its own GPUs, then (for services
with ``peer_gpus``, like the PrefillWorker) the graph's other GPUs. Benchmarks that start
engine processes themselves use the same rule, so what they measure (CUDA IPC between
pinned processes included) is what a served graph gets.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_sdk.serve.gpus import cuda_visible_devices


def start_pinned(proc: Any, own: list[int], peers: list[int] | None = None) -> None:
    """``proc.start()`` (a spawned process) with ``CUDA_VISIBLE_DEVICES`` for ``own`` GPUs
    (its ``cuda:0..``) followed by ``peers``; this process's environment is left as it was."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(own, peers)
    try:
        proc.start()
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
