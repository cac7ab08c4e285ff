#!/usr/bin/env bash
# Creates .venv (once) and installs xaiserve with the export, evaluate, scale and test extras;
# installs Chromium (the report test renders the HTML in it) when it is missing and apt works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch comes from the registry (its default build loads torchvision, which timm needs).
# pip's output goes to a log, shown when the install is still incomplete after a second try
# (once, a fresh clone's first install ended after 30 s having installed nothing).
LOG=.venv/pip-install.log
install() {
  .venv/bin/pip install --disable-pip-version-check -e ".[export,evaluate,scale,test]" \
    >"$LOG" 2>&1 || true
}
ready() { .venv/bin/python -c "import xaiserve.service.cli, xaiserve.service.server, torch, timm" \
  2>/dev/null; }
install
if ! ready; then
  echo "setup: the install is incomplete; trying once more (log: $LOG)" >&2
  install
fi
ready || { tail -n 20 "$LOG" >&2; echo "setup: the environment is incomplete (log: $LOG)" >&2
           exit 1; }
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y chromium >/dev/null 2>&1 \
     || { apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1; }) \
    || echo "setup: could not install chromium; tests/test_evaluate.py will fail on it" >&2
fi
