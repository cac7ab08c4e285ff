"""White-box saliency methods inserted into an OpenVINO graph, one class per method.

Each method finds its target by the graph's structure and adds a `saliency_map` output
[N, K, h, w] (K = number of classes; 1 for the class-agnostic ActivationMap) that is correct for
every batch size N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from .graph import (
    InsertionError,
    LinearHead,
    Tail,
    activation_range,
    block_norm_output,
    const,
    constant_value,
    find_by_name,
    find_global_pool,
    find_last_transformer_block_input,
    global_pool_layout,
    key,
    linear_head,
    node_name,
    nodes_between,
    quantized_8bit,
    score_output,
    static_dims,
)

# Spread of a kept location over its 3x3 neighbourhood: the kernel of the ReciproCAM papers and of
# openvino-xai's ViT-ReciproCAM (centre weight 1/4). "local" mosaics rescale it to a unit sum, so
# only "paper" mosaics and ViT-ReciproCAM see its scale.
GAUSSIAN_3X3 = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32) / 16.0


@dataclass(frozen=True)
class SaliencySettings:
    """How the saliency branch is built. The defaults are the project's choice for
    localisation (see README, "Saliency"); `score="logit", mosaic="paper"` is the plain
    ReciproCAM formulation of the paper and openvino-xai."""

    method: str = "auto"
    target_layer: str | None = None
    # Class score read off each masked copy: raw logit or softmax probability (which saturates
    # at 1 for confident models, so the map's maximum becomes a plateau).
    score: Literal["logit", "softmax"] = "logit"
    # "local": each masked copy holds the kept location at full strength, as if the whole image
    # looked like it (the head's average pooling then sees the location's own feature);
    # "paper": zeros elsewhere, so pooling dilutes the location by 1/(h*w).
    mosaic: Literal["local", "paper"] = "local"
    spread: Literal["gaussian", "none"] = "gaussian"
    # Zero point and scale of each class map. "centred": the map's spatial mean is zero
    # (locations scoring below average are no evidence), negatives clipped, maximum 1.
    # "minmax": the weakest location is zero, the strongest 1 (openvino-xai).
    normalize: Literal["centred", "minmax", "none"] = "centred"
    # Arithmetic of the class-by-location product W @ F, the branch's whole cost on a small CNN
    # (1000 x 1280 x 49 multiply-adds on EfficientNet-Lite0, 16% of the network). "int8": u8
    # features over the range the graph guarantees (a Clamp such as ReLU6) times per-class int8
    # weights, a quarter of the f32 time on VNNI CPUs; the top classes' maps move by under 0.02
    # (README, "Cost"), the class scores stay f32. "auto": int8 where the features are bounded,
    # else f32.
    map_precision: Literal["auto", "f32", "int8"] = "auto"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Insertion:
    """What was inserted, for the model card and rt_info."""

    method: str
    target_layer: str
    feature_shape: list[int]
    map_shape: list[int]
    map_precision: str = "f32"


def neighbourhood_weights(h: int, w: int, spread: str) -> np.ndarray:
    """[h*w (mosaic k), h*w (location j)] weight of location j in mosaic k."""
    kernel = GAUSSIAN_3X3 if spread == "gaussian" else np.array(
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    weights = np.zeros((h * w, h * w), dtype=np.float32)
    for ky in range(h):
        for kx in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    y, x = ky + dy, kx + dx
                    if 0 <= y < h and 0 <= x < w:
                        weights[ky * w + kx, y * w + x] = kernel[dy + 1, dx + 1]
    return weights


def _minmax(x: ov.Output, axes: list[int]) -> ov.Output:
    lo = ops.reduce_min(x, const(axes), keep_dims=True)
    hi = ops.reduce_max(x, const(axes), keep_dims=True)
    span = ops.maximum(ops.subtract(hi, lo), const(1e-12, np.float32))
    return ops.divide(ops.subtract(x, lo), span).output(0)


def _centred(x: ov.Output, axes: list[int]) -> ov.Output:
    above = ops.relu(ops.subtract(x, ops.reduce_mean(x, const(axes), keep_dims=True)))
    peak = ops.maximum(ops.reduce_max(above, const(axes), keep_dims=True),
                       const(1e-12, np.float32))
    return ops.divide(above, peak).output(0)


NORMALIZERS = {"minmax": _minmax, "centred": _centred}


def _feature_dims(target: ov.Output, rank: int, option: str) -> list[int]:
    dims = static_dims(target)
    if len(dims) != rank or any(d is None for d in dims[1:]):
        raise InsertionError(
            f"target {node_name(target)!r} has shape {target.get_partial_shape()}, expected a "
            f"{rank}-D tensor with static non-batch dimensions; {option}"
        )
    return dims


def _scores_to_maps(scores: ov.Output, tail_ends_in_softmax: bool, hw: int, h: int, w: int,
                    settings: SaliencySettings) -> ov.Output:
    """[N*hw, K] scores of the masked copies -> [N, K, h, w] maps."""
    if settings.score == "softmax" and not tail_ends_in_softmax:
        scores = ops.softmax(scores, 1).output(0)
    k = static_dims(scores)[1]
    per_image = ops.reshape(scores, const([-1, hw, k]), special_zero=False)
    maps = ops.transpose(per_image, const([0, 2, 1])).output(0)
    return _finish_maps(maps, h, w, settings)


def _finish_maps(maps: ov.Output, h: int, w: int, settings: SaliencySettings) -> ov.Output:
    """[N, K, hw] class scores per location -> normalised [N, K, h, w]."""
    if settings.normalize in NORMALIZERS:
        maps = NORMALIZERS[settings.normalize](maps, [2])
    return ops.reshape(maps, const([0, 0, h, w]), special_zero=True).output(0)


class SaliencyMethod:
    """One white-box method: find the target tensor, build the `saliency_map` output."""

    name: ClassVar[str]

    def __init__(self, settings: SaliencySettings):
        self.settings = settings
        self.map_precision = "f32"  # what build() used; int8 only on ReciproCAM's linear path

    def find_target(self, model: ov.Model, scores: ov.Output) -> ov.Output:
        raise NotImplementedError

    def build(self, model: ov.Model, scores: ov.Output, target: ov.Output
              ) -> tuple[ov.Output, ov.Output | None]:
        """Return the saliency tensor, and a replacement for the scores when the method computes
        them more cheaply on the way (else None)."""
        raise NotImplementedError

    def insert(self, model: ov.Model) -> tuple[ov.Model, Insertion]:
        # The branch is built on a copy: it shares the copy's nodes, and a fast path rewires the
        # scores' Result below, which must not change the caller's model (inserting twice into
        # one source would otherwise find the wrong target or none).
        model = model.clone()
        scores = score_output(model)
        target = self.find_target(model, scores)
        saliency, new_scores = self.build(model, scores, target)
        if self.settings.map_precision == "int8" and self.map_precision != "int8":
            raise InsertionError(f"--map-precision int8 works for {ReciproCAM.name} on a head of "
                                 "average pooling and one linear layer only; give "
                                 "--map-precision f32")
        if new_scores is not None:
            for result in model.get_results():
                if key(result.input_value(0).get_node()) == key(scores.get_node()):
                    result.input(0).replace_source_output(new_scores)
        result = ops.result(saliency)
        result.output(0).get_tensor().set_names({"saliency_map"})
        result.set_friendly_name("saliency_map")
        new_model = ov.Model(list(model.get_results()) + [result], model.get_parameters(),
                             model.get_friendly_name())
        # Rewired nodes keep the shapes they had: the CPU plugin's passes read them, and a
        # branch that narrows its tokens failed to compile with the old ones.
        new_model.validate_nodes_and_infer_types()
        if model.has_rt_info("model_info"):
            new_model.set_rt_info(model.get_rt_info("model_info"), "model_info")
        return new_model, Insertion(
            method=self.name,
            target_layer=node_name(target),
            feature_shape=[d if d is not None else -1 for d in static_dims(target)],
            map_shape=[d if d is not None else -1 for d in static_dims(saliency)],
            map_precision=self.map_precision,
        )


TOKEN_GRIDS = ("tokens", "channels_tokens")  # pooled grids of tokens, as global_pool_layout says


def _layout(target: ov.Output) -> str:
    """The layout of a target as the global pooling it feeds reads it ("NCHW" where none does,
    as for most --target-layer choices)."""
    consumers = [i.get_node() for i in target.get_target_inputs()]
    layouts = {global_pool_layout(node) for node in consumers} - {None}
    return layouts.pop() if len(layouts) == 1 else "NCHW"


@dataclass(frozen=True)
class _FeatureMap:
    """A target as the branches compute on it, [N, C, h, w], whatever layout its head pools:
    [N, h, w, C] (Swin) is transposed, [N, h*w, C] tokens (LeViT) and [N, C, h*w] ones
    (SwiftFormer) reshaped to their grid."""

    features: ov.Output
    layout: str
    c: int
    h: int
    w: int

    @classmethod
    def of(cls, target: ov.Output) -> "_FeatureMap":
        layout = _layout(target)
        if layout == "channels_tokens":
            _, c, tokens = _feature_dims(target, 3, "give the [N, C, h*w] --target-layer")
            h = w = math.isqrt(tokens)
            grid = ops.reshape(target, const([0, c, h, w]), special_zero=True)
            return cls(grid.output(0), layout, c, h, w)
        if layout == "tokens":
            _, tokens, c = _feature_dims(target, 3, "give the [N, h*w, C] --target-layer")
            h = w = math.isqrt(tokens)
            grid = ops.reshape(target, const([0, h, w, c]), special_zero=True)
            return cls(ops.transpose(grid, const([0, 3, 1, 2])).output(0), layout, c, h, w)
        dims = _feature_dims(target, 4, "give a 4-D [N, C, h, w] --target-layer")
        if layout == "NHWC":
            _, h, w, c = dims
            return cls(ops.transpose(target, const([0, 3, 1, 2])).output(0), layout, c, h, w)
        return cls(target, layout, dims[1], dims[2], dims[3])

    def as_target(self, maps: ov.Output) -> ov.Output:
        """[M, C, h, w] (masked copies) back in the target's own layout, for its head."""
        if self.layout == "NCHW":
            return maps
        if self.layout == "channels_tokens":
            return ops.reshape(maps, const([-1, self.c, self.h * self.w]), False).output(0)
        channels_last = ops.transpose(maps, const([0, 2, 3, 1])).output(0)
        if self.layout == "NHWC":
            return channels_last
        return ops.reshape(channels_last, const([-1, self.h * self.w, self.c]), False).output(0)


def _ends_in_softmax(scores: ov.Output) -> bool:
    """Scores that are probabilities already. Not LogSoftmax: its log-probabilities still need
    the softmax (of which they are the logarithm, so softmax gives the probabilities back)."""
    return scores.get_node().get_type_name() == "Softmax"


class ReciproCAM(SaliencyMethod):
    """ReciproCAM (Byun and Lee 2022) for CNNs: re-run the head on h*w masked copies of the
    last feature map, one per location; the class scores of copy k form the map at k.

    When the head starts with global average pooling, pooling a masked copy is a weighted mean of
    the feature vectors, so the copies are never built: one [C, hw] x [hw, hw] product gives all
    pooled vectors and only the layers after pooling run at batch N*h*w."""

    name = "reciprocam"

    def find_target(self, model: ov.Model, scores: ov.Output) -> ov.Output:
        if self.settings.target_layer:
            return find_by_name(model, self.settings.target_layer)
        pool = find_global_pool(scores)
        if pool is None:  # no 4-D map: a grid of tokens (LeViT, SwiftFormer)
            pool = find_global_pool(scores, TOKEN_GRIDS)
        if pool is None:
            raise InsertionError(
                "no global pooling over a 4-D feature map or a square grid of tokens was found "
                "on the way to the scores; give --target-layer NAME (a [N, C, h, w] node), or "
                "--method vit-reciprocam for a transformer, or --method none"
            )
        return pool.input_value(0)

    def build(self, model: ov.Model, scores: ov.Output, target: ov.Output
              ) -> tuple[ov.Output, ov.Output | None]:
        feature_map = _FeatureMap.of(target)
        features, c, h, w = feature_map.features, feature_map.c, feature_map.h, feature_map.w
        hw = h * w
        weights = neighbourhood_weights(h, w, self.settings.spread)  # [k, j]
        consumers = [i.get_node() for i in target.get_target_inputs()]
        pool = consumers[0] if len(consumers) == 1 else None
        if pool is None or pool.get_type_name() not in {"ReduceMean", "AvgPool",
                                                         "AdaptiveAvgPool"} \
                or global_pool_layout(pool) is None:
            mosaics = feature_map.as_target(self._mosaics(features, weights))
            copy_scores = Tail(model, target, scores).run_on(mosaics)
            return _scores_to_maps(copy_scores, _ends_in_softmax(scores), hw, h, w,
                                   self.settings), None
        if self.settings.mosaic == "local":
            mix = weights / weights.sum(axis=1, keepdims=True)
        else:
            mix = weights / hw
        head = linear_head(pool, scores)
        if head is not None:
            return self._build_linear(features, head, mix, h, w)
        flat = ops.reshape(features, const([0, c, hw]), special_zero=True).output(0)
        pooled = ops.matmul(flat, const(mix.T, np.float32), False, False)  # [N, C, hw(k)]
        pooled = ops.transpose(pooled, const([0, 2, 1]))  # [N, hw, C]
        # As the pool gives them: [N*hw, C], or with the pooled axes kept, [.., 1, 1, ..].
        pooled_dims = [-1] + static_dims(pool.output(0))[1:]
        new_input = ops.reshape(pooled, const(pooled_dims), False)
        copy_scores = Tail(model, pool.output(0), scores).run_on(new_input.output(0))
        return _scores_to_maps(copy_scores, _ends_in_softmax(scores), hw, h, w,
                               self.settings), None

    def _build_linear(self, target: ov.Output, head: LinearHead, mix: np.ndarray, h: int,
                      w: int) -> tuple[ov.Output, ov.Output | None]:
        """Head = average pooling + one linear layer: the class scores of every location come
        from one product W @ F ([K, C] x [N, C, hw], a 1x1 convolution); the masked copies are
        a mix of those columns. Exact in f32, where the logits are read off the same product
        (their mean over locations), so the weights are read once."""
        hw = h * w
        int8 = self._int8_product(target, head)
        if int8 is not None:
            self.map_precision = "int8"
            per_location, columns = int8, mix.T  # the original head keeps the f32 logits
        else:
            weight = head.weight if head.weight_is_kc else ops.transpose(head.weight, const([1, 0]))
            per_location = self._conv1x1(target, ops.unsqueeze(weight, const([2, 3])).output(0))
            # Reading the logits off a ReduceMean followed by the bias Add gives wrong values for
            # N > 1 on OpenVINO 2026.4's CPU plugin; one more column of the mix does not.
            columns = np.concatenate([mix.T, np.full((hw, 1), 1.0 / hw)], axis=1)
        scores = ops.matmul(per_location, const(columns, np.float32), False, False).output(0)
        if head.bias is not None:
            scores = ops.add(scores, ops.reshape(head.bias, const([-1, 1]), False)).output(0)
        maps, logits = scores, None
        if int8 is None:
            maps = ops.slice(scores, const([0]), const([hw]), const([1]), const([2])).output(0)
            logits = ops.squeeze(ops.slice(scores, const([hw]), const([hw + 1]), const([1]),
                                           const([2])), const([2])).output(0)
        if self.settings.score == "softmax":
            maps = ops.softmax(maps, 1).output(0)
        return _finish_maps(maps, h, w, self.settings), logits

    @staticmethod
    def _conv1x1(target: ov.Output, weight: ov.Output) -> ov.Output:
        """[N, C, h, w] x [K, C, 1, 1] -> [N, K, hw]. A 1x1 convolution rather than a MatMul:
        the CPU plugin runs it about 25% faster at these shapes."""
        per_location = ops.convolution(target, weight, [1, 1], [0, 0], [0, 0], [1, 1])
        k = static_dims(weight)[0]
        return ops.reshape(per_location, const([0, k, -1]), special_zero=True).output(0)

    def _int8_product(self, target: ov.Output, head: LinearHead) -> ov.Output | None:
        """W @ F in int8 (FakeQuantize of the features over their guaranteed range, unless a
        model trained for INT8 has one there, per-class symmetric int8 weights), or None where
        map_precision or the graph rules it out."""
        wanted = self.settings.map_precision
        if wanted == "f32":
            return None
        bounds = activation_range(target)
        weight = constant_value(head.weight)
        if bounds is None or bounds[0] < 0 or weight is None:
            if wanted == "int8":
                raise InsertionError(
                    f"--map-precision int8 needs bounded features (a Clamp such as ReLU6) at "
                    f"{node_name(target)!r} and constant head weights; give --map-precision f32"
                )
            return None
        if not head.weight_is_kc:
            weight = weight.T
        scale = np.maximum(np.abs(weight).max(axis=1, keepdims=True), 1e-12) / 127.0
        quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        features = target  # a model trained for INT8 quantises them already
        if not quantized_8bit(target):
            low, high = const(bounds[0], np.float32), const(bounds[1], np.float32)
            features = ops.fake_quantize(target, low, high, low, high, 256).output(0)
        dequantized = ops.multiply(ops.convert(const(quantized[:, :, None, None], np.int8),
                                               np.float32),
                                   const(scale[:, :, None, None], np.float32))
        return self._conv1x1(features, dequantized.output(0))

    def _mosaics(self, features: ov.Output, weights: np.ndarray) -> ov.Output:
        """Any head: the masked copies themselves, [N*hw, C, h, w], for the head to re-run on."""
        _, c, h, w = static_dims(features)
        hw = h * w
        masks = weights.reshape(hw, h, w)
        if self.settings.mosaic == "local":
            masks = masks * hw / masks.reshape(hw, -1).sum(axis=1)[:, None, None]
        expanded = ops.unsqueeze(features, const([1]))  # [N, 1, C, h, w]
        mosaics = ops.multiply(expanded, const(masks[None, :, None], np.float32))
        return ops.reshape(mosaics, const([-1, c, h, w]), False).output(0)


class ViTReciproCAM(SaliencyMethod):
    """ViT-ReciproCAM (arXiv 2310.02588): mask the token sequence at the last transformer block
    (one spatial token spread over its 3x3 neighbours, prefix tokens such as CLS kept) and re-run
    that block, the final norm and the head at batch N*h*w.

    As the authors' code (openvino-xai) does, the mask is applied twice inside the block: to its
    input on the residual path and to the output of its first LayerNorm on the attention path.
    Masking only the input would let that LayerNorm scale every kept token back to full
    strength, so the spread's weights would not reach the attention. Where no LayerNorm opens the
    block (a --target-layer elsewhere), the input alone is masked.

    Re-running a whole block per location cost 14 times the network on DeiT-Tiny. Two shortcuts
    give the same scores for less: the attention's projections run once and are masked after
    (`_masked_projections`), and where the head reads the class token alone the copies compute only
    that token's query, MLP and norm (`_head_rows`, `_class_token_queries`). Each is kept only
    where it gives the plain construction's scores on a random input (`_Probe`)."""

    name = "vit-reciprocam"

    def find_target(self, model: ov.Model, scores: ov.Output) -> ov.Output:
        if self.settings.target_layer:
            return find_by_name(model, self.settings.target_layer)
        stream = find_last_transformer_block_input(model, scores)
        if stream is None:
            raise InsertionError(
                "no transformer blocks (LayerNorm + residual over [N, tokens, dim]) were found "
                "before the scores; give --target-layer NAME (the [N, tokens, dim] input of a "
                "block) or --method reciprocam for a CNN"
            )
        return stream

    def build(self, model: ov.Model, scores: ov.Output, target: ov.Output
              ) -> tuple[ov.Output, None]:
        _, tokens, dim = _feature_dims(target, 3, "give the [N, tokens, dim] --target-layer")
        side = math.isqrt(tokens)
        prefix = tokens - side * side
        if side < 2 or prefix > 8:
            raise InsertionError(
                f"target {node_name(target)!r} has {tokens} tokens, not a square grid plus a few "
                "prefix tokens; give --target-layer or --method none"
            )
        h = w = side
        hw = h * w
        weights = neighbourhood_weights(h, w, self.settings.spread)  # [k, j]
        token_masks = np.ones((hw, tokens), dtype=np.float32)
        token_masks[:, prefix:] = weights
        masks = const(token_masks[None, :, :, None], np.float32)

        def masked(tokens_: ov.Output) -> ov.Output:  # [N, T, C] -> [N*hw, T, C]
            copies = ops.multiply(ops.unsqueeze(tokens_, const([1])), masks)
            width = static_dims(tokens_)[2]
            return ops.reshape(copies, const([-1, tokens, width]), False).output(0)

        norm = block_norm_output(target)
        tail = Tail(model, target, scores)
        plain = [(target, masked(target))] + ([(norm, masked(norm))] if norm is not None else [])
        copy_scores = tail.run_with(plain)
        rows = self._head_rows(target, prefix)
        projections = self._masked_projections(norm, masked) if norm is not None else []
        queries = _class_token_queries(target, rows[0]) if rows and prefix == 1 else None
        if rows or projections:
            probe = _Probe(model)
            reference = probe.run(copy_scores)
            for edit in ([queries] if queries else []) + [None]:  # the fastest first
                candidate = tail.run_with(plain + projections, rows, edit)
                if probe.agree(probe.run(candidate), reference):
                    copy_scores = candidate
                    break
        return _scores_to_maps(copy_scores, _ends_in_softmax(scores), hw, h, w,
                               self.settings), None

    @staticmethod
    def _masked_projections(norm: ov.Output, masked) -> list[tuple[ov.Output, ov.Output]]:
        """Replacements for the projections of the normed tokens by constant weights (the
        attention's q, k, v): each reads its own output masked instead of projecting masked
        copies; scaling a token commutes with a linear map, so the projection runs once at
        batch N rather than on h*w copies."""
        replacements = []
        for consumer in norm.get_target_inputs():
            node = consumer.get_node()
            if node.get_type_name() == "MatMul" and consumer.get_index() == 0 \
                    and not node.get_attributes()["transpose_a"] \
                    and constant_value(node.input_value(1)) is not None:
                replacements.append((node.output(0), masked(node.output(0))))
        return replacements

    @staticmethod
    def _head_rows(target: ov.Output, prefix: int) -> tuple[ov.Output, list[int]] | None:
        """After the block's attention, where the head reads the prefix tokens only (a class
        token), the rest of the tail needs only those: its MLP, norm and head then run on
        `prefix` tokens per copy instead of all of them. The block's first residual sum."""
        sums = [i.get_node() for i in target.get_target_inputs()
                if i.get_node().get_type_name() == "Add"]
        if prefix == 0 or len(sums) != 1:
            return None
        return sums[0].output(0), list(range(prefix))


def _class_token_queries(target: ov.Output, block_sum: ov.Output):
    """An edit of the tail's clone (Tail.run_with) where the block's attention is one
    ScaledDotProductAttention whose output reaches the block's first residual sum through
    per-token layers only, and the head reads the class token alone: the attention then
    computes the class token's query only, against every token's key and value, and the reshapes
    on the way take any number of tokens. The sum broadcasts that one token over the stream's
    tokens, of which the clone keeps the class token's row (`rows`). None where the block is
    not of that form."""
    sdpas = [n for n in nodes_between(target, block_sum)
             if n.get_type_name() == "ScaledDotProductAttention"]
    if len(sdpas) != 1 or len(sdpas[0].inputs()) != 3 or sdpas[0].get_attributes()["causal"]:
        return None
    sdpa = sdpas[0]
    tokens = static_dims(target)[1]
    reshapes, node = [], sdpa
    while key(node) != key(block_sum.get_node()):
        consumers = list(node.output(0).get_target_inputs())
        if len(consumers) != 1 or len(node.outputs()) != 1:
            return None
        node = consumers[0].get_node()
        if node.get_type_name() == "Reshape":
            shape = constant_value(node.input_value(1))
            if shape is None or list(shape).count(tokens) != 1 or -1 in list(shape):
                return None
            reshapes.append((node, [-1 if d == tokens else int(d) for d in shape]))

    def edit(copy) -> None:
        query = copy(sdpa.input_value(0))
        copy(sdpa.output(0)).get_node().input(0).replace_source_output(
            ops.gather(query, const([0]), const(2)).output(0))
        for reshape, shape in reshapes:
            copy(reshape.output(0)).get_node().input(1).replace_source_output(
                const(shape).output(0))
    return edit


class _Probe:
    """A fixed random input (batch 2) on which constructions of the copies' scores are compared
    in f32: a cheaper one is kept only where it gives the plain one's scores. The shortcuts
    assume a head that reads the prefix tokens alone and tokens that nothing mixes after the
    attention, which the graph does not state and an architecture may break."""

    def __init__(self, model: ov.Model):
        (self.parameter,) = model.get_parameters()
        shape = self.parameter.get_partial_shape()
        self.input = None
        if all(d.is_static for d in list(shape)[1:]):
            dims = [2] + [d.get_length() for d in list(shape)[1:]]
            rng = np.random.default_rng(0)
            self.input = rng.integers(0, 256, dims).astype(np.uint8) \
                if self.parameter.get_element_type() == ov.Type.u8 \
                else rng.standard_normal(dims).astype(np.float32)

    def run(self, scores: ov.Output) -> np.ndarray | None:
        """The scores on the probe input; None where there is no static input or they fail."""
        if self.input is None:
            return None
        model = ov.Model([ops.result(scores)], [self.parameter])
        try:
            model.validate_nodes_and_infer_types()  # rewired nodes keep their old shapes
            compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            return compiled(self.input)[0]
        except RuntimeError:
            return None

    @staticmethod
    def agree(candidate: np.ndarray | None, reference: np.ndarray | None) -> bool:
        if candidate is None or reference is None or candidate.shape != reference.shape:
            return False
        scale = max(1.0, float(np.abs(reference).max()))
        return bool(np.allclose(candidate, reference, rtol=1e-4, atol=1e-4 * scale))


class ActivationMap(SaliencyMethod):
    """The cheapest map: the channel mean of the last feature map, class-agnostic ([N, 1, h, w])."""

    name = "activationmap"

    def find_target(self, model: ov.Model, scores: ov.Output) -> ov.Output:
        return ReciproCAM(self.settings).find_target(model, scores)

    def build(self, model: ov.Model, scores: ov.Output, target: ov.Output
              ) -> tuple[ov.Output, None]:
        features = _FeatureMap.of(target).features
        mean = ops.reduce_mean(features, const([1]), keep_dims=True).output(0)
        if self.settings.normalize in NORMALIZERS:
            mean = NORMALIZERS[self.settings.normalize](mean, [2, 3])
        return mean, None


METHODS: dict[str, type[SaliencyMethod]] = {
    cls.name: cls for cls in (ReciproCAM, ViTReciproCAM, ActivationMap)
}


def detect_method(model: ov.Model) -> str:
    """`auto`: a CNN (global pooling over a 4-D map) gets ReciproCAM, a transformer
    ViT-ReciproCAM, and a network that pools a grid of tokens without pre-norm transformer
    blocks (LeViT: no LayerNorm; SwiftFormer; Swin V2's norms come after its layers)
    ReciproCAM on those tokens. A ViT that averages its tokens keeps
    ViT-ReciproCAM, which re-runs its last block."""
    scores = score_output(model)
    if find_global_pool(scores) is not None:
        return ReciproCAM.name
    if find_last_transformer_block_input(model, scores) is not None:
        return ViTReciproCAM.name
    if find_global_pool(scores, TOKEN_GRIDS) is not None:
        return ReciproCAM.name
    raise InsertionError(
        "could not tell the architecture from the graph (no global pooling over a 4-D map or a "
        "grid of tokens, no transformer blocks); give --method reciprocam or vit-reciprocam "
        "with --target-layer NAME, or --method none (the server then explains the model with "
        "RISE)"
    )


def create_method(settings: SaliencySettings, model: ov.Model) -> SaliencyMethod:
    name = detect_method(model) if settings.method == "auto" else settings.method
    if name not in METHODS:
        raise InsertionError(
            f"--method {settings.method!r} is unknown; choose one of auto, none, "
            + ", ".join(METHODS)
        )
    return METHODS[name](settings)
