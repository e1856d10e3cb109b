#!/usr/bin/env bash
# Set up everything the tests need (vLLM's CPU build included), then run the whole suite
# (real nats-server and etcd are started by the tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
exec .venv/bin/python -m pytest -q "$@"
