"""Quantisation-aware training of the default model: does fine-tuning the INT8 model by
distillation lift its top-1 agreement with f32 past where post-training quantisation stops?

Issue 5 asks for 99% top-1 agreement with the f32 IR. Post-training quantisation reaches 0.937
at best within the latency target (benchmarks/int8_frontier.py, six folders), and bf16
arithmetic keeps 0.962. Training is the lever left, so this script measures it:
- NNCF quantises the torch EfficientNet-Lite0 (7-bit weights where this CPU's INT8 sums
  saturate, as the export's `--overflow-fix auto` does; the classifier head in f32, as the
  export keeps it; `--keep-f32-first F` leaves the first fraction F of the backbone's weighted
  layers in f32, like the export's option of that name);
- then fine-tunes the INT8 model by distillation from the f32 model (KL divergence at
  temperature 2 plus 0.1 of the logits' mean squared error; Adam with cosine decay; batch norm
  frozen) on crops of the same photos as the validation folders (seed 10), half of them
  mirrored;
- every `--judge-every` steps it builds an IR from the INT8 model as the export builds one
  (saliency inserted, preprocessing embedded) and judges it against the f32 IR, built the same
  way, on the frontier's two folders (seeds 1 and 2: other crops of the training photos) and
  on crops of photos it never trained on (`held_out_photos`), with bf16 and f16 arithmetic
  (emulated) as reference lines;
- the last IR is timed against f32 at batch 1 in interleaved rounds.
The export's `--int8 --finetune-steps N` (export/int8_finetune.py) came out of this script
and shares its quantisation and loss; the export trains on random crops of its calibration
images, where this script draws from 3000 distinct crops.

    python benchmarks/int8_qat.py --json benchmarks/results/int8_qat.json \\
        --picture benchmarks/results/int8_qat.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]

from calibration_photos import held_out_photos, write_folder  # noqa: E402
from int8_frontier import TARGET_TOP1, save_figure  # noqa: E402
from int8_speed import TARGET_RATIO, batch1_request  # noqa: E402
from back_to_back import measure_interleaved  # noqa: E402

from xaiserve.export.int8 import (infer_all, load_images,  # noqa: E402
                                  reduced_precision_agreement)
from xaiserve.export.int8_agreement import agreement  # noqa: E402
from xaiserve.export.int8_finetune import (MSE_WEIGHT, TEMPERATURE, distil,  # noqa: E402
                                           quantize_torch)
from xaiserve.export.parity import compile_f32, torch_input  # noqa: E402
from xaiserve.export.pipeline import torch_source  # noqa: E402
from xaiserve.export.saliency import SaliencySettings  # noqa: E402
from xaiserve.export.sources import create_source  # noqa: E402
from xaiserve.service.cpu_int8 import cpu_flags, resolve_overflow_fix  # noqa: E402


def mirrored_batches(train: np.ndarray, size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless batches of `size` distinct training crops, half of the batches mirrored."""
    rng = np.random.default_rng(seed)
    while True:
        batch = train[rng.choice(len(train), size, replace=False)]
        yield batch[:, :, ::-1] if rng.random() < 0.5 else batch


def judge(model: ov.Model, folders: dict, reference: dict, core: ov.Core, step: int) -> dict:
    compiled = compile_f32(model, core)
    figures = {label: agreement(*reference[label], *infer_all(compiled, images, f"step {step}"))
               for label, images in folders.items()}
    row = {"step": step,
           **{label: {"top1_agreement": f["top1_agreement"],
                      "saliency_rank_correlation": f["saliency_rank_correlation"]}
              for label, f in figures.items()}}
    print(f"step {step}: " + ", ".join(f"{label} top-1 {f['top1_agreement']:.3f}"
                                       for label, f in figures.items()), file=sys.stderr)
    return row


def plot(path: Path, curve: list[dict], facts: dict, held_out: str, keep_f32_first: float
         ) -> None:
    """Top-1 agreement with f32 against training steps, one line per folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    steps = [row["step"] for row in curve]
    for (label, fact), colour in zip(facts.items(), ("tab:blue", "tab:orange", "tab:red")):
        ax.plot(steps, [row[label]["top1_agreement"] for row in curve], "o-", color=colour,
                label=f"INT8, {label}")
        ax.axhline(fact["bf16"], color=colour, lw=1, ls=":",
                   label=f"bf16 arithmetic (emulated), {label} ({fact['bf16']:.3f})")
    ax.axhline(TARGET_TOP1, color="tab:green", lw=1, ls="--", label=f"target {TARGET_TOP1}")
    ax.set_xlabel("fine-tuning steps (step 0: post-training quantisation in NNCF's torch backend)")
    ax.set_ylabel("top-1 agreement with the f32 IR")
    kept = f", the first {keep_f32_first:g} of the backbone in f32" if keep_f32_first else ""
    ax.set_title(f"INT8{kept}, fine-tuned by distillation from f32; {held_out}: photos it "
                 "never trained on", fontsize=10)
    save_figure(fig, ax, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="calibration and per folder")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--judge-every", type=int, default=100)
    parser.add_argument("--keep-f32-first", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per model")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--picture", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="int8_qat_"))
    source = create_source("default")
    teacher, info = source.torch_module.eval(), source.info
    as_ir = torch_source(source, SaliencySettings(), info).build_ir  # -> (IR as exported, layer)
    held_out = "held-out photos"
    writers = {"calibration": (args.images, 0, None), "train": (args.train_images, 10, None),
               "seed 1": (args.images, 1, None), "seed 2": (args.images, 2, None),
               held_out: (args.images, 1, held_out_photos())}
    images = {}
    for label, (count, seed, photos) in writers.items():
        write_folder(work / label, count, seed, photos)
        images[label] = load_images(work / label, info, count, label)
    folders = {label: images[label] for label in ("seed 1", "seed 2", held_out)}

    core = ov.Core()
    f32 = as_ir(teacher)[0]
    f32_compiled = compile_f32(f32, core)
    reference, facts = {}, {}
    for label, folder_images in folders.items():
        reference[label] = infer_all(f32_compiled, folder_images, f"f32, {label}")
        facts[label] = reduced_precision_agreement(f32, folder_images, reference[label][0], core)

    fix = resolve_overflow_fix("auto", cpu_flags())
    student = quantize_torch(teacher, torch_input(images["calibration"], info),
                             args.keep_f32_first, fix)
    curve = [judge(as_ir(student)[0], folders, reference, core, 0)]

    def judge_every(step: int) -> None:
        if step % args.judge_every == 0 or step == args.steps:
            curve.append(judge(as_ir(student)[0], folders, reference, core, step))

    distil(student, teacher, mirrored_batches(images["train"], args.batch), info, args.steps,
           args.lr, judge_every)

    final = as_ir(student)[0]
    requests = {name: batch1_request(core, m, "f32") for name, m in
                (("f32", f32), ("int8", final))}
    timings = measure_interleaved(requests, 2.0, args.seconds, args.rounds)
    ratio = timings["int8"].p50_ms / timings["f32"].p50_ms
    last = curve[-1]
    print(f"f32 p50 {timings['f32'].p50_ms:.2f} ms; INT8 after {args.steps} steps: p50 "
          f"{ratio:.3f} of f32 (target <= {TARGET_RATIO})")
    print(f"{'folder':20s} {'PTQ':>6s} {'trained':>7s} {'bf16':>6s} {'f16':>6s}   (top-1 "
          f"agreement with f32; target >= {TARGET_TOP1})")
    for label, fact in facts.items():
        print(f"{label:20s} {curve[0][label]['top1_agreement']:6.3f} "
              f"{last[label]['top1_agreement']:7.3f} {fact['bf16']:6.3f} {fact['f16']:6.3f}")
    if args.picture:
        plot(args.picture, curve, facts, held_out, args.keep_f32_first)
        print(f"picture: {args.picture}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "picture")}
        args.json.write_text(json.dumps({
            "settings": {**settings, "overflow_fix": fix, "temperature": TEMPERATURE,
                         "mse_weight": MSE_WEIGHT},
            "targets": {"top1_agreement": TARGET_TOP1, "p50_ratio": TARGET_RATIO},
            "reduced_precision": facts, "curve": curve,
            "f32_p50_ms": timings["f32"].p50_ms, "int8_p50_ms": timings["int8"].p50_ms,
            "p50_ratio": ratio, "seconds": round(time.perf_counter() - started)},
            indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
