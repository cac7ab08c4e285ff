"""`xaiserve export`: options to an ExportRequest, the export with a progress bar, its JSON
report; gates end in exit 3."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import atomic_file, json_values
from ..interrupts import interrupts_raised
from .common import EXIT_INTERRUPTED, DependentOptions, fail, floats


def gate_failed(report: Path | None, failures: list[str], section: str, figures: dict,
                line: str) -> int:
    """An export check failed its threshold: the JSON report on stdout (and --report), one
    line on stderr, exit code 3 for pipelines."""
    from xaiserve.export.int8 import EXIT_GATE

    text = json_values.dumps({"status": "gate_failed", "failures": failures, section: figures},
                             indent=2)
    if report:
        atomic_file.write_text(report, text + "\n")
    print(text)
    print(f"xaiserve export: {line}", file=sys.stderr)
    return EXIT_GATE


def check_report_file(path: Path | None, inputs: tuple[Path | None, ...] = ()) -> None:
    """--report must be writable before an export starts: failing to write it after the
    version is in place would make a pipeline retry and write another version. It must not
    be one of the export's own input files either."""
    if path is None:
        return
    if any(i is not None and Path(i).resolve() == path.resolve() for i in inputs):
        raise ValueError(f"--report {path}: is one of the export's inputs; give another path")
    if path.is_dir():
        raise ValueError(f"--report {path}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise ValueError(f"--report {path}: no folder {path.parent}; create it first")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--report {path}: not writable; give a path this user can write")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a classifier to an IR with a saliency_map output")
    p.add_argument("source", help="default | timm:<arch> | torch:<module>:<callable> | "
                                  "model.xml | model.onnx | model.tflite | saved_model/ | "
                                  "model.pt (TorchScript) | model.pt2 (torch.export) | "
                                  "hf_folder/ (Hugging Face save_pretrained)")
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, default=None, help="default: the next free version")
    p.add_argument("--method", default="auto",
                   choices=["auto", "reciprocam", "vit-reciprocam", "activationmap", "none"])
    p.add_argument("--target-layer", default=None, help="node name; overrides detection")
    p.add_argument("--score", default="logit", choices=["logit", "softmax"])
    p.add_argument("--mosaic", default="local", choices=["local", "paper"],
                   help="--mosaic paper --normalize minmax is the plain ReciproCAM formulation")
    p.add_argument("--spread", default="gaussian", choices=["gaussian", "none"])
    p.add_argument("--normalize", default="centred", choices=["centred", "minmax", "none"],
                   help="zero point and scale of each class map")
    p.add_argument("--map-precision", default="auto", choices=["auto", "f32", "int8"],
                   help="arithmetic of the all-class map product; auto: int8 where the graph "
                        "bounds the features (ReLU6), else f32")
    p.add_argument("--checkpoint", type=Path, default=None, help=".pth, .pt or .safetensors")
    p.add_argument("--random-weights", action="store_true",
                   help="timm sources without --checkpoint: export untrained weights (speed "
                        "measurements, tests); refused otherwise")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--labels", type=Path, default=None, help="text file, one label per line")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--mean", type=floats, default=None, help="per-channel mean, 0..255 units")
    p.add_argument("--scale", type=floats, default=None, help="per-channel divisor")
    p.add_argument("--bgr", action="store_true",
                   help="a model file that takes BGR (Caffe, OpenCV, Open Model Zoo): "
                        "the IR still takes RGB and swaps the channels; --mean and --scale "
                        "stay in R, G, B order")
    p.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--keep-f32-first", type=float, default=0.0, metavar="FRACTION",
                   help="compute this fraction of the backbone's first layers in f32 on every "
                        "device, also where the default is bf16 (AMX CPUs) or f16 (GPUs), and "
                        "with --int8 leave them out of INT8 (default model on AMX: 0.12 keeps "
                        "0.98 of f32's top-1 classes instead of bf16's 0.93-0.95, at 1.07 of "
                        "the bf16 latency)")
    add_reference_options(p)
    add_int8_options(p)
    p.set_defaults(run=run_export)


def add_reference_options(p) -> None:
    g = p.add_argument_group("torch reference maps (recorded in the model card; optional gate)")
    g.add_argument("--reference", choices=["gradcam", "gradient"], default=None)
    reference_options = DependentOptions(g, "--reference gradcam|gradient")
    reference_options.add("--min-reference-agreement", type=float, default=None,
                          help="fail (exit 3, nothing written) when the agreement is below this")
    reference_options.add("--reference-metric", choices=["spearman", "topk_iou"],
                          default="spearman")
    reference_options.add("--reference-top-fraction", type=float, default=0.2)
    reference_options.add("--reference-layer", default=None,
                          help="torch module name for Grad-CAM")
    reference_options.add("--reference-images", type=Path, default=None,
                          help="folder of images to compare on (default: the parity images)")
    p.set_defaults(reference_options=reference_options)


def reference_check(args):
    """The ReferenceCheck the options ask for, or None."""
    from xaiserve.export.reference_saliency import ReferenceCheck

    if args.reference is None:
        args.reference_options.refuse_without(args, "no reference map is made or gated")
        return None
    if not 0 < args.reference_top_fraction <= 1:
        raise ValueError("--reference-top-fraction must be in (0, 1]")
    if args.min_reference_agreement is not None and not -1 <= args.min_reference_agreement <= 1:
        raise ValueError(f"--min-reference-agreement {args.min_reference_agreement}: a "
                         "correlation or overlap, in [-1, 1]")
    return ReferenceCheck(method=args.reference, min_agreement=args.min_reference_agreement,
                          metric=args.reference_metric, top_fraction=args.reference_top_fraction,
                          layer=args.reference_layer, images=args.reference_images)


def add_int8_options(p) -> None:
    g = p.add_argument_group("INT8 (NNCF quantisation, checked against the f32 IR)")
    g.add_argument("--int8", action="store_true", help="quantise; needs --calibration DIR")
    int8_options = DependentOptions(g, "--int8")
    option = int8_options.add
    option("--calibration", type=Path, default=None, help="folder of images, any size")
    option("--calibration-size", type=int, default=300, help="images used (subset)")
    option("--preset", default="performance", choices=["performance", "mixed"],
           help="mixed: asymmetric activation ranges")
    option("--no-fast-bias-correction", action="store_true",
           help="full bias correction: slower, sometimes closer to f32")
    option("--overflow-fix", default="auto", metavar="{auto,enable,first-layer,disable}",
           help="7-bit weights so that CPUs without VNNI do not saturate: enable for "
                "every layer, first-layer (NNCF's default) or disable; auto: enable "
                "unless this CPU has VNNI (default model on AVX2: top-1 agreement 0.79 "
                "with first-layer, 0.86 with enable)")
    option("--validation", type=Path, default=None,
           help="folder of images to compare INT8 with f32 on (default: the "
                "calibration folder, a weaker check)")
    option("--validation-size", type=int, default=300)
    option("--max-top1-drop", type=float, default=None,
           help="fail (exit 3, nothing written) when more than this fraction of "
                "validation images change their top-1 class")
    option("--min-saliency-agreement", type=float, default=None,
           help="fail (exit 3) when the mean rank correlation of the maps is below this")
    option("--accuracy-control", action="store_true",
           help="NNCF's accuracy control: revert the INT8 layers that change the most "
                "top-1 classes to f32 until the drop is within --max-top1-drop (slow: "
                "it re-runs the control images once per step)")
    option("--control", type=Path, default=None,
           help="folder of images that steer --accuracy-control (default: the "
                "validation folder, which then is no held-out check)")
    option("--finetune-steps", type=int, default=0, metavar="N",
           help="quantisation-aware training: quantise the torch source and fine-tune "
                "it N steps by distillation from f32 on the calibration images (no "
                "labels; default model: 300 steps, about 15 minutes on 2 cores)")
    option("--finetune-lr", type=float, default=1e-5, help="Adam's learning rate")
    option("--finetune-batch", type=int, default=16, help="images per training step")
    p.set_defaults(int8_options=int8_options)


def int8_settings(args):
    """Int8Settings from the export options, None without --int8; ValueError on misuse."""
    from xaiserve.export.int8 import Int8Settings, check_settings

    if not args.int8:
        args.int8_options.refuse_without(args, "nothing is quantised or gated (add --int8 "
                                               "--calibration DIR, or drop them)")
        return None
    if args.calibration is None:
        raise ValueError("--int8 needs --calibration DIR (a folder of images like the inputs)")
    settings = Int8Settings(
        calibration=args.calibration, calibration_size=args.calibration_size,
        preset=args.preset, fast_bias_correction=not args.no_fast_bias_correction,
        validation=args.validation, validation_size=args.validation_size,
        max_top1_drop=args.max_top1_drop, min_saliency_agreement=args.min_saliency_agreement,
        keep_f32_first=args.keep_f32_first, overflow_fix=args.overflow_fix,
        accuracy_control=args.accuracy_control, control=args.control,
        finetune_steps=args.finetune_steps, finetune_learning_rate=args.finetune_lr,
        finetune_batch=args.finetune_batch)
    check_settings(settings, has_saliency=args.method != "none")  # before the slow steps
    return settings


def run_export(args) -> int:
    from tqdm import tqdm

    try:
        from xaiserve.export.int8 import GateFailed, Int8Error
        from xaiserve.export.pipeline import ExportRequest, export_model
        from xaiserve.export.precision_pins import check_keep_f32_first
        from xaiserve.export.reference_saliency import ReferenceCheckError, ReferenceGateError
        from xaiserve.export.repository import (InterruptedAfterWriting, RepositoryError,
                                                check_target)
        from xaiserve.export.saliency import InsertionError, SaliencySettings
        from xaiserve.export.sources import SourceError, SourceOptions
    except ImportError as exc:
        return fail("export", f"{exc}; install the export extra: pip install 'xaiserve[export]'")
    try:  # everything that can be checked before the slow steps
        if args.method == "none" and args.target_layer:
            raise ValueError("--target-layer with --method none: no saliency branch is "
                             "inserted; drop one of them")
        check_keep_f32_first(args.keep_f32_first)
        check_target(args.repository, args.name, args.version)
        check_report_file(args.report, (Path(args.source), args.labels, args.checkpoint,
                                        args.calibration, args.validation))
        reference = reference_check(args)
        int8 = int8_settings(args)
        if args.random_weights and args.checkpoint:
            raise ValueError("--random-weights with --checkpoint: drop one of them")
        source_options = SourceOptions(checkpoint=args.checkpoint, num_classes=args.num_classes,
                                       random_weights=args.random_weights,
                                       labels_file=args.labels, input_size=args.input_size,
                                       mean_values=args.mean, scale_values=args.scale,
                                       bgr=args.bgr)
    except ValueError as exc:
        return fail("export", str(exc))
    request = ExportRequest(
        source=args.source, repository=args.repository, name=args.name, version=args.version,
        saliency=SaliencySettings(method=args.method, target_layer=args.target_layer,
                                  score=args.score, mosaic=args.mosaic, spread=args.spread,
                                  normalize=args.normalize,
                                  map_precision=args.map_precision),
        source_options=source_options,
        reference=reference,
        int8=int8,
        keep_f32_first=args.keep_f32_first,
    )
    stages = tqdm(total=4 + (reference is not None) + 2 * bool(int8), desc="export",
                  unit="step", file=sys.stderr,
                  bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix}")

    started = []

    def progress(stage: str) -> None:
        if started:  # the previous stage is done
            stages.update(1)
        started.append(stage)
        stages.set_postfix_str(stage)

    try:
        with interrupts_raised():
            result = export_model(request, progress)
    except InterruptedAfterWriting as exc:
        stages.close()
        print(f"xaiserve export: {exc.reason} after {exc.path} was written whole",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:  # the staged version has been removed on the way out
        stages.close()
        print(f"xaiserve export: {str(exc) or 'interrupted'}; nothing was written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ReferenceGateError as exc:
        stages.close()
        return gate_failed(args.report, [str(exc)], "reference", exc.figures,
                            f"gate failed: {exc}")
    except (SourceError, InsertionError, RepositoryError, Int8Error, ReferenceCheckError) as exc:
        stages.close()
        return fail("export", str(exc))
    except GateFailed as exc:
        stages.close()
        return gate_failed(args.report, exc.failures, "int8", exc.figures,
                            f"INT8 gate failed: {exc}; nothing was written")
    except Exception as exc:  # noqa: BLE001 - a pipeline step must get one line, not a trace
        stages.close()
        from ..model import error_reason
        return fail("export", f"{type(exc).__name__}: {error_reason(exc, 200)}")
    stages.update(stages.total - stages.n)
    stages.close()
    report = {"status": "ok", "path": str(result.path), **result.card}
    text = json_values.dumps(report, indent=2)
    if args.report:
        atomic_file.write_text(args.report, text + "\n")
    print(text)
    return 0
