"""Our plain ReciproCAM against openvino-xai 1.1.0's, on the same IR and the same inputs.

openvino-xai cannot run beside OpenVINO 2026 (it imports `openvino.runtime`), so its maps were
computed once in a separate environment by scripts/openvino_xai_reference.py and committed in
tests/data/openvino_xai_reciprocam.npz: the u8 inputs (chelsea and coffee at 224x224), the plain
default IR's top-5 classes per image, and openvino-xai's maps for them (per class min-max
scaled to 0..255 and truncated to whole numbers, as it outputs them). With `--score logit --mosaic paper --spread
none --normalize minmax` our branch is the same formulation, inserted into the deployed IR
without torch, so the maps must agree to that truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from xaiserve.export.pipeline import ExportRequest, export_model
from xaiserve.export.saliency import SaliencySettings

REFERENCE = Path(__file__).parent / "data" / "openvino_xai_reciprocam.npz"
PLAIN_RECIPROCAM = SaliencySettings(method="reciprocam", score="logit", mosaic="paper",
                                    spread="none", normalize="minmax", map_precision="f32")


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE)


@pytest.fixture(scope="module")
def plain_reciprocam(tmp_path_factory):
    """The default model without saliency, then our plain ReciproCAM added to that IR, the way
    openvino-xai was given it."""
    repo = tmp_path_factory.mktemp("ovxai")
    plain = export_model(ExportRequest("default", repo, "plain",
                                       saliency=SaliencySettings(method="none")))
    result = export_model(ExportRequest(str(plain.path / "model.xml"), repo, "plain_reciprocam",
                                        saliency=PLAIN_RECIPROCAM))
    core = ov.Core()
    before, after = (core.read_model(str(p / "model.xml")) for p in (plain.path, result.path))
    # Re-exporting our own plain IR keeps its u8 NHWC input and embedded preprocessing.
    assert after.inputs[0].get_element_type() == ov.Type.u8
    assert after.inputs[0].get_partial_shape() == before.inputs[0].get_partial_shape()
    return core.compile_model(after, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), \
        core.compile_model(before, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_plain_reciprocam_matches_openvino_xai(reference, plain_reciprocam):
    with_branch, plain = plain_reciprocam
    out = with_branch(reference["inputs"])
    logits, maps = out["logits"], out["saliency_map"]
    np.testing.assert_allclose(logits, plain(reference["inputs"])["logits"], rtol=1e-4,
                               atol=1e-3)
    top = np.argsort(-logits, axis=1)[:, :reference["classes"].shape[1]]
    assert np.array_equal(top, reference["classes"])  # same IR, same classes
    ours = np.stack([maps[i, c] for i, c in enumerate(top)]) * 255
    expected = reference["maps"]
    # openvino-xai truncates to whole numbers: ours lies in [its value, its value + 1).
    difference = ours - expected
    assert difference.min() >= -1e-3 and difference.max() <= 1.0 + 1e-3, \
        (difference.min(), difference.max())
    # Both put each class's peak at the same place.
    assert np.array_equal(ours.reshape(*ours.shape[:2], -1).argmax(-1),
                          expected.reshape(*expected.shape[:2], -1).argmax(-1))


def test_default_map_differs_from_plain_reciprocam(reference, default_export):
    """The project's default (local mosaic, Gaussian spread, centred) is not the plain method:
    guard against the settings silently collapsing into it."""
    compiled = ov.Core().compile_model(str(default_export.path / "model.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled(reference["inputs"])
    maps = np.stack([out["saliency_map"][i, c] for i, c in enumerate(reference["classes"])])
    assert np.abs(maps * 255 - reference["maps"]).mean() > 10
