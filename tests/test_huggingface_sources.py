"""Hugging Face image classifiers as export sources: a `save_pretrained` folder (config.json,
model.safetensors, preprocessor_config.json), and Optimum's ONNX and OpenVINO files beside
those JSON files.

What a user relies on: the export needs no --labels, --mean, --scale or --input-size (the
folder's own files say them, checked against transformers' own image processors); the IR gives
the transformers model's logits on what its processor makes of the same images; its maps point
at the object on data whose truth is known (a CNN and a ViT trained in seconds); a dozen
architectures export with the method their kind needs; what cannot be exported is one line.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import openvino as ov
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import run_cli  # noqa: E402
from tests.synthetic import CLASSES, SIZE, fit, make_dataset  # noqa: E402
from tests.test_cli_hostile import one_line_error  # noqa: E402
from xaiserve.export.huggingface import (class_scores, pretrained_classifier,  # noqa: E402
                                         processor_settings)
from xaiserve.export.parity import compile_f32  # noqa: E402
from xaiserve.export.pipeline import ExportRequest, export_model  # noqa: E402
from xaiserve.export.sources import SourceError, SourceOptions, create_source  # noqa: E402
from xaiserve.service.model import ClassifierModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::torch.jit.TracerWarning")

def processor_json(processor) -> dict:
    """What save_pretrained writes for this processor."""
    return json.loads(processor.to_json_string())


def save(folder, model, processor) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def hf_logits(model, processor, images: np.ndarray) -> np.ndarray:
    """The transformers model's logits on what its own processor makes of u8 RGB images that
    are already at the input size (no resize, no crop)."""
    inputs = processor(list(images), do_resize=False, do_center_crop=False, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    return class_scores(output).numpy()


def ir_outputs(version, images: np.ndarray) -> dict[str, np.ndarray]:
    compiled = compile_f32(ov.Core().read_model(version / "model.xml"))
    result = compiled(images)
    return {name: result[compiled.output(name)] for name in ("logits", "saliency_map")}


# --- preprocessing read from preprocessor_config.json -----------------------------------------

def classifier_processor_classes() -> list[str]:
    """The image processor class of every model type transformers' AutoModelForImageClassification
    builds (its torchvision-based one where there are two)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    classes = (IMAGE_PROCESSOR_MAPPING_NAMES.get(t) or {}
               for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    return sorted({c.get("torchvision") or c.get("pil") for c in classes} - {None})


# processor classes whose models take something else than a fixed-size image (below)
NOT_PIXELS = ("ImageGPTImageProcessor", "TimmWrapperImageProcessor", "Siglip2ImageProcessor")
VARIANTS = {  # settings of some processors that their defaults do not exercise
    "convnext_crop_pct": ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}}),
    "efficientnet_offset": ("EfficientNetImageProcessor",
                            {"rescale_offset": True, "rescale_factor": 1 / 127.5,
                             "include_top": False}),
    "no_rescale": ("ViTImageProcessor", {"do_rescale": False, "image_mean": [100, 110, 120],
                                         "image_std": [50, 60, 70]}),
    "deit_crop": ("DeiTImageProcessor", {"size": {"height": 80, "width": 80},
                                         "crop_size": {"height": 64, "width": 64}}),
}


def assert_read_as_processed(processor) -> None:
    """The exporter's reading of a processor's file (input size; (p - mean) / scale; channel
    order) against the processor on the same pixels: a square photo comes out at the input
    size, and one at the input size is normalised as the settings say."""
    settings = processor_settings(processor_json(processor), type(processor).__name__)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
    assert processor(photo, return_tensors="np")["pixel_values"].shape[2:] \
        == (settings.height, settings.width)
    image = rng.integers(0, 256, (settings.height, settings.width, 3), dtype=np.uint8)
    expected = (image.astype(np.float64) - settings.mean_values) / settings.scale_values
    if settings.bgr:
        expected = expected[..., ::-1]
    ours = processor(image, do_resize=False, do_center_crop=False,
                     return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, expected.transpose(2, 0, 1), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in classifier_processor_classes()
                                  if n not in NOT_PIXELS])
def test_every_classifier_processor_is_read_as_it_processes(name):
    """Every image processor of transformers' image classifiers, with its defaults: what its
    file says is what it does (EfficientNet divides by the std twice, PP-LCNet reverses the
    channels and Perceiver crops before it resizes without the file saying so)."""
    assert_read_as_processed(getattr(transformers, name)())


def test_processors_of_models_that_take_no_fixed_image():
    """The three classes left out above: ImageGPT's gives colour-cluster ids, not pixels (its
    folder fails to convert, in one line); TimmWrapper's is built from a timm configuration (a
    timm folder exports through timm); Siglip2's takes images of any size in patches, and its
    file is refused for want of an input size."""
    assert set(NOT_PIXELS) <= set(classifier_processor_classes())
    clusters = np.random.default_rng(0).uniform(-1, 1, (16, 3))
    image = np.zeros((32, 32, 3), np.uint8)
    assert set(transformers.ImageGPTImageProcessor(clusters=clusters)(image)) == {"input_ids"}
    with pytest.raises(TypeError, match="pretrained_cfg"):
        transformers.TimmWrapperImageProcessor()
    with pytest.raises(SourceError, match="give --input-size"):
        processor_settings(processor_json(transformers.Siglip2ImageProcessor()), "siglip2")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_processor_settings_variants_are_read_as_they_process(variant):
    name, kwargs = VARIANTS[variant]
    assert_read_as_processed(getattr(transformers, name)(**kwargs))


# Values a hand-edited or damaged preprocessor_config.json may hold.
SETTING_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10 ** 6), st.text(max_size=4),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-3, 300), st.text(max_size=2)),
             max_size=4),
    st.dictionaries(st.sampled_from(["height", "width", "shortest_edge", "longest_edge"]),
                    st.one_of(st.integers(-2, 10 ** 5), st.floats(), st.text(max_size=2)),
                    max_size=3))
PROCESSOR_KEYS = ["size", "crop_size", "do_center_crop", "do_rescale", "rescale_factor",
                  "rescale_offset", "do_normalize", "image_mean", "image_std", "include_top",
                  "do_flip_channel_order", "image_processor_type"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(PROCESSOR_KEYS), SETTING_VALUES, max_size=8))
def test_any_processor_file_gives_usable_settings_or_one_line(processor):
    """Whatever the file holds: settings the IR can embed (a size of 1 to 8192 pixels, finite
    means, finite divisors other than 0), or a SourceError of one line naming the fix."""
    try:
        found = processor_settings(processor, "preprocessor_config.json")
    except SourceError as error:
        assert "\n" not in str(error) and "give --" in str(error)
        return
    assert 1 <= found.height <= 8192 and 1 <= found.width <= 8192
    assert all(np.isfinite(found.mean_values)) and len(found.mean_values) == 3
    assert all(np.isfinite(found.scale_values)) and all(v != 0 for v in found.scale_values)
    SourceOptions(input_size=found.height, mean_values=found.mean_values,
                  scale_values=found.scale_values)  # what the export checks options against


# --- trained on the synthetic shapes: the maps point at the object ----------------------------

def shapes_processor():
    """x = p / 255, as tests.synthetic.fit trains."""
    return transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE},
                                          image_mean=[0.0] * 3, image_std=[1.0] * 3)


def labelled(config_class, names, **kwargs):
    return config_class(num_labels=len(names), id2label=dict(enumerate(names)),
                        label2id={n: i for i, n in enumerate(names)}, **kwargs)


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory):
    """A transformers ResNet (8 x 8 last map at 64 px) trained on the shapes, saved as
    save_pretrained writes it, and exported by the real command from the folder alone."""
    torch.manual_seed(0)
    config = labelled(transformers.ResNetConfig, CLASSES, embedding_size=16,
                      hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    model = transformers.ResNetForImageClassification(config)
    images, labels, _ = make_dataset(1024, 0)
    fit(pretrained_classifier(model).train(), images, labels, 200, 3e-3, 0)
    work = tmp_path_factory.mktemp("hf_resnet")
    save(work / "resnet", model, shapes_processor())
    result = run_cli("export", str(work / "resnet"), "--repository", str(work / "models"),
                     "--name", "resnet")
    assert result.returncode == 0, result.stderr[-2000:]
    return model, work, json.loads(result.stdout)


def test_folder_exports_with_its_own_labels_and_preprocessing(trained_resnet):
    model, work, report = trained_resnet
    version = work / "models" / "resnet" / "1"
    assert (version / "labels.txt").read_text().split("\n")[:3] == list(CLASSES)
    assert report["preprocessing"]["mean_values"] == [0.0] * 3
    assert report["preprocessing"]["scale_values"] == pytest.approx([255.0] * 3)
    assert report["input"]["shape"] == [-1, SIZE, SIZE, 3]
    assert report["source"].endswith("(ResNetForImageClassification)")
    assert report["saliency"]["method"] == "reciprocam"
    assert report["saliency"]["feature_shape"][2:] == [8, 8]
    assert report["parity"]["max_abs_logit_diff"] < 1e-4
    images, _, _ = make_dataset(16, seed=5)
    np.testing.assert_allclose(ir_outputs(version, images)["logits"],
                               hf_logits(model, shapes_processor(), images), atol=1e-4)


def test_trained_cnn_map_points_at_the_object_as_served(trained_resnet):
    _, work, _ = trained_resnet
    served = ClassifierModel(work / "models" / "resnet" / "1").load()
    images, labels, masks = make_dataset(200, seed=123)
    out = served.predict(images)
    accuracy = (out["logits"].argmax(1) == labels).mean()
    assert accuracy > 0.9, f"the ResNet did not learn the task ({accuracy:.2f})"
    hits = 0
    for saliency, label, mask in zip(out["saliency_map"], labels, masks):
        up = cv2.resize(saliency[label], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        hits += bool(mask.flat[np.argmax(up)])
    assert hits / len(images) >= 0.9, f"map maximum inside the object for {hits}/{len(images)}"


@torch.no_grad()
def vit_reciprocam_in_torch(model, images: np.ndarray) -> np.ndarray:
    """ViT-ReciproCAM computed on transformers' own modules, [N, K, h, w] raw logits: the
    tokens entering the last layer, patch token j of copy k weighted by the 3 x 3 Gaussian
    spread of location k on the residual path and after the first LayerNorm, the rest of the
    layer, the final LayerNorm, the classifier on the class token."""
    from tests.test_saliency_architectures import location_masks

    vit, layer = model.vit, model.vit.layers[-1]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda _, args: captured.__setitem__("t", args[0]))
    try:
        model(pixel_values=torch.from_numpy(images))
    finally:
        hook.remove()
    maps = []
    for tokens in captured["t"]:  # [T, D]
        side = int(round((tokens.shape[0] - 1) ** 0.5))
        weights = torch.ones(side * side, tokens.shape[0])
        weights[:, 1:] = location_masks(side, side, "gaussian").reshape(side * side, -1)
        weights = weights[:, :, None]
        attended, _ = layer.attention(layer.layernorm_before(tokens)[None] * weights, None)
        copies = tokens[None] * weights + attended
        copies = copies + layer.mlp(layer.layernorm_after(copies))
        scores = model.classifier(vit.layernorm(copies)[:, 0])  # [hw, K]
        maps.append(scores.T.reshape(-1, side, side).numpy())
    return np.stack(maps)


def test_vit_maps_are_vit_reciprocam_computed_in_torch(tmp_path):
    """The branch inserted in transformers' ViT graph computes the method's formula on that
    model's own layers (un-normalised logit maps, f32)."""
    from xaiserve.export.saliency import SaliencySettings

    kwargs = ARCHITECTURES["vit"][2]
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(
        labelled(transformers.ViTConfig, ["a", "b", "c", "d", "e"], **kwargs)).eval()
    save(tmp_path / "vit", model, shapes_processor())
    result = export_model(ExportRequest(
        str(tmp_path / "vit"), tmp_path / "models", "vit",
        saliency=SaliencySettings(normalize="none", map_precision="f32")))
    images, _, _ = make_dataset(3, seed=11)
    ours = ir_outputs(result.path, images)["saliency_map"]
    reference = vit_reciprocam_in_torch(model, (images / np.float32(255)).transpose(0, 3, 1, 2))
    assert ours.shape == reference.shape == (3, 5, 4, 4)
    np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())


def test_tokens_pooled_channels_first_get_reciprocam_computed_in_torch(tmp_path):
    """SwiftFormer's head pools `x.flatten(2).mean(-1)`, [N, C, h*w] over its last axis, then
    averages two heads: ReciproCAM on that grid (plain formula: copy k keeps location k alone,
    un-normalised) is the heads' mean on feature vector k over h*w."""
    from xaiserve.export.saliency import SaliencySettings

    torch.manual_seed(0)
    config = labelled(transformers.SwiftFormerConfig, ["a", "b", "c"], depths=[1, 1, 1, 1],
                      embed_dims=[16, 24, 32, 48])
    model = transformers.SwiftFormerForImageClassification(config).eval()
    save(tmp_path / "swiftformer", model, shapes_processor())
    result = export_model(ExportRequest(
        str(tmp_path / "swiftformer"), tmp_path / "models", "s",
        saliency=SaliencySettings(mosaic="paper", spread="none", normalize="none",
                                  map_precision="f32")))
    assert result.card["saliency"]["feature_shape"] == [-1, 48, 4]
    images, _, _ = make_dataset(2, seed=13)
    ours = ir_outputs(result.path, images)["saliency_map"]
    with torch.no_grad():
        x = torch.from_numpy((images / np.float32(255)).transpose(0, 3, 1, 2))
        features = model.norm(model.swiftformer(x).last_hidden_state).flatten(2)  # [N, C, 4]
        copies = features.transpose(1, 2) / features.shape[2]  # [N, 4, C]: copy k pooled
        scores = (model.head(copies) + model.dist_head(copies)) / 2  # [N, 4, K]
    reference = scores.transpose(1, 2).reshape(2, 3, 2, 2).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5 * np.abs(reference).max())


CNN_HEADS = {  # model class, config, the head after the global mean of the last map
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
               lambda model, pooled: model.classifier(pooled)),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
                 lambda model, pooled: model.classifier(model.convnext.layernorm(pooled))),
}


@pytest.mark.parametrize("name", list(CNN_HEADS))
def test_cnn_maps_are_reciprocam_computed_in_torch(name, tmp_path):
    """ReciproCAM in transformers' CNN graphs (plain formula, un-normalised): copy k keeps
    location k of the last map alone, so the head reads its feature vector over h*w, through
    the LayerNorm ConvNeXt puts after the pooling."""
    from xaiserve.export.saliency import SaliencySettings

    model_class, config_class, kwargs, head = CNN_HEADS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(
        labelled(getattr(transformers, config_class), ["a", "b", "c"], **kwargs)).eval()
    save(tmp_path / name, model, shapes_processor())
    result = export_model(ExportRequest(
        str(tmp_path / name), tmp_path / "models", name,
        saliency=SaliencySettings(mosaic="paper", spread="none", normalize="none",
                                  map_precision="f32")))
    images, _, _ = make_dataset(2, seed=17)
    ours = ir_outputs(result.path, images)["saliency_map"]
    with torch.no_grad():
        x = torch.from_numpy((images / np.float32(255)).transpose(0, 3, 1, 2))
        base = getattr(model, model.base_model_prefix)
        features = base(x).last_hidden_state  # [N, C, h, w]
        n, c, h, w = features.shape
        copies = features.flatten(2).transpose(1, 2) / (h * w)  # [N, hw, C]
        scores = head(model, copies.reshape(n * h * w, c)).reshape(n, h * w, -1)
    reference = scores.transpose(1, 2).reshape(n, 3, h, w).numpy()
    assert ours.shape == reference.shape and h * w > 1
    np.testing.assert_allclose(ours, reference, atol=1e-5 * np.abs(reference).max())


def test_a_norms_mean_over_tokens_is_not_taken_for_the_heads_pooling():
    """A mean over the last axis of [N, C, h*w] that multiplies back into its tensor (an
    RMS norm's statistics) pools nothing: auto detection refuses rather than explain the wrong
    tensor."""
    from xaiserve.export.saliency import InsertionError, SaliencySettings, insert_saliency
    from xaiserve.export.sources import convert_torch

    class RmsThenLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)  # 16 x 16 -> 4 x 4
            self.head = torch.nn.Linear(8 * 16, 3)

        def forward(self, x):
            tokens = self.conv(x).flatten(2)  # [N, 8, 16]
            tokens = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.head(tokens.flatten(1))

    model = convert_torch(RmsThenLinear().eval(), 16)
    with pytest.raises(InsertionError, match="could not tell the architecture"):
        insert_saliency(model, SaliencySettings())


# --- Optimum's files: a model file with the JSON files beside it ------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
@pytest.mark.parametrize("form", ["onnx", "openvino"])
def test_optimum_export_folder_gives_labels_and_preprocessing(trained_resnet, tmp_path, form):
    """Optimum writes model.onnx (optimum-intel openvino_model.xml) with height and width free
    beside config.json and preprocessor_config.json: the export takes the labels, size and
    normalisation from those, and gives the same IR as from the model's folder."""
    model, work, _ = trained_resnet
    folder = tmp_path / "optimum"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(work / "resnet" / name, folder / name)
    onnx_file = tmp_path / "model.onnx"
    torch.onnx.export(pretrained_classifier(model), torch.zeros(1, 3, SIZE, SIZE), onnx_file,
                      input_names=["pixel_values"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}})
    if form == "onnx":
        source = shutil.copy(onnx_file, folder / "model.onnx")
    else:
        ov.save_model(ov.convert_model(onnx_file), folder / "openvino_model.xml",
                      compress_to_fp16=False)
        source = folder / "openvino_model.xml"
    assert ov.Core().read_model(source).inputs[0].get_partial_shape()[2].is_dynamic
    result = run_cli("export", str(source), "--repository", str(tmp_path / "models"),
                     "--name", form)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert "Hugging Face files beside it" in report["source"]
    assert report["input"]["shape"] == [-1, SIZE, SIZE, 3]
    assert report["preprocessing"]["scale_values"] == pytest.approx([255.0] * 3)
    version = tmp_path / "models" / form / "1"
    assert (version / "labels.txt").read_text().split("\n")[:3] == list(CLASSES)
    images, _, _ = make_dataset(6, seed=7)
    ours = ir_outputs(version, images)
    from_folder = ir_outputs(work / "models" / "resnet" / "1", images)
    np.testing.assert_allclose(ours["logits"], from_folder["logits"], atol=1e-4)
    np.testing.assert_allclose(ours["saliency_map"], from_folder["saliency_map"], atol=1e-4)


# --- architectures: each exports with its kind's method and the model's logits ----------------

ARCHITECTURES = {  # name -> (model class, config class, config, processor, method)
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=2,
                 num_attention_heads=3, intermediate_size=96),
            ("ViTImageProcessor", {"size": {"height": 64, "width": 64}}), "vit-reciprocam"),
    "deit_distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig",
                       dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=2,
                            num_attention_heads=3, intermediate_size=96),
                       ("DeiTImageProcessor", {"size": {"height": 72, "width": 72},
                                               "crop_size": {"height": 64, "width": 64}}),
                       "vit-reciprocam"),
    "beit": ("BeitForImageClassification", "BeitConfig",
             dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=2,
                  num_attention_heads=3, intermediate_size=96, use_mean_pooling=True),
             ("BeitImageProcessor", {"size": {"height": 64, "width": 64}}), "vit-reciprocam"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config",
               dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=2,
                    num_attention_heads=3),
               ("BitImageProcessor", {"size": {"shortest_edge": 64},
                                      "crop_size": {"height": 64, "width": 64}}),
               "vit-reciprocam"),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                  window_size=4),
             ("ViTImageProcessor", {"size": {"height": 64, "width": 64}}), "vit-reciprocam"),
    "swin_v2": ("Swinv2ForImageClassification", "Swinv2Config",
                dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                     window_size=4),
                ("ViTImageProcessor", {"size": {"height": 64, "width": 64}}), "reciprocam"),
    "swiftformer": ("SwiftFormerForImageClassification", "SwiftFormerConfig",
                    dict(depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48]),
                    ("ViTImageProcessor", {"size": {"height": 64, "width": 64}}), "reciprocam"),
    "pp_lcnet_scores_first": ("PPLCNetForImageClassification", "PPLCNetConfig", {},
                              ("ViTImageProcessor", {"size": {"height": 64, "width": 64}}),
                              "reciprocam"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1]),
                 ("ConvNextImageProcessor", {"size": {"shortest_edge": 64}}), "reciprocam"),
    "regnet": ("RegNetForImageClassification", "RegNetConfig",
               dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                    groups_width=8),
               ("ConvNextImageProcessor", {"size": {"shortest_edge": 64}}), "reciprocam"),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                     dict(depth_multiplier=0.35, image_size=64),
                     ("MobileNetV2ImageProcessor", {"size": {"shortest_edge": 64},
                                                    "crop_size": {"height": 64, "width": 64}}),
                     "reciprocam"),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     dict(image_size=64, width_coefficient=0.5, depth_coefficient=0.5,
                          hidden_dim=640),
                     ("EfficientNetImageProcessor", {"size": {"height": 64, "width": 64}}),
                     "reciprocam"),
    "mobilevit_bgr": ("MobileViTForImageClassification", "MobileViTConfig",
                      dict(image_size=64, hidden_sizes=[32, 40, 48],
                           neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]),
                      ("MobileViTImageProcessor", {"size": {"shortest_edge": 64},
                                                   "crop_size": {"height": 64, "width": 64}}),
                      "reciprocam"),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_exports_with_its_logits_and_maps(name, tmp_path):
    model_class, config_class, kwargs, (processor_class, processor_kwargs), method = \
        ARCHITECTURES[name]
    torch.manual_seed(0)
    config = labelled(getattr(transformers, config_class), ["a", "b", "c", "d", "e"], **kwargs)
    model = getattr(transformers, model_class)(config).eval()
    processor = getattr(transformers, processor_class)(**processor_kwargs)
    save(tmp_path / name, model, processor)
    result = export_model(ExportRequest(str(tmp_path / name), tmp_path / "models", name))
    card = result.card
    assert card["saliency"]["method"] == method
    assert card["input"]["shape"] == [-1, 64, 64, 3]
    assert card["num_classes"] == 5
    images, _, _ = make_dataset(3, seed=9)
    ours = ir_outputs(result.path, images)
    np.testing.assert_allclose(ours["logits"], hf_logits(model, processor, images), atol=2e-4)
    maps = ours["saliency_map"]
    assert maps.shape[:2] == (3, 5) and np.isfinite(maps).all()
    alone = ir_outputs(result.path, images[1:2])["saliency_map"]
    np.testing.assert_allclose(alone[0], maps[1], atol=1e-4)  # a batch changes no map


# --- timm models saved for the Hub ----------------------------------------------------------

def test_timm_hub_folder_exports_as_its_timm_architecture(tmp_path):
    """timm's save_for_hf (the layout of the timm/* repositories: config.json names the
    architecture and holds pretrained_cfg, label names; model.safetensors): the same IR as
    timm:<architecture> with --checkpoint of the same weights, with the folder's labels."""
    import timm

    torch.manual_seed(0)
    module = timm.create_model("resnet18", num_classes=3).eval()
    timm.models.save_for_hf(module, tmp_path / "resnet18", safe_serialization=True,
                            model_config={"label_names": ["n1", "n2", "n3"],
                                          "label_descriptions": dict(zip(["n1", "n2", "n3"],
                                                                         CLASSES))})
    torch.save(module.state_dict(), tmp_path / "resnet18.pth")
    from_folder = export_model(ExportRequest(str(tmp_path / "resnet18"), tmp_path / "models",
                                             "folder"))
    from_code = export_model(ExportRequest(
        "timm:resnet18", tmp_path / "models", "code",
        source_options=SourceOptions(checkpoint=tmp_path / "resnet18.pth", num_classes=3)))
    assert (from_folder.path / "labels.txt").read_text().split() == list(CLASSES)
    assert from_folder.card["source"].endswith("(timm resnet18)")
    for key in ("input", "preprocessing", "saliency"):
        assert from_folder.card[key] == from_code.card[key], key
    images = (np.random.default_rng(3).random((2, 224, 224, 3)) * 255).astype(np.uint8)
    ours, theirs = ir_outputs(from_folder.path, images), ir_outputs(from_code.path, images)
    for name in ("logits", "saliency_map"):
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5)


# --- what cannot be exported: one line naming the fix -----------------------------------------

@pytest.fixture(scope="module")
def tiny_vit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_refusals") / "vit"
    kwargs = ARCHITECTURES["vit"][2]
    torch.manual_seed(0)
    save(folder, transformers.ViTForImageClassification(transformers.ViTConfig(**kwargs)),
         transformers.ViTImageProcessor(size={"height": 64, "width": 64}))
    return folder


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def edit_json(path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


REFUSALS = {  # case -> (edit of a copy of the folder, options, what the message says)
    "custom code": (lambda f: edit_json(f / "config.json", auto_map={"x": "y.Z"}), {},
                    "runs no code from model folders"),
    "no processor file": (lambda f: (f / "preprocessor_config.json").unlink(), {},
                          "give --input-size, --mean and --scale"),
    "damaged weights": (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 100), {},
                        "transformers cannot load it"),
    "not an image classifier": (lambda f: edit_json(f / "config.json", model_type="bert",
                                                    architectures=["BertForMaskedLM"]), {},
                                "not an image classifier"),
    "damaged processor file": (lambda f: (f / "preprocessor_config.json").write_text("{"), {},
                               "not readable JSON"),
    "checkpoint": (lambda f: None, {"checkpoint": "w.pth"}, "holds its own weights"),
    "unknown timm architecture": (lambda f: edit_json(f / "config.json",
                                                      architecture="resnet_of_tomorrow"), {},
                                  "timm architecture 'resnet_of_tomorrow'"),
    "class count": (lambda f: None, {"num_classes": 7}, "--num-classes 7"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_folder_that_cannot_be_exported_is_one_line(case, tiny_vit_folder, tmp_path):
    edit, options, says = REFUSALS[case]
    folder = copy_of(tiny_vit_folder, tmp_path)
    edit(folder)
    with pytest.raises(SourceError, match=says) as error:
        create_source(str(folder), SourceOptions(**options))
    assert "\n" not in str(error.value)


def test_refusal_on_the_command_line(tiny_vit_folder, tmp_path):
    folder = copy_of(tiny_vit_folder, tmp_path)
    (folder / "preprocessor_config.json").unlink()
    result = run_cli("export", str(folder), "--repository", str(tmp_path / "models"),
                     "--name", "vit")
    one_line_error(result, "give --input-size, --mean and --scale", alone=False)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    # with them given, the same folder exports
    result = run_cli("export", str(folder), "--repository", str(tmp_path / "models"),
                     "--name", "vit", "--input-size", "64", "--mean", "127.5", "--scale",
                     "127.5")
    assert result.returncode == 0, result.stderr[-2000:]


def test_model_folder_in_a_served_repository_is_named_with_its_export(tiny_vit_folder,
                                                                      tmp_path):
    """A Hugging Face model's folder copied as a version folder (`vit/1/`) is not served; the
    server says so with the export command, which needs no options for it and serves."""
    shutil.copytree(tiny_vit_folder, tmp_path / "vit" / "1")
    check = run_cli("serve", "--repository", str(tmp_path), "--check-config")
    assert check.returncode == 0, check.stderr[-2000:]
    hint = [line for line in check.stderr.splitlines() if "no model.xml" in line]
    assert len(hint) == 1 and "its preprocessor_config.json gives the size, mean and scale" \
        in hint[0], check.stderr
    command = hint[0].split("run `xaiserve ", 1)[1].split("`")[0].split()
    assert command[:2] == ["export", str(tmp_path / "vit" / "1")]
    result = run_cli(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "vit" / "2" / "model.xml").is_file()
