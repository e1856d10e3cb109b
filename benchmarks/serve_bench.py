"""Serving benchmark: TTFT, ITL and streamed-token throughput of served graphs over HTTP.

What is measured
----------------
* ``frontend`` cells: OpenAI ``POST /v1/completions`` with ``stream=true`` through the whole
  served graph (HTTP -> Frontend [-> Processor] -> Worker and back), for the echo engine
  (``--echo-config``, default ``agg_echo.yaml``: no model compute, so it is the framework's own
  cost) and the vLLM CPU engine (``--vllm-config``, default ``agg_vllm.yaml``, or ``agg.yaml``
  where that does not exist), both on ``--graph`` (default ``graphs.agg:Frontend``); configs
  are looked up in ``configs/``, then in the packaged ``dynamo_sdk/llm/configs/``. Every
  request asks for exactly ``--osl`` tokens (``ignore_eos: true``, ``temperature: 0``) after a
  prompt of about ``--isl`` tokens (repeated words, trimmed with the served model's tokenizer to
  ``--isl`` tokens exactly).
* ``direct`` cells (echo only): the same workload sent straight to the Worker endpoint
  ``dynamo/Worker/generate`` over the distributed runtime, as a Processor would send it (a
  ``PreprocessedRequest`` with the same token ids, ``max_tokens=osl``, ``ignore_eos``). The
  difference of TTFT p50 at concurrency 1 between the two paths is what the HTTP edge, the
  Frontend and the Processor add (target: < 2 ms).
* ``processor`` cells (echo only): the same requests sent to ``dynamo/Processor/generate`` over
  the runtime as the Frontend sends them (a ``ProcessorRequest``), which splits what the
  pipeline adds into the Processor hop and the HTTP edge plus Frontend; left out (with a note)
  when the graph serves no Processor (a Frontend that preprocesses and routes itself).

Per request (the shared client, ``benchmarks/harness/client.py``): TTFT is the time from
sending the request to the first chunk with non-empty text (direct: the first output with token
ids); ITL are the gaps between later content chunks (all requests' gaps pooled for the
percentiles); the output token count is the ``completion_tokens`` of the usage chunk
(``stream_options.include_usage``), direct: the number of ids received. The HTTP client is
aiohttp (``--http-client``; what ``vllm bench serve`` uses), one keep-alive connection per
sending task (``--connection fresh``: a new connection per request); httpx, the ``openai``
package's client, costs ~0.4-1.3 ms more per request in the client itself. A cell is a closed
loop: C tasks send ``--requests`` requests back to back (at least 2*C, so every task sends two);
tokens/s and req/s are over the cell's wall time, from its first request to its last answer.
Each engine gets unmeasured warm-up requests first.

How
---
This process starts a real ``nats-server`` and ``etcd`` (``start_embedded``) and serves each
graph with ``dynamo serve`` as a subprocess that joins them (``NATS_SERVER``/``ETCD_ENDPOINTS``;
the launcher is the tests' ``tests/serving.py:ServeProcess``), one graph at a time, so that it
can also reach the Worker over the runtime. Every wait is bounded; graphs and servers are
stopped on exit, errors, Ctrl-C and SIGTERM.

``--profile DIR`` profiles every served Python process with cProfile (a ``sitecustomize`` put on
the graph's ``PYTHONPATH`` dumps ``DIR/<Service>-<pid>.prof`` at exit) plus this client
(``client.prof``), and prints each process's top functions by own time.

Usage::

    python benchmarks/serve_bench.py [--engines echo,vllm] [--concurrency 1,8,32]
        [--requests N] [--isl 64] [--osl N] [--echo-extra 64:256] [--json out.json]
        [--http-client aiohttp|httpx] [--connection kept|fresh] [--profile DIR] [--vllm-bench]
        [--graph graphs.agg:Frontend] [--echo-config PATH] [--vllm-config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness  # noqa: F401 (first: puts the repository root on sys.path)
import msgspec
import uvloop
from _common import interrupt_on_sigterm, json_safe, positive_ints, profiled
from harness.client import (
    CONNECTION_MODES,
    DEFAULT_CLIENT,
    ClientPool,
    LoadStats,
    RequestResult,
    Send,
    closed_loop,
    completion_body,
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
from harness.profiling import format_profile
from harness.report import Target, check, fmt, format_targets, table

from dynamo_sdk.llm.protocol import (
    EngineOutput,
    PreprocessedRequest,
    ProcessorRequest,
    SamplingOptions,
    StopConditions,
    TextDelta,
    Usage,
)
from dynamo_sdk.runtime import DistributedRuntime, EndpointClient, RuntimeSettings
from dynamo_sdk.runtime.security import EtcdSecurity
from dynamo_sdk.serve.embedded import EmbeddedServers, start_embedded

# Targets (echo engine): what the pipeline adds to TTFT p50 at c=1, and streamed tokens/s.
TARGET_TTFT_ADDED_MS = 2.0
TARGET_ECHO_TOKENS_PER_S = 20_000.0

WORKER_TARGET = ("dynamo", "Worker", "generate")  # the Worker endpoint of graphs.agg
PROCESSOR_TARGET = ("dynamo", "Processor", "generate")


DEFAULT_GRAPH = "graphs.agg:Frontend"
DEFAULT_ECHO_CONFIG = find_config("agg_echo") or "configs/agg_echo.yaml"
DEFAULT_VLLM_CONFIG = find_config("agg_vllm") or find_config("agg") or "configs/agg.yaml"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    model: str  # the served model name
    default_requests: int
    default_osl: int
    ready_timeout: float  # seconds for the graph to answer its first request
    extra_args: tuple[str, ...] = ()


ENGINES: dict[str, EngineSpec] = {
    "echo": EngineSpec("echo", "echo", 64, 64, 90.0),
    "vllm": EngineSpec("vllm", "dynamo-tiny", 32, 32, 240.0, ("--Worker.max_num_seqs=32",)),
}


# ---- results ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Cell(LoadStats):
    """One measured cell: its load statistics and where they were taken."""

    engine: str
    path: str  # "frontend" (HTTP) | "processor" | "direct" (the Worker), over the runtime
    concurrency: int
    isl: int
    osl: int


@dataclass
class Results:
    cells: list[Cell] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vllm_bench: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def make_cell(engine: str, path: str, conc: int, isl: int, osl: int, stats: LoadStats) -> Cell:
    return Cell(engine=engine, path=path, concurrency=conc, isl=isl, osl=osl, **asdict(stats))


# ---- prompts ---------------------------------------------------------------------------------

WORDS = (
    "river stone cloud apple music garden silver window paper candle forest ocean bridge "
    "mountain letter yellow orange purple number engine signal market summer winter"
).split()


class Prompts:
    """Prompts of `isl` tokens (by the served model's tokenizer) from repeated words."""

    def __init__(self, isl: int) -> None:
        from dynamo_sdk.llm.model_resolver import resolve_model
        from dynamo_sdk.llm.tokenizer import Tokenizer

        self.isl = isl
        self.model_path = resolve_model("auto")
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, index: int) -> tuple[str, list[int]]:
        """The prompt text of request `index` and its token ids (BOS included, as served)."""
        variant = index % len(WORDS)  # different prompts: no prefix-cache shortcuts in vLLM
        if variant not in self._cache:
            self._cache[variant] = self._build(variant)
        return self._cache[variant]

    def _build(self, variant: int) -> tuple[str, list[int]]:
        words = [WORDS[(variant + i) % len(WORDS)] for i in range(self.isl)]
        text, ids = "", []
        for _ in range(4):  # shrink or grow a few times towards exactly isl tokens
            text = " ".join(words)
            ids = self.tokenizer.encode(text, add_special_tokens=True)
            if len(ids) == self.isl or not words:
                break
            per_word = max(len(ids) / len(words), 1e-3)
            want = max(round(len(words) + (self.isl - len(ids)) / per_word), 1)
            words = [WORDS[(variant + i) % len(WORDS)] for i in range(want)]
        return text, ids


# ---- requests over the runtime (past the HTTP edge) ------------------------------------------


async def direct_request(client: EndpointClient, request: PreprocessedRequest) -> RequestResult:
    """One request straight to the Worker endpoint: TTFT and ITLs over EngineOutput deltas."""
    clock = time.perf_counter
    result = RequestResult(ok=False)
    t0 = clock()
    last = math.nan
    try:
        async for out in client(request):
            now = clock()
            if out.error:
                result.error = out.error
                return result
            if out.token_ids:
                result.tokens += len(out.token_ids)
                if math.isnan(last):
                    result.ttft = now - t0
                else:
                    result.itls.append(now - last)
                last = now
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = clock() - t0
    result.ok = not math.isnan(result.ttft)
    if not result.ok:
        result.error = "no tokens in the stream"
    return result


async def processor_request(client: EndpointClient, request: ProcessorRequest) -> RequestResult:
    """One request straight to the Processor endpoint (what the Frontend sends it)."""
    clock = time.perf_counter
    result = RequestResult(ok=False)
    t0 = clock()
    last = math.nan
    usage: Usage | None = None
    try:
        async for delta in client(request):
            now = clock()
            if delta.usage is not None:
                usage = delta.usage
            if delta.text:
                if math.isnan(last):
                    result.ttft = now - t0
                else:
                    result.itls.append(now - last)
                last = now
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = clock() - t0
    result.tokens = usage.completion_tokens if usage is not None else 0
    result.ok = usage is not None and not math.isnan(result.ttft)
    if not result.ok:
        result.error = "no text or no usage in the stream"
    return result


def engine_request(model: str, ids: list[int], osl: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"bench-{uuid.uuid4().hex}",
        model=model,
        token_ids=ids,
        stop=StopConditions(max_tokens=osl, ignore_eos=True),
        sampling=SamplingOptions(temperature=0.0),
    )


async def wait_for_worker(client: EndpointClient, graph: ServeProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not client.instance_ids():
        graph.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the Worker endpoint did not appear in discovery")
        with contextlib.suppress(Exception):
            await client.wait_for_instance_ids(0.5)


async def has_instances(client: EndpointClient, timeout: float) -> bool:
    """Whether the endpoint has (or gets within `timeout` seconds) a live instance."""
    if client.instance_ids():
        return True
    with contextlib.suppress(Exception):
        await client.wait_for_instance_ids(timeout)
    return bool(client.instance_ids())


async def wait_for_no_worker(client: EndpointClient, timeout: float) -> None:
    """After a graph stopped: its Worker must leave discovery before the next graph starts."""
    for _ in range(max(int(timeout / 0.2), 1)):
        if not client.instance_ids():
            return
        await asyncio.sleep(0.2)


# ---- measurement -----------------------------------------------------------------------------


def cells_for(spec: EngineSpec, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(concurrency, osl) of the engine's frontend cells."""
    osl = args.osl or spec.default_osl
    cells = [(c, osl) for c in args.concurrency]
    if spec.name == "echo":
        cells += [cell for cell in args.echo_extra if cell not in cells]
    return cells


def n_requests(spec: EngineSpec, args: argparse.Namespace, conc: int) -> int:
    return max(args.requests or spec.default_requests, 2 * conc)


async def measure_engine(
    spec: EngineSpec,
    args: argparse.Namespace,
    graph: ServeProcess,
    runtime: DistributedRuntime,
    prompts: Prompts,
    results: Results,
) -> None:
    isl = args.isl
    url = f"{graph.base}/v1/completions"
    cells = cells_for(spec, args)
    max_conc = max(c for c, _ in cells)
    async with ClientPool(max_conc, args.http_client, fresh=args.connection == "fresh") as pool:
        await wait_until_answers(
            url,
            completion_body(spec.model, "hello", 4),
            timeout=spec.ready_timeout,
            alive=graph.check,
            kind=args.http_client,
            interval=0.5,
            what=f"the {spec.name} graph",
        )
        worker = runtime.endpoint_client(*WORKER_TARGET, response_type=EngineOutput)
        await wait_for_worker(worker, graph, 30.0)
        print(f"  ... {spec.name}: serving on {graph.base}", file=sys.stderr)

        def http_send(osl: int) -> Send:
            def send(i: int, task: int) -> Awaitable[RequestResult]:
                body = completion_body(spec.model, prompts.get(i)[0], osl)
                return stream_request(pool[task], url, body)

            return send

        processor = runtime.endpoint_client(*PROCESSOR_TARGET, response_type=TextDelta)

        def processor_send(osl: int) -> Send:
            def send(i: int, task: int) -> Awaitable[RequestResult]:
                body = completion_body(spec.model, prompts.get(i)[0], osl)
                request = msgspec.convert(
                    {"request_id": f"cmpl-{uuid.uuid4().hex}", "completion": body},
                    ProcessorRequest,
                )
                return processor_request(processor, request)

            return send

        def direct_send(osl: int) -> Send:
            def send(i: int, task: int) -> Awaitable[RequestResult]:
                return direct_request(worker, engine_request(spec.model, prompts.get(i)[1], osl))

            return send

        # Warm-up: connections, code paths and caches in every process.
        warm = min(max_conc, 32)
        warm_osl = cells[0][1]
        await closed_loop(http_send(warm_osl), 2 * warm, warm, args.cell_timeout)
        if spec.name == "echo":
            await closed_loop(direct_send(warm_osl), 2 * warm, warm, args.cell_timeout)

        senders = {"frontend": http_send, "processor": processor_send, "direct": direct_send}
        paths = list(senders) if spec.name == "echo" else ["frontend"]
        if "processor" in paths and not await has_instances(processor, 2.0):
            paths.remove("processor")  # graphs whose Frontend preprocesses and routes itself
            results.notes.append(
                f"{spec.name}: no processor cells: {args.graph} serves no "
                f"{'/'.join(PROCESSOR_TARGET)}"
            )
        for path in paths:
            for conc, osl in cells:
                graph.check()
                send = senders[path](osl)
                n = n_requests(spec, args, conc)
                runs, wall = await closed_loop(send, n, conc, args.cell_timeout)
                cell = make_cell(spec.name, path, conc, isl, osl, summarize(runs, wall, osl))
                results.cells.append(cell)
                print(
                    f"  ... {spec.name} {path} c={conc} osl={osl}: "
                    f"{cell.tokens_per_s:,.0f} tok/s, TTFT p50 {cell.ttft_p50_ms:.2f} ms"
                    + (f", {cell.errors} errors ({cell.first_error})" if cell.errors else ""),
                    file=sys.stderr,
                )


def run_vllm_bench(
    spec: EngineSpec, args: argparse.Namespace, graph: ServeProcess, prompts: Prompts
) -> list[dict[str, Any]]:
    """`vllm bench serve` against the running graph, one run per concurrency (bounded)."""
    exe = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    if not Path(exe).exists():
        return [{"skipped": "no `vllm` CLI"}]
    out: list[dict[str, Any]] = []
    osl = args.osl or spec.default_osl
    for conc in args.concurrency:
        cmd = [exe, "bench", "serve", "--backend", "vllm", "--base-url", graph.base]
        cmd += ["--endpoint", "/v1/completions", "--model", spec.model]
        cmd += ["--tokenizer", str(prompts.model_path), "--dataset-name", "random"]
        cmd += ["--random-input-len", str(args.isl), "--random-output-len", str(osl)]
        cmd += ["--num-prompts", str(n_requests(spec, args, conc))]
        cmd += ["--max-concurrency", str(conc), "--ignore-eos"]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.cell_timeout, cwd=REPO_ROOT
            )
            text = proc.stdout + proc.stderr
            out.append(
                {
                    "engine": spec.name,
                    "concurrency": conc,
                    "rc": proc.returncode,
                    "output": text[-4000:],
                }
            )
        except subprocess.TimeoutExpired:
            out.append({"engine": spec.name, "concurrency": conc, "rc": None, "output": "timeout"})
    return out


def evaluate_targets(results: Results) -> list[Target]:
    by_key = {(c.engine, c.path, c.concurrency, c.osl): c for c in results.cells}
    front = next(
        (
            c
            for c in results.cells
            if c.engine == "echo" and c.path == "frontend" and c.concurrency == 1
        ),
        None,
    )
    direct = by_key.get(("echo", "direct", 1, front.osl)) if front else None
    proc = by_key.get(("echo", "processor", 1, front.osl)) if front else None
    added = front.ttft_p50_ms - direct.ttft_p50_ms if front and direct else None
    detail = ""
    if front and direct:
        detail = f"frontend {front.ttft_p50_ms:.3f} ms - direct {direct.ttft_p50_ms:.3f} ms"
        if proc:
            detail += (
                f"; Processor hop {proc.ttft_p50_ms - direct.ttft_p50_ms:.3f} ms, "
                f"HTTP+Frontend {front.ttft_p50_ms - proc.ttft_p50_ms:.3f} ms"
            )
    echo_front = [c for c in results.cells if c.engine == "echo" and c.path == "frontend"]
    best = max(echo_front, key=lambda c: c.tokens_per_s, default=None)
    return [
        check(
            f"echo: pipeline adds < {TARGET_TTFT_ADDED_MS:g} ms to TTFT p50 at c=1",
            added,
            "ms",
            lambda v: v < TARGET_TTFT_ADDED_MS,
            detail,
        ),
        check(
            f"echo: >= {TARGET_ECHO_TOKENS_PER_S:,.0f} output tok/s through the frontend",
            best.tokens_per_s if best else None,
            "tok/s",
            lambda v: v >= TARGET_ECHO_TOKENS_PER_S,
            f"best cell c={best.concurrency} osl={best.osl}" if best else "",
        ),
    ]


# ---- report ----------------------------------------------------------------------------------


def format_report(results: Results) -> str:
    header = (
        "engine", "path", "conc", "isl", "osl", "reqs", "err", "TTFT p50", "TTFT p99",
        "ITL p50", "ITL p99", "e2e p50", "out tok/s", "req/s",
    )  # fmt: skip
    rows = [
        (
            c.engine,
            c.path,
            str(c.concurrency),
            str(c.isl),
            str(c.osl),
            str(c.requests),
            str(c.errors) + (f"/{c.short}!" if c.short else ""),
            fmt(c.ttft_p50_ms, 2),
            fmt(c.ttft_p99_ms, 2),
            fmt(c.itl_p50_ms, 3),
            fmt(c.itl_p99_ms, 3),
            fmt(c.e2e_p50_ms, 1),
            fmt(c.tokens_per_s, 0),
            fmt(c.req_per_s, 1),
        )
        for c in results.cells
    ]
    out = ["(times in ms; err/N! = N answers without exactly osl tokens)"]
    out += table(header, rows, left=2)
    out.append("")
    out += format_targets(results.targets)
    for note in results.notes:
        out.append(f"note: {note}")
    for run in results.vllm_bench:
        out.append(f"vllm bench serve {run.get('engine', '')} c={run.get('concurrency', '')}:")
        out.append(str(run.get("output", run.get("skipped", "")))[-2500:])
    return "\n".join(out)


def maybe_plot(results: Results, path: Path) -> str | None:
    """A PNG of tokens/s and TTFT p50 per concurrency, when matplotlib is installed."""
    series: dict[tuple[str, str, int], list[Cell]] = {}
    for c in results.cells:
        series.setdefault((c.engine, c.path, c.osl), []).append(c)
    tokens, ttft = [], []
    for (engine, route, osl), cells in series.items():
        cells.sort(key=lambda c: c.concurrency)
        label = f"{engine} {route} osl={osl}"
        xs = [c.concurrency for c in cells]
        tokens.append(Series(label, xs, [c.tokens_per_s for c in cells]))
        ttft.append(Series(label, xs, [c.ttft_p50_ms for c in cells]))
    panels = [
        Panel(tokens, "concurrency", "output tok/s", xscale="log", legend_size=7),
        Panel(ttft, "concurrency", "TTFT p50 (ms)", xscale="log", yscale="log", legend_size=7),
    ]
    return plot_panels(path, panels, size=(11, 4), dpi=100)


# ---- orchestration -----------------------------------------------------------------------------


class Session:
    """Servers and the graph now being served; `close()` stops them (bounded, idempotent)."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.servers: EmbeddedServers | None = None
        self.graph: ServeProcess | None = None

    def start_servers(self) -> dict[str, str]:
        self.servers = start_embedded()
        return self.servers.env()

    def serve(self, spec: EngineSpec) -> ServeProcess:
        assert self.servers is not None
        config = self.args.echo_config if spec.name == "echo" else self.args.vllm_config
        self.graph = serve_graph(
            self.args.graph,
            config,
            spec.extra_args,
            port=free_port(),
            log_path=self.log_dir / f"serve-{spec.name}.log",
            env=self.servers.env(),
            profile_dir=self.args.profile,
        )
        return self.graph

    def stop_graph(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            stop_graph(graph)

    def close(self) -> None:
        self.stop_graph()
        if self.servers is not None:
            self.servers.stop()
            self.servers = None


async def run_benchmark(args: argparse.Namespace, session: Session, results: Results) -> None:
    # SIGTERM cancels the measurement, so that cleanup runs as it does on Ctrl-C.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    env = session.start_servers()
    prompts = await asyncio.to_thread(Prompts, args.isl)
    settings = RuntimeSettings.from_env()  # DYN_RESPONSE_TRANSPORT etc., as the graph sees them
    settings.nats_url = env["NATS_SERVER"]
    settings.etcd_endpoints = env["ETCD_ENDPOINTS"].split(",")
    settings.etcd_security = EtcdSecurity.from_env({**os.environ, **env})  # embedded: TLS files
    runtime = await asyncio.wait_for(DistributedRuntime.connect(settings), 30.0)
    try:
        for name in args.engines:
            spec = ENGINES[name]
            if name == "vllm" and importlib.util.find_spec("vllm") is None:
                results.notes.append("vllm skipped: the vllm package is not importable")
                continue
            config = args.echo_config if name == "echo" else args.vllm_config
            print(f"  ... {name}: dynamo serve {args.graph} -f {config}", file=sys.stderr)
            graph = session.serve(spec)
            try:
                await measure_engine(spec, args, graph, runtime, prompts, results)
                if args.vllm_bench:
                    runs = await asyncio.to_thread(run_vllm_bench, spec, args, graph, prompts)
                    results.vllm_bench.extend(runs)
            finally:
                await asyncio.to_thread(session.stop_graph)
            worker = runtime.endpoint_client(*WORKER_TARGET, response_type=EngineOutput)
            await wait_for_no_worker(worker, 15.0)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.shutdown(), 5.0)


# ---- entry point -------------------------------------------------------------------------------


def _engines(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"engines are {', '.join(ENGINES)}; got {text!r}")
    return names


def _extra_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            conc, osl = (int(x) for x in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected CONC:OSL[,...], got {item!r}") from None
        if conc < 1 or osl < 1:
            raise argparse.ArgumentTypeError("CONC and OSL must be positive")
        cells.append((conc, osl))
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--engines", type=_engines, default=["echo", "vllm"], help="echo,vllm")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32], help="e.g. 1,8,32")
    parser.add_argument(
        "--requests", type=int, default=None, help="per cell (default: echo 64, vllm 32; >= 2*C)"
    )
    parser.add_argument("--isl", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--osl", type=int, default=None, help="output tokens (echo 64, vllm 32)")
    parser.add_argument(
        "--echo-extra",
        type=_extra_cells,
        default=[(64, 256)],
        help="extra echo frontend/direct cells CONC:OSL for the throughput target ('' for none)",
    )
    parser.add_argument("--graph", default=DEFAULT_GRAPH, help=f"default {DEFAULT_GRAPH}")
    parser.add_argument(
        "--echo-config", default=DEFAULT_ECHO_CONFIG, help=f"default {DEFAULT_ECHO_CONFIG}"
    )
    parser.add_argument(
        "--vllm-config", default=DEFAULT_VLLM_CONFIG, help=f"default {DEFAULT_VLLM_CONFIG}"
    )
    parser.add_argument(
        "--http-client",
        choices=("aiohttp", "httpx"),
        default=DEFAULT_CLIENT,
        help="HTTP client library (default aiohttp, as `vllm bench serve`)",
    )
    parser.add_argument(
        "--connection",
        choices=CONNECTION_MODES,
        default="kept",
        help="kept: one keep-alive connection per sending task; fresh: one per request",
    )
    parser.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell")
    parser.add_argument("--vllm-bench", action="store_true", help="also run `vllm bench serve`")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (needs matplotlib)")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile dumps here")
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep serve logs here")
    args = parser.parse_args(argv)
    if args.isl < 1 or (args.osl is not None and args.osl < 1):
        parser.error("--isl and --osl must be >= 1")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()  # outside the loop; inside, it cancels the run
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        log_dir = args.keep_logs
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    session = Session(args, log_dir)
    results = Results()
    started = time.monotonic()
    try:
        with profiled(args.profile, "client"):
            uvloop.run(run_benchmark(args, session, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: stopping the graph and servers", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if results.cells:
            print(format_report(results))
        return 1
    finally:
        # Cleanup is bounded; a second signal must not cut it short.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        session.close()
        if args.keep_logs is None:
            shutil.rmtree(log_dir, ignore_errors=True)

    results.targets = evaluate_targets(results)
    results.settings = {
        "engines": args.engines,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "isl": args.isl,
        "osl": args.osl,
        "echo_extra": args.echo_extra,
        "graph": args.graph,
        "echo_config": args.echo_config,
        "vllm_config": args.vllm_config,
        "http_client": args.http_client,
        "connection": args.connection,
        "response_transport": os.environ.get("DYN_RESPONSE_TRANSPORT", "tcp"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(format_report(results))
    if args.profile is not None:
        print(format_profile(args.profile))
    if args.plot is not None:
        plotted = maybe_plot(results, args.plot)
        print(f"plot: {plotted}" if plotted else "plot: skipped (matplotlib is not installed)")
    if args.json is not None:
        args.json.write_text(json.dumps(json_safe(asdict(results)), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
