"""`xaiserve evaluate`: the command's steps over the library (settings, backend, run, report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..interrupts import interrupts_deferred, interrupts_raised
from .common import (EXIT_INTERRUPTED, add_access_options, bounded_int, fail, floats,
                     prepared_out, server_access)

VERB = "evaluate"


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="explanation quality on a labelled image folder: "
                                        "HTML report + JSON/CSV")
    p.add_argument("dataset", type=Path, help="DATASET/<class>/<image>, optional "
                   "<image>.mask.png beside each image or DATASET/boxes.json")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running `xaiserve serve`")
    where.add_argument("--model-path", help="in-process: models/<name> or models/<name>/<v>")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="", help="a version of --model on the server, or of "
                   "--model-path models/<name> (default: the newest)")
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
    p.add_argument("--pattern-cutoffs", type=floats, default=None, metavar="IOU,GTC,SC",
                   help="high/low cut-offs of the Shared Interest patterns (0.5,0.5,0.5)")
    p.add_argument("--grid-mosaics", type=int, default=40,
                   help="2x2 mosaics for the grid pointing game (0: skip)")
    p.add_argument("--grid-methods", default="saliency_map",
                   help="comma-separated: saliency_map (the model's map), rise (black-box, "
                        "in-process only)")
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0)
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray: local | auto | ray://HOST:PORT (needs xaiserve[scale])")
    p.add_argument("--ray-workers", type=int, default=2, help="Ray workers, one model each")
    add_access_options(p)
    p.set_defaults(run=run_evaluate)


def settings_from_args(args):
    """EvaluationSettings from the options; ValueError names the option to fix."""
    from ..evaluation import GRID_METHODS, EvaluationSettings
    from ..faithfulness import FaithfulnessSettings
    from ..shared_interest import Binarization, PatternCutoffs

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.grid_mosaics < 0:
        raise ValueError("--grid-mosaics must be 0 (skip) or more")
    if args.ray_workers < 1:
        raise ValueError("--ray-workers must be at least 1")
    if args.limit < 0:
        raise ValueError("--limit must be 0 (all images) or more")
    if args.model and not args.server:
        raise ValueError("--model names a model on a --server; with --model-path the path "
                         "names it")
    methods = tuple(m.strip() for m in args.grid_methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in GRID_METHODS]
    if unknown or not methods:
        raise ValueError(f"--grid-methods {args.grid_methods!r}: choose from "
                         f"{', '.join(GRID_METHODS)}")
    if "rise" in methods and args.server:
        raise ValueError("--grid-methods rise runs in-process only; use --model-path")
    try:
        binarization = Binarization(args.binarization, args.binarization_value)
    except ValueError as exc:
        raise ValueError(f"--binarization-value: {exc}") from None
    cutoffs = args.pattern_cutoffs or [0.5, 0.5, 0.5]
    if len(cutoffs) != 3:
        raise ValueError("--pattern-cutoffs: give three numbers, IOU,GTC,SC")
    try:
        patterns = PatternCutoffs(*cutoffs)
    except ValueError as exc:
        raise ValueError(f"--pattern-cutoffs: {exc}") from None
    try:
        faithfulness = FaithfulnessSettings(steps=args.steps)
    except ValueError as exc:
        raise ValueError(f"--steps: {exc}") from None
    if args.substrate != "default":
        faithfulness = faithfulness.with_substrate(args.substrate)
    return EvaluationSettings(binarization=binarization, cutoffs=patterns,
                              faithfulness=faithfulness,
                              with_faithfulness=not args.no_faithfulness,
                              grid_mosaics=args.grid_mosaics, grid_methods=methods,
                              seed=args.seed)


def run_evaluate(args) -> int:
    import grpc
    from tqdm import tqdm

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return fail(VERB, "the report needs matplotlib: pip install 'xaiserve[evaluate]'")
    from ..dataset import DatasetError, scan_dataset
    from ..config import ConfigError
    from ..eval_backend import BackendError, BackendSpec
    from ..eval_report import write_report
    from ..evaluate_runner import EvaluationInterrupted, evaluate_local, evaluate_ray
    from ..evaluation import play_grid_game
    from ..model import error_reason

    try:
        settings = settings_from_args(args)
        if args.out.resolve().is_relative_to(args.dataset.resolve()):
            raise ValueError(f"--out {args.out}: inside the dataset {args.dataset}, where its "
                             "folders would be read as classes; give a folder outside it")
        prepared_out(args.out)
    except ValueError as exc:
        return fail(VERB, str(exc))
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            return fail(VERB, "--ray needs Ray: pip install 'xaiserve[scale]'")
    try:
        spec = BackendSpec(model_path=args.model_path, server=args.server, model=args.model,
                           version=args.version, device=args.device,
                           access=server_access(args))
        backend = spec.open()
        if not backend.has_saliency:
            return fail(VERB, "the model has no saliency_map output; export it with "
                              "`xaiserve export --method auto` (black-box maps are not evaluated)")
        items = scan_dataset(args.dataset, backend.info.labels)
    except (BackendError, DatasetError, ConfigError) as exc:
        return fail(VERB, str(exc))
    dataset_images = len(items)
    if args.limit and args.limit < len(items):
        import numpy as np

        keep = np.random.default_rng(args.seed).choice(len(items), args.limit, replace=False)
        items = [items[i] for i in sorted(keep)]
    bar = tqdm(total=len(items), desc="evaluate", unit="image", file=sys.stderr)
    interrupted = ""
    try:
        with interrupts_raised():  # SIGTERM too: a report of the images evaluated before it
            try:
                if args.ray is not None:
                    try:
                        results = evaluate_ray(spec, items, settings, args.ray,
                                               workers=args.ray_workers,
                                               batch_size=args.batch_size, progress=bar.update)
                    except Exception as exc:  # noqa: BLE001 - a worker's failure: one line
                        bar.close()
                        return fail(VERB, f"--ray {args.ray}: {type(exc).__name__}: "
                                          f"{error_reason(exc)}")
                else:
                    results = evaluate_local(spec, items, settings, args.batch_size, bar.update,
                                             backend)
            except EvaluationInterrupted as exc:
                done = sorted(exc.results)
                if not done:
                    raise KeyboardInterrupt(f"{exc.reason}; nothing was evaluated") from None
                interrupted = f"{exc.reason} after {len(done)} of {len(items)} images"
                items, results = [items[i] for i in done], [exc.results[i] for i in done]
            bar.close()
            failed = [i for i, r in enumerate(results) if "error" in r.row]
            for i in failed:
                print(f"xaiserve evaluate: error: {results[i].row['error']}", file=sys.stderr)
            game = None
            if settings.grid_mosaics and not interrupted:
                game_bar = None

                def mosaic_done(done: int, total: int) -> None:
                    game_bar.total = total
                    game_bar.update(1)

                try:
                    game_bar = tqdm(desc="grid game", unit="mosaic", file=sys.stderr)
                    game = play_grid_game(backend, items, settings, unreadable=tuple(failed),
                                          progress=mosaic_done)
                except KeyboardInterrupt as exc:  # the images' results are kept
                    interrupted = (f"{exc} during the grid pointing game, after all "
                                   f"{len(items)} images")
                finally:
                    if game_bar is not None:
                        game_bar.close()
            if game is not None and not game.mosaics:
                print("xaiserve evaluate: note: no grid pointing game: it needs images of 4 "
                      "classes (--grid-mosaics 0 skips it)", file=sys.stderr)
            if len(failed) == len(items):
                return fail(VERB, "no image could be read; see the errors above")
            model = {"name": args.model or str(args.model_path), "version": args.version,
                     "source": args.server or "in-process",
                     "saliency_method": backend.info.saliency_method,
                     "saliency_settings": backend.info.saliency_settings,
                     "execution": f"ray ({args.ray})" if args.ray is not None else "local"}
            run = {**json.loads(json.dumps(settings.as_dict(), default=str)),
                   "limit": args.limit or None, "dataset_images": dataset_images}
            with interrupts_deferred() as deferred:  # a report is never left half new
                summary = write_report(results, items, game, backend.info, model, run,
                                       args.out, interrupted)
            if deferred.signal and not interrupted:
                interrupted = (f"{deferred.signal} while the report was written, which was "
                               "finished first")
    except (BackendError, DatasetError) as exc:
        bar.close()
        return fail(VERB, str(exc))
    except grpc.RpcError as exc:
        bar.close()
        return fail(VERB, f"--server {args.server}: {exc.code().name}: {exc.details()}")
    means = summary["means"]
    shown = {k: means.get(k) for k in ("iou", "gtc", "sc", "deletion_auc", "insertion_auc")}
    print(", ".join([f"{summary['images']} image{'s' if summary['images'] != 1 else ''}"
                     + (f" of {dataset_images}" if summary['images'] < dataset_images else ""),
                     f"accuracy {summary['accuracy']:.3f}"]
                    + [f"{k} {v:.3f}" for k, v in shown.items() if v is not None])
          + f"; report: {args.out / 'report.html'}"
          + (f"; {len(failed)} images could not be read" if failed else ""))
    if interrupted:
        print(f"xaiserve evaluate: interrupted ({interrupted}); the report covers those",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 1 if failed else 0

