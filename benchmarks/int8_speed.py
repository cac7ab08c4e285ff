"""INT8 against f32 on the default model: batch-1 latency and agreement on real photos.

Writes a calibration folder (seed 0) and a validation folder (seed 1) of real photos and their
crops (scripts/calibration_photos.py), exports the default model in f32 and with `--int8`
through the library, compiles both IRs with the same settings (LATENCY hint, f32 inference
precision for everything left unquantised) and measures them in alternating rounds
(benchmarks/saliency_overhead.py's loop), then prints the latency ratio and the agreement
figures from the INT8 model card.

This CPU has no AMX, so bf16 is not available: the comparison is against f32, the precision
the IRs run in here. Where the CPU reports BF16, a bf16 pass of the f32 IR is added.

`--keep-f32-first F [F ...]` adds INT8 variants whose first fraction F of the backbone's layers
stays f32 (the export option of that name), for the trade between agreement and speed.

`--overflow-fix F [F ...]` adds INT8 variants with that `--overflow-fix` (service/cpu_int8.py).
On a CPU whose INT8 sums saturate (no VNNI), each variant's top-1 agreement is also measured as
a CPU with VNNI would compute it ("no saturation": the CPU plugin's internal LP_TRANSFORMS_MODE
set to NO runs the FakeQuantize operations in f32, exactly, instead of INT8 kernels).

`--accuracy-control DROP` adds the variant that NNCF's accuracy control (the export's
`--accuracy-control --max-top1-drop DROP`) steers on a third folder of crops (seed 2), so that
its agreement on the validation folder is a held-out check. It is slow: 44 minutes on the
default model with 300 control images on 2 cores, when it reverts every operation to f32.

`--compare-order` also builds the alternative design (quantise the plain model, then insert the
saliency branch) and measures it the same way, for the choice explained in export/int8.py.

    python benchmarks/int8_speed.py                      # 300 + 300 images
    python benchmarks/int8_speed.py --images 100 --compare-order --json out/int8_speed.json \
        --picture out/int8_maps.png
    python benchmarks/int8_speed.py --keep-f32-first 0.25 0.5
    python benchmarks/int8_speed.py --overflow-fix first-layer enable
    python benchmarks/int8_speed.py --accuracy-control 0.01
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]

from calibration_photos import write_folder  # noqa: E402
import back_to_back  # noqa: E402
from back_to_back import measure_interleaved  # noqa: E402
from saliency_overhead import compile_config  # noqa: E402

from xaiserve.service.cpu_int8 import (EXACT_INT8_CONFIG, cpu_flags,  # noqa: E402
                                       int8_dot_product)
from xaiserve.export.int8 import (Int8Settings, infer_all, load_images,  # noqa: E402
                                  quantize_export)
from xaiserve.export.int8_agreement import agreement, top1_agreement  # noqa: E402
from xaiserve.export.parity import compile_f32  # noqa: E402
from xaiserve.export.pipeline import ExportRequest, export_model  # noqa: E402

TARGET_RATIO = 0.8


def side_by_side(f32_model: ov.Model, int8_model: ov.Model, validation: Path, count: int
                 ) -> np.ndarray:
    """A picture: for `count` validation images, the f32 map (left) and the INT8 map (right) of
    the f32 model's top-1 class, with labels, scores and the rank correlation."""
    from xaiserve.export.int8_agreement import softmax, spearman
    from xaiserve.service.model_info import ModelInfo
    from xaiserve.service.overlay import overlay

    info = ModelInfo.from_model(f32_model)
    images = load_images(validation, info, count, "--validation")
    core = ov.Core()
    f32_out = compile_f32(f32_model, core)(images)
    int8_out = compile_f32(int8_model, core)(images)
    rows = []
    for i, image in enumerate(images):
        c = int(f32_out["logits"][i].argmax())
        q = int(int8_out["logits"][i].argmax())
        p32, p8 = softmax(f32_out["logits"][i:i + 1])[0], softmax(int8_out["logits"][i:i + 1])[0]
        rho = spearman(f32_out["saliency_map"][i, c], int8_out["saliency_map"][i, c])
        left = overlay(image, f32_out["saliency_map"][i, c],
                       [f"f32: {info.labels[c]} {p32[c]:.2f}"])
        right = overlay(image, int8_out["saliency_map"][i, c],
                        [f"INT8: {info.labels[q]} {p8[q]:.2f}", f"rank corr {rho:.2f}"])
        left = np.vstack([left, np.full((right.shape[0] - left.shape[0], *left.shape[1:]), 255,
                                        np.uint8)])
        rows.append(np.hstack([left, np.full((left.shape[0], 8, 3), 255, np.uint8), right]))
    return np.vstack(rows)


def plain_first_int8(calibration: Path, size: int, settings: Int8Settings) -> ov.Model:
    """The alternative design: NNCF on the plain float model, saliency inserted afterwards."""
    import nncf

    from xaiserve.export.int8 import nncf_output_to_stderr
    from xaiserve.export.preprocessing import embed_preprocessing
    from xaiserve.export.saliency import insert_saliency
    from xaiserve.export.sources import SourceOptions, create_source

    loaded = create_source("default", SourceOptions())
    info = loaded.info
    images = load_images(calibration, info, size, "--calibration")
    mean = np.array(info.mean_values, np.float32)
    scale = np.array(info.scale_values, np.float32)

    def normalise(image: np.ndarray) -> np.ndarray:
        return ((image[None].astype(np.float32) - mean) / scale).transpose(0, 3, 1, 2)

    with nncf_output_to_stderr():
        quantized = nncf.quantize(loaded.model, nncf.Dataset(list(images), normalise),
                                  subset_size=len(images),
                                  fast_bias_correction=settings.fast_bias_correction)
    model, _ = insert_saliency(quantized)
    model = embed_preprocessing(model, info)
    info.write(model)
    return model


def top1_without_saturation(f32_model: ov.Model, int8_models: dict[str, ov.Model],
                            validation: Path, count: int) -> dict[str, float]:
    """Top-1 agreement with f32 of each INT8 model computed exactly (no 16-bit saturation)."""
    core = ov.Core()
    images = load_images(validation, _info(f32_model), count, "--validation")
    reference = infer_all(compile_f32(f32_model, core), images, "f32 IR")[0]
    return {name: top1_agreement(reference, infer_all(
                core.compile_model(m, "CPU", EXACT_INT8_CONFIG), images, name)[0])
            for name, m in int8_models.items()}


def batch1_request(core: ov.Core, model: ov.Model, precision: str) -> ov.InferRequest:
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return back_to_back.batch1_request(core, model, compile_config(precision), image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="calibration and validation")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement per model")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compare-order", action="store_true")
    parser.add_argument("--keep-f32-first", type=float, nargs="*", default=[], metavar="F",
                        help="also INT8 with the first fraction F of the backbone in f32")
    parser.add_argument("--overflow-fix", nargs="*", default=[], metavar="F",
                        help="also INT8 with this --overflow-fix (enable, first-layer, disable)")
    parser.add_argument("--accuracy-control", type=float, default=None, metavar="DROP",
                        help="also INT8 with accuracy control to this top-1 drop, steered by a "
                             "third folder of crops")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--picture", type=Path, default=None,
                        help="PNG: f32 and INT8 maps side by side on validation images")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="int8_speed_"))
    calibration, validation = work / "calibration", work / "validation"
    write_folder(calibration, args.images, seed=0)
    write_folder(validation, args.images, seed=1)
    settings = Int8Settings(calibration=calibration, calibration_size=args.images,
                            validation=validation, validation_size=args.images)
    t = time.perf_counter()
    f32 = export_model(ExportRequest("default", work / "models", "f32"))
    int8 = export_model(ExportRequest("default", work / "models", "int8", int8=settings))
    print(f"exports: {time.perf_counter() - t:.0f} s", file=sys.stderr)

    core = ov.Core()
    models = {"f32": core.read_model(f32.path / "model.xml"),
              "int8": core.read_model(int8.path / "model.xml")}
    figures = {"int8 (final model, f32 head)": int8.card["int8"]}
    if args.compare_order:
        models["int8 plain-first"] = plain_first_int8(calibration, args.images, settings)
        images = load_images(validation, _info(models["f32"]), args.images,
                             "--validation")
        reference = infer_all(compile_f32(models["f32"], core), images, "f32 IR")
        figures["int8 plain-first"] = agreement(
            *reference, *infer_all(compile_f32(models["int8 plain-first"], core), images, "A"))

    info = _info(models["f32"])
    for fraction in args.keep_f32_first:
        name = f"int8, first {fraction:g} in f32"
        models[name], figures[name] = quantize_export(
            models["f32"], info.saliency_target_layer, info,
            replace(settings, keep_f32_first=fraction))
    for fix in args.overflow_fix:
        name = f"int8, overflow fix {fix}"
        models[name], figures[name] = quantize_export(
            models["f32"], info.saliency_target_layer, info, replace(settings, overflow_fix=fix))
    if args.accuracy_control is not None:
        name = f"int8, accuracy control {args.accuracy_control:g}"
        write_folder(work / "control", args.images, seed=2)
        models[name], figures[name] = quantize_export(
            models["f32"], info.saliency_target_layer, info,
            replace(settings, accuracy_control=True, control=work / "control",
                    max_top1_drop=args.accuracy_control), enforce_gate=False)
    if int8_dot_product(cpu_flags()) == "saturating":
        exact = top1_without_saturation(
            models["f32"], {n: m for n, m in models.items() if n != "f32"}, validation,
            args.images)
        for name, value in exact.items():
            key = "int8 (final model, f32 head)" if name == "int8" else name
            figures[key]["top1_agreement_without_saturation"] = value

    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precisions = ["f32"] + (["bf16"] if "BF16" in capabilities else [])
    timings = {}
    for precision in precisions:
        requests = {name: batch1_request(core, m, precision) for name, m in models.items()}
        timings[precision] = measure_interleaved(requests, 2.0, args.seconds, args.rounds)

    sizes = {"f32": (f32.path / "model.bin").stat().st_size,
             "int8": (int8.path / "model.bin").stat().st_size}
    print(f"CPU capabilities: {' '.join(capabilities)} (no BF16: compared with f32)"
          if "BF16" not in capabilities else f"CPU capabilities: {' '.join(capabilities)}")
    for precision, by_model in timings.items():
        base = by_model["f32"].p50_ms
        print(f"\nbatch 1, LATENCY hint, inference precision {precision}:")
        print(f"{'model':32s} {'p50 ms':>8s} {'mean ms':>8s} {'ratio':>7s}")
        for name, timing in by_model.items():
            print(f"{name:32s} {timing.p50_ms:8.2f} {timing.mean_ms:8.2f} "
                  f"{timing.p50_ms / base:7.3f}")
    ratio = timings["f32"]["int8"].p50_ms / timings["f32"]["f32"].p50_ms
    print(f"\nINT8 / f32 p50 latency: {ratio:.3f} (target <= {TARGET_RATIO})")
    print(f".bin: f32 {sizes['f32'] / 1e6:.1f} MB, int8 {sizes['int8'] / 1e6:.1f} MB")
    print(f"CPU: {figures['int8 (final model, f32 head)']['validation_cpu']}, overflow fix "
          f"applied by default: {figures['int8 (final model, f32 head)']['overflow_fix']}")
    keys = ("images", "top1_agreement", "top1_agreement_without_saturation", "top1_in_top5",
            "confident_images",
            "top1_agreement_confident",
            "saliency_rank_correlation", "saliency_rank_correlation_p05", "saliency_top_iou",
            "int8_layer_count")
    for name, f in figures.items():
        print(f"{name}: " + ", ".join(
            f"{k} {f[k]:.3f}" if isinstance(f[k], float) else f"{k} {f[k]}"
            for k in keys if k in f))
    if args.picture:
        from xaiserve.service.overlay import write_png

        args.picture.parent.mkdir(parents=True, exist_ok=True)
        write_png(args.picture, side_by_side(models["f32"], models["int8"], validation, 8))
        print(f"picture: {args.picture}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "ratio_int8_f32_p50": ratio, "target_ratio": TARGET_RATIO, "bin_bytes": sizes,
            "timings": {p: {n: vars(t) for n, t in d.items()} for p, d in timings.items()},
            "agreement": figures}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _info(model: ov.Model):
    from xaiserve.service.model_info import ModelInfo

    return ModelInfo.from_model(model)


if __name__ == "__main__":
    sys.exit(main())
