"""Classifiers someone already deployed as ONNX or IR files, in the forms their frameworks
write: exported with the real command, they must predict what their source predicts, carry
the same maps as the torch source's export, and serve their own probabilities.

The files are written by torch's ONNX exporter from the seeded small CNN (the weights of
`small_export`) wrapped as other frameworks build their models: Keras (float NHWC input, a
final Softmax), Caffe and SqueezeNet ([N, K, 1, 1] scores from a 1x1 convolution, Softmax),
a batch fixed at 1, a second output; as IRs: one that takes BGR (Open Model Zoo's, `--bgr`),
one with a saliency map of its own (OpenVINO Training Extensions'); and in float16, as
onnxconverter-common and torch's exporter write it for GPUs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch  # its ONNX exporter needs the onnx package too (the test extra)

from xaiserve.export.parity import compile_f32

from .conftest import run_cli
from .synthetic import SIZE, make_dataset

# what torch's TorchScript-based exporter says while it writes the test files
pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:Constant folding - Only steps=1:UserWarning",
    "ignore::torch.jit.TracerWarning",
    "ignore:`torch.jit.trace",
    "ignore:The feature will be removed:DeprecationWarning",
    # TorchScript files are what TorchServe deploys; torch deprecates writing them
    "ignore:`torch.jit.save` is deprecated:FutureWarning",
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:`torch.jit.trace` is deprecated:FutureWarning",
    # onnxconverter-common, for each weight under float16's smallest normal number
    "ignore:the float32 number:UserWarning",
)


class Wraps(torch.nn.Module):
    """The seeded network inside another framework's conventions (`forward`)."""

    def __init__(self, net):
        super().__init__()
        self.net = net


class KerasStyle(Wraps):
    """Float NHWC images in, probabilities out."""

    def forward(self, x):
        return torch.softmax(self.net(x.permute(0, 3, 1, 2)), 1)


class ConvScores(torch.nn.Module):
    """The linear layer as a 1x1 convolution on the pooled map: scores [N, K, 1, 1], then a
    Softmax over the classes."""

    def __init__(self, net):
        super().__init__()
        self.features = net[:-2]  # up to the global pooling, [N, C, 1, 1]
        linear = net[-1]
        self.classifier = torch.nn.Conv2d(linear.in_features, linear.out_features, 1)
        self.classifier.weight.data = linear.weight.data[:, :, None, None].clone()
        self.classifier.bias.data = linear.bias.data.clone()

    def forward(self, x):
        return torch.softmax(self.classifier(self.features(x)), 1)


class TakesBgr(Wraps):
    """BGR images in (Caffe, OpenCV, Open Model Zoo IRs), the channels swapped back inside."""

    def forward(self, x):
        return self.net(x.flip(1))


class TakesPixels(Wraps):
    """u8 NHWC pixels in, normalised inside."""

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2).float() / 255)


class TwoOutputs(Wraps):
    OUTPUTS = ("scores", "probabilities")

    def forward(self, x):
        logits = self.net(x)
        return logits, torch.softmax(logits, 1)


class WithOwnSaliency(torch.nn.Module):
    """As OpenVINO Training Extensions exports a classifier: logits, a feature vector and a
    saliency map of its own (here the raw class activation maps)."""

    OUTPUTS = ("logits", "feature_vector", "saliency_map")

    def __init__(self, net):
        super().__init__()
        self.features, self.classifier = net[:-3], net[-1]  # before the pooling; the linear

    def forward(self, x):
        features = self.features(x)
        pooled = features.mean((2, 3))
        maps = torch.einsum("kc,nchw->nkhw", self.classifier.weight, features)
        return self.classifier(pooled), pooled, maps


SCALE = ("--scale", "255")  # the float forms take 0..1
# name: (wrapper, input layout, dynamic batch, file, export options, what the card says);
# file: "onnx" (torch's TorchScript exporter), "dynamo" (its torch.export one) or "xml"
VARIANTS = {
    "plain": (lambda net: net, "NCHW", True, "onnx", SCALE, ""),
    "plain_dynamo": (lambda net: net, "NCHW", True, "dynamo", SCALE, ""),
    "batch_fixed_at_1": (lambda net: net, "NCHW", False, "onnx", SCALE, ""),
    "keras": (KerasStyle, "NHWC", True, "onnx", SCALE, "its final Softmax removed"),
    "keras_dynamo": (KerasStyle, "NHWC", True, "dynamo", SCALE, "its final Softmax removed"),
    "conv_scores": (ConvScores, "NCHW", True, "onnx", SCALE, "its final Softmax removed"),
    "two_outputs": (TwoOutputs, "NCHW", True, "onnx", SCALE, ""),
    "u8_pixels": (TakesPixels, "NHWC", True, "onnx", (), ""),
    "bgr_ir": (TakesBgr, "NCHW", True, "xml", (*SCALE, "--bgr"), "takes BGR"),
    "training_extensions_ir": (WithOwnSaliency, "NCHW", True, "xml", SCALE,
                               "its own saliency_map output dropped"),
}


def seeded_cnn():
    """`small_export`'s weights."""
    from .synthetic import small_cnn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return small_cnn().eval()


def write_onnx(module, path, layout: str, dynamic_batch: bool, dtype=None,
               size: int = SIZE, dynamo: bool = False) -> None:
    """torch's TorchScript-based exporter (`dynamic_axes`), or with `dynamo` its torch.export
    one (`dynamic_shapes` and an example batch of 2: torch.export specialises a batch of 1)."""
    batch = 2 if dynamo and dynamic_batch else 1
    shape = (batch, 3, size, size) if layout == "NCHW" else (batch, size, size, 3)
    outputs = list(getattr(module, "OUTPUTS", ["scores"]))
    if dynamo:  # the weights in path + ".data", torch's default
        dynamic = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic_batch else {}
        dynamic["external_data"] = True
    else:
        dynamic = {"dynamic_axes": {"input": {0: "batch"}} if dynamic_batch else None}
    torch.onnx.export(module.eval(), (torch.zeros(shape, dtype=dtype),), str(path),
                      dynamo=dynamo, input_names=["input"], output_names=outputs, **dynamic)


def outputs_of(ir, images: np.ndarray) -> dict[str, np.ndarray]:
    compiled = compile_f32(ov.Core().read_model(ir))
    result = compiled(images)
    return {name: result[compiled.output(name)] for name in ("logits", "saliency_map")}


def assert_like_the_seeded_cnn(version: Path, small_export) -> None:
    """The exported IR gives the seeded network's logits (from 0..1 images) and the maps of
    the same network exported from its code (`small_export`)."""
    images, _, _ = make_dataset(6, seed=3)
    ours = outputs_of(version / "model.xml", images)
    with torch.no_grad():
        logits = seeded_cnn()(torch.from_numpy(images.transpose(0, 3, 1, 2) / 255).float())
    np.testing.assert_allclose(ours["logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours["saliency_map"],
                               outputs_of(small_export.path / "model.xml", images)["saliency_map"],
                               atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deployed_file_exports_like_its_torch_source(variant, small_export, tmp_path):
    wrap, layout, dynamic_batch, kind, options, change = VARIANTS[variant]
    net = seeded_cnn()
    deployed = tmp_path / "deployed.onnx"
    write_onnx(wrap(net), deployed, layout, dynamic_batch,
               dtype=torch.uint8 if wrap is TakesPixels else None, dynamo=kind == "dynamo")
    if kind == "xml":  # an IR as ovc writes it from the ONNX file, f32 weights
        ov.save_model(ov.convert_model(deployed), tmp_path / "deployed.xml",
                      compress_to_fp16=False)
        deployed = tmp_path / "deployed.xml"
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    result = run_cli("export", str(deployed), "--repository", str(tmp_path / "models"),
                     "--name", variant, "--labels", str(labels), *options)
    assert result.returncode == 0, result.stderr[-2000:]
    version = tmp_path / "models" / variant / "1"
    card = json.loads((version / "model_card.json").read_text())
    assert card["saliency"]["method"] == "reciprocam"
    assert card["parity"]["top1_agreement"] == 1.0 and card["parity"]["max_abs_logit_diff"] < 1e-4
    assert change in card["source"]

    assert_like_the_seeded_cnn(version, small_export)  # logits, not softmax


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_file_exports_like_its_torch_source(how, small_export, tmp_path):
    """A TorchScript file (torch.jit.save of a traced or scripted module, what TorchServe
    deploys) exports with its own weights: the torch network's logits, the maps of the same
    network exported from its code (`small_export`); its gradients give a reference map."""
    net = seeded_cnn()
    scripted = torch.jit.trace(net, torch.zeros(1, 3, SIZE, SIZE)) if how == "trace" \
        else torch.jit.script(net)
    torch.jit.save(scripted, tmp_path / "model.pt")
    result = run_cli("export", str(tmp_path / "model.pt"), "--repository",
                     str(tmp_path / "models"), "--name", how, "--input-size", str(SIZE),
                     "--mean", "0", *SCALE, "--reference", "gradient")
    assert result.returncode == 0, result.stderr[-2000:]
    version = tmp_path / "models" / how / "1"
    card = json.loads((version / "model_card.json").read_text())
    assert card["source"] == f"torchscript:{tmp_path / 'model.pt'}"
    assert card["reference"]["method"] == "gradient" and card["reference"]["images"] == 4
    assert card["saliency"]["method"] == "reciprocam"
    assert_like_the_seeded_cnn(version, small_export)


def write_exported_program(module, path: Path, dynamic_batch: bool, size: int = SIZE) -> None:
    """torch.export.save of the module, exported at a batch of 2 with a free batch, or at 1."""
    dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    example = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
    torch.export.save(torch.export.export(module.eval(), (example,), dynamic_shapes=dims), path)


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["batch_1", "batch_free"])
def test_exported_program_file_exports_like_its_torch_source(dynamic_batch, small_export,
                                                             tmp_path):
    """A torch.export program (.pt2, PyTorch 2's deployment format) is read by OpenVINO's
    converter with the sizes it was exported at (the converter leaves them all free); a CNN
    exported at a batch of 1 runs any batch."""
    net = seeded_cnn()
    write_exported_program(net, tmp_path / "model.pt2", dynamic_batch)
    result = run_cli("export", str(tmp_path / "model.pt2"), "--repository",
                     str(tmp_path / "models"), "--name", "program", *SCALE)
    assert result.returncode == 0, result.stderr[-2000:]
    version = tmp_path / "models" / "program" / "1"
    card = json.loads((version / "model_card.json").read_text())
    assert card["parity"]["max_abs_logit_diff"] < 1e-4
    assert_like_the_seeded_cnn(version, small_export)


@pytest.mark.parametrize("option", ["--reference gradcam", "--finetune-steps 5"])
def test_torchscript_file_refuses_hooks_and_training_in_one_line(option, tmp_path):
    """A TorchScript module takes no forward hooks (Grad-CAM) and no training wrappers
    (quantisation-aware training): the option is named with what to do instead, nothing is
    written (they were RuntimeErrors from torch.jit)."""
    torch.jit.save(torch.jit.trace(seeded_cnn(), torch.zeros(1, 3, SIZE, SIZE)),
                   tmp_path / "model.pt")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    import cv2

    for i, image in enumerate(make_dataset(4, seed=1)[0]):
        cv2.imwrite(str(calibration / f"{i}.png"), image[..., ::-1])
    extra = ["--int8", "--calibration", str(calibration)] if "finetune" in option else []
    result = run_cli("export", str(tmp_path / "model.pt"), "--repository",
                     str(tmp_path / "models"), "--name", "ts", "--input-size", str(SIZE),
                     *option.split(), *extra)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert option.split()[0] in line and "TorchScript" in line, line
    assert not (tmp_path / "models" / "ts").exists()


def test_state_dict_file_is_refused_with_the_fix(tmp_path):
    """A .pt file of weights alone (torch.save of a state dict) is no model: one line that
    says which sources take it as --checkpoint."""
    torch.save(seeded_cnn().state_dict(), tmp_path / "weights.pt")
    result = run_cli("export", str(tmp_path / "weights.pt"), "--repository",
                     str(tmp_path / "models"), "--name", "weights")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "not a TorchScript model" in line and f"--checkpoint {tmp_path / 'weights.pt'}" in line
    assert not (tmp_path / "models").exists()


def test_bgr_is_for_files_only(tmp_path):
    result = run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                     "--bgr", "--repository", str(tmp_path / "models"), "--name", "cnn")
    assert result.returncode == 2
    assert "--bgr: only for model files" in result.stderr.strip().splitlines()[-1]


def write_float16(path: Path, form: str) -> None:
    """The seeded network as a float16 file, in the forms tools write: torch's exporter of a
    `.half()` module (f16 in and out), onnxconverter-common's `convert_float_to_float16`
    (f16 in and out, or f32 with casts around, `keep_io_types`), an IR of the f16 ONNX file."""
    from onnx import load, save
    from onnxconverter_common.float16 import convert_float_to_float16

    if form in ("torch_half", "float16_ir"):
        write_onnx(seeded_cnn().half(), path.with_suffix(".onnx"), "NCHW", True,
                   dtype=torch.float16)
        if form == "float16_ir":
            ov.save_model(ov.convert_model(path.with_suffix(".onnx")), path,
                          compress_to_fp16=False)
        return
    write_onnx(seeded_cnn(), path, "NCHW", True)
    save(convert_float_to_float16(load(path), keep_io_types=form == "converter_f32_io"), path)


FLOAT16_FORMS = {"torch_half": "onnx", "converter_f16_io": "onnx", "converter_f32_io": "onnx",
                 "float16_ir": "xml"}


@pytest.mark.parametrize("form", list(FLOAT16_FORMS))
def test_float16_model_exports_as_float32(form, small_export, tmp_path):
    """A float16 file (written for a GPU) exports in float32 with its own weights: the logits
    OpenVINO computes from the file, the torch network's up to float16's rounding of its
    weights, the maps of the float32 source's export."""
    deployed = tmp_path / f"half.{FLOAT16_FORMS[form]}"
    write_float16(deployed, form)
    result = run_cli("export", str(deployed), "--repository", str(tmp_path / "models"),
                     "--name", "half", *SCALE)
    assert result.returncode == 0, result.stderr[-2000:]
    version = tmp_path / "models" / "half" / "1"
    card = json.loads((version / "model_card.json").read_text())
    assert "its f16 arithmetic widened to f32" in card["source"]
    assert card["parity"]["max_abs_logit_diff"] < 1e-4

    images, _, _ = make_dataset(6, seed=3)
    ours = outputs_of(version / "model.xml", images)
    as_file = compile_f32(ov.Core().read_model(deployed))
    tensor = (images.transpose(0, 3, 1, 2) / 255).astype(
        as_file.input(0).get_element_type().to_dtype())
    np.testing.assert_allclose(ours["logits"], as_file(tensor)[0], atol=1e-3)
    with torch.no_grad():
        logits = seeded_cnn()(torch.from_numpy(images.transpose(0, 3, 1, 2) / 255).float())
    np.testing.assert_allclose(ours["logits"], logits.numpy(), atol=0.02)
    np.testing.assert_allclose(ours["saliency_map"],
                               outputs_of(small_export.path / "model.xml", images)["saliency_map"],
                               atol=0.02)


def test_bfloat16_model_is_refused_with_the_fix(tmp_path):
    """bf16 values are no numpy type to widen exactly: refused in one line, nothing written."""
    import openvino.opset13 as ops

    image = ops.parameter([-1, 3, SIZE, SIZE], ov.Type.bf16, name="input")
    scores = ops.reduce_mean(ops.relu(image), [2, 3])  # [N, 3]
    ov.save_model(ov.Model([scores], [image]), tmp_path / "bf16.xml")
    result = run_cli("export", str(tmp_path / "bf16.xml"), "--repository",
                     str(tmp_path / "models"), "--name", "bf16")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "computes in bf16" in line and "give the float32 model" in line
    assert not (tmp_path / "models" / "bf16").exists()


def test_lite0_deployed_as_keras_or_float16_onnx_serves_like_the_default(default_export, photos,
                                                                          tmp_path):
    """The real default model as a Keras-style ONNX file (NHWC, Softmax at the end) and as a
    float16 ONNX file (onnxconverter-common), exported and served beside the default export:
    the same classes, the same probabilities (for the Keras file its own, not a softmax of
    probabilities: 0.001 for every class), maps alike."""
    from onnx import load, save
    from onnxconverter_common.float16 import convert_float_to_float16

    from xaiserve.export.sources import create_source, imagenet_labels
    from xaiserve.service.client import XaiClient
    from xaiserve.service.config import ServerSettings
    from xaiserve.service.server import Server

    from .test_server import jpeg

    source = create_source("default")
    size = source.info.input_height
    write_onnx(KerasStyle(source.torch_module), tmp_path / "lite0_keras.onnx", "NHWC", True,
               size=size)
    write_onnx(source.torch_module, tmp_path / "lite0_f16.onnx", "NCHW", True, size=size)
    save(convert_float_to_float16(load(tmp_path / "lite0_f16.onnx")), tmp_path / "lite0_f16.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(imagenet_labels()) + "\n")
    repo = tmp_path / "models"
    for name in ("keras", "f16"):
        result = run_cli("export", str(tmp_path / f"lite0_{name}.onnx"), "--repository",
                         str(repo), "--name", name, "--labels", str(labels),
                         "--mean", ",".join(map(str, source.info.mean_values)),
                         "--scale", ",".join(map(str, source.info.scale_values)))
        assert result.returncode == 0, result.stderr[-2000:]
    shutil.copytree(default_export.path, repo / "default" / "1")

    server = Server(ServerSettings(repository=repo, host="127.0.0.1", port=0, rest_port=0,
                                   poll_seconds=0.5)).start()
    client = XaiClient(f"127.0.0.1:{server.port}")
    try:
        for photo in ("chelsea", "coffee"):
            image = jpeg(photos[photo])
            default = client.explain(image, "default", top_k=3, map_format="float")
            for name in ("keras", "f16"):
                ours = client.explain(image, name, top_k=3, map_format="float")
                assert [p.label for p in ours.predictions] == \
                    [p.label for p in default.predictions], name
                np.testing.assert_allclose([p.score for p in ours.predictions],
                                           [p.score for p in default.predictions], atol=0.02)
                assert ours.predictions[0].score > 0.5
                for a, b in zip(ours.maps, default.maps):
                    ours_map, default_map = (np.asarray(m.values).reshape(tuple(m.shape))
                                             for m in (a, b))
                    assert np.corrcoef(ours_map.ravel(), default_map.ravel())[0, 1] > 0.95
    finally:
        client.close()
        server.stop(grace=1)


def seeded_timm(arch: str):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, num_classes=4).eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ["pit_ti_distilled_224", "pvt_v2_b0", "deit_tiny_patch16_224"])
def test_transformer_onnx_gets_the_torch_sources_maps(arch, dynamo, tmp_path):
    """A timm transformer as its ONNX file (either of torch's exporters, dynamic batch) against
    the same weights exported from timm. The ONNX graph reads sizes from tensor shapes at run time
    (PiT: its token count, from its prefix tokens before the branch's target; PVT v2:
    `reshape(B, H, W, -1)`, whose output size is then unknown), which the torch converter
    folds: the branch cannot re-run the last block on masked copies until they are constants.
    benchmarks/onnx_sources.py compares every architecture of the saliency test so."""
    net = seeded_timm(arch)
    size = net.pretrained_cfg["input_size"][1]
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    write_onnx(net, tmp_path / "deployed.onnx", "NCHW", True, size=size, dynamo=dynamo)
    mean, std = (",".join(str(255 * v) for v in net.pretrained_cfg[k]) for k in ("mean", "std"))
    exports = {
        "onnx": (str(tmp_path / "deployed.onnx"), "--mean", mean, "--scale", std),
        "timm": (f"timm:{arch}", "--checkpoint", str(tmp_path / "weights.pth"),
                 "--num-classes", "4"),
    }
    images, outputs = make_dataset(2, seed=5)[0], {}
    import cv2

    images = np.stack([cv2.resize(image, (size, size)) for image in images])
    for name, (source, *options) in exports.items():
        result = run_cli("export", source, "--repository", str(tmp_path / "models"),
                         "--name", name, *options)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = outputs_of(tmp_path / "models" / name / "1" / "model.xml", images)
    np.testing.assert_allclose(outputs["onnx"]["logits"], outputs["timm"]["logits"], atol=1e-4)
    np.testing.assert_allclose(outputs["onnx"]["saliency_map"], outputs["timm"]["saliency_map"],
                               atol=0.01)


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_batch_specialised_by_torch_export_is_refused_with_the_fix(kind, tmp_path):
    """`torch.onnx.export(model, (x,), path)`, torch.export since torch 2.9, or
    `torch.export.save`, given an example batch of 1 writes PiT's reshapes with that 1
    (`dynamic_axes` or not): the file cannot run the saliency branch's batch of masked copies.
    One line that names the node and the fix, nothing written (it was an OpenVINO shape
    error)."""
    deployed = tmp_path / f"pit.{kind}"
    if kind == "onnx":
        write_onnx(seeded_timm("pit_ti_distilled_224"), deployed, "NCHW", False, size=224,
                   dynamo=True)
    else:
        write_exported_program(seeded_timm("pit_ti_distilled_224"), deployed, False, size=224)
    result = run_cli("export", str(deployed), "--repository", str(tmp_path / "models"),
                     "--name", "pit")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "cannot run a batch of 2" in line and "Reshape '" in line, line
    assert "dynamic_shapes" in line
    assert not (tmp_path / "models" / "pit").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_onnx_weights_file_missing_or_short_is_one_line(damage, tmp_path):
    """torch.export writes the weights beside the .onnx file (`model.onnx.data`); a pipeline
    that copies the .onnx alone, or stops part-way through the weights, gets a line that
    names that file, not OpenVINO's "Invalid usage of method for externally stored data"."""
    write_onnx(seeded_cnn(), tmp_path / "cnn.onnx", "NCHW", True, dynamo=True)
    weights = tmp_path / "cnn.onnx.data"
    assert weights.is_file()  # torch.onnx.export(external_data=True), its default
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    result = run_cli("export", str(tmp_path / "cnn.onnx"), "--repository",
                     str(tmp_path / "models"), "--name", "cnn", *SCALE)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "its weights are in cnn.onnx.data beside it" in line
    assert ("missing" if damage == "missing" else " bytes where the model needs") in line
    assert not (tmp_path / "models" / "cnn").exists()


KERAS = Path(__file__).parent / "data" / "keras_cnn"


# file: (its probabilities in reference.npz, tolerance, what the card says)
KERAS_FILES = {
    "model.onnx": ("probabilities", 1e-5, "its final Softmax removed"),
    "model.tflite": ("probabilities", 1e-5, "its final Softmax removed"),
    "saved_model": ("probabilities", 1e-5, "its final Softmax removed"),  # TensorFlow Serving's
    # u8 in and out; the export feeds it real values and computes its head in float
    "model_int8.tflite": ("int8_probabilities", 0.01,
                          "its head after the global pooling computed in float"),
}


@pytest.mark.parametrize("file", list(KERAS_FILES))
def test_keras_model_as_tensorflow_converts_it(file, tmp_path):
    """A Keras CNN trained on the shapes (held-out accuracy 1.0), converted by tf2onnx, exported
    as a SavedModel, converted by TensorFlow Lite's converter and by its full-integer
    quantisation (scripts/keras_reference.py made these files; TensorFlow is not in this
    environment): exported with the real command,
    it gives TensorFlow's own probabilities, and its maps' top cell lies on the object (the
    integer model's for 0.42 of the images while its head after the pooling was quantised)."""
    key, tolerance, change = KERAS_FILES[file]
    from xaiserve.service.model import ClassifierModel

    from .test_localisation import token_hits

    result = run_cli("export", str(KERAS / file), "--repository", str(tmp_path), "--name",
                     "keras", "--labels", str(KERAS / "labels.txt"), "--scale", "255")
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((tmp_path / "keras" / "1" / "model_card.json").read_text())
    assert change in card["source"]
    reference = np.load(KERAS / "reference.npz")
    served = ClassifierModel(tmp_path / "keras" / "1",
                             config={"INFERENCE_PRECISION_HINT": "f32"}).load()
    out = served.predict(reference["images"])
    logits = out["logits"].astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities, reference[key], atol=tolerance)
    assert token_hits(out["saliency_map"], reference["labels"], reference["masks"]) >= 0.9
