#!/usr/bin/env bash
# Creates .venv (once) and installs xaiserve with the export and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch comes from the registry (its default build loads torchvision, which timm needs).
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[export,test]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import xaiserve.service.cli, openvino, torch, timm" \
  || { echo "setup: the environment is incomplete" >&2; exit 1; }
