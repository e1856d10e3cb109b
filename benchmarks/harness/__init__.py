"""The benchmarks' shared harness: one launcher, one HTTP client, one report, one plot helper.

Every benchmark runs as ``python benchmarks/NAME.py`` from the repository root, so this package
is found beside the scripts; importing it also puts the repository root on ``sys.path`` (for
``tests.serving``, the launcher the end-to-end tests use) and this folder (for ``_common``).

* ``harness.launch``: serving a graph with ``dynamo serve`` (``tests.serving.ServeProcess``)
  on a free port, joined to given servers or on its own embedded ones; stopped with a drain.
* ``harness.client``: the OpenAI streaming client (completions and chat completions; TTFT, ITL,
  output and cached tokens, errors per request; aiohttp by default, httpx optional; kept
  keep-alive connections or a fresh connection per request), the closed-loop runner, the
  per-cell summary and the "answers one request" readiness probe.
* ``harness.spread``: a cell of streamed chat requests in this process or spread over client
  processes (one Python client saturates near 2,000 requests/s), with the client's CPU use.
* ``harness.report``: aligned tables and the targets table (name, measured, PASS/MISS/SKIP).
* ``harness.plot``: PNGs of line/step panels when matplotlib is installed (a no-op otherwise).
* ``harness.profiling``: reading the cProfile dumps of served processes.
* ``_common`` (beside the scripts): percentile, json_safe, profiled, interrupt_on_sigterm.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
