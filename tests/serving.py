"""Test helper: run `dynamo serve` as a real subprocess and watch its output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
HELLO_DIR = REPO_ROOT / "examples" / "hello_world"
DYNAMO = [sys.executable, "-m", "dynamo_sdk.cli.main"]


class ServeProcess:
    """`dynamo serve ...` in the background, its combined output in a log file."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        log_path: Path,
    ) -> None:
        self.log_path = log_path
        self.base = ""  # set by tests that serve HTTP
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        for key in ("NATS_SERVER", "ETCD_ENDPOINTS"):
            full_env.pop(key, None)
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [*DYNAMO, "serve", *args],
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in self.descendants():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait()
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
