#!/usr/bin/env bash
# Set up, then run the whole test suite (real nats-server and etcd are started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
