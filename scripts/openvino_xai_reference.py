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

ViT-ReciproCAM's reference (tests/data/openvino_xai_vit/) is made the same way, on a small ViT
with random weights (its IR is committed with the maps, since timm's random weights are not
reproducible across versions):

    .venv/bin/python scripts/openvino_xai_reference.py vit-model tests/data/openvino_xai_vit
    /tmp/oxvenv/bin/python scripts/openvino_xai_reference.py vit-maps tests/data/openvino_xai_vit

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


VIT_INPUT = 224  # 14 x 14 patches of 16 pixels: the grid of the usual ViTs


def vit_inputs(images_u8: np.ndarray) -> np.ndarray:
    """[N, 224, 224, 3] u8 -> the small ViT's [N, 3, 224, 224] f32 input (scaled to [-1, 1])."""
    return ((images_u8.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


def write_vit_model(out: Path) -> None:
    """A small ViT (2 blocks, 64 wide, 10 classes) with random weights and LayerNorms that are
    not the identity (as in a trained model), as an IR, and the photos it is run on (project
    environment)."""
    import openvino as ov
    import torch
    from PIL import Image
    from timm.models.vision_transformer import VisionTransformer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sample_photos import sample_photos

    from xaiserve.export.sources import convert_torch

    torch.manual_seed(0)
    module = VisionTransformer(img_size=VIT_INPUT, patch_size=16, embed_dim=64, depth=2,
                               num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.LayerNorm):
                layer.weight.copy_(1 + 0.2 * torch.randn_like(layer.weight))
                layer.bias.copy_(0.1 * torch.randn_like(layer.bias))
        module.head.weight.normal_(0, 0.2)
        module.head.bias.normal_(0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(convert_torch(module, VIT_INPUT), str(out / "model.xml"))
    photos = sample_photos()
    images = np.stack([np.asarray(Image.fromarray(photos[name]).resize((VIT_INPUT, VIT_INPUT),
                                                                      Image.BILINEAR))
                       for name in PHOTOS])
    np.savez_compressed(out / "inputs.npz", names=np.array(PHOTOS), images=images)


def write_vit_maps(folder: Path) -> None:
    """openvino-xai's ViT-ReciproCAM (its defaults, and without the Gaussian spread) on the small
    ViT, every class of each photo (openvino-xai environment)."""
    import openvino as ov
    from openvino_xai.methods.white_box.recipro_cam import ViTReciproCAM

    core = ov.Core()
    images = np.load(folder / "inputs.npz")["images"]
    maps = {}
    for name, use_gaussian in (("gaussian", True), ("none", False)):
        method = ViTReciproCAM(core.read_model(str(folder / "model.xml")), embed_scaling=True,
                               use_gaussian=use_gaussian, prepare_model=False)
        model = method._model_ori
        branch = method.generate_xai_branch()
        both = ov.Model([model.outputs[0], branch.output(0)], model.get_parameters())
        compiled = core.compile_model(both, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        maps[name] = np.stack([np.asarray(compiled(x[None])[1], np.float32)[0]
                               for x in vit_inputs(images)])
    np.savez_compressed(folder / "openvino_xai_maps.npz", **maps,
                        openvino=np.array(ov.__version__), openvino_xai=np.array("1.1.0"))


STEPS = {"inputs": write_inputs, "maps": write_maps, "vit-model": write_vit_model,
         "vit-maps": write_vit_maps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    STEPS[args.step](*args.paths)


if __name__ == "__main__":
    main()
