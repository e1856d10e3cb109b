"""The soak benchmark's smoke run: a short soak of the served mocker graph, with client
disconnects, passes its own targets (no failed request, nothing in flight and no KV block
left once the load stops) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import REPO_ROOT

pytestmark = pytest.mark.slow


def test_a_short_soak_passes_its_targets(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--duration", "6", "--concurrency", "24",
         "--sample", "2", "--disconnect", "0.3", "--log-dir", str(tmp_path), "--json",
         str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "targets:" in run.stdout
    result = json.loads(out.read_text())
    counts = result["counts"]
    assert counts["done"] > 0 and counts["disconnected"] > 0 and counts["failed"] == 0
    passed = {t["name"]: t["passed"] for t in result["targets"]}
    assert passed["no failed request"] and passed["nothing in flight after the load"]
    assert passed["no KV block leaked"]
