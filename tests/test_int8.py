"""`xaiserve export --int8`: NNCF quantisation checked against the f32 IR, the gate that fails a
pipeline when INT8 drifts (exit 3, nothing written), and the INT8 IR served like any other."""

from __future__ import annotations

import json

import cv2
import numpy as np
import openvino as ov
import pytest
from scipy.stats import spearmanr

from tests.conftest import run_cli, runtime_convolutions
from tests.synthetic import make_dataset, small_cnn, train_small_cnn
from xaiserve.export.int8 import (Int8Settings, NncfExtras, gate_failures, load_images,
                                  one_level_noise, quantize, top1_hint)
from xaiserve.export.int8_agreement import (agreement, spearman, top1_agreement,
                                            top_fraction_iou)
from xaiserve.export.precision_pins import kept_in_f32
from xaiserve.export.reduced_precision import with_rounded_inputs
from xaiserve.service.client import XaiClient
from xaiserve.service.config import ServerSettings
from xaiserve.service.cpu_int8 import (cpu_flags, cpu_name, int8_dot_product, int8_weights,
                                       resolve_overflow_fix, saturating_layers,
                                       saturation_warning)
from xaiserve.service.layer_profile import measure_layers, shares
from xaiserve.service.model import ClassifierModel, compiled_precision, without_saliency
from xaiserve.service.model_info import ModelInfo
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.server import Server

SMALL = ("torch:tests.synthetic:small_cnn", "--input-size", "64", "--mean", "0,0,0",
         "--scale", "255,255,255")


def write_pngs(folder, images) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(folder)


def repository_is_empty(repo) -> bool:
    return not repo.exists() or not any(repo.rglob("*"))


def is_quantized(model: ov.Model) -> bool:
    return any(n.get_type_name() == "FakeQuantize" for n in model.get_ordered_ops())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The small CNN trained on synthetic shapes, and folders of its kind of images."""
    import torch

    work = tmp_path_factory.mktemp("int8_shapes")
    torch.save(train_small_cnn().state_dict(), work / "small_cnn.pth")
    return {
        "work": work,
        "checkpoint": str(work / "small_cnn.pth"),
        "calibration": write_pngs(work / "calibration", make_dataset(64, seed=5)[0]),
        "validation": write_pngs(work / "validation", make_dataset(120, seed=6)[0]),
        # what a broken data pipeline delivers: every calibration image black
        "black": write_pngs(work / "black", np.zeros((16, 64, 64, 3), np.uint8)),
    }


def export_small(shapes, repo, calibration, *extra):
    return run_cli("export", *SMALL, "--checkpoint", shapes["checkpoint"], "--repository",
                   str(repo), "--name", "shapes_int8", "--int8", "--calibration", calibration,
                   "--validation", shapes["validation"], *extra)


# --- the agreement metrics (pure functions) -----------------------------------------------------

def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    b = a + rng.normal(scale=0.5, size=(7, 7))
    a[a < 0] = 0  # clipped maps have many tied zeros
    assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.zeros(9), np.zeros(9)) == 1.0 and spearman(np.zeros(9), a[0]) == 0.0


def test_top_fraction_iou():
    a = np.arange(10.0)
    assert top_fraction_iou(a, a, 0.2) == 1.0
    assert top_fraction_iou(a, a[::-1], 0.2) == 0.0
    assert top_fraction_iou(a, np.r_[a[:8], a[9], a[8]], 0.3) == 1.0  # order inside the top
    assert top_fraction_iou(a, np.r_[a[:7], 100.0, a[8:]], 0.2) == pytest.approx(1 / 3)


def test_agreement_counts_flips_and_confident_images():
    reference = np.array([[5.0, 0, 0], [0, 0.1, 0], [0, 0, 9.0]])
    other = np.array([[4.0, 0, 0], [0.2, 0, 0], [0, 0, 8.0]])  # the unsure image flips
    maps = np.random.default_rng(1).random((3, 3, 4, 4))
    figures = agreement(reference, maps, other, maps)
    assert figures["top1_agreement"] == pytest.approx(2 / 3)
    assert figures["top1_drop"] == pytest.approx(1 / 3) and figures["top1_in_top5"] == 1.0
    assert figures["confident_images"] == 2 and figures["top1_agreement_confident"] == 1.0
    assert figures["saliency_rank_correlation"] == 1.0 and figures["saliency_top_iou"] == 1.0


# --- the gate ---------------------------------------------------------------------------------

def test_one_level_noise_is_at_most_one_grey_level():
    images = np.array([[[[0, 128, 255]]]] * 50, np.uint8)
    noisy = one_level_noise(images)
    step = noisy.astype(int) - images.astype(int)
    assert noisy.dtype == np.uint8 and np.abs(step).max() == 1
    assert (noisy[..., 0] <= 1).all() and (noisy[..., 2] >= 254).all()  # clipped, no wrap-around
    assert np.array_equal(noisy, one_level_noise(images))  # seeded


def test_overflow_fix_follows_the_cpus_int8_arithmetic(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2\n")
    flags = cpu_flags(cpuinfo)
    assert flags == {"fpu", "sse", "avx2", "fma"}  # the first processor's
    assert cpu_name(cpuinfo) == "AMD EPYC" and cpu_name(tmp_path / "missing") == "unknown"
    assert int8_dot_product(flags) == "saturating"
    assert resolve_overflow_fix("auto", flags) == "enable"  # 7-bit weights: no saturation
    vnni = flags | {"avx512_vnni"}
    assert int8_dot_product(vnni) == "vnni" and resolve_overflow_fix("auto", vnni) == "first-layer"
    assert int8_dot_product(frozenset({"avx_vnni"})) == "vnni"
    # where the system does not say, the safe choice: no CPU saturates with 7-bit weights
    assert cpu_flags(tmp_path / "missing") is None and int8_dot_product(None) == "unknown"
    assert resolve_overflow_fix("auto", None) == "enable"
    assert resolve_overflow_fix("disable", flags) == "disable"  # asked for: kept
    # the server's warning: 8-bit weights, a saturating CPU, and the model running on it
    warning = saturation_warning(["conv1", "conv2"], "saturating", "CPU")
    assert "2 layers (first: conv1)" in warning and "--overflow-fix enable" in warning
    assert saturation_warning(["conv1"], "saturating", "AUTO") is not None
    assert saturation_warning(["conv1"], "vnni", "CPU") is None
    assert saturation_warning(["conv1"], "saturating", "GPU") is None
    assert saturation_warning([], "saturating", "CPU") is None


def hint_figures(overflow_fix: str = "enable", int8_dot_product: str = "vnni",
                 bf16: float = 1.0) -> dict:
    """The report figures that the gate's top-1 hint reads, with nothing to hint at by default."""
    return {"f32_noise_floor": {"top1_agreement": 1.0}, "overflow_fix": overflow_fix,
            "reduced_precision": {"bf16": bf16, "f16": 1.0},
            "validation_cpu": {"name": "x", "int8_dot_product": int8_dot_product}}


def test_top1_failure_on_a_saturating_cpu_suggests_the_overflow_fix(tmp_path):
    settings = Int8Settings(calibration=tmp_path, max_top1_drop=0.05, overflow_fix="first-layer")
    figures = hint_figures("first-layer", "saturating")
    assert "--overflow-fix enable" in top1_hint(figures, settings)
    assert "bf16" not in top1_hint(figures, settings)
    for cpu, applied in (("vnni", "first-layer"), ("saturating", "enable")):
        figures.update(overflow_fix=applied,
                       validation_cpu={"name": "x", "int8_dot_product": cpu})
        assert "--overflow-fix" not in top1_hint(figures, settings)


def test_top1_failure_says_when_bf16_itself_changes_more_classes(tmp_path):
    """A drop bound that the AMX CPU's own default precision breaks is worth knowing about."""
    figures = hint_figures(bf16=0.96)
    tight = top1_hint(figures, Int8Settings(calibration=tmp_path, max_top1_drop=0.01))
    assert "bf16, the default precision on AMX CPUs, itself changes 0.0400" in tight
    loose = top1_hint(figures, Int8Settings(calibration=tmp_path, max_top1_drop=0.05))
    assert "bf16" not in loose
    # on a CPU with bf16 the export measures it rather than emulating it, and says that figure
    figures["at_default_precision"] = {"inference_precision": "bf16",
                                       "f32_ir_top1_agreement": 0.93}
    measured = top1_hint(figures, Int8Settings(calibration=tmp_path, max_top1_drop=0.05))
    assert "bf16, the default precision on AMX CPUs, itself changes 0.0700" in measured


def bf16_rounded(values: np.ndarray) -> np.ndarray:
    """f32 values rounded to the nearest bf16 (ties to even), as f32: the top 16 bits."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_rounded_inputs_compute_as_the_reduced_precision_does(precision):
    """A matrix product of values that bf16 and f16 cannot hold: the emulated model gives the
    product of the rounded inputs, summed in f32, and the model it was made from is unchanged."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 16)).astype(np.float32)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    inputs = ov.opset13.parameter([4, 64], ov.Type.f32, name="x")
    product = ov.opset13.matmul(inputs, ov.opset13.constant(weights), False, False)
    model = ov.Model([product], [inputs])
    rounding = bf16_rounded if precision == "bf16" else (
        lambda a: a.astype(np.float16).astype(np.float32))
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    emulated = core.compile_model(with_rounded_inputs(model, precision), "CPU", config)(x)[0]
    np.testing.assert_allclose(emulated, rounding(x) @ rounding(weights), rtol=1e-5, atol=1e-5)
    assert np.abs(emulated - x @ weights).max() > 1e-3  # the rounding is visible
    exact = core.compile_model(model, "CPU", config)(x)[0]
    np.testing.assert_allclose(exact, x @ weights, rtol=1e-5, atol=1e-5)


def test_top1_gate_allows_exactly_the_drop_given(tmp_path):
    """15 changed classes in 300 images are a drop of 5%: --max-top1-drop 0.05 lets them pass
    (1 - 285/300 is a little over 0.05 in floating point) and a 16th fails."""
    settings = Int8Settings(calibration=tmp_path, max_top1_drop=0.05)
    figures = hint_figures()
    reference = np.zeros((300, 10))
    reference[:, 0] = 1.0  # every image's top-1 class is 0
    for changed, failures in ((15, 0), (16, 1)):
        logits = reference.copy()
        logits[:changed, 1] = 2.0  # these images change their top-1 class to 1
        figures.update(agreement(reference, None, logits, None))
        assert len(gate_failures(figures, settings)) == failures, (changed, figures["top1_drop"])


def test_overflow_fix_stores_seven_bit_weights(shapes):
    """`enable` keeps every convolution's weights within 7 bits (what a CPU without VNNI sums
    without saturating); `disable` uses all 8; the report says which was applied, and on what
    kind of CPU the agreement was measured. The server finds the 8-bit layers when it loads the
    IR, and warns where this CPU's sums saturate."""
    seen, loaded = {}, {}
    for fix in ("enable", "disable"):
        repo = shapes["work"] / f"overflow_{fix}"
        result = export_small(shapes, repo, shapes["calibration"], "--overflow-fix", fix)
        assert result.returncode == 0, result.stderr[-3000:]
        figures = json.loads(result.stdout)["int8"]
        assert figures["settings"]["overflow_fix"] == fix and figures["overflow_fix"] == fix
        assert figures["validation_cpu"]["int8_dot_product"] in ("vnni", "saturating", "unknown")
        model = ov.Core().read_model(repo / "shapes_int8" / "1" / "model.xml")
        seen[fix] = int8_weight_ranges(model)[:3], saturating_layers(without_saliency(model))
        loaded[fix] = ClassifierModel(repo / "shapes_int8" / "1").load()
    assert all(r is not None and r <= 64 for r in seen["enable"][0]), seen
    assert all(r is not None and r > 64 for r in seen["disable"][0]), seen
    assert seen["enable"][1] == [] and len(seen["disable"][1]) == 3, seen
    saturating = int8_dot_product(cpu_flags()) == "saturating"
    assert loaded["enable"].warnings == []
    assert len(loaded["disable"].warnings) == saturating, loaded["disable"].warnings


def test_gate_passes_with_a_good_calibration_set(shapes):
    repo = shapes["work"] / "good"
    result = export_small(shapes, repo, shapes["calibration"], "--max-top1-drop", "0.05",
                          "--min-saliency-agreement", "0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # NNCF's bars and logs stay off stdout
    figures = report["int8"]
    assert report["precision"] == "int8" and figures["gate"]["passed"]
    assert figures["images"] == 120 and figures["calibration_images"] == 64
    assert figures["top1_drop"] <= 0.05 + 1e-9 and figures["saliency_rank_correlation"] >= 0.8
    assert not figures["validation_is_calibration"]
    expected = resolve_overflow_fix("auto", cpu_flags())
    assert figures["settings"]["overflow_fix"] == "auto" and figures["overflow_fix"] == expected
    card = json.loads((repo / "shapes_int8" / "1" / "model_card.json").read_text())
    assert card["int8"] == figures

    model = ov.Core().read_model(repo / "shapes_int8" / "1" / "model.xml")
    assert is_quantized(model)
    assert int8_convolutions(model)[:3] == [True, True, True]
    images, labels, _ = make_dataset(32, seed=9)
    out = ov.Core().compile_model(model, "CPU")(images)
    assert out["saliency_map"].shape == (32, 3, 16, 16)
    assert (out["logits"].argmax(1) == labels).mean() > 0.9  # the INT8 model still works


def convolutions(model: ov.Model) -> list[ov.Node]:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == "Convolution"]


def int8_convolutions(model: ov.Model) -> list[bool]:
    """Per convolution, in graph order: whether its weights are stored as INT8 (an i8 constant
    that Convert and Multiply decompress) rather than as a float constant."""
    return [int8_weights(c) is not None for c in convolutions(model)]


def int8_weight_ranges(model: ov.Model) -> list[int | None]:
    """Per convolution, the largest magnitude of its INT8 weights (None when not INT8)."""
    return [None if w is None else int(np.abs(w.astype(np.int16)).max())
            for w in map(int8_weights, convolutions(model))]


def test_keep_f32_first_leaves_the_first_layers_in_f32(shapes):
    repo = shapes["work"] / "keep_f32"
    result = export_small(shapes, repo, shapes["calibration"], "--keep-f32-first", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)["int8"]
    assert figures["settings"]["keep_f32_first"] == 0.5
    model = ov.Core().read_model(repo / "shapes_int8" / "1" / "model.xml")
    # the backbone's three convolutions: the first stays f32, the later two are INT8
    assert int8_convolutions(model)[:3] == [False, True, True]
    first = convolutions(model)[0].get_friendly_name()
    assert figures["f32_layers"] == [first]
    assert figures["int8_layer_count"] == 2
    assert figures["top1_agreement"] >= 0.9
    # and it computes in f32 on every device, not in bf16 where that is the default (AMX)
    assert first in kept_in_f32(model)
    assert json.loads(result.stdout)["kept_in_f32"]["operations"] == len(kept_in_f32(model))
    compiled = ov.Core().compile_model(model, "CPU")
    assert [precision for names, precision in runtime_convolutions(compiled)
            if first in names] == ["f32"]


def test_nncf_extras_reach_the_export_quantisation(shapes):
    """benchmarks/int8_frontier.py measures NNCF options the export does not offer through the
    export's own `quantize`: an operation type it names stays f32, the rest is quantised."""
    repo = shapes["work"] / "f32_for_extras"
    result = run_cli("export", *SMALL, "--checkpoint", shapes["checkpoint"], "--repository",
                     str(repo), "--name", "shapes")
    assert result.returncode == 0, result.stderr[-3000:]
    model = ov.Core().read_model(repo / "shapes" / "1" / "model.xml")
    info = ModelInfo.from_model(model)
    images = load_images(shapes["calibration"], info, 32, "--calibration")
    settings = Int8Settings(calibration=shapes["calibration"])
    plain = quantize(model, info.saliency_target_layer, images, settings, "enable")
    kept = quantize(model, info.saliency_target_layer, images, settings, "enable",
                    extras=NncfExtras(ignored_types=("Convolution",)))
    assert int8_convolutions(plain)[:3] == [True, True, True]
    assert int8_convolutions(kept)[:3] == [False, False, False]


def test_gate_fails_on_a_black_calibration_set(shapes):
    repo = shapes["work"] / "bad"
    report_file = shapes["work"] / "gate.json"
    result = export_small(shapes, repo, shapes["black"], "--max-top1-drop", "0.05",
                          "--min-saliency-agreement", "0.8", "--report", str(report_file))
    assert result.returncode == 3, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["status"] == "gate_failed" and report == json.loads(report_file.read_text())
    top1 = [f for f in report["failures"] if "--max-top1-drop" in f]
    assert top1 and "--keep-f32-first" in top1[0]  # the failure says what to try
    assert report["int8"]["top1_drop"] > 0.05
    assert "INT8 gate failed" in result.stderr and "nothing was written" in result.stderr
    assert repository_is_empty(repo)


def test_accuracy_control_reverts_layers_only_as_far_as_the_drop_needs(shapes):
    """With the good calibration set INT8 already meets the drop and every convolution stays
    INT8; with the black one that fails the gate above, accuracy control puts layers back in
    f32 until at most 5% of the control images change class, and the export is written."""
    for calibration, name in ((shapes["calibration"], "good"), (shapes["black"], "black")):
        repo = shapes["work"] / f"accuracy_control_{name}"
        result = export_small(shapes, repo, calibration, "--max-top1-drop", "0.05",
                              "--accuracy-control", "--control", shapes["calibration"])
        assert result.returncode == 0, result.stderr[-3000:]
        figures = json.loads(result.stdout)["int8"]
        assert figures["gate"]["passed"] and figures["top1_drop"] <= 0.05 + 1e-9
        assert figures["settings"]["control"] == shapes["calibration"]
        assert figures["accuracy_control"] == {"control_images": 64,
                                               "control_is_validation": False}
        model = ov.Core().read_model(repo / "shapes_int8" / "1" / "model.xml")
        stored_int8 = int8_convolutions(model)[:3]
        assert figures["f32_layers"] == [c.get_friendly_name() for c, q in
                                         zip(convolutions(model), stored_int8) if not q]
        assert figures["int8_layer_count"] == sum(stored_int8)
        all_f32 = "the IR computes in f32" in figures.get("note", "")
        assert all_f32 == (sum(stored_int8) == 0)
        if name == "good":
            assert stored_int8 == [True, True, True]
        else:
            assert not all(stored_int8)


# --- quantisation-aware training (--finetune-steps) ----------------------------------------------

def test_distillation_pulls_a_drifted_int8_model_back_to_f32(shapes):
    """The training loop does its job: an INT8 model whose weights have drifted from f32's
    (noise added after NNCF's quantisation) agrees with f32 on far more images after a short
    distillation, and its loss falls."""
    import torch

    from xaiserve.export.int8_finetune import augmented_batches, distil, quantize_torch
    from xaiserve.export.parity import torch_input, torch_logits

    teacher = small_cnn()
    teacher.load_state_dict(torch.load(shapes["checkpoint"]))
    teacher.eval()
    info = ModelInfo(labels=["a", "b", "c"], input_height=64, input_width=64,
                     scale_values=[255.0] * 3)
    train, _, _ = make_dataset(128, seed=5)
    held_out, _, _ = make_dataset(200, seed=6)
    student = quantize_torch(teacher, torch_input(train, info), keep_f32_first=0,
                             overflow_fix="enable")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim == 4:  # convolution weights
                p.add_(torch.randn_like(p) * p.std())
    reference = torch_logits(teacher, held_out, info)
    drifted = top1_agreement(reference, torch_logits(student, held_out, info))
    losses = distil(student, teacher, augmented_batches(train, 16), info, steps=60,
                    learning_rate=3e-3)
    trained = top1_agreement(reference, torch_logits(student, held_out, info))
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6]), losses
    assert drifted < 0.85, drifted
    assert trained >= drifted + 0.1, (drifted, trained)


def test_finetuned_int8_export_writes_an_int8_ir_with_its_saliency_map(shapes):
    repo = shapes["work"] / "finetuned"
    result = export_small(shapes, repo, shapes["calibration"], "--finetune-steps", "12",
                          "--finetune-lr", "1e-4", "--finetune-batch", "8",
                          "--max-top1-drop", "0.05", "--min-saliency-agreement", "0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)["int8"]
    assert figures["finetune"]["steps"] == 12 and figures["gate"]["passed"]
    # the weights train, not only the quantisers' ranges
    weights = sum(p.numel() for p in small_cnn().parameters())
    assert figures["finetune"]["trained_parameters"] > weights
    assert 0 <= figures["finetune"]["top1_agreement_before_training"] <= 1
    assert figures["settings"]["finetune_steps"] == 12
    assert figures["int8_layer_count"] == 3 and figures["f32_layers"] == []
    model = ov.Core().read_model(repo / "shapes_int8" / "1" / "model.xml")
    assert is_quantized(model) and int8_convolutions(model)[:3] == [True, True, True]
    # The classifier (a MatMul) stays f32. The saliency branch's map product (the fourth
    # convolution) reads the features the trained model quantises already, so it is INT8, as
    # the post-training export's is behind a Clamp; an f32 product cost about 0.1 of the f32
    # IR's latency on the default model.
    classifier = [n for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"]
    assert classifier and all(int8_weights(n) is None for n in classifier)
    product = convolutions(model)[3]
    assert product.input_value(0).get_node().get_type_name() == "FakeQuantize"
    assert int8_weights(product) is not None
    loaded = ClassifierModel(repo / "shapes_int8" / "1").load()
    assert loaded.info.saliency_target_layer in {n.get_friendly_name()
                                                 for n in model.get_ordered_ops()}
    card = json.loads((repo / "shapes_int8" / "1" / "model_card.json").read_text())
    assert card["saliency"]["map_precision"] == loaded.info.saliency_map_precision == "int8"
    images, labels, _ = make_dataset(32, seed=9)
    out = ov.Core().compile_model(model, "CPU")(images)
    assert out["saliency_map"].shape == (32, 3, 16, 16)
    assert (out["logits"].argmax(1) == labels).mean() > 0.9


def test_finetune_needs_a_torch_source(shapes, tmp_path):
    """An IR has no weights to train: exit 2, one line naming the option, nothing written."""
    ir = tmp_path / "f32"
    assert run_cli("export", *SMALL, "--checkpoint", shapes["checkpoint"], "--method", "none",
                   "--repository", str(ir), "--name", "small").returncode == 0
    repo = tmp_path / "models"
    result = run_cli("export", str(ir / "small" / "1" / "model.xml"), "--repository", str(repo),
                     "--name", "x", "--int8", "--calibration", shapes["calibration"],
                     "--finetune-steps", "5")
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("xaiserve export:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "--finetune-steps needs a torch source" in lines[0]
    assert repository_is_empty(repo)


def test_int8_on_host_judges_copied_irs_without_the_package(shapes, tmp_path):
    """benchmarks/int8_on_host.py, run as on a bare host (a copy of the IRs and images, no
    xaiserve import): the f32 IR agrees with itself, the INT8 IR is judged per folder and
    timed against the reference at batch 1 and a larger batch, a decoding difference would be
    reported, and a bad batch list exits 2 naming the option."""
    import hashlib
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    repo = tmp_path / "models"
    assert run_cli("export", *SMALL, "--checkpoint", shapes["checkpoint"], "--repository",
                   str(repo), "--name", "f32").returncode == 0
    assert export_small(shapes, repo, shapes["calibration"]).returncode == 0
    payload = tmp_path / "payload"
    for name, source in (("f32", "f32"), ("int8", "shapes_int8")):
        (payload / "irs" / name).mkdir(parents=True)
        for suffix in ("xml", "bin"):
            shutil.copy(repo / source / "1" / f"model.{suffix}", payload / "irs" / name)
    images = make_dataset(24, seed=11)[0]
    write_pngs(payload / "images" / "shapes", images)
    (payload / "images_sha.json").write_text(json.dumps(
        {"shapes": hashlib.sha256(images.tobytes()).hexdigest()}))
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_on_host.py"),
                             str(payload), "--json", str(out), "--seconds", "0.4",
                             "--rounds", "2", "--batch", "1,32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["folders"] == {"shapes": {"images": 24, "decoded_as_on_export_machine": True}}
    reference = figures["agreement"]["f32 (default)"]
    if reference["inference_precision"] == "f32":
        assert reference["shapes"]["top1_agreement"] == 1.0
        assert reference["shapes"]["saliency_rank_correlation"] > 0.999
    exact = figures["agreement"]["int8 (exact)"]
    assert exact["inference_precision"] == "f32" and exact["shapes"]["top1_agreement"] >= 0.9
    assert 0.9 <= exact["shapes"]["saliency_rank_correlation"] <= 1.0
    timing = figures["latency"]
    assert timing["f32, default"]["p50_over_reference_at_default_precision"] == 1.0
    assert timing["int8, default"]["requests"] > 0 and timing["f32, f32"]["p50_ms"] > 0
    batch32 = figures["larger_batches"]["32"]  # more images than the folder holds: repeated
    assert batch32["f32, default"]["p50_over_reference_at_default_precision"] == 1.0
    assert batch32["int8, default"]["images_per_s"] > 0
    assert "int8, default" in result.stdout and "batch-32" in result.stdout  # the summary
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_on_host.py"),
                          str(payload), "--json", str(out), "--batch", "0,8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--batch" in bad.stderr.splitlines()[-1]


def test_bad_int8_options(shapes, tmp_path, capsys):
    """Checked before the source loads: one line naming the option, exit 2, nothing written."""
    from xaiserve.service.cli import main

    repo = tmp_path / "models"
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no pictures here")
    corrupt = tmp_path / "corrupt"
    write_pngs(corrupt, make_dataset(4, seed=1)[0])
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cases = [
        (["--int8"], "--calibration DIR"),
        (["--calibration", shapes["calibration"]], "--int8"),
        (["--int8", "--calibration", str(tmp_path / "missing")], "--calibration"),
        (["--int8", "--calibration", str(empty)], "no images"),
        (["--int8", "--calibration", shapes["calibration"], "--max-top1-drop", "5"],
         "--max-top1-drop"),
        (["--int8", "--calibration", shapes["calibration"], "--method", "none",
          "--min-saliency-agreement", "0.9"], "--min-saliency-agreement"),
        (["--int8", "--calibration", shapes["calibration"], "--keep-f32-first", "1"],
         "--keep-f32-first"),
        (["--int8", "--calibration", shapes["calibration"], "--overflow-fix", "always"],
         "--overflow-fix"),
        (["--int8", "--calibration", shapes["calibration"], "--accuracy-control"],
         "--max-top1-drop"),
        (["--int8", "--calibration", shapes["calibration"], "--control",
          shapes["validation"]], "--accuracy-control"),
        (["--int8", "--calibration", shapes["calibration"], "--accuracy-control",
          "--max-top1-drop", "0.01", "--control", str(empty)], "--control"),
        (["--accuracy-control"], "--int8"),
        (["--finetune-steps", "5"], "--int8"),
        # a gate without --int8 would gate nothing: a pipeline must not believe it passed one
        (["--max-top1-drop", "0.01"], "--max-top1-drop: goes with --int8"),
        (["--min-saliency-agreement", "0.9", "--preset", "mixed"],
         "--preset, --min-saliency-agreement: go with --int8"),
        (["--int8", "--calibration", shapes["calibration"], "--finetune-steps", "-1"],
         "--finetune-steps"),
        (["--int8", "--calibration", shapes["calibration"], "--finetune-steps", "5",
          "--accuracy-control", "--max-top1-drop", "0.1"], "--finetune-steps"),
        (["--int8", "--calibration", shapes["calibration"], "--finetune-steps", "5",
          "--finetune-lr", "0"], "--finetune-lr"),
        (["--int8", "--calibration", shapes["calibration"], "--finetune-steps", "5",
          "--no-fast-bias-correction"], "--no-fast-bias-correction"),
        (["--int8", "--calibration", shapes["calibration"], "--finetune-steps", "5",
          "--finetune-batch", "0"], "--finetune-batch"),
        (["--int8", "--calibration", str(corrupt)], "broken.jpg"),  # found while loading
    ]
    for options, words in cases:
        code = main(["export", *SMALL, "--repository", str(repo), "--name", "x", *options])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("xaiserve export:")]
        assert code == 2 and len(lines) == 1, (options, err[-2000:])
        assert words in lines[0], lines[0]
        assert repository_is_empty(repo)


# --- the default model on real photos, served --------------------------------------------------

@pytest.fixture(scope="module")
def default_int8(tmp_path_factory):
    from calibration_photos import write_folder

    work = tmp_path_factory.mktemp("int8_default")
    write_folder(work / "calibration", count=40, seed=0)
    write_folder(work / "validation", count=40, seed=1)
    repo = work / "models"
    result = run_cli("export", "default", "--int8", "--calibration", str(work / "calibration"),
                     "--validation", str(work / "validation"), "--min-saliency-agreement",
                     "0.9", "--repository", str(repo), "--name", "lite0_int8")
    assert result.returncode == 0, result.stderr[-3000:]
    return repo, json.loads(result.stdout)


def test_default_model_int8_agrees_with_f32(default_int8):
    repo, report = default_int8
    figures = report["int8"]
    assert figures["saliency_rank_correlation"] >= 0.9
    assert figures["saliency_top_iou"] >= 0.7
    # Flips happen on images the f32 model itself is unsure of; sure ones keep their class.
    assert figures["confident_images"] >= 5 and figures["top1_agreement_confident"] >= 0.95
    assert figures["top1_agreement"] >= 0.7
    assert 0.0 <= figures["f32_noise_floor"]["top1_agreement"] <= 1.0
    # bf16 rounds to 8 significant bits, f16 to 11: f16 keeps at least as many classes
    kept = figures["reduced_precision"]
    assert 0.7 <= kept["bf16"] <= kept["f16"] <= 1.0, kept
    model = ov.Core().read_model(repo / "lite0_int8" / "1" / "model.xml")
    assert is_quantized(model)
    # The pixels are made NCHW before the mean is taken, so the input's quantiser fuses into a
    # planar eltwise on the CPU rather than a 3-channel NHWC one (export/preprocessing.py).
    first = next(n for n in model.get_ordered_ops() if n.get_type_name() == "FakeQuantize")
    assert list(first.get_output_partial_shape(0).get_max_shape())[1:] == [3, 224, 224]
    # What a server on this CPU computes by default (bf16 around the INT8 layers on AMX).
    served = figures["at_default_precision"]
    precision = compiled_precision(ov.Core().compile_model(model, "CPU"))
    assert served["inference_precision"] == precision
    if precision != "f32":
        assert served["map_inference_precision"] == precision  # ReciproCAM: as the device does
        assert 0.7 <= served["top1_agreement"] <= 1.0
        assert served["saliency_rank_correlation"] >= 0.9
        assert 0.7 <= served["f32_ir_top1_agreement"] <= 1.0
    else:
        assert set(served) == {"what", "inference_precision"}


def test_int8_vit_report_judges_the_maps_the_server_computes(shapes, tmp_path):
    """A ViT's maps are served from a copy compiled in f32 (service.model.MAP_NEEDS_F32), so the
    report's figures for this CPU's default precision read them so too: equal to the main
    figures, which compute every layer that is not INT8 in f32."""
    import torch

    from tests.synthetic import SMALL_VIT_EXPORT, train_small_vit

    torch.save(train_small_vit().state_dict(), tmp_path / "small_vit.pth")
    result = run_cli("export", *SMALL_VIT_EXPORT, "--checkpoint", str(tmp_path / "small_vit.pth"),
                     "--repository", str(tmp_path / "models"), "--name", "vit_int8", "--int8",
                     "--calibration", shapes["calibration"], "--validation", shapes["validation"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["saliency"]["method"] == "vit-reciprocam"
    figures = report["int8"]
    served = figures["at_default_precision"]
    if served["inference_precision"] == "f32":  # a CPU without bf16: the main figures hold
        assert set(served) == {"what", "inference_precision"}
        return
    assert served["map_inference_precision"] == "f32"
    assert served["saliency_rank_correlation"] == pytest.approx(
        figures["saliency_rank_correlation"], abs=1e-9)


def test_int8_ir_runs_int8_kernels_by_its_layer_counters(default_int8, photos):
    """What `xaiserve bench --layers` shows of an INT8 export: most of an inference in u8/i8
    kernels, every backbone convolution among them, the map product (its own int8) too."""
    repo, _ = default_int8
    layers = measure_layers(ov.Core(), repo / "lite0_int8" / "1" / "model.xml", "CPU",
                            {"PERFORMANCE_HINT": "LATENCY"}, 1, photos["chelsea"], iterations=5)
    by_precision = shares(layers, "precision")
    assert by_precision.get("u8", 0) + by_precision.get("i8", 0) > 0.5, by_precision
    convolutions = [t for t in layers if t.layer_type in ("Convolution", "GroupConvolution")]
    assert len(convolutions) >= 49  # the backbone's 49 and the map product
    assert {t.precision for t in convolutions} <= {"u8", "i8"}, \
        {(t.name, t.precision) for t in convolutions}


def test_int8_ir_is_served_and_explains(default_int8, photos):
    repo, _ = default_int8
    server = Server(ServerSettings(repository=repo, host="127.0.0.1", port=0,
                                   poll_seconds=0.5)).start()
    client = XaiClient(f"127.0.0.1:{server.port}")
    try:
        encoded = cv2.imencode(".jpg", cv2.cvtColor(photos["chelsea"], cv2.COLOR_RGB2BGR))[1]
        response = client.explain(encoded.tobytes(), "lite0_int8", top_k=1, map_format="float")
        assert response.predictions[0].class_id == 285  # Egyptian cat, as in f32
        assert response.maps[0].method == "reciprocam" and list(response.maps[0].shape) == [7, 7]
        values = np.array(response.maps[0].values)
        assert values.max() == pytest.approx(1.0) and values.min() >= 0

        request = kpb.ModelInferRequest(model_name="lite0_int8")
        request.inputs.add(name="image", datatype="UINT8", shape=[2, 224, 224, 3])
        request.outputs.add(name="saliency_map")
        request.raw_input_contents.append(np.zeros((2, 224, 224, 3), np.uint8).tobytes())
        stub = kgrpc.GRPCInferenceServiceStub(client.channel)
        answer = stub.ModelInfer(request)
        assert list(answer.outputs[0].shape) == [2, 1000, 7, 7]
    finally:
        client.close()
        server.stop(grace=1)

