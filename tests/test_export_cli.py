"""`xaiserve export` as a pipeline step: sources, versions, and bad input (one line, exit 2,
nothing left in the repository)."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from tests.conftest import run_cli


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines()
             if ln.startswith("xaiserve export: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def _repository_is_empty(repo) -> bool:
    return not repo.exists() or not any(repo.rglob("*"))


def test_unknown_architecture(tmp_path):
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", "timm:resnet5000", "--repository", str(repo),
                               "--name", "x"))
    assert "resnet5000" in line and "not a timm architecture" in line
    assert _repository_is_empty(repo)


def test_timm_without_weights_is_refused_unless_asked_for(tmp_path):
    """Nothing is downloaded here, so timm:ARCH without --checkpoint is an untrained network:
    a pipeline that forgot the checkpoint must not ship it (exit 2); --random-weights asks for
    it (speed measurements), and the model card says so."""
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", "timm:resnet18", "--repository", str(repo),
                               "--name", "r18"))
    assert "timm:resnet18 needs --checkpoint FILE" in line and "--random-weights" in line
    assert _repository_is_empty(repo)
    line = _error_line(run_cli("export", "timm:resnet18", "--random-weights", "--checkpoint",
                               str(tmp_path / "w.pth"), "--repository", str(repo), "--name", "r"))
    assert "--random-weights with --checkpoint" in line
    result = run_cli("export", "timm:resnet10t", "--random-weights", "--input-size", "64",
                     "--num-classes", "3", "--repository", str(repo), "--name", "r10")
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads(result.stdout)
    assert card["source"] == "timm:resnet10t (random weights)"


def _unexplainable_ir(tmp_path, head: str) -> str:
    """An IR of a small CNN that no white-box method can start from. "flatten": its head
    flattens the map into a linear layer (no global pooling, no grid of tokens, no transformer
    blocks). "skip": its head also reads the input image, so the layers after the pooling
    cannot be re-run on masked copies of the map."""
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
            self.fc = torch.nn.Linear(4 * 16 * 16 if head == "flatten" else 4, 3)
            self.skip = torch.nn.Linear(3 * 4 * 4, 3)

        def forward(self, x):
            features = torch.relu(self.conv(x))
            if head == "flatten":
                return self.fc(features.flatten(1))
            return self.fc(features.mean((2, 3))) + self.skip(x[:, :, ::16, ::16].flatten(1))

    model = ov.convert_model(Classifier().eval(), example_input=torch.zeros(1, 3, 64, 64),
                             input=[ov.PartialShape([-1, 3, 64, 64])])
    ov.save_model(model, tmp_path / f"{head}.xml")
    return str(tmp_path / f"{head}.xml")


@pytest.mark.filterwarnings("ignore::FutureWarning:torch.jit")
@pytest.mark.parametrize("head, says", [
    ("flatten", "could not tell the architecture"),
    ("skip", "read the model input directly"),
])
def test_models_the_methods_cannot_explain_get_advice_that_works(tmp_path, head, says):
    """A model no in-graph method fits is refused in one line before anything is written, and
    the way out the line names (`--method none`: served, it is explained by RISE) exports it.
    The second line used to name `--method activationmap`, which fails on such models too."""
    repo = tmp_path / "models"
    common = [_unexplainable_ir(tmp_path, head), "--repository", str(repo), "--name", "m"]
    line = _error_line(run_cli("export", *common))
    assert says in line and "--method none" in line, line
    assert _repository_is_empty(repo)
    result = run_cli("export", *common, "--method", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads(result.stdout)
    assert card["saliency"] is None
    assert (repo / "m" / "1" / "model.xml").is_file()


def test_checkpoint_that_does_not_fit(tmp_path):
    import torch

    from tests.synthetic import small_cnn

    torch.save(small_cnn().state_dict(), tmp_path / "other.pth")
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", "timm:resnet18", "--checkpoint",
                               str(tmp_path / "other.pth"), "--repository", str(repo),
                               "--name", "r18"))
    assert "does not fit timm:resnet18" in line and "--num-classes" in line
    assert _repository_is_empty(repo)


@pytest.mark.parametrize("content", [b"<net>garbage", b"\x00\x01\x02 not a model"])
def test_unreadable_model_file(tmp_path, content):
    bad = tmp_path / "deployed.xml"
    bad.write_bytes(content)
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", str(bad), "--repository", str(repo), "--name", "x"))
    assert "not a model OpenVINO reads (IR, ONNX, TFLite, SavedModel, torch.export)" in line
    assert _repository_is_empty(repo)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a pickle")
    line = _error_line(run_cli("export", "timm:resnet18", "--checkpoint", str(bad),
                               "--repository", str(tmp_path / "m"), "--name", "x"))
    assert "not a readable state dict" in line


def test_architecture_where_insertion_fails(tmp_path):
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", "torch:tests.synthetic:mlp", "--input-size", "64",
                               "--repository", str(repo), "--name", "mlp"))
    assert "--target-layer" in line and "--method" in line
    assert _repository_is_empty(repo)
    # The same model without saliency exports fine.
    ok = run_cli("export", "torch:tests.synthetic:mlp", "--input-size", "64", "--method", "none",
                 "--repository", str(repo), "--name", "mlp")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["saliency"] is None


def test_int8_map_product_on_unbounded_features(tmp_path):
    """ReLU features have no range the graph guarantees: asking for the int8 product says to
    use f32 (which `auto` picks by itself)."""
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                               "--map-precision", "int8", "--repository", str(repo),
                               "--name", "cnn"))
    assert "--map-precision f32" in line and "Clamp" in line
    assert _repository_is_empty(repo)
    ok = run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                 "--repository", str(repo), "--name", "cnn")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["saliency"]["map_precision"] == "f32"


def test_a_version_staged_by_a_killed_export_is_refused_before_the_work(tmp_path):
    """A killed export leaves `.staging-N`: `--version N` was refused only after the whole
    export (minutes for INT8); it is refused before anything else is looked at now (the empty
    calibration folder would be the next error), naming the folder."""
    staging = tmp_path / "models" / "r" / ".staging-5"
    staging.mkdir(parents=True)
    line = _error_line(run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size",
                               "64", "--repository", str(tmp_path / "models"), "--name", "r",
                               "--version", "5", "--int8", "--calibration", str(tmp_path)))
    assert f"{staging}: another export of version 5 is under way" in line
    assert "remove that folder" in line


def test_bad_name_and_taken_version(tmp_path):
    repo = tmp_path / "models"
    line = _error_line(run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                               "--repository", str(repo), "--name", "../escape"))
    assert "--name" in line
    first = run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                    "--repository", str(repo), "--name", "cnn")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                     "--repository", str(repo), "--name", "cnn")
    assert json.loads(second.stdout)["version"] == 2
    line = _error_line(run_cli("export", "torch:tests.synthetic:small_cnn", "--input-size", "64",
                               "--repository", str(repo), "--name", "cnn", "--version", "1"))
    assert "--version" in line
    assert sorted(p.name for p in (repo / "cnn").iterdir()) == ["1", "2"]


def test_deployed_ir_gets_saliency_without_torch(tmp_path):
    """A plain IR someone already deployed (float NCHW input, no saliency) is exported with a
    saliency_map; the export path for files never imports torch."""
    import torch

    from tests.synthetic import small_cnn

    torch.manual_seed(0)
    plain = ov.convert_model(small_cnn().eval(), example_input=torch.zeros(1, 3, 64, 64),
                             input=[ov.PartialShape([-1, 3, 64, 64])])
    ov.save_model(plain, tmp_path / "deployed.xml")
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    script = (
        "import sys; from xaiserve.service.cli import main; "
        f"rc = main(['export', r'{tmp_path / 'deployed.xml'}', '--repository', "
        f"r'{tmp_path / 'models'}', '--name', 'legacy', '--labels', r'{labels}', "
        "'--scale', '255']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = ov.Core().read_model(tmp_path / "models" / "legacy" / "1" / "model.xml")
    assert str(model.output("saliency_map").get_partial_shape()) == "[?,3,16,16]"
    compiled = ov.Core().compile_model(model, "CPU")
    out = compiled(np.zeros((2, 64, 64, 3), np.uint8))
    assert out["saliency_map"].shape == (2, 3, 16, 16)
    assert model.get_rt_info(["model_info", "labels"]).astype(str) == "red green blue"



def test_our_ir_with_a_saliency_branch_is_refused_as_a_source(default_export, tmp_path):
    """Its classifier layer became part of the branch: say to export the original again
    (tests/test_openvino_xai_reference.py re-exports a plain IR of ours successfully)."""
    source = default_export.path / "model.xml"
    result = run_cli("export", str(source), "--method", "activationmap", "--repository",
                     str(tmp_path), "--name", "again")
    line = _error_line(result)
    assert "already has a saliency_map output (method reciprocam)" in line
    assert "export its original source again" in line
    assert _repository_is_empty(tmp_path / "again")
