"""What the summary head (service.summary_head) saves an Explain, in one process, A/B.

Two copies of the same repository load side by side: A without the head (the handler computes
softmax, top classes, entropy and the map statistics in numpy, as before the head), B with it.
Explain calls (the sample JPEG, float top-1 map) alternate between them with a pause as long
as a client's round trip in between, so both see the same machine; the figure is the median
over pairs of B's total over A's, and each stage's median beside it.

    .venv/bin/python benchmarks/summary_head_ab.py --pairs 600
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from xaiserve.service import bench_works as works
from xaiserve.service import model as served_model
from xaiserve.service.config import ServerSettings
from xaiserve.service.explain_service import ExplanationServicer, Stopwatch
from xaiserve.service.proto import xaiserve_pb2 as pb
from xaiserve.service.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"


def load(settings: ServerSettings, head: bool) -> tuple[ExplanationServicer, object]:
    """A repository whose models load with or without the summary head."""
    with_summary = served_model.with_summary
    if not head:  # the IR as exported: Summary.read then works from the logits in numpy
        served_model.with_summary = lambda model, *names: model
    try:
        repository = ModelRepository(settings)
        repository.refresh(wait=True)
    finally:
        served_model.with_summary = with_summary
    return ExplanationServicer(repository, settings), repository.state(MODEL, "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "bench-out/serving_speed_repo",
                        help="holds efficientnet_lite0 (benchmarks/serving_speed.py makes it)")
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50, help="pairs left out of the figures")
    parser.add_argument("--pause-ms", type=float, default=3.0, help="between calls")
    args = parser.parse_args()
    if not (args.repository / MODEL).is_dir():
        print(f"{args.repository / MODEL}: not there; run benchmarks/serving_speed.py once",
              file=sys.stderr)
        return 2
    settings = ServerSettings(repository=args.repository)
    variants = {"A (numpy)": load(settings, head=False), "B (head)": load(settings, head=True)}
    jpeg, _ = works.sample_jpeg(224)
    request = pb.ExplainRequest(model_name=MODEL, image=pb.Image(encoded=jpeg),
                                map_format=pb.MAP_FORMAT_FLOAT)
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(args.warmup + args.pairs):
        for name in names if i % 2 else names[::-1]:
            servicer, state = variants[name]
            watch = Stopwatch()
            servicer._explain(request, state, watch)
            if i >= args.warmup:
                timings[name].append(watch.total())
            time.sleep(args.pause_ms / 1e3)
    for name, rows in timings.items():
        stages = " ".join(f"{stage} {statistics.median(r[stage] for r in rows):.3f}"
                          for stage in rows[0])
        print(f"{name}: {stages} (ms, medians)")
    a, b = (timings[name] for name in names)
    ratio = statistics.median(y["total"] / x["total"] for x, y in zip(a, b))
    saved = statistics.median(x["total"] for x in a) - statistics.median(y["total"] for y in b)
    print(f"B / A total: {ratio:.4f} (median over {len(a)} pairs); medians differ by "
          f"{saved:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
