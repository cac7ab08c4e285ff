#!/usr/bin/env bash
# The main job on the default model: export EfficientNet-Lite0 into models/, start the gRPC
# server on it, explain the sample photos through the server, and leave one PNG overlay and one
# JSON per photo in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
X=.venv/bin/xaiserve
PORT=${PORT:-9000}
.venv/bin/python scripts/sample_photos.py out/photos
if [ -z "$(ls -d models/efficientnet_lite0/[0-9]* 2>/dev/null)" ]; then
  $X export default --repository models --name efficientnet_lite0 --report out/export_report.json >/dev/null
  echo "exported models/efficientnet_lite0 (report: out/export_report.json)"
fi
$X serve --repository models --port "$PORT" > out/server.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "serving" out/server.log 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat out/server.log >&2; exit 1; }
  sleep 0.5
done
$X explain out/photos/*.jpg --server "localhost:$PORT" --model efficientnet_lite0 --out out
echo "overlays and JSON: out/*_overlay.png out/*.json (server log: out/server.log)"
