#!/usr/bin/env bash
# Set up, then serve the default graph on the embedded NATS + etcd: the OpenAI Frontend and one
# Worker on the project's own torch engine, with the tiny local model. Ctrl-C drains and stops.
#
#   bash scripts/quickstart.sh                  # torch engine (no vLLM install needed)
#   bash scripts/quickstart.sh --engine vllm    # vLLM's CPU build instead (a 3.5 GB install)
#   bash scripts/quickstart.sh --Frontend.port=9000   # anything else goes to `dynamo serve`
#
# Once it prints "ready: http://127.0.0.1:8000 ...", from another shell:
#   curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \
#     -d '{"model": "dynamo-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'
set -euo pipefail
cd "$(dirname "$0")/.."
engine=torch
if [ "${1:-}" = "--engine" ]; then
  engine="${2:-}"
  shift 2 || { echo "usage: --engine torch|vllm" >&2; exit 2; }
fi
case "$engine" in
  torch) bash scripts/setup.sh; config=configs/agg.yaml ;;
  vllm) bash scripts/setup.sh --vllm; config=configs/agg_vllm.yaml ;;
  *) echo "unknown engine '$engine': use --engine torch or --engine vllm" >&2; exit 2 ;;
esac
echo "[quickstart] dynamo serve graphs.agg:Frontend -f $config $*"
exec .venv/bin/dynamo serve graphs.agg:Frontend -f "$config" "$@"
