#!/usr/bin/env bash
# Regenerates service/proto/*_pb2*.py from protos/ (committed, so installs need no protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import grpc_tools" 2>/dev/null || {
  echo "gen_protos.sh: needs grpcio-tools: .venv/bin/pip install -e '.[dev]'" >&2; exit 2; }
.venv/bin/python -m grpc_tools.protoc -I protos --python_out=service/proto \
  --grpc_python_out=service/proto --pyi_out=service/proto protos/grpc_predict_v2.proto protos/xaiserve.proto
# Generated modules import each other as top-level modules; make them package-relative.
sed -i -E 's/^import (grpc_predict_v2_pb2|xaiserve_pb2) as/from . import \1 as/' service/proto/*_grpc.py
