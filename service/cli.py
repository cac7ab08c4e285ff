"""The `xaiserve` command: a thin layer over the library. Errors end in one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import atomic_file, json_values
from .interrupts import interrupts_raised

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


def _gate_failed(report: Path | None, failures: list[str], section: str, figures: dict,
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


def _fail(verb: str, message: str) -> int:
    print(f"xaiserve {verb}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high] (argparse names the option when not)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: expected {low}..{high}")
        return value
    return parse


def prepared_out(path: Path) -> Path:
    """--out made before the work starts: a file in its place fails now, not after a run
    whose results would then be lost."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {path}: not writable; give a folder this user can write")
    return path


def check_outputs(images: list[Path], out: Path) -> None:
    """Results are written as <out>/<stem>.json and <stem>_overlay.png: two inputs with one
    stem would overwrite each other's, and an input that is one of those files itself."""
    seen: dict[str, Path] = {}
    written: set[Path] = set()
    for path in images:
        if path.stem in seen:
            raise ValueError(f"{seen[path.stem]} and {path} would write the same results "
                             f"({path.stem}.json); rename one or explain them in two runs")
        seen[path.stem] = path
        written |= {(out / f"{path.stem}{suffix}").resolve()
                    for suffix in (".json", "_overlay.png")}
    for path in images:
        if path.resolve() in written:
            raise ValueError(f"{path}: the results would be written over it; give another --out")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(",", " ").split()]


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a classifier to an IR with a saliency_map output")
    p.add_argument("source", help="default | timm:<arch> | torch:<module>:<callable> | "
                                  "model.xml | model.onnx")
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
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--labels", type=Path, default=None, help="text file, one label per line")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--mean", type=_floats, default=None, help="per-channel mean, 0..255 units")
    p.add_argument("--scale", type=_floats, default=None, help="per-channel divisor")
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
    g.add_argument("--min-reference-agreement", type=float, default=None,
                   help="fail (exit 3, nothing written) when the agreement is below this")
    g.add_argument("--reference-metric", choices=["spearman", "topk_iou"], default="spearman")
    g.add_argument("--reference-top-fraction", type=float, default=0.2)
    g.add_argument("--reference-layer", default=None, help="torch module name for Grad-CAM")
    g.add_argument("--reference-images", type=Path, default=None,
                   help="folder of images to compare on (default: the parity images)")


def reference_check(args):
    """The ReferenceCheck the options ask for, or None."""
    from xaiserve.export.reference_saliency import ReferenceCheck

    if args.reference is None:
        if args.min_reference_agreement is not None:
            raise ValueError("--min-reference-agreement needs --reference gradcam|gradient")
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
    g.add_argument("--calibration", type=Path, default=None, help="folder of images, any size")
    g.add_argument("--calibration-size", type=int, default=300, help="images used (subset)")
    g.add_argument("--preset", default="performance", choices=["performance", "mixed"],
                   help="mixed: asymmetric activation ranges")
    g.add_argument("--no-fast-bias-correction", action="store_true",
                   help="full bias correction: slower, sometimes closer to f32")
    g.add_argument("--overflow-fix", default="auto", metavar="{auto,enable,first-layer,disable}",
                   help="7-bit weights so that CPUs without VNNI do not saturate: enable for "
                        "every layer, first-layer (NNCF's default) or disable; auto: enable "
                        "unless this CPU has VNNI (default model on AVX2: top-1 agreement 0.79 "
                        "with first-layer, 0.86 with enable)")
    g.add_argument("--validation", type=Path, default=None,
                   help="folder of images to compare INT8 with f32 on (default: the "
                        "calibration folder, a weaker check)")
    g.add_argument("--validation-size", type=int, default=300)
    g.add_argument("--max-top1-drop", type=float, default=None,
                   help="fail (exit 3, nothing written) when more than this fraction of "
                        "validation images change their top-1 class")
    g.add_argument("--min-saliency-agreement", type=float, default=None,
                   help="fail (exit 3) when the mean rank correlation of the maps is below this")
    g.add_argument("--accuracy-control", action="store_true",
                   help="NNCF's accuracy control: revert the INT8 layers that change the most "
                        "top-1 classes to f32 until the drop is within --max-top1-drop (slow: "
                        "it re-runs the control images once per step)")
    g.add_argument("--control", type=Path, default=None,
                   help="folder of images that steer --accuracy-control (default: the "
                        "validation folder, which then is no held-out check)")
    g.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="quantisation-aware training: quantise the torch source and fine-tune "
                        "it N steps by distillation from f32 on the calibration images (no "
                        "labels; default model: 300 steps, about 15 minutes on 2 cores)")
    g.add_argument("--finetune-lr", type=float, default=1e-5, help="Adam's learning rate")
    g.add_argument("--finetune-batch", type=int, default=16, help="images per training step")


def int8_settings(args):
    """Int8Settings from the export options, None without --int8; ValueError on misuse."""
    from xaiserve.export.int8 import Int8Settings, check_settings

    if not args.int8:
        if args.calibration or args.validation or args.control or args.accuracy_control \
                or args.finetune_steps:
            raise ValueError("--calibration, --validation, --accuracy-control, --control and "
                             "--finetune-steps go with --int8")
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
        return _fail("export", f"{exc}; install the export extra: pip install 'xaiserve[export]'")
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
        source_options = SourceOptions(checkpoint=args.checkpoint, num_classes=args.num_classes,
                                       labels_file=args.labels, input_size=args.input_size,
                                       mean_values=args.mean, scale_values=args.scale)
    except ValueError as exc:
        return _fail("export", str(exc))
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
        return _gate_failed(args.report, [str(exc)], "reference", exc.figures,
                            f"gate failed: {exc}")
    except (SourceError, InsertionError, RepositoryError, Int8Error, ReferenceCheckError) as exc:
        stages.close()
        return _fail("export", str(exc))
    except GateFailed as exc:
        stages.close()
        return _gate_failed(args.report, exc.failures, "int8", exc.figures,
                            f"INT8 gate failed: {exc}; nothing was written")
    except Exception as exc:  # noqa: BLE001 - a pipeline step must get one line, not a trace
        stages.close()
        from .model import error_reason
        return _fail("export", f"{type(exc).__name__}: {error_reason(exc, 200)}")
    stages.update(stages.total - stages.n)
    stages.close()
    report = {"status": "ok", "path": str(result.path), **result.card}
    text = json_values.dumps(report, indent=2)
    if args.report:
        atomic_file.write_text(args.report, text + "\n")
    print(text)
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC (KServe v2 + explain)")
    p.add_argument("--repository", type=Path, default=None, help="default: models")
    p.add_argument("--port", type=int, default=None, help="default: 9000")
    p.add_argument("--host", default=None, help="default: 0.0.0.0")
    p.add_argument("--config", type=Path, default=None, help="YAML: defaults, models, server")
    p.add_argument("--device", default=None, help="CPU, GPU, NPU, AUTO, HETERO:...")
    p.add_argument("--performance-hint", default=None,
                   choices=["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"])
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--inference-precision", default=None,
                   choices=["default", "f32", "bf16", "f16"],
                   help="arithmetic of the layers that are not INT8 (default: the device's "
                        "choice, bf16 on CPUs with AMX; f32 keeps f32's classes, slower)")
    p.add_argument("--max-black-box-masks", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--log-level", default="INFO")
    add_serve_operations(p)
    p.set_defaults(run=run_serve)


def add_serve_operations(p) -> None:
    """Operations and security options of `serve` (metrics, logs, shutdown, TLS, token, limits)."""
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one object per line with request_id, model, version, code, ms")
    p.add_argument("--shutdown-grace", type=float, default=None,
                   help="seconds in-flight requests get after SIGTERM (default: 10)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="require 'authorization: Bearer <token>' with the token in this file "
                        "(or in $XAISERVE_TOKEN); health checks are exempt")
    p.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="beyond it requests get RESOURCE_EXHAUSTED (default: 32)")
    p.add_argument("--max-message-bytes", type=int, default=None,
                   help="largest request or response (default: 32 MiB)")
    p.add_argument("--poll-seconds", type=float, default=None,
                   help="how often the repository is compared with the disk (default: 2)")


SERVE_OPERATION_KEYS = ("metrics_port", "shutdown_grace", "tls_cert", "tls_key",
                        "tls_client_ca", "token_file", "max_concurrent_requests",
                        "max_message_bytes", "poll_seconds")


def run_serve(args) -> int:
    import logging

    from .config import ConfigError, load_settings
    from .server import Server

    from . import logs

    try:
        logs.configure(args.log_level, args.log_format)
    except ValueError as exc:
        return _fail("serve", f"--log-level {args.log_level}: {exc}")
    try:
        settings = load_settings(args.config, repository=args.repository, port=args.port,
                                 host=args.host, workers=args.workers, device=args.device,
                                 performance_hint=args.performance_hint,
                                 num_requests=args.num_requests,
                                 inference_precision=args.inference_precision,
                                 max_black_box_masks=args.max_black_box_masks,
                                 **{k: getattr(args, k) for k in SERVE_OPERATION_KEYS})
        server = Server(settings).start()
    except (ConfigError, ValueError, OSError) as exc:
        return _fail("serve", str(exc))
    print(f"xaiserve: serving {settings.repository} on port {server.port}", flush=True)
    if server.metrics_port:
        print(f"xaiserve: metrics at http://{settings.host}:{server.metrics_port}/metrics",
              flush=True)
    server.serve_forever()
    # In-flight requests have had their grace period and gRPC has cancelled the rest; a
    # handler thread still finishing cancelled work, or model teardown, must not hold the exit.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain images, write PNG overlays + JSON")
    p.add_argument("images", nargs="+", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running `xaiserve serve`")
    where.add_argument("--model-path", type=Path,
                       help="in-process: models/<name> (newest version) or models/<name>/<v>")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="")
    p.add_argument("--top-k", type=_bounded_int(1, 20), default=3)
    p.add_argument("--method", default="auto", choices=["auto", "white-box", "black-box"])
    p.add_argument("--masks", type=_bounded_int(0, 2**32 - 1), default=0,
                   help="black-box masks (0: server default)")
    p.add_argument("--seed", type=_bounded_int(0, 2**64 - 1), default=0)
    p.add_argument("--device", default="CPU")
    p.add_argument("--out", type=Path, default=Path("out"))
    add_quality_options(p)
    add_client_security(p)
    p.set_defaults(run=run_explain)


def add_quality_options(p) -> None:
    """Ground truth and explanation-quality metrics for `explain` (Shared Interest, pointing game,
    faithfulness); every metric in the JSON carries its parameters."""
    g = p.add_argument_group("explanation quality")
    g.add_argument("--label", type=int, help="true class id: adds the Shared Interest pattern")
    g.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="ground-truth box in image pixels (repeatable; union with --mask)")
    g.add_argument("--mask", type=Path, help="ground-truth mask PNG, the image's size")
    g.add_argument("--metrics", default="",
                   help="extra metrics: all, faithfulness, shared_interest or names, comma "
                        "separated (deletion_auc, insertion_auc, average_drop, ...)")
    g.add_argument("--substrate", choices=["black", "blur", "mean"],
                   help="faithfulness substrate (default: deletion black, insertion blur)")
    g.add_argument("--steps", type=_bounded_int(0, 2**32 - 1), default=0,
                   help="deletion/insertion steps (0: 196)")
    g.add_argument("--binarization", choices=["std", "threshold", "percentile"], default="std")
    g.add_argument("--binarization-value", type=float,
                   help="k of mean + k std (1), threshold 0..1 (0.5) or percentile (90)")


def quality_arguments(args) -> dict:
    """--box/--mask/--metrics/... -> XaiClient.explain keyword arguments; ValueError names the
    option."""
    from .explanation_quality import resolve_names

    boxes = []
    for text in args.box:
        try:
            box = _floats(text)
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(f"--box {text!r}: expected X0,Y0,X1,Y1 in pixels")
        boxes.append(tuple(box))
    names = [n for n in args.metrics.split(",") if n.strip()]
    try:
        resolve_names(names)
    except ValueError as exc:
        raise ValueError(f"--metrics: {str(exc).split(': ', 1)[1]}") from None
    if args.mask is not None and not args.mask.is_file():
        raise ValueError(f"--mask {args.mask}: no such file")
    options = {"steps": args.steps, "binarization": args.binarization}
    if args.substrate:
        options["substrate"] = args.substrate
    if args.binarization_value is not None:
        options["binarization_value"] = args.binarization_value
    return {"label": args.label, "boxes": boxes, "metrics": names, "metric_options": options,
            "mask": args.mask}


def local_quality_metrics(model, image, result, quality: dict) -> list[dict]:
    """The same metrics as the server's, computed in-process for `explain --model-path`."""
    import cv2

    from . import faithfulness as fm
    from .explanation_quality import (QualityRequest, model_scorer, quality_metrics,
                                      resolve_names)
    from .images import ImageError, decode_image
    from .shared_interest import Binarization

    options = quality["metric_options"]
    mask = None
    if quality["mask"] is not None:
        try:  # bytes to OpenCV, never the path: a non-UTF-8 name crashed it
            mask = decode_image(Path(quality["mask"]).read_bytes(), cv2.IMREAD_GRAYSCALE)
        except (OSError, ImageError) as exc:
            raise ValueError(f"--mask {quality['mask']}: not a readable image ({exc})") \
                from None
        if mask.shape != image.shape[:2]:
            raise ValueError(f"--mask {quality['mask']}: {mask.shape[1]}x{mask.shape[0]} does "
                             f"not match the image's {image.shape[1]}x{image.shape[0]}")
    if not (quality["metrics"] or quality["boxes"] or mask is not None):
        return []
    settings = fm.FaithfulnessSettings(steps=options["steps"] or fm.FaithfulnessSettings.steps)
    if "substrate" in options:
        settings = settings.with_substrate(options["substrate"])
    request = QualityRequest(
        names=quality["metrics"], boxes=quality["boxes"], mask=mask, label=quality["label"],
        binarization=Binarization(options["binarization"], options.get("binarization_value")),
        faithfulness=settings)
    top = result.predictions[0].class_id
    if top not in result.maps:
        raise ValueError("this model has no saliency map; explanation-quality metrics need one")
    resolve_names(request.names)
    values = quality_metrics(request, image, model.preprocess(image), result.maps[top], top,
                             top, model_scorer(model), model.info)
    return [{"name": v.name, "value": v.value, "text": v.text,
             "parameters": v.parameters} for v in values]


def add_client_security(p) -> None:
    """How a client reaches a TLS server and proves who it is."""
    p.add_argument("--tls-ca", type=Path, default=None,
                   help="PEM CA that signed the server's certificate: connect over TLS")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file with the server's bearer token (or set $XAISERVE_TOKEN)")


def run_explain_remote(args) -> int:
    import grpc

    from .client import XaiClient
    from .config import ConfigError

    if not args.model:
        return _fail("explain", "--model NAME is needed with --server")
    try:
        quality = quality_arguments(args)
        client = XaiClient.connect(args.server, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                   tls_key=args.tls_key, token_file=args.token_file)
    except (ValueError, ConfigError) as exc:
        return _fail("explain", str(exc))
    from tqdm import tqdm

    failures = 0
    for path in tqdm(args.images, desc="explain", unit="image",
                     disable=not quality["metrics"] or len(args.images) < 2):
        try:
            response = client.explain(path, args.model, version=args.version, top_k=1,
                                      method=args.method, num_masks=args.masks, seed=args.seed,
                                      **quality)
        except OSError as exc:
            print(f"xaiserve explain: error: {path}: {exc.strerror}", file=sys.stderr)
            failures += 1
            continue
        except grpc.RpcError as exc:
            print(f"xaiserve explain: error: {path}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            failures += 1
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                break
            continue
        record = {
            "image": str(path), "id": response.id, "model": response.model_name,
            "version": response.model_version,
            "predictions": [{"class_id": p.class_id, "label": p.label, "score": p.score}
                            for p in response.predictions[:args.top_k]],
            "maps": [{"class_id": m.class_id, "label": m.label, "method": m.method,
                      "shape": list(m.shape)} for m in response.maps],
            "metrics": [{"name": m.name, "value": m.value, "text": m.text,
                         "parameters": dict(m.parameters)} for m in response.metrics],
            "timings_ms": dict(response.timings_ms),
        }
        if response.maps:
            atomic_file.write_bytes(args.out / f"{path.stem}_overlay.png", response.maps[0].data)
            record["overlay"] = str(args.out / f"{path.stem}_overlay.png")
        atomic_file.write_text(args.out / f"{path.stem}.json",
                               json_values.dumps(record, indent=2) + "\n")
        print(f"{path.name}: " + ", ".join(
            f"{p['label']} ({p['class_id']}) {p['score']:.3f}" for p in record["predictions"])
            + f"  [{response.maps[0].method if response.maps else 'no map'}, "
              f"{response.timings_ms['total']:.0f} ms]")
    client.close()
    return 1 if failures else 0


def resolve_version_dir(path: Path) -> Path:
    """models/<name> -> its highest numeric version directory; a version dir stays as is."""
    if (path / "model.xml").is_file() or path.suffix == ".xml":
        return path
    from .repository import version_dirs

    numbered = version_dirs(path)
    if not numbered:
        raise FileNotFoundError(f"--model-path {path}: no model.xml and no version directories")
    return numbered[max(numbered)]


def run_explain(args) -> int:
    if args.server is None and (args.method == "black-box" or args.masks):
        return _fail("explain", "--method black-box and --masks need --server: in-process "
                                "explain computes the model's own saliency_map")
    try:  # where the results go, in both modes, before any work
        check_outputs(args.images, args.out)
        prepared_out(args.out)
    except ValueError as exc:
        return _fail("explain", str(exc))
    if args.server is not None:
        return run_explain_remote(args)
    from .images import ImageError, read_image
    from .model import ClassifierModel, ModelLoadError, error_reason
    from .overlay import overlay, write_png

    try:
        quality = quality_arguments(args)
        model = ClassifierModel(resolve_version_dir(args.model_path), args.device).load()
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        return _fail("explain", str(exc))
    except RuntimeError as exc:  # OpenVINO: a device that is not here, or cannot compile it
        return _fail("explain", f"--device {args.device}: {error_reason(exc)}")
    if args.label is not None and not 0 <= args.label < len(model.info.labels):
        return _fail("explain", f"--label {args.label}: out of range [0, "
                                f"{len(model.info.labels)})")
    failures = 0
    for path in args.images:
        try:
            image = read_image(path)
        except ImageError as exc:
            print(f"xaiserve explain: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        result = model.explain(image, top_k=args.top_k)
        try:
            metrics = local_quality_metrics(model, image, result, quality)
        except ValueError as exc:
            print(f"xaiserve explain: error: {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        top = result.predictions[0]
        record = {
            "image": str(path),
            "predictions": [vars(p) for p in result.predictions],
            "saliency": {str(c): {"label": model.label(c), "shape": list(m.shape)}
                         for c, m in result.maps.items()},
            "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        }
        if metrics:
            record["metrics"] = metrics
        if top.class_id in result.maps:
            legend = [f"map: {top.label} ({top.score:.2f})"] + [
                f"{p.label}: {p.score:.2f}" for p in result.predictions[1:]]
            picture = overlay(image, result.maps[top.class_id], legend)
            write_png(args.out / f"{path.stem}_overlay.png", picture)
            record["overlay"] = str(args.out / f"{path.stem}_overlay.png")
        atomic_file.write_text(args.out / f"{path.stem}.json",
                               json_values.dumps(record, indent=2) + "\n")
        print(f"{path.name}: " + ", ".join(
            f"{p.label} ({p.class_id}) {p.score:.3f}" for p in result.predictions))
    return 1 if failures else 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="explanation quality on a labelled image folder: "
                                        "HTML report + JSON/CSV")
    p.add_argument("dataset", type=Path, help="DATASET/<class>/<image>, optional "
                   "<image>.mask.png beside each image or DATASET/boxes.json")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running `xaiserve serve`")
    where.add_argument("--model-path", help="in-process: models/<name> or models/<name>/<v>")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="")
    p.add_argument("--device", default="CPU")
    p.add_argument("--out", type=Path, default=Path("report"))
    p.add_argument("--limit", type=int, default=0,
                   help="evaluate a sample of N images only (drawn with --seed, all classes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-faithfulness", action="store_true",
                   help="skip deletion/insertion and the other perturbation metrics")
    p.add_argument("--steps", type=int, default=196,
                   help="deletion/insertion steps (at most one per map cell)")
    p.add_argument("--substrate", choices=["default", "black", "blur", "mean"],
                   default="default", help="what removed pixels become (default: deletion and "
                   "the single-step metrics black, insertion blur)")
    p.add_argument("--binarization", default="std", choices=["std", "threshold", "percentile"],
                   help="how a map becomes the saliency set S for Shared Interest")
    p.add_argument("--binarization-value", type=float, default=None,
                   help="k of mean + k std (1), the cut (0.5) or the percentile (90)")
    p.add_argument("--pattern-cutoffs", type=_floats, default=None, metavar="IOU,GTC,SC",
                   help="high/low cut-offs of the Shared Interest patterns (0.5,0.5,0.5)")
    p.add_argument("--grid-mosaics", type=int, default=40,
                   help="2x2 mosaics for the grid pointing game (0: skip)")
    p.add_argument("--grid-methods", default="saliency_map",
                   help="comma-separated: saliency_map (the model's map), rise (black-box, "
                        "in-process only)")
    p.add_argument("--seed", type=_bounded_int(0, 2**32 - 1), default=0)
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray: local | auto | ray://HOST:PORT (needs xaiserve[scale])")
    p.add_argument("--ray-workers", type=int, default=2, help="Ray workers, one model each")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from .evaluate_cli import evaluate_command

    return evaluate_command(args, _fail)


def add_health(sub) -> None:
    p = sub.add_parser("health", help="ask a server's gRPC health service; exit 0 if SERVING")
    p.add_argument("--server", default="127.0.0.1:9000", help="HOST:PORT (default: %(default)s)")
    p.add_argument("--service", default="", help="service name; default: the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of a TLS server")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM client key (mTLS)")
    p.add_argument("--tls-server-name", default=None, help="name in the server's certificate")
    p.set_defaults(run=run_health)


def run_health(args) -> int:
    """Exit 0 when SERVING, 1 when not (or unreachable), 2 on bad options."""
    from .client import check_port
    from .health import HealthError, TlsFiles, check_health

    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail("health", "--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        return _fail("health", "--tls-cert needs --tls-ca (the server's CA)")
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            return _fail("health", f"--{name.replace('_', '-')} {path}: no such file")
    if not 0 < args.timeout <= 3600:  # NaN fails too
        return _fail("health", f"--timeout {args.timeout}: give seconds in (0, 3600]")
    try:
        check_port(args.server)
    except ValueError as exc:
        return _fail("health", str(exc))
    tls = (TlsFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
           if args.tls_ca else None)
    try:
        status = check_health(args.server, args.service, args.timeout, tls)
    except HealthError as exc:
        print(f"xaiserve health: {exc}", file=sys.stderr)
        return 1
    print(f"{args.server} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput and latency in-process and through a server, "
                                     "next to benchmark_app; JSON, CSV, PNG plots, a summary")
    p.add_argument("--model-path", type=Path, action="append", default=[],
                   help="models/<name> (newest version) or models/<name>/<v>; repeat to compare "
                        "IRs (f32, INT8); with --server: the IR it serves, for benchmark_app")
    p.add_argument("--server", help="HOST:PORT of a running `xaiserve serve`")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="")
    p.add_argument("--works", default="predict,explain-white",
                   help="comma list of predict, explain-white, explain-black, faithfulness")
    p.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8")
    p.add_argument("--concurrency", default="1", help="concurrent clients, e.g. 1,4,8")
    p.add_argument("--device", default="CPU", help="in-process devices, e.g. CPU,GPU,NPU,AUTO")
    p.add_argument("--precision", default="default",
                   help="default,f32,bf16,f16 (INFERENCE_PRECISION_HINT; default: the device's)")
    p.add_argument("--hint", default="THROUGHPUT", help="LATENCY,THROUGHPUT,...")
    p.add_argument("--streams", default="auto", help="NUM_STREAMS values, e.g. auto,1,2")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--window", type=float, default=3.0, help="seconds per measurement window")
    p.add_argument("--window-count", type=int, default=0,
                   help="requests per window instead of --window seconds")
    p.add_argument("--stability", type=float, default=10.0,
                   help="percent: accept when the last --stable-windows windows' throughput "
                        "and p50 lie within this of their mean")
    p.add_argument("--stable-windows", type=int, default=3)
    p.add_argument("--max-windows", type=int, default=10,
                   help="give up after this many windows and report stable: false")
    p.add_argument("--masks", type=int, default=500, help="black-box (RISE) masks")
    p.add_argument("--seed", type=_bounded_int(0, 2**32 - 1), default=0)
    p.add_argument("--image", type=Path, default=None, help="default: a sample photo")
    p.add_argument("--reference-seconds", type=int, default=10, help="benchmark_app -t")
    p.add_argument("--no-reference", action="store_true", help="do not run benchmark_app")
    p.add_argument("--layers", action="store_true",
                   help="also read per-layer counters (PERF_COUNT) of each in-process "
                        "configuration and batch: time by layer type, kernel and precision")
    p.add_argument("--layer-iterations", type=int, default=100,
                   help="inferences averaged for --layers")
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.set_defaults(run=run_bench)


def _bench_list(option: str, text: str, kind=str) -> tuple:
    values = [v.strip() for v in text.split(",") if v.strip()]
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ValueError(f"{option} {text!r}: give a comma list, e.g. 1,4,8") from None


class _BenchBar:
    """tqdm over the points; skip lines and benchmark_app runs printed above it."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None

    def start(self, total: int) -> None:
        self.bar = self._tqdm(total=total, desc="bench", unit="point", file=sys.stderr)

    def begin(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def window(self, window, index: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"window {index}: {window.throughput:.1f} img/s, "
                                     f"p50 {window.p50_ms:.1f} ms")

    def advance(self) -> None:
        self.bar.update(1)

    def note(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(args) -> int:
    from .bench import BenchError, BenchSettings, Bench
    from .bench_report import write_all

    try:
        paths = tuple(resolve_version_dir(p) for p in args.model_path)
        settings = BenchSettings(
            model_paths=paths, server=args.server, model=args.model, version=args.version,
            works=_bench_list("--works", args.works),
            batch_sizes=_bench_list("--batch", args.batch, int),
            concurrency=_bench_list("--concurrency", args.concurrency, int),
            devices=_bench_list("--device", args.device),
            precisions=_bench_list("--precision", args.precision.lower()),
            hints=_bench_list("--hint", args.hint.upper()),
            streams=_bench_list("--streams", args.streams.lower()),
            warmup_s=args.warmup, window_s=args.window, window_count=args.window_count,
            stability=args.stability / 100, stable_windows=args.stable_windows,
            max_windows=args.max_windows, masks=args.masks, seed=args.seed, image=args.image,
            reference=not args.no_reference, reference_seconds=args.reference_seconds,
            layers=args.layers, layer_iterations=args.layer_iterations)
        prepared_out(args.out)
        with interrupts_raised():  # SIGTERM too: keep the points measured, end benchmark_app
            result = Bench(settings, _BenchBar()).run()
            if not result.points and not result.layers:
                if result.interrupted:
                    raise KeyboardInterrupt(f"{result.interrupted}; nothing was measured")
                return _fail("bench", "nothing was measured: " + "; ".join(result.skips))
            written = write_all(result, args.out)
    except (BenchError, ValueError, FileNotFoundError) as exc:
        return _fail("bench", str(exc))
    print(written["summary"].read_text(), end="")
    print(f"wrote {', '.join(str(v) for v in written.values())}", file=sys.stderr)
    if result.interrupted:
        print(f"xaiserve bench: {result.interrupted}; what was measured before it is written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xaiserve", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    add_export(sub)
    add_serve(sub)
    add_explain(sub)
    add_health(sub)
    add_bench(sub)
    add_evaluate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM where raised): one line
        print(f"xaiserve {args.verb}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a file the command could not read or write: one line, not a trace
        where = f" {exc.filename}" if exc.filename else ""
        print(f"xaiserve {args.verb}: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
