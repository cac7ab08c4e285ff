"""Grid pointing game (Rao, Boehle, Schiele, CVPR 2022) for the default model's saliency maps.

Why this benchmark: a saliency map is only useful if it points at the evidence for the class it
explains. The grid pointing game makes that measurable without box annotations: four photos with
four different top-1 classes are tiled into a 2x2 mosaic, each photo's class is explained in turn,
and the score is the share of the map's positive mass that falls inside the photo of that class
(0.25 for a uniform map, 1.0 for a perfect one).

What is compared, all on the same ImageNet EfficientNet-Lite0 and the same mosaics:

* Grad-CAM in torch (gradient of the target logit w.r.t. the output of the last conv block's
  batch norm, before its ReLU6) - the project's reference.
* CAM in torch (the FC weights of the target class applied to the last feature map).
* The exported OpenVINO IR with several `SaliencySettings`: the default, the plain ReciproCAM of
  the paper and openvino-xai (score=logit, mosaic=paper), and the other score / mosaic / spread /
  normalisation choices.
* Prototypes: post-processings in numpy of the IR's raw per-location logits (exported with
  score=logit, normalize=none), to find which zero point and normalisation localise best before
  building one into the graph.

Run:  python benchmarks/grid_pointing_game.py [--mosaics 60] [--out bench-out/x.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from xaiserve.service import grid_pointing_game as gpg

CELL = 112
SIZE = 2 * CELL
# Cells in reading order: (top, left) of each 112x112 photo in the 224x224 mosaic.
CELL_ORIGINS = gpg.cell_origins(CELL, 2)

MapFn = Callable[[np.ndarray, list[int]], np.ndarray]  # (mosaic u8 [224,224,3], classes) -> maps


# --- photos and mosaics -----------------------------------------------------------------------

def _rgb(image: np.ndarray) -> np.ndarray:
    """Gray or RGBA -> RGB u8: the sample photos come in all three forms."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def load_photos() -> dict[str, np.ndarray]:
    """Real photographs that ship inside installed packages (nothing is downloaded).

    Textures, microscopy and drawings in skimage.data are left out on purpose: their top-1
    ImageNet class is noise, so "pointing at the class" would not mean anything."""
    import matplotlib.cbook
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_image

    motorcycle = (sk.motorcycle_left() if hasattr(sk, "motorcycle_left")
                  else sk.stereo_motorcycle()[0])
    photos = {
        "chelsea": sk.chelsea(),
        "coffee": sk.coffee(),
        "astronaut": sk.astronaut(),
        "rocket": sk.rocket(),
        "motorcycle": motorcycle,
        "camera": sk.camera(),
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = np.asarray(Image.open(handle))
    return {name: _rgb(image) for name, image in photos.items()}


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Stretch to size x size (the model's `standard` resize); INTER_AREA because every photo is
    shrunk, and area averaging does not alias fine texture the way bilinear sampling does."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def distinct_photos(photos: dict[str, np.ndarray], top1: dict[str, int]) -> list[str]:
    """Keep the first photo of every top-1 class: two photos of one class in a mosaic would make
    the cell to point at ambiguous."""
    kept: list[str] = []
    seen: set[int] = set()
    for name in photos:
        if top1[name] not in seen:
            seen.add(top1[name])
            kept.append(name)
    return kept


def choose_mosaics(names: list[str], count: int, seed: int) -> list[tuple[str, ...]]:
    """`count` distinct ordered 4-tuples of distinct photos (the library's, 2x2)."""
    return gpg.choose_mosaics(names, count, seed, n=2)


def build_mosaic(cells: list[np.ndarray]) -> np.ndarray:
    """Four 112x112 RGB cells -> one 224x224 mosaic in reading order."""
    return gpg.build_mosaic(cells, n=2)


# --- the score --------------------------------------------------------------------------------

def upsample(saliency: np.ndarray) -> np.ndarray:
    """[h, w] map -> [224, 224], bilinear (half-pixel centres, as torch align_corners=False)."""
    return cv2.resize(saliency.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def grid_score(saliency: np.ndarray, cell: int) -> float:
    """Positive mass inside `cell` / total positive mass (the library's, see
    xaiserve.service.grid_pointing_game.grid_score)."""
    return gpg.grid_score(saliency, cell, SIZE, n=2)


# --- torch methods ----------------------------------------------------------------------------

def torch_input(images: np.ndarray, mean: float, scale: float):
    """u8 NHWC -> the float NCHW tensor the IR computes internally ((x - 127) / 128)."""
    import torch

    x = (images.astype(np.float32) - mean) / scale
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _features(module, x):
    """(pre-activation output of the last conv block's BN, post-ReLU6 features, logits)."""
    import torch

    net = module.net
    captured: dict[str, torch.Tensor] = {}

    def keep(_, __, output):
        captured["pre"] = output

    handle = net._bn1.register_forward_hook(keep)
    try:
        post = net.extract_features(x)
    finally:
        handle.remove()
    logits = net._fc(torch.flatten(post.mean((2, 3)), 1))
    return captured["pre"], post, logits


def gradcam_fn(module, mean: float, scale: float, layer: str = "pre") -> MapFn:
    """Grad-CAM: ReLU(sum_k a_k A_k), a_k = spatial mean of d logit_c / d A_k.

    `layer="pre"` takes A = output of `_bn1` (before ReLU6), as the project's reference does;
    `"post"` takes the features after ReLU6 (what most Grad-CAM libraries hook), for comparison."""
    import torch

    def maps(mosaic: np.ndarray, classes: list[int]) -> np.ndarray:
        x = torch_input(mosaic[None], mean, scale)
        out = []
        with torch.enable_grad():
            pre, post, logits = _features(module, x)
            activ = pre if layer == "pre" else post
            for c in classes:
                # autograd.grad walks back only as far as `activ`, not through the trunk.
                (grad,) = torch.autograd.grad(logits[0, c], activ, retain_graph=True)
                weights = grad[0].mean((1, 2))  # [C]
                cam = torch.relu((weights[:, None, None] * activ[0]).sum(0))
                out.append(cam.detach().numpy())
        return np.stack(out)

    return maps


def cam_fn(module, mean: float, scale: float) -> MapFn:
    """CAM (Zhou et al. 2016): w_c . A at every location, A = the features the GAP+FC head
    pools. Exact for this head: the logit is the spatial mean of this map plus the bias."""
    import torch

    weight = module.net._fc.weight.detach()

    def maps(mosaic: np.ndarray, classes: list[int]) -> np.ndarray:
        with torch.no_grad():
            post = module.net.extract_features(torch_input(mosaic[None], mean, scale))[0]
            return torch.einsum("kc,chw->khw", weight[classes], post).numpy()

    return maps


def mean_centred(fn: MapFn) -> MapFn:
    """The same maps with each map's spatial mean as the zero point. Applied to the torch
    baselines too, so a gain from re-centring our maps is not credited to the method alone."""
    def maps(mosaic: np.ndarray, classes: list[int]) -> np.ndarray:
        m = fn(mosaic, classes)
        return m - m.mean(axis=(1, 2), keepdims=True)

    return maps


# --- the IR -----------------------------------------------------------------------------------

@dataclass
class Exported:
    """One exported IR, compiled in f32 (the CPU would otherwise infer in bf16)."""

    settings: object
    compiled: object
    _last: tuple[bytes, dict[str, np.ndarray]] | None = None

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Infer, remembering the last input: the prototypes post-process one IR's output in
        several ways, and inferring it again for each would dominate the run time."""
        key = images.tobytes()
        if self._last is None or self._last[0] != key:
            result = self.compiled(images)
            self._last = (key, {"logits": result["logits"].copy(),
                                "saliency_map": result["saliency_map"].copy()})
        return self._last[1]


def export_ir(settings, repository: Path, name: str) -> Exported:
    """Export through the product path (`export_model`) so the benchmark measures what ships."""
    from xaiserve.export.parity import compile_f32
    from xaiserve.export.pipeline import ExportRequest, export_model

    result = export_model(ExportRequest("default", repository, name, saliency=settings))
    import openvino as ov

    return Exported(settings, compile_f32(ov.Core().read_model(str(result.path / "model.xml"))))


def ir_fn(exported: Exported, post: Callable[[np.ndarray, int], np.ndarray] | None = None
          ) -> MapFn:
    """Maps of the target classes from the IR's `saliency_map`, optionally post-processed from
    the full [1000, h, w] per-location scores (for prototypes)."""
    def maps(mosaic: np.ndarray, classes: list[int]) -> np.ndarray:
        saliency = exported.run(mosaic[None])["saliency_map"][0]  # [K, h, w]
        if post is None:
            return saliency[classes]
        return np.stack([post(saliency, c) for c in classes])

    return maps


# --- prototypes: post-processing the raw per-location logits ----------------------------------

def _softmax(raw: np.ndarray) -> np.ndarray:
    shifted = raw - raw.max(axis=0, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=0, keepdims=True)


def _minmax(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / max(float(m.max() - m.min()), 1e-12)


def prototypes(bias: np.ndarray) -> dict[str, Callable[[np.ndarray, int], np.ndarray]]:
    """Candidate formulations on raw logits [K, h, w] of the masked copies -> map of class c.

    They differ in the zero point, which is what the pointing game (and a user's eye on a
    heat map) reads as "evidence here":
    * logit_minmax / softmax_minmax: the IR's own options, recomputed (a consistency check).
    * softmax_raw: probabilities, zero = "this location alone says nothing for c".
    * logit_minus_empty: logit of the copy minus the logit of an all-zero copy (the head's bias
      for a GAP+FC head), i.e. the evidence the kept location adds; equals CAM for the local
      mosaic without spread.
    * logit_minus_empty_minmax_by_max: the same scaled to max 1 (keeps the zero point).
    * logit_minus_mean: zero at the map's mean (relative evidence, no baseline needed).
    * log_odds: log p_c / (1 - p_c), zero where the location alone gives c even odds.
    * softmax_minus_mean: probabilities with the map's mean as the zero point.
    """
    def logit_minus_empty(raw: np.ndarray, c: int) -> np.ndarray:
        return raw[c] - bias[c]

    def log_odds(raw: np.ndarray, c: int) -> np.ndarray:
        others = np.delete(raw, c, axis=0)
        top = others.max(axis=0)
        lse = top + np.log(np.exp(others - top).sum(axis=0))
        return raw[c] - lse

    return {
        "logit_minmax": lambda raw, c: _minmax(raw[c]),
        "softmax_minmax": lambda raw, c: _minmax(_softmax(raw)[c]),
        "softmax_raw": lambda raw, c: _softmax(raw)[c],
        "softmax_minus_mean": lambda raw, c: _softmax(raw)[c] - _softmax(raw)[c].mean(),
        "logit_minus_empty": logit_minus_empty,
        "logit_minus_empty_maxnorm": lambda raw, c: (
            logit_minus_empty(raw, c) / max(float(logit_minus_empty(raw, c).max()), 1e-12)),
        "logit_minus_mean": lambda raw, c: raw[c] - raw[c].mean(),
        "log_odds": log_odds,
    }


# --- running the game -------------------------------------------------------------------------

def evaluate(methods: dict[str, MapFn], mosaics: list[tuple[str, ...]],
             cells: dict[str, np.ndarray], top1: dict[str, int]
             ) -> tuple[dict[str, list[float]], dict[str, dict[str, np.ndarray]]]:
    """Score every method on every (mosaic, target cell); keep the maps of the first mosaics
    for the overlay figure."""
    scores: dict[str, list[float]] = {name: [] for name in methods}
    kept: dict[str, dict[str, np.ndarray]] = {}
    for index, names in enumerate(mosaics):
        mosaic = build_mosaic([cells[n] for n in names])
        classes = [top1[n] for n in names]
        for method, fn in methods.items():
            maps = fn(mosaic, classes)
            scores[method].extend(grid_score(maps[i], i) for i in range(4))
            if index < 3:
                kept.setdefault(str(index), {"mosaic": mosaic})[method] = maps
    return scores, kept


def summarise(scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Mean, standard error and the share of targets where the method beats chance."""
    table = {}
    for name, values in scores.items():
        v = np.asarray(values)
        table[name] = {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(len(v))),
                       "above_chance": float((v > 0.25).mean()), "n": int(len(v))}
    return table


def paired_gap(scores: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """Mean of a - b over the same targets with its standard error: the two methods see the same
    mosaics, so the paired difference is far more precise than comparing two means."""
    d = np.asarray(scores[a]) - np.asarray(scores[b])
    return {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(len(d))),
            "wins": float((d > 0).mean()), "losses": float((d < 0).mean())}


def per_photo(scores: dict[str, list[float]], mosaics: list[tuple[str, ...]],
              names: list[str]) -> dict[str, dict[str, float]]:
    """Mean score per target photo: weakly classified photos (low top-1 probability) pull every
    method down, and this shows whether a method's gain is broad or comes from a few photos."""
    targets = [n for m in mosaics for n in m]
    present = [n for n in names if n in targets]  # a short run may leave a photo out
    return {method: {n: float(np.mean([v for v, t in zip(values, targets) if t == n]))
                     for n in present} for method, values in scores.items()}


def print_table(table: dict[str, dict[str, float]], reference: str) -> None:
    ref = table[reference]["mean"]
    print(f"{'method':52s} {'mean':>6s} {'±sem':>6s} {'>0.25':>6s} {'vs ' + reference:>12s}")
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:52s} {row['mean']:6.3f} {row['sem']:6.3f} {row['above_chance']:6.2f} "
              f"{row['mean'] - ref:+12.3f}")


def plot_examples(kept: dict[str, dict[str, np.ndarray]], methods: list[str],
                  mosaics: list[tuple[str, ...]], labels: list[str], top1: dict[str, int],
                  path: Path) -> None:
    """Overlays for the first mosaics, one target cell each, so a reader can see what a score
    of 0.5 or 0.9 looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(kept, key=int)
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(2.6 * len(methods), 2.9 * len(rows)),
                             squeeze=False)
    for r, key in enumerate(rows):
        target = r % 4
        top, left = CELL_ORIGINS[target]
        name = mosaics[int(key)][target]
        for col, method in enumerate(methods):
            ax = axes[r][col]
            saliency = np.maximum(upsample(kept[key][method][target]), 0.0)
            ax.imshow(kept[key]["mosaic"])
            ax.imshow(saliency / max(float(saliency.max()), 1e-12), cmap="jet", alpha=0.5,
                      vmin=0, vmax=1)
            ax.add_patch(plt.Rectangle((left, top), CELL, CELL, fill=False, ec="white", lw=2))
            score = grid_score(kept[key][method][target], target)
            title = textwrap.fill(method, 30)
            ax.set_title(f"{title}\n{labels[top1[name]]}: {score:.2f}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------

def ir_variants():
    """The SaliencySettings compared through the IR, by display name."""
    from xaiserve.export.saliency import SaliencySettings as S

    return {
        DEFAULT: S(),
        "ir default with the f32 product": S(map_precision="f32"),
        "ir paper ReciproCAM (logit, paper, gaussian, minmax)": S(score="logit", mosaic="paper",
                                                                   normalize="minmax"),
        "ir softmax, local, gaussian, minmax": S(score="softmax", normalize="minmax"),
        "ir softmax, local, gaussian, centred": S(score="softmax"),
        "ir softmax, paper, gaussian, minmax": S(score="softmax", mosaic="paper",
                                                 normalize="minmax"),
        "ir logit, local, gaussian, minmax": S(normalize="minmax"),
        "ir logit, local, none, centred": S(spread="none"),
    }


def raw_variants():
    """Raw-logit exports (score=logit, normalize=none) that the prototypes post-process."""
    from xaiserve.export.saliency import SaliencySettings as S

    return {f"{mosaic}, {spread}": S(score="logit", mosaic=mosaic, spread=spread, normalize="none")
            for mosaic in ("local", "paper") for spread in ("gaussian", "none")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mosaics", type=int, default=60, help="number of 2x2 mosaics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/grid_pointing_game.json"))
    parser.add_argument("--png", type=Path, default=None,
                        help="example overlays (default: next to --out, .png)")
    parser.add_argument("--no-prototypes", action="store_true",
                        help="skip the raw-logit exports and their numpy post-processings")
    return parser.parse_args()


REFERENCE = "gradcam (torch, bn1 pre-activation)"
REFERENCE_CENTRED = REFERENCE + " - mean"
DEFAULT = "ir default (logit, local, gaussian, centred; int8 product)"
PAPER = "ir paper ReciproCAM (logit, paper, gaussian, minmax)"


@dataclass
class PhotoSet:
    """The photos kept for the game, their classes on their own, and their 112x112 cells."""

    names: list[str]
    top1: dict[str, int]
    prob: dict[str, float]
    dropped: list[str]
    cells: dict[str, np.ndarray]


def classify_photos(exported: Exported) -> PhotoSet:
    """Top-1 class of each full photo through the IR, the target each cell is explained for."""
    photos = load_photos()
    logits = exported.run(np.stack([resize(p, SIZE) for p in photos.values()]))["logits"]
    probs = _softmax(logits.T).T
    top1 = {n: int(logits[i].argmax()) for i, n in enumerate(photos)}
    prob = {n: float(probs[i, top1[n]]) for i, n in enumerate(photos)}
    names = distinct_photos(photos, top1)
    return PhotoSet(names, top1, prob, [n for n in photos if n not in names],
                    {n: resize(photos[n], CELL) for n in names})


def build_methods(module, mean: float, scale: float, exports: dict[str, Exported],
                  raws: dict[str, Exported]) -> dict[str, MapFn]:
    """Every compared method by display name: torch baselines, IR variants, prototypes."""
    methods: dict[str, MapFn] = {
        REFERENCE: gradcam_fn(module, mean, scale, "pre"),
        "gradcam (torch, post-ReLU6)": gradcam_fn(module, mean, scale, "post"),
        "cam (torch)": cam_fn(module, mean, scale),
        REFERENCE_CENTRED: mean_centred(gradcam_fn(module, mean, scale, "pre")),
    }
    methods.update({name: ir_fn(e) for name, e in exports.items()})
    bias = module.net._fc.bias.detach().numpy()
    for raw_name, exported in raws.items():
        for post_name, post in prototypes(bias).items():
            methods[f"proto {post_name} [{raw_name}]"] = ir_fn(exported, post)
    return methods


def report(scores: dict[str, list[float]], mosaics: list[tuple[str, ...]], photos: PhotoSet,
           labels: list[str]) -> dict:
    """Print the table, the paired gaps that decide the target, and the per-photo breakdown."""
    print(f"{len(mosaics)} mosaics x 4 targets = {len(mosaics) * 4} targets; photos:")
    for n in photos.names:
        print(f"  {n:14s} -> {labels[photos.top1[n]]} (p={photos.prob[n]:.2f})")
    print()
    table = summarise(scores)
    print_table(table, REFERENCE)
    best = max(table, key=lambda k: table[k]["mean"])
    gaps = {m: paired_gap(scores, m, REFERENCE) for m in scores if m != REFERENCE}
    print()
    for method in dict.fromkeys([DEFAULT, best]):
        for ref in (REFERENCE, REFERENCE_CENTRED):
            if method != ref:
                g = paired_gap(scores, method, ref)
                print(f"{method} - {ref} (paired): {g['mean']:+.3f} ± {g['sem']:.3f}, "
                      f"wins {g['wins']:.2f}, losses {g['losses']:.2f}")
    breakdown = per_photo(scores, mosaics, photos.names)
    shown = list(dict.fromkeys([REFERENCE, DEFAULT, PAPER, best]))
    print("\nper target photo:", " | ".join(f"[{i}] {m}" for i, m in enumerate(shown)))
    for n in breakdown[REFERENCE]:
        print(f"  {n:14s} " + " ".join(f"{breakdown[m][n]:6.3f}" for m in shown))
    return {"results": table, "best": best, "paired_vs_reference": gaps, "per_photo": breakdown}


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")  # torch.jit.trace deprecation noise from the export
    started = time.perf_counter()
    import torch

    # OpenVINO's CPU threads stay busy between calls; torch competing with them for the same
    # few cores ran 4-5x slower than torch on one thread.
    torch.set_num_threads(1)
    from xaiserve.export.sources import create_source

    source = create_source("default")
    module, info = source.torch_module, source.info
    mean, scale = float(info.mean_values[0]), float(info.scale_values[0])

    with tempfile.TemporaryDirectory() as tmp:
        exports = {name: export_ir(s, Path(tmp), f"v{i}")
                   for i, (name, s) in enumerate(ir_variants().items())}
        raws = {} if args.no_prototypes else {
            name: export_ir(s, Path(tmp), f"raw{i}")
            for i, (name, s) in enumerate(raw_variants().items())}
        export_s = time.perf_counter() - started
        photos = classify_photos(exports[DEFAULT])
        mosaics = choose_mosaics(photos.names, args.mosaics, args.seed)
        methods = build_methods(module, mean, scale, exports, raws)
        scores, kept = evaluate(methods, mosaics, photos.cells, photos.top1)

    summary = report(scores, mosaics, photos, info.labels)
    png = args.png or args.out.with_suffix(".png")
    figure_methods = list(dict.fromkeys([REFERENCE, "cam (torch)", DEFAULT, PAPER,
                                         summary["best"]]))
    plot_examples(kept, figure_methods, mosaics, info.labels, photos.top1, png)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "grid pointing game (Rao, Boehle, Schiele, CVPR 2022), 2x2 mosaics",
        "model": source.description,
        "cell": CELL, "mosaic_size": SIZE, "chance": 0.25, "seed": args.seed,
        "photos": {n: {"top1": photos.top1[n], "label": info.labels[photos.top1[n]],
                       "p": photos.prob[n]} for n in photos.names},
        "dropped_photos": photos.dropped,
        "mosaics": [list(m) for m in mosaics],
        "reference": REFERENCE,
        "default": DEFAULT,
        "ir_settings": {n: e.settings.as_dict() for n, e in exports.items()},
        **summary,
        "per_target_scores": scores,
        "export_s": round(export_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "figure": str(png),
    }, indent=2) + "\n")
    print(f"\nwrote {args.out} and {png} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
