"""How much the saliency branch's int8 map product saturates on this CPU, and what 7-bit weights
would do instead (README, "Which CPU computes the INT8 model").

The default model's f32 IR (its map product is int8, `--map-precision auto`) runs on the
validation crops twice: as compiled, and computed exactly (the CPU plugin's internal
LP_TRANSFORMS_MODE=NO runs the FakeQuantize operations in f32, as a CPU with VNNI sums them).
Then the same with the product's weights requantised to 7 bits. On a CPU with VNNI both pairs
agree; without VNNI the first pair differs where 16-bit sums saturated.

    python benchmarks/map_product_saturation.py [--repository bench-out/serving_speed_repo]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts")]

from calibration_photos import write_folder  # noqa: E402

from xaiserve.export.int8 import infer_all, load_images  # noqa: E402
from xaiserve.service.cpu_int8 import (EXACT_INT8_CONFIG, cpu_flags,  # noqa: E402
                                       int8_dot_product, int8_weights)
from xaiserve.service.model_info import ModelInfo  # noqa: E402

COMPILED = {"INFERENCE_PRECISION_HINT": "f32"}
MOVED = 0.05  # a map "moves" when some location changes by more than this on the 0..1 scale


def map_product(model: ov.Model) -> ov.Node:
    """The saliency branch's convolution whose weights are an int8 constant."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Convolution" and int8_weights(node) is not None:
            return node
    raise SystemExit("no int8 map product in this IR (exported with --map-precision f32?)")


def with_seven_bit_product(model: ov.Model) -> ov.Model:
    """A copy whose map product's weights are requantised to [-63, 63] with twice the scale."""
    copy = model.clone()
    conv = map_product(copy)
    weights = int8_weights(conv)
    scale = conv.input_value(1).get_node().input_value(1).get_node().get_data()  # the Multiply
    seven = np.clip(np.round(weights.astype(np.float32) / 2), -63, 63).astype(np.int8)
    dequantized = ops.multiply(ops.convert(ops.constant(seven), np.float32),
                               ops.constant((scale * 2).astype(np.float32)))
    conv.input(1).replace_source_output(dequantized.output(0))
    copy.validate_nodes_and_infer_types()
    return copy


def compare(a: np.ndarray, b: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Maps [n, K, h, w] against maps: the top class's largest change, and over all classes the
    share of maps that move by more than MOVED and the largest change."""
    n = len(a)
    diff = np.abs(a - b).reshape(n, a.shape[1], -1).max(-1)
    return {"top_class_max": float(diff[np.arange(n), classes].max()),
            "moved_share": float((diff > MOVED).mean()), "max": float(diff.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "bench-out/serving_speed_repo",
                        help="holds efficientnet_lite0/1 (benchmarks/serving_speed.py exports it)")
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args(argv)

    core = ov.Core()
    model = core.read_model(args.repository / "efficientnet_lite0" / "1" / "model.xml")
    with tempfile.TemporaryDirectory() as work:
        write_folder(Path(work), args.images, seed=1)
        images = load_images(Path(work), ModelInfo.from_model(model), args.images, "images")
    maps = {}
    for name, variant in (("8-bit", model), ("7-bit", with_seven_bit_product(model))):
        for mode, config in (("compiled", COMPILED), ("exact", EXACT_INT8_CONFIG)):
            logits, maps[name, mode] = infer_all(core.compile_model(variant, "CPU", config),
                                                 images, f"{name} {mode}")
    top = logits.argmax(1)
    print(f"CPU INT8 sums: {int8_dot_product(cpu_flags())}; {len(images)} validation crops; a map "
          f"moves when a location changes by more than {MOVED}")
    for label, a, b in (("8-bit, compiled vs exact (saturation)", maps["8-bit", "compiled"],
                         maps["8-bit", "exact"]),
                        ("7-bit, compiled vs exact", maps["7-bit", "compiled"],
                         maps["7-bit", "exact"]),
                        ("7-bit vs 8-bit, both exact (precision)", maps["7-bit", "exact"],
                         maps["8-bit", "exact"])):
        r = compare(a, b, top)
        print(f"{label:42s} top class max {r['top_class_max']:.3g}; all classes: "
              f"{r['moved_share']:.2%} moved, max {r['max']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
