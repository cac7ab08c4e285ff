"""deploy/entrypoint.sh outside a container: the environment contract of every deployment.

A real server started by the script on a real port with a real exported model, probed the way
Docker's HEALTHCHECK probes it, stopped with SIGTERM; bad settings refused in one line; the
health check over TLS and mutual TLS against a real TLS gRPC server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xaiserve.service.cli import build_parser
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
BIN = Path(sys.executable).parent  # holds the installed `xaiserve` command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**variables: str) -> dict[str, str]:
    """The caller's environment without XAISERVE_* settings, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XAISERVE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(variables)
    return env


def run_script(*args: str, timeout: float = 60, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=script_env(**variables),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def repository(default_export, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("mounted")
    shutil.copytree(default_export.path, repo / "efficientnet_lite0" / "1")
    return repo


def test_serves_answers_health_and_stops_cleanly_on_sigterm(repository, tmp_path):
    port = free_port()
    settings = dict(XAISERVE_REPOSITORY=str(repository), XAISERVE_PORT=str(port),
                    XAISERVE_HOST="127.0.0.1", XAISERVE_LOG_LEVEL="INFO")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(["sh", str(ENTRYPOINT)], env=script_env(**settings),
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        # The HEALTHCHECK command of the image: exit 1 until the server is up, then 0.
        deadline = time.monotonic() + 120
        while True:
            probe = run_script("health", **settings)
            if probe.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            assert probe.returncode == 1, probe.stderr
            assert len(probe.stderr.strip().splitlines()) == 1, probe.stderr
            time.sleep(0.5)
        assert probe.returncode == 0, log.read_text() + probe.stderr
        assert probe.stdout.strip() == f"127.0.0.1:{port} (server): SERVING"

        # exec: the script's process is now the server itself, so signals reach it.
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and b"--repository" in cmdline, cmdline

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            kserve = kgrpc.GRPCInferenceServiceStub(channel)
            assert kserve.ModelReady(kpb.ModelReadyRequest(name="efficientnet_lite0")).ready

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log.read_text()
    assert f"serving {repository} on port {port}" in text
    assert "shutting down" in text
    after = run_script("health", **settings)
    assert after.returncode == 1 and "UNAVAILABLE" in after.stderr


def test_kserve_model_format_version_is_the_exported_ir_version(repository):
    runtime = yaml.safe_load((ROOT / "deploy/kubernetes/kserve/servingruntime.yaml").read_text())
    (fmt,) = runtime["spec"]["supportedModelFormats"]
    header = (repository / "efficientnet_lite0/1/model.xml").read_text()[:200]
    assert fmt["name"] == "openvino"
    assert re.search(r'<net name="[^"]*" version="(\d+)"', header)[1] == fmt["version"]


BAD_SETTINGS = [
    ({"XAISERVE_PORT": "http"}, "XAISERVE_PORT='http' is not a port number"),
    ({"XAISERVE_PORT": "70000"}, "XAISERVE_PORT=70000 is out of range"),
    ({"XAISERVE_PORT": "123456789012345678901"}, "out of range"),
    ({"XAISERVE_REPOSITORY": "/nonexistent/models"}, "XAISERVE_REPOSITORY=/nonexistent/models"),
    ({"XAISERVE_METRICS_PORT": "9000"}, "XAISERVE_METRICS_PORT=9000 is the gRPC port too"),
    ({"XAISERVE_METRICS_PORT": "-1"}, "XAISERVE_METRICS_PORT='-1' is not a port number"),
    ({"XAISERVE_REST_PORT": "9000"}, "XAISERVE_REST_PORT=9000 is the gRPC port too"),
    ({"XAISERVE_REST_PORT": "9090", "XAISERVE_METRICS_PORT": "9090"},
     "XAISERVE_REST_PORT=9090 is the metrics port too"),
    ({"XAISERVE_REST_PORT": "http"}, "XAISERVE_REST_PORT='http' is not a port number"),
    ({"XAISERVE_LOG_LEVEL": "LOUD"}, "XAISERVE_LOG_LEVEL='LOUD' is not a level"),
    ({"XAISERVE_LOG_FORMAT": "xml"}, "XAISERVE_LOG_FORMAT='xml' is not a format"),
    ({"XAISERVE_TOKEN_FILE": "/nonexistent/token"}, "XAISERVE_TOKEN_FILE=/nonexistent/token"),
    ({"XAISERVE_WORKERS": "0"}, "XAISERVE_WORKERS='0' is not a positive whole number"),
    ({"XAISERVE_CONFIG": "/nonexistent/serve.yaml"}, "XAISERVE_CONFIG=/nonexistent/serve.yaml"),
    ({"XAISERVE_TLS_CERT": "{cert}"}, "XAISERVE_TLS_KEY is not; set both or neither"),
    ({"XAISERVE_TLS_KEY": "{key}"}, "XAISERVE_TLS_CERT is not; set both or neither"),
    ({"XAISERVE_TLS_CERT": "{cert}", "XAISERVE_TLS_KEY": "/nonexistent/key.pem"},
     "XAISERVE_TLS_KEY=/nonexistent/key.pem: no readable file"),
    ({"XAISERVE_TLS_CLIENT_CA": "{cert}"}, "XAISERVE_TLS_CLIENT_CA needs TLS"),
]


@pytest.mark.parametrize("variables, message", BAD_SETTINGS,
                         ids=[next(iter(v)) + "=" + next(iter(v.values())) for v, _ in BAD_SETTINGS])
def test_bad_settings_end_in_one_line_and_exit_2(variables, message, tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    files = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    settings = {"XAISERVE_REPOSITORY": str(tmp_path),
                **{k: v.format(**files) for k, v in variables.items()}}
    result = run_script(**settings)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xaiserve-entrypoint: error: "), lines
    assert message in lines[0], lines[0]


def test_every_variable_maps_to_its_flag_and_extra_flags_come_last(tmp_path):
    """The flag names are the server's (`xaiserve serve --help`); argv is printed by `echo`."""
    pem = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca", "token")}
    for path in pem.values():
        path.write_text("x")
    config = tmp_path / "serve.yaml"
    config.write_text("defaults: {}\n")
    result = run_script(
        "--max-black-box-masks", "100", "--port", "7000",
        XAISERVE_BIN="echo", XAISERVE_REPOSITORY=str(tmp_path), XAISERVE_PORT="9001",
        XAISERVE_HOST="127.0.0.1", XAISERVE_CONFIG=str(config), XAISERVE_DEVICE="AUTO",
        XAISERVE_WORKERS="8", XAISERVE_LOG_LEVEL="debug", XAISERVE_METRICS_PORT="9091",
        XAISERVE_TLS_CERT=str(pem["cert"]), XAISERVE_TLS_KEY=str(pem["key"]),
        XAISERVE_TLS_CLIENT_CA=str(pem["ca"]), XAISERVE_LOG_FORMAT="json",
        XAISERVE_TOKEN_FILE=str(pem["token"]), XAISERVE_REST_PORT="8001")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "serve", "--repository", str(tmp_path), "--port", "9001", "--host", "127.0.0.1",
        "--config", str(config), "--device", "AUTO", "--workers", "8", "--log-level", "debug",
        "--log-format", "json", "--token-file", str(pem["token"]), "--metrics-port", "9091",
        "--rest-port", "8001", "--tls-cert", str(pem["cert"]), "--tls-key", str(pem["key"]),
        "--tls-client-ca", str(pem["ca"]), "--max-black-box-masks", "100", "--port", "7000"]

    # The server's own parser reads that argv; the last --port (the extra flag) wins.
    args = build_parser().parse_args(result.stdout.split())
    assert (args.repository, args.port, args.host, args.config, args.device, args.workers,
            args.log_level, args.log_format, args.token_file, args.metrics_port, args.rest_port,
            args.tls_cert, args.tls_key, args.tls_client_ca, args.max_black_box_masks) == (
        tmp_path, 7000, "127.0.0.1", config, "AUTO", 8, "debug", "json", pem["token"], 9091,
        8001, pem["cert"], pem["key"], pem["ca"], 100)

    other = run_script("echo", "export", "default", XAISERVE_PORT="not checked here")
    assert other.returncode == 0 and other.stdout.strip() == "export default"


def test_systemd_credentials_stand_in_for_unset_file_variables(tmp_path):
    """Under systemd's DynamicUser a root-only key or token file is unreadable: the unit hands
    it over with LoadCredential=, and the script finds it in $CREDENTIALS_DIRECTORY."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("token", "tls-cert", "tls-key", "tls-client-ca"):
        (credentials / name).write_text("x")
    result = run_script(XAISERVE_BIN="echo", XAISERVE_REPOSITORY=str(tmp_path),
                        CREDENTIALS_DIRECTORY=str(credentials))
    assert result.returncode == 0, result.stderr
    argv = result.stdout.split()
    for flag, name in (("--token-file", "token"), ("--tls-cert", "tls-cert"),
                       ("--tls-key", "tls-key"), ("--tls-client-ca", "tls-client-ca")):
        assert argv[argv.index(flag) + 1] == str(credentials / name), flag
    own = tmp_path / "own-token"
    own.write_text("x")
    result = run_script(XAISERVE_BIN="echo", XAISERVE_REPOSITORY=str(tmp_path),
                        CREDENTIALS_DIRECTORY=str(credentials), XAISERVE_TOKEN_FILE=str(own))
    argv = result.stdout.split()
    assert argv[argv.index("--token-file") + 1] == str(own)  # the variable wins
    result = run_script(XAISERVE_BIN="echo", XAISERVE_REPOSITORY=str(tmp_path),
                        CREDENTIALS_DIRECTORY=str(tmp_path / "none"))
    assert "--token-file" not in result.stdout.split()


@pytest.mark.parametrize("host, server", [
    ("", "127.0.0.1:9000"), ("0.0.0.0", "127.0.0.1:9000"), ("::", "127.0.0.1:9000"),
    ("10.1.2.3", "10.1.2.3:9000"), ("::1", "[::1]:9000"), ("[fd00::5]", "[fd00::5]:9000")])
def test_health_asks_the_address_the_server_binds(host, server):
    result = run_script("health", XAISERVE_BIN="echo", XAISERVE_HOST=host)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["health", "--server", server]


# --- the health check over TLS and mutual TLS ------------------------------------------------

def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A real TLS gRPC server with the health service; clients must show a certificate."""
    directory = tmp_path_factory.mktemp("pki")
    server_cert, server_key = self_signed(directory, "server")
    client_cert, client_key = self_signed(directory, "client")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_key.read_bytes(), server_cert.read_bytes())],
        root_certificates=client_cert.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield {"port": str(port), "cert": str(server_cert), "key": str(server_key),
           "client_cert": str(client_cert), "client_key": str(client_key)}
    server.stop(0)


def test_health_check_speaks_mutual_tls(tls_server):
    settings = dict(XAISERVE_PORT=tls_server["port"], XAISERVE_TLS_CERT=tls_server["cert"],
                    XAISERVE_TLS_KEY=tls_server["key"],
                    XAISERVE_TLS_CLIENT_CA=tls_server["client_cert"])
    missing = run_script("health", **settings)
    assert missing.returncode == 2
    assert "set XAISERVE_HEALTH_TLS_CERT and XAISERVE_HEALTH_TLS_KEY" in missing.stderr

    ok = run_script("health", XAISERVE_HEALTH_TLS_CERT=tls_server["client_cert"],
                    XAISERVE_HEALTH_TLS_KEY=tls_server["client_key"], **settings)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("SERVING")

    # Someone else's certificate: the handshake fails and the check says so in one line.
    wrong = run_script("health", XAISERVE_HEALTH_TLS_CERT=tls_server["cert"],
                       XAISERVE_HEALTH_TLS_KEY=tls_server["key"], **settings)
    assert wrong.returncode == 1
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def test_health_cli_refuses_bad_options_in_one_line(tmp_path):
    cli = [str(BIN / "xaiserve"), "health"]
    half = subprocess.run([*cli, "--tls-cert", "c.pem"], capture_output=True, text=True)
    assert half.returncode == 2
    assert half.stderr.strip() == ("xaiserve health: error: --tls-cert and --tls-key go together: "
                                   "give both or neither")
    missing = subprocess.run([*cli, "--tls-ca", "/nonexistent/ca.pem"], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "--tls-ca /nonexistent/ca.pem: cannot read it" in \
        missing.stderr
    (tmp_path / "ca.pem").write_text("not a certificate\n")  # refused now, not at the handshake
    garbled = subprocess.run([*cli, "--tls-ca", str(tmp_path / "ca.pem")], capture_output=True,
                             text=True)
    assert garbled.returncode == 2 and "ca.pem: no PEM certificate in it" in garbled.stderr
