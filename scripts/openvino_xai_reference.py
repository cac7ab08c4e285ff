"""Reference ReciproCAM maps from openvino-xai 1.1.0, for tests/test_openvino_xai_reference.py.

openvino-xai 1.1.0 imports `openvino.runtime`, which OpenVINO 2026 removed, so this runs in its
own environment and only its output is committed (tests/data/openvino_xai_reciprocam.npz):

    python3 -m venv /tmp/oxvenv
    /tmp/oxvenv/bin/pip install "openvino==2025.4.1" "numpy<2" scipy tqdm matplotlib \
        opencv-python-headless
    /tmp/oxvenv/bin/pip install --no-deps openvino-xai==1.1.0
    # in the project's .venv: the plain default IR and the u8 inputs it takes
    .venv/bin/xaiserve export default --method none --repository /tmp/plain --name plain
    .venv/bin/python scripts/openvino_xai_reference.py inputs /tmp/plain/plain/1/model.xml \
        /tmp/inputs.npz
    # in the openvino-xai environment: its ReciproCAM on that IR
    /tmp/oxvenv/bin/python scripts/openvino_xai_reference.py maps /tmp/plain/plain/1/model.xml \
        /tmp/inputs.npz tests/data/openvino_xai_reciprocam.npz

Only numpy and openvino are imported at the top: each step runs in one of the two environments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PHOTOS = ("chelsea", "coffee")  # two ImageNet photos: a cat (285) and an espresso (967)
TOP_K = 5  # maps kept per image: the IR's top 5 classes


def write_inputs(ir: Path, out: Path) -> None:
    """The sample photos resized as the IR's model_info says (project environment)."""
    import openvino as ov

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sample_photos import sample_photos

    from xaiserve.service.images import resize_for_model
    from xaiserve.service.model_info import ModelInfo

    info = ModelInfo.from_model(ov.Core().read_model(str(ir)))
    photos = sample_photos()
    inputs = np.stack([resize_for_model(photos[name], info) for name in PHOTOS])
    np.savez_compressed(out, names=np.array(PHOTOS), inputs=inputs)


def write_maps(ir: Path, inputs_file: Path, out: Path) -> None:
    """openvino-xai's ReciproCAM inserted into the plain IR, run on the inputs (its environment)."""
    import openvino as ov
    import openvino_xai as xai

    data = np.load(inputs_file)
    model = xai.insert_xai(ov.Core().read_model(str(ir)), task=xai.Task.CLASSIFICATION,
                           explain_method=xai.Method.RECIPROCAM, embed_scaling=True)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    classes, maps = [], []
    for image in data["inputs"]:
        result = compiled(image[None])
        logits = np.asarray(result[compiled.outputs[0]])[0]
        top = np.argsort(-logits)[:TOP_K]
        classes.append(top)
        maps.append(np.asarray(result["saliency_map"], np.float32)[0, top])
    np.savez_compressed(out, names=data["names"], inputs=data["inputs"],
                        classes=np.array(classes), maps=np.array(maps),
                        openvino=np.array(ov.__version__), openvino_xai=np.array("1.1.0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("inputs", "maps"))
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    if args.step == "inputs":
        write_inputs(*args.paths)
    else:
        write_maps(*args.paths)


if __name__ == "__main__":
    main()
