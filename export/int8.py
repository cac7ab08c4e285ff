"""INT8 post-training quantisation of an exported IR (NNCF), checked against the f32 IR.
(`--finetune-steps` trains the torch source instead: int8_finetune.py; the same checks follow.)

Where quantisation happens, and why: the *final* model (embedded preprocessing, saliency branch)
is quantised, with every operation downstream of the saliency target feature map in NNCF's
ignored scope. The backbone, where nearly all the multiply-adds are, runs in INT8; the head and
the saliency branch read the INT8 backbone's feature map and stay f32. The alternative,
quantising the plain model first and inserting the saliency branch afterwards, quantises the
classifier too (NNCF puts an activation quantiser between pooling and the linear layer, so the
exact `W @ F` fast path no longer matches and the general head re-run is inserted instead).
Measured on the default model with benchmarks/int8_speed.py --compare-order (300 calibration
and 300 validation photo crops; batch 1 on a shared, noisy 2-core CPU): both designs ran at
about 0.5 to 0.6 of the f32 IR's latency, within the noise of each other, and agreed with the
f32 top-1 equally (0.903); the f32 head kept the maps closer to f32 (rank correlation 0.980
against 0.972, IoU of the top 20% 0.908 against 0.866). The price is the `.bin`: the f32
classifier weights keep it at 8.7 MB against about 4.8 MB with an INT8 head (f32: 18.5 MB).
Calibrating the final model also means the calibration data is what
the IR takes: u8 NHWC images resized as the model's `model_info` says.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import openvino as ov

from xaiserve.service.cpu_int8 import (OVERFLOW_FIXES, cpu_flags, cpu_name, int8_dot_product,
                                       int8_weights, resolve_overflow_fix)
from xaiserve.service.images import ImageError, read_image, resize_for_model
from xaiserve.service.model import MAP_NEEDS_F32, compiled_precision
from xaiserve.service.model_info import ModelInfo

from .int8_agreement import agreement, top1_agreement
from .int8_finetune import TorchSource, finetuned_int8
from .parity import compile_f32
from .precision_pins import (NOT_COMPUTED, backbone_ops, check_keep_f32_first,
                             leading_scope, pin_first_layers)
from .reduced_precision import SIGNIFICANT_BITS, WEIGHTED_TYPES, with_rounded_inputs
from .saliency.graph import ancestors, find_by_name, key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
PRESETS = ("performance", "mixed")  # NNCF QuantizationPreset members, by their CLI names
EXIT_GATE = 3  # the export ran but INT8 drifted past a threshold


class Int8Error(ValueError):
    """Bad INT8 options or data; the message names the option and the fix."""


class GateFailed(RuntimeError):
    """INT8 drifted past `--max-top1-drop` or `--min-saliency-agreement`; nothing was written."""

    def __init__(self, figures: dict, failures: list[str]):
        super().__init__("; ".join(failures))
        self.figures = figures
        self.failures = failures


@dataclass
class Int8Settings:
    calibration: Path
    calibration_size: int = 300
    preset: str = "performance"
    fast_bias_correction: bool = True
    validation: Path | None = None  # default: the calibration folder (a weaker check)
    validation_size: int = 300
    max_top1_drop: float | None = None  # fail when 1 - top-1 agreement exceeds it
    min_saliency_agreement: float | None = None  # fail when mean rank correlation is below it
    saliency_top_fraction: float = 0.2
    keep_f32_first: float = 0.0  # fraction of the backbone's weighted layers left in f32
    overflow_fix: str = "auto"  # 7-bit weights where INT8 sums saturate (service/cpu_int8.py)
    accuracy_control: bool = False  # revert layers to f32 until the drop is within max_top1_drop
    control: Path | None = None  # images that steer accuracy control (default: validation)
    finetune_steps: int = 0  # > 0: quantise the torch source and distil from f32 (int8_finetune)
    finetune_learning_rate: float = 1e-5
    finetune_batch: int = 16

    def as_dict(self) -> dict:
        d = asdict(self)
        d["calibration"] = str(self.calibration)
        d["validation"] = str(self.validation_folder)
        d["control"] = str(self.control_folder) if self.accuracy_control else None
        return d

    @property
    def validation_folder(self) -> Path:
        return self.validation or self.calibration

    @property
    def control_folder(self) -> Path:
        return self.control or self.validation_folder

    @property
    def control_is_validation(self) -> bool:
        return self.control_folder == self.validation_folder


@dataclass
class NncfExtras:
    """NNCF options the export does not offer, so that benchmarks/int8_frontier.py can measure
    them through the export's own quantisation (same scopes, overflow fix and calibration)."""
    advanced: dict = field(default_factory=dict)  # more AdvancedQuantizationParameters fields
    ignored_types: tuple[str, ...] = ()  # operation types left in f32, e.g. GroupConvolution
    model_type: str | None = None  # "transformer" enables SmoothQuant


def check_settings(settings: Int8Settings, has_saliency: bool) -> None:
    """Fail on bad options and empty folders before the slow steps start."""
    if settings.preset not in PRESETS:
        raise Int8Error(f"--preset {settings.preset!r}: use one of {', '.join(PRESETS)}")
    if settings.overflow_fix not in ("auto", *OVERFLOW_FIXES):
        raise Int8Error(f"--overflow-fix {settings.overflow_fix!r}: use one of auto, "
                        f"{', '.join(OVERFLOW_FIXES)}")
    check_keep_f32_first(settings.keep_f32_first)
    if settings.accuracy_control and settings.max_top1_drop is None:
        raise Int8Error("--accuracy-control needs --max-top1-drop: the top-1 drop it reverts "
                        "layers to f32 until (for example --max-top1-drop 0.01)")
    if settings.control is not None and not settings.accuracy_control:
        raise Int8Error("--control goes with --accuracy-control")
    if settings.finetune_steps < 0:
        raise Int8Error(f"--finetune-steps {settings.finetune_steps}: give 0 (no training) or "
                        "a positive number of steps (300 on the default model)")
    if settings.finetune_steps and settings.accuracy_control:
        raise Int8Error("--finetune-steps and --accuracy-control: choose one (accuracy control "
                        "reverts layers of the post-training quantised IR)")
    if settings.finetune_steps and not settings.fast_bias_correction:
        raise Int8Error("--no-fast-bias-correction and --finetune-steps: NNCF's torch backend, "
                        "which --finetune-steps quantises with, has only fast bias correction")
    if settings.finetune_learning_rate <= 0:
        raise Int8Error(f"--finetune-lr {settings.finetune_learning_rate}: a positive "
                        "learning rate (1e-5 on the default model)")
    if settings.finetune_batch < 1:
        raise Int8Error(f"--finetune-batch {settings.finetune_batch}: a positive batch size")
    for option, value in (("--calibration-size", settings.calibration_size),
                          ("--validation-size", settings.validation_size)):
        if value < 1:
            raise Int8Error(f"{option} {value}: give a positive number of images")
    if settings.max_top1_drop is not None and not 0 <= settings.max_top1_drop <= 1:
        raise Int8Error(f"--max-top1-drop {settings.max_top1_drop}: a fraction in [0, 1] "
                        "(0.01 allows 1% of validation images to change their top-1 class)")
    if settings.min_saliency_agreement is not None:
        if not -1 <= settings.min_saliency_agreement <= 1:
            raise Int8Error(f"--min-saliency-agreement {settings.min_saliency_agreement}: "
                            "a rank correlation in [-1, 1]")
        if not has_saliency:
            raise Int8Error("--min-saliency-agreement needs a saliency_map output; "
                            "leave it out with --method none")
    image_files(settings.calibration, "--calibration")
    if settings.validation is not None:
        image_files(settings.validation, "--validation")
    if settings.control is not None:
        image_files(settings.control, "--control")


def image_files(folder: Path, option: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise Int8Error(f"{option} {folder}: not a directory; give a folder of images")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise Int8Error(f"{option} {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over the list (all when fewer): a sorted folder often groups
    similar images, and NNCF calibrates on the first `subset_size` items it is given."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def load_images(folder: Path, info: ModelInfo, count: int, option: str) -> np.ndarray:
    """u8 [n, H, W, 3] images from a folder, resized as the IR's model_info says."""
    images = []
    for path in spread(image_files(folder, option), count):
        try:
            images.append(resize_for_model(read_image(path), info))
        except ImageError as exc:
            raise Int8Error(f"{option}: {exc}; remove or replace that file") from None
    return np.stack(images)


def branch_scope(model: ov.Model, target_layer: str | None) -> list[str]:
    """Friendly names of the operations after the saliency target map: the head and the branch,
    kept in f32. Empty without a saliency branch (the whole model is quantised)."""
    if target_layer is None:
        return []
    backbone = ancestors(find_by_name(model, target_layer))
    return [n.get_friendly_name() for n in model.get_ordered_ops()
            if key(n) not in backbone and n.get_type_name() not in NOT_COMPUTED]


@contextlib.contextmanager
def nncf_output_to_stderr() -> Iterator[None]:
    """NNCF logs and draws its progress bars on stdout, where the CLI prints its JSON report."""
    from nncf.common.logging.logger import nncf_logger

    handlers = [h for h in nncf_logger.handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    level = nncf_logger.level
    for h in handlers:
        h.setStream(sys.stderr)
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        nncf_logger.setLevel(level)
        for h, s in zip(handlers, streams):
            h.setStream(s)


def quantize(model: ov.Model, target_layer: str | None, images: np.ndarray,
             settings: Int8Settings, overflow_fix: str,
             control: tuple[np.ndarray, np.ndarray] | None = None,
             extras: NncfExtras | None = None) -> ov.Model:
    """NNCF post-training quantisation (min-max ranges, fast bias correction by default) of the
    final model; NNCF draws its progress bars ("Statistics collection", ...) on stderr.
    `overflow_fix` is resolved already (no "auto").

    With `control` (images and the f32 IR's top-1 class of each), NNCF's accuracy control then
    reverts the quantised operations that cost the most top-1 agreement on those images to f32,
    one group at a time, until the drop is within `settings.max_top1_drop` or nothing is left
    to revert. `extras` passes NNCF options the export does not offer (benchmarks only)."""
    import nncf

    extras = extras or NncfExtras()
    ignored = branch_scope(model, target_layer) + leading_scope(model, target_layer,
                                                                settings.keep_f32_first)
    scoped = ignored or extras.ignored_types
    common = dict(
        preset=getattr(nncf.QuantizationPreset, settings.preset.upper()),
        subset_size=len(images), fast_bias_correction=settings.fast_bias_correction,
        model_type=nncf.ModelType(extras.model_type) if extras.model_type else None,
        ignored_scope=nncf.IgnoredScope(names=ignored, types=list(extras.ignored_types),
                                        validate=False) if scoped else None)
    calibration = nncf.Dataset(list(images), lambda image: image[None])
    advanced = nncf.AdvancedQuantizationParameters(
        overflow_fix=nncf.OverflowFix(OVERFLOW_FIXES[overflow_fix]), **extras.advanced)
    with nncf_output_to_stderr():
        if control is None:
            return nncf.quantize(model, calibration, advanced_parameters=advanced, **common)
        return nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(list(zip(*control)), lambda item: item[0][None]),
            kept_top1, max_drop=settings.max_top1_drop, drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced, **common)


def kept_top1(compiled: ov.CompiledModel, items) -> tuple[float, list[float]]:
    """Accuracy control's metric: the share of (image, f32 top-1 class) pairs whose class the
    model keeps, and each pair's 0 or 1 (NNCF ranks the operations to revert by them)."""
    kept = [float(compiled(image[None])["logits"].argmax() == label) for image, label in items]
    return float(np.mean(kept)), kept


def weighted_layers(model: ov.Model, target_layer: str | None) -> list[ov.Node]:
    """The backbone's convolutions and matrix products: the layers INT8 speeds up."""
    return [n for n in backbone_ops(model, target_layer) if n.get_type_name() in WEIGHTED_TYPES]


def layer_precisions(model: ov.Model, target_layer: str | None) -> dict:
    """How many weighted backbone layers store INT8 weights, and the names of those left f32
    (by --keep-f32-first, accuracy control or an ignored scope)."""
    layers = weighted_layers(model, target_layer)
    return {"int8_layer_count": sum(int8_weights(n) is not None for n in layers),
            "f32_layers": [n.get_friendly_name() for n in layers if int8_weights(n) is None]}


def infer_all(compiled: ov.CompiledModel, images: np.ndarray, desc: str
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits [n, K] and saliency maps [n, K, h, w] (None without them), one image at a time."""
    from tqdm import tqdm

    has_maps = any("saliency_map" in o.get_names() for o in compiled.outputs)
    logits, maps = [], []
    for image in tqdm(images, desc=desc, unit="img", file=sys.stderr, leave=False):
        out = compiled(image[None])
        logits.append(out["logits"])
        if has_maps:
            maps.append(out["saliency_map"])
    return np.concatenate(logits), np.concatenate(maps) if has_maps else None


def one_level_noise(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """u8 images with every value moved by -1, 0 or +1 (clipped): an invisible change, so
    how often it flips the f32 top-1 is the validation set's own noise floor."""
    step = np.random.default_rng(seed).integers(-1, 2, images.shape)
    return np.clip(images.astype(np.int16) + step, 0, 255).astype(np.uint8)


def f32_noise_floor(f32: ov.CompiledModel, images: np.ndarray, reference_logits: np.ndarray
                    ) -> float:
    """Top-1 agreement of the f32 IR with itself under one grey level of noise (one_level_noise):
    the best agreement any change of the arithmetic can be expected to keep on these images."""
    jittered = infer_all(f32, one_level_noise(images), "f32 IR, +-1 noise")[0]
    return top1_agreement(reference_logits, jittered)


def reduced_precision_agreement(model: ov.Model, images: np.ndarray,
                                reference_logits: np.ndarray, core: ov.Core) -> dict:
    """Top-1 agreement of `model` with its f32 logits when its layers compute as bf16 (the
    default on AMX CPUs) and f16 (the default on GPUs) do, emulated (reduced_precision)."""
    kept = {}
    for precision in SIGNIFICANT_BITS:
        compiled = compile_f32(with_rounded_inputs(model, precision), core)
        logits = infer_all(compiled, images, f"{precision} arithmetic")[0]
        kept[precision] = top1_agreement(reference_logits, logits)
    return kept


def default_precision_agreement(f32_model: ov.Model, int8_model: ov.Model, images: np.ndarray,
                                reference: tuple[np.ndarray, np.ndarray | None], core: ov.Core,
                                fraction: float, f32_maps: np.ndarray | None) -> dict:
    """What a server on this CPU computes without an inference precision hint. The report's
    main figures compute the layers that are not INT8 in f32, so that they hold on any CPU
    whose INT8 sums are exact; an AMX CPU computes those layers in bf16 by default, and the
    f32 IR too, so here both are judged against the f32 IR as the server would run them.
    `f32_maps`: the INT8 IR's maps with its other layers in f32, which the server serves where
    the method needs f32 (service.model.MAP_NEEDS_F32)."""
    int8 = core.compile_model(int8_model, "CPU")
    precision = compiled_precision(int8)
    if precision == "f32":
        return {"inference_precision": precision}
    logits, maps = infer_all(int8, images, f"INT8 IR, {precision}")
    info = ModelInfo.from_model(int8_model)
    map_precision = precision
    if maps is not None and info is not None and info.saliency_method in MAP_NEEDS_F32:
        maps, map_precision = f32_maps, "f32"
    ours = agreement(*reference, logits, maps, fraction=fraction)
    f32_ir = infer_all(core.compile_model(f32_model, "CPU"), images, f"f32 IR, {precision}")[0]
    return {"inference_precision": precision, "map_inference_precision": map_precision,
            **{name: ours[name] for name in ("top1_agreement", "top1_agreement_confident",
                                             "saliency_rank_correlation") if name in ours},
            "f32_ir_top1_agreement": top1_agreement(reference[0], f32_ir)}


def top1_hint(figures: dict, settings: Int8Settings) -> str:
    """What to try when too many top-1 classes changed, or why nothing will help."""
    hints = []
    noise_drop = 1 - figures["f32_noise_floor"]["top1_agreement"]
    if noise_drop > settings.max_top1_drop:
        hints.append(f"f32 itself changes {noise_drop:.4f} of these top-1 classes under one "
                     "grey level of noise")
    served = figures.get("at_default_precision", {})
    bf16_kept = served["f32_ir_top1_agreement"] if served.get("inference_precision") == "bf16" \
        else figures["reduced_precision"]["bf16"]  # measured where this CPU has bf16
    bf16_drop = 1 - bf16_kept
    if bf16_drop > settings.max_top1_drop:
        hints.append(f"bf16, the default precision on AMX CPUs, itself changes {bf16_drop:.4f} "
                     "of them")
    if figures["validation_cpu"]["int8_dot_product"] == "saturating" \
            and figures["overflow_fix"] != "enable":
        hints.append("--overflow-fix enable: this CPU's INT8 sums saturate (no VNNI)")
    if settings.keep_f32_first == 0:
        hints.append("--keep-f32-first 0.25 keeps more top-1 classes, at some speed")
    if not settings.accuracy_control:
        hints.append("--accuracy-control reverts the layers that change the most classes to f32")
    return f" ({'; '.join(hints)})" if hints else ""


def gate_failures(figures: dict, settings: Int8Settings) -> list[str]:
    failures = []
    # + 1e-9: 15 changes in 300 images are a drop of 0.05, but 1 - 285/300 is 0.05000000000000004
    if settings.max_top1_drop is not None \
            and figures["top1_drop"] > settings.max_top1_drop + 1e-9:
        failures.append(f"top-1 drop {figures['top1_drop']:.4f} > --max-top1-drop "
                        f"{settings.max_top1_drop}" + top1_hint(figures, settings))
    if settings.min_saliency_agreement is not None \
            and figures["saliency_rank_correlation"] < settings.min_saliency_agreement:
        failures.append(f"saliency rank correlation {figures['saliency_rank_correlation']:.4f} "
                        f"< --min-saliency-agreement {settings.min_saliency_agreement}")
    return failures


def quantize_export(model: ov.Model, target_layer: str | None, info: ModelInfo,
                    settings: Int8Settings, progress: Callable[[str], None] = lambda _: None,
                    enforce_gate: bool = True, torch_source: TorchSource | None = None
                    ) -> tuple[ov.Model, dict]:
    """The f32 export -> its INT8 version and the agreement figures for the model card.

    With `settings.finetune_steps`, the INT8 model comes from training `torch_source`
    (int8_finetune) rather than from quantising `model`; the figures compare it with `model`
    all the same. Raises GateFailed (with the figures) when a threshold in `settings` is
    passed, unless `enforce_gate` is off (benchmarks measure the model either way;
    `gate.passed` says)."""
    check_settings(settings, target_layer is not None)
    if settings.finetune_steps and torch_source is None:
        raise Int8Error("--finetune-steps needs a torch source (default, timm:..., torch:...): "
                        "a model file (IR, ONNX, TorchScript, ...) has no weights it can train")
    calibration = load_images(settings.calibration, info, settings.calibration_size,
                              "--calibration")
    validation = load_images(settings.validation_folder, info, settings.validation_size,
                             "--validation" if settings.validation else "--calibration")
    flags = cpu_flags()
    overflow_fix = resolve_overflow_fix(settings.overflow_fix, flags)
    core = ov.Core()
    f32 = compile_f32(model, core)
    reference = infer_all(f32, validation, "f32 IR")
    control = None
    if settings.accuracy_control:
        images = validation if settings.control_is_validation else load_images(
            settings.control, info, settings.validation_size, "--control")
        labels = reference[0] if images is validation else infer_all(f32, images, "f32 IR")[0]
        control = (images, labels.argmax(1))
    finetuned = None
    if settings.finetune_steps:
        progress(f"quantizing to INT8 and training {settings.finetune_steps} steps")
        finetuned = finetuned_int8(
            torch_source, calibration, info, settings, overflow_fix, reference[0],
            lambda ir: infer_all(compile_f32(ir, core), validation, "INT8 before training")[0])
        quantized, target_layer = finetuned.model, finetuned.target_layer
    else:
        progress("quantizing to INT8" + (" with accuracy control" if control else ""))
        quantized = quantize(model, target_layer, calibration, settings, overflow_fix, control)
    info.write(quantized)
    # the layers left out of INT8 compute in f32 on every device, not in bf16 on AMX CPUs
    quantized = pin_first_layers(quantized, target_layer, settings.keep_f32_first)

    progress("validating INT8 against f32")
    ours = infer_all(compile_f32(quantized, core), validation, "INT8 IR")
    figures = {
        "settings": settings.as_dict(),
        "calibration_images": int(len(calibration)),
        "validation_is_calibration": settings.validation is None,
        "f32_head_and_saliency": bool(target_layer),
        "overflow_fix": overflow_fix,
        # the agreement figures hold for CPUs whose INT8 arithmetic is like this one's
        "validation_cpu": {"name": cpu_name(), "int8_dot_product": int8_dot_product(flags)},
        # what --keep-f32-first and accuracy control left in f32, by the weights' storage
        **layer_precisions(quantized, target_layer),
        **agreement(*reference, *ours, fraction=settings.saliency_top_fraction),
        "f32_noise_floor": {
            "what": "top-1 agreement of the f32 IR with itself when every pixel moves by at "
                    "most one grey level (uniform -1, 0, +1; seed 0): the best agreement any "
                    "change of the arithmetic can be expected to keep on these images",
            "top1_agreement": f32_noise_floor(f32, validation, reference[0]),
        },
        "reduced_precision": {
            "what": "top-1 agreement with the f32 IR when its convolutions and matrix products "
                    "take inputs rounded to bf16 (the CPU default with AMX or AVX512-BF16) or "
                    "f16 (the GPU default) and sum in f32, emulated: what those devices' "
                    "default precision keeps on these images",
            **reduced_precision_agreement(model, validation, reference[0], core),
        },
        "at_default_precision": {
            "what": "the INT8 IR and the f32 IR against the f32 IR computed in f32, both at "
                    "this CPU's default precision (bf16 with AMX or AVX512-BF16), as a server "
                    "here computes them without --inference-precision; only the precision where "
                    "it is f32",
            **default_precision_agreement(model, quantized, validation, reference, core,
                                          settings.saliency_top_fraction, f32_maps=ours[1]),
        },
    }
    notes = []
    if settings.validation is None:
        notes.append("validated on the calibration folder: a weaker check than a held-out "
                     "--validation folder")
    if finetuned is not None:
        figures["finetune"] = finetuned.figures
    if control is not None:
        figures["accuracy_control"] = {"control_images": int(len(control[0])),
                                       "control_is_validation": settings.control_is_validation}
        if settings.control_is_validation:
            notes.append("accuracy control chose the f32 layers on the validation images: "
                         "their agreement is not a held-out check (give --control DIR)")
    if not figures["int8_layer_count"]:
        notes.append("no convolution or matrix product is left in INT8: the IR computes in f32")
    if notes:
        figures["note"] = "; ".join(notes)
    failures = gate_failures(figures, settings)
    figures["gate"] = {"max_top1_drop": settings.max_top1_drop,
                       "min_saliency_agreement": settings.min_saliency_agreement,
                       "passed": not failures, "failures": failures}
    if failures and enforce_gate:
        raise GateFailed(figures, failures)
    return quantized, figures
