"""`xaiserve explain`: images to predictions, maps and metrics, through a server or in-process;
PNG overlays and JSON per image."""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import atomic_file, json_values
from ..layout import resolve_version_dir
from .common import (add_client_options, bounded_int, check_outputs, fail, floats, prepared_out,
                     server_access)


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain images, write PNG overlays + JSON")
    p.add_argument("images", nargs="+", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running `xaiserve serve`")
    where.add_argument("--model-path", type=Path,
                       help="in-process: models/<name> (newest version) or models/<name>/<v>")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="", help="a version of --model on the server, or of "
                   "--model-path models/<name> (default: the newest)")
    p.add_argument("--top-k", type=bounded_int(1, 20), default=3)
    p.add_argument("--method", default="auto", choices=["auto", "white-box", "black-box"])
    p.add_argument("--masks", type=bounded_int(0, 2**32 - 1), default=0,
                   help="black-box masks (0: server default)")
    p.add_argument("--seed", type=bounded_int(0, 2**64 - 1), default=0)
    p.add_argument("--device", default="CPU")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--stream", action="store_true",
                   help="with --server: send the images over one ExplainStream, the next ones "
                        "read and sent while earlier ones are explained (many images)")
    add_quality_options(p)
    add_client_options(p)
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
    g.add_argument("--steps", type=bounded_int(0, 2**32 - 1), default=0,
                   help="deletion/insertion steps (0: 196)")
    g.add_argument("--binarization", choices=["std", "threshold", "percentile"], default="std")
    g.add_argument("--binarization-value", type=float,
                   help="k of mean + k std (1), threshold 0..1 (0.5) or percentile (90)")


def quality_arguments(args) -> dict:
    """--box/--mask/--metrics/... -> XaiClient.explain keyword arguments; ValueError names the
    option."""
    from ..explanation_quality import resolve_names

    boxes = []
    for text in args.box:
        try:
            box = floats(text)
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

    from .. import faithfulness as fm
    from ..explanation_quality import (QualityRequest, model_scorer, quality_metrics,
                                      resolve_names)
    from ..images import ImageError, read_image
    from ..shared_interest import Binarization

    options = quality["metric_options"]
    mask = None
    if quality["mask"] is not None:
        try:
            mask = read_image(quality["mask"], cv2.IMREAD_GRAYSCALE)
        except ImageError as exc:  # it names the file
            raise ValueError(f"--mask {exc}") from None
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


@dataclass(frozen=True)
class Failed:
    """An image the server (or the file system) did not explain: printed as one line."""

    status: str  # the gRPC status name, or "" for a file that could not be read
    message: str


def unary_answers(client, args, options: dict) -> Iterator[tuple[Path, object]]:
    """(image, ExplainResponse or Failed), one Explain call each; stops after UNAVAILABLE."""
    import grpc

    for path in args.images:
        try:
            yield path, client.explain(path, args.model, **options)
        except ValueError as exc:  # ImageError: not a regular file, too large, unreadable
            yield path, Failed("", str(exc))
        except grpc.RpcError as exc:
            tried = (f" (tried {args.retries + 1} times)"
                     if exc.code() == grpc.StatusCode.UNAVAILABLE and args.retries else "")
            yield path, Failed(exc.code().name + tried, exc.details())
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return


def streamed_answers(client, args, options: dict) -> Iterator[tuple[Path, object]]:
    """(image, ExplainResponse or Failed) over one ExplainStream: the next images are read and
    sent while earlier ones are explained. A stream that breaks fails every image it has not
    answered, sent or not."""
    import grpc

    sent: collections.deque[int] = collections.deque()  # indexes in args.images, in order
    unreadable: dict[int, Failed] = {}

    def requests():
        for i, path in enumerate(args.images):
            try:
                request = client.request(path, args.model, **options)
            except ValueError as exc:
                unreadable[i] = Failed("", str(exc))
                continue
            sent.append(i)
            yield request

    answered: set[int] = set()
    try:
        for answer in client.explain_stream(requests()):
            i = sent.popleft()
            answered.add(i)
            yield args.images[i], (Failed(answer.error_code, answer.error_message)
                                   if answer.error_code else answer.response)
    except grpc.RpcError as exc:
        broken = Failed(exc.code().name, exc.details())
        for i, path in enumerate(args.images):
            if i not in answered and i not in unreadable:
                yield path, broken
    for i, failed in sorted(unreadable.items()):
        yield args.images[i], failed


def run_explain_remote(args) -> int:
    from ..client import XaiClient
    from ..config import ConfigError

    if not args.model:
        return fail("explain", "--model NAME is needed with --server")
    try:
        quality = quality_arguments(args)
        client = XaiClient.connect(args.server, access=server_access(args),
                                   retries=args.retries)
    except (ValueError, ConfigError) as exc:
        return fail("explain", str(exc))
    from tqdm import tqdm

    options = dict(version=args.version, top_k=1, method=args.method, num_masks=args.masks,
                   seed=args.seed, **quality)
    answers = (streamed_answers if args.stream else unary_answers)(client, args, options)
    failures = 0
    for path, response in tqdm(answers, desc="explain", unit="image", total=len(args.images),
                               disable=not (quality["metrics"] or args.stream)
                               or len(args.images) < 2):
        if isinstance(response, Failed):
            where = f"{path}: {response.status}: " if response.status else ""
            print(f"xaiserve explain: error: {where}{response.message}", file=sys.stderr)
            failures += 1
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


def run_explain(args) -> int:
    if args.server is None and args.stream:
        return fail("explain", "--stream needs --server: it sends the images over one "
                               "ExplainStream")
    if args.server is None and (args.method == "black-box" or args.masks):
        return fail("explain", "--method black-box and --masks need --server: in-process "
                                "explain computes the model's own saliency_map")
    try:  # where the results go, in both modes, before any work
        check_outputs(args.images, args.out)
        prepared_out(args.out)
    except ValueError as exc:
        return fail("explain", str(exc))
    if args.server is not None:
        return run_explain_remote(args)
    from ..images import ImageError, read_image
    from ..model import ClassifierModel, ModelLoadError, error_reason
    from ..overlay import overlay, write_png

    try:
        quality = quality_arguments(args)
        model = ClassifierModel(resolve_version_dir(args.model_path, args.version),
                                 args.device).load()
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        return fail("explain", str(exc))
    except RuntimeError as exc:  # OpenVINO: a device that is not here, or cannot compile it
        return fail("explain", f"--device {args.device}: {error_reason(exc)}")
    if args.label is not None and not 0 <= args.label < len(model.info.labels):
        return fail("explain", f"--label {args.label}: out of range [0, "
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
