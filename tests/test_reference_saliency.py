"""Torch reference maps (vanilla gradient, Grad-CAM) against hand-computed values (the export
gate on their agreement with the IR is tested in test_evaluate.py, on the trained shapes model)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synthetic import make_dataset
from xaiserve.export.reference_saliency import gradcam, torch_input, vanilla_gradient
from xaiserve.service.model_info import ModelInfo

INFO = ModelInfo(labels=["red", "green", "blue"], input_height=64, input_width=64,
                 mean_values=[0, 0, 0], scale_values=[255, 255, 255])


@pytest.fixture(scope="module")
def untrained():
    """The identities below hold for any weights: no training needed."""
    import torch

    from tests.synthetic import small_cnn

    torch.manual_seed(0)
    images, labels, _ = make_dataset(4, 5)
    return small_cnn().eval(), images, [int(c) for c in labels]


def test_gradcam_on_a_pooled_linear_head_is_the_rectified_cam(untrained):
    """With global average pooling then one linear layer after the last ReLU, Grad-CAM's weights
    are W_c / (h w), so the map is ReLU(W_c . A) / (h w): computed here by hand."""
    import torch

    module, images, classes = untrained
    maps = gradcam(module, images, classes, INFO)
    with torch.no_grad():
        features = module[:8](torch_input(images, INFO)).numpy()  # after the last ReLU
    weight = module[-1].weight.detach().numpy()
    hw = features.shape[2] * features.shape[3]
    expected = np.maximum(np.einsum("nc,nchw->nhw", weight[classes], features), 0) / hw
    assert maps.shape == expected.shape == (4, 16, 16)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-7)


def test_vanilla_gradient_matches_finite_differences(untrained):
    """|d logit / d x| at the map's maximum, against central differences in float64."""
    import copy

    import torch

    module, images, classes = untrained
    grad = vanilla_gradient(module, images[:1], classes[:1], INFO)[0]
    assert grad.shape == (64, 64)
    y, x = np.unravel_index(np.argmax(grad), grad.shape)
    double = copy.deepcopy(module).double()
    base = torch_input(images[:1], INFO).double()
    eps = 1e-6
    diffs = []
    with torch.no_grad():
        for channel in range(3):
            up, down = base.clone(), base.clone()
            up[0, channel, y, x] += eps
            down[0, channel, y, x] -= eps
            change = double(up)[0, classes[0]] - double(down)[0, classes[0]]
            diffs.append(abs(float(change)) / (2 * eps))
    assert max(diffs) == pytest.approx(float(grad[y, x]), rel=1e-3)
