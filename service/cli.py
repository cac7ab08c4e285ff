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
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from tqdm import tqdm

    try:
        from xaiserve.export.pipeline import ExportRequest, export_model
        from xaiserve.export.repository import RepositoryError
        from xaiserve.export.saliency import InsertionError, SaliencySettings
        from xaiserve.export.sources import SourceError, SourceOptions
    except ImportError as exc:
        return _fail("export", f"{exc}; install the export extra: pip install 'xaiserve[export]'")
    request = ExportRequest(
        source=args.source, repository=args.repository, name=args.name, version=args.version,
        saliency=SaliencySettings(method=args.method, target_layer=args.target_layer,
                                  score=args.score, mosaic=args.mosaic, spread=args.spread,
                                  normalize=args.normalize),
        source_options=SourceOptions(checkpoint=args.checkpoint, num_classes=args.num_classes,
                                     labels_file=args.labels, input_size=args.input_size,
                                     mean_values=args.mean, scale_values=args.scale),
    )
    stages = tqdm(total=4, desc="export", unit="step", file=sys.stderr,
                  bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix}")

    def progress(stage: str) -> None:
        stages.set_postfix_str(stage)
        stages.update(1)

    try:
        result = export_model(request, progress)
    except (SourceError, InsertionError, RepositoryError) as exc:
        stages.close()
        return _fail("export", str(exc))
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


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain images, write PNG overlays + JSON")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model-path", type=Path, required=True,
                   help="models/<name> (newest version) or models/<name>/<version>")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", default="CPU")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.set_defaults(run=run_explain)


def resolve_version_dir(path: Path) -> Path:
    """models/<name> -> its highest numeric version directory; a version dir stays as is."""
    if (path / "model.xml").is_file() or path.suffix == ".xml":
        return path
    numbered = sorted((int(p.name), p) for p in path.glob("*") if p.is_dir() and p.name.isdigit())
    if not numbered:
        raise FileNotFoundError(f"--model-path {path}: no model.xml and no version directories")
    return numbered[-1][1]


def run_explain(args) -> int:
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
    add_explain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
