#!/usr/bin/env bash
# The main job on the default model: export EfficientNet-Lite0 into models/, then predict and
# explain the sample photos into out/ (one PNG overlay and one JSON per photo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
X=.venv/bin/xaiserve
.venv/bin/python scripts/sample_photos.py out/photos
if [ -z "$(ls -d models/efficientnet_lite0/[0-9]* 2>/dev/null)" ]; then
  $X export default --repository models --name efficientnet_lite0 --report out/export_report.json >/dev/null
  echo "exported models/efficientnet_lite0 (report: out/export_report.json)"
fi
$X explain out/photos/*.jpg --model-path models/efficientnet_lite0 --top-k 3 --out out
echo "overlays and JSON: out/*_overlay.png out/*.json"
