#!/usr/bin/env bash
# The standard Triton/KServe clients, each in an environment of its own: tritonclient pins
# protobuf below 7 while the server's grpcio-tools needs 7, so they cannot share .venv.
# - .venv-triton: the current tritonclient[grpc,http], which the tests call both sides of the
#   server with (gRPC, and REST with Triton's binary tensors);
# - .venv-kserve: KServe's own Python SDK (InferenceGRPCClient, InferenceRESTClient), the Open
#   Inference Protocol's reference clients, which pin protobuf below 7 too;
# - .venv-perf: Triton's perf_analyzer, a C++ load generator, from the last tritonclient wheel
#   that ships it (2.47.0), plus the two libraries it loads: libb64 (Debian's libb64-0d) and
#   libcudart (NVIDIA's wheel; loaded at start, never used: no GPU is needed).
#   scripts/perf_analyzer.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
if [ ! -x .venv-triton/bin/python ]; then
  "$PY" -m venv .venv-triton
fi
.venv-triton/bin/pip install --quiet --disable-pip-version-check "tritonclient[grpc,http]>=2.50,<3" \
  "numpy>=1.26,<3" "opencv-python-headless>=4.8,<5" 2>&1 | quiet
if [ ! -x .venv-kserve/bin/python ]; then
  "$PY" -m venv .venv-kserve
fi
.venv-kserve/bin/pip install --quiet --disable-pip-version-check "kserve>=0.15,<0.22" \
  "numpy>=1.26,<3" "opencv-python-headless>=4.8,<5" 2>&1 | quiet
if [ ! -x .venv-perf/bin/python ]; then
  "$PY" -m venv .venv-perf
fi
.venv-perf/bin/pip install --quiet --disable-pip-version-check --no-deps "tritonclient==2.47.0" \
  "nvidia-cuda-runtime-cu12>=12.4,<13" 2>&1 | quiet
if ! ldconfig -p | grep -q libb64.so.0d && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get install -y libb64-0d >/dev/null 2>&1 \
     || { apt-get update >/dev/null 2>&1 && apt-get install -y libb64-0d >/dev/null 2>&1; }) \
    || echo "setup: could not install libb64-0d; perf_analyzer will not start" >&2
fi
# A warning only: the demo needs neither client; tests/test_standard_clients.py fails on it.
bash scripts/perf_analyzer.sh --version >/dev/null 2>&1 \
  || echo "setup: perf_analyzer does not start (see scripts/perf_analyzer.sh)" >&2
