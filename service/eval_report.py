"""The evaluation report: numbers a machine reads (JSON, CSV) and a page a person reads (HTML
with PNG figures beside it, linked by relative paths so the folder can be moved or served)."""

from __future__ import annotations

import csv
import html
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from . import atomic_file, json_values
from .dataset import DatasetItem, load_ground_truth, load_image
from .evaluation import GridGame, ImageResult
from .explanation_quality import saliency_on_image
from .model_info import ModelInfo
from .overlay import overlay, write_png

SHARED_INTEREST = ("iou", "gtc", "sc", "sc_mass")
FAITHFULNESS_HIGHER = {"insertion_auc": True, "deletion_auc": False}
TILE = 192  # overlay tiles are at least this wide so the legend stays readable
PER_GRID = 8


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def _numeric_columns(rows: list[dict]) -> list[str]:
    skip = {"label", "predicted"}
    return [k for k, v in rows[0].items()
            if k not in skip and any(isinstance(r.get(k), (int, float)) and
                                     not isinstance(r.get(k), bool) for r in rows)]


def summarise(results: list[ImageResult], game: GridGame | None, settings: dict,
              model: dict) -> dict:
    rows = [r.row for r in results]
    numeric = _numeric_columns(rows)
    per_class = {}
    for name in dict.fromkeys(r["class_name"] for r in rows):
        mine = [r for r in rows if r["class_name"] == name]
        per_class[name] = {"images": len(mine), "label": mine[0]["label"],
                           "accuracy": _mean(r["correct"] for r in mine),
                           "pointing_game": _mean(r["pointing_hit"] for r in mine),
                           **{k: _mean(r.get(k) for r in mine) for k in numeric}}
    curves = {}
    for name in results[0].curves if results else []:
        stacked = np.asarray([r.curves[name] for r in results], np.float64)
        curves[name] = stacked.mean(axis=0).tolist()
    return {
        "model": model,
        "images": len(rows),
        "accuracy": _mean(r["correct"] for r in rows),
        "with_ground_truth": sum(r["iou"] is not None for r in rows),
        "pointing_game": _mean(r["pointing_hit"] for r in rows),
        "means": {k: _mean(r.get(k) for r in rows) for k in numeric},
        "patterns": dict(Counter(r["pattern"] for r in rows if r["pattern"])),
        "cases": dict(Counter(r["case"] for r in rows)),
        "per_class": per_class,
        "mean_curves": curves,
        "grid_pointing_game": None if game is None else {
            "mosaics": len(game.mosaics), "methods": game.summary()},
        "settings": settings,
    }


# --- pictures ---------------------------------------------------------------------------------

def _tile(image: np.ndarray, saliency: np.ndarray, truth: np.ndarray | None,
          legend: list[str]) -> np.ndarray:
    """The image at TILE pixels wide (small images enlarged without blur), its map over it, the
    ground truth outlined in white and the legend below."""
    scale = TILE / image.shape[1]
    size = (TILE, max(1, round(image.shape[0] * scale)))
    big = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if scale >= 1
                     else cv2.INTER_AREA)
    picture = overlay(big, saliency, legend)
    if truth is not None:
        mask = cv2.resize(truth.astype(np.uint8), (big.shape[1], big.shape[0]),
                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (255, 255, 255), 2)
    return picture


def _grid(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    padded = [cv2.copyMakeBorder(t, 4, 4 + height - t.shape[0], 4, 4 + width - t.shape[1],
                                 cv2.BORDER_CONSTANT, value=(255, 255, 255)) for t in tiles]
    while len(padded) % columns and len(padded) > columns:
        padded.append(np.full_like(padded[0], 255))
    rows = [np.hstack(padded[i:i + columns]) for i in range(0, len(padded), columns)]
    return np.vstack(rows)


def overlay_grids(results: list[ImageResult], items: dict[str, DatasetItem], info: ModelInfo,
                  key: str, folder: Path) -> dict[str, str]:
    """One PNG per value of `key` (pattern or case): the first images of that group."""
    written = {}
    groups: dict[str, list[ImageResult]] = {}
    for r in results:
        if r.row.get(key):
            groups.setdefault(r.row[key], []).append(r)
    for group, members in sorted(groups.items()):
        tiles = []
        for r in members[:PER_GRID]:
            item = items[r.row["image"]]
            original = load_image(item)
            truth = load_ground_truth(item, *original.shape[:2])
            on_image = saliency_on_image(r.saliency, *original.shape[:2], info)
            legend = [r.row["image"][-28:],
                      f"{r.row['predicted_label']} {r.row['confidence']:.2f}"
                      + ("" if r.row["correct"] else f" (is {r.row['class_name']})")]
            if r.row.get("iou") is not None:
                legend.append(f"IoU {r.row['iou']:.2f} GTC {r.row['gtc']:.2f} SC {r.row['sc']:.2f}")
            tiles.append(_tile(original, on_image, truth, legend))
        path = folder / f"{key}_{group}.png"
        write_png(path, _grid(tiles))
        written[group] = path.name
    return written


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histograms(results: list[ImageResult], path: Path) -> bool:
    rows = [r.row for r in results if r.row.get("iou") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("gtc", "sc", "iou"),
                              ("Ground truth coverage (GTC)", "Saliency coverage (SC)", "IoU")):
        ax.hist([r[key] for r in rows], bins=20, range=(0, 1), color="#3b6ea8")
        ax.set_title(title)
        ax.set_xlabel(key)
        ax.set_ylabel("images")
    fig.tight_layout()
    with atomic_file.replacing(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return True


def curve_plot(curves: dict[str, list[float]], path: Path) -> bool:
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in curves.items():
        x = np.linspace(0, 1, len(values))
        ax.plot(x, values, label=f"{name} (AUC {np.trapezoid(values, x):.3f})")
    ax.set_xlabel("fraction of pixels deleted / inserted (most salient first)")
    ax.set_ylabel("softmax score of the predicted class")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Average deletion and insertion curves")
    fig.tight_layout()
    with atomic_file.replacing(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return True


def game_picture(game: GridGame, path: Path) -> bool:
    if not game.examples:
        return False
    tiles = []
    for example in game.examples:
        size = example["mosaic"].shape[0]
        for k, (saliency, target) in enumerate(zip(example["maps"], example["targets"])):
            tile = _tile(example["mosaic"], np.maximum(saliency, 0), None, [f"cell {k}: {target}"])
            scale = tile.shape[1] / size
            top, left = (k // 2) * size // 2, (k % 2) * size // 2
            cv2.rectangle(tile, (int(left * scale), int(top * scale)),
                          (int((left + size // 2) * scale) - 1, int((top + size // 2) * scale) - 1),
                          (255, 255, 255), 2)
            tiles.append(tile)
    write_png(path, _grid(tiles))
    return True


# --- files ------------------------------------------------------------------------------------

def write_tables(results: list[ImageResult], out: Path) -> None:
    atomic_file.write_text(out / "results.json", json_values.dumps(
        [{**r.row, "curves": r.curves} for r in results], indent=1) + "\n")
    columns = list(results[0].row)
    with atomic_file.replacing(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in results:
            writer.writerow({k: "" if r.row[k] is None else r.row[k] for k in columns})


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child{text-align:left}th{background:#eee}
img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:90%}"""


def write_html(summary: dict, figures: dict, out: Path) -> Path:
    s = summary
    means = s["means"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>xaiserve evaluate: "
             f"{html.escape(s['model']['name'])}</title><style>{STYLE}</style></head><body>",
             f"<h1>Explanation quality: {html.escape(s['model']['name'])}</h1>",
             f"<p>{s['images']} images, {s['with_ground_truth']} with ground truth; accuracy "
             f"{_fmt(s['accuracy'])}; saliency: "
             f"{html.escape(str(s['model'].get('saliency_method')))}"
             f"; maps of the predicted class.</p>",
             *([f"<p><b>Interrupted: {html.escape(s['interrupted'])}</b>; the figures cover "
                "the images evaluated before it.</p>"] if s.get("interrupted") else []),
             *([f"<p><b>{len(s['failed'])} images could not be read</b> (listed in "
                "summary.json): " + html.escape(", ".join(r["image"] for r in s["failed"][:10]))
                + "</p>"] if s.get("failed") else []),
             "<h2>Summary</h2>",
             _table(["metric", "mean"], [[k, v] for k, v in means.items()]
                    + [["pointing game (map maximum inside the ground truth)",
                        s["pointing_game"]]]),
             "<p class='note'>Shared Interest (Boggust et al. 2022): IoU, GTC = |G∩S|/|G|, "
             "SC = |G∩S|/|S|, sc_mass = saliency mass inside G. Deletion AUC: lower is better; "
             "insertion AUC: higher is better. Settings (binarisation, pattern cut-offs, "
             "faithfulness baseline and steps) are in summary.json.</p>"]
    if figures.get("histograms"):
        parts += ["<h2>GTC, SC and IoU</h2>", _img(figures["histograms"], "histograms")]
    if figures.get("curves"):
        parts += ["<h2>Deletion and insertion</h2>", _img(figures["curves"], "curves")]
    parts += ["<h2>Per class</h2>", _table(
        ["class", "id", "images", "accuracy", "IoU", "GTC", "SC", "pointing", "deletion AUC",
         "insertion AUC"],
        [[name, c["label"], c["images"], c["accuracy"], c.get("iou"), c.get("gtc"), c.get("sc"),
          c["pointing_game"], c.get("deletion_auc"), c.get("insertion_auc")]
         for name, c in s["per_class"].items()])]
    game = s.get("grid_pointing_game")
    parts.append("<h2>Grid pointing game</h2>")
    if game and game["mosaics"]:
        saliency = f"saliency_map ({s['model'].get('saliency_method')})"
        parts += [_table(["method", "mosaics", "targets", "score", "± sem", "above chance",
                          "chance"],
                         [[saliency if name == "saliency_map" else name, game["mosaics"],
                           g["n"], g["mean"], g["sem"], g["above_chance"], g["chance"]]
                          for name, g in game["methods"].items()]),
                  "<p class='note'>Score: the share of a map's positive mass inside the cell "
                  "of the class it explains (Rao et al. 2022). Pictures: the first method.</p>"]
        if figures.get("grid_game"):
            parts.append(_img(figures["grid_game"], "grid pointing game examples"))
    elif s.get("interrupted"):
        parts.append("<p>Not played: the run was interrupted.</p>")
    elif not s["settings"].get("grid_mosaics"):
        parts.append("<p>Not played: --grid-mosaics 0.</p>")
    else:
        parts.append("<p>Not played: it needs images of at least four classes.</p>")
    parts.append("<h2>Shared Interest patterns</h2>")
    parts.append(_table(["pattern", "images"], sorted(s["patterns"].items())))
    for pattern, src in figures.get("patterns", {}).items():
        parts += [f"<h3>{html.escape(pattern)}</h3>", _img(src, pattern)]
    parts.append("<h2>Prediction cases</h2>")
    parts.append(_table(["case", "images"], sorted(s["cases"].items())))
    for case, src in figures.get("cases", {}).items():
        parts += [f"<h3>{html.escape(case.replace('_', ' '))}</h3>", _img(src, case)]
    parts.append("<p class='note'>White outline: ground truth. Every per-image number: "
                 "<a href='results.csv'>results.csv</a>, <a href='results.json'>results.json</a>;"
                 " the summary: <a href='summary.json'>summary.json</a>.</p></body></html>")
    path = out / "report.html"
    atomic_file.write_text(path, "\n".join(parts) + "\n")
    return path


def write_report(results: list[ImageResult], items: list[DatasetItem], game: GridGame | None,
                 info: ModelInfo, model: dict, settings: dict, out: Path,
                 interrupted: str = "") -> dict:
    """All files of the report into `out`; returns the summary. Rows with an `error` (images
    that could not be read) are listed in the summary, not averaged. `interrupted` says why
    the results cover only part of the data set."""
    failed = [r.row for r in results if "error" in r.row]
    results = [r for r in results if "error" not in r.row]
    out.mkdir(parents=True, exist_ok=True)
    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    for stale in figures_dir.glob("*.png"):  # an earlier run's into the same --out
        stale.unlink()
    summary = {**summarise(results, game, settings, model), "failed": failed,
               "interrupted": interrupted or None}
    by_id = {item.relative: item for item in items}
    figures: dict = {}
    if histograms(results, figures_dir / "histograms.png"):
        figures["histograms"] = "figures/histograms.png"
    if curve_plot(summary["mean_curves"], figures_dir / "curves.png"):
        figures["curves"] = "figures/curves.png"
    if game is not None and game_picture(game, figures_dir / "grid_game.png"):
        figures["grid_game"] = "figures/grid_game.png"
    figures["patterns"] = {k: f"figures/{v}" for k, v in
                           overlay_grids(results, by_id, info, "pattern", figures_dir).items()}
    figures["cases"] = {k: f"figures/{v}" for k, v in
                        overlay_grids(results, by_id, info, "case", figures_dir).items()}
    summary["figures"] = figures
    write_tables(results, out)
    atomic_file.write_text(out / "summary.json", json_values.dumps(summary, indent=2) + "\n")
    write_html(summary, figures, out)
    return summary
