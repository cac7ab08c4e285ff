"""Every image classifier transformers knows, exported from its save_pretrained folder.

For each model type of transformers' AutoModelForImageClassification mapping, the model is
built from its configuration class's defaults (the published base size, random seeded weights,
224 x 224 input), saved with its default image processor (resized to 224 x 224, no crop) as
`save_pretrained` writes them, and exported through the library from that folder alone, as
`xaiserve export FOLDER` does. Recorded per architecture: the error line if the export fails,
else the method, the map's grid, the IR's logits against transformers' own on what its
processor makes of the same images (f32), and whether an image's map changes inside a batch.
Each architecture runs in a process of its own (a crash or a hang is that row's result).

    .venv/bin/python benchmarks/hf_sources.py --json benchmarks/results/hf_sources.json
    .venv/bin/python benchmarks/hf_sources.py vit swin
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 224
NUM_CLASSES = 10
# Listed, not built: not classifiers of pixels (ImageGPT takes colour-cluster ids; ShieldGemma 2
# is a 4B vision-language model), or exported another way (a timm model's folder, by timm).
SKIPPED = {"imagegpt": "takes colour-cluster ids, not pixels",
           "shieldgemma2": "a 4-billion-parameter vision-language model",
           "timm_wrapper": "a timm model: its folder exports through timm "
                           "(tests/test_huggingface_sources.py)"}


def model_types() -> dict[str, str]:
    """model type -> its first image-classification class name."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names)

    return {k: v if isinstance(v, str) else v[0] for k, v in names.items()}


def processor_class(model_type: str) -> str | None:
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES as names)

    classes = names.get(model_type) or {}
    return classes.get("torchvision") or classes.get("pil")


def run_one(model_type: str) -> dict:
    """Build, save, export and compare one architecture (in this process)."""
    import numpy as np
    import openvino as ov
    import torch
    import transformers

    from tests.test_saliency_architectures import set_batch_statistics
    from xaiserve.export.huggingface import class_scores
    from xaiserve.export.parity import compile_f32
    from xaiserve.export.pipeline import ExportRequest, export_model
    from xaiserve.export.sources import synthetic_images

    row: dict = {"model_type": model_type, "class": model_types()[model_type]}
    config_class = transformers.CONFIG_MAPPING[model_type]
    config = config_class(num_labels=NUM_CLASSES)
    if isinstance(getattr(config, "image_size", None), int):
        config.image_size = SIZE
    torch.manual_seed(0)
    model = getattr(transformers, row["class"])(config).eval()
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    name = processor_class(model_type) or "ViTImageProcessor"
    row["processor"] = name
    processor = getattr(transformers, name)(size={"height": SIZE, "width": SIZE},
                                            do_center_crop=False)
    images = synthetic_images(3, SIZE, seed=2)
    # Untrained, deep BatchNorm networks (MobileNets, EfficientNet: convolutions drawn with a
    # std of 0.02, BatchNorm's eps larger than their variance) shrink their activations to
    # 1e-28, and every comparison passes: He's initialisation and statistics from images, as
    # training sets them, undo that.
    for layer in model.modules():
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight)
    set_batch_statistics(model, processor(list(synthetic_images(8, SIZE, seed=4)),
                                          do_resize=False, return_tensors="np")["pixel_values"])
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / model_type
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        t = time.perf_counter()
        try:
            result = export_model(ExportRequest(str(folder), Path(work) / "models", "m"))
        except Exception as exc:  # noqa: BLE001 - the row records what the user would see
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            return row
        row["export_s"] = round(time.perf_counter() - t, 1)
        card = result.card
        row["method"] = card["saliency"]["method"]
        row["parity_vs_loaded"] = card["parity"]["max_abs_logit_diff"]
        row["target_layer"] = card["saliency"]["target_layer"]
        row["map_grid"] = card["saliency"]["map_shape"][-2:]
        compiled = compile_f32(ov.Core().read_model(result.path / "model.xml"))
        ours = compiled(images)
        inputs = processor(list(images), do_resize=False, return_tensors="pt")
        with torch.no_grad():
            theirs = class_scores(model(**inputs)).numpy()
            # torch's own rounding error on these images: an untrained network can amplify
            # it (LeViT's logits moved by 380 for an input moved by 1e-6)
            exact = class_scores(model.double()(pixel_values=inputs["pixel_values"].double()))
        row["logit_scale"] = float(np.abs(theirs).max())
        row["torch_f32_vs_f64"] = float(np.abs(theirs - exact.numpy()).max())
        logits = ours[compiled.output("logits")]
        maps = ours[compiled.output("saliency_map")]
        row["max_abs_logit_diff"] = float(np.abs(logits - theirs).max())
        alone = compiled(images[1:2])[compiled.output("saliency_map")]
        row["map_batch_diff"] = float(np.abs(alone[0] - maps[1]).max())
        row["maps_finite"] = bool(np.isfinite(maps).all())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        warnings.simplefilter("ignore")
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for model_type in args.types or sorted(model_types()):
        if model_type in SKIPPED:
            rows.append({"model_type": model_type, "skipped": SKIPPED[model_type]})
            print(f"{model_type:24s} skipped: {SKIPPED[model_type]}", flush=True)
            continue
        t = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--one", model_type],
                                  capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "model_type": model_type,
                "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"model_type": model_type, "error": f"over {args.timeout:.0f} s"}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"{model_type:24s} " + (f"error: {row['error']}" if "error" in row else
              f"{row['method']:15s} grid {row['map_grid']} logits {row['max_abs_logit_diff']:.1e}"
              f" of {row['logit_scale']:.1e} (torch f32 {row['torch_f32_vs_f64']:.1e}), batch "
              f"{row['map_batch_diff']:.1e} "
              f"({row['params_m']} M)"), flush=True)
    exported = [r for r in rows if "method" in r]
    summary = {"architectures": len(rows), "skipped": sum("skipped" in r for r in rows),
               "exported": len(exported),
               "logits_within_1e-4_of_their_scale": sum(
                   r["max_abs_logit_diff"] <= 1e-4 * r["logit_scale"] for r in exported),
               "logits_within_10x_torchs_own_f32_error": sum(
                   r["max_abs_logit_diff"] <= 10 * r["torch_f32_vs_f64"] for r in exported)}
    print(json.dumps(summary))
    if args.json:
        import openvino
        import transformers

        args.json.write_text(json.dumps({"summary": summary, "transformers":
                                         transformers.__version__, "openvino":
                                         openvino.get_version(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
