"""`dynamo run`: one process, no NATS or etcd, over the echo engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dynamo_sdk.llm.run import RunUsageError, parse_run_args
from dynamo_sdk.serve.embedded import free_port
from tests.serving import run_dynamo


def test_parse_run_args() -> None:
    spec = parse_run_args(
        [
            "in=http",
            "out=vllm",
            "/m",
            "--http-port",
            "9000",
            "--max-model-len=512",
            "--enforce-eager",
        ]
    )
    assert (spec.input, spec.output, spec.model, spec.http_port) == ("http", "vllm", "/m", 9000)
    assert spec.engine_config == {"max_model_len": 512, "enforce_eager": True}
    with pytest.raises(RunUsageError, match="in=ftp"):
        parse_run_args(["in=ftp", "out=echo"])
    with pytest.raises(RunUsageError, match="one MODEL"):
        parse_run_args(["a", "b"])


def test_batch_writes_outputs_with_timings(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "one two three", "max_tokens": 4})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        + "\n"
        + json.dumps({"prompt": "x", "max_tokens": 10**6})
        + "\n"
    )
    done = run_dynamo(["run", f"in=batch:{prompts}", "out=echo"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "prompts.out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["completion_tokens"] == 4 and rows[0]["finish_reason"] == "length"
    assert rows[0]["text"] and rows[0]["ttft_s"] <= rows[0]["total_s"]
    # a chat turn is echoed once: its latest message, then a stop
    assert rows[1]["text"] == "hi" and rows[1]["finish_reason"] == "stop"
    assert "maximum context length" in rows[2]["error"]


def test_http_serves_openai(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynamo_sdk.cli.main",
            "run",
            "in=http",
            "out=echo",
            "--http-port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()["data"]
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        name = models[0]["id"]
        assert name == "dynamo-tiny"  # predictable for the tiny model, and printed
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert any(b"serving model 'dynamo-tiny'" in line for line in lines), lines
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": name, "prompt": "hello world", "max_tokens": 3},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_text_chat_in_the_terminal(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_sdk.cli.main", "run", "in=text", "out=echo"],
        input="hello there\nand a second turn\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # every turn is answered with its own message (the history is in the prompt, not the echo)
    replies = [line.removeprefix("> ") for line in done.stdout.splitlines()[1:] if line]
    assert replies[:2] == ["hello there", "and a second turn"], done.stdout


def test_help_lists_every_option_with_its_default(tmp_path: Path) -> None:
    done = run_dynamo(["run", "-h"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for line in ("--http-port", "(default: 8000)", "out=torch:", "--kv-cache-gb", "out=mocker:",
                 "--speedup", "out=echo:", "--token-delay", "out=vllm:"):  # fmt: skip
        assert line in done.stdout, line
    only = run_dynamo(["run", "-h", "out=mocker"], cwd=tmp_path).stdout
    assert "--num-blocks" in only and "--kv-cache-gb" not in only


def test_a_misspelt_engine_option_names_the_valid_ones(tmp_path: Path) -> None:
    done = run_dynamo(["run", "in=text", "out=mocker", "--num-blokcs", "8"], cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "unknown key 'num_blokcs' (valid keys: block_size" in done.stderr


def test_bad_model_is_a_clear_error(tmp_path: Path) -> None:
    done = run_dynamo(["run", "in=text", "out=echo", str(tmp_path / "nope")], cwd=tmp_path)
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
