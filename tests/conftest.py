"""Shared fixtures: real exports into temporary model repositories, real photos."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from xaiserve.service.client import XaiClient
from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.server import Server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `xaiserve` command as a pipeline would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "xaiserve.service.cli", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600)


def wait_for(condition, timeout: float = 60.0) -> bool:
    """Poll `condition` until it holds; an RPC error (a version not there yet) counts as not."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if condition():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    return False


def runtime_convolutions(compiled) -> list[tuple[set[str], str]]:
    """Per convolution an OpenVINO CPU plugin runs: the IR operations it computes (their
    friendly names) and the precision it computes them in (f32, bf16, u8, ...)."""
    from xaiserve.service.layer_profile import runtime_layers

    return [(set(layer.original_names), layer.precision) for layer in runtime_layers(compiled)
            if layer.layer_type in ("Convolution", "GroupConvolution")]


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
    server tests that need many requests. Untrained: these tests check serving, not maps. Its
    random weights are seeded, so its outputs (and the sizes of responses that carry them) are
    the same in every run whatever ran before it."""
    import torch

    from xaiserve.export.pipeline import ExportRequest, export_model
    from xaiserve.export.sources import SourceOptions

    repo = tmp_path_factory.mktemp("small")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return export_model(ExportRequest(
            "torch:tests.synthetic:small_cnn", repo, "shapes",
            source_options=SourceOptions(input_size=64, mean_values=[0, 0, 0],
                                         scale_values=[255, 255, 255])))


# --- a running server on the default model and its plain IR (black-box only) ------------------
# Module-scoped: each test module that uses them gets its own server; modules that define
# fixtures of the same names use theirs.

MAX_MESSAGE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def repository(default_export, tmp_path_factory):
    """The default model (with saliency) and the same model as a plain IR (black-box only)."""
    from xaiserve.export.pipeline import ExportRequest, export_model
    from xaiserve.export.saliency import SaliencySettings

    repo = tmp_path_factory.mktemp("served")
    shutil.copytree(default_export.path, repo / "efficientnet_lite0" / "1")
    export_model(ExportRequest("default", repo, "plain", saliency=SaliencySettings(method="none")))
    return repo


@pytest.fixture(scope="module")
def server(repository):
    defaults = ModelSettings(black_box_masks=500, max_black_box_masks=2000)
    settings = ServerSettings(repository=repository, host="127.0.0.1", port=0, rest_port=0,
                              poll_seconds=0.5, max_message_bytes=MAX_MESSAGE, defaults=defaults,
                              shared_memory="system",  # for the standard clients' regions
                              # asks for bf16, which a CPU without it computes in f32
                              models={"plain": replace(defaults, inference_precision="bf16")})
    srv = Server(settings).start()
    yield srv
    srv.stop(grace=2)


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def kserve(channel):
    return kgrpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def client(server):
    c = XaiClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()
