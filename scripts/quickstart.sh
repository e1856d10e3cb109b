#!/usr/bin/env bash
# Set up, then serve the default graph on the embedded NATS + etcd (Ctrl-C to stop).
#   curl -N localhost:8000/generate -H 'content-type: application/json' -d '{"text": "hello world"}'
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd examples/hello_world
exec ../../.venv/bin/dynamo serve graphs.hello:Frontend -f configs/hello.yaml "$@"
