"""Hugging Face image classifiers: a `save_pretrained` folder (transformers' or timm's), and the
model files Optimum writes.

A folder with `config.json` and weights (`model.safetensors`, `pytorch_model.bin`; what
`save_pretrained` writes and what a Hub snapshot holds) is loaded with transformers'
`AutoModelForImageClassification`, from the folder only (nothing is downloaded, no custom code
is run). Its labels come from the config's `id2label`, its input size, normalisation and
channel order from `preprocessor_config.json` (the image processor's settings), so the export
needs none of --labels, --mean, --scale and --input-size. Optimum's ONNX export
(`model.onnx`) and optimum-intel's OpenVINO export (`openvino_model.xml`) write the same two
JSON files beside the model file: `folder_defaults` reads them for the model-file loader.
A timm model saved for the Hub (`timm.models.save_for_hf`; the timm/* repositories: its
config.json names the `architecture`) is built by timm from the folder, with its own
preprocessing and label names.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from xaiserve.service.layout import (PRETRAINED_CONFIG_FILE, PRETRAINED_WEIGHT_FILES,
                                     PROCESSOR_FILE)
from xaiserve.service.model import error_reason

from .deployed import batch_refusal, fold_static_shape_reads
from .sources import (LoadedSource, SourceError, SourceOptions, check_class_count,
                      convert_torch, load_checkpoint, module_info, register_folder_source,
                      register_source, runs_on_images, timm_source)

CONFIG, PROCESSOR = PRETRAINED_CONFIG_FILE, PROCESSOR_FILE
# the weights, whole or as the index of their shards
WEIGHT_FILES = (*PRETRAINED_WEIGHT_FILES,
                *(f"{name}.index.json" for name in PRETRAINED_WEIGHT_FILES))
DEFAULT_RESCALE = 1 / 255  # BaseImageProcessor's rescale_factor
MAX_SIDE = 8192  # an input side beyond this is a mistake in the file, not a classifier
# What some processor classes do that their files do not say (transformers 5), by class name
CLASS_SETTINGS: dict[str, dict] = {
    "EfficientNetImageProcessor": {"include_top": True},  # divides by the std a second time
    "PPLCNetImageProcessor": {"do_flip_channel_order": True},  # Paddle's models take BGR
    "PerceiverImageProcessor": {"crop_before_resize": True},  # the model takes `size`
}


@dataclass
class ProcessorSettings:
    """What an image processor does to a u8 RGB image, in the exporter's terms: the model's
    input (height, width), and x = (pixel - mean) / scale per channel (0..255 units), channels
    reversed when `bgr` (MobileViT's `do_flip_channel_order`)."""

    height: int
    width: int
    mean_values: list[float]
    scale_values: list[float]
    bgr: bool = False


def processor_settings(processor: dict, source: str) -> ProcessorSettings:
    """`preprocessor_config.json` as settings. The model's input is the crop when the processor
    crops (`do_center_crop` with `crop_size`) after resizing, else the resize target (`height`
    and `width`, or a square of `shortest_edge`). Rescaling (with EfficientNet's
    `rescale_offset`, minus 1), normalising, and EfficientNet's `include_top` (a second
    division by the std) give x = ((p * r - o) - m) / s / s', which is
    (p - (m + o) / r) / (s * s' / r). A key left out or null takes the processor class's
    default (`CLASS_SETTINGS`, else the base class's)."""
    kind = str(processor.get("image_processor_type", "")).removesuffix("Fast")
    implied = CLASS_SETTINGS.get(kind.removesuffix("Pil"), {})

    def setting(key: str, default):
        value = processor.get(key)
        return implied.get(key, default) if value is None else value

    crops = setting("do_center_crop", False) and not implied.get("crop_before_resize")
    size = _crop_or_size(processor, bool(crops), source)
    rescale = _positive(setting("rescale_factor", DEFAULT_RESCALE), "rescale_factor", source) \
        if setting("do_rescale", True) else 1.0
    offset = 1.0 if setting("do_rescale", True) and setting("rescale_offset", False) else 0.0
    mean, std = [0.0] * 3, [1.0] * 3
    if setting("do_normalize", False):
        mean = _per_channel(processor.get("image_mean"), "image_mean", source)
        std = [_positive(v, "image_std", source)
               for v in _per_channel(processor.get("image_std"), "image_std", source)]
    again = std if setting("include_top", False) else [1.0] * 3
    mean_values = [(m + offset) / rescale for m in mean]
    scale_values = [s * t / rescale for s, t in zip(std, again)]
    if not all(1e-30 < abs(v) < 3e38 for v in scale_values) \
            or not all(abs(v) < 3e38 for v in mean_values):  # float32's range, no divisor 0
        raise SourceError(f"{source}: its rescale_factor, image_mean and image_std give a mean "
                          f"{mean_values} and a divisor {scale_values} out of float32's "
                          "range; give --mean and --scale")
    return ProcessorSettings(height=size[0], width=size[1], mean_values=mean_values,
                             scale_values=scale_values,
                             bgr=bool(setting("do_flip_channel_order", False)))


def _crop_or_size(processor: dict, crops: bool, source: str) -> tuple[int, int]:
    size = processor.get("crop_size") if crops and processor.get("crop_size") \
        else processor.get("size")
    sides = [size, size] if not isinstance(size, dict) \
        else [size.get("height"), size.get("width")] if "height" in size \
        else [size.get("shortest_edge")] * 2
    if not all(_is_number(side) and side == int(side) and 1 <= side <= MAX_SIDE
               for side in sides):
        raise SourceError(f"{source}: gives no input size of 1 to {MAX_SIDE} pixels "
                          f"({size!r}); give --input-size")
    return int(sides[0]), int(sides[1])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _positive(value, key: str, source: str) -> float:
    """A setting the normalisation divides by: a finite number above 0 (float32's range)."""
    if not (_is_number(value) and 1e-30 < value < 3e38):
        raise SourceError(f"{source}: {key} {value!r} is not a positive number; give --mean "
                          "and --scale")
    return float(value)


def _per_channel(values, key: str, source: str) -> list[float]:
    values = [values] * 3 if _is_number(values) else values
    if not (isinstance(values, list) and len(values) == 3
            and all(_is_number(v) and abs(v) < 3e38 for v in values)):
        raise SourceError(f"{source}: {key} is {values!r}, not three numbers; give --mean "
                          "and --scale")
    return [float(v) for v in values]


def config_labels(config: dict) -> list[str] | None:
    """The classes of `id2label` in index order (None when the config has none)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return [by_index[i] for i in range(len(by_index))]


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not readable JSON ({type(exc).__name__}); copy the file "
                          "again") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


@dataclass
class FolderDefaults:
    """What the JSON files beside a model file say, for options not given."""

    labels: list[str] | None
    processor: ProcessorSettings


def folder_defaults(folder: Path) -> FolderDefaults | None:
    """Preprocessing from `preprocessor_config.json` beside a model file (Optimum's exports
    write it) and labels from the `config.json` there; None without the first (a config.json
    alone may be anyone's)."""
    config_path, processor_path = folder / CONFIG, folder / PROCESSOR
    if not processor_path.is_file():
        return None
    labels = config_labels(read_json(config_path)) if config_path.is_file() else None
    return FolderDefaults(labels, processor_settings(read_json(processor_path),
                                                     str(processor_path)))


def is_pretrained_folder(path: Path) -> bool:
    """A folder `save_pretrained` wrote (or a Hub snapshot): config.json and torch weights."""
    return path.is_dir() and (path / CONFIG).is_file() \
        and any((path / name).is_file() for name in WEIGHT_FILES)


@register_folder_source(is_pretrained_folder)
@register_source("hf")
def load_pretrained(path_str: str, options: SourceOptions) -> LoadedSource:
    """A transformers (or timm) image classifier from its folder, with the folder's labels and
    preprocessing (options given win)."""
    path = Path(path_str)
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise SourceError(f"{path}: not a Hugging Face model folder (config.json and "
                          "model.safetensors, as save_pretrained writes them)")
    if options.checkpoint:
        raise SourceError(f"--checkpoint: {path} holds its own weights; leave the option out")
    config = read_json(path / CONFIG)
    if "architecture" in config:  # timm's format (timm.models.save_for_hf, timm/* on the Hub)
        return _timm_folder(path, config, options)
    if "auto_map" in config:
        raise SourceError(f"{path}: the model's code is in the folder (auto_map); the exporter "
                          "runs no code from model folders: export it as "
                          "torch:<module>:<callable> with --checkpoint")
    processor = _processor(path, options)
    bgr = bool(processor and processor.bgr)
    size = options.input_size or (processor.height if processor else None)
    if size is None:
        raise SourceError(f"{path}: no {PROCESSOR}; give --input-size, --mean and --scale")
    if options.input_size is None and processor.height != processor.width:
        raise SourceError(f"{path}: takes {processor.height} x {processor.width} images; the "
                          "exporter converts square inputs: give --input-size")
    module = pretrained_classifier(_image_classifier(path, config), bgr)
    num_classes = module.model.config.num_labels
    check_class_count(options, num_classes, str(path))
    labels = config_labels(config) or [f"class_{i}" for i in range(num_classes)]
    info = module_info(num_classes, size, processor.mean_values if processor else None,
                        processor.scale_values if processor else None, options, labels)
    with runs_on_images(path, size), warnings.catch_warnings():
        global_pooling_windows(module, size)
        # transformers' checks of the input's size become constants: the size is fixed
        # here, and the batch is checked below
        warnings.simplefilter("ignore", torch_tracer_warning())
        model = convert_torch(module, size)
    fold_static_shape_reads(model)  # Swin's padding reads H and W from the tensors
    scores = model.outputs[0].get_partial_shape()
    if scores.rank.is_dynamic or scores.rank.get_length() != 2 or scores[1].is_dynamic \
            or scores[1].get_length() != num_classes:
        raise SourceError(f"{path}: its output is {scores}, not the scores of its "
                          f"{num_classes} classes; only image classifiers can be exported")
    refusal = batch_refusal(model)
    if refusal is not None:
        raise SourceError(f"{path}: its graph holds the batch of 1 it was traced with "
                          f"({refusal}); the saliency branch and the server need batches")
    described = f"hf:{path} ({type(module.model).__name__})"
    if bgr:
        described += " (takes BGR: the IR swaps the channels)"
    return LoadedSource(model, info, described, torch_module=module)


def _timm_folder(path: Path, config: dict, options: SourceOptions) -> LoadedSource:
    """A timm model saved for the Hub: built by timm as its config.json says (the arguments
    and pretrained_cfg: input size, mean and std), the folder's weights loaded as a
    --checkpoint is, labelled by its label names."""
    try:
        import timm
    except ImportError:
        raise SourceError("timm folders need the export extra: pip install 'xaiserve[export]'") \
            from None
    arch = str(config["architecture"])
    if not timm.is_model(arch):
        raise SourceError(f"{path}: config.json names the timm architecture {arch!r}, which "
                          f"timm {timm.__version__} does not have; upgrade timm")
    weights = next((path / name for name in PRETRAINED_WEIGHT_FILES if (path / name).is_file()),
                   None)
    if weights is None:
        raise SourceError(f"{path}: no {' or '.join(PRETRAINED_WEIGHT_FILES)}; copy the folder "
                          "whole")
    arguments = dict(config.get("model_args") or {})  # num_classes, in_chans, global_pool
    arguments.setdefault("num_classes", config.get("num_classes", 1000))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = timm.create_model(arch, pretrained=False, **arguments,
                                       pretrained_cfg_overlay=config.get("pretrained_cfg") or {})
    except Exception as exc:  # noqa: BLE001 - arguments this timm does not take, and others
        raise SourceError(f"{path}: timm cannot build it from config.json "
                          f"({error_reason(exc, 160)})") from None
    load_checkpoint(module, weights, f"timm:{arch} as its config.json builds it")
    check_class_count(options, module.num_classes, str(path))
    return timm_source(module, f"hf:{path} (timm {arch})", options,
                       labels=timm_labels(config, module.num_classes))


def timm_labels(config: dict, num_classes: int) -> list[str] | None:
    """timm's label_names (a list, or {index: name}), each described where label_descriptions
    says what it means (ImageNet synsets); None where there are none or not one per class."""
    names = config.get("label_names")
    if isinstance(names, dict):
        names = config_labels({"id2label": names})
    if not isinstance(names, list) or len(names) != num_classes:
        return None
    descriptions = config.get("label_descriptions") or {}
    return [str(descriptions.get(name, name)) for name in names]


def _processor(path: Path, options: SourceOptions) -> ProcessorSettings | None:
    """The folder's preprocessing, or None where it has none and the options give it all."""
    if (path / PROCESSOR).is_file():
        return processor_settings(read_json(path / PROCESSOR), str(path / PROCESSOR))
    if options.mean_values and options.scale_values:
        return None
    raise SourceError(f"{path}: no {PROCESSOR} (the image processor's settings, which "
                      "save_pretrained of the processor writes); give --input-size, --mean "
                      "and --scale")


def _image_classifier(path: Path, config: dict):
    """The folder's model, from its files only."""
    try:
        import transformers
    except ImportError:
        raise SourceError("Hugging Face folders need the export extra: pip install "
                          "'xaiserve[export]'") from None
    architectures = config.get("architectures") or []
    logs = transformers.utils.logging
    verbosity, bars = logs.get_verbosity(), logs.is_progress_bar_enabled()
    logs.set_verbosity_error()  # its notices and "Loading weights" bar are not the user's
    logs.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoModelForImageClassification.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False).eval()
    except ValueError as exc:  # an architecture that is no image classifier
        raise SourceError(f"{path}: {', '.join(architectures) or config.get('model_type')} is "
                          "not an image classifier transformers knows "
                          f"({error_reason(exc, 120)})") from None
    except Exception as exc:  # noqa: BLE001 - missing or damaged weights, and others
        raise SourceError(f"{path}: transformers cannot load it ({error_reason(exc, 160)})") \
            from None
    finally:
        logs.set_verbosity(verbosity)
        if bars:
            logs.enable_progress_bar()


def global_pooling_windows(module, size: int) -> int:
    """Replace, in place, average poolings whose window covers the whole map they get at this
    input size by the global mean they compute; return how many. Transformers' EfficientNet
    pools with AvgPool2d(kernel=hidden_dim, ceil_mode=True): torch clips the window to the map
    (a global mean), OpenVINO's shape inference refuses a window larger than the map."""
    import torch

    seen: dict[str, tuple[int, int]] = {}
    hooks = [child.register_forward_pre_hook(
        lambda _, args, name=name: seen.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.AvgPool2d) and child.ceil_mode]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    def pair(value) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    whole = [name for name, (h, w) in seen.items()
             if pair(module.get_submodule(name).padding) == (0, 0)
             and all(k >= d for k, d in zip(pair(module.get_submodule(name).kernel_size), (h, w)))]
    for name in whole:
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, torch.nn.AdaptiveAvgPool2d(1))
    return len(whole)


def torch_tracer_warning() -> type[Warning]:
    import torch

    return torch.jit.TracerWarning


def class_scores(output):
    """The class scores of a transformers model's output: `logits`, or its first field (PP-LCNet
    gives them as `last_hidden_state`)."""
    return output["logits"] if "logits" in output else output[0]


def pretrained_classifier(model, bgr: bool = False):
    """A transformers image classifier as a torch module that takes RGB images and gives
    class scores (what the exporter converts), in eval mode."""
    return _classifier_type()(model, bgr).eval()


@functools.cache
def _classifier_type():
    """Defined on first use: torch is imported only by the loaders that need it."""
    import torch

    class PretrainedClassifier(torch.nn.Module):
        """pixel_values -> logits (transformers' models return an output object; PP-LCNet
        gives its class scores as its first field), RGB in: a model that takes BGR gets its
        channels reversed first."""

        def __init__(self, model, bgr: bool):
            super().__init__()
            self.model = model
            self.bgr = bgr

        def forward(self, x):
            return class_scores(self.model(pixel_values=x.flip(1) if self.bgr else x))

    return PretrainedClassifier
