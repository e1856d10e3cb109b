#!/usr/bin/env bash
# Set up, then serve the default graph (Frontend -> Processor -> Worker on vLLM's CPU build, a
# tiny local model) on the embedded NATS + etcd. Ctrl-C stops everything. From another shell:
#   curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \
#     -d '{"model": "dynamo-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dynamo serve graphs.agg:Frontend -f configs/agg.yaml "$@"
