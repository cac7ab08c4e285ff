"""The gRPC server on a real port, called by real clients: KServe v2, the explanation service,
health, reflection, the repository kept in step with the disk, and bad input."""

from __future__ import annotations

import shutil
import socket
import struct
import threading

import cv2
import grpc
import numpy as np
import openvino as ov
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.server import Server

from .conftest import MAX_MESSAGE, wait_for


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def assert_still_serving(kserve):
    assert kserve.ServerLive(kpb.ServerLiveRequest()).live


def expect_error(call, code: grpc.StatusCode, *words: str):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for word in words:
        assert word in info.value.details(), info.value.details()


# --- health, reflection, KServe v2 ---------------------------------------------------------

def test_health_and_reflection(channel):
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "xaiserve.v1.ExplanationService",
            "grpc.health.v1.Health"} <= names


def test_kserve_metadata(kserve):
    assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="efficientnet_lite0")).ready
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="efficientnet_lite0"))
    assert meta.versions == ["1"]
    assert meta.inputs[0].datatype == "UINT8" and list(meta.inputs[0].shape) == [-1, 224, 224, 3]
    assert [o.name for o in meta.outputs] == ["logits", "saliency_map"]


def test_kserve_infer_raw_contents_and_bytes(kserve, photos):
    from xaiserve.service.images import resize_for_model
    from xaiserve.service.model_info import ModelInfo

    info = ModelInfo(labels=[], input_height=224, input_width=224)
    batch = np.stack([resize_for_model(photos[n], info) for n in ("chelsea", "coffee")])
    request = kpb.ModelInferRequest(model_name="efficientnet_lite0", id="r1")
    request.inputs.add(name="image", datatype="UINT8", shape=list(batch.shape))
    request.outputs.add(name="logits")
    request.outputs.add(name="saliency_map")
    request.raw_input_contents.append(batch.tobytes())
    response = kserve.ModelInfer(request)
    assert response.id == "r1" and response.model_version == "1"
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 1000)
    assert list(logits.argmax(1)) == [285, 967]
    assert list(response.outputs[1].shape) == [2, 1000, 7, 7]

    # the same through `contents` and through encoded JPEG bytes (BYTES)
    request = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 224, 224, 3])
    request.inputs[0].contents.uint_contents.extend(batch[0].ravel().tolist())
    logits = np.frombuffer(kserve.ModelInfer(request).raw_output_contents[0], np.float32)
    assert logits.argmax() == 285
    encoded = jpeg(photos["coffee"])
    request = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(encoded)) + encoded)
    logits = np.frombuffer(kserve.ModelInfer(request).raw_output_contents[0], np.float32)
    assert logits.argmax() == 967


def test_kserve_classification_extension(kserve, photos):
    """Triton's classification extension: an edge device asks for the top k classes as
    "score:index:label" (a few dozen bytes) instead of every score (4 KB per image)."""
    from xaiserve.service.kserve import split_bytes_tensor

    def request(*parameters):
        r = kpb.ModelInferRequest(model_name="efficientnet_lite0")
        r.inputs.add(name="image", datatype="BYTES", shape=[2])
        photos_jpeg = (jpeg(photos["chelsea"]), jpeg(photos["coffee"]))
        r.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in photos_jpeg))
        for name, value in parameters:
            r.outputs.add(name=name).parameters["classification"].CopyFrom(value)
        return r
    five = kpb.InferParameter(int64_param=5)
    response = kserve.ModelInfer(request(("logits", five)))
    (out,) = response.outputs
    assert (out.datatype, list(out.shape)) == ("BYTES", [2, 5])
    rows = [item.decode().split(":") for item in
            split_bytes_tensor(response.raw_output_contents[0], 10)]
    assert [r[1:] for r in rows[:1] + rows[5:6]] == [["285", "Egyptian_cat"], ["967", "espresso"]]
    scores = [float(r[0]) for r in rows[:5]]
    assert scores == sorted(scores, reverse=True)
    for parameters, words in (
            ((("saliency_map", five),), "only 'logits' holds class scores"),
            ((("logits", kpb.InferParameter(int64_param=0)),), "1 to 1000"),
            ((("logits", kpb.InferParameter(int64_param=1001)),), "1 to 1000"),
            ((("logits", kpb.InferParameter(bool_param=True)),), "give the number"),
            ((("logits", kpb.InferParameter(string_param="3")),), "give the number")):
        expect_error(lambda: kserve.ModelInfer(request(*parameters)),
                     grpc.StatusCode.INVALID_ARGUMENT, "classification", words)
    assert_still_serving(kserve)


class ByteCountingRelay:
    """A TCP relay between a client and the server that counts what the server sends: what an
    edge device pays for on a metered link."""

    def __init__(self, target_port: int):
        self.target_port, self.from_server = target_port, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if counted:
                    self.from_server += len(chunk)
                sink.sendall(chunk)
        except OSError:  # the other side closed first
            pass
        finally:
            sink.close()

    def close(self) -> None:
        self.listener.close()


def test_large_responses_are_compressed_when_asked(default_export, photos, tmp_path):
    """Saliency maps are 196 KB of floats per image; a device on a metered link pays for each.
    With `response_compression: gzip` the server sends them gzipped to clients that accept it
    (gRPC's own negotiation), about half the bytes, the same values."""
    from xaiserve.service.images import resize_for_model
    from xaiserve.service.model_info import ModelInfo

    shutil.copytree(default_export.path, tmp_path / "efficientnet_lite0" / "1")
    info = ModelInfo(labels=[], input_height=224, input_width=224)
    batch = np.stack([resize_for_model(photos[n], info) for n in ("chelsea", "coffee")] * 2)
    request = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    request.inputs.add(name="image", datatype="UINT8", shape=list(batch.shape))
    request.outputs.add(name="logits")
    request.outputs.add(name="saliency_map")
    request.raw_input_contents.append(batch.tobytes())
    sent, maps = {}, {}
    for compression in ("none", "gzip"):
        server = Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                                       response_compression=compression)).start()
        relay = ByteCountingRelay(server.port)
        channel = grpc.insecure_channel(f"127.0.0.1:{relay.port}")
        try:
            response = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            maps[compression] = response.raw_output_contents[1]
            sent[compression] = relay.from_server
        finally:
            channel.close()
            relay.close()
            server.stop(grace=0)
    assert len(maps["none"]) == 4 * 1000 * 7 * 7 * 4 and maps["gzip"] == maps["none"]
    assert sent["none"] > len(maps["none"]) and sent["gzip"] < 0.65 * sent["none"], sent


def test_inference_precision_from_the_config_file_and_the_flag(tmp_path):
    from xaiserve.service.config import ConfigError, load_settings

    config = tmp_path / "serve.yaml"
    config.write_text("models:\n  plain:\n    inference_precision: f32\n")
    settings = load_settings(config, inference_precision="bf16")
    assert settings.for_model("other").compile_config()["INFERENCE_PRECISION_HINT"] == "bf16"
    assert settings.for_model("plain").compile_config()["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in load_settings(None).defaults.compile_config()
    config.write_text("models:\n  plain:\n    inference_precision: fp32\n")
    with pytest.raises(ConfigError, match=r"models\.plain\.inference_precision: 'fp32'; input "
                                          r"should be 'default', 'f32', 'bf16' or 'f16'"):
        load_settings(config)


def test_black_box_batch_from_the_config_file(tmp_path):
    from xaiserve.service.config import ConfigError, load_settings

    config = tmp_path / "serve.yaml"
    config.write_text("defaults: {black_box_batch: 32}\nmodels:\n  plain: {black_box_batch: 1}\n")
    settings = load_settings(config)
    assert settings.for_model("other").routes().black_box_batch == 32
    assert settings.for_model("plain").routes().black_box_batch == 1
    assert load_settings(None).defaults.routes().black_box_batch == 8
    for bad, why in (("0", "greater than or equal to 1"), ("257", "less than or equal to 256"),
                     ("eight", "a valid integer"), ("2.5", "a valid integer"),
                     ("'8'", "a valid integer"), ("true", "a valid integer")):
        config.write_text(f"models:\n  plain: {{black_box_batch: {bad}}}\n")
        with pytest.raises(ConfigError, match=rf"models\.plain\.black_box_batch: .*; input "
                                              rf"should be {why}"):
            load_settings(config)


CARELESS_CONFIGS = [  # (file, what the one line must say); each started a server or crashed
    ("defaults:\n  black_box_masks: many\n",
     "defaults.black_box_masks: 'many'; input should be a valid integer"),  # was a traceback
    ("defaults:\n  black_box_masks: -5\n",
     "defaults.black_box_masks: -5; input should be greater than or equal to 1"),  # served
    ("defaults:\n  scores_only_copy: 'no'\n",  # a string: was taken as true
     "defaults.scores_only_copy: 'no'; input should be a valid boolean"),
    ("models:\n  - lite0\n", "models: a mapping of keys to values expected, not list"),
    ("server:\n  prot: 9001\n", "server: unknown keys ['prot']"),  # was ignored
    ("defualts:\n  device: GPU\n", "unknown sections ['defualts']"),  # was ignored
    ("server:\n  port: true\n", "server.port: True; input should be a valid integer"),
    ("server:\n  shutdown_grace: .inf\n", "server.shutdown_grace: inf; input should be a finite"),
    ("server:\n  max_message_bytes: 3000000000\n", "less than or equal to 2147483647"),
]


def test_a_careless_config_file_fails_in_one_line_naming_the_key(tmp_path):
    from xaiserve.service.config import ConfigError, load_settings

    config = tmp_path / "serve.yaml"
    for text, words in CARELESS_CONFIGS:
        config.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(config, repository=tmp_path)
        assert words in str(info.value) and "\n" not in str(info.value), (text, info.value)
    config.write_bytes(b"\xff\xfe defaults")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_settings(config)
    # a flag's value is named by the flag
    with pytest.raises(ConfigError, match=r"^--workers 0: input should be greater than or"):
        load_settings(None, repository=tmp_path, workers=0)
    config.write_text("server:\n  repository: %s\n  tls_key: null\ndefaults:\n  num_requests: 2\n"
                      % tmp_path)
    settings = load_settings(config)
    assert settings.repository == tmp_path and settings.defaults.num_requests == 2
    # built in Python (a test, a program embedding the server), a misspelt setting fails too
    with pytest.raises(ValueError, match="max_concurent_requests"):
        ServerSettings(max_concurent_requests=4)
    with pytest.raises(ValueError, match="latest_version"):
        ModelSettings(latest_version=1)


def test_check_config_says_what_would_serve_or_what_to_fix(small_export, tmp_path):
    """A pipeline could only learn that a config change breaks the server by rolling it out;
    `serve --check-config` checks it (settings, files, devices, repository) and exits."""
    from .conftest import run_cli

    for version in (1, 2):
        shutil.copytree(small_export.path, tmp_path / "models" / "shapes" / str(version))
    config = tmp_path / "serve.yaml"
    config.write_text("models:\n  shapes: {latest_versions: 1}\n  shape: {device: CPU}\n")
    result = run_cli("serve", "--repository", str(tmp_path / "models"), "--config", str(config),
                     "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("xaiserve serve: config ok; would load shapes versions "
                                     "[2] on CPU")
    assert "models.shape, but the repository has no model of that name" in result.stderr
    config.write_text("models:\n  shapes: {versions: [1, 9]}\n")  # a pin, with a typo
    result = run_cli("serve", "--repository", str(tmp_path / "models"), "--config", str(config),
                     "--check-config")
    assert result.returncode == 0 and "would load shapes versions [1] on CPU" in result.stdout
    assert "warning: shapes: the config pins versions [9], not on disk (has [1, 2])" \
        in result.stderr
    config.write_text("models:\n  shapes: {versions: [9]}\n")  # nothing of shapes would serve
    result = run_cli("serve", "--repository", str(tmp_path / "models"), "--config", str(config),
                     "--check-config")
    assert "would load no version of shapes (none on disk fits the config)" in result.stdout
    for text, flags, words in (
            ("models:\n  shapes: {devic: CPU}\n", (), "unknown keys ['devic']"),
            ("models:\n  shapes: {versions: []}\n", (), "models.shapes.versions: []"),
            ("", ("--device", "NPU.7"), "device 'NPU.7' is not present"),
            ("", ("--token-file", str(tmp_path / "absent")), "--token-file"),
            ("server: {tls_cert: %s, tls_key: %s}\n" % (config, config), (), "no PEM")):
        config.write_text(text)
        result = run_cli("serve", "--repository", str(tmp_path / "models"), "--config",
                         str(config), "--check-config", *flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr


# --- the explanation service -----------------------------------------------------------------

def test_triton_model_config(kserve):
    """The configuration view Triton's clients and perf_analyzer read before they send."""
    meta = kserve.ServerMetadata(kpb.ServerMetadataRequest())
    assert {"model_configuration", "statistics", "model_repository"} <= set(meta.extensions)
    config = kserve.ModelConfig(kpb.ModelConfigRequest(name="efficientnet_lite0")).config
    assert config.name == "efficientnet_lite0" and config.max_batch_size == 32
    (image,) = config.input
    assert (image.name, image.data_type, image.format, list(image.dims)) == (
        "image", kpb.TYPE_UINT8, kpb.ModelInput.FORMAT_NHWC, [224, 224, 3])
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", kpb.TYPE_FP32, [1000]), ("saliency_map", kpb.TYPE_FP32, [1000, 7, 7])]
    assert config.instance_group[0].count >= 1
    assert config.parameters["device"].string_value == "CPU"
    plain = kserve.ModelConfig(kpb.ModelConfigRequest(name="plain", version="1")).config
    assert [o.name for o in plain.output] == ["logits"]
    # the precision the CPU computes in, not the one asked for (bf16 for "plain")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert plain.parameters["inference_precision"].string_value == (
        "bf16" if has_bf16 else "f32")
    assert config.parameters["inference_precision"].string_value in ("f32", "bf16")
    # ReciproCAM's maps keep the device's precision (only ViT-ReciproCAM's are computed in f32)
    assert config.parameters["map_inference_precision"].string_value == \
        config.parameters["inference_precision"].string_value
    expect_error(lambda: kserve.ModelConfig(kpb.ModelConfigRequest(name="nonexistent")),
                 grpc.StatusCode.NOT_FOUND, "model_name")


def statistics(kserve, name: str):
    (stats,) = kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=name)).model_stats
    return stats


def test_triton_model_statistics_count_and_split_requests(kserve, client, photos):
    before = statistics(kserve, "efficientnet_lite0")
    request = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    request.inputs.add(name="image", datatype="BYTES", shape=[2])
    request.inputs[0].contents.bytes_contents.extend([jpeg(photos["chelsea"]),
                                                      jpeg(photos["coffee"])])
    kserve.ModelInfer(request)
    client.explain(jpeg(photos["coffee"]), "efficientnet_lite0")
    bad = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    bad.inputs.add(name="image", datatype="UINT8", shape=[1, 224, 224, 3])
    bad.raw_input_contents.append(bytes(10))
    expect_error(lambda: kserve.ModelInfer(bad), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]")
    after = statistics(kserve, "efficientnet_lite0")

    assert after.version == "1" and after.last_inference >= before.last_inference
    assert after.inference_count - before.inference_count == 3  # images
    assert after.execution_count - before.execution_count == 2  # requests
    now, then = after.inference_stats, before.inference_stats
    assert now.success.count - then.success.count == 2
    assert now.fail.count - then.fail.count == 1
    success_ns = now.success.ns - then.success.ns
    parts = {bucket: getattr(now, bucket).ns - getattr(then, bucket).ns
             for bucket in ("queue", "compute_input", "compute_infer", "compute_output")}
    assert parts["compute_infer"] > 0 and parts["compute_input"] > 0  # two JPEGs decoded
    assert all(ns >= 0 for ns in parts.values())
    assert abs(sum(parts.values()) - success_ns) <= 0.01 * success_ns  # the split adds up
    every = kserve.ModelStatistics(kpb.ModelStatisticsRequest()).model_stats
    assert {(s.name, s.version) for s in every} == {("efficientnet_lite0", "1"), ("plain", "1")}
    expect_error(lambda: kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="nonexistent")),
                 grpc.StatusCode.NOT_FOUND, "model_name")


def test_explain_white_box(client, photos):
    response = client.explain(jpeg(photos["chelsea"]), "efficientnet_lite0", top_k=2,
                              map_format="float", label=285)
    assert response.predictions[0].class_id == 285
    assert response.predictions[0].label == "Egyptian_cat"
    assert [m.class_id for m in response.maps] == [285, 282]
    assert response.maps[0].method == "reciprocam" and list(response.maps[0].shape) == [7, 7]
    metrics = {m.name: m for m in response.metrics}
    assert metrics["prediction_case"].text == "true_positive_high_confidence"
    assert 0 < metrics["top1_confidence"].value <= 1 and metrics["entropy"].value > 0
    assert metrics["prediction_case"].parameters["high_confidence"] == "0.5"
    assert {"decode", "preprocess", "inference", "explanation", "encode_maps", "metrics",
            "total"} \
        <= set(response.timings_ms)


def test_explain_overlay_png(client, photos):
    response = client.explain(jpeg(photos["coffee"]), "efficientnet_lite0")
    picture = cv2.imdecode(np.frombuffer(response.maps[0].data, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[1] == photos["coffee"].shape[1]
    assert picture.shape[0] > photos["coffee"].shape[0]  # the legend strip below


def test_black_box_fallback_is_reproducible(client, photos):
    info = client.model_info("plain")
    assert info.saliency_method == "" and len(info.labels) == 1000
    first = client.explain(jpeg(photos["chelsea"]), "plain", map_format="float", num_masks=300,
                           seed=7)
    again = client.explain(jpeg(photos["chelsea"]), "plain", map_format="float", num_masks=300,
                           seed=7)
    other = client.explain(jpeg(photos["chelsea"]), "plain", map_format="float", num_masks=300,
                           seed=8)
    assert first.maps[0].method == "rise" and list(first.maps[0].shape) == [224, 224]
    assert list(first.maps[0].values) == list(again.maps[0].values)
    assert list(first.maps[0].values) != list(other.maps[0].values)


def test_model_info_over_grpc(client):
    info = client.model_info("efficientnet_lite0")
    assert info.ready and info.labels[967] == "espresso"
    assert list(info.mean_values) == [127.0] * 3 and info.resize_type == "standard"
    assert info.saliency_method == "reciprocam" and info.saliency_target_layer


# --- bad input: the right status, a message naming the field, the server keeps serving ----------

def test_bad_input(client, kserve, photos):
    good = jpeg(photos["coffee"])
    stub = client.stub
    cases = [
        (lambda: client.explain(b"\xff\xd8 not a jpeg", "efficientnet_lite0"),
         grpc.StatusCode.INVALID_ARGUMENT, ["image.encoded"]),
        (lambda: client.explain(good, "nonexistent"), grpc.StatusCode.NOT_FOUND,
         ["model_name", "efficientnet_lite0"]),
        (lambda: client.explain(good, "efficientnet_lite0", version="9"),
         grpc.StatusCode.NOT_FOUND, ["model_version 9"]),
        (lambda: client.explain(good, "efficientnet_lite0", targets=[1000]),
         grpc.StatusCode.INVALID_ARGUMENT, ["target_classes[0]", "[0, 1000)"]),
        (lambda: client.explain(good, "plain", method="black-box", num_masks=50_000),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ["black_box.num_masks", "2000"]),
        (lambda: client.explain(good, "plain", method="white-box"),
         grpc.StatusCode.INVALID_ARGUMENT, ["saliency_map", "METHOD_BLACK_BOX"]),
        (lambda: client.explain(b"x" * (MAX_MESSAGE + 1024), "efficientnet_lite0"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, []),
    ]
    wrong_mask = xpb.ExplainRequest(model_name="efficientnet_lite0", image=xpb.Image(encoded=good))
    wrong_mask.ground_truth.mask_png = cv2.imencode(".png", np.zeros((10, 10), np.uint8))[1]\
        .tobytes()
    cases.append((lambda: stub.Explain(wrong_mask), grpc.StatusCode.INVALID_ARGUMENT,
                  ["ground_truth.mask_png", "10x10"]))
    tensor = xpb.ExplainRequest(model_name="efficientnet_lite0",
                                image=xpb.Image(tensor=xpb.Tensor(shape=[4, 4], data=b"1234")))
    cases.append((lambda: stub.Explain(tensor), grpc.StatusCode.INVALID_ARGUMENT,
                  ["image.tensor.shape"]))
    for call, code, words in cases:
        expect_error(call, code, *words)
        assert_still_serving(kserve)

    shape = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    shape.inputs.add(name="image", datatype="UINT8", shape=[1, 100, 100, 3])
    shape.raw_input_contents.append(bytes(100 * 100 * 3))
    expect_error(lambda: kserve.ModelInfer(shape), grpc.StatusCode.INVALID_ARGUMENT,
                 "inputs[0].shape", "224")
    dtype = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    dtype.inputs.add(name="image", datatype="FP32", shape=[1, 224, 224, 3])
    dtype.raw_input_contents.append(bytes(224 * 224 * 3 * 4))
    expect_error(lambda: kserve.ModelInfer(dtype), grpc.StatusCode.INVALID_ARGUMENT,
                 "inputs[0].datatype", "UINT8")
    short = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    short.inputs.add(name="image", datatype="UINT8", shape=[1, 224, 224, 3])
    short.raw_input_contents.append(bytes(10))
    expect_error(lambda: kserve.ModelInfer(short), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]")
    too_many = kpb.ModelInferRequest(model_name="efficientnet_lite0")
    too_many.inputs.add(name="image", datatype="BYTES", shape=[33])
    too_many.inputs[0].contents.bytes_contents.extend([jpeg(photos["coffee"][:16, :16])] * 33)
    expect_error(lambda: kserve.ModelInfer(too_many), grpc.StatusCode.INVALID_ARGUMENT,
                 "33 images", "max_batch_size 32")
    assert_still_serving(kserve)
    assert client.explain(good, "efficientnet_lite0").predictions[0].class_id == 967


# --- the repository follows the disk ------------------------------------------------------------

def test_versions_come_and_go_and_broken_models_are_reported(repository, kserve, client, photos):
    shutil.copytree(repository / "efficientnet_lite0" / "1", repository / "efficientnet_lite0" / "2")
    assert wait_for(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(
        name="efficientnet_lite0")).versions == ["1", "2"])
    assert wait_for(lambda: client.explain(jpeg(photos["coffee"]), "efficientnet_lite0")
                    .model_version == "2")
    assert client.explain(jpeg(photos["coffee"]), "efficientnet_lite0", version="1")\
        .model_version == "1"

    broken = repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.xml").write_text("<net>not really</net>")
    assert wait_for(lambda: client.model_info("broken").reason not in ("", "loading"))
    info = client.model_info("broken")
    assert not info.ready and "cannot read the IR" in info.reason
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name="broken")).ready
    expect_error(lambda: client.explain(jpeg(photos["coffee"]), "broken"),
                 grpc.StatusCode.UNAVAILABLE, "not ready")
    assert client.explain(jpeg(photos["coffee"]), "efficientnet_lite0").predictions[0]\
        .class_id == 967

    shutil.rmtree(repository / "efficientnet_lite0" / "2")
    shutil.rmtree(repository / "broken")
    assert wait_for(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(
        name="efficientnet_lite0")).versions == ["1"])
    assert client.explain(jpeg(photos["coffee"]), "efficientnet_lite0").model_version == "1"


def test_missing_device_names_the_devices_present(repository):
    settings = ServerSettings(repository=repository, port=0,
                              defaults=ModelSettings(device="NPU"))
    with pytest.raises(ValueError, match=r"'NPU' is not present; devices here: .*CPU"):
        Server(settings).start()


def test_a_grpc_port_in_use_is_refused(tmp_path):
    """gRPC binds with SO_REUSEPORT unless told not to: a second server on a taken port would
    start, and the kernel would split the clients between the two."""
    first = Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=0)).start()
    try:
        with pytest.raises(OSError, match=f"--port {first.port}: cannot bind"):
            Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=first.port))
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            kgrpc.GRPCInferenceServiceStub(channel).ServerLive(kpb.ServerLiveRequest(),
                                                               timeout=10)
    finally:
        first.stop(grace=0)


def test_a_pin_that_matches_nothing_at_start_is_named_as_such(small_export, tmp_path, caplog):
    """A server started with a pin to a version that is not on disk serves nothing of that
    model, and says so: the missing pin, not "no model of that name" (the folder is there)."""
    import logging

    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                              models={"shapes": ModelSettings(versions=(2,))})
    with caplog.at_level(logging.WARNING):
        server = Server(settings).start()
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert "shapes: the config pins versions [2], not on disk (has [1])" in warnings
        assert not any("no model of that name" in w for w in warnings), warnings
        assert server.repository.names() == [] and server.repository.names_on_disk() == ["shapes"]
    finally:
        server.stop(grace=0)
