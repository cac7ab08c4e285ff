#!/usr/bin/env bash
# Triton's perf_analyzer from .venv-perf (scripts/setup_clients.sh), with the CUDA runtime
# library it loads at start on its library path. Arguments go to perf_analyzer, e.g.
#   bash scripts/perf_analyzer.sh -m efficientnet_lite0 -i grpc -u 127.0.0.1:9000 \
#       --concurrency-range 1:8:1
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CUDART="$(echo "$ROOT"/.venv-perf/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
export LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$ROOT/.venv-perf/bin/perf_analyzer" "$@"
