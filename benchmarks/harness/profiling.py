"""Reading cProfile dumps: each served process's busy time by package and its top functions.

The dumps come from `tests.serving.ServeProcess(profile_dir=...)` (one per served process) and
from `_common.profiled` (the benchmark's own client).
"""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

from harness import REPO_ROOT

IDLE_PER_CALL = 0.25  # seconds of own time per call above which an entry is event-loop wait


def format_profile(profile_dir: Path, top: int = 15) -> str:
    """Each process's busy time by package and its top functions by own time (tottime).

    Under an event loop written in C (uvloop), time spent waiting in epoll is charged to the
    outermost Python frame still on the stack (the coroutine that called ``uvloop.run``, a
    task group, a watcher): entries with over IDLE_PER_CALL seconds of own time per call are
    that wait, not work, and are left out of the busy total and the ranking.
    """
    out: list[str] = []
    for path in sorted(profile_dir.glob("*.prof")):
        if path.name.startswith("supervisor"):
            continue
        try:
            stats = pstats.Stats(str(path))
        except Exception as exc:
            out.append(f"{path.name}: unreadable ({exc})")
            continue
        entries: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
        busy = {k: v for k, v in entries.items() if v[2] / max(v[0], 1) <= IDLE_PER_CALL}
        idle = sum(v[2] for k, v in entries.items() if k not in busy)
        total = sum(v[2] for v in busy.values()) or 1e-9
        out.append(f"== {path.name}: {total:.2f} s busy ({idle:.2f} s event-loop wait left out)")
        groups: dict[str, float] = {}
        for (file, _line, _func), v in busy.items():
            groups[_package(file)] = groups.get(_package(file), 0.0) + v[2]
        ranked_groups = sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:10]
        out.append(
            "   by package: "
            + ", ".join(f"{name} {100 * tt / total:.0f}%" for name, tt in ranked_groups)
        )
        ranked = sorted(busy.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        for (file, lineno, func), (_cc, calls, tt, ct, _callers) in ranked:
            out.append(
                f"  {100 * tt / total:5.1f}%  tt {tt:6.3f}s  cum {ct:6.3f}s  {calls:>9,}x  "
                f"{_short(file)}:{lineno}({func})"
            )
    return "\n".join(out)


def _short(file: str) -> str:
    for marker in ("site-packages/", f"{REPO_ROOT}/", "/lib/python3.11/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _package(file: str) -> str:
    """`dynamo_sdk/llm/frontend.py` -> `dynamo_sdk.llm.frontend`; `.../nats/aio/x.py` -> nats."""
    if file.startswith("~") or file.startswith("<"):
        return "builtins"
    short = _short(file)
    if short.startswith(("dynamo_sdk/", "benchmarks/", "examples/")):
        return short.removesuffix(".py").replace("/", ".")
    return short.split("/", 1)[0].removesuffix(".py")
