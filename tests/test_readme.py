"""Every command in the README runs, as written, so the README stays true.

Each code block carries a `<!-- readme-test: HOW -->` line saying how it runs; a block
without one fails the first test, so no command can be added untested:

* `serve`: started in the background as a person would in a terminal (in a process group of
  its own, on its own embedded NATS and etcd), until it prints its `ready:` line; the `call`
  and `python` blocks after it then run against it; then Ctrl-C (SIGINT to the whole group)
  must stop it cleanly. A serve with no call block must answer a chat for the model it lists.
* `run`: runs to completion and must exit 0.
* `call`: each command must exit 0 and print no error body. `python`: runs against the serve.
* `module`: Python that must run on its own (the SDK example). `config GRAPH`: YAML that must
  plan with that graph. `skip (why)`: not run, with the reason in the README itself.

Port 8000 becomes a free port everywhere (a `--Frontend.port` or `--http-port` flag for
servers, the URL for clients), so the test runs beside anything else.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.serve.embedded import free_port
from tests.serving import REPO_ROOT

README = REPO_ROOT / "README.md"
ANNOTATED = re.compile(
    r"<!-- readme-test: (?P<how>[^>]*?) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S
)
ANY_BLOCK = re.compile(r"^```(?P<lang>\w+)$", re.M)
CHECKED_LANGS = {"bash", "python", "yaml"}


@dataclass
class Block:
    how: str
    lang: str
    body: str


@dataclass
class Scenario:
    serve: Block
    calls: list[Block] = field(default_factory=list)

    @property
    def vllm(self) -> bool:
        return "vllm" in self.serve.how.split()


def blocks() -> list[Block]:
    text = README.read_text()
    return [Block(m["how"].strip(), m["lang"], m["body"]) for m in ANNOTATED.finditer(text)]


def scenarios() -> list[Scenario]:
    """Each serve block with the call blocks after it (a skipped block between them does not
    end the scenario; a run, module or config block does)."""
    out: list[Scenario] = []
    current: Scenario | None = None
    for block in blocks():
        kind = block.how.split()[0]
        if kind == "serve":
            current = Scenario(block)
            out.append(current)
        elif kind in ("run", "module", "config"):
            current = None
        elif kind in ("call", "python") and current is not None:
            current.calls.append(block)
    return out


def test_every_command_block_says_how_it_is_tested() -> None:
    text = README.read_text()
    checked = [m["lang"] for m in ANY_BLOCK.finditer(text) if m["lang"] in CHECKED_LANGS]
    annotated = [b for b in blocks() if b.lang in CHECKED_LANGS]
    assert len(annotated) == len(checked), "a README code block has no readme-test line"
    kinds = {b.how.split()[0] for b in annotated}
    assert kinds <= {"serve", "run", "call", "python", "module", "config", "skip"}, kinds
    calls = [b for b in annotated if b.how.split()[0] in ("call", "python")]
    served = [c for s in scenarios() for c in s.calls]
    assert len(served) == len(calls), "a call block follows no serve block"


def _shell(body: str) -> str:
    """A bash script of the block, with `dynamo` on PATH as the README says."""
    return f"set -e\nsource {REPO_ROOT}/.venv/bin/activate\n{body}\n"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_SERVER", "ETCD_ENDPOINTS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _on_port(body: str, port: int) -> str:
    """Servers of the block listen on `port` instead of 8000."""
    lines = []
    for line in body.splitlines():
        command, hash_, comment = line.partition(" #")
        if "--http-port 8000" in command:
            command = command.replace("--http-port 8000", f"--http-port {port}")
        elif re.search(r"(dynamo serve |quickstart\.sh)", command):
            command = f"{command.rstrip()} --Frontend.port={port}"
        lines.append(command + (hash_ + comment if hash_ else ""))
    return "\n".join(lines)


def _client_on_port(body: str, port: int) -> str:
    return body.replace("localhost:8000", f"localhost:{port}")


def _commands(body: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]


SCENARIOS = scenarios()


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(s, id=_commands(s.serve.body)[-1][:60], marks=[pytest.mark.vllm] * s.vllm)
        for s in SCENARIOS
    ],
)
def test_serve_blocks_serve_their_calls_and_stop_on_ctrl_c(
    scenario: Scenario, tmp_path: Path
) -> None:
    if scenario.vllm:
        pytest.importorskip("vllm")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", _shell(_on_port(scenario.serve.body, port))],
            cwd=REPO_ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + (300 if scenario.vllm else 150)
        while "ready: http://" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no ready line:\n{log.read_text()}"
            time.sleep(0.2)
        for call in scenario.calls:
            body = _client_on_port(call.body, port)
            if call.lang == "python":
                done = subprocess.run([sys.executable, "-c", body], capture_output=True,
                                      text=True, timeout=120)  # fmt: skip
                assert done.returncode == 0, done.stderr
                continue
            for command in _commands(body):
                done = subprocess.run(["bash", "-c", _shell(command)], capture_output=True,
                                      text=True, timeout=120, cwd=REPO_ROOT)  # fmt: skip
                assert done.returncode == 0 and done.stdout.strip(), (command, done.stderr)
                assert '"error"' not in done.stdout, (command, done.stdout)
        if not scenario.calls:
            _answers_a_chat(port)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert proc.wait(60) == 0, log.read_text()
        assert "killing them" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _answers_a_chat(port: int) -> None:
    base = f"http://127.0.0.1:{port}/v1"
    models = httpx.get(f"{base}/models", timeout=10).json()["data"]
    body = {"model": models[0]["id"], "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}  # fmt: skip
    answer = httpx.post(f"{base}/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=_commands(b.body)[-1][:60]) for b in blocks() if b.how == "run"],
)
def test_run_blocks_exit_0(block: Block) -> None:
    done = subprocess.run(["bash", "-c", _shell(block.body)], capture_output=True, text=True,
                          timeout=180, cwd=REPO_ROOT, env=_env())  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_module_blocks_run() -> None:
    for block in (b for b in blocks() if b.how == "module"):
        done = subprocess.run([sys.executable, "-c", block.body], capture_output=True,
                              text=True, timeout=60, cwd=tempfile.gettempdir())  # fmt: skip
        assert done.returncode == 0, done.stderr


def test_config_blocks_plan_with_their_graph(tmp_path: Path) -> None:
    from dynamo_sdk.serve.plan import build_plan

    for block in (b for b in blocks() if b.how.startswith("config")):
        graph = block.how.split()[1]
        config = tmp_path / "config.yaml"
        config.write_text(block.body)
        plan = build_plan(
            graph, config_file=str(config), override_args=[], cwd=str(REPO_ROOT), environ={}
        )
        assert json.loads(plan.config_json())
