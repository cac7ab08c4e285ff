"""Judge exported IRs on the CPU this runs on: top-1 agreement with the f32 IR and batch-1
latency against the f32 IR at the CPU's default precision (bf16 on CPUs with AMX).

The export judges its INT8 IR on the CPU that exports it, but INT8 and bf16 arithmetic differ
by CPU (VNNI or AMX sums are exact where AVX2's saturate; AMX CPUs run f32 IRs in bf16 by
default), so issue 5's targets have to be measured on the deployment's kind of CPU. This
script needs only openvino, numpy, opencv and scipy, so that it runs on a bare host with a
copy of the IRs and images:

    PAYLOAD/irs/NAME/model.xml (+ .bin)   one folder per IR; REFERENCE (default f32) is the f32 IR
    PAYLOAD/images/FOLDER/*.jpg|*.png     model-sized RGB images, one folder per validation set
    PAYLOAD/images_sha.json               optional: {FOLDER: sha256 of the decoded [n,H,W,3] u8
                                          array} from the exporting machine, to check decoding

    python benchmarks/int8_on_host.py PAYLOAD --json out.json [--seconds 16] [--rounds 8]
    taskset -c 0,1 python benchmarks/int8_on_host.py PAYLOAD --json 2cores.json  # two cores
    python benchmarks/int8_on_host.py PAYLOAD --json b.json --latency-only --batch 1,8,32

Agreement: every IR at the CPU's default precision and, where the CPU has bf16, each INT8 IR
also with f32 around its INT8 layers (`f32`) and with its FakeQuantize operations computed in
f32 (`exact`: what a CPU without saturation computes, without bf16 elsewhere), against the
reference IR computed in f32. Latency: batch-1 p50 in
interleaved rounds under the LATENCY hint, as a ratio to the reference IR at the default
precision (the issue's "bf16 IR" on an AMX CPU); `--batch` adds larger batches (the first N
images of the first folder in one request), where INT8's wider arithmetic may pay more than at
batch 1, with images per second beside each p50.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
from scipy.stats import spearmanr

from back_to_back import batched_request, measure_interleaved  # benchmarks/, beside this

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": "NO"}  # FakeQuantize in f32
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
             "amx_int8", "avx512_fp16")


def cpu_facts(core: ov.Core) -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                  if line.startswith("flags")), set())
    return {"name": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "logical_cpus": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "flags": {f: f in flags for f in CPU_FLAGS},
            "openvino": ov.__version__}


def load_folders(payload: Path) -> tuple[dict[str, np.ndarray], dict]:
    folders = {}
    for folder in sorted((payload / "images").iterdir()):
        files = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png"))
        folders[folder.name] = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
                                         for f in files])
    sha_file = payload / "images_sha.json"
    expected = json.loads(sha_file.read_text()) if sha_file.exists() else {}
    facts = {name: {"images": len(images), "decoded_as_on_export_machine":
                    hashlib.sha256(images.tobytes()).hexdigest() == expected.get(name)}
             for name, images in folders.items()}
    return folders, facts


def infer(compiled: ov.CompiledModel, images: np.ndarray):
    """Logits [n, K] and saliency maps [n, K, h, w] (None without them), one image at a time."""
    has_maps = any("saliency_map" in o.get_names() for o in compiled.outputs)
    logits, maps = [], []
    for image in images:
        out = compiled(image[None])
        logits.append(out["logits"])
        if has_maps:
            maps.append(out["saliency_map"])
    return np.concatenate(logits), np.concatenate(maps) if maps else None


def agreement(ref_logits, ref_maps, logits, maps) -> dict:
    """Top-1 agreement (all images; those the reference gives a softmax top-1 >= 0.5) and the
    mean rank correlation of the reference top class's maps."""
    same = ref_logits.argmax(1) == logits.argmax(1)
    p = np.exp(ref_logits - ref_logits.max(1, keepdims=True))
    sure = (p / p.sum(1, keepdims=True)).max(1) >= 0.5
    row = {"top1_agreement": float(same.mean()),
           "top1_agreement_confident": float(same[sure].mean()) if sure.any() else None,
           "confident_images": int(sure.sum())}
    if ref_maps is not None and maps is not None:
        row["saliency_rank_correlation"] = float(np.mean([
            spearmanr(ref_maps[i, c].ravel(), maps[i, c].ravel())[0]
            for i, c in enumerate(ref_logits.argmax(1))]))
    return row


def batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` images, repeated when the folder has fewer."""
    return np.resize(images, (batch, *images.shape[1:]))


def time_batch(core: ov.Core, configs: dict, images: np.ndarray, reference: str,
               seconds: float, rounds: int) -> dict:
    """p50 of one request of `images` under the LATENCY hint for each configuration, models
    interleaved, and its ratio to the `reference` IR at the CPU's default precision."""
    requests = {key: batched_request(core, model, {"PERFORMANCE_HINT": "LATENCY", **config},
                                     images)
                for key, (model, config) in configs.items()}
    measured = measure_interleaved(requests, 1.0, seconds, rounds)
    base = measured[f"{reference}, default"].p50_ms
    return {key: {"p50_ms": t.p50_ms, "p90_ms": t.p90_ms, "requests": t.count,
                  "images_per_s": len(images) * 1e3 / t.p50_ms,
                  "p50_over_reference_at_default_precision": t.p50_ms / base}
            for key, t in measured.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("payload", type=Path)
    parser.add_argument("--reference", default="f32", help="the f32 IR's folder name")
    parser.add_argument("--seconds", type=float, default=16.0, help="timing per IR")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", default="1",
                        help="comma list of batch sizes to time, e.g. 1,8,32 (1 is always timed)")
    parser.add_argument("--latency-only", action="store_true",
                        help="skip agreement (it does not depend on the cores given)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        batches = sorted({1, *(int(b) for b in args.batch.split(","))})
        if batches[0] < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--batch {args.batch!r}: give positive integers, e.g. 1,8,32")

    started = time.perf_counter()
    core = ov.Core()
    result: dict = {"cpu": cpu_facts(core)}
    print(json.dumps(result["cpu"]), flush=True)
    folders, result["folders"] = load_folders(args.payload)
    irs = {p.name: core.read_model(p / "model.xml")
           for p in sorted((args.payload / "irs").iterdir())}
    # bf16 also where it is not the CPU's default (a CPU with avx512_bf16 but no AMX)
    bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    result["agreement"] = {}
    if not args.latency_only:
        reference_compiled = core.compile_model(irs[args.reference], "CPU", F32)
        reference = {name: infer(reference_compiled, images)
                     for name, images in folders.items()}
    for name, model in ({} if args.latency_only else irs).items():
        extra = [("f32", F32)] * bf16 + [("exact", EXACT)] if name != args.reference else (
            [("bf16", {"INFERENCE_PRECISION_HINT": "bf16"})] if bf16 else [])
        for label, config in [("default", {})] + extra:
            compiled = core.compile_model(model, "CPU", config)
            row = {"inference_precision":
                   compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}
            for folder, images in folders.items():
                row[folder] = agreement(*reference[folder], *infer(compiled, images))
            result["agreement"][f"{name} ({label})"] = row
            print(f"{name} ({label}): " + json.dumps(row), flush=True)

    images = next(iter(folders.values()))
    configs = {f"{args.reference}, f32": (irs[args.reference], F32)}
    if bf16:
        configs[f"{args.reference}, bf16"] = (irs[args.reference],
                                              {"INFERENCE_PRECISION_HINT": "bf16"})
    for name, model in irs.items():
        configs[f"{name}, default"] = (model, {})
        if name != args.reference and bf16:  # INT8 with f32 rather than bf16 around it
            configs[f"{name}, f32"] = (model, F32)
    timing = {batch: time_batch(core, configs, batch_of(images, batch), args.reference,
                                args.seconds, args.rounds)
              for batch in batches}
    result["latency"] = timing[1]  # the target is at batch 1
    if len(batches) > 1:
        result["larger_batches"] = {str(b): timing[b] for b in batches[1:]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['cpu']['name']}, {result['cpu']['cpus_allowed']} CPUs")
    if result["agreement"]:
        print("top-1 agreement with the reference IR computed in f32")
        print(f"{'IR (config): precision':32s}" + "".join(f"{f:>10s}" for f in folders))
        for key, row in result["agreement"].items():
            print(f"{key + ': ' + row['inference_precision']:32s}"
                  + "".join(f"{row[f]['top1_agreement']:10.3f}" for f in folders))
    for batch, rows in timing.items():
        print(f"batch-{batch} p50 latency, images/s, and the p50's ratio to {args.reference} at "
              "the default precision")
        for key, row in rows.items():
            ratio = row["p50_over_reference_at_default_precision"]
            print(f"{key:32s}{row['p50_ms']:9.3f} ms {row['images_per_s']:8.1f}/s {ratio:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
