"""What the ViT-ReciproCAM branch's shortcuts save, architecture by architecture.

The branch re-runs the last transformer block on h*w masked copies of its input. Where the
block allows it (export/saliency/methods.py, `ViTReciproCAM`), the attention's projections run
once and are masked after, and where the head reads the class token alone the copies compute
only that token's query, MLP and norm. This script inserts the branch twice into the same
random-weight timm model, without the shortcuts and with them (the export's own choice), checks
the maps agree, and times both at batch 1 in f32 (what the server computes these maps in) in
interleaved rounds, beside the model without the branch.

    .venv/bin/python benchmarks/vit_branch_shortcuts.py --json bench-out/vit_branch.json
    .venv/bin/python benchmarks/vit_branch_shortcuts.py deit_tiny_patch16_224 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xaiserve.export.saliency import SaliencySettings, insert_saliency, methods  # noqa: E402
from xaiserve.export.sources import convert_torch  # noqa: E402

ARCHITECTURES = ("deit_tiny_patch16_224", "vit_small_patch16_224", "pit_ti_distilled_224",
                 "efficientformer_l1", "mvitv2_tiny")
SETTINGS = SaliencySettings(map_precision="f32")


def branches(arch: str) -> tuple[dict[str, ov.Model], int]:
    import timm
    import torch

    torch.manual_seed(0)
    module = timm.create_model(arch, num_classes=1000).eval()
    size = module.pretrained_cfg["input_size"][1]
    model = convert_torch(module, size)
    fast, _ = insert_saliency(model, SETTINGS)
    agree = methods._Probe.__dict__["agree"]
    methods._Probe.agree = staticmethod(lambda *_: False)  # every shortcut refused: the plain one
    try:
        plain, _ = insert_saliency(model, SETTINGS)
    finally:
        methods._Probe.agree = agree
    return {"network alone": model, "branch, plain": plain, "branch, shortcuts": fast}, size


def p50_ms(request: ov.InferRequest, image: np.ndarray, seconds: float) -> float:
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        request.infer({0: image})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(arch: str, rounds: int, seconds: float) -> dict:
    models, size = branches(arch)
    core = ov.Core()
    compiled = {name: core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "PERFORMANCE_HINT": "LATENCY"})
                for name, m in models.items()}
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    maps = {name: c(image)["saliency_map"] for name, c in compiled.items() if name != "network alone"}
    difference = float(np.abs(maps["branch, plain"] - maps["branch, shortcuts"]).max())
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    per_round: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, request in requests.items():
            per_round[name].append(p50_ms(request, image, seconds))
    p50 = {name: statistics.median(v) for name, v in per_round.items()}
    return {"architecture": arch, "input_size": size, "p50_ms": p50, "rounds_ms": per_round,
            "max_map_difference": difference,
            "speedup": p50["branch, plain"] / p50["branch, shortcuts"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for arch in args.architectures:
        row = measure(arch, args.rounds, args.seconds)
        results.append(row)
        p50 = row["p50_ms"]
        print(f"{arch:24s} network {p50['network alone']:8.1f} ms  plain branch "
              f"{p50['branch, plain']:8.1f} ms  with shortcuts {p50['branch, shortcuts']:8.1f} ms"
              f"  x{row['speedup']:.1f}  max map difference {row['max_map_difference']:.1e}",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"precision": "f32", "batch": 1, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
