"""The KV tiers benchmark's smoke run: every arm of both engines runs and the tables print."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.serving import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import kv_tiers_bench


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
