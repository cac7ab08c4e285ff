"""On data whose truth is known, the in-graph map points at the object."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.synthetic import make_dataset, train_small_cnn
from xaiserve.service.model import ClassifierModel


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    import torch

    work = tmp_path_factory.mktemp("synthetic")
    model = train_small_cnn()
    torch.save(model.state_dict(), work / "small_cnn.pth")
    result = run_cli("export", "torch:tests.synthetic:small_cnn", "--checkpoint",
                     str(work / "small_cnn.pth"), "--input-size", "64", "--mean", "0,0,0",
                     "--scale", "255,255,255", "--repository", str(work / "models"),
                     "--name", "shapes")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["saliency"]["method"] == "reciprocam"
    return ClassifierModel(work / "models" / "shapes" / "1").load()


def test_map_maximum_falls_inside_the_object(trained_export):
    images, labels, masks = make_dataset(200, seed=123)  # held out: another seed
    out = trained_export.predict(images)
    accuracy = (out["logits"].argmax(1) == labels).mean()
    assert accuracy > 0.9, f"the small CNN did not learn the task ({accuracy:.2f})"
    hits = 0
    for saliency, label, mask in zip(out["saliency_map"], labels, masks):
        up = cv2.resize(saliency[label], (64, 64), interpolation=cv2.INTER_LINEAR)
        y, x = np.unravel_index(np.argmax(up), up.shape)
        hits += bool(mask[y, x])
    assert hits / len(images) >= 0.9, f"map maximum inside the object for {hits}/{len(images)}"
