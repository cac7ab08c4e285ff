"""The `xaiserve` command: a thin layer over the library. Errors end in one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _fail(verb: str, message: str) -> int:
    print(f"xaiserve {verb}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


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
    p.add_argument("--checkpoint", type=Path, default=None, help=".pth, .pt or .safetensors")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--labels", type=Path, default=None, help="text file, one label per line")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--mean", type=_floats, default=None, help="per-channel mean, 0..255 units")
    p.add_argument("--scale", type=_floats, default=None, help="per-channel divisor")
    p.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    add_int8_options(p)
    p.set_defaults(run=run_export)


def add_int8_options(p) -> None:
    g = p.add_argument_group("INT8 (NNCF post-training quantisation, checked against the f32 IR)")
    g.add_argument("--int8", action="store_true", help="quantise; needs --calibration DIR")
    g.add_argument("--calibration", type=Path, default=None, help="folder of images, any size")
    g.add_argument("--calibration-size", type=int, default=300, help="images used (subset)")
    g.add_argument("--preset", default="performance", choices=["performance", "mixed"],
                   help="mixed: asymmetric activation ranges")
    g.add_argument("--no-fast-bias-correction", action="store_true",
                   help="full bias correction: slower, sometimes closer to f32")
    g.add_argument("--validation", type=Path, default=None,
                   help="folder of images to compare INT8 with f32 on (default: the "
                        "calibration folder, a weaker check)")
    g.add_argument("--validation-size", type=int, default=300)
    g.add_argument("--max-top1-drop", type=float, default=None,
                   help="fail (exit 3, nothing written) when more than this fraction of "
                        "validation images change their top-1 class")
    g.add_argument("--min-saliency-agreement", type=float, default=None,
                   help="fail (exit 3) when the mean rank correlation of the maps is below this")


def int8_settings(args):
    """Int8Settings from the export options, None without --int8; ValueError on misuse."""
    from xaiserve.export.int8 import Int8Settings, check_settings

    if not args.int8:
        if args.calibration or args.validation:
            raise ValueError("--calibration and --validation go with --int8")
        return None
    if args.calibration is None:
        raise ValueError("--int8 needs --calibration DIR (a folder of images like the inputs)")
    settings = Int8Settings(
        calibration=args.calibration, calibration_size=args.calibration_size,
        preset=args.preset, fast_bias_correction=not args.no_fast_bias_correction,
        validation=args.validation, validation_size=args.validation_size,
        max_top1_drop=args.max_top1_drop, min_saliency_agreement=args.min_saliency_agreement)
    check_settings(settings, has_saliency=args.method != "none")  # before the slow steps
    return settings


def run_export(args) -> int:
    from tqdm import tqdm

    try:
        from xaiserve.export.int8 import EXIT_GATE, GateFailed, Int8Error
        from xaiserve.export.pipeline import ExportRequest, export_model
        from xaiserve.export.repository import RepositoryError
        from xaiserve.export.saliency import InsertionError, SaliencySettings
        from xaiserve.export.sources import SourceError, SourceOptions
    except ImportError as exc:
        return _fail("export", f"{exc}; install the export extra: pip install 'xaiserve[export]'")
    try:
        int8 = int8_settings(args)
    except ValueError as exc:
        return _fail("export", str(exc))
    request = ExportRequest(
        source=args.source, repository=args.repository, name=args.name, version=args.version,
        saliency=SaliencySettings(method=args.method, target_layer=args.target_layer,
                                  score=args.score, mosaic=args.mosaic, spread=args.spread,
                                  normalize=args.normalize),
        source_options=SourceOptions(checkpoint=args.checkpoint, num_classes=args.num_classes,
                                     labels_file=args.labels, input_size=args.input_size,
                                     mean_values=args.mean, scale_values=args.scale),
        int8=int8,
    )
    stages = tqdm(total=4 + 2 * bool(int8), desc="export", unit="step", file=sys.stderr,
                  bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix}")

    started = []

    def progress(stage: str) -> None:
        if started:  # the previous stage is done
            stages.update(1)
        started.append(stage)
        stages.set_postfix_str(stage)

    try:
        result = export_model(request, progress)
    except (SourceError, InsertionError, RepositoryError, Int8Error) as exc:
        stages.close()
        return _fail("export", str(exc))
    except GateFailed as exc:
        stages.close()
        text = json.dumps({"status": "gate_failed", "failures": exc.failures,
                           "int8": exc.figures}, indent=2)
        if args.report:
            args.report.write_text(text + "\n")
        print(text)
        print(f"xaiserve export: INT8 gate failed: {exc}; nothing was written", file=sys.stderr)
        return EXIT_GATE
    except Exception as exc:  # noqa: BLE001 - a pipeline step must get one line, not a trace
        stages.close()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return _fail("export", f"{type(exc).__name__}: {first}")
    stages.update(stages.total - stages.n)
    stages.close()
    report = {"status": "ok", "path": str(result.path), **result.card}
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text + "\n")
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
    p.add_argument("--max-black-box-masks", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    import logging

    from .config import ConfigError, load_settings
    from .server import Server

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config, repository=args.repository, port=args.port,
                                 host=args.host, workers=args.workers, device=args.device,
                                 performance_hint=args.performance_hint,
                                 num_requests=args.num_requests,
                                 max_black_box_masks=args.max_black_box_masks)
        server = Server(settings).start()
    except (ConfigError, ValueError, OSError) as exc:
        return _fail("serve", str(exc))
    print(f"xaiserve: serving {settings.repository} on port {server.port}", flush=True)
    server.serve_forever()
    return 0


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain images, write PNG overlays + JSON")
    p.add_argument("images", nargs="+", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running `xaiserve serve`")
    where.add_argument("--model-path", type=Path,
                       help="in-process: models/<name> (newest version) or models/<name>/<v>")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--method", default="auto", choices=["auto", "white-box", "black-box"])
    p.add_argument("--masks", type=int, default=0, help="black-box masks (0: server default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="CPU")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.set_defaults(run=run_explain)


def run_explain_remote(args) -> int:
    import grpc

    from .client import XaiClient

    if not args.model:
        return _fail("explain", "--model NAME is needed with --server")
    client = XaiClient(args.server)
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            response = client.explain(path, args.model, version=args.version, top_k=1,
                                      method=args.method, num_masks=args.masks, seed=args.seed)
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
            (args.out / f"{path.stem}_overlay.png").write_bytes(response.maps[0].data)
            record["overlay"] = str(args.out / f"{path.stem}_overlay.png")
        (args.out / f"{path.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
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
    if args.server:
        return run_explain_remote(args)
    from .images import ImageError, read_image
    from .model import ClassifierModel, ModelLoadError
    from .overlay import overlay, write_png

    try:
        model = ClassifierModel(resolve_version_dir(args.model_path), args.device).load()
    except (FileNotFoundError, ModelLoadError) as exc:
        return _fail("explain", str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            image = read_image(path)
        except ImageError as exc:
            print(f"xaiserve explain: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        result = model.explain(image, top_k=args.top_k)
        top = result.predictions[0]
        record = {
            "image": str(path),
            "predictions": [vars(p) for p in result.predictions],
            "saliency": {str(c): {"label": model.label(c), "shape": list(m.shape)}
                         for c, m in result.maps.items()},
            "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        }
        if top.class_id in result.maps:
            legend = [f"map: {top.label} ({top.score:.2f})"] + [
                f"{p.label}: {p.score:.2f}" for p in result.predictions[1:]]
            picture = overlay(image, result.maps[top.class_id], legend)
            write_png(args.out / f"{path.stem}_overlay.png", picture)
            record["overlay"] = str(args.out / f"{path.stem}_overlay.png")
        (args.out / f"{path.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{path.name}: " + ", ".join(
            f"{p.label} ({p.class_id}) {p.score:.3f}" for p in result.predictions))
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xaiserve", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    add_export(sub)
    add_serve(sub)
    add_explain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
