"""One figure of `serving_speed.py` pooled over several runs, with its uncertainty.

On this machine benchmark_app's own latency p50 moves between about 7 and 11 ms from one minute
to the next, so one run's median of 15 round ratios wanders by +-0.06 around where the figure
lies. Pooling the rounds of several runs (each round a ratio measured against benchmark_app
beside it) gives a steadier median; resampling whole runs (a block bootstrap: rounds of one run
share the machine's state, so they are not independent) gives the interval that a target
should be judged by.

    python benchmarks/pooled_ratio.py out/run1.json out/run2.json ... \
        [--figure "explain p50, float"] [--target 1.4]
    python benchmarks/pooled_ratio.py out/run*.json --figure "predict FPS, 8 clients" \
        --target 0.85 --at-least
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MIN_RUNS = 5  # with fewer, resampling runs says little about the spread between them


def round_ratios(path: Path, figure: str) -> list[float]:
    """The per-round ratios of the summary row whose name ends with `figure`."""
    summary = json.loads(path.read_text())["summary"]
    rows = [row for row in summary if row["figure"].endswith(figure)]
    if not rows:
        raise SystemExit(f"{path}: no figure ending with {figure!r} "
                         f"(there are: {', '.join(r['figure'] for r in summary)})")
    return rows[0]["rounds_ratio"]


def block_bootstrap(runs: list[list[float]], draws: int = 10_000, seed: int = 0) -> np.ndarray:
    """Medians of the pooled rounds of `len(runs)` runs drawn with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(runs), (draws, len(runs)))
    return np.array([np.median(np.concatenate([runs[i] for i in pick])) for pick in picks])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="serving_speed.py JSON files")
    parser.add_argument("--figure", default="explain p50, float")
    parser.add_argument("--target", type=float, default=1.4)
    parser.add_argument("--at-least", action="store_true",
                        help="the target is a floor (default: a ceiling)")
    args = parser.parse_args(argv)

    runs = [round_ratios(path, args.figure) for path in args.runs]
    run_medians = np.array([np.median(ratios) for ratios in runs])
    for path, ratios, median in zip(args.runs, runs, run_medians):
        print(f"{str(path):50s} {len(ratios):3d} rounds, median {median:.3f}")
    sign = ">=" if args.at_least else "<="

    def meets(values):
        return values >= args.target if args.at_least else values <= args.target

    pooled = np.concatenate(runs)
    low, high = np.percentile(block_bootstrap(runs), [2.5, 97.5])
    print(f"pooled: {len(pooled)} rounds of {len(runs)} runs, median {np.median(pooled):.3f}, "
          f"95% interval over runs {low:.3f} to {high:.3f}; {meets(pooled).mean():.0%} of "
          f"rounds and {meets(run_medians).mean():.0%} of runs {sign} {args.target}")
    bound = low if args.at_least else high
    verdict = ("too few runs to judge" if len(runs) < MIN_RUNS
               else "met" if meets(bound) else "not shown")
    print(f"target {sign} {args.target}: {verdict} (the interval's "
          f"{'lower' if args.at_least else 'upper'} end is {bound:.3f}; {MIN_RUNS} runs or more "
          "are needed to judge)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
