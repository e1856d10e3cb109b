"""The chaos benchmarks' smoke runs: `benchmarks/chaos.py` (workers SIGKILLed under load, every
stream completes through migration) and one short run of each family of
`benchmarks/chaos_suite.py` (a few kills, low concurrency), asserting the figures its JSON
reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.serving import REPO_ROOT

pytestmark = pytest.mark.slow


def test_streams_complete_while_workers_are_killed(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--kills", "3", "--concurrency", "12",
         "--log-dir", str(tmp_path), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["kills"] == 3
    assert result["tally"]["completed"] > 0 and result["tally"]["failed"] == 0
    assert result["migrations"] > 0, "no stream was running on a killed worker"
    assert result["restarts"] == 3, "each killed worker restarted once, nothing else"


def suite(tmp_path: Path, scenario: str, *extra: str) -> dict[str, Any]:
    """One short run of `scenario`: its JSON row, after checking the run itself went well."""
    out = tmp_path / "suite.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/chaos_suite.py", "--scenario", scenario,
         "--concurrency", "8", "--warmup", "2", "--settle", "4", "--log-dir", str(tmp_path),
         "--json", str(out), *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["scenario"] == scenario and "error" not in row, row
    assert row["completed"] > 0 and row["probes"] > 0, row
    return row


def test_a_prefill_worker_killed_mid_stream(tmp_path: Path) -> None:
    """The disaggregated torch graph: streams whose KV never comes are prefilled locally."""
    row = suite(tmp_path, "prefill", "--kills", "1", "--prefill-concurrency", "3")
    assert row["disruptions"] == 1 and row["failed"] == 0, row
    assert row["restarts_beyond_kills"] == 0


@pytest.mark.parametrize("victim", ["processor", "router", "frontend"])
def test_a_request_path_process_killed(tmp_path: Path, victim: str) -> None:
    """A Processor, a Router service or one of two Frontends SIGKILLed twice: the streams
    it held are cut (a Processor's and a Frontend's; a Router holds none), every other one
    completes, and new requests do not fail for more than 5 s."""
    row = suite(tmp_path, victim, "--kills", "2", "--interval", "2")
    assert row["disruptions"] == 2 and row["restarts"] == 2, row
    assert row["failed_other"] == 0, row["other_why"]
    if victim == "router":
        assert row["failed"] == 0, row["cut_why"]
    assert row["outage_s"] <= 5.0 and row["restarts_beyond_kills"] == 0, row


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [("nats", ["--server-kills", "1"]), ("etcd-pause", ["--pause", "15"]),
     ("etcd-kill", ["--server-kills", "1"])],
)  # fmt: skip
def test_a_server_outage(tmp_path: Path, scenario: str, extra: list[str]) -> None:
    """The issue's targets: a nats-server restart or a 15 s etcd pause costs at most 5 s of
    failed new requests and restarts no process; here no stream fails either."""
    row = suite(tmp_path, scenario, *extra)
    assert row["disruptions"] == 1 and row["failed"] == 0, row
    assert row["outage_s"] <= 5.0, row["probe_errors"]
    assert row["restarts"] == 0, "a process was restarted"
    assert row["server_restarts"] == (0 if scenario == "etcd-pause" else 1)


def netns_refused() -> str:
    """Why `ip netns add` cannot run here ("" when it can)."""
    name = f"dyctest{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=30)
    except OSError as exc:
        return f"no `ip` command: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return ""


def test_a_partitioned_host_leaves_and_comes_back(tmp_path: Path) -> None:
    """Host B's link cut for 10 s: its workers leave discovery within the lease TTL (5 s)
    while every stream completes on host A (those on B migrate), and they come back."""
    why = netns_refused()
    if why:
        pytest.skip(why)
    row = suite(tmp_path, "partition", "--cut", "10")
    assert row["workers_b"] == 2 and row["left_s"] <= 7.0, row
    assert row["back_s"] <= 30.0 and row["failed"] == 0, row
    assert row["outage_s"] <= 5.0 and row["restarts"] == 0, row
