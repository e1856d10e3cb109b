"""This project against NVIDIA Dynamo 1.6.1, in the same run, with the same load generator.

What is measured
----------------
Two *sides* serve the same model folder (the project's tiny model, or ``--model``) on a mocker
engine (no model compute; a simulated vLLM: paged KV cache with prefix caching, continuous
batching, a timing model divided by a speedup factor):

* ``peer``: NVIDIA Dynamo 1.6.1 from PyPI, in its own venv (``--peer-venv``, default
  ``$HOME/dynamo-peer``; see ``/work/shared/notes/PEERS.md``): ``python -m dynamo.mocker`` and
  ``python -m dynamo.frontend`` with file discovery, the TCP request plane and ZMQ events (no
  NATS, no etcd), ``--speedup-ratio S``, ``--block-size B``, ``--num-gpu-blocks-override N``,
  ``--max-num-seqs M``, ``--num-workers W``.
* ``project``: ``dynamo serve GRAPH -f CONFIG`` (``--project-graph``/``--project-config``;
  default ``graphs.agg:Frontend -f agg_mocker.yaml`` where that config exists, else, and for
  the multi-turn workload, ``graphs.agg_router:Frontend -f agg_router.yaml``; configs are looked
  up in ``configs/``, then in the packaged ``dynamo_sdk/llm/configs/``) with ``--Worker.speedup=S
  --Worker.block_size=B --Worker.num_blocks=N --Worker.max_num_seqs=M
  --Worker.ServiceArgs.workers=W`` (``--project-args`` appends more overrides); ``dynamo serve``
  starts its own embedded NATS and etcd, as a user's would. ``--project-root`` serves another
  checkout (e.g. a ``git archive`` of a commit, when this tree is being edited under the run).

The two mockers' timing models are different code (the same shape: a fixed step cost plus
per-token prefill and per-sequence decode costs); ``--speedup`` (both sides, or
``--peer-speedup``/``--project-speedup``) divides both. The default single-request workload runs
them at 1000x, where engine time is negligible and what is compared is each side's serving
pipeline (HTTP, tokenization, routing, transport, detokenization). The multi-turn workload runs
them at 1x and prints each side's unloaded engine cost (``cold TTFT``, ``ITL``) next to its
results, so that a difference of the timing models is not read as a difference of the stacks;
by default it sets the project's mocker to Dynamo's unloaded costs (``--project-timing``:
``decode_ms_base`` 7.2 ms and ``prefill_ms_per_token`` 0.026 ms give the 7.3-7.4 ms ITL and
36-45 ms cold TTFT Dynamo 1.6.1's mocker shows here; "" keeps the project's own defaults).

The arms alternate: peer, project, peer, project, ... (``--repeats`` each). Every arm is a fresh
launch: its *start to serving* is the time from launching the first process to the first
successful streamed chat completion (polled every 50 ms with a fresh connection). Timing starts
only after every worker has registered (peer: one ``dynamo%2Fbackend%2Fgenerate%2F...`` entry per
worker under ``$DYN_FILE_KV/v1/instances``; project: one ``ready: instance`` line per Worker in
the supervisor's log) and after unmeasured warm-up requests.

``--workload single`` (default): streamed chat completions (``/v1/chat/completions``, one
short distinct user message each, ``max_tokens`` = ``--osl`` = 16 with ``ignore_eos`` so both
sides produce exactly 16 tokens; any other count is flagged), closed loops at each
``--concurrency`` (1, 8, 32, 64), with the client keeping one keep-alive connection per sending
task (``kept``) and opening a fresh connection per request (``fresh``; Dynamo 1.6.1's frontend
is much slower on reused connections). A cell runs for ``--duration`` seconds (3; at least
``--min-requests``, 200, and 4 per sending task; at most ``--requests``; ``--duration 0``:
exactly ``--requests``). Per cell: req/s, TTFT p50/p99, output tokens/s of each side and
project/peer ratios (medians over the repeats; *spread* is (max - min) / median over them).
A closed loop compares latencies at whatever load each side sustains: the side that serves
more requests per second has more of them competing at any moment. So, with kept connections,
the project also runs each cell paced at the req/s the peer reached in it (``kept@peer``
rows, ``--no-equal-load`` skips them): TTFT at the same load.

``--workload multiturn``: ``--sessions`` conversations (32) of ``--turns`` turns (4) at
``--concurrency`` sessions at a time (8), on ``--workers`` workers per side (4) with equal KV
budgets, KV-aware routing on both sides (``--router-mode kv``; the project's
``Frontend.router_mode`` or ``Router.mode``, whichever its config has). ``--system-prompts``
shared system prompts; turn k sends the system prompt, the earlier turns and a new user message;
the earlier assistant turns are fixed synthetic texts, not what the server generated, so that
both sides get byte-identical prompts (the cache can therefore reuse up to the previous turn's
prompt). Per side: cache reuse (the usage chunk's ``prompt_tokens_details.cached_tokens`` over
``prompt_tokens``; both sides report it), overall and by turn, TTFT p50/p99, req/s.

Targets (single workload; every cell): project req/s >= 1.0x peer, project TTFT p50 and p99 <=
peer's; and the project starts serving within 5 s (the median arm).

The client is ``benchmarks/harness/client.py`` (aiohttp by default, as ``vllm bench serve``).
One Python client process saturates near 2,000 streamed requests/s, so on a host with more than
4 CPUs the single workload's cells are spread over ``--client-procs`` processes (CPUs/4, at most
4; ``benchmarks/harness/spread.py``); every cell reports the busiest client process's CPU and
the report flags cells where it passed 85% of a core. Both sides' processes are started with a
process group of their own and the parent-death signal, and stopped (SIGINT, then SIGTERM, then
SIGKILL, bounded) on exit, errors, Ctrl-C and SIGTERM. Every wait is bounded.

Usage::

    python benchmarks/peer_bench.py [--workload single|multiturn] [--repeats 2]
        [--concurrency 1,8,32,64] [--connections kept,fresh] [--duration 3] [--osl 16]
        [--sides peer,project] [--speedup S] [--workers W] [--num-blocks 2048]
        [--project-graph G --project-config C --project-args '...'] [--peer-venv DIR]
        [--client-procs N] [--json out.json] [--png out.png] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import psutil
import uvloop
import yaml
from _common import interrupt_on_sigterm, json_safe, percentile, positive_ints, run_all
from harness.client import (
    CONNECTION_MODES,
    DEFAULT_CLIENT,
    ClientPool,
    LoadStats,
    RequestResult,
    chat_body,
    closed_loop,
    stream_request,
    summarize,
    wait_until_answers,
)
from harness.launch import (
    REPO_ROOT,
    ServeProcess,
    find_config,
    free_port,
    serve_graph,
    stop_graph,
)
from harness.plot import Panel, Series, plot_panels
from harness.report import Target, check, fmt, format_targets, table
from harness.spread import Cell, ChatLoad, auto_processes

TARGET_RPS_RATIO = 1.0  # project req/s >= this x peer, every cell
TARGET_START_S = 5.0  # project: launch to first successful chat completion

SIDES = ("peer", "project")
PEER_STOP_TIMEOUT = 10.0  # seconds after SIGINT, then as long again after SIGTERM
PEER_LAUNCHER = (  # `python -c PEER_LAUNCHER EXE ARGS...`: parent-death signal, then exec EXE
    "import os, sys; from dynamo_sdk.serve.procutil import die_with_parent; die_with_parent(); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
WORDS = (
    "river stone cloud apple music garden silver window paper candle forest ocean bridge "
    "mountain letter yellow orange purple number engine signal market summer winter token "
    "cache block router worker stream batch queue latency model frontend"
).split()


def default_project_graph(root: Path, workload: str) -> tuple[str, str]:
    """(graph, config) of the project's default mocker graph in the checkout at `root`.

    The single-request workload takes ``agg_mocker`` (one mocker worker behind the Frontend)
    where the checkout has it; the multi-turn one, and older checkouts, the KV-routed
    ``agg_router`` graph.
    """
    mocker = find_config("agg_mocker", root)
    if mocker is not None and workload == "single":
        return "graphs.agg:Frontend", mocker
    return "graphs.agg_router:Frontend", find_config("agg_router", root) or "agg_router"


# ---- the two sides -------------------------------------------------------------------------


class PeerArm:
    """NVIDIA Dynamo's mocker + frontend (file discovery, TCP request plane, ZMQ events)."""

    side = "peer"

    def __init__(self, args: argparse.Namespace, log_dir: Path, run: int) -> None:
        self.workers = args.workers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.kv_dir = Path(tempfile.mkdtemp(prefix="peer_kv_", dir=log_dir))
        python = str(Path(args.peer_venv) / "bin" / "python")
        common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        mocker = [python, "-m", "dynamo.mocker", "--model-path", str(args.model)]
        mocker += ["--model-name", args.model_name, *common]
        mocker += [
            "--speedup-ratio",
            f"{args.peer_speedup:g}",
            "--block-size",
            str(args.block_size),
        ]
        mocker += ["--num-gpu-blocks-override", str(args.num_blocks)]
        mocker += ["--max-num-seqs", str(args.max_num_seqs), "--num-workers", str(args.workers)]
        mocker += shlex.split(args.peer_mocker_args)
        frontend = [python, "-m", "dynamo.frontend", "--http-port", str(self.port), *common]
        if args.router_mode:
            frontend += ["--router-mode", args.router_mode]
            if args.router_mode == "kv":
                frontend += ["--kv-cache-block-size", str(args.block_size)]
        frontend += shlex.split(args.peer_frontend_args)
        env = {**os.environ, "DYN_FILE_KV": str(self.kv_dir), "PYTHONUNBUFFERED": "1"}
        for key in ("NATS_SERVER", "ETCD_ENDPOINTS"):
            env.pop(key, None)
        self.commands = {"mocker": mocker, "frontend": frontend}
        self.log_paths = {name: log_dir / f"peer-{run}-{name}.log" for name in self.commands}
        self._logs = [open(p, "wb") for p in self.log_paths.values()]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = time.monotonic()
        for (name, cmd), log in zip(self.commands.items(), self._logs, strict=True):
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-c", PEER_LAUNCHER, *cmd],
                cwd=log_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Dynamo's {name} exited with code {proc.returncode}:\n{self.log_tail()}"
                )

    def pids(self) -> list[int]:
        return _tree([p.pid for p in self.procs.values()])

    def registered(self) -> int:
        instances = self.kv_dir / "v1" / "instances"
        if not instances.is_dir():
            return 0
        return sum(p.name.startswith("dynamo%2Fbackend%2Fgenerate%2F") for p in instances.iterdir())

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name, path in self.log_paths.items():
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name} ({path}):\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL of the process groups; bounded, idempotent."""
        for sig, timeout in ((signal.SIGINT, PEER_STOP_TIMEOUT), (signal.SIGTERM, 5.0)):
            running = [p for p in self.procs.values() if p.poll() is None]
            if not running:
                break
            for proc in running:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            deadline = time.monotonic() + timeout
            for proc in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(deadline - time.monotonic(), 0.1))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: its own children
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for log in self._logs:
            log.close()


class ProjectArm:
    """This project's graph on its mocker engine, via tests/serving.py's ServeProcess."""

    side = "project"

    def __init__(self, args: argparse.Namespace, log_dir: Path, run: int) -> None:
        self.workers = args.workers
        self.port = free_port()
        overrides = [
            f"--Common.model={args.model}",
            f"--Common.served_model_name={args.model_name}",
            f"--Common.block_size={args.block_size}",
            f"--Worker.block_size={args.block_size}",
            f"--Worker.speedup={args.project_speedup:g}",
            f"--Worker.num_blocks={args.num_blocks}",
            f"--Worker.max_num_seqs={args.max_num_seqs}",
            f"--Worker.ServiceArgs.workers={args.workers}",
        ]
        if args.router_mode:
            overrides += project_router_overrides(args)
        if args.workload == "multiturn":
            overrides += shlex.split(args.project_timing)
        overrides += shlex.split(args.project_args)
        self.serve: ServeProcess = serve_graph(
            args.project_graph,
            args.project_config,
            overrides,
            port=self.port,
            log_path=log_dir / f"project-{run}.log",
            cwd=args.project_root,
        )
        self.base = self.serve.base
        self.started = self.serve.started
        self.command = " ".join(shlex.quote(a) for a in self.serve.proc.args)  # type: ignore[union-attr]

    def alive(self) -> None:
        self.serve.check()

    def pids(self) -> list[int]:
        return _tree([self.serve.proc.pid])

    def registered(self) -> int:
        try:
            text = self.serve.output()
        except OSError:
            return 0
        return len(set(_WORKER_READY.findall(text)))

    def log_tail(self, lines: int = 30) -> str:
        return self.serve.log_tail(lines)

    def stop(self) -> None:
        stop_graph(self.serve)


def project_router_overrides(args: argparse.Namespace) -> list[str]:
    """The override that sets the project's routing mode, wherever its config keeps it.

    Newer configs route in the Frontend (``Frontend.router_mode``), older ones in a Router
    service (``Router.mode``); a config with neither gets no override.
    """
    mode = args.router_mode.replace("-", "_")
    try:
        config = yaml.safe_load((args.project_root / args.project_config).read_text()) or {}
    except (OSError, yaml.YAMLError, TypeError):
        config = {}
    if "router_mode" in (config.get("Frontend") or {}):
        return [f"--Frontend.router_mode={mode}"]
    if "Router" in config:
        return [f"--Router.mode={mode}"]
    return []


def _tree(roots: list[int]) -> list[int]:
    """`roots` and all their descendants that are alive."""
    pids = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(root)
            pids += [proc.pid, *(c.pid for c in proc.children(recursive=True))]
    return pids


class CpuMeter:
    """CPU seconds (user + system) a side's processes spend between `start()` and `stop()`.

    Unlike wall-clock rates it barely moves when other processes load the host, so on a noisy
    machine it is the steadier measure of what a request costs each side.
    """

    def __init__(self, arm: Arm) -> None:
        self.arm = arm
        self.before: dict[int, float] = {}

    @staticmethod
    def _times(pids: list[int]) -> dict[int, float]:
        out = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system + t.children_user + t.children_system
        return out

    def start(self) -> None:
        self.before = self._times(self.arm.pids())

    def stop(self) -> float:
        after = self._times(self.arm.pids())
        return sum(t - self.before.get(pid, 0.0) for pid, t in after.items())


_WORKER_READY = re.compile(r"^\[Worker:(\d+)\].*ready: instance", re.M)

Arm = PeerArm | ProjectArm


def launch(side: str, args: argparse.Namespace, log_dir: Path, run: int) -> Arm:
    return PeerArm(args, log_dir, run) if side == "peer" else ProjectArm(args, log_dir, run)


async def bring_up(arm: Arm, args: argparse.Namespace) -> float:
    """Wait (bounded) for a first chat answer and every worker; returns start to serving (s)."""
    url = f"{arm.base}/v1/chat/completions"
    body = chat_body(args.model_name, [{"role": "user", "content": "ping"}], args.osl)
    await wait_until_answers(
        url,
        body,
        timeout=args.ready_timeout,
        alive=arm.alive,
        kind=args.http_client,
        interval=0.05,
        what=f"the {arm.side} side",
    )
    start_to_serving = time.monotonic() - arm.started
    deadline = time.monotonic() + args.ready_timeout
    while arm.registered() < arm.workers:
        arm.alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{arm.side}: {arm.registered()} of {arm.workers} workers registered after "
                f"{args.ready_timeout:.0f} s:\n{arm.log_tail()}"
            )
        await asyncio.sleep(0.05)
    return start_to_serving


# ---- workloads -----------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def single_prompt(index: int) -> str:
    """A short distinct user message for request `index` (the same on both sides)."""
    picked = [WORDS[(index * 7 + i * 3) % len(WORDS)] for i in range(24)]
    return f"request {index}: " + " ".join(picked)


@dataclass
class CellRun:
    """One side's closed loop at one (connection, concurrency) in one repeat."""

    side: str
    repeat: int
    connection: str
    concurrency: int
    stats: LoadStats
    server_cpu_s: float = math.nan  # the side's processes, during the cell
    client_cpu_pct: float = math.nan  # the load generator's busiest process, % of one core

    @property
    def cpu_ms_per_req(self) -> float:
        return self.server_cpu_s * 1e3 / self.stats.requests if self.stats.requests else math.nan


async def measure_single(
    arm: Arm, args: argparse.Namespace, repeat: int, earlier: Sequence[CellRun] = ()
) -> list[CellRun]:
    """Closed loops at each (connection, concurrency); for the project with kept connections,
    also a loop paced at the peer's req/s of the same cell in this repeat (`earlier`): a
    closed loop compares TTFTs at whatever load each side sustains, so the faster side meets
    more competing requests; the paced cell compares them at the same load."""
    url = f"{arm.base}/v1/chat/completions"
    out: list[CellRun] = []
    for connection in args.connections:
        load = ChatLoad(
            url, args.model_name, args.osl, single_prompt, kind=args.http_client,
            fresh=connection == "fresh", timeout=args.cell_timeout,
            max_concurrency=max(args.concurrency), processes=args.client_procs,
        )  # fmt: skip
        async with load:
            for conc in args.concurrency:
                arm.alive()
                meter = CpuMeter(arm)
                cell = Cell(conc, args.requests, args.duration, max(args.min_requests, 4 * conc))
                measured = await load.run(cell, on_start=meter.start)
                cpu = meter.stop()
                stats = summarize(measured.results, measured.wall, args.osl)
                run = CellRun(
                    arm.side, repeat, connection, conc, stats, cpu, measured.client_cpu_pct
                )
                out.append(run)
                peer = next(
                    (c for c in earlier if c.side == "peer" and c.repeat == repeat
                     and c.connection == connection and c.concurrency == conc),
                    None,
                )  # fmt: skip
                if args.equal_load and arm.side == "project" and peer is not None:
                    paced = await load.run(replace(cell, rate=peer.stats.req_per_s))
                    at_rate = summarize(paced.results, paced.wall, args.osl)
                    out.append(
                        CellRun(arm.side, repeat, f"{connection}@peer", conc, at_rate,
                                client_cpu_pct=paced.client_cpu_pct)
                    )  # fmt: skip
                print(
                    f"  ... {arm.side} #{repeat} {connection} c={conc}: {stats.req_per_s:,.0f} "
                    f"req/s, TTFT p50 {stats.ttft_p50_ms:.1f} ms p99 {stats.ttft_p99_ms:.1f} ms, "
                    f"server CPU {run.cpu_ms_per_req:.2f} ms/req, "
                    f"client {run.client_cpu_pct:.0f}%"
                    + (f", {stats.errors} errors ({stats.first_error})" if stats.errors else "")
                    + (f", {stats.short} not {args.osl} tokens" if stats.short else ""),
                    file=sys.stderr,
                )
    return out


@dataclass
class Conversation:
    system: str
    users: list[str]
    assistants: list[str]  # fixed synthetic answers that go into the next turns' history


def make_conversations(args: argparse.Namespace, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    systems = [
        f"system {seed}-{k}: " + words(rng, args.system_words) for k in range(args.system_prompts)
    ]
    return [
        Conversation(
            system=systems[s % len(systems)],
            users=[f"user {s}.{t}: " + words(rng, args.user_words) for t in range(args.turns)],
            assistants=[words(rng, args.osl) for _ in range(args.turns)],
        )
        for s in range(args.sessions)
    ]


def messages_for(conv: Conversation, turn: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": conv.system}]
    for t in range(turn):
        messages.append({"role": "user", "content": conv.users[t]})
        messages.append({"role": "assistant", "content": conv.assistants[t]})
    messages.append({"role": "user", "content": conv.users[turn]})
    return messages


@dataclass
class MultiturnRun:
    side: str
    repeat: int
    connection: str
    stats: LoadStats
    by_turn: list[dict[str, float]] = field(default_factory=list)
    cold_ttft_ms: float = math.nan  # unloaded, nothing cached: the engine's prefill cost
    cold_itl_ms: float = math.nan  # unloaded: the engine's decode step


async def measure_multiturn(arm: Arm, args: argparse.Namespace, repeat: int) -> list[MultiturnRun]:
    out: list[MultiturnRun] = []
    for index, connection in enumerate(args.connections):
        # A workload per connection mode (the same on both sides): nothing cached carries over.
        run = await multiturn_once(arm, args, repeat, connection, args.seed + 1000 * index)
        out.append(run)
        s = run.stats
        print(
            f"  ... {arm.side} #{repeat} multiturn {connection}: reuse {s.cache_hit_rate:.0%}, "
            f"TTFT p50 {s.ttft_p50_ms:.1f} ms p99 {s.ttft_p99_ms:.1f} ms, "
            f"{s.req_per_s:.1f} req/s"
            + (f", {s.errors} errors ({s.first_error})" if s.errors else ""),
            file=sys.stderr,
        )
    return out


async def multiturn_once(
    arm: Arm, args: argparse.Namespace, repeat: int, connection: str, seed: int
) -> MultiturnRun:
    url = f"{arm.base}/v1/chat/completions"
    conc = args.concurrency[0]
    conversations = make_conversations(args, seed)
    rng = random.Random(seed + 500)

    def unrelated_body() -> dict[str, Any]:
        """A turn-1-shaped prompt that shares nothing with the workload or earlier ones."""
        system = f"system {rng.random()}: " + words(rng, args.system_words)
        conv = Conversation(system, ["user " + words(rng, args.user_words)], [])
        return chat_body(args.model_name, messages_for(conv, 0), args.osl)

    records: list[tuple[int, RequestResult]] = []
    queue = list(range(len(conversations)))
    async with ClientPool(conc, args.http_client, fresh=connection == "fresh") as pool:

        async def warm_send(i: int, task: int) -> RequestResult:
            return await stream_request(pool[task], url, unrelated_body())

        async def session_runner(task: int) -> None:
            while queue:
                conv = conversations[queue.pop(0)]
                for turn in range(args.turns):
                    body = chat_body(args.model_name, messages_for(conv, turn), args.osl)
                    result = await stream_request(pool[task], url, body)
                    records.append((turn, result))
                    if not result.ok:
                        break

        # Unmeasured warm-up, then the unloaded engine cost (c=1, nothing cached).
        await closed_loop(warm_send, 2 * conc, conc, args.cell_timeout)
        cold = [r for r in [await warm_send(0, 0) for _ in range(8)] if r.ok]
        t0 = time.perf_counter()
        await run_all([session_runner(t) for t in range(conc)], args.cell_timeout, "sessions")
        wall = time.perf_counter() - t0
    run = MultiturnRun(
        arm.side,
        repeat,
        connection,
        summarize([r for _, r in records], wall, args.osl),
        cold_ttft_ms=percentile([r.ttft for r in cold], 50) * 1e3,
        cold_itl_ms=percentile([g for r in cold for g in r.itls], 50) * 1e3,
    )
    for turn in range(args.turns):
        turn_stats = summarize([r for t, r in records if t == turn], wall, args.osl)
        run.by_turn.append(
            {
                "turn": turn + 1,
                "requests": turn_stats.requests,
                "prompt_tokens": turn_stats.prompt_tokens / max(turn_stats.requests, 1),
                "cache_hit_rate": turn_stats.cache_hit_rate,
                "ttft_p50_ms": turn_stats.ttft_p50_ms,
                "ttft_p99_ms": turn_stats.ttft_p99_ms,
            }
        )
    return run


# ---- the run -------------------------------------------------------------------------------


@dataclass
class ArmRun:
    side: str
    repeat: int
    start_to_serving_s: float
    loadavg_1m: float  # the host's load before the launch: noise from other processes
    command: str = ""


@dataclass
class Results:
    settings: dict[str, Any] = field(default_factory=dict)
    arms: list[ArmRun] = field(default_factory=list)
    cells: list[CellRun] = field(default_factory=list)
    multiturn: list[MultiturnRun] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Running:
    """The arm now up, so that any exit path stops it (bounded, idempotent)."""

    arm: Arm | None = None

    @classmethod
    def stop(cls) -> None:
        arm, cls.arm = cls.arm, None
        if arm is not None:
            arm.stop()


async def run_benchmark(args: argparse.Namespace, log_dir: Path, results: Results) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    for repeat in range(args.repeats):
        for side in args.sides:
            loadavg = os.getloadavg()[0]
            print(f"  ... {side} #{repeat}: launching", file=sys.stderr)
            arm = launch(side, args, log_dir, repeat)  # in this (the loop's) thread: see PDEATHSIG
            Running.arm = arm
            try:
                start_s = await bring_up(arm, args)
                command = (
                    arm.command
                    if isinstance(arm, ProjectArm)
                    else " && ".join(" ".join(c) for c in arm.commands.values())
                )
                results.arms.append(ArmRun(side, repeat, start_s, loadavg, command))
                print(f"  ... {side} #{repeat}: serving after {start_s:.2f} s", file=sys.stderr)
                if args.workload == "single":
                    results.cells += await measure_single(arm, args, repeat, results.cells)
                else:
                    results.multiturn += await measure_multiturn(arm, args, repeat)
            finally:
                await asyncio.to_thread(Running.stop)


# ---- report --------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.median(good) if good else math.nan


def _spread(values: Sequence[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    if len(good) < 2:
        return math.nan
    mid = statistics.median(good)
    return (max(good) - min(good)) / mid if mid else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


METRICS = (
    "req_per_s", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s", "cpu_ms_per_req",
    "client_cpu_pct",
)  # fmt: skip
CLIENT_SATURATED_PCT = 85.0  # the busiest client process above this: the client's limit


def summarize_cells(results: Results, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per (connection, concurrency): each side's medians and spreads, and project/peer."""
    rows = []
    connections = list(args.connections)
    if args.equal_load and "kept" in connections:
        connections.append("kept@peer")  # the project paced at the peer's kept-cell req/s
    for connection in connections:
        for conc in args.concurrency:
            row: dict[str, Any] = {"connection": connection, "concurrency": conc}
            for side in SIDES:
                wanted = connection if side == "project" else connection.split("@")[0]
                cells = [
                    c
                    for c in results.cells
                    if c.side == side and c.connection == wanted and c.concurrency == conc
                ]
                row[f"{side}_runs"] = len(cells)
                row[f"{side}_errors"] = sum(c.stats.errors for c in cells)
                row[f"{side}_short"] = sum(c.stats.short for c in cells)
                for metric in METRICS:
                    values = [
                        getattr(c, metric) if hasattr(c, metric) else getattr(c.stats, metric)
                        for c in cells
                    ]
                    row[f"{side}_{metric}"] = _median(values)
                    row[f"{side}_{metric}_spread"] = _spread(values)
            for metric in METRICS:
                row[f"ratio_{metric}"] = _ratio(row[f"project_{metric}"], row[f"peer_{metric}"])
            rows.append(row)
    return rows


def saturation_notes(results: Results) -> list[str]:
    """Cells where the load generator, not the server, may have set the pace."""
    busy = [
        f"{c.side} {c.connection} c={c.concurrency} #{c.repeat} ({c.client_cpu_pct:.0f}%)"
        for c in results.cells
        if c.client_cpu_pct > CLIENT_SATURATED_PCT
    ]
    if not busy:
        return []
    return [
        f"the busiest client process was above {CLIENT_SATURATED_PCT:.0f}% of a core in "
        + ", ".join(busy)
        + ": those cells may measure the client; more --client-procs spread it (on a host "
        "with cores to spare)"
    ]


def start_times(results: Results, side: str) -> list[float]:
    return [a.start_to_serving_s for a in results.arms if a.side == side]


def evaluate_targets(results: Results, args: argparse.Namespace) -> list[Target]:
    targets: list[Target] = []
    if args.workload == "single":
        for row in results.summary:
            cell = f"{row['connection']} c={row['concurrency']}"
            if row["connection"].endswith("@peer"):  # equal load: the latencies compare
                for q in ("p50", "p99"):
                    key = f"ttft_{q}_ms"
                    targets.append(
                        check(
                            f"{cell}: at the peer's req/s, TTFT {q} <= peer",
                            row[f"ratio_{key}"],
                            "x",
                            lambda v: v <= 1.0,
                            f"{fmt(row[f'project_{key}'], 1)} vs {fmt(row[f'peer_{key}'], 1)} ms",
                        )
                    )
                continue
            targets.append(
                check(
                    f"{cell}: project req/s >= {TARGET_RPS_RATIO:g}x peer",
                    row["ratio_req_per_s"],
                    "x",
                    lambda v: v >= TARGET_RPS_RATIO,
                    f"{fmt(row['project_req_per_s'], 0)} vs {fmt(row['peer_req_per_s'], 0)}",
                )
            )
            for q in ("p50", "p99"):
                key = f"ttft_{q}_ms"
                targets.append(
                    check(
                        f"{cell}: project TTFT {q} <= peer (project/peer)",
                        row[f"ratio_{key}"],
                        "x",
                        lambda v: v <= 1.0,
                        f"{fmt(row[f'project_{key}'], 1)} vs {fmt(row[f'peer_{key}'], 1)} ms",
                    )
                )
    project = start_times(results, "project")
    peer = start_times(results, "peer")
    targets.append(
        check(
            f"project start to serving <= {TARGET_START_S:g} s (median arm)",
            _median(project) if project else None,
            "s",
            lambda v: v <= TARGET_START_S,
            (
                "runs "
                + ", ".join(f"{v:.2f}" for v in project)
                + (f"; peer median {_median(peer):.2f} s" if peer else "")
            ),
            digits=2,
        )
    )
    return targets


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def format_report(results: Results, args: argparse.Namespace) -> str:
    s = results.settings
    out = [
        f"NVIDIA Dynamo 1.6.1 (peer) vs this project, {s.get('workload')} workload, "
        f"{args.workers} worker(s) per side, speedup peer {args.peer_speedup:g} / project "
        f"{args.project_speedup:g}, {args.osl} output tokens, block size {args.block_size}, "
        f"{args.num_blocks} KV blocks per worker; {args.repeats} alternating run(s) per side; "
        f"client {args.http_client} in {args.client_procs} process(es); {s.get('cpus')} CPUs",
        f"project: {s.get('project_graph')} -f {s.get('project_config')} in "
        f"{s.get('project_root')}",
        "",
    ]
    header = ("side", "run", "start to serving s", "load avg before")
    rows = [
        (a.side, str(a.repeat), f"{a.start_to_serving_s:.2f}", f"{a.loadavg_1m:.2f}")
        for a in results.arms
    ]
    out += table(header, rows, left=1)
    out.append("")
    if args.workload == "single" and results.summary:
        out.append(
            "per cell (medians over the runs; ratio = project/peer; CPU ms/req = CPU time of "
            "the side's processes per request, the client's excluded; client % = the load "
            "generator's busiest process, % of one core; spread = (max-min)/median over the runs, "
            "peer/project):"
        )
        header = (
            "conn", "conc", "peer req/s", "proj req/s", "ratio", "peer TTFT p50", "proj p50",
            "ratio", "peer TTFT p99", "proj p99", "ratio", "peer tok/s", "proj tok/s", "ratio",
            "CPU ms/req peer", "proj", "ratio", "client % peer/proj", "spread req/s",
            "spread p50", "err peer/proj",
        )  # fmt: skip
        rows = []
        for r in results.summary:
            errors = f"{r['peer_errors']}/{r['project_errors']}"
            if r["peer_short"] or r["project_short"]:
                errors += f" ({r['peer_short']}/{r['project_short']} short!)"
            rows.append(
                (
                    r["connection"],
                    str(r["concurrency"]),
                    fmt(r["peer_req_per_s"], 1),
                    fmt(r["project_req_per_s"], 1),
                    _x(r["ratio_req_per_s"]),
                    fmt(r["peer_ttft_p50_ms"], 2),
                    fmt(r["project_ttft_p50_ms"], 2),
                    _x(r["ratio_ttft_p50_ms"]),
                    fmt(r["peer_ttft_p99_ms"], 2),
                    fmt(r["project_ttft_p99_ms"], 2),
                    _x(r["ratio_ttft_p99_ms"]),
                    fmt(r["peer_tokens_per_s"], 0),
                    fmt(r["project_tokens_per_s"], 0),
                    _x(r["ratio_tokens_per_s"]),
                    fmt(r["peer_cpu_ms_per_req"], 2),
                    fmt(r["project_cpu_ms_per_req"], 2),
                    _x(r["ratio_cpu_ms_per_req"]),
                    f"{fmt(r['peer_client_cpu_pct'], 0)}/{fmt(r['project_client_cpu_pct'], 0)}",
                    f"{_pct(r['peer_req_per_s_spread'])}/{_pct(r['project_req_per_s_spread'])}",
                    f"{_pct(r['peer_ttft_p50_ms_spread'])}/{_pct(r['project_ttft_p50_ms_spread'])}",
                    errors,
                )
            )
        out += table(header, rows, left=1)
        out.append("")
    if results.multiturn:
        out.append(
            f"multiturn: {args.sessions} sessions x {args.turns} turns, {args.concurrency[0]} "
            f"at a time, router {args.router_mode or 'default'}; reuse = cached / prompt "
            "tokens (usage.prompt_tokens_details); cold = unloaded, nothing cached (c=1)"
        )
        header = (
            "side", "run", "conn", "reqs", "err", "reuse", "reuse by turn", "TTFT p50",
            "TTFT p99", "p50 by turn", "req/s", "cold TTFT", "cold ITL",
        )  # fmt: skip
        rows = []
        for m in results.multiturn:
            st = m.stats
            rows.append(
                (
                    m.side,
                    str(m.repeat),
                    m.connection,
                    str(st.requests),
                    str(st.errors) + (f"/{st.short}!" if st.short else ""),
                    _pct(st.cache_hit_rate),
                    " ".join(_pct(b["cache_hit_rate"]) for b in m.by_turn),
                    fmt(st.ttft_p50_ms, 1),
                    fmt(st.ttft_p99_ms, 1),
                    " ".join(fmt(b["ttft_p50_ms"], 0) for b in m.by_turn),
                    fmt(st.req_per_s, 1),
                    fmt(m.cold_ttft_ms, 1),
                    fmt(m.cold_itl_ms, 2),
                )
            )
        out += table(header, rows, left=3)
        out.append("")
        for connection in args.connections:
            med = {
                side: {
                    key: _median(
                        [
                            getattr(m.stats, key) if key != "reuse" else m.stats.cache_hit_rate
                            for m in results.multiturn
                            if m.side == side and m.connection == connection
                        ]
                    )
                    for key in ("reuse", "ttft_p50_ms", "ttft_p99_ms")
                }
                for side in SIDES
            }
            out.append(
                f"multiturn {connection} (medians): reuse peer {_pct(med['peer']['reuse'])} / "
                f"project {_pct(med['project']['reuse'])}; TTFT p50 "
                f"{fmt(med['peer']['ttft_p50_ms'], 1)} / {fmt(med['project']['ttft_p50_ms'], 1)}"
                f" ms; p99 {fmt(med['peer']['ttft_p99_ms'], 1)} / "
                f"{fmt(med['project']['ttft_p99_ms'], 1)} ms"
            )
        out.append("")
    out += format_targets(results.targets)
    for note in results.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def write_png(results: Results, args: argparse.Namespace, path: Path) -> str | None:
    if args.workload == "single":
        panels = []
        for metric, label, yscale in (
            ("req_per_s", "req/s", "linear"),
            ("ttft_p50_ms", "TTFT p50 (ms)", "log"),
            ("ttft_p99_ms", "TTFT p99 (ms)", "log"),
        ):
            series = []
            for side in SIDES:
                for connection in args.connections:
                    rows = [r for r in results.summary if r["connection"] == connection]
                    xs = [r["concurrency"] for r in rows]
                    ys = [r[f"{side}_{metric}"] for r in rows]
                    style = {"marker": "o", "linestyle": "-" if connection == "kept" else "--"}
                    name = "Dynamo 1.6.1" if side == "peer" else "project"
                    series.append(Series(f"{name} {connection}", xs, ys, style))
            panels.append(
                Panel(series, "concurrency", label, xscale="log", yscale=yscale, grid=True,
                      xticks=args.concurrency, legend_size=7)
            )  # fmt: skip
        title = (
            f"streamed chat, {args.osl} tokens, {args.workers} worker(s), mocker speedup "
            f"{args.peer_speedup:g}/{args.project_speedup:g}, medians of {args.repeats} runs"
        )
        return plot_panels(path, panels, title, size=(15, 4.5))
    panels = []
    for metric, label in (("reuse", "cache reuse"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                          ("ttft_p99_ms", "TTFT p99 (ms)")):  # fmt: skip
        series = []
        for side in SIDES:
            xs, ys = [], []
            for index, connection in enumerate(args.connections):
                runs = [
                    m for m in results.multiturn if m.side == side and m.connection == connection
                ]
                values = [
                    m.stats.cache_hit_rate if metric == "reuse" else getattr(m.stats, metric)
                    for m in runs
                ]
                xs.append(index + 1)
                ys.append(_median(values))
            name = "Dynamo 1.6.1" if side == "peer" else "project"
            series.append(Series(name, xs, ys, {}))
        panels.append(
            Panel(series, "client connections", label, kind="bar", grid=True,
                  xtick_labels=args.connections, legend_loc="lower center")
        )  # fmt: skip
    title = (
        f"multi-turn: {args.sessions} sessions x {args.turns} turns, {args.workers} workers, "
        f"router {args.router_mode}"
    )
    return plot_panels(path, panels, title, size=(14, 4.2))


# ---- entry point ---------------------------------------------------------------------------


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", choices=("single", "multiturn"), default="single")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side")
    p.add_argument("--sides", type=_names(SIDES), default=list(SIDES), help="peer,project")
    p.add_argument(
        "--concurrency", type=positive_ints, default=None, help="single: 1,8,32,64; multiturn: 8"
    )
    p.add_argument(
        "--connections", type=_names(CONNECTION_MODES), default=list(CONNECTION_MODES),
        help="kept,fresh: keep-alive connections and/or a fresh connection per request",
    )  # fmt: skip
    p.add_argument(
        "--duration", type=float, default=3.0, help="seconds per cell (0: --requests each)"
    )
    p.add_argument("--requests", type=int, default=20_000, help="per cell, at most")
    p.add_argument(
        "--min-requests", type=int, default=200, help="per cell, at least (and >= 4 per task)"
    )
    p.add_argument("--osl", type=int, default=16, help="output tokens per request")
    p.add_argument(
        "--speedup", type=float, default=None, help="both mockers (single 1000, multiturn 1)"
    )
    p.add_argument("--peer-speedup", type=float, default=None)
    p.add_argument("--project-speedup", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="per side (single 1, multiturn 4)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per worker")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--router-mode", default=None, help="kv | round-robin | random (multiturn default kv)"
    )
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-words", type=int, default=200)
    p.add_argument("--user-words", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: tiny model)")
    p.add_argument("--model-name", default="tiny", help="served model name, both sides")
    p.add_argument(
        "--project-root",
        type=Path,
        default=REPO_ROOT,
        help="the checkout to serve (graphs, configs, dynamo_sdk); default this one",
    )
    p.add_argument(
        "--project-graph",
        default=None,
        help="default graphs.agg:Frontend with configs/agg_mocker.yaml where that exists, "
        "else (and for --workload multiturn) graphs.agg_router:Frontend",
    )
    p.add_argument("--project-config", default=None, help="see --project-graph")
    p.add_argument("--project-args", default="", help="more --Service.key=value overrides")
    p.add_argument(
        "--no-equal-load",
        dest="equal_load",
        action="store_false",
        help="skip the project's kept-connection cells paced at the peer's req/s",
    )
    p.add_argument(
        "--project-timing",
        default="--Worker.decode_ms_base=7.2 --Worker.prefill_ms_per_token=0.026",
        help="multiturn: the project mocker's timing, equal to Dynamo's unloaded costs",
    )
    p.add_argument("--peer-venv", type=Path, default=Path.home() / "dynamo-peer")
    p.add_argument("--peer-mocker-args", default="", help="more dynamo.mocker arguments")
    p.add_argument("--peer-frontend-args", default="", help="more dynamo.frontend arguments")
    p.add_argument("--http-client", choices=("aiohttp", "httpx"), default=DEFAULT_CLIENT)
    p.add_argument(
        "--client-procs", type=int, default=auto_processes(),
        help="single workload: load-generator processes (default: 1 up to 4 CPUs, else "
        "CPUs/4, at most 4); one Python client saturates near 2,000 streamed requests/s",
    )  # fmt: skip
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds per launch")
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--keep-logs", type=Path, default=None, help="keep both sides' logs here")
    args = p.parse_args(argv)
    multiturn = args.workload == "multiturn"
    args.project_root = args.project_root.resolve()
    graph, config = default_project_graph(args.project_root, args.workload)
    if args.project_graph is None:
        args.project_graph = graph
        args.project_config = args.project_config or config
    if args.concurrency is None:
        args.concurrency = [8] if multiturn else [1, 8, 32, 64]
    if args.workers is None:
        args.workers = 4 if multiturn else 1
    if args.speedup is None:
        args.speedup = 1.0 if multiturn else 1000.0
    args.peer_speedup = args.peer_speedup or args.speedup
    args.project_speedup = args.project_speedup or args.speedup
    if args.router_mode is None and multiturn:
        args.router_mode = "kv"
    if min(args.repeats, args.requests, args.osl, args.workers, args.client_procs) < 1:
        p.error("--repeats, --requests, --osl, --workers and --client-procs must be >= 1")
    if args.duration <= 0:
        args.duration = None
        args.min_requests = args.requests
    args.min_requests = min(args.min_requests, args.requests)
    if min(args.peer_speedup, args.project_speedup) <= 0:
        p.error("speedups must be > 0")
    python = args.peer_venv / "bin" / "python"
    if "peer" in args.sides and not python.exists():
        p.error(f"no {python}: install Dynamo 1.6.1 there (see /work/shared/notes/PEERS.md)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()  # outside the loop; inside, it cancels the run
    if args.model is None:
        from dynamo_sdk.llm.testing.tiny_model import build_tiny_model

        args.model = build_tiny_model()
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        log_dir = args.keep_logs.resolve()
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="peer_bench_"))
    results = Results()
    results.settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    started = time.monotonic()
    failed = False
    try:
        uvloop.run(run_benchmark(args, log_dir, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: stopping both sides", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        results.notes.append(f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        failed = True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # cleanup is bounded: not cut short
            signal.signal(sig, signal.SIG_IGN)
        Running.stop()
        if args.keep_logs is None:
            shutil.rmtree(log_dir, ignore_errors=True)
    results.settings["seconds"] = round(time.monotonic() - started, 1)
    if args.workload == "single":
        results.summary = summarize_cells(results, args)
        results.notes += saturation_notes(results)
    results.targets = evaluate_targets(results, args)
    print(format_report(results, args))
    if args.png is not None and (results.summary or results.multiturn):
        written = write_png(results, args, args.png)
        print(f"plot: {written}" if written else "plot: skipped (matplotlib is not installed)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(asdict(results)), indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
