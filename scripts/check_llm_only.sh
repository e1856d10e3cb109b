#!/usr/bin/env bash
# Install the package with [llm] alone (no PyTorch, no vLLM) into a scratch venv, as a
# non-editable install from this checkout (the packaged graphs and configs included), then:
# import every module [llm] covers (scripts/check_extras.py), plan a packaged graph from
# another directory, and run the KV router benchmark on mocker engines there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
PYTHON="${PYTHON:-python3}"
echo "[llm-only] venv in $scratch"
"$PYTHON" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet --progress-bar off "$repo[llm]"
if "$scratch/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[llm-only] torch came with [llm]: it must not" >&2; exit 1
fi
cd "$scratch"
"$scratch/venv/bin/python" "$repo/scripts/check_extras.py"
"$scratch/venv/bin/dynamo" serve dynamo_sdk.llm.graphs.agg_router:Frontend -f agg_router --dry-run \
  | grep -q "^- Worker"
echo "[llm-only] a packaged graph plans from $scratch"
"$scratch/venv/bin/python" "$repo/benchmarks/router_bench.py" --quick --no-png | tail -6
