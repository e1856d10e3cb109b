"""The chaos benchmark's smoke run: workers SIGKILLed under load, every stream completes
(migration), and the JSON records the kills and migrations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
