"""In-graph ReciproCAM / ViT-ReciproCAM across architectures, checked against torch.

For each source (timm architectures with random weights, plus the default EfficientNet-Lite0;
`ARCHITECTURES` names each one's family, which says from the network's torch code where the
method's target is and how the layers after it run) the exported `saliency_map` output is
checked for
  1. its shape [N, K, h, w] for N = 1 and N = 3, the target tensor's shape, the logits;
  1b. that insert_saliency leaves the source model as it was (it can be given saliency again);
  2. batch independence: an image's map inside a batch of 3 equals its map run alone;
  3. agreement with a direct torch computation of the method's formula (the head re-run on each
     masked copy of the target, built explicitly: none of the exporter's shortcuts, such as
     mixing pooled features or the linear-head fast path),
     for the project's default settings (whatever `SaliencySettings()` currently is) and for
     the plain paper / openvino-xai formulation (score="logit", mosaic="paper",
     normalize="minmax"), and for softmax scores with min-max maps, each both un-normalised
     and with its own normalisation;
  4. the model-randomisation sanity check (Adebayo et al. 2018): re-initialising the classifier
     in torch and re-exporting changes the maps substantially.

Everything is compared in f32 on the float NCHW model, before preprocessing is embedded. Each
source is converted once per module (a module-scoped fixture); the expensive ViT branches
(h*w = 196 re-runs of the last block per image) are evaluated on as few images as possible.

Tolerances. Raw maps (normalize="none") must agree to RAW_REL times the largest |value|.
Normalised maps divide by a per-class span over locations (max - min for "minmax", max - mean
for "centred"); with random weights a class map can be nearly flat (efficientnet_b0 with softmax
scores: a range of ~2e-5 on values ~0.1, a few thousand ulps), and the raw error is amplified by
1/span. The tolerance of a normalised map is therefore NORMALISED_ABS + 4 * raw_tolerance / span
per class: 1e-3 for well-conditioned maps, looser only where a map is nearly flat (the raw
comparison stays tight there).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import rankdata

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

# Tracing the sources for conversion warns about torch.jit and data-dependent Python values.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.jit",
                                        "ignore::torch.jit.TracerWarning")

from xaiserve.export.parity import compile_f32  # noqa: E402
from xaiserve.export.saliency import (  # noqa: E402
    InsertionError,
    SaliencySettings,
    insert_saliency,
)
from xaiserve.export.saliency.graph import ancestors, key  # noqa: E402
from xaiserve.export.sources import (  # noqa: E402
    SourceOptions,
    convert_torch,
    create_source,
    synthetic_images,
)

NUM_CLASSES = 10  # a small head keeps the h*w re-runs cheap (default keeps its 1000 classes)

# What the exporter ships, with the map product in f32: the formula is checked exactly here, the
# int8 product (the default where features are bounded, as in Lite0) against f32 in
# test_int8_map_product.
DEFAULT = SaliencySettings(map_precision="f32")
PAPER = SaliencySettings(score="logit", mosaic="paper", normalize="minmax",
                         map_precision="f32")  # ReciproCAM paper
# Softmax scores with min-max maps (the exporter's first default): near-flat maps on random
# weights, the case the span-scaled tolerance is for.
SOFTMAX = SaliencySettings(score="softmax", mosaic="local", normalize="minmax",
                           map_precision="f32")
SETTINGS = {"default": DEFAULT, "paper": PAPER, "softmax": SOFTMAX}

RAW_REL = 2e-5  # raw maps: max |exported - torch| <= RAW_REL * max |torch|
NORMALISED_ABS = 1e-3  # normalised maps, well-conditioned classes
BATCH = 3
REF_IMAGE = 0  # the image the torch reference is computed for (ViT references are costly)

GAUSSIAN_3X3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def raw(settings: SaliencySettings) -> SaliencySettings:
    return replace(settings, normalize="none")


# --- torch reference ------------------------------------------------------------------------

# Each family says where its networks keep the method's target and how their tail runs on
# masked copies of it, written from the torch code of those networks; ARCHITECTURES picks one per
# source (a registry, as timm's), so a new architecture is a line there.

class FeatureMap:
    """ReciproCAM's target: the feature map [N, C, h, w] that the head's global average pooling
    reads, here `forward_features`' output; the head re-runs on the masked copies themselves."""

    tokens = False  # ViT-ReciproCAM's token families set True
    batch_statistics = False  # untrained, the family needs its BatchNorm statistics set

    def __init__(self, exported_layout: str = "NCHW"):
        """`exported_layout`: the exporter's target is this map as it is ("NCHW"), as
        [N, h, w, C] ("NHWC"), or as tokens [N, h*w, C] ("tokens")."""
        self.exported_layout = exported_layout

    def target(self, module, x: torch.Tensor) -> torch.Tensor:
        return module.forward_features(x)

    def prelogits(self, module, copies: torch.Tensor) -> torch.Tensor:
        return module.forward_head(copies, pre_logits=True)

    @staticmethod
    def heads(module) -> tuple:
        """timm's classifier: one head, or a distilled pair given as a tuple."""
        heads = module.get_classifier()
        return heads if isinstance(heads, tuple) else (heads,)

    def classifier(self, module):
        """prelogits -> logits; a distilled pair of heads is averaged, as in timm's eval mode."""
        heads = self.heads(module)
        return heads[0] if len(heads) == 1 else lambda p: sum(h(p) for h in heads) / len(heads)

    def last_layers(self, module) -> list[torch.nn.Linear]:
        """The linear layers the randomisation test re-initialises."""
        return [m for head in self.heads(module) for m in head.modules()
                if isinstance(m, torch.nn.Linear)]


class ChannelsLastMap(FeatureMap):
    """timm's Swin gives its last feature map as [N, h, w, C] and pools it so."""

    def __init__(self):
        super().__init__("NHWC")

    def target(self, module, x):
        return module.forward_features(x).permute(0, 3, 1, 2)

    def prelogits(self, module, copies):
        return module.forward_head(copies.permute(0, 2, 3, 1), pre_logits=True)


class TokenGridMap(FeatureMap):
    """LeViT: the head averages its last stage's tokens [N, h*w, C] (no prefix, no LayerNorm
    blocks); the exporter's ReciproCAM takes them as the grid they are, [N, C, h, w] here."""

    batch_statistics = True

    def __init__(self):
        super().__init__("tokens")

    def target(self, module, x):
        tokens = module.forward_features(x)
        n, count, c = tokens.shape
        side = math.isqrt(count)
        return tokens.reshape(n, side, side, c).permute(0, 3, 1, 2)

    def prelogits(self, module, copies):
        m, c, h, w = copies.shape
        tokens = copies.permute(0, 2, 3, 1).reshape(m, h * w, c)
        return module.forward_head(tokens, pre_logits=True)


class HeadConvMap(FeatureMap):
    """MIT EfficientViT: the head's 1x1 convolution widens the features before its pooling, so
    the pooled map is that convolution's output, not `forward_features`'."""

    def target(self, module, x):
        return module.head.in_conv(module.forward_features(x))

    def prelogits(self, module, copies):
        return module.head.global_pool(copies)

    def classifier(self, module):
        return module.head.classifier  # Linear, LayerNorm, activation, Linear


class Lite0Map(FeatureMap):
    """The default source's EfficientNet-Lite0 wrapper (lukemelas' key names)."""

    def target(self, module, x):
        return module.net.extract_features(x)

    def prelogits(self, module, copies):
        return torch.flatten(copies.mean((2, 3), keepdim=True), 1)

    def classifier(self, module):
        return module.net._fc

    def last_layers(self, module):
        return [module.net._fc]


class Tokens(FeatureMap):
    """ViT-ReciproCAM's target: the tokens [N, T, D] entering the last transformer block (plain
    ViT and DeiT: prefix tokens first, then the patch grid; the final norm, then the head)."""

    tokens = True

    def block(self, module):
        return module.blocks[-1]

    def attention(self, block):
        return block.attn

    def prefix(self, module) -> int:
        return module.num_prefix_tokens

    def grid(self, module, count: int) -> tuple[int, int]:
        return tuple(module.patch_embed.grid_size)

    def target(self, module, x):
        captured = {}
        hook = self.block(module).register_forward_pre_hook(
            lambda _, args: captured.__setitem__("tokens", args[0]))
        try:
            module(x)
        finally:
            hook.remove()
        return captured["tokens"]

    def masked_block(self, module, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The last block on the masked copies: tokens [T, D], weights [hw, T, 1] -> [hw, T, D].
        The mask weights the block's input on its residual path and its first LayerNorm's
        output on the attention path (as openvino-xai does)."""
        block = self.block(module)
        copies = tokens[None] * weights
        copies = copies + block.ls1(self.attention(block)(block.norm1(tokens)[None] * weights))
        return copies + block.ls2(block.mlp(block.norm2(copies)))

    def prelogits(self, module, tokens):
        """The block's output tokens -> what `classifier` reads."""
        return module.forward_head(module.norm(tokens), pre_logits=True)


class SquareGridTokens(Tokens):
    """Token families whose grid shows only in the token count, a square."""

    def grid(self, module, count):
        side = math.isqrt(count)
        assert side * side == count, count
        return side, side


class PitTokens(SquareGridTokens):
    """PiT: the last stage's blocks see its class (and distillation) tokens, then the pooled
    patch grid; only the prefix tokens reach the final norm and the heads."""

    def block(self, module):
        return module.transformers[-1].blocks[-1]

    def prefix(self, module):
        return module.cls_token.shape[1]

    def prelogits(self, module, tokens):
        return module.norm(tokens[:, :self.prefix(module)])

    def classifier(self, module):
        return module.forward_head  # one or two prefix tokens, a head each, averaged


class MultiScaleTokens(SquareGridTokens):
    """MViTv2: no prefix tokens; its last block's attention pools keys and values over the
    token grid (it takes the grid's size) and has no layer scale; the final norm, then the
    head averages the tokens."""

    def block(self, module):
        return module.stages[-1].blocks[-1]

    def masked_block(self, module, tokens, weights):
        block = self.block(module)
        assert block.shortcut_proj_attn is None and block.shortcut_pool_attn is None
        assert block.shortcut_proj_mlp is None  # the residuals are the tokens themselves
        grid = list(self.grid(module, tokens.shape[0] - self.prefix(module)))
        attended, _ = block.attn(block.norm1(tokens)[None] * weights, grid)
        copies = tokens[None] * weights + attended
        return copies + block.mlp(block.norm2(copies))


class MetaFormerTokens(SquareGridTokens):
    """EfficientFormer: its last stage flattens the map to tokens (no prefix) for one attention
    block (`token_mixer`); the head averages the normalised tokens."""

    def block(self, module):
        return module.stages[-1].blocks[-1]

    def attention(self, block):
        return block.token_mixer

    def prefix(self, module):
        return 0


def location_masks(h: int, w: int, spread: str) -> torch.Tensor:
    """[h*w, h, w]: mask k is location k spread over its 3x3 neighbourhood (zero padded),
    built by convolution, independently of the exporter's `neighbourhood_weights`."""
    deltas = torch.eye(h * w).reshape(h * w, 1, h, w)
    if spread == "none":
        return deltas[:, 0]
    return torch.nn.functional.conv2d(deltas, GAUSSIAN_3X3[None, None], padding=1)[:, 0]


@torch.no_grad()
def masked_prelogits(family: FeatureMap, module, image: np.ndarray, mosaic: str, spread: str
                     ) -> tuple[torch.Tensor, int, int]:
    """What the classifier reads for the h*w masked copies of one image's target, and h, w.

    Feature map F: copy k is F * M_k ("paper"), scaled by h*w / sum(M_k) for "local"; the head
    runs on the copies themselves.
    Tokens: prefix tokens kept, spatial token j of copy k weighted by M_k[j], on the block's
    residual path and after its first LayerNorm (as openvino-xai does); then the rest of the
    block and the family's tail (there is no mosaic variant: `mosaic` is ignored, as it is by
    the exporter's ViT-ReciproCAM).
    """
    target = family.target(module, torch.from_numpy(image[None]))[0]
    if family.tokens:
        tokens = target  # [T, D]
        t = tokens.shape[0]
        prefix = family.prefix(module)
        h, w = family.grid(module, t - prefix)
        assert t == prefix + h * w
        token_masks = torch.ones(h * w, t)
        token_masks[:, prefix:] = location_masks(h, w, spread).reshape(h * w, h * w)
        copies = family.masked_block(module, tokens, token_masks[:, :, None])  # [hw, T, D]
        return family.prelogits(module, copies), h, w
    c, h, w = target.shape
    masks = location_masks(h, w, spread)
    if mosaic == "local":
        masks = masks * (h * w) / masks.sum((1, 2), keepdim=True)
    copies = target[None] * masks[:, None]  # [hw, C, h, w]
    return family.prelogits(module, copies), h, w


CNN, VIT = FeatureMap(), Tokens()
ARCHITECTURES: dict[str, FeatureMap] = {  # source spec -> its family
    "timm:resnet18": CNN,
    "timm:resnet50": CNN,
    "timm:efficientnet_b0": CNN,
    "timm:mobilenetv3_large_100": CNN,
    "timm:convnext_tiny": CNN,  # pooled, then LayerNorm
    "timm:convnextv2_atto": CNN,  # global response normalisation
    "timm:regnety_002": CNN,
    "timm:repvit_m0_9": CNN,  # a distilled pair of heads
    "timm:efficientformerv2_s0": CNN,  # attention in its last stages; heads as a tuple
    "timm:mobilevitv2_050": CNN,  # attention over unfolded patches; 256 x 256: 8 x 8
    "timm:coatnet_nano_rw_224": CNN,
    "timm:maxvit_pico_rw_256": CNN,  # block and grid attention; 8 x 8
    "timm:tiny_vit_5m_224": CNN,
    "timm:pvt_v2_b0": FeatureMap(exported_layout="NHWC"),  # pooled after a permute
    "timm:swin_tiny_patch4_window7_224": ChannelsLastMap(),
    "timm:efficientvit_b0": HeadConvMap(),
    "timm:levit_128s": TokenGridMap(),  # a 4 x 4 grid of tokens
    "timm:deit_tiny_patch16_224": VIT,
    "timm:vit_small_patch16_224": VIT,
    "timm:pit_ti_distilled_224": PitTokens(),  # two prefix tokens, pooled stages
    "timm:efficientformer_l1": MetaFormerTokens(),
    "timm:mvitv2_tiny": MultiScaleTokens(),  # its tail takes the batch size from the input
    "default": Lite0Map(),
}
SOURCES = list(ARCHITECTURES)


@torch.no_grad()
def maps_from_prelogits(prelogits: torch.Tensor, classifier, h: int, w: int,
                        settings: SaliencySettings) -> np.ndarray:
    scores = classifier(prelogits)  # [hw, K]
    if settings.score == "softmax":
        scores = scores.softmax(1)
    maps = scores.T.double().reshape(-1, h, w).numpy()  # [K, h, w]
    return normalise(maps, settings.normalize)


def normalise(maps: np.ndarray, kind: str) -> np.ndarray:
    """Each [h, w] map (last two axes) normalised as `SaliencySettings.normalize` says."""
    axes = (-2, -1)
    if kind == "none":
        return maps
    if kind == "minmax":
        lo, hi = maps.min(axes, keepdims=True), maps.max(axes, keepdims=True)
        return (maps - lo) / np.maximum(hi - lo, 1e-12)
    if kind == "centred":  # spatial mean as zero point, negatives clipped, maximum 1
        above = np.maximum(maps - maps.mean(axes, keepdims=True), 0)
        return above / np.maximum(above.max(axes, keepdims=True), 1e-12)
    pytest.fail(f"the torch reference does not know normalize={kind!r}; add it here")


def span(raw_maps: np.ndarray, kind: str) -> np.ndarray:
    """What `normalise(raw_maps, kind)` divides by, [..., K, 1, 1]."""
    hi = raw_maps.max((-2, -1), keepdims=True)
    if kind == "minmax":
        return hi - raw_maps.min((-2, -1), keepdims=True)
    if kind == "centred":
        return hi - raw_maps.mean((-2, -1), keepdims=True)
    pytest.fail(f"no span for normalize={kind!r}")


@torch.no_grad()
def set_batch_statistics(module, images: np.ndarray) -> None:
    """Untrained, LeViT is degenerate: its BatchNorms' unit running variance shrinks the
    activations until attention is uniform and every token of the last stage is the same (its
    maps constant to 1e-11). Statistics taken from images, as training sets them, undo that."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches seen
    module.train()
    module(torch.from_numpy(images))
    module.eval()


# --- one source, converted once ---------------------------------------------------------------

class Case:
    def __init__(self, spec: str):
        torch.manual_seed(0)
        self.spec = spec
        options = SourceOptions() if spec == "default" else SourceOptions(
            num_classes=NUM_CLASSES, random_weights=True)
        self.source = create_source(spec, options)
        self.module = self.source.torch_module.eval()
        self.family = ARCHITECTURES[spec]
        self.vit = self.family.tokens
        info = self.source.info
        images = synthetic_images(BATCH, info.input_height, seed=1).astype(np.float32)
        images = (images - np.float32(info.mean_values)) / np.float32(info.scale_values)
        self.images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if self.family.batch_statistics:
            set_batch_statistics(self.module, self.images)
            self.source.model = convert_torch(self.module, info.input_height)
        self.num_classes = len(info.labels)
        with torch.no_grad():
            target = self.family.target(self.module, torch.from_numpy(self.images[:1]))
        if self.vit:  # [1, T, D]
            self.prefix = self.family.prefix(self.module)
            self.grid = self.family.grid(self.module, target.shape[1] - self.prefix)[0]
        else:  # [1, C, h, w]
            self.grid = target.shape[2]
            if self.family.exported_layout == "NHWC":
                target = target.permute(0, 2, 3, 1)
            elif self.family.exported_layout == "tokens":
                target = target.permute(0, 2, 3, 1).flatten(1, 2)
        self.target_shape = [-1] + list(target.shape[1:])
        self._compiled: dict = {}
        self._outputs: dict = {}
        self._prelogits: dict = {}
        self._randomised = None

    def compiled(self, settings: SaliencySettings):
        if settings not in self._compiled:
            model, insertion = insert_saliency(self.source.model, settings)
            # The same tensor as the torch reference's target, whatever the settings (a shape
            # check: different layers of these networks differ in channels or tokens).
            assert insertion.feature_shape == self.target_shape, (insertion, self.target_shape)
            self._compiled[settings] = (compile_f32(model), insertion)
        return self._compiled[settings]

    def run(self, settings: SaliencySettings, indices: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The exported model's outputs on images[indices], as one batch (cached)."""
        key = (settings, indices)
        if key not in self._outputs:
            compiled, _ = self.compiled(settings)
            outputs = compiled(self.images[list(indices)])
            self._outputs[key] = {
                "logits": outputs[compiled.outputs[0]],
                "saliency_map": outputs["saliency_map"].astype(np.float64),
            }
        return self._outputs[key]

    def saliency(self, settings: SaliencySettings, indices: tuple[int, ...]) -> np.ndarray:
        return self.run(settings, indices)["saliency_map"]

    def reference(self, settings: SaliencySettings, index: int = REF_IMAGE,
                  classifier=None) -> np.ndarray:
        key = ("-" if self.vit else settings.mosaic, settings.spread, index)
        if key not in self._prelogits:
            self._prelogits[key] = masked_prelogits(self.family, self.module, self.images[index],
                                                    settings.mosaic, settings.spread)
        prelogits, h, w = self._prelogits[key]
        if classifier is None:
            classifier = self.family.classifier(self.module)
        return maps_from_prelogits(prelogits, classifier, h, w, settings)

    def randomised(self):
        """(classifier, compiled default-settings model) with the last linear layers (both
        heads of a distilled pair) re-initialised."""
        if self._randomised is None:
            module = copy.deepcopy(self.module)
            torch.manual_seed(1234)
            for layer in self.family.last_layers(module):
                before = layer.weight.detach().clone()
                layer.reset_parameters()
                assert not torch.allclose(before, layer.weight)
            model, _ = insert_saliency(convert_torch(module, self.source.info.input_height),
                                       DEFAULT)
            self._randomised = (self.family.classifier(module), compile_f32(model))
        return self._randomised


@pytest.fixture(scope="module", params=SOURCES)
def case(request) -> Case:
    # Module-scoped and parametrised: pytest runs all tests of one source together and drops
    # it before converting the next.
    return Case(request.param)


def raw_tolerance(reference_raw: np.ndarray) -> float:
    return RAW_REL * float(np.abs(reference_raw).max())


def normalised_tolerance(raw_maps: np.ndarray, raw_tol: float, kind: str) -> np.ndarray:
    """Per-map tolerance [..., K, 1, 1] for maps normalised by `kind` whose un-normalised values
    are `raw_maps` and carry errors up to raw_tol (amplified by 1 / span)."""
    if kind == "none":
        return np.full(raw_maps.shape[:-2] + (1, 1), raw_tol)
    return NORMALISED_ABS + 4.0 * raw_tol / np.maximum(span(raw_maps, kind), 1e-30)


def assert_close(actual: np.ndarray, expected: np.ndarray, tol, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = np.abs(actual - expected)
    tol = np.broadcast_to(tol, diff.shape)
    worst = np.unravel_index((diff - tol).argmax(), diff.shape)
    assert diff[worst] <= tol[worst], (
        f"{what}: |diff| {diff[worst]:.3g} at {tuple(map(int, worst))} exceeds the tolerance "
        f"{tol[worst]:.3g} there (max |diff| {diff.max():.3g})"
    )


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each pair of maps over locations: [..., h, w] -> [...]."""
    def ranks(x):  # ties (the zeros of "centred" maps) get their average rank
        return rankdata(x.reshape(*x.shape[:-2], -1), axis=-1)
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))


# --- the checks -------------------------------------------------------------------------------

def test_output_shape(case: Case):
    _, insertion = case.compiled(DEFAULT)
    k, g = case.num_classes, case.grid
    assert insertion.method == ("vit-reciprocam" if case.vit else "reciprocam")
    assert insertion.map_shape == [-1, k, g, g]
    assert insertion.feature_shape == case.target_shape
    if case.vit:
        assert insertion.feature_shape[1] == case.prefix + g * g
    for indices in [(0,), tuple(range(BATCH))]:
        outputs = case.run(DEFAULT, indices)
        assert outputs["saliency_map"].shape == (len(indices), k, g, g)
        assert np.isfinite(outputs["saliency_map"]).all()
        assert outputs["logits"].shape == (len(indices), k)
    # The scores are still the network's (a fast path may compute them on the way).
    with torch.no_grad():
        expected = case.module(torch.from_numpy(case.images)).numpy()
    logits = case.run(DEFAULT, tuple(range(BATCH)))["logits"]
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_insertion_leaves_source_model_alone(case: Case):
    """insert_saliency returns a new model; the source keeps its outputs, its graph and its
    scores, so it can be given saliency again with other settings."""
    model = case.source.model

    def snapshot():
        return ([r.input_value(0).get_node().get_name() for r in model.get_results()],
                sorted(n.get_name() for n in model.get_ordered_ops()))

    before = snapshot()
    for settings in (DEFAULT, PAPER):
        new_model, insertion = insert_saliency(model, settings)
        assert snapshot() == before, f"insert_saliency({settings}) changed the source model"
        assert len(new_model.outputs) == len(model.outputs) + 1
        assert insertion.feature_shape == case.target_shape


def test_batch_matches_single(case: Case):
    batch = case.saliency(DEFAULT, tuple(range(BATCH)))
    raw_batch = case.saliency(raw(DEFAULT), tuple(range(BATCH)))
    for i in range(BATCH):
        single = case.saliency(DEFAULT, (i,))[0]
        tol = normalised_tolerance(raw_batch[i], raw_tolerance(raw_batch[i]),
                                   DEFAULT.normalize)
        assert_close(batch[i], single, tol, f"image {i} in a batch of {BATCH} vs alone")


@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_torch_reference(case: Case, name: str):
    settings = SETTINGS[name]
    expected_raw = case.reference(raw(settings))
    if settings == DEFAULT:
        # reuse the batch run of the batch test (same image, same model)
        actual_raw = case.saliency(raw(settings), tuple(range(BATCH)))[REF_IMAGE]
    else:
        actual_raw = case.saliency(raw(settings), (REF_IMAGE,))[0]
    raw_tol = raw_tolerance(expected_raw)
    assert_close(actual_raw, expected_raw, raw_tol, f"{name} settings, normalize=none")

    expected = case.reference(settings)
    actual = case.saliency(settings, (REF_IMAGE,))[0]
    assert_close(actual, expected,
                 normalised_tolerance(expected_raw, raw_tol, settings.normalize),
                 f"{name} settings, normalize={settings.normalize}")
    assert actual.min() >= -1e-6 and actual.max() <= 1 + 1e-6


def test_randomised_classifier_changes_maps(case: Case):
    randomised_classifier, compiled = case.randomised()
    image = case.images[REF_IMAGE:REF_IMAGE + 1]
    randomised = compiled(image)["saliency_map"][0].astype(np.float64)
    original = case.saliency(DEFAULT, (REF_IMAGE,))[0]

    # The comparison is meaningful only if both exports compute what they should: each agrees
    # with its own torch reference, so their difference is signal, not export noise.
    noise = 0.0
    for maps, classifier, what in [(original, None, "original"),
                                   (randomised, randomised_classifier, "randomised")]:
        expected_raw = case.reference(raw(DEFAULT), classifier=classifier)
        assert np.ptp(expected_raw, axis=(1, 2)).min() > 0, f"{what}: a map is constant"
        expected = case.reference(DEFAULT, classifier=classifier)
        tol = normalised_tolerance(expected_raw, raw_tolerance(expected_raw),
                                   DEFAULT.normalize)
        assert_close(maps, expected, tol, f"{what} classifier vs torch")
        noise = max(noise, float(np.abs(maps - expected).mean()))

    mean_abs = np.abs(original - randomised).mean()
    correlation = rank_correlation(original, randomised).mean()  # over the K class maps
    assert mean_abs > max(0.05, 10 * noise), (mean_abs, noise)
    assert correlation < 0.9, correlation


def test_int8_map_product_where_features_are_bounded(case: Case):
    """map_precision "auto" (the exporter's default) computes W @ F in int8 only where the graph
    bounds the features (Lite0's ReLU6, a Clamp); there the class scores are the f32 head's and
    every image's top-5 maps keep the f32 product's ranking and stay within 0.02 of it."""
    auto = replace(DEFAULT, map_precision="auto")
    _, insertion = case.compiled(auto)
    bounded = case.spec == "default"
    assert insertion.map_precision == ("int8" if bounded else "f32")
    if not bounded:
        with pytest.raises(InsertionError, match="--map-precision f32"):
            insert_saliency(case.source.model, replace(DEFAULT, map_precision="int8"))
        return
    batch = tuple(range(BATCH))
    exact, fast = case.run(DEFAULT, batch), case.run(auto, batch)
    np.testing.assert_allclose(fast["logits"], exact["logits"], rtol=1e-4,
                               atol=1e-4 * np.abs(exact["logits"]).max())
    top = np.argsort(-exact["logits"], axis=1)[:, :5]
    exact_maps = np.stack([exact["saliency_map"][i, c] for i, c in enumerate(top)])
    fast_maps = np.stack([fast["saliency_map"][i, c] for i, c in enumerate(top)])
    assert np.abs(fast_maps - exact_maps).max() <= 0.02
    assert rank_correlation(fast_maps, exact_maps).min() >= 0.99


def test_softmax_maps_of_a_model_ending_in_log_softmax():
    """A classifier whose last layer is log_softmax gives, with --score softmax, the maps of the
    same network without it (softmax of log-probabilities is the probabilities); its
    log-probabilities used to be taken for probabilities."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 12),
        torch.nn.ReLU(), torch.nn.Linear(12, 5))  # a head of two layers: the general path
    with_log_softmax = torch.nn.Sequential(backbone, torch.nn.LogSoftmax(dim=1))
    settings = replace(SOFTMAX, method="reciprocam", normalize="none")  # the probabilities
    images = synthetic_images(2, 64, seed=3).astype(np.float32).transpose(0, 3, 1, 2) / 255
    maps = []
    for module in (backbone, with_log_softmax):
        model, _ = insert_saliency(convert_torch(module, 64), settings)
        maps.append(compile_f32(model)(np.ascontiguousarray(images))["saliency_map"])
    assert maps[0].shape == (2, 5, 8, 8)
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-5)


def test_a_vit_that_averages_its_tokens_keeps_vit_reciprocam():
    """The tokens a ViT averages make a grid ReciproCAM can take (as it takes LeViT's), and
    `--method reciprocam` does (ActivationMap: their channel mean on the grid); `auto` keeps
    ViT-ReciproCAM, the method for transformers."""
    torch.manual_seed(0)
    module = timm.create_model("deit_tiny_patch16_224", num_classes=4, global_pool="avg")
    model = convert_torch(module, 224)
    _, insertion = insert_saliency(model, DEFAULT)
    assert insertion.method == "vit-reciprocam"
    assert insertion.feature_shape == [-1, 197, 192]  # the last block's input, CLS first
    _, insertion = insert_saliency(model, replace(DEFAULT, method="reciprocam"))
    assert insertion.feature_shape == [-1, 196, 192]  # the averaged patch tokens
    assert insertion.map_shape == [-1, 4, 14, 14]
    activation_model, insertion = insert_saliency(model, replace(DEFAULT, method="activationmap"))
    assert insertion.map_shape == [-1, 1, 14, 14]
    image = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        tokens = module.forward_features(torch.from_numpy(image))[0, 1:]  # what the head averages
    expected = tokens.mean(1).reshape(14, 14).double().numpy()
    actual = compile_f32(activation_model)(image)["saliency_map"][0, 0].astype(np.float64)
    assert_close(actual, normalise(expected, DEFAULT.normalize), 1e-4, "channel mean of tokens")


def branch_attention_queries(model) -> list[int]:
    """Query tokens of each attention in the saliency branch (the nodes only that output needs)."""
    (maps,) = [r for r in model.get_results() if "saliency_map" in r.output(0).get_names()]
    (scores,) = [r for r in model.get_results() if key(r) != key(maps)]
    branch = ancestors(maps.input_value(0)) - ancestors(scores.input_value(0))
    return [node.input_value(0).get_partial_shape()[2].get_length()
            for node in model.get_ordered_ops()
            if node.get_type_name() == "ScaledDotProductAttention" and key(node) in branch]


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_vit_branch_shortcuts_keep_the_maps(global_pool):
    """The branch re-runs the last block on h*w copies; where the head reads the class token
    alone, the copies compute that token's query only and the rest of the block on that token
    (DeiT-Tiny: 6x less time); a head that averages the patch tokens needs them all, and the
    shortcut, checked on a random input at export, is refused. Maps equal torch's either way."""
    torch.manual_seed(0)
    module = timm.create_model("deit_tiny_patch16_224", num_classes=4,
                               global_pool=global_pool).eval()
    model, insertion = insert_saliency(convert_torch(module, 224), DEFAULT)
    assert insertion.method == "vit-reciprocam"
    assert branch_attention_queries(model) == ([1] if global_pool == "token" else [197])
    image = synthetic_images(1, 224, seed=1).astype(np.float32) / 255.0
    image = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
    actual = compile_f32(model)(image)["saliency_map"][0].astype(np.float64)
    prelogits, h, w = masked_prelogits(VIT, module, image[0], DEFAULT.mosaic, DEFAULT.spread)
    expected = maps_from_prelogits(prelogits, VIT.classifier(module), h, w, DEFAULT)
    raw = maps_from_prelogits(prelogits, VIT.classifier(module), h, w,
                              replace(DEFAULT, normalize="none"))
    assert_close(actual, expected,
                 normalised_tolerance(raw, raw_tolerance(raw), DEFAULT.normalize), global_pool)
