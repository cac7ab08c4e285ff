"""`xaiserve evaluate`: the command's steps over the library (settings, backend, run, report)."""

from __future__ import annotations

import json
import sys

VERB = "evaluate"


def settings_from_args(args):
    from .evaluation import EvaluationSettings

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.grid_mosaics < 0:
        raise ValueError("--grid-mosaics must be 0 (skip) or more")
    if args.limit < 0:
        raise ValueError("--limit must be 0 (all images) or more")
    return EvaluationSettings(with_faithfulness=not args.no_faithfulness,
                              grid_mosaics=args.grid_mosaics, seed=args.seed)


def evaluate_command(args, fail) -> int:
    from tqdm import tqdm

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return fail(VERB, "the report needs matplotlib: pip install 'xaiserve[evaluate]'")
    from .dataset import DatasetError, scan_dataset
    from .eval_backend import BackendError, BackendSpec
    from .eval_report import write_report
    from .evaluate_runner import evaluate_local, evaluate_ray
    from .evaluation import play_grid_game

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        return fail(VERB, str(exc))
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            return fail(VERB, "--ray needs Ray: pip install 'xaiserve[scale]'")
    spec = BackendSpec(model_path=args.model_path, server=args.server, model=args.model,
                       version=args.version, device=args.device)
    try:
        backend = spec.open()
        if not backend.has_saliency:
            return fail(VERB, "the model has no saliency_map output; export it with "
                              "`xaiserve export --method auto` (black-box maps are not evaluated)")
        items = scan_dataset(args.dataset, backend.info.labels)
    except (BackendError, DatasetError) as exc:
        return fail(VERB, str(exc))
    if args.limit:
        items = items[:args.limit]
    bar = tqdm(total=len(items), desc="evaluate", unit="image", file=sys.stderr)
    try:
        if args.ray is not None:
            results = evaluate_ray(spec, items, settings, args.ray, workers=args.ray_workers,
                                   batch_size=args.batch_size, progress=bar.update)
        else:
            results = evaluate_local(spec, items, settings, args.batch_size, bar.update, backend)
        bar.close()
        game = play_grid_game(backend, items, settings) if settings.grid_mosaics else None
    except DatasetError as exc:
        bar.close()
        return fail(VERB, str(exc))
    model = {"name": args.model or str(args.model_path), "source": args.server or "in-process",
             "saliency_method": backend.info.saliency_method,
             "saliency_settings": backend.info.saliency_settings,
             "execution": f"ray ({args.ray})" if args.ray is not None else "local"}
    summary = write_report(results, items, game, backend.info, model,
                           json.loads(json.dumps(settings.as_dict(), default=str)), args.out)
    means = summary["means"]
    shown = {k: means.get(k) for k in ("iou", "gtc", "sc", "deletion_auc", "insertion_auc")}
    print(f"{summary['images']} images, accuracy {summary['accuracy']:.3f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if v is not None)
          + f"; report: {args.out / 'report.html'}")
    return 0

