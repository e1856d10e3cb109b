"""Serving benchmark: TTFT, ITL and streamed-token throughput of served graphs over HTTP.

What is measured
----------------
* ``frontend`` cells: OpenAI ``POST /v1/completions`` with ``stream=true`` through the whole
  served graph (HTTP -> Frontend -> Processor -> Worker and back), for the echo engine
  (``configs/agg_echo.yaml``: no model compute, so it is the framework's own cost) and the vLLM
  CPU engine (``configs/agg.yaml``). Every request asks for exactly ``--osl`` tokens
  (``ignore_eos: true``, ``temperature: 0``) after a prompt of about ``--isl`` tokens (repeated
  words, trimmed with the served model's tokenizer to ``--isl`` tokens exactly).
* ``direct`` cells (echo only): the same workload sent straight to the Worker endpoint
  ``dynamo/Worker/generate`` over the distributed runtime, as a Processor would send it (a
  ``PreprocessedRequest`` with the same token ids, ``max_tokens=osl``, ``ignore_eos``). The
  difference of TTFT p50 at concurrency 1 between the two paths is what the HTTP edge, the
  Frontend and the Processor add (target: < 2 ms).
* ``processor`` cells (echo only): the same requests sent to ``dynamo/Processor/generate`` over
  the runtime as the Frontend sends them (a ``ProcessorRequest``), which splits what the
  pipeline adds into the Processor hop and the HTTP edge plus Frontend.

Per request: TTFT is the time from sending the request to the first chunk with non-empty text
(direct: the first output with token ids); ITL are the gaps between later content chunks (all
requests' gaps pooled for the percentiles); the output token count is the ``completion_tokens``
of the usage chunk (``stream_options.include_usage``), direct: the number of ids received.
The HTTP client is aiohttp (``--http-client``; what ``vllm bench serve`` uses), one keep-alive
connection per sending task; httpx, the ``openai`` package's client, costs ~0.4-1.3 ms more per
request in the client itself. A cell is a closed loop: C tasks send ``--requests`` requests back
to back (at least 2*C, so every task sends two); tokens/s and req/s are over the cell's wall
time, from its first request to its last answer. Each engine gets unmeasured warm-up requests
first.

How
---
This process starts a real ``nats-server`` and ``etcd`` (``start_embedded``) and serves each
graph with ``dynamo serve`` as a subprocess that joins them (``NATS_SERVER``/``ETCD_ENDPOINTS``),
one graph at a time, so that it can also reach the Worker over the runtime. Every wait is
bounded; graphs and servers are stopped on exit, errors, Ctrl-C and SIGTERM.

``--profile DIR`` profiles every served Python process with cProfile (a ``sitecustomize`` put on
the graph's ``PYTHONPATH`` dumps ``DIR/<Service>-<pid>.prof`` at exit) plus this client
(``client.prof``), and prints each process's top functions by own time.

Usage::

    python benchmarks/serve_bench.py [--engines echo,vllm] [--concurrency 1,8,32]
        [--requests N] [--isl 64] [--osl N] [--echo-extra 64:256] [--json out.json]
        [--http-client aiohttp|httpx] [--profile DIR] [--vllm-bench]
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
import pstats
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil
import uvloop
from _common import interrupt_on_sigterm, json_safe, percentile, profiled

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
from dynamo_sdk.serve.embedded import EmbeddedServers, free_port, start_embedded

REPO_ROOT = Path(__file__).resolve().parent.parent

# Targets (echo engine): what the pipeline adds to TTFT p50 at c=1, and streamed tokens/s.
TARGET_TTFT_ADDED_MS = 2.0
TARGET_ECHO_TOKENS_PER_S = 20_000.0

WORKER_TARGET = ("dynamo", "Worker", "generate")  # the Worker endpoint of graphs.agg
PROCESSOR_TARGET = ("dynamo", "Processor", "generate")


@dataclass(frozen=True)
class EngineSpec:
    name: str
    config: str
    model: str  # the served model name
    default_requests: int
    default_osl: int
    ready_timeout: float  # seconds for the graph to answer its first request
    extra_args: tuple[str, ...] = ()


ENGINES: dict[str, EngineSpec] = {
    "echo": EngineSpec("echo", "configs/agg_echo.yaml", "echo", 64, 64, 90.0),
    "vllm": EngineSpec(
        "vllm",
        "configs/agg.yaml",
        "dynamo-tiny",
        32,
        32,
        240.0,
        ("--Worker.max_num_seqs=32",),
    ),
}

# `python -c LAUNCHER serve ...`: die with this process (prctl survives exec), then become
# `dynamo serve ...`.
LAUNCHER = (
    "import os, sys; from dynamo_sdk.serve.procutil import die_with_parent; die_with_parent(); "
    "os.execv(sys.executable, [sys.executable, '-m', 'dynamo_sdk.cli.main', *sys.argv[1:]])"
)
STOP_TIMEOUT = 30.0  # seconds for `dynamo serve` to drain and exit before it is killed
REQUEST_TIMEOUT = 120.0  # seconds for one streamed request
_TLS = ssl.create_default_context()  # loaded once, not once per client (plain HTTP anyway)
HttpClient = Any  # an httpx.AsyncClient or an aiohttp.ClientSession (see `http_client`)
PROFILE_ENV = "DYNAMO_BENCH_PROFILE_DIR"

SITECUSTOMIZE = f'''\
"""Written by benchmarks/serve_bench.py --profile: cProfile this process, dump at exit."""
import atexit
import cProfile
import os
import sys

_dir = os.environ.get("{PROFILE_ENV}")
if _dir:
    _profiler = cProfile.Profile()

    def _dump() -> None:
        _profiler.disable()
        argv = sys.argv
        name = "supervisor"
        if "--service" in argv:
            name = argv[argv.index("--service") + 1]
        _profiler.dump_stats(os.path.join(_dir, f"{{name}}-{{os.getpid()}}.prof"))

    atexit.register(_dump)
    _profiler.enable()
'''


# ---- results ---------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    ttft: float = math.nan  # seconds
    e2e: float = math.nan
    tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Cell:
    engine: str
    path: str  # "frontend" (HTTP) | "processor" | "direct" (the Worker), over the runtime
    concurrency: int
    isl: int
    osl: int
    requests: int
    errors: int
    short: int  # successful requests with fewer/more tokens than osl
    seconds: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    tokens_per_s: float
    req_per_s: float
    first_error: str = ""


@dataclass
class Target:
    name: str
    value: float | None
    unit: str
    passed: bool | None  # None: a cell it needs was not run
    detail: str = ""


@dataclass
class Results:
    cells: list[Cell] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vllm_bench: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def summarize(
    engine: str, path: str, conc: int, isl: int, osl: int, runs: list[RequestResult], wall: float
) -> Cell:
    good = [r for r in runs if r.ok]
    ttfts = [r.ttft for r in good]
    itls = [gap for r in good for gap in r.itls]
    tokens = sum(r.tokens for r in good)
    wall = max(wall, 1e-9)
    errors = [r for r in runs if not r.ok]
    return Cell(
        engine=engine,
        path=path,
        concurrency=conc,
        isl=isl,
        osl=osl,
        requests=len(good),
        errors=len(errors),
        short=sum(r.tokens != osl for r in good),
        seconds=round(wall, 3),
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p99_ms=percentile(ttfts, 99) * 1e3,
        itl_p50_ms=percentile(itls, 50) * 1e3,
        itl_p99_ms=percentile(itls, 99) * 1e3,
        e2e_p50_ms=percentile([r.e2e for r in good], 50) * 1e3,
        tokens_per_s=tokens / wall,
        req_per_s=len(good) / wall,
        first_error=errors[0].error if errors else "",
    )


# ---- the served graph ------------------------------------------------------------------------


class Graph:
    """`dynamo serve graphs.agg:Frontend -f <config>` joining our servers; output to a log."""

    def __init__(
        self, spec: EngineSpec, env: dict[str, str], log_dir: Path, profile_dir: Path | None
    ) -> None:
        self.spec = spec
        self.port = free_port()
        self.log_path = log_dir / f"serve-{spec.name}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        if profile_dir is not None:
            site_dir = log_dir / "sitecustomize"
            site_dir.mkdir(exist_ok=True)
            (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
            old = full_env.get("PYTHONPATH", "")
            full_env["PYTHONPATH"] = str(site_dir) + (os.pathsep + old if old else "")
            full_env[PROFILE_ENV] = str(profile_dir.resolve())
        cmd = [sys.executable, "-c", LAUNCHER, "serve", "graphs.agg:Frontend"]
        cmd += ["-f", spec.config, f"--Frontend.port={self.port}", *spec.extra_args]
        self._log = open(self.log_path, "wb")  # closed in stop()
        # A session of its own: Ctrl-C reaches this process only, which then drains the graph.
        # No preexec_fn: this process has gRPC (etcd) threads by now, and Python code between
        # fork and exec (die_with_parent loads libc with ctypes) can crash the child; LAUNCHER
        # sets the parent-death signal after exec instead.
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"dynamo serve ({self.spec.name}) exited with code {self.proc.returncode}:\n"
                + self.log_tail()
            )

    def stop(self) -> None:
        """SIGINT (drain), then SIGKILL of whatever is left after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            try:
                descendants = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                for child in descendants:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


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


# ---- clients ---------------------------------------------------------------------------------


class _SseTimer:
    """Times one streamed completion from its SSE bytes: TTFT, ITLs, usage, [DONE]."""

    def __init__(self, result: RequestResult, t0: float) -> None:
        self.result = result
        self.t0 = t0
        self.last = math.nan
        self.buffer = b""
        self.completion_tokens: int | None = None
        self.done = False

    def feed(self, data: bytes, now: float) -> bool:
        """Consume received bytes; False once an error chunk ended the request."""
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                self.done = True
                continue
            chunk = msgspec.json.decode(payload)
            if "error" in chunk:
                self.result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                return False
            usage = chunk.get("usage")
            if usage:
                self.completion_tokens = int(usage["completion_tokens"])
            choices = chunk.get("choices") or ()
            if choices and choices[0].get("text"):
                if math.isnan(self.last):
                    self.result.ttft = now - self.t0
                else:
                    self.result.itls.append(now - self.last)
                self.last = now
        return True

    def finish(self, now: float) -> RequestResult:
        result = self.result
        result.e2e = now - self.t0
        if not self.done or self.completion_tokens is None:
            result.error = "stream ended without [DONE] or without a usage chunk"
            return result
        result.tokens = self.completion_tokens
        result.ok = not math.isnan(result.ttft)
        if not result.ok:
            result.error = "no text in the stream"
        return result


async def http_request(client: HttpClient, url: str, body: dict[str, Any]) -> RequestResult:
    """One streamed completion: TTFT, ITLs and usage from the SSE chunks."""
    if isinstance(client, httpx.AsyncClient):
        return await _httpx_request(client, url, body)
    return await _aiohttp_request(client, url, body)


async def _httpx_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> RequestResult:
    clock = time.perf_counter
    result = RequestResult(ok=False)
    timer = _SseTimer(result, clock())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for data in response.aiter_bytes():
                if not timer.feed(data, clock()):
                    return result
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    return timer.finish(clock())


async def _aiohttp_request(client: Any, url: str, body: dict[str, Any]) -> RequestResult:
    import aiohttp

    clock = time.perf_counter
    result = RequestResult(ok=False)
    timer = _SseTimer(result, clock())
    try:
        async with client.post(url, json=body) as response:
            if response.status != 200:
                text = await response.text()
                result.error = f"HTTP {response.status}: {text[:200]}"
                return result
            async for data in response.content.iter_any():
                if not timer.feed(data, clock()):
                    return result
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    return timer.finish(clock())


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


Send = Callable[[int, int], Awaitable[RequestResult]]


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


async def closed_loop(
    send: Send, requests: int, concurrency: int, timeout: float
) -> tuple[list[RequestResult], float]:
    """`concurrency` tasks send `requests` requests back to back; returns results, wall time.

    `send(index, task)` gets the request's index and the number of the task sending it.
    """
    results: list[RequestResult] = []
    next_index = 0

    async def worker(task: int) -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            results.append(await send(index, task))

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(worker(t)) for t in range(concurrency)]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            raise TimeoutError(f"cell did not finish within {timeout:.0f} s")
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results, time.perf_counter() - t0


# ---- measurement -----------------------------------------------------------------------------


def completion_body(model: str, prompt: str, osl: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": osl,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def engine_request(model: str, ids: list[int], osl: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"bench-{uuid.uuid4().hex}",
        model=model,
        token_ids=ids,
        stop=StopConditions(max_tokens=osl, ignore_eos=True),
        sampling=SamplingOptions(temperature=0.0),
    )


async def wait_until_serving(graph: Graph, client: HttpClient, body: dict[str, Any]) -> None:
    """Retry one request until the whole graph answers it (bounded by the engine's timeout)."""
    deadline = time.monotonic() + graph.spec.ready_timeout
    last_error = ""
    while time.monotonic() < deadline:
        graph.check()
        result = await http_request(client, f"{graph.base}/v1/completions", body)
        if result.ok:
            return
        last_error = result.error
        await asyncio.sleep(0.5)
    raise TimeoutError(
        f"{graph.spec.name} graph did not answer within {graph.spec.ready_timeout:.0f} s "
        f"(last error: {last_error}):\n{graph.log_tail()}"
    )


async def wait_for_worker(client: EndpointClient, graph: Graph, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not client.instance_ids():
        graph.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the Worker endpoint did not appear in discovery")
        with contextlib.suppress(Exception):
            await client.wait_for_instance_ids(0.5)


async def wait_for_no_worker(client: EndpointClient, timeout: float) -> None:
    """After a graph stopped: its Worker must leave discovery before the next graph starts."""
    for _ in range(max(int(timeout / 0.2), 1)):
        if not client.instance_ids():
            return
        await asyncio.sleep(0.2)


def cells_for(spec: EngineSpec, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(concurrency, osl) of the engine's frontend cells."""
    osl = args.osl or spec.default_osl
    cells = [(c, osl) for c in args.concurrency]
    if spec.name == "echo":
        cells += [cell for cell in args.echo_extra if cell not in cells]
    return cells


def n_requests(spec: EngineSpec, args: argparse.Namespace, conc: int) -> int:
    return max(args.requests or spec.default_requests, 2 * conc)


def http_client(kind: str) -> Any:
    """One HTTP client (one keep-alive connection), as an async context manager.

    aiohttp is what `vllm bench serve` and most serving benchmarks use; httpx (what the
    `openai` package uses) costs ~1 ms more per request on a small host, which is the client's
    time, not the server's.
    """
    if kind == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=2.0),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, connect=10.0),
        )
    # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive timeout closes
    # them from its side (reusing one the server is closing fails with a ReadError).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0)
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, verify=_TLS)


async def measure_engine(
    spec: EngineSpec,
    args: argparse.Namespace,
    graph: Graph,
    runtime: DistributedRuntime,
    prompts: Prompts,
    results: Results,
) -> None:
    isl = args.isl
    url = f"{graph.base}/v1/completions"
    cells = cells_for(spec, args)
    max_conc = max(c for c, _ in cells)
    # One client (one keep-alive connection) per sending task: a shared pool scans all of its
    # connections on every request, which at c=64 costs the client more CPU than the parsing.
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(http_client(args.http_client)) for _ in range(max_conc)
        ]
        await wait_until_serving(graph, clients[0], completion_body(spec.model, "hello", 4))
        worker = runtime.endpoint_client(*WORKER_TARGET, response_type=EngineOutput)
        await wait_for_worker(worker, graph, 30.0)
        print(f"  ... {spec.name}: serving on {graph.base}", file=sys.stderr)

        def http_send(osl: int) -> Send:
            def send(i: int, task: int) -> Awaitable[RequestResult]:
                body = completion_body(spec.model, prompts.get(i)[0], osl)
                return http_request(clients[task], url, body)

            return send

        processor = runtime.endpoint_client(*PROCESSOR_TARGET, response_type=TextDelta)

        def processor_send(osl: int) -> Send:
            def send(i: int, task: int) -> Awaitable[RequestResult]:
                body = completion_body(spec.model, prompts.get(i)[0], osl)
                request = ProcessorRequest(f"cmpl-{uuid.uuid4().hex}", "completion", body)
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
        for path in paths:
            for conc, osl in cells:
                graph.check()
                send = senders[path](osl)
                n = n_requests(spec, args, conc)
                runs, wall = await closed_loop(send, n, conc, args.cell_timeout)
                cell = summarize(spec.name, path, conc, isl, osl, runs, wall)
                results.cells.append(cell)
                print(
                    f"  ... {spec.name} {path} c={conc} osl={osl}: "
                    f"{cell.tokens_per_s:,.0f} tok/s, TTFT p50 {cell.ttft_p50_ms:.2f} ms"
                    + (f", {cell.errors} errors ({cell.first_error})" if cell.errors else ""),
                    file=sys.stderr,
                )


def run_vllm_bench(
    spec: EngineSpec, args: argparse.Namespace, graph: Graph, prompts: Prompts
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
    targets: list[Target] = []
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
    targets.append(
        Target(
            f"echo: pipeline adds < {TARGET_TTFT_ADDED_MS:g} ms to TTFT p50 at c=1",
            added,
            "ms",
            None if added is None else added < TARGET_TTFT_ADDED_MS,
            (
                f"frontend {front.ttft_p50_ms:.3f} ms - direct {direct.ttft_p50_ms:.3f} ms"
                + (
                    f"; Processor hop {proc.ttft_p50_ms - direct.ttft_p50_ms:.3f} ms, "
                    f"HTTP+Frontend {front.ttft_p50_ms - proc.ttft_p50_ms:.3f} ms"
                    if proc
                    else ""
                )
                if front and direct
                else ""
            ),
        )
    )
    echo_front = [c for c in results.cells if c.engine == "echo" and c.path == "frontend"]
    best = max(echo_front, key=lambda c: c.tokens_per_s, default=None)
    targets.append(
        Target(
            f"echo: >= {TARGET_ECHO_TOKENS_PER_S:,.0f} output tok/s through the frontend",
            best.tokens_per_s if best else None,
            "tok/s",
            None if best is None else best.tokens_per_s >= TARGET_ECHO_TOKENS_PER_S,
            f"best cell c={best.concurrency} osl={best.osl}" if best else "",
        )
    )
    return targets


# ---- report ----------------------------------------------------------------------------------


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


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
            _fmt(c.ttft_p50_ms, 2),
            _fmt(c.ttft_p99_ms, 2),
            _fmt(c.itl_p50_ms, 3),
            _fmt(c.itl_p99_ms, 3),
            _fmt(c.e2e_p50_ms, 1),
            _fmt(c.tokens_per_s, 0),
            _fmt(c.req_per_s, 1),
        )
        for c in results.cells
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        rest = (cell.rjust(w) for cell, w in zip(row[2:], widths[2:], strict=True))
        return "  ".join([*left, *rest])

    out = ["(times in ms; err/N! = N answers without exactly osl tokens)", line(header)]
    out += [line(r) for r in rows]
    out.append("")
    if results.targets:
        out.append("targets:")
        name_width = max(len(t.name) for t in results.targets)
        for t in results.targets:
            value = "not run" if t.value is None else f"{t.value:,.{3 if t.unit == 'ms' else 0}f}"
            verdict = {True: "PASS", False: "MISS", None: "SKIP"}[t.passed]
            unit = "" if t.value is None else t.unit
            detail = f"  ({t.detail})" if t.detail else ""
            out.append(f"  {t.name.ljust(name_width)}  {value:>10} {unit:<5}  {verdict}{detail}")
    for note in results.notes:
        out.append(f"note: {note}")
    for run in results.vllm_bench:
        out.append(f"vllm bench serve {run.get('engine', '')} c={run.get('concurrency', '')}:")
        out.append(str(run.get("output", run.get("skipped", "")))[-2500:])
    return "\n".join(out)


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


IDLE_PER_CALL = 0.25  # seconds of own time per call above which an entry is event-loop wait


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


def maybe_plot(results: Results, path: Path) -> str | None:
    """A PNG of tokens/s and TTFT p50 per concurrency, when matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str, int], list[Cell]] = {}
    for c in results.cells:
        series.setdefault((c.engine, c.path, c.osl), []).append(c)
    for (engine, route, osl), cells in series.items():
        cells.sort(key=lambda c: c.concurrency)
        label = f"{engine} {route} osl={osl}"
        xs = [c.concurrency for c in cells]
        ax1.plot(xs, [c.tokens_per_s for c in cells], marker="o", label=label)
        ax2.plot(xs, [c.ttft_p50_ms for c in cells], marker="o", label=label)
    ax1.set(xscale="log", xlabel="concurrency", ylabel="output tok/s")
    ax2.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="TTFT p50 (ms)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


# ---- orchestration -----------------------------------------------------------------------------


class Session:
    """Servers and the graph now being served; `close()` stops them (bounded, idempotent)."""

    def __init__(self, log_dir: Path, profile_dir: Path | None) -> None:
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.servers: EmbeddedServers | None = None
        self.graph: Graph | None = None

    def start_servers(self) -> dict[str, str]:
        self.servers = start_embedded()
        return self.servers.env()

    def serve(self, spec: EngineSpec) -> Graph:
        assert self.servers is not None
        self.graph = Graph(spec, self.servers.env(), self.log_dir, self.profile_dir)
        return self.graph

    def stop_graph(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.stop()

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
    runtime = await asyncio.wait_for(DistributedRuntime.connect(settings), 30.0)
    try:
        for name in args.engines:
            spec = ENGINES[name]
            if name == "vllm" and importlib.util.find_spec("vllm") is None:
                results.notes.append("vllm skipped: the vllm package is not importable")
                continue
            print(f"  ... {name}: starting dynamo serve ({spec.config})", file=sys.stderr)
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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,8,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


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
    parser.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="e.g. 1,8,32")
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
    parser.add_argument(
        "--http-client",
        choices=("aiohttp", "httpx"),
        default="aiohttp" if importlib.util.find_spec("aiohttp") else "httpx",
        help="HTTP client library (default aiohttp, as `vllm bench serve`)",
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
    session = Session(log_dir, args.profile)
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
        "http_client": args.http_client,
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
