"""The KV tiers benchmark's smoke run: every arm of both engines runs and the tables print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.serving import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import kv_tiers_bench
import kv_tiers_gpu_bench


def test_quick_run_prints_the_tables(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "out.json"
    assert kv_tiers_bench.main(["--quick", "--no-png", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    for arm in ("device", "host", "host+disk", "host+disk GPU-router", "shared"):
        assert f"\n{arm} " in printed
    assert "TTFT p50 sim ms" in printed and "TTFT p50 wall ms" in printed
    assert "targets:" in printed and "workload checks:" in printed
    assert "torch greedy answers with tiers == without" in printed
    assert out_json.read_text().startswith("{")
    assert sys.getswitchinterval() == pytest.approx(0.005)  # restored after the arms


def test_the_gpu_script_runs_on_the_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``kv_tiers_gpu_bench.py --device cpu --small``: the copies are bit-exact, every tier's
    load serves the stored prefix, and no block the host holds is offloaded again."""
    out_json = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--dtype", "float32", "--small", "--num-blocks", "128",
            "--host-blocks", "256", "--disk-blocks", "512", "--contexts", "512",
            "--pool-blocks", "16", "--itl-streams", "3", "--itl-prompt", "48", "--itl-new", "6",
            "--itl-repeats", "1", "--max-batched-tokens", "512", "--storage", str(tmp_path),
            "--json", str(out_json)]  # fmt: skip
    assert kv_tiers_gpu_bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "bit-exact: device->host True, host->device True" in printed
    assert "of blocks already held: 0" in printed
    rows = {r["source"]: r for r in json.loads(out_json.read_text())["ttft"] if "source" in r}
    assert rows["recompute"]["cached_tokens"] == 0
    for tier in ("CPU", "DISK", "SHARED"):
        assert rows[tier]["cached_tokens"] == 512 - 16, tier
    assert kv_tiers_gpu_bench.TierStack.load.__name__ == "load"  # the timing patch is undone
