"""Serving a graph for a benchmark: `tests.serving.ServeProcess`, the launcher the tests use.

`serve_graph()` runs ``dynamo serve GRAPH -f CONFIG --Frontend.port=PORT OVERRIDES...`` from
the repository root with the benchmark defaults: it dies with this process, sits in a process
group of its own (Ctrl-C reaches the benchmark, which then drains the graph), joins the servers
named in `env` (``NATS_SERVER``/``ETCD_ENDPOINTS``; without them `dynamo serve` starts its own
embedded ones) and can profile every served process. `stop_graph()` drains it with SIGINT and
kills what is left after `STOP_TIMEOUT` seconds.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from dynamo_sdk.serve.embedded import free_port
from harness import REPO_ROOT
from tests.serving import ServeProcess

STOP_TIMEOUT = 30.0  # seconds for `dynamo serve` to drain and exit before it is killed

__all__ = [
    "REPO_ROOT",
    "STOP_TIMEOUT",
    "ServeProcess",
    "find_config",
    "free_port",
    "run_args",
    "serve_graph",
    "stop_graph",
]

CONFIG_DIRS = ("configs", "dynamo_sdk/llm/configs")  # the repository's, the packaged ones


def find_config(name: str, root: Path = REPO_ROOT) -> str | None:
    """The path (relative to `root`) of config `name` (``agg_echo``), wherever it lives now.

    Configs live in ``configs/`` or, packaged, in ``dynamo_sdk/llm/configs/``; None if neither
    has it. A path works with every version of `dynamo serve -f`.
    """
    file = name if name.endswith(".yaml") else f"{name}.yaml"
    for folder in CONFIG_DIRS:
        if (root / folder / file).is_file():
            return f"{folder}/{file}"
    return None


def serve_graph(
    graph: str,
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    profile_dir: Path | None = None,
    port_key: str = "Frontend.port",
    cwd: Path = REPO_ROOT,
    wrap: Sequence[str] = (),
) -> ServeProcess:
    """Start `dynamo serve` for `graph` (e.g. ``graphs.agg:Frontend``); its HTTP on `port`.

    `cwd` (default: this checkout) is where the graph, its configs and, ahead of the installed
    package, `dynamo_sdk` itself are imported from: another checkout serves that tree. `wrap`
    runs it through a command that execs it (``ip netns exec HOST``: a graph on another
    simulated host).
    """
    args = [graph]
    if config:
        args += ["-f", str(config)]
    args += [f"--{port_key}={port}", *overrides]
    serve = ServeProcess(
        args,
        cwd=cwd,
        env=dict(env or {}),
        log_path=log_path,
        die_with_parent=True,
        new_session=True,
        profile_dir=profile_dir,
        wrap=wrap,
    )
    serve.base = f"http://127.0.0.1:{port}"
    return serve


def stop_graph(serve: ServeProcess, timeout: float = STOP_TIMEOUT) -> None:
    """Drain (SIGINT), then SIGKILL whatever is left after `timeout` seconds. Idempotent."""
    serve.stop(signal.SIGINT, timeout)


def run_args(p: argparse.ArgumentParser, *, speedup: float, log_dir: str) -> None:
    """The options every mocker-graph run takes: ``--speedup`` (the mocker's clock),
    ``--seed``, ``--log-dir`` (the graph's logs) and ``--json`` (the result)."""
    p.add_argument("--speedup", type=float, default=speedup, help="the mocker's clock speed-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=log_dir)
    p.add_argument("--json")
