"""Explanation-quality metrics as pure functions: hand-computed cases, and a cross-check of the
faithfulness metrics with the `saliency-maps-metrics` package (Gomez et al.) on identical
inputs (same image, map, class, substrate and steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_maps_metrics.multi_step_metrics import Deletion, Insertion
from saliency_maps_metrics.single_step_metrics import ADD, IIC_AD

from xaiserve.service import faithfulness as fm
from xaiserve.service import grid_pointing_game as gpg
from xaiserve.service.request_metrics import softmax
from xaiserve.service.shared_interest import (PATTERNS, Binarization, PatternCutoffs,
                                     SharedInterestScores, binarize, ground_truth_mask,
                                     pointing_game_hit, shared_interest,
                                     shared_interest_pattern)

# --- Shared Interest ------------------------------------------------------------------------------


def test_binarize_std_is_min_max_then_mean_plus_one_std():
    saliency = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]]) + 3.0
    # normalised: seven 0s and one 1; mean 1/8, std sqrt(7)/8 ~ 0.33 -> only the 1 is kept
    assert binarize(saliency).tolist() == [[False] * 4, [False, False, False, True]]
    ramp = np.arange(10, dtype=float).reshape(2, 5)
    # normalised i/9: mean 0.5, std 0.319 -> cut 0.819 keeps 8/9 and 9/9
    assert binarize(ramp).sum() == 2
    assert binarize(ramp, Binarization("std", 0.0)).sum() == 5  # >= mean
    assert binarize(ramp, Binarization("threshold", 0.5)).sum() == 5  # 5/9..9/9
    assert binarize(ramp, Binarization("percentile", 80)).sum() == 2  # >= 7.2/9
    assert not binarize(np.full((3, 3), 2.0)).any()  # a constant map selects nothing
    # A map that is zero outside one 7x7 cell, as centred ReciproCAM maps are: 92% of its pixels
    # share the minimum, so the 90th percentile is the minimum; S is the cell, not the image.
    sparse = np.zeros((70, 70))
    sparse[10:20, 30:40] = np.linspace(0.2, 1.0, 100).reshape(10, 10)
    for value in (50, 90):
        assert binarize(sparse, Binarization("percentile", value)).sum() == 100
    assert binarize(sparse, Binarization("percentile", 99)).sum() == 49  # the top 49 of 4900
    with pytest.raises(ValueError, match="mode"):
        Binarization("otsu")
    with pytest.raises(ValueError, match="value"):
        Binarization("threshold", 2.0)


def test_shared_interest_scores_by_hand():
    # saliency selects the left 4x2 block (8 px); truth is the top-left 2x4 block (8 px);
    # they share 2x2 = 4 px: IoU 4/12, GTC 4/8, SC 4/8.
    saliency = np.zeros((4, 4))
    saliency[:, :2] = 1.0
    truth = ground_truth_mask(4, 4, boxes=[(0, 0, 4, 2)])
    assert truth.sum() == 8 and truth[:2].all()
    scores = shared_interest(saliency, truth)
    assert scores.iou == pytest.approx(4 / 12)
    assert scores.gtc == pytest.approx(0.5)
    assert scores.sc == pytest.approx(0.5)
    assert scores.sc_mass == pytest.approx(0.5)
    perfect = shared_interest(truth.astype(float), truth)
    assert (perfect.iou, perfect.gtc, perfect.sc, perfect.sc_mass) == (1.0, 1.0, 1.0, 1.0)
    disjoint = shared_interest(1.0 - truth, truth)
    assert (disjoint.iou, disjoint.gtc, disjoint.sc) == (0.0, 0.0, 0.0)


def test_continuous_saliency_coverage_uses_the_min_max_map():
    saliency = np.array([[1.0, 3.0], [5.0, 1.0]])  # min-max: [[0, .5], [1, 0]]
    truth = np.array([[False, True], [False, False]])
    assert shared_interest(saliency, truth).sc_mass == pytest.approx(0.5 / 1.5)


def test_ground_truth_is_the_union_of_boxes_and_mask():
    mask = np.zeros((10, 20), np.uint8)
    mask[8:, 18:] = 255
    truth = ground_truth_mask(10, 20, boxes=[(0, 0, 5, 5), (3, 3, 6, 6)], mask=mask)
    assert truth.sum() == 25 + 9 - 4 + 4
    for bad, words in [((0, 0, 25, 5), "outside"), ((-1, 0, 5, 5), "outside"),
                       ((5, 5, 5, 8), "x_min < x_max")]:
        with pytest.raises(ValueError, match=words):
            ground_truth_mask(10, 20, boxes=[(0, 0, 1, 1), bad])
    with pytest.raises(ValueError, match="mask is 20x10"):
        ground_truth_mask(11, 20, mask=mask)
    # Half-pixel edges round up: a box shifted by one pixel covers as many pixels (round()
    # took (0.5, 1.5) to columns 0-1 and (1.5, 2.5) to column 2 alone).
    for x0 in (0.5, 1.5, 2.5):
        columns = np.flatnonzero(ground_truth_mask(4, 8, boxes=[(x0, 0, x0 + 1, 1)])[0])
        assert columns.tolist() == [int(x0 + 0.5)], (x0, columns)


@pytest.mark.parametrize("iou, gtc, sc, correct, expected", [
    (0.7, 0.8, 0.8, True, "human_aligned"),
    (0.3, 0.2, 0.9, True, "sufficient_subset"),
    (0.3, 0.9, 0.2, True, "context_dependent"),
    (0.1, 0.2, 0.2, True, "sufficient_context"),
    (0.7, 0.8, 0.8, False, "confuser"),
    (0.3, 0.2, 0.9, False, "insufficient_subset"),
    (0.3, 0.9, 0.2, False, "context_confusion"),
    (0.1, 0.2, 0.2, False, "distractor"),
    (0.45, 0.6, 0.6, True, "human_aligned"),  # both coverages high, IoU just under
])
def test_every_pattern_is_reached(iou, gtc, sc, correct, expected):
    assert shared_interest_pattern(SharedInterestScores(iou, gtc, sc, sc), correct) == expected


def test_pattern_cutoffs_are_parameters():
    scores = SharedInterestScores(0.3, 0.2, 0.6, 0.6)
    assert shared_interest_pattern(scores, True) == "sufficient_subset"
    strict = PatternCutoffs(sc_high=0.7)
    assert shared_interest_pattern(scores, True, strict) == "sufficient_context"
    assert strict.as_parameters() == {"iou_high": "0.5", "gtc_high": "0.5", "sc_high": "0.7"}
    assert len(set(PATTERNS)) == 8


def test_shared_interest_on_a_map_from_a_box_region():
    """A smooth blob centred in a box of about its size: high IoU, pointing hit."""
    yy, xx = np.mgrid[:60, :80]
    saliency = np.exp(-((yy - 30) ** 2 + (xx - 50) ** 2) / (2 * 8.0 ** 2))
    truth = ground_truth_mask(60, 80, boxes=[(38, 18, 62, 42)])
    scores = shared_interest(saliency, truth)
    assert scores.sc > 0.9 and scores.gtc > 0.8 and scores.iou > 0.8
    assert shared_interest_pattern(scores, True) == "human_aligned"
    assert shared_interest_pattern(scores, False) == "confuser"
    assert pointing_game_hit(saliency, truth)


def test_pointing_game_hit_and_miss():
    saliency = np.zeros((10, 10))
    saliency[2, 7] = 1.0
    box = ground_truth_mask(10, 10, boxes=[(6, 1, 9, 4)])
    assert pointing_game_hit(saliency, box)
    far = ground_truth_mask(10, 10, boxes=[(0, 6, 3, 9)])
    assert not pointing_game_hit(saliency, far)
    near = ground_truth_mask(10, 10, boxes=[(0, 4, 6, 9)])  # nearest pixel (5, 4): 2.2 px
    assert not pointing_game_hit(saliency, near, tolerance_px=2)
    assert pointing_game_hit(saliency, near, tolerance_px=3)
    # A map that points nowhere (constant, or with a NaN) misses even an object in the corner
    # its first pixel falls in.
    corner = ground_truth_mask(10, 10, boxes=[(0, 0, 3, 3)])
    assert not pointing_game_hit(np.full((10, 10), 0.5), corner)
    broken = saliency.copy()
    broken[5, 5] = np.nan
    assert not pointing_game_hit(broken, corner)
    assert pointing_game_hit(np.pad(np.ones((1, 1)), ((0, 9), (0, 9))), corner)
    assert Binarization().as_parameters()["binarization"] == "std"


# --- faithfulness: hand-computed ----------------------------------------------------------------

def test_single_step_formulas_by_hand():
    assert fm.average_drop([0.8, 0.5], [0.4, 0.6]) == pytest.approx((0.5 + 0.0) / 2)
    assert fm.increase_in_confidence([0.8, 0.5], [0.4, 0.6]) == 0.5
    assert fm.average_drop_in_deletion([0.8, 0.5], [0.4, 0.6]) == pytest.approx((0.5 - 0.2) / 2)
    # A class the model gives no probability (Y = 0) cannot drop: 0, not a NaN for the mean.
    assert fm.average_drop([0.8, 0.0], [0.4, 0.1]) == pytest.approx(0.25)
    assert fm.average_drop_in_deletion([0.8, 0.0], [0.4, 0.1]) == pytest.approx(0.25)
    assert fm.auc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert fm.auc([1.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.125)
    assert fm.correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert np.isnan(fm.correlation([1, 1, 1], [2, 4, 6]))


def brightness_score(images: np.ndarray) -> np.ndarray:
    """Two classes: 'bright in the left half' against the rest; softmax of a linear logit."""
    left = images[:, :, : images.shape[2] // 2].astype(np.float64).mean(axis=(1, 2, 3)) / 255
    logits = np.stack([8 * left, np.full_like(left, 2.0)], axis=1)
    return softmax(logits)


def test_deletion_of_the_evidence_first_drops_the_score_at_once():
    """Left half white, right half black; a map that ranks the left half first removes all the
    evidence in the first half of the steps (black substrate)."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255
    good = np.zeros((2, 2))
    good[:, 0] = [1.0, 0.9]
    bad = 1.0 - good
    settings = fm.FaithfulnessSettings(steps=4)
    seen = []

    def counting(images):
        seen.append(len(images))
        return brightness_score(images)

    good_curve = fm.deletion_insertion(image, good, 0, counting, "deletion", settings)
    assert seen == [5]  # one batched call: the image and four steps
    bad_curve = fm.deletion_insertion(image, bad, 0, brightness_score, "deletion", settings)
    full, half, none = (float(brightness_score(image[None] * f)[0, 0]) for f in (1, 0.5, 0))
    # cells removed after each step: 0, 1, 2, 3, 4 of 4; good removes the two left cells first
    h = [full, half, none, none, none]
    np.testing.assert_allclose(good_curve.scores, h)
    assert good_curve.auc == pytest.approx(np.trapezoid(h, dx=0.25))
    assert bad_curve.auc > good_curve.auc
    np.testing.assert_allclose(good_curve.saliency_means, [1.0, 0.9, 0.0, 0.0])
    drops = -np.diff(h)
    assert good_curve.correlation == pytest.approx(np.corrcoef(drops, [1.0, 0.9, 0, 0])[0, 1])
    assert good_curve.correlation > 0 > bad_curve.correlation
    insertion = fm.deletion_insertion(image, good, 0, brightness_score, "insertion",
                                      settings.with_substrate("black"))
    np.testing.assert_allclose(insertion.scores, [none, half, full, full, full])


def test_compute_by_name_states_parameters_and_rejects_unknown_names():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    saliency = np.random.default_rng(1).random((4, 4))
    values = fm.compute(["average_drop", "deletion_auc", "deletion_correlation"], image,
                        saliency, 0, brightness_score, fm.FaithfulnessSettings(steps=8))
    assert [v.name for v in values] == ["average_drop", "deletion_auc", "deletion_correlation"]
    deletion = values[1].parameters
    assert deletion["substrate"] == "black" and deletion["steps"] == "8"
    assert deletion["score"] == "softmax" and deletion["class_id"] == "0"
    with pytest.raises(ValueError, match="unknown faithfulness metric 'aopc'"):
        fm.compute(["aopc"], image, saliency, 0, brightness_score)
    with pytest.raises(ValueError, match="substrate"):
        fm.FaithfulnessSettings().with_substrate("noise")


# --- faithfulness: cross-check with saliency-maps-metrics ----------------------------------------

def pooled_linear_score(seed: int = 0, classes: int = 6):
    """A deterministic, smooth scoring function: 4x4 pooled colour means -> linear -> softmax."""
    weights = np.random.default_rng(seed).normal(0, 0.3, (4 * 4 * 3, classes))

    def score(images: np.ndarray) -> np.ndarray:
        n, h, w, _ = images.shape
        pooled = images.astype(np.float64).reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4))
        return softmax(pooled.reshape(n, -1) / 255 @ weights)
    return score


def as_torch_model(score_fn):
    """The same scoring function as a torch model on NCHW float images of u8 values, rounding
    to u8 as the served model's input does."""
    def model(data: torch.Tensor) -> torch.Tensor:
        images = data.permute(0, 2, 3, 1).numpy()
        u8 = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        return torch.from_numpy(score_fn(u8))
    return model


@pytest.fixture(scope="module")
def cross_check_inputs():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:48, :48]
    noise = rng.integers(0, 40, (48, 48, 3))
    image = np.clip(np.stack([xx * 5, yy * 5, (xx + yy) * 2], -1) + noise, 0, 255).astype(np.uint8)
    saliency = rng.random((12, 12))  # 144 distinct values, no ties
    return image, saliency


@pytest.fixture()
def numpy_trapz(monkeypatch):
    """saliency-maps-metrics calls np.trapz, which numpy 2.4 removed; np.trapezoid is the same."""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@pytest.mark.parametrize("kind, substrate, steps", [
    ("deletion", "black", 144), ("deletion", "blur", 36), ("insertion", "blur", 144),
    ("insertion", "black", 48), ("deletion", "mean", 16)])
def test_deletion_insertion_agree_with_saliency_maps_metrics(cross_check_inputs, numpy_trapz,
                                                             kind, substrate, steps):
    image, saliency = cross_check_inputs
    score_fn = pooled_linear_score()
    class_id = int(np.argmax(score_fn(image[None])[0]))
    settings = fm.FaithfulnessSettings(steps=steps).with_substrate(substrate)
    ours = fm.deletion_insertion(image, saliency, class_id, score_fn, kind, settings)

    data = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    explanation = torch.from_numpy(saliency.astype(np.float32))[None, None]
    masking = None
    if substrate == "mean":  # the package has no mean substrate: pass ours as masking data
        masking = torch.from_numpy(fm.substrate(image, "mean", settings).astype(np.float32)
                                   ).permute(2, 0, 1)[None]
    metric_cls = Deletion if kind == "deletion" else Insertion
    metric = metric_cls(substrate if substrate != "mean" else "black", max_step_nb=steps)
    model = as_torch_model(score_fn)
    scores, saliency_means = metric.compute_scores(model, data, explanation, [class_id],
                                                   masking_data=masking)
    np.testing.assert_allclose(ours.scores, scores[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.saliency_means, saliency_means[0], rtol=1e-6)
    theirs = metric(model, data, explanation, [class_id], masking_data=masking)
    auc_name, corr_name = ("dauc", "dc") if kind == "deletion" else ("iauc", "ic")
    assert ours.auc == pytest.approx(float(theirs[auc_name]), rel=1e-5, abs=1e-7)
    assert ours.correlation == pytest.approx(float(theirs[corr_name]), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("substrate", ["black", "blur"])
def test_single_step_metrics_agree_with_saliency_maps_metrics(cross_check_inputs, substrate):
    image, saliency = cross_check_inputs
    saliency = saliency[:6, :6]  # 6x6 upsampled bicubic to 48x48
    score_fn = pooled_linear_score(seed=1)
    settings = fm.FaithfulnessSettings().with_substrate(substrate)
    model = as_torch_model(score_fn)
    data = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    explanation = torch.from_numpy(saliency.astype(np.float32))[None, None]
    for class_id in range(6):
        ours = fm.single_step(image, saliency, class_id, score_fn, settings)
        theirs = IIC_AD(substrate)(model, data, explanation, [class_id])
        assert ours.average_drop == pytest.approx(float(theirs["ad"]), rel=1e-3, abs=1e-5)
        assert ours.increase_in_confidence == float(theirs["iic"])
        theirs_add = ADD(substrate)(model, data, explanation, [class_id])
        assert ours.average_drop_in_deletion == pytest.approx(float(theirs_add["add"]),
                                                              rel=1e-3, abs=1e-5)


def test_soft_mask_is_torch_bicubic():
    saliency = np.random.default_rng(5).random((7, 5))
    ours = fm.soft_mask(saliency, 30, 23)
    m = torch.from_numpy(fm.min_max(saliency))[None, None]
    theirs = torch.nn.functional.interpolate(m, size=(30, 23), mode="bicubic",
                                             align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_blur_substrate_is_the_packages_box_blur():
    from saliency_maps_metrics.data_replace import blur_data
    image = np.random.default_rng(6).integers(0, 256, (50, 40, 3), np.uint8)
    ours = fm.substrate(image, "blur", fm.FaithfulnessSettings())
    theirs = blur_data(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None])
    np.testing.assert_allclose(ours, theirs[0].permute(1, 2, 0).numpy(), atol=1e-3)


def test_grid_score_cells_cover_the_mosaic_at_any_size():
    """At a size n does not divide (299) the cells missed the last row and column: a uniform
    map scored 0.247 a cell, under the chance it is compared with."""
    for size in (224, 299):
        for n in (2, 3):
            uniform = [gpg.grid_score(np.ones((7, 7)), cell, size, n) for cell in range(n * n)]
            assert sum(uniform) == pytest.approx(1.0), (size, n)
            assert max(uniform) - min(uniform) < 0.02, (size, n, uniform)
    corner = np.zeros((8, 8))
    corner[:4, 4:] = 1.0  # the top-right quarter of a 2x2 mosaic
    assert gpg.grid_score(corner, 1, 299) > 0.9 and gpg.grid_score(corner, 2, 299) < 0.02
