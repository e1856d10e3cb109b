"""Run `dynamo serve` as a real subprocess and watch its output: tests and benchmarks share it.

`ServeProcess` is the one graph launcher of the repository: the end-to-end tests use it as is,
and `benchmarks/` (through `benchmarks/harness/launch.py`) with its optional extras: joining
external NATS/etcd (pass `NATS_SERVER`/`ETCD_ENDPOINTS` in `env`; without them `dynamo serve`
starts its own embedded servers), dying with the launching process, a process group of its own
(so a terminal's Ctrl-C reaches only the launcher, which then drains the graph), cProfile in
every served Python process, and a bounded stop by any signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
HELLO_DIR = REPO_ROOT / "examples" / "hello_world"
DYNAMO = [sys.executable, "-m", "dynamo_sdk.cli.main"]

# `python -c DIE_WITH_PARENT_LAUNCHER serve ...`: set the parent-death signal (prctl survives
# exec), then become `dynamo serve ...`. Not a preexec_fn: a launcher with threads (gRPC, say)
# can crash a child that runs Python code between fork and exec.
DIE_WITH_PARENT_LAUNCHER = (
    "import os, sys; from dynamo_sdk.serve.procutil import die_with_parent; die_with_parent(); "
    "os.execv(sys.executable, [sys.executable, '-m', 'dynamo_sdk.cli.main', *sys.argv[1:]])"
)

PROFILE_ENV = "DYNAMO_BENCH_PROFILE_DIR"
SITECUSTOMIZE = f'''\
"""Written by tests/serving.py (ServeProcess profile_dir=): cProfile this process, dump at exit."""
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


class ServeProcess:
    """`dynamo serve ...` in the background, its combined output in a log file.

    `env` is laid over this process's environment minus `NATS_SERVER`/`ETCD_ENDPOINTS`: a graph
    joins external servers only when `env` names them. The keyword-only extras are off by
    default: `die_with_parent` (the graph gets SIGTERM if this process dies), `new_session` (a
    process group of its own, out of reach of the terminal's Ctrl-C), `profile_dir` (every
    served Python process dumps `profile_dir/<Service>-<pid>.prof` at exit; the hook is a
    `sitecustomize.py` written beside the log and put first on `PYTHONPATH`), `wrap` (a
    command that runs it, e.g. ``["ip", "netns", "exec", "host-b"]``: one that execs, so the
    process started is `dynamo serve` itself).
    """

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        log_path: Path,
        die_with_parent: bool = False,
        new_session: bool = False,
        profile_dir: Path | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        self.log_path = log_path
        self.base = ""  # set by tests that serve HTTP
        full_env = dict(os.environ)
        for key in ("NATS_SERVER", "ETCD_ENDPOINTS"):
            full_env.pop(key, None)
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            site_dir = log_path.parent / f"{log_path.stem}-sitecustomize"
            site_dir.mkdir(parents=True, exist_ok=True)
            (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
            old = full_env.get("PYTHONPATH", "")
            full_env["PYTHONPATH"] = str(site_dir) + (os.pathsep + old if old else "")
            full_env[PROFILE_ENV] = str(profile_dir.resolve())
        command = [*DYNAMO, "serve", *args]
        if die_with_parent:
            command = [sys.executable, "-c", DIE_WITH_PARENT_LAUNCHER, "serve", *args]
        command = [*wrap, *command]
        self._log = open(log_path, "wb")
        self.started = time.monotonic()  # just before the launch: for "start to serving"
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL if new_session else None,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.output().splitlines()[-lines:])
        except OSError:
            return ""

    def check(self) -> None:
        """Raise RuntimeError (with the log's tail) if `dynamo serve` has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"dynamo serve exited with code {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"dynamo serve exited ({self.proc.returncode}) before {what}:\n{self.output()}"
                )
            time.sleep(0.2)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}:\n{self.output()}"
        )

    def worker_pids(self, label: str) -> list[int]:
        """PIDs the supervisor logged for `Service:index`, oldest first."""
        return [
            int(p) for p in re.findall(rf"started {re.escape(label)} \(pid (\d+)\)", self.output())
        ]

    def health_port(self, label: str) -> int:
        """The health port of the newest incarnation of `Service:index`."""
        pattern = rf"started {re.escape(label)} \(pid \d+\).*health port (\d+)"
        return int(re.findall(pattern, self.output())[-1])

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def interrupt(self, timeout: float = 40.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Send `sig` (SIGINT drains), then SIGKILL whatever is left after `timeout` seconds.

        Idempotent. The process tree is read before the signal, so that workers orphaned by a
        supervisor that exits without them are killed too.
        """
        if self.proc.poll() is None:
            before = self.descendants()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in {*before, *self.descendants()}:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


def post_stream(url: str, body: dict[str, object], timeout: float = 30.0) -> list[str]:
    """POST and return the non-empty lines of the streamed answer."""
    with httpx.stream("POST", url, json=body, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{response.status_code}: {response.text}")
        return [line for line in response.iter_lines() if line]


def answers_a_completion(base: str, model: str) -> bool:
    """Whether a one-token completion makes it through the served pipeline at ``base``."""
    body = {"model": model, "prompt": "ping", "max_tokens": 1}
    try:
        return httpx.post(f"{base}/completions", json=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_serving(
    serve: ServeProcess, url: str, body: dict[str, object], timeout: float = 60.0
) -> list[str]:
    """Retry the request until the whole graph answers it; return the answer."""
    answer: list[str] = []

    def ok() -> bool:
        nonlocal answer
        try:
            answer = post_stream(url, body, timeout=10)
        except (httpx.HTTPError, AssertionError):
            return False
        return not any('"error"' in line for line in answer)

    serve.wait_for(ok, timeout, f"{url} to answer")
    return answer


def run_dynamo(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*DYNAMO, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
