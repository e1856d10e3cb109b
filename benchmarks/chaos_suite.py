"""Chaos suite: each kind of component killed, paused or cut off under steady streamed load.

One row per scenario, each on a mocker graph served by `dynamo serve` on its embedded servers
(lease TTL 5 s) unless said otherwise, under a closed loop of ``--concurrency`` (32) streamed
completions (`chaos.one_stream`: 64-512 words in, 32-256 tokens out) plus a probe of new
requests (a 4-token stream on a fresh connection every ``--probe-interval`` seconds, failed
when it errs or takes over ``--probe-timeout`` seconds):

=============  ==================================================================================
worker         `benchmarks/chaos.py` itself: ``--worker-kills`` (100) random Worker SIGKILLs,
               3 Workers, migration on (the outage column is its longest gap between completions)
prefill        `graphs.disagg` on the torch engine (the mocker has no KV port, so it cannot
               disaggregate): 2 decode Workers, 2 PrefillWorkers, one SIGKILLed ``--kills``
               times; a decode worker whose KV does not come prefills locally
               (``Worker.prefill_timeout``, 10 s here)
processor      Frontend → 2 Processors (round robin) → 2 Workers; a Processor SIGKILLed. A
               Processor holds its streams' text: those are cut (counted apart)
router         Frontend → Processor → 2 Router services → 2 Workers; a Router SIGKILLed (the
               other, or the restarted one, routes)
frontend       2 Frontend processes on one inherited socket, 2 Workers; one SIGKILLed: its
               streams are cut (counted apart), new requests go to the other
nats           the embedded nats-server SIGKILLed ``--server-kills`` (3) times (`dynamo serve`
               restarts it on its port)
etcd-pause     etcd SIGSTOPped for ``--pause`` (15) seconds, then SIGCONT
etcd-kill      etcd SIGKILLed ``--server-kills`` times (restarted by the same watchdog)
partition      network namespaces: NATS + etcd in one, host A (Frontend + 2 Workers) and host
               B (a second `dynamo serve` of the workers-only graph `graphs.agg:Worker`, 2
               Workers) in two more, all on one bridge; host B's link is cut for ``--cut``
               (20) seconds: its workers must leave discovery within the lease TTL while
               requests go on on host A, and come back once the link is up. Needs root
               (``ip netns add``)
=============  ==================================================================================

Each row: streams completed / total; the failed ones in flight at a disruption ("cut": by the
killed Frontend or Processor, which hold their clients' streams) and the rest; the outage for
new requests (the longest window in which probes failed, and the slowest probe that
succeeded); the longest gap between completions; the processes the supervisor restarted
beyond the killed ones; the embedded servers it restarted. Targets: the issue's (worker >=
99.9% complete; etcd pause of 15 s and nats-server restart: <= 5 s of failed new requests and
no process restarted) and what each other scenario promises.

Usage::

    python benchmarks/chaos_suite.py [--scenario all | worker,nats,...] [--repeat 1]
        [--kills 6] [--worker-kills 100] [--concurrency 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import chaos
import harness  # noqa: F401 (first: puts the repository root on sys.path)
import psutil
from _common import json_safe
from chaos import Tally, load_session, stream_loop, up_workers
from harness.client import completion_body, http_client, stream_request
from harness.launch import ServeProcess, run_args, serve_graph, stop_graph
from harness.report import Target, check, format_targets, summary, table
from soak import MODEL, WORDS

from dynamo_sdk.serve.embedded import free_port
from dynamo_sdk.serve.supervisor import probe_readyz
from tests.serving import answers_a_completion

SCENARIOS = ("worker", "prefill", "processor", "router", "frontend", "nats", "etcd-pause",
             "etcd-kill", "partition")  # fmt: skip
LEASE_TTL = 5  # DYN_LEASE_TTL of every served process: seconds until a dead one leaves etcd
TINY_MODEL = "dynamo-tiny"  # the torch graphs' served name (configs/disagg.yaml)
RESTART = re.compile(r"(\w+:\d+) exited with code (-?\d+); restart #")
SERVER_BACK = re.compile(r"embedded (nats-server|etcd) is back")


# ---- the load ---------------------------------------------------------------------------------


@dataclass
class Probe:
    sent: float  # time.monotonic()
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class Disruption:
    t: float  # time.monotonic() it began
    until: float  # when it ended (a kill: the same instant)
    what: str  # "Worker:1", "etcd", "host B's link"
    pid: int = 0


@dataclass
class Outcome:
    tally: Tally
    probes: list[Probe]
    events: list[Disruption]
    run_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def tiny_request(rng: random.Random) -> dict[str, Any]:
    """The torch scenario's stream: 24-160 words (most over the 64 uncached tokens that go to a
    prefill worker, all inside the tiny model's 2,048), 16-48 tokens out."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(24, 160)))
    return completion_body(TINY_MODEL, prompt, rng.randint(16, 48))


async def probe_loop(
    url: str, model: str, stop: asyncio.Event, interval: float, timeout: float
) -> list[Probe]:
    """New requests, one every `interval` s, each on a new connection (a new client)."""
    probes: list[Probe] = []
    body = completion_body(model, "are you still there", 4)
    async with http_client("aiohttp", fresh=True) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                result = await asyncio.wait_for(stream_request(client, url, body), timeout)
                ok, why = result.ok, result.error
            except TimeoutError:
                ok, why = False, f"no answer within {timeout:g} s"
            probes.append(Probe(sent, time.monotonic() - sent, ok, "" if ok else why))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - sent)))
    return probes


async def under_load(
    url: str,
    args: argparse.Namespace,
    disrupt: Callable[[], Awaitable[list[Disruption]]],
    *,
    model: str = MODEL,
    make_body: Callable[[random.Random], dict[str, Any]] = chaos.random_request,
    concurrency: int | None = None,
) -> Outcome:
    """Streams and probes for a warm-up, `disrupt()`, then ``--settle`` seconds more."""
    tally = Tally()
    stop = asyncio.Event()
    streams = concurrency or args.concurrency
    async with load_session() as session:
        started = time.monotonic()
        loops = [asyncio.create_task(stream_loop(session, url, args.seed, i, tally, stop,
                                                 make_body)) for i in range(streams)]  # fmt: skip
        prober = asyncio.create_task(
            probe_loop(url, model, stop, args.probe_interval, args.probe_timeout)
        )
        try:
            await asyncio.sleep(args.warmup)
            events = await disrupt()
            await asyncio.sleep(args.settle)
        finally:
            stop.set()
            # every stream ends within the client's timeout (120 s); a loop still going
            # after that is cancelled, so the run is bounded whatever the graph does
            _, pending = await asyncio.wait([*loops, prober], timeout=150)
            for task in pending:
                task.cancel()
        probes = prober.result() if prober.done() and not prober.cancelled() else []
        return Outcome(tally, probes, events, time.monotonic() - started)


# ---- disruptions ------------------------------------------------------------------------------


async def ready_workers(serve: ServeProcess, service: str, workers: int) -> list[tuple[str, int]]:
    """(label, pid) of the `service` workers whose newest process answers /readyz."""
    out = []
    for label, pid in up_workers(serve, workers, 0.0, service):
        with contextlib.suppress(IndexError, ValueError):
            if await probe_readyz(serve.health_port(label), 1.0) is not None:
                out.append((label, pid))
    return out


def kill_service(
    serve: ServeProcess, service: str, workers: int, args: argparse.Namespace
) -> Callable[[], Awaitable[list[Disruption]]]:
    """SIGKILL a random ready `service` worker every ``--interval`` s, ``--kills`` times, only
    while all `workers` are ready (one must be there to take over); bounded by ``--max-s``."""

    async def disrupt() -> list[Disruption]:
        rng = random.Random(args.seed)
        events: list[Disruption] = []
        deadline = time.monotonic() + args.max_s
        while len(events) < args.kills and time.monotonic() < deadline:
            await asyncio.sleep(args.interval)
            up = await ready_workers(serve, service, workers)
            if len(up) < workers:
                continue
            label, pid = rng.choice(up)
            os.kill(pid, signal.SIGKILL)
            now = time.monotonic()
            events.append(Disruption(now, now, label, pid))
            print(f"  {service}: killed {label} (pid {pid}), {len(events)} of {args.kills}",
                  flush=True)  # fmt: skip
        return events

    return disrupt


def server_pid(serve: ServeProcess, name: str) -> int:
    """The pid of the embedded `name` (nats-server, etcd) `dynamo serve` runs now."""
    try:
        children = psutil.Process(serve.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
    return 0


def kill_server(
    serve: ServeProcess, name: str, args: argparse.Namespace
) -> Callable[[], Awaitable[list[Disruption]]]:
    """SIGKILL the embedded `name` ``--server-kills`` times, each once the last is back and
    ``--server-gap`` seconds have passed; bounded by ``--max-s``."""

    async def disrupt() -> list[Disruption]:
        events: list[Disruption] = []
        deadline = time.monotonic() + args.max_s
        while len(events) < args.server_kills and time.monotonic() < deadline:
            pid = server_pid(serve, name)
            if not pid:
                await asyncio.sleep(0.2)
                continue
            back = len(SERVER_BACK.findall(serve.output()))
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            while len(SERVER_BACK.findall(serve.output())) == back:
                if time.monotonic() - killed > 60:
                    raise RuntimeError(f"the embedded {name} did not come back within 60 s")
                await asyncio.sleep(0.05)
            events.append(Disruption(killed, time.monotonic(), name, pid))
            print(f"  {name}: killed (pid {pid}), back after {time.monotonic() - killed:.1f} s",
                  flush=True)  # fmt: skip
            await asyncio.sleep(args.server_gap)
        return events

    return disrupt


def pause_etcd(
    serve: ServeProcess, args: argparse.Namespace
) -> Callable[[], Awaitable[list[Disruption]]]:
    """SIGSTOP etcd for ``--pause`` seconds, then SIGCONT (in any case)."""

    async def disrupt() -> list[Disruption]:
        pid = server_pid(serve, "etcd")
        assert pid, "no embedded etcd"
        os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        try:
            await asyncio.sleep(args.pause)
        finally:
            os.kill(pid, signal.SIGCONT)
        print(f"  etcd: paused for {time.monotonic() - began:.1f} s", flush=True)
        return [Disruption(began, time.monotonic(), "etcd", pid)]

    return disrupt


# ---- scenarios on one `dynamo serve` ----------------------------------------------------------


@dataclass
class Spec:
    graph: str
    config: str
    overrides: list[str]
    ready: int  # "ready: instance" lines (every process registered) before the load starts
    victim: str  # the service killed, or the embedded server
    workers: int = 2  # of the victim's service
    model: str = MODEL
    make_body: Callable[[random.Random], dict[str, Any]] = chaos.random_request
    concurrency: int | None = None  # None: --concurrency


def spec_for(name: str, args: argparse.Namespace) -> Spec:
    mocker = f"--Worker.speedup={args.speedup}"
    agg = ["--Worker.ServiceArgs.workers=2", mocker, "--Frontend.router_mode=round_robin"]
    scale_out = ["--Frontend.processor=true", "--Frontend.ServiceArgs.workers=1",
                 "--Worker.ServiceArgs.workers=2", mocker]  # fmt: skip
    if name == "prefill":
        return Spec("graphs.disagg:Frontend", "configs/disagg.yaml",
                    ["--Frontend.ServiceArgs.workers=1", "--Worker.ServiceArgs.workers=2",
                     "--PrefillWorker.ServiceArgs.workers=2", "--Worker.prefill_timeout=10",
                     "--Frontend.router_mode=round_robin"],
                    ready=5, victim="PrefillWorker", model=TINY_MODEL, make_body=tiny_request,
                    concurrency=args.prefill_concurrency)  # fmt: skip
    if name == "processor":
        return Spec("graphs.agg_router:Frontend", "configs/agg_router.yaml",
                    [*scale_out, "--Processor.router_mode=round_robin",
                     "--Processor.ServiceArgs.workers=2"], ready=5, victim="Processor")  # fmt: skip
    if name == "router":
        return Spec("graphs.agg_router:Frontend", "configs/agg_router.yaml",
                    [*scale_out, "--Processor.router_mode=service",
                     "--Router.ServiceArgs.workers=2"], ready=6, victim="Router")  # fmt: skip
    if name == "frontend":
        return Spec(
            "graphs.agg:Frontend",
            "configs/agg_mocker.yaml",
            [*agg, "--Frontend.ServiceArgs.workers=2"],
            ready=4,
            victim="Frontend",
        )
    victim = {"nats": "nats-server", "etcd-pause": "etcd", "etcd-kill": "etcd"}[name]
    return Spec("graphs.agg:Frontend", "configs/agg_mocker.yaml",
                [*agg, "--Frontend.ServiceArgs.workers=1"], ready=3, victim=victim)  # fmt: skip


async def served_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = spec_for(name, args)
    port = free_port()
    serve = serve_graph(spec.graph, spec.config, spec.overrides, port=port,
                        log_path=Path(args.log_dir) / f"{name}_serve.log",
                        env={"DYN_LEASE_TTL": str(LEASE_TTL)})  # fmt: skip
    try:

        def ready() -> bool:
            return serve.output().count("ready: instance") >= spec.ready and (
                answers_a_completion(f"{serve.base}/v1", spec.model)
            )

        serve.wait_for(ready, 240, f"the {name} graph")
        before = len(serve.output())
        if name == "etcd-pause":
            disrupt = pause_etcd(serve, args)
        elif spec.victim in ("nats-server", "etcd"):
            disrupt = kill_server(serve, spec.victim, args)
        else:
            disrupt = kill_service(serve, spec.victim, spec.workers, args)
        outcome = await under_load(f"{serve.base}/v1/completions", args, disrupt,
                                   model=spec.model, make_body=spec.make_body,
                                   concurrency=spec.concurrency)  # fmt: skip
        log = serve.output()[before:]
    finally:
        stop_graph(serve)
    return make_row(name, spec.graph, outcome, [log], args)


# ---- the partition ----------------------------------------------------------------------------


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def netns_permitted() -> str:
    """Empty when network namespaces can be made here, else why not."""
    name = f"dycheck{os.getpid()}"
    try:
        sh("ip", "netns", "add", name)
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        return (
            f"`ip netns add` is not permitted here: {err.decode(errors='replace').strip() or exc}"
        )
    with contextlib.suppress(subprocess.SubprocessError):
        sh("ip", "netns", "del", name)
    return ""


class Network:
    """Three simulated hosts (servers, A, B) and this one, on a bridge in a switch namespace
    (a namespace of its own: the host's bridge netfilter settings do not apply there)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.prefix = f"dyc{tag}"
        self.subnet = f"10.213.{tag % 250 + 1}"
        self.switch = f"{self.prefix}sw"
        self.hosts = {"srv": f"{self.subnet}.1", "a": f"{self.subnet}.2", "b": f"{self.subnet}.3"}
        self.local = f"{self.subnet}.254"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def port(self, host: str) -> str:
        """The switch's port (a veth end in the switch namespace) for `host`."""
        return f"{self.prefix}{host}p"

    def up(self) -> None:
        sw = self.switch
        for ns in (sw, *(self.ns(h) for h in self.hosts)):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for host, address in self.hosts.items():
            ns, port, end = self.ns(host), self.port(host), f"{self.prefix}{host}e"
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", end)
            sh("ip", "link", "set", port, "netns", sw)
            sh("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
            sh("ip", "link", "set", end, "netns", ns)
            sh("ip", "-n", ns, "link", "set", end, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        here, port = f"{self.prefix}h", self.port("h")  # this host's own link to the switch
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", port)
        self.made.append(here)
        sh("ip", "link", "set", port, "netns", sw)
        sh("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.local}/24", "dev", here)
        sh("ip", "link", "set", here, "up")

    def link(self, host: str, up: bool) -> None:
        sh("ip", "-n", self.switch, "link", "set", self.port(host), "up" if up else "down")

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def down(self) -> None:
        """Remove every namespace and link made (deleting a namespace deletes its veths)."""
        for made in reversed(self.made):
            if made.startswith(self.prefix) and made.endswith("h"):
                subprocess.run(["ip", "link", "del", made], capture_output=True, timeout=30)
            else:
                subprocess.run(["ip", "netns", "del", made], capture_output=True, timeout=30)
        self.made.clear()


@contextlib.contextmanager
def servers_on(net: Network, workdir: Path) -> Iterator[dict[str, str]]:
    """NATS + etcd in the servers' namespace, on its address; yields their env."""
    workdir.mkdir(parents=True, exist_ok=True)
    env_file = workdir / "servers.json"
    env_file.unlink(missing_ok=True)
    log = open(workdir / "servers.log", "wb")  # closed below
    proc = subprocess.Popen(
        [*net.exec("srv"), sys.executable, str(Path(__file__).resolve()), "--serve-servers",
         net.hosts["srv"], "--log-dir", str(workdir)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the servers did not start: {(workdir / 'servers.log').read_text()}"
                )
            time.sleep(0.1)
        time.sleep(0.1)  # written whole (it is small) but read after the writer closed it
        yield json.loads(env_file.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def serve_servers(host: str, workdir: Path) -> None:
    """(``--serve-servers HOST``, inside the servers' namespace) run NATS + etcd on `host`
    until SIGTERM; their env (with the generated credentials) goes to a file only we read."""
    from dynamo_sdk.serve.embedded import _secret_file, start_embedded
    from dynamo_sdk.serve.procutil import die_with_parent

    die_with_parent()
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    shutil.rmtree(workdir / "servers", ignore_errors=True)  # a new etcd, not a last run's
    with start_embedded(workdir / "servers", host=host) as servers:
        _secret_file(workdir / "servers.json.tmp", json.dumps(servers.env()))
        os.replace(workdir / "servers.json.tmp", workdir / "servers.json")
        while not stop:
            time.sleep(0.2)


async def until(serve: ServeProcess, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """`ServeProcess.wait_for` without blocking the event loop (a runtime lives on it here)."""
    deadline = time.monotonic() + timeout
    while not ready():
        serve.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                               f"{serve.log_tail()}")  # fmt: skip
        await asyncio.sleep(0.2)


async def partition_scenario(args: argparse.Namespace) -> dict[str, Any]:
    from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings

    why = netns_permitted()
    if why:
        raise RuntimeError(why)
    log_dir = Path(args.log_dir)
    net = Network()
    serves: list[ServeProcess] = []
    runtime = None
    try:
        net.up()
        with servers_on(net, log_dir / "partition_servers") as servers:
            try:
                secret = secrets.token_urlsafe(32)  # one graph over two hosts: one secret
                env = {**servers, "DYN_LEASE_TTL": str(LEASE_TTL), "DYN_GRAPH_SECRET": secret}
                # this process's runtime reads the graph's env as its workers do (the servers'
                # URLs, credentials and TLS files: all of `EmbeddedServers.env()`)
                with mock.patch.dict(os.environ, env):
                    settings = RuntimeSettings.from_env()
                runtime = await DistributedRuntime.connect(settings)
                watcher = runtime.watcher("dynamo", "Worker", "generate")

                def instances() -> set[int]:
                    return set(watcher.instances)

                port = free_port()
                mocker = [f"--Worker.speedup={args.speedup}", "--Worker.ServiceArgs.workers=2"]
                a = serve_graph("graphs.agg:Frontend", "configs/agg_mocker.yaml",
                                [*mocker, "--Frontend.ServiceArgs.workers=1",
                                 "--Frontend.router_mode=round_robin",
                                 f"--Frontend.host={net.hosts['a']}"],
                                port=port, log_path=log_dir / "partition_host_a.log", env=env,
                                wrap=net.exec("a"))  # fmt: skip
                serves.append(a)
                a.base = f"http://{net.hosts['a']}:{port}"

                def a_ready() -> bool:
                    return (a.output().count("ready: instance") >= 3 and len(instances()) >= 2
                            and answers_a_completion(f"{a.base}/v1", MODEL))  # fmt: skip

                await until(a, a_ready, 120, "host A")
                on_a = instances()
                b = serve_graph("graphs.agg:Worker", "configs/agg_mocker.yaml", mocker,
                                port=free_port(), log_path=log_dir / "partition_host_b.log",
                                env=env, wrap=net.exec("b"))  # fmt: skip
                serves.append(b)
                await until(b, lambda: b.output().count("ready: instance") >= 2
                            and len(instances()) >= 4, 120, "host B's workers")  # fmt: skip
                on_b = instances() - on_a
                marks = [len(s.output()) for s in serves]
                timing: dict[str, Any] = {"workers_a": len(on_a), "workers_b": len(on_b)}

                async def disrupt() -> list[Disruption]:
                    net.link("b", up=False)
                    cut = time.monotonic()
                    print(
                        f"  partition: host B's link down ({len(on_b)} workers there)", flush=True
                    )
                    left = back = math.nan
                    while time.monotonic() - cut < args.cut:
                        if math.isnan(left) and not instances() & on_b:
                            left = time.monotonic() - cut
                            print(f"  partition: host B's workers left discovery after "
                                  f"{left:.1f} s", flush=True)  # fmt: skip
                        await asyncio.sleep(0.1)
                    net.link("b", up=True)
                    restored = time.monotonic()
                    while time.monotonic() - restored < 60:
                        if instances() >= on_b:
                            back = time.monotonic() - restored
                            break
                        await asyncio.sleep(0.1)
                    print(
                        f"  partition: link up; host B's workers back after {back:.1f} s",
                        flush=True,
                    )
                    timing.update(left_s=left, back_s=back, cut_s=restored - cut)
                    return [Disruption(cut, restored, "host B's link")]

                outcome = await under_load(f"{a.base}/v1/completions", args, disrupt)
                outcome.extra = timing
                logs = [s.output()[m:] for s, m in zip(serves, marks, strict=True)]
            finally:  # the graph and this runtime go before the servers they use
                if runtime is not None:
                    with contextlib.suppress(Exception):
                        await runtime.shutdown()
                for serve in reversed(serves):
                    with contextlib.suppress(Exception):
                        stop_graph(serve)
    finally:
        for serve in reversed(serves):  # (already stopped unless the servers failed)
            with contextlib.suppress(Exception):
                stop_graph(serve)
        net.down()
    return make_row("partition", "graphs.agg (host A) + graphs.agg:Worker (host B)", outcome,
                    logs, args)  # fmt: skip


# ---- rows -------------------------------------------------------------------------------------


def outage(probes: list[Probe], end: float) -> float:
    """The longest window in which new requests failed: from a failed probe's sending to the
    next one that succeeded (or the end), over runs of failures."""
    longest, since = 0.0, None
    for p in sorted(probes, key=lambda p: p.sent):
        if not p.ok and since is None:
            since = p.sent
        elif p.ok and since is not None:
            longest, since = max(longest, p.sent - since), None
    if since is not None:
        longest = max(longest, end - since)
    return longest


def restarts_in(logs: list[str], events: list[Disruption]) -> tuple[int, int, int]:
    """(every supervisor restart, those beyond one per kill of that process, embedded
    servers restarted)."""
    counts: dict[str, int] = {}
    for log in logs:
        for label, _ in RESTART.findall(log):
            counts[label] = counts.get(label, 0) + 1
    killed: dict[str, int] = {}
    for e in events:
        killed[e.what] = killed.get(e.what, 0) + 1
    beyond = sum(max(0, n - killed.get(label, 0)) for label, n in counts.items())
    servers = sum(len(SERVER_BACK.findall(log)) for log in logs)
    return sum(counts.values()), beyond, servers


def _why(error: str) -> str:
    """An error with its request and instance ids taken out, so that alike errors group."""
    error = re.sub(r"\b(chat)?cmpl-[0-9a-f]+(:[0-9a-f]+)?", "<request>", error)
    error = re.sub(r"\b[0-9a-f]{12,16}\b", "<id>", error)
    return error.removeprefix('HTTP 502: {"error":{"message":"')[:90]


def _top(errors: dict[str, int], n: int = 3) -> dict[str, int]:
    return dict(sorted(errors.items(), key=lambda kv: -kv[1])[:n])


def make_row(
    name: str, graph: str, outcome: Outcome, logs: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    t, events = outcome.tally, outcome.events
    cut: dict[str, int] = {}
    other: dict[str, int] = {}
    for sent, ended, why in t.spans:
        if not why:
            continue
        hit = any(sent <= e.until and ended >= e.t for e in events)
        bucket, key = (cut if hit else other), _why(why)
        bucket[key] = bucket.get(key, 0) + 1
    end = max((p.sent + p.seconds for p in outcome.probes), default=time.monotonic())
    done = sorted(t.finished_at)
    restarts, beyond, servers = restarts_in(logs, events)
    failed_probes = [p for p in outcome.probes if not p.ok]
    slowest_ok = max((p.seconds for p in outcome.probes if p.ok), default=math.nan)
    log = "\n".join(logs)
    total = t.completed + t.failed
    return {
        "scenario": name,
        "graph": graph,
        "disruptions": len(events),
        "events": [asdict(e) for e in events],
        "run_s": outcome.run_s,
        "streams": total,
        "completed": t.completed,
        "failed": t.failed,
        "share": t.completed / total if total else math.nan,
        "cut": sum(cut.values()),
        "cut_why": _top(cut),
        "failed_other": sum(other.values()),
        "other_why": _top(other),
        "probes": len(outcome.probes),
        "probes_failed": len(failed_probes),
        "probe_errors": _top(_count(_why(p.error) for p in failed_probes)),
        "outage_s": outage(outcome.probes, end),
        "slowest_probe_s": slowest_ok,
        "longest_gap_s": max((b - a for a, b in itertools.pairwise(done)), default=math.nan),
        "restarts": restarts,
        "restarts_beyond_kills": beyond,
        "server_restarts": servers,
        "migrations": log.count("continuing on another worker"),
        "local_prefill_fallbacks": log.count("no KV from a prefill worker"),
        "lease_regrants": log.count("etcd lease re-granted"),
        **outcome.extra,
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def worker_row(args: argparse.Namespace) -> dict[str, Any]:
    """The existing chaos run (`benchmarks/chaos.py`) as the suite's `worker` row."""
    ns = argparse.Namespace(kills=args.worker_kills, workers=3, concurrency=args.concurrency,
                            interval=2.0, min_up=3.0, speedup=args.speedup, seed=args.seed,
                            log_dir=args.log_dir, json=None)  # fmt: skip
    result = asyncio.run(chaos.run(ns))
    print("\n".join(chaos.report(result)[:2]), flush=True)
    t = result["tally"]
    total = t["completed"] + t["failed"]
    return {
        "scenario": "worker", "graph": "graphs.agg (3 mocker Workers)",
        "disruptions": result["kills"], "run_s": result["run_s"], "streams": total,
        "completed": t["completed"], "failed": t["failed"],
        "share": t["completed"] / total if total else math.nan,
        "cut": 0, "cut_why": {}, "failed_other": t["failed"], "other_why": _top(t["errors"]),
        "probes": 0, "probes_failed": 0, "probe_errors": {},
        "outage_s": math.nan, "slowest_probe_s": math.nan,
        "longest_gap_s": result["longest_gap_s"], "restarts": result["restarts"],
        "restarts_beyond_kills": max(0, result["restarts"] - result["kills"]),
        "server_restarts": 0, "migrations": result["migrations"],
        "exhausted": result["exhausted"], "chaos": result,
    }  # fmt: skip


def targets_for(row: dict[str, Any], args: argparse.Namespace) -> list[Target]:
    name = row["scenario"]
    share = row["share"] * 100
    outage_s, beyond = row["outage_s"], float(row["restarts_beyond_kills"])
    complete = check(f"{name}: every stream completes", share, "%", lambda v: v >= 100.0,
                     digits=3)  # fmt: skip
    no_restart = check(f"{name}: no process restarted beyond the killed", beyond, "restarts",
                       lambda v: v == 0)  # fmt: skip
    short = check(f"{name}: <= 5 s of failed new requests", outage_s, "s", lambda v: v <= 5.0,
                  digits=1)  # fmt: skip
    if name == "worker":
        return [check("issue: worker kills, >= 99.9% of streams complete", share, "%",
                      lambda v: v >= 99.9, digits=3), no_restart]  # fmt: skip
    if name in ("etcd-pause", "nats"):
        what = f"etcd pause of {args.pause:g} s" if name == "etcd-pause" else "nats-server restart"
        return [
            check(f"issue: {what}, <= 5 s of failed new requests", outage_s, "s",
                  lambda v: v <= 5.0, digits=1),
            check(f"issue: {what}, no process restarted", float(row["restarts"]), "restarts",
                  lambda v: v == 0),
            complete,
        ]  # fmt: skip
    if name in ("processor", "frontend"):
        kept = check(f"{name}: streams not on the killed one complete",
                     float(row["failed_other"]), "failed", lambda v: v == 0)  # fmt: skip
        return [kept, short, no_restart]
    if name == "partition":
        left = check("partition: host B leaves discovery within the lease TTL + 2 s",
                     row.get("left_s", math.nan), "s", lambda v: v <= LEASE_TTL + 2,
                     digits=1)  # fmt: skip
        back = check(
            "partition: host B's workers come back within 30 s",
            row.get("back_s", math.nan),
            "s",
            lambda v: v <= 30,
            digits=1,
        )
        return [left, back, complete, short, no_restart]
    return [complete, short, no_restart]  # prefill, router, etcd-kill


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    header = ("scenario", "events", "completed / streams", "share", "cut", "other failed",
              "outage s", "slowest ok s", "gap s", "restarts", "beyond kills",
              "servers")  # fmt: skip
    cells = []
    for r in rows:
        cells.append((
            r["scenario"], str(r["disruptions"]), f"{r['completed']:,} / {r['streams']:,}",
            fmt(r["share"] * 100, ".3f") + "%", str(r["cut"]), str(r["failed_other"]),
            fmt(r["outage_s"], ".1f"), fmt(r["slowest_probe_s"], ".1f"),
            fmt(r["longest_gap_s"], ".2f"), str(r["restarts"]), str(r["restarts_beyond_kills"]),
            str(r["server_restarts"]),
        ))  # fmt: skip
    lines = table(header, cells)
    for r in rows:
        notes = []
        if r["cut"]:
            notes.append(f"cut: {r['cut_why']}")
        if r["failed_other"]:
            notes.append(f"other failures: {r['other_why']}")
        if r["probes_failed"]:
            notes.append(f"{r['probes_failed']} of {r['probes']} probes failed: "
                         f"{r['probe_errors']}")  # fmt: skip
        if r.get("migrations"):
            notes.append(f"{r['migrations']} migrations")
        if r.get("local_prefill_fallbacks"):
            notes.append(f"{r['local_prefill_fallbacks']} local-prefill fallbacks")
        if r.get("lease_regrants"):
            notes.append(f"{r['lease_regrants']} leases re-granted")
        if "left_s" in r:
            notes.append(f"host B ({r['workers_b']} workers) left discovery after "
                         f"{fmt(r['left_s'], '.1f')} s, back {fmt(r['back_s'], '.1f')} s after "
                         f"the link came up")  # fmt: skip
        if notes:
            lines.append(f"  {r['scenario']}: " + "; ".join(notes))
    targets = [t for r in rows for t in r["targets_obj"]]
    return [*lines, "", *format_targets(targets), summary(targets)]


def spread(rows: list[dict[str, Any]]) -> list[str]:
    """Per scenario run more than once: min-max of the share, outage and gap."""
    out = []
    for name in dict.fromkeys(r["scenario"] for r in rows):
        runs = [r for r in rows if r["scenario"] == name]
        if len(runs) < 2:
            continue
        parts = []
        for key, unit in (("share", "%"), ("outage_s", "s"), ("slowest_probe_s", "s"),
                          ("longest_gap_s", "s"), ("cut", "")):  # fmt: skip
            values = [r[key] * (100 if key == "share" else 1) for r in runs]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if values:
                parts.append(f"{key} {min(values):.3g}-{max(values):.3g}{unit}")
        out.append(f"  {name} ({len(runs)} runs): " + ", ".join(parts))
    return ["spread:", *out] if out else []


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"scenario {name}", flush=True)
    if name == "worker":
        return worker_row(args)
    if name == "partition":
        return asyncio.run(partition_scenario(args))
    return asyncio.run(served_scenario(name, args))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="all", help=f"all, or some of {', '.join(SCENARIOS)}")
    p.add_argument("--repeat", type=int, default=1, help="runs of each scenario")
    p.add_argument("--concurrency", type=int, default=32, help="streams in the closed loop")
    p.add_argument("--prefill-concurrency", type=int, default=4, help="... on the torch graph")
    p.add_argument("--worker-kills", type=int, default=100, help="the worker scenario's")
    p.add_argument("--kills", type=int, default=6, help="kills of a Processor, Router, ...")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between those kills")
    p.add_argument("--server-kills", type=int, default=3, help="nats-server / etcd kills")
    p.add_argument("--server-gap", type=float, default=8.0, help="seconds after one is back")
    p.add_argument("--pause", type=float, default=15.0, help="seconds etcd is paused")
    p.add_argument("--cut", type=float, default=20.0, help="seconds host B's link is down")
    p.add_argument("--warmup", type=float, default=3.0, help="load before the first disruption")
    p.add_argument("--settle", type=float, default=10.0, help="load after the last one")
    p.add_argument("--max-s", type=float, default=240.0, help="a scenario's disruptions, at most")
    p.add_argument("--probe-interval", type=float, default=0.2)
    p.add_argument("--probe-timeout", type=float, default=10.0)
    run_args(p, speedup=20.0, log_dir="/tmp/dynamo-chaos-suite")
    p.add_argument("--serve-servers", metavar="HOST", help=argparse.SUPPRESS)  # the partition's
    args = p.parse_args()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if args.serve_servers:
        serve_servers(args.serve_servers, Path(args.log_dir))
        return
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    rows = []
    for _, name in itertools.product(range(args.repeat), names):
        try:
            row = run_one(name, args)
        except Exception as exc:  # one scenario that cannot run does not lose the others
            print(f"scenario {name} did not run: {type(exc).__name__}: {exc}", flush=True)
            row = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
    ran = [r for r in rows if "error" not in r]
    for r in ran:
        r["targets_obj"] = targets_for(r, args)
    print()
    print("\n".join(report(ran, args)))
    for line in spread(ran):
        print(line)
    for r in rows:
        if "error" in r:
            print(f"not run: {r['scenario']}: {r['error']}")
    for r in ran:
        r["targets"] = [asdict(t) for t in r.pop("targets_obj")]
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "serve_servers"}
        Path(args.json).write_text(
            json.dumps(json_safe({"settings": settings, "rows": rows}), indent=1, default=str)
        )
    sys.exit(0 if all("error" not in r for r in rows) else 1)


if __name__ == "__main__":
    main()
