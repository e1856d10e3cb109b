"""Helpers every benchmark script shares: percentiles, JSON output, profiling, Ctrl-C.

The scripts run as `python benchmarks/NAME.py`, so this module is found beside them.
"""

from __future__ import annotations

import contextlib
import cProfile
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of `values` in any order (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100.0 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


def json_safe(obj: Any) -> Any:
    """NaN (an empty cell) as null: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


@contextlib.contextmanager
def profiled(profile_dir: Path | None, name: str) -> Iterator[None]:
    """cProfile the block into `profile_dir/name.prof` (no-op without a directory)."""
    if profile_dir is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(profile_dir / f"{name}.prof"))


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so the scripts' cleanup of children and servers runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
