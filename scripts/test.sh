#!/usr/bin/env bash
# Sets everything up and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The standard clients (tritonclient, KServe's SDK, perf_analyzer) in environments of their own:
# the tests call the server with them; the demo does not need them.
bash scripts/setup_clients.sh
exec .venv/bin/python -m pytest "$@"
