"""Deployed ONNX files against the torch source, architecture by architecture.

Each timm architecture of the saliency test's registry (tests/test_saliency_architectures.py,
`ARCHITECTURES`) is built with seeded random weights and written twice: as its ONNX file
(torch's exporter, dynamic batch, the way such models are deployed: its TorchScript-based
exporter, or with `--dynamo` its torch.export one, torch.onnx.export's default since torch 2.9)
and as a state dict. Both
are exported with the real `xaiserve export` command, the ONNX file with the architecture's own
normalisation; the two IRs' logits and maps are compared in f32 on the same images. The torch
export's maps are themselves checked against torch by that test, so equal maps here mean the
ONNX file gets the right ones.

    .venv/bin/python benchmarks/onnx_sources.py --json benchmarks/results/onnx_sources.json
    .venv/bin/python benchmarks/onnx_sources.py pvt_v2_b0 pit_ti_distilled_224
    .venv/bin/python benchmarks/onnx_sources.py --dynamo --json benchmarks/results/onnx_dynamo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xaiserve.export.parity import compile_f32  # noqa: E402
from xaiserve.export.sources import synthetic_images  # noqa: E402

NUM_CLASSES = 10


def registry() -> list[str]:
    from tests.test_saliency_architectures import ARCHITECTURES

    return [spec.split(":", 1)[1] for spec in ARCHITECTURES if spec.startswith("timm:")]


def export(source: str, folder: Path, name: str, *options: str) -> dict:
    """`xaiserve export` as a pipeline runs it; the IR's outputs on the images, or the error."""
    result = subprocess.run([sys.executable, "-m", "xaiserve.service.cli", "export", source,
                             "--repository", str(folder), "--name", name, *options],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1]}
    card = json.loads((folder / name / "1" / "model_card.json").read_text())
    return {"card": card, "ir": folder / name / "1" / "model.xml"}


def write_onnx(net, size: int, path: Path, dynamo: bool) -> None:
    """Dynamic batch: `dynamic_axes`, or for torch.export `dynamic_shapes` with an example batch
    of 2 (it specialises a batch of 1 into the graph's reshapes)."""
    import torch

    if dynamo:
        torch.onnx.export(net, (torch.zeros(2, 3, size, size),), str(path), dynamo=True,
                          input_names=["input"], output_names=["scores"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    else:
        torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                          input_names=["input"], output_names=["scores"],
                          dynamic_axes={"input": {0: "batch"}})


def compare(arch: str, folder: Path, dynamo: bool) -> dict:
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES).eval()
    size = net.pretrained_cfg["input_size"][1]
    torch.save(net.state_dict(), folder / f"{arch}.pth")
    row: dict = {"arch": arch, "input_size": size,
                 "exporter": "torch.export" if dynamo else "torchscript"}
    try:
        write_onnx(net, size, folder / f"{arch}.onnx", dynamo)
    except Exception as exc:  # noqa: BLE001 - torch's exporter cannot write this one
        summary = str(exc).split("## Exception summary")[-1].strip().splitlines()
        row["torch_error"] = f"{type(exc).__name__}: {summary[0] if summary else ''}"[:300]
        return row
    mean, std = (",".join(str(255 * v) for v in net.pretrained_cfg[k]) for k in ("mean", "std"))
    exports = {
        "onnx": export(str(folder / f"{arch}.onnx"), folder, f"{arch}_onnx",
                       "--mean", mean, "--scale", std),
        "timm": export(f"timm:{arch}", folder, f"{arch}_timm", "--checkpoint",
                       str(folder / f"{arch}.pth"), "--num-classes", str(NUM_CLASSES)),
    }
    for kind, done in exports.items():
        if "error" in done:
            row[f"{kind}_error"] = done["error"]
        else:
            saliency = done["card"]["saliency"]
            row[f"{kind}_method"], row[f"{kind}_target"] = saliency["method"], \
                saliency["target_layer"]
            row["map_shape"] = saliency["map_shape"]
    if any("error" in done for done in exports.values()):
        return row
    images = synthetic_images(4, size)
    outputs = {}
    for kind, done in exports.items():
        compiled = compile_f32(ov.Core().read_model(done["ir"]))
        result = compiled(images)
        outputs[kind] = [result[compiled.output(n)] for n in ("logits", "saliency_map")]
    (onnx_logits, onnx_maps), (timm_logits, timm_maps) = outputs["onnx"], outputs["timm"]
    row["max_logit_diff"] = float(np.abs(onnx_logits - timm_logits).max())
    row["max_map_diff"] = float(np.abs(onnx_maps - timm_maps).max()) \
        if onnx_maps.shape == timm_maps.shape else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="timm names (default: the test's registry)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dynamo", action="store_true",
                        help="write the ONNX files with torch.export (torch.onnx.export's default)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs or registry():
            start = time.perf_counter()
            row = compare(arch, Path(tmp), args.dynamo)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    same = [r for r in rows if r.get("max_map_diff") is not None and r["max_map_diff"] < 0.01
            and r["max_logit_diff"] < 1e-4]
    written = [r for r in rows if "torch_error" not in r]
    print(f"{len(same)} of {len(written)} architectures torch wrote as ONNX: the file's IR "
          "gives the torch source's logits and maps"
          + (f" ({len(rows) - len(written)} torch could not write: "
             f"{', '.join(r['arch'] for r in rows if 'torch_error' in r)})"
             if len(written) < len(rows) else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"openvino": ov.get_version(), "rows": rows},
                                        indent=2) + "\n")
    return 0 if len(same) == len(written) else 1


if __name__ == "__main__":
    sys.exit(main())
