"""`xaiserve evaluate` on a synthetic data set whose truth is known, with a model trained on it:
the report's numbers against direct computation, the server path, Ray, and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, wait_for
from tests.synthetic import CLASSES4, make_dataset, train_small_cnn, write_image_folder
from xaiserve.service.dataset import DatasetError, class_ids, scan_dataset
from xaiserve.service.faithfulness import FaithfulnessSettings, deletion_insertion, single_step
from xaiserve.service.interrupts import interrupts_deferred
from xaiserve.service.model import ClassifierModel
from xaiserve.service.request_metrics import softmax

COUNT = 24
SEED = 321  # held out from the training seed
STEPS = 32  # deletion/insertion steps: fewer than the 256 map cells, to keep the test short


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A four-class shapes model exported by the CLI, and a data set folder: masks beside most
    images, boxes.json for two, and one image with no ground truth."""
    import torch

    work = tmp_path_factory.mktemp("evaluate")
    torch.save(train_small_cnn(classes=CLASSES4).state_dict(), work / "cnn.pth")
    (work / "labels.txt").write_text("\n".join(CLASSES4) + "\n")
    result = run_cli("export", "torch:tests.synthetic:small_cnn4", "--checkpoint",
                     str(work / "cnn.pth"), "--input-size", "64", "--mean", "0,0,0", "--scale",
                     "255,255,255", "--labels", str(work / "labels.txt"), "--repository",
                     str(work / "models"), "--name", "shapes")
    assert result.returncode == 0, result.stderr
    images, labels, masks = make_dataset(COUNT, SEED, CLASSES4)
    data = work / "data"
    write_image_folder(data, images, labels, masks, CLASSES4)
    # Two images get boxes instead of masks (the box around the object), one gets nothing.
    boxes = {}
    for i in (0, 1):
        (data / CLASSES4[labels[i]] / f"img_{i:03d}.mask.png").unlink()
        ys, xs = np.nonzero(masks[i])
        boxes[f"{CLASSES4[labels[i]]}/img_{i:03d}.png"] = [[int(xs.min()), int(ys.min()),
                                                           int(xs.max()) + 1, int(ys.max()) + 1]]
        masks[i] = False
        masks[i][ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    (data / "boxes.json").write_text(json.dumps(boxes))
    (data / CLASSES4[labels[2]] / "img_002.mask.png").unlink()
    masks[2] = False
    return {"work": work, "data": data, "model": work / "models" / "shapes",
            "images": images, "labels": labels, "masks": masks}


@pytest.fixture(scope="module")
def report(shapes):
    out = shapes["work"] / "report"
    result = run_cli("evaluate", str(shapes["data"]), "--model-path", str(shapes["model"]),
                     "--out", str(out), "--grid-mosaics", "12", "--grid-methods",
                     "saliency_map,rise", "--batch-size", "5",
                     "--steps", str(STEPS))
    assert result.returncode == 0, result.stderr
    assert "evaluate: 100%" in result.stderr  # the progress bar
    return out


def _by_image(shapes) -> dict[str, int]:
    return {f"{CLASSES4[label]}/img_{i:03d}.png": i for i, label in enumerate(shapes["labels"])}


def _iou_by_hand(saliency: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Shared Interest with the authors' default binarisation, written out independently."""
    s = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    selected = s >= s.mean() + s.std()
    both = (selected & truth).sum()
    return both / (selected | truth).sum(), both / truth.sum(), both / selected.sum()


def test_report_numbers_match_direct_computation(shapes, report):
    rows = json.loads((report / "results.json").read_text())
    assert len(rows) == COUNT
    model = ClassifierModel(shapes["model"] / "1").load()
    out = model.predict(shapes["images"])
    probs = softmax(out["logits"].astype(np.float64))
    index = _by_image(shapes)
    settings = FaithfulnessSettings(steps=STEPS)

    def score_fn(batch):
        return softmax(model.predict(batch, ("logits",))["logits"].astype(np.float64))

    for row in rows:
        i = index[row["image"]]
        predicted = int(probs[i].argmax())
        assert row["label"] == int(shapes["labels"][i])
        assert row["predicted"] == predicted
        assert row["confidence"] == pytest.approx(probs[i].max(), abs=1e-6)
        saliency = out["saliency_map"][i, predicted]
        dense = cv2.resize(saliency, (64, 64), interpolation=cv2.INTER_LINEAR)
        if i == 2:
            assert row["ground_truth"] == "none" and row["iou"] is None
        else:
            assert row["ground_truth"] == ("boxes" if i < 2 else "mask")
            iou, gtc, sc = _iou_by_hand(dense.astype(np.float64), shapes["masks"][i])
            assert (row["iou"], row["gtc"], row["sc"]) == pytest.approx((iou, gtc, sc), abs=1e-6)
            y, x = np.unravel_index(np.argmax(dense), dense.shape)
            assert row["pointing_hit"] == bool(shapes["masks"][i][y, x])
        if i < 6:  # the perturbation metrics on a few images
            curve = deletion_insertion(shapes["images"][i], saliency, predicted, score_fn,
                                       "deletion", settings)
            assert row["deletion_auc"] == pytest.approx(curve.auc, abs=1e-6)
            assert curve.scores[0] == pytest.approx(probs[i, predicted], abs=1e-6)
            insertion = deletion_insertion(shapes["images"][i], saliency, predicted, score_fn,
                                           "insertion", settings)
            assert row["insertion_auc"] == pytest.approx(insertion.auc, abs=1e-6)
            single = single_step(shapes["images"][i], saliency, predicted, score_fn, settings)
            assert row["average_drop"] == pytest.approx(single.average_drop, abs=1e-6)

    # The summary is the mean of the rows, per class and overall.
    summary = json.loads((report / "summary.json").read_text())
    with_truth = [r for r in rows if r["iou"] is not None]
    assert summary["images"] == COUNT and summary["with_ground_truth"] == COUNT - 1
    assert summary["settings"]["faithfulness"]["steps"] == STEPS
    assert summary["settings"]["binarization"] == {"mode": "std", "value": None}
    assert summary["means"]["iou"] == pytest.approx(np.mean([r["iou"] for r in with_truth]))
    assert summary["means"]["deletion_auc"] == pytest.approx(
        np.mean([r["deletion_auc"] for r in rows]))
    assert sum(summary["patterns"].values()) == COUNT - 1
    assert sum(summary["cases"].values()) == COUNT
    for name, entry in summary["per_class"].items():
        mine = [r for r in rows if r["class_name"] == name]
        assert entry["images"] == len(mine)
        assert entry["deletion_auc"] == pytest.approx(np.mean([r["deletion_auc"] for r in mine]))
    curves = np.array([r["curves"]["deletion"] for r in rows])
    assert summary["mean_curves"]["deletion"] == pytest.approx(curves.mean(0).tolist())

    # What the model learnt is checkable: it is right and its maps point at the objects.
    assert summary["accuracy"] > 0.9
    assert summary["pointing_game"] >= 0.9
    assert summary["means"]["insertion_auc"] > summary["means"]["deletion_auc"]
    game = summary["grid_pointing_game"]
    assert game["mosaics"] == 12 and set(game["methods"]) == {"saliency_map", "rise"}
    assert all(g["n"] == 4 * 12 for g in game["methods"].values())
    assert game["methods"]["saliency_map"]["mean"] > 0.4, \
        "the in-graph maps should point at the right cell well above chance (0.25)"

    # The CSV carries the same rows.
    with (report / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [t["image"] for t in table] == [r["image"] for r in rows]
    assert float(table[5]["iou"]) == pytest.approx(rows[5]["iou"])


def test_report_figures_are_written(report):
    html = (report / "report.html").read_text()
    for name in ("figures/histograms.png", "figures/curves.png", "figures/grid_game.png"):
        assert f'src="{name}"' in html
        assert cv2.imread(str(report / name)) is not None
    summary = json.loads((report / "summary.json").read_text())
    for pattern in summary["patterns"]:
        assert (report / "figures" / f"pattern_{pattern}.png").is_file()
    for case in summary["cases"]:
        assert (report / "figures" / f"case_{case}.png").is_file()


def test_against_a_server_gives_the_same_numbers(shapes, report, tmp_path):
    import shutil

    from xaiserve.service.config import ServerSettings
    from xaiserve.service.server import Server

    repo = tmp_path / "repo"
    shutil.copytree(shapes["model"], repo / "shapes")
    server = Server(ServerSettings(repository=repo, host="127.0.0.1", port=0,
                                   poll_seconds=0.5)).start()
    try:
        result = run_cli("evaluate", str(shapes["data"]), "--server", f"127.0.0.1:{server.port}",
                         "--model", "shapes", "--out", str(tmp_path / "remote"),
                         "--grid-mosaics", "0", "--steps", str(STEPS))
    finally:
        server.stop(grace=1)
    assert result.returncode == 0, result.stderr
    local = json.loads((report / "results.json").read_text())
    remote = json.loads((tmp_path / "remote" / "results.json").read_text())
    assert [r["image"] for r in remote] == [r["image"] for r in local]
    for a, b in zip(local, remote):
        assert a["predicted"] == b["predicted"]
        for key in ("confidence", "iou", "deletion_auc", "insertion_auc"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_ray_gives_the_same_numbers_as_the_local_loop(shapes):
    import ray

    from xaiserve.service.dataset import scan_dataset
    from xaiserve.service.eval_backend import BackendSpec
    from xaiserve.service.evaluate_runner import evaluate_local, evaluate_ray
    from xaiserve.service.evaluation import EvaluationSettings

    spec = BackendSpec(model_path=str(shapes["model"]))
    items = scan_dataset(shapes["data"], list(CLASSES4))[:6]
    settings = EvaluationSettings(faithfulness=FaithfulnessSettings(steps=16))
    local = evaluate_local(spec, items, settings, batch_size=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        done = []
        remote = evaluate_ray(spec, items, settings, "local", workers=2, batch_size=2,
                              progress=done.append)
    finally:
        ray.shutdown()
    assert sum(done) == len(items)
    assert [r.row for r in remote] == [r.row for r in local]
    assert [r.curves for r in remote] == [r.curves for r in local]
    assert all(np.array_equal(a.saliency, b.saliency) for a, b in zip(local, remote))


def test_bad_input_gets_one_line_and_exit_2(shapes, tmp_path):
    cases = [
        (["evaluate", str(tmp_path / "missing"), "--model-path", str(shapes["model"])],
         "not a directory"),
        (["evaluate", str(shapes["data"]), "--server", "127.0.0.1:9"], "--model NAME"),
        (["evaluate", str(shapes["data"]), "--model-path", str(tmp_path)], "--model-path"),
        (["evaluate", str(shapes["data"]), "--model-path", str(shapes["model"]),
          "--batch-size", "0"], "--batch-size"),
        (["evaluate", str(shapes["data"]), "--model-path", str(shapes["model"]),
          "--steps", "0"], "--steps"),
        (["evaluate", str(shapes["data"]), "--model-path", str(shapes["model"]),
          "--pattern-cutoffs", "0.5,2,0.5"], "--pattern-cutoffs"),
    ]
    odd = tmp_path / "odd"
    (odd / "purple").mkdir(parents=True)
    cv2.imwrite(str(odd / "purple" / "a.png"), shapes["images"][0])
    cases.append((["evaluate", str(odd), "--model-path", str(shapes["model"])],
                  "class folder 'purple'"))
    # In-process --version picks models/<name>/<version>; one that is not there is named (it
    # was ignored: the newest version was evaluated under the version asked for).
    cases += [
        (["evaluate", str(shapes["data"]), "--model-path", str(shapes["model"]),
          "--version", "2"], "--version 2:"),
        (["evaluate", str(shapes["data"]), "--model-path", str(shapes["model"] / "1"),
          "--version", "1"], "one version already"),
        (["evaluate", str(shapes["data"]), "--model-path", str(shapes["model"]),
          "--model", "other"], "--model names a model on a --server"),
        # A REST URL waited 30 s for a gRPC server, then said none answered.
        (["evaluate", str(shapes["data"]), "--server", "http://127.0.0.1:9", "--model", "m"],
         "a URL; give the gRPC port as HOST:PORT"),
        (["explain", str(shapes["data"] / CLASSES4[0]), "--model-path", str(shapes["model"]),
          "--version", "3"], "--version 3:"),
    ]
    for args, words in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"xaiserve {args[0]}: error:") and words in last, last


def test_a_class_name_that_two_labels_share_is_refused():
    """ImageNet has two "crane"s (134, a bird; 517, a machine): a folder named so was silently
    the first. Now it is refused, and the id names it."""
    labels = ["cat", "crane", "dog", "Crane"]
    with pytest.raises(DatasetError, match=r"'crane': the model has 2 labels .*ids 1, 3"):
        class_ids(["crane"], labels)
    assert class_ids(["3", "dog"], labels) == {"3": 3, "dog": 2}


def test_images_in_folders_below_a_class_folder_are_part_of_it(tmp_path):
    """ImageFolder walks a class folder's sub-folders; they were skipped without a word, and
    boxes given for their images were refused as boxes for images that do not exist. Hidden
    folders (a notebook's checkpoints) and files that are not images stay out."""
    image = np.zeros((8, 8, 3), np.uint8)
    for name in ["circle/a.png", "circle/2024/b.png", "circle/2024/b.mask.png",
                 "circle/.ipynb_checkpoints/a-checkpoint.png", "square/c.jpg",
                 "square/deep/er/d.png", "square/deep/notes.txt"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".png", ".jpg")):
            cv2.imwrite(str(path), image)
        else:
            path.write_text("not an image")
    (tmp_path / "boxes.json").write_text(json.dumps({"square/deep/er/d.png": [[0, 0, 4, 4]]}))
    items = scan_dataset(tmp_path, ["circle", "square"])
    assert [i.relative for i in items] == ["circle/2024/b.png", "circle/a.png", "square/c.jpg",
                                           "square/deep/er/d.png"]
    assert [i.label for i in items] == [0, 0, 1, 1]
    assert items[0].mask_path == str(tmp_path / "circle/2024/b.mask.png")
    assert items[3].boxes == ((0.0, 0.0, 4.0, 4.0),) and items[1].mask_path is None


def test_an_unreadable_image_is_reported_and_the_rest_evaluated(shapes, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, shapes["images"][:3], shapes["labels"][:3], shapes["masks"][:3],
                       CLASSES4)
    folder = CLASSES4[shapes["labels"][0]]
    (data / folder / "broken.png").write_bytes(b"not a png")
    result = run_cli("evaluate", str(data), "--model-path", str(shapes["model"]), "--out",
                     str(tmp_path / "r"), "--no-faithfulness")
    assert result.returncode == 1, result.stderr
    assert "xaiserve evaluate: error: " in result.stderr and "broken.png" in result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["images"] == 3
    assert [f["image"] for f in summary["failed"]] == [f"{folder}/broken.png"]


def sigterm_evaluate(shapes, out, options: list[str], ready) -> str:
    """Run `xaiserve evaluate` on the data set into `out`, send SIGTERM once `ready(stderr)`
    holds, check that it exits 130; its stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "xaiserve.service.cli", "evaluate", str(shapes["data"]),
         "--model-path", str(shapes["model"]), "--out", str(out), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(process.stderr.readline, "")))
    reader.start()
    assert wait_for(lambda: ready("".join(stderr)), timeout=300), "".join(stderr)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130, "".join(stderr)[-2000:]
    reader.join()
    return "".join(stderr)


def test_sigterm_in_the_grid_game_keeps_every_image(shapes, tmp_path):
    """A signal during the grid pointing game (RISE's maps take seconds a mosaic) lost the
    whole run: now the report covers every image, without the game."""
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "grid_game.png").write_bytes(b"an earlier run's picture")
    # The game's bar appears before its first mosaic (24 of them, about 2 s here).
    sigterm_evaluate(shapes, out, ["--no-faithfulness", "--grid-mosaics", "40",
                                   "--grid-methods", "saliency_map,rise"],
                     lambda stderr: "grid game:" in stderr)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == COUNT
    assert summary["interrupted"] == (f"SIGTERM during the grid pointing game, after all "
                                      f"{COUNT} images")
    assert summary["grid_pointing_game"] is None
    assert not (out / "figures" / "grid_game.png").exists()  # no stale picture beside it
    assert "Not played: the run was interrupted." in (out / "report.html").read_text()
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == COUNT


def test_a_signal_while_the_report_is_written_waits_for_it():
    """Writing the report's files is not cut short by a signal (it left a mix of the new run's
    files and an earlier run's): the signal is noted and read afterwards."""
    with interrupts_deferred() as deferred:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes; nothing is raised here
        still_running = True
    assert still_running and deferred.signal == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


CHROMIUM = "/usr/bin/chromium"


def test_sigterm_writes_a_report_of_the_images_evaluated_before_it(shapes, tmp_path):
    """A pipeline's timeout during a long evaluation used to lose every image's results."""
    out = tmp_path / "report"
    some_done = re.compile(rf"evaluate: +\d+%.*\b([1-9]|1\d)/{COUNT}\b")
    stderr = sigterm_evaluate(shapes, out, ["--batch-size", "1", "--steps", "256",
                                            "--grid-mosaics", "4"], some_done.search)
    summary = json.loads((out / "summary.json").read_text())
    done = summary["images"]
    assert 0 < done < COUNT
    assert summary["interrupted"] == f"SIGTERM after {done} of {COUNT} images"
    assert summary["grid_pointing_game"] is None  # not played on part of the data
    assert "Interrupted: SIGTERM" in (out / "report.html").read_text()
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == done
    assert stderr.strip().splitlines()[-1] == (
        f"xaiserve evaluate: interrupted (SIGTERM after {done} of {COUNT} images); the report "
        "covers those")


def test_report_renders_in_headless_chromium(report):
    """A person opens report.html in a browser: every picture must load (relative paths)."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), (
        f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` "
        "(scripts/setup.sh does this)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto((report / "report.html").resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => ({src: "
                                   "i.getAttribute('src'), done: i.complete, "
                                   "width: i.naturalWidth}))")
            title = page.title()
            headings = page.evaluate("Array.from(document.querySelectorAll('h2'))"
                                     ".map(h => h.textContent)")
        finally:
            browser.close()
    assert "shapes" in title
    assert {"GTC, SC and IoU", "Deletion and insertion", "Per class", "Grid pointing game",
            "Shared Interest patterns", "Prediction cases"} <= set(headings)
    assert len(images) >= 5
    broken = [i["src"] for i in images if not i["done"] or i["width"] == 0]
    assert not broken, f"images that did not load: {broken}"


def _export(shapes, *extra):
    return run_cli("export", "torch:tests.synthetic:small_cnn4", "--checkpoint",
                   str(shapes["work"] / "cnn.pth"), "--input-size", "64", "--mean", "0,0,0",
                   "--scale", "255,255,255", "--labels", str(shapes["work"] / "labels.txt"),
                   "--repository", str(shapes["work"] / "gated"), "--name", "shapes",
                   "--reference-images", str(shapes["data"]), *extra)


def test_export_records_the_reference_and_gates_on_it(shapes):
    """Grad-CAM on the torch source against the IR's map; the gate writes nothing below it."""
    models = shapes["work"] / "gated"
    failed = _export(shapes, "--reference", "gradcam", "--min-reference-agreement", "0.99")
    assert failed.returncode == 3, failed.stderr
    assert json.loads(failed.stdout)["status"] == "gate_failed"
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("xaiserve export: gate failed: --min-reference-agreement 0.99")
    assert not (models / "shapes").exists() or not any((models / "shapes").iterdir()), \
        "a failed gate must leave nothing in the repository"

    passed = _export(shapes, "--reference", "gradcam", "--min-reference-agreement", "0.3")
    assert passed.returncode == 0, passed.stderr
    card = json.loads((models / "shapes" / "1" / "model_card.json").read_text())
    reference = card["reference"]
    assert reference["method"] == "gradcam" and reference["images"] == 16
    assert reference["passed"] and reference["spearman"] >= 0.3
    assert 0 <= reference["topk_iou"] <= 1 and len(reference["per_image"]) == 16

    usage = _export(shapes, "--min-reference-agreement", "0.3")
    assert usage.returncode == 2 and "--reference" in usage.stderr.strip().splitlines()[-1]
    usage = _export(shapes, "--reference-metric", "topk_iou")  # ignored before: no gate, exit 0
    line = usage.stderr.strip().splitlines()[-1]
    assert usage.returncode == 2 and "--reference-metric" in line
    assert line.endswith("with --reference gradcam|gradient; without it no reference map is "
                         "made or gated")
