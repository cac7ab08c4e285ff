"""Shared fixtures: real exports into temporary model repositories, real photos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `xaiserve` command as a pipeline would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "xaiserve.service.cli", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    from sample_photos import sample_photos

    return sample_photos()


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The default model exported once per test session through the library."""
    from xaiserve.export.pipeline import ExportRequest, export_model

    repo = tmp_path_factory.mktemp("repo")
    return export_model(ExportRequest("default", repo, "efficientnet_lite0"))


@pytest.fixture(scope="session")
def small_export(tmp_path_factory):
    """The small synthetic CNN (64x64, 3 classes, ReciproCAM) exported once: a fast model for
    server tests that need many requests. Untrained: these tests check serving, not maps."""
    from xaiserve.export.pipeline import ExportRequest, export_model
    from xaiserve.export.sources import SourceOptions

    repo = tmp_path_factory.mktemp("small")
    return export_model(ExportRequest(
        "torch:tests.synthetic:small_cnn", repo, "shapes",
        source_options=SourceOptions(input_size=64, mean_values=[0, 0, 0],
                                     scale_values=[255, 255, 255])))
