"""Security against a real server on a real port: TLS and mutual TLS with certificates made
here, the bearer token (health checks exempt), the limit on concurrent requests, names that
look like paths, and a fuzz test of request decoding (hypothesis)."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import shutil
import ssl
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xaiserve.service.bench_settings import BenchSettings
from xaiserve.service.client import XaiClient
from xaiserve.service.config import ConfigError, ModelSettings, ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc
from xaiserve.service.security import ServerAccess
from xaiserve.service.server import Server

from tests.conftest import run_cli, wait_for

IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
TOKEN = "s3cret-token-for-tests"


# --- certificates -----------------------------------------------------------------------------

def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key) -> None:
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem/key (localhost, 127.0.0.1), client.pem/key signed by the CA, and
    stranger.pem/key signed by another CA."""
    out = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1())
            for n in ("ca", "other", "server", "client", "stranger")}
    _write(out, "ca", _certificate("xaiserve test CA", keys["ca"], "xaiserve test CA",
                                   keys["ca"], ca=True), keys["ca"])
    _write(out, "server", _certificate("localhost", keys["server"], "xaiserve test CA",
                                       keys["ca"], server=True), keys["server"])
    _write(out, "client", _certificate("client", keys["client"], "xaiserve test CA",
                                       keys["ca"]), keys["client"])
    _write(out, "stranger", _certificate("stranger", keys["stranger"], "another CA",
                                         keys["other"]), keys["stranger"])
    (out / "token").write_text(TOKEN + "\n")
    return out


# --- servers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo(small_export, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("security")
    shutil.copytree(small_export.path, path / "shapes" / "1")
    return path


def start(repo: Path, **options) -> Server:
    settings = ServerSettings(repository=repo, host="127.0.0.1", port=0,
                              defaults=ModelSettings(black_box_masks=100,
                                                     max_black_box_masks=20_000), **options)
    return Server(settings).start()


def explain_request(**fields) -> xpb.ExplainRequest:
    return xpb.ExplainRequest(
        model_name="shapes", map_format=xpb.MAP_FORMAT_FLOAT,
        image=xpb.Image(tensor=xpb.Tensor(shape=[64, 64, 3], data=IMAGE.tobytes())), **fields)


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=10).status


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def test_tls_and_token(repo, pki, tmp_path):
    server = start(repo, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                   token_file=pki / "token")
    address = f"127.0.0.1:{server.port}"
    try:
        good = XaiClient.connect(address, tls_ca=pki / "ca.pem", token_file=pki / "token")
        assert good.model_info("shapes").ready
        assert good.stub.Explain(explain_request()).maps[0].method == "reciprocam"

        # TLS without the token, or with a wrong one: UNAUTHENTICATED, naming the fix
        no_token = XaiClient.connect(address, tls_ca=pki / "ca.pem")
        details = refused(lambda: no_token.model_info("shapes"),
                          grpc.StatusCode.UNAUTHENTICATED)
        assert "authorization: Bearer" in details
        (tmp_path / "wrong").write_text("not-the-token")
        wrong = XaiClient.connect(address, tls_ca=pki / "ca.pem", token_file=tmp_path / "wrong")
        refused(lambda: wrong.stub.Explain(explain_request()),
                grpc.StatusCode.UNAUTHENTICATED)
        # health probes need no token
        assert health_status(no_token.channel) == health_pb2.HealthCheckResponse.SERVING

        # a plaintext client cannot talk to a TLS server
        plain = XaiClient(address, timeout=10, retries=0)  # refusals: no retries
        refused(lambda: plain.model_info("shapes"), grpc.StatusCode.UNAVAILABLE)
        # nor can a client that does not trust the server's CA
        untrusting = XaiClient.connect(address, tls_ca=pki / "stranger.pem",
                                       token_file=pki / "token", timeout=10, retries=0)
        refused(lambda: untrusting.model_info("shapes"), grpc.StatusCode.UNAVAILABLE)

        # the CLI's client options, end to end
        image = tmp_path / "image.png"
        import cv2
        cv2.imwrite(str(image), IMAGE)
        result = run_cli("explain", str(image), "--server", f"localhost:{server.port}",
                         "--model", "shapes", "--tls-ca", str(pki / "ca.pem"),
                         "--token-file", str(pki / "token"), "--out", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / "image_overlay.png").is_file()
        result = run_cli("explain", str(image), "--server", f"localhost:{server.port}",
                         "--model", "shapes", "--tls-ca", str(pki / "ca.pem"),
                         "--out", str(tmp_path / "out"))
        assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr
        for c in (good, no_token, wrong, plain, untrusting):
            c.close()
    finally:
        server.stop(grace=1)


def replace_file(path: Path, data: bytes) -> None:
    """As a Secret volume or cert-manager does: the new file appears whole."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(data)
    staged.replace(path)


def test_rotated_token_and_certificate_apply_without_a_restart(repo, pki, tmp_path):
    """Certificates (cert-manager renews them every few weeks) and the token (a rotated
    Secret) were read once at start: rotating them meant restarting every server."""
    for name in ("server.pem", "server.key", "token"):
        shutil.copy(pki / name, tmp_path / name)
    server = start(repo, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key",
                   token_file=tmp_path / "token", rest_port=0)
    address = f"127.0.0.1:{server.port}"
    clients = []

    def https_ready(ca: Path) -> int:
        """A new HTTPS connection to the REST side, trusting `ca`."""
        connection = http.client.HTTPSConnection(
            "localhost", server.rest.port, context=ssl.create_default_context(cafile=ca),
            timeout=10)
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status

    def client(ca: Path) -> XaiClient:
        clients.append(XaiClient.connect(address, tls_ca=ca, token_file=tmp_path / "token",
                                         retries=0, timeout=10))
        return clients[-1]
    try:
        before = client(pki / "ca.pem")
        assert before.model_info("shapes").ready
        assert https_ready(pki / "ca.pem") == 200
        replace_file(tmp_path / "token", b"a-rotated-token\n")
        time.sleep(1.2)  # the files are looked at once a second
        refused(lambda: before.model_info("shapes"), grpc.StatusCode.UNAUTHENTICATED)
        connected = client(pki / "ca.pem")  # the new token, on the first certificate
        assert connected.model_info("shapes").ready

        ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), \
            ec.generate_private_key(ec.SECP256R1())
        _write(tmp_path, "new-ca", _certificate("renewed CA", ca_key, "renewed CA", ca_key,
                                                ca=True), ca_key)
        renewed = _certificate("localhost", server_key, "renewed CA", ca_key, server=True)
        replace_file(tmp_path / "server.key", server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        replace_file(tmp_path / "server.pem", renewed.public_bytes(serialization.Encoding.PEM))
        time.sleep(1.2)
        assert client(tmp_path / "new-ca.pem").model_info("shapes").ready  # a new handshake
        refused(lambda: client(pki / "ca.pem").model_info("shapes"),
                grpc.StatusCode.UNAVAILABLE)  # the old CA no longer vouches for the server
        assert connected.model_info("shapes").ready  # connections made before go on
        assert https_ready(tmp_path / "new-ca.pem") == 200  # the REST side rotates too
        with pytest.raises(ssl.SSLCertVerificationError):
            https_ready(pki / "ca.pem")

        # a rotation with an overlap: the old token and the new one both accepted, until the
        # old line goes (a comment line, a blank one and a repeated token are fine)
        replace_file(tmp_path / "token", b"# rotating\nthe-next-token\n\na-rotated-token\n"
                                         b"the-next-token\n")
        time.sleep(1.2)
        assert connected.model_info("shapes").ready  # still on "a-rotated-token"
        (tmp_path / "next").write_text("the-next-token\n")
        moved = XaiClient.connect(address, tls_ca=tmp_path / "new-ca.pem",
                                  token_file=tmp_path / "next",
                                  retries=0, timeout=10)
        clients.append(moved)
        assert moved.model_info("shapes").ready
        # which token the calls carried, by its id: when the old one's count stops growing,
        # its line can go
        def calls_with(token: str) -> float:
            token_id = hashlib.sha256(token.encode()).hexdigest()[:8]
            return server.telemetry.registry.get_sample_value(
                "xaiserve_token_calls_total", {"token_id": token_id}) or 0
        # counted just after each response leaves, so a moment after the client has it
        assert wait_for(lambda: calls_with("a-rotated-token") >= 2
                        and calls_with("the-next-token") >= 1, 10)
        replace_file(tmp_path / "token", b"the-next-token\n")
        time.sleep(1.2)
        old_calls = calls_with("a-rotated-token")
        refused(lambda: connected.model_info("shapes"), grpc.StatusCode.UNAUTHENTICATED)
        assert moved.model_info("shapes").ready
        assert calls_with("a-rotated-token") == old_calls
        # the client's file is the server's: it sends the first token
        replace_file(tmp_path / "token", b"the-next-token\na-rotated-token\n")
        time.sleep(1.2)
        connected = client(tmp_path / "new-ca.pem")
        assert connected.model_info("shapes").ready

        # a rotation caught half-way (an empty token file, no PEM): the ones before stay
        later = client(tmp_path / "new-ca.pem")  # it connects at its first call, below
        replace_file(tmp_path / "token", b"")
        replace_file(tmp_path / "server.pem", b"not yet")
        time.sleep(1.2)
        assert connected.model_info("shapes").ready
        assert later.model_info("shapes").ready
    finally:
        for c in clients:
            c.close()
        server.stop(grace=1)


def test_a_key_that_is_not_the_certificates_is_refused_and_waited_out(repo, pki, tmp_path):
    """A key that does not belong to the certificate (or an encrypted one): at start gRPC
    failed with "cannot bind" the port, and --check-config said ok. A rotation that has
    replaced the certificate and not yet the key keeps the pair before until both are there."""
    with pytest.raises(ConfigError, match="client.key: the key is not the certificate's"):
        start(repo, tls_cert=pki / "server.pem", tls_key=pki / "client.key")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass")))
    with pytest.raises(ConfigError, match="the key is encrypted; gRPC needs it unencrypted"):
        start(repo, tls_cert=pki / "server.pem", tls_key=encrypted)

    for name in ("server.pem", "server.key"):
        shutil.copy(pki / name, tmp_path / name)
    server = start(repo, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")
    address, clients = f"127.0.0.1:{server.port}", []

    def fresh_client(ca: Path) -> XaiClient:
        clients.append(XaiClient.connect(address, tls_ca=ca, retries=0, timeout=10))
        return clients[-1]
    try:
        ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), \
            ec.generate_private_key(ec.SECP256R1())
        _write(tmp_path, "new-ca", _certificate("renewed CA", ca_key, "renewed CA", ca_key,
                                                ca=True), ca_key)
        renewed = _certificate("localhost", server_key, "renewed CA", ca_key, server=True)
        replace_file(tmp_path / "server.pem", renewed.public_bytes(serialization.Encoding.PEM))
        time.sleep(1.2)  # the certificate is there, its key not yet: the pair before serves
        assert fresh_client(pki / "ca.pem").model_info("shapes").ready
        replace_file(tmp_path / "server.key", server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        time.sleep(1.2)  # now both: the new pair
        assert fresh_client(tmp_path / "new-ca.pem").model_info("shapes").ready
        refused(lambda: fresh_client(pki / "ca.pem").model_info("shapes"),
                grpc.StatusCode.UNAVAILABLE)
    finally:
        for client in clients:
            client.close()
        server.stop(grace=1)

    bad = tmp_path / "pair"
    bad.mkdir()
    shutil.copy(pki / "server.pem", bad / "server.pem")
    shutil.copy(pki / "client.key", bad / "server.key")
    (bad / "repository").mkdir()
    result = run_cli("serve", "--repository", bad / "repository", "--tls-cert",
                     bad / "server.pem", "--tls-key", bad / "server.key", "--check-config")
    assert result.returncode == 2 and "the key is not the certificate's" in result.stderr


def test_mutual_tls(repo, pki):
    server = start(repo, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                   tls_client_ca=pki / "ca.pem")
    address = f"127.0.0.1:{server.port}"
    try:
        with_cert = XaiClient.connect(address, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                                      tls_key=pki / "client.key")
        assert with_cert.model_info("shapes").ready
        without = XaiClient.connect(address, tls_ca=pki / "ca.pem", timeout=10, retries=0)
        refused(lambda: without.model_info("shapes"), grpc.StatusCode.UNAVAILABLE)
        stranger = XaiClient.connect(address, tls_ca=pki / "ca.pem", timeout=10, retries=0,
                                     tls_cert=pki / "stranger.pem", tls_key=pki / "stranger.key")
        refused(lambda: stranger.model_info("shapes"), grpc.StatusCode.UNAVAILABLE)
        assert with_cert.model_info("shapes").ready  # still serving
        for c in (with_cert, without, stranger):
            c.close()
    finally:
        server.stop(grace=1)


def test_bench_and_evaluate_reach_a_server_with_tls_and_a_token(repo, pki, tmp_path):
    """`xaiserve bench` (gRPC and HTTPS) and `xaiserve evaluate` take the client options of
    `explain`: against a server with mutual TLS and a token they measure and report; without
    them they are turned away in one line."""
    import json

    from tests.synthetic import make_dataset, write_image_folder

    server = start(repo, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                   tls_client_ca=pki / "ca.pem", token_file=pki / "token", rest_port=0)
    access = ("--tls-ca", pki / "ca.pem", "--tls-cert", pki / "client.pem", "--tls-key",
              pki / "client.key", "--token-file", pki / "token")
    short = ("--warmup", "0.2", "--window", "0.3", "--max-windows", "3", "--no-reference")
    write_image_folder(tmp_path / "data", *make_dataset(4, seed=3), classes=("0", "1", "2"))
    try:
        for where, mode in ((f"localhost:{server.port}", "server"),
                            (f"https://localhost:{server.rest.port}", "server-rest")):
            out = tmp_path / mode
            result = run_cli("bench", "--server", where, "--model", "shapes", *access, *short,
                             "--out", out)
            assert result.returncode == 0, result.stderr[-2000:]
            points = json.loads((out / "bench.json").read_text())["points"]
            assert {p["mode"] for p in points} == {mode} and all(p["errors"] == 0
                                                                 for p in points)
            result = run_cli("bench", "--server", where, "--model", "shapes", "--tls-ca",
                             pki / "ca.pem", *short, "--out", tmp_path / "refused")
            assert result.returncode == 2, result.stderr[-2000:]
        result = run_cli("evaluate", tmp_path / "data", "--server", f"localhost:{server.port}",
                         "--model", "shapes", *access, "--out", tmp_path / "report",
                         "--grid-mosaics", "0", "--steps", "8")
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(json.loads((tmp_path / "report" / "results.json").read_text())) == 4
        result = run_cli("evaluate", tmp_path / "data", "--server", f"localhost:{server.port}",
                         "--model", "shapes", "--tls-ca", pki / "ca.pem", "--tls-cert",
                         pki / "client.pem", "--tls-key", pki / "client.key", "--out",
                         tmp_path / "no-token")
        assert result.returncode == 2 and "UNAUTHENTICATED" in result.stderr.splitlines()[-1]
    finally:
        server.stop(grace=1)


def test_bad_security_settings_name_the_flag(repo, pki, tmp_path):
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        Server(ServerSettings(repository=repo, port=0, tls_cert=pki / "server.pem"))
    with pytest.raises(ConfigError, match="--tls-client-ca needs TLS"):
        Server(ServerSettings(repository=repo, port=0, tls_client_ca=pki / "ca.pem"))
    with pytest.raises(ConfigError, match="--tls-key .*no PEM private key"):
        Server(ServerSettings(repository=repo, port=0, tls_cert=pki / "server.pem",
                              tls_key=pki / "server.pem"))
    with pytest.raises(ConfigError, match="--token-file .*cannot read"):
        Server(ServerSettings(repository=repo, port=0, token_file=tmp_path / "missing"))
    result = run_cli("serve", "--repository", str(repo), "--port", "0",
                     "--tls-client-ca", str(pki / "ca.pem"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("xaiserve serve: error: --tls-")


def test_config_file_keys_and_token_sources(pki, tmp_path, monkeypatch):
    from xaiserve.service.config import load_settings
    from xaiserve.service.security import TOKEN_ENV, read_token, read_tokens

    config = tmp_path / "serve.yaml"
    config.write_text(f"""
server:
  tls_cert: {pki / 'server.pem'}
  tls_key: {pki / 'server.key'}
  tls_client_ca: {pki / 'ca.pem'}
  token_file: {pki / 'token'}
  max_concurrent_requests: 3
  max_message_bytes: 1000000
  shutdown_grace: 2.5
  metrics_port: 9191
defaults:
  max_black_box_masks: 500
  black_box_masks: 100
""")
    settings = load_settings(config, max_concurrent_requests=5)  # a flag beats the file
    assert settings.tls_client_ca == pki / "ca.pem" and settings.token_file == pki / "token"
    assert (settings.max_concurrent_requests, settings.max_message_bytes) == (5, 1000000)
    assert (settings.shutdown_grace, settings.metrics_port) == (2.5, 9191)
    assert settings.defaults.max_black_box_masks == 500
    config.write_text("server:\n  max_concurrent_requests: 0\n")
    with pytest.raises(ConfigError, match=r"server\.max_concurrent_requests: 0; input should be "
                                          r"greater than or equal to 1"):
        load_settings(config)

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None  # no token: no check
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(None) == "from-env"
    assert read_token(pki / "token") == TOKEN  # the file wins, its newline stripped
    (tmp_path / "empty").write_text("\n# only a comment\n")
    with pytest.raises(ConfigError, match="no token in it"):
        read_token(tmp_path / "empty")
    (tmp_path / "two").write_text("# old one goes on Friday\nold-token\n  new-token  \n")
    assert read_tokens(tmp_path / "two") == ("old-token", "new-token")
    assert read_token(tmp_path / "two") == "old-token"
    (tmp_path / "spaced").write_text("old-token new-token\n")
    with pytest.raises(ConfigError, match="line 1 holds a space; one token a line"):
        read_tokens(tmp_path / "spaced")


# --- limits and paths ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(repo):
    server = start(repo, max_concurrent_requests=2, max_black_box_in_flight=2,
                   max_message_bytes=1024 * 1024)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, channel
    channel.close()
    server.stop(grace=5)


def test_concurrent_request_limit(limited):
    server, channel = limited
    stub = xgrpc.ExplanationServiceStub(channel)
    slow_results = []

    def slow(seed):
        slow_results.append(stub.Explain(explain_request(
            method=xpb.METHOD_BLACK_BOX, black_box=xpb.BlackBoxOptions(num_masks=20_000,
                                                                       seed=seed)),
            timeout=120))

    threads = [threading.Thread(target=slow, args=(s,)) for s in (11, 12)]
    for t in threads:
        t.start()
    assert wait_for(lambda: server.telemetry.in_flight._value.get() == 2, 60)
    details = refused(lambda: stub.Explain(explain_request(), timeout=10),
                      grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "max_concurrent_requests" in details
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING  # probes exempt
    for t in threads:
        t.join()
    assert len(slow_results) == 2
    assert stub.Explain(explain_request()).maps  # free again


def test_message_size_and_black_box_budget(limited):
    _, channel = limited
    stub = xgrpc.ExplanationServiceStub(channel)
    big = xpb.ExplainRequest(model_name="shapes", image=xpb.Image(encoded=b"x" * 2_000_000))
    refused(lambda: stub.Explain(big, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
    details = refused(lambda: stub.Explain(explain_request(
        method=xpb.METHOD_BLACK_BOX, black_box=xpb.BlackBoxOptions(num_masks=50_000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "black_box.num_masks" in details and "20000" in details


PATH_NAMES = ["../../etc/passwd", "/etc/passwd", "shapes/1/model.xml", "shapes/../shapes",
              "..", ".", "shapes/1", "~root", "C:\\Windows\\win.ini", "shapes\x00"]


def test_no_name_in_a_request_reaches_the_file_system(limited, repo):
    _, channel = limited
    stub = xgrpc.ExplanationServiceStub(channel)
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    for name in PATH_NAMES:
        refused(lambda: stub.ModelInfo(xpb.ModelInfoRequest(model_name=name)),
                grpc.StatusCode.NOT_FOUND)
        refused(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name=name)),
                grpc.StatusCode.NOT_FOUND)
        refused(lambda: stub.Explain(explain_request(model_version=name)),
                grpc.StatusCode.NOT_FOUND)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before


# --- fuzzing the request decoding against the running server --------------------------------------

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
# Mostly the served model, so that most requests reach the decoding behind the lookup.
names = st.sampled_from(["shapes"] * 8 + ["bad"]).flatmap(
    lambda n: st.just(n) if n == "shapes" else st.sampled_from(PATH_NAMES) | st.text(max_size=40))
versions = st.sampled_from(["", "1"] * 4 + ["bad"]).flatmap(
    lambda v: st.just(v) if v != "bad" else st.text(max_size=12)
    | st.integers(-2**63, 2**63).map(str))
dims = st.lists(st.integers(-2**63, 2**63 - 1) | st.sampled_from([0, 1, 3, 64]), max_size=5)
png = st.just(__import__("cv2").imencode(".png", IMAGE)[1].tobytes())


def mostly(usual, odd) -> st.SearchStrategy:
    """`usual` four times in five, else `odd`: each field is sometimes wrong, so that many
    requests get past the first check and reach the decoding and the model behind it."""
    return st.sampled_from([True] * 4 + [False]).flatmap(lambda u: usual if u else odd)


BIG = st.integers(0, 2**32 - 1)
MASK_PNG = st.just(__import__("cv2").imencode(".png", np.zeros((64, 64), np.uint8) + 255)[1]
                   .tobytes())


@st.composite
def explain_requests(draw) -> xpb.ExplainRequest:
    request = xpb.ExplainRequest(
        model_name=draw(names), model_version=draw(versions), id=draw(st.text(max_size=300)),
        target_classes=draw(mostly(st.lists(st.integers(0, 2), max_size=2), st.lists(
            st.integers(-2**63, 2**63 - 1) | st.integers(-1, 4), max_size=4))),
        top_k=draw(mostly(st.integers(0, 3), BIG)),
        method=draw(mostly(st.integers(0, 2), st.integers(3, 2**31 - 1))),
        map_format=draw(mostly(st.integers(0, 3), st.integers(4, 2**31 - 1))),
        black_box=xpb.BlackBoxOptions(num_masks=draw(mostly(st.integers(0, 200), BIG)),
                                      cells=draw(mostly(st.integers(0, 8), BIG)),
                                      seed=draw(st.integers(0, 2**64 - 1))),
        metrics=draw(mostly(st.just([]) | st.lists(st.sampled_from(
            ["all", "faithfulness", "shared_interest", "deletion_auc"]), max_size=2),
            st.lists(st.text(max_size=10), max_size=3))),
        thresholds=draw(mostly(st.just({}), st.dictionaries(st.text(max_size=20) | st.sampled_from(
            ["high_confidence", "competing_margin"]), st.floats(), max_size=3))))
    if draw(mostly(st.just(False), st.just(True))):
        options = request.metric_options
        options.binarization = draw(st.sampled_from(["", "std", "threshold", "percentile"])
                                    | st.text(max_size=8))
        if draw(st.booleans()):
            options.binarization_value = draw(st.floats())
        options.substrate = draw(st.sampled_from(["", "black", "blur", "mean"])
                                 | st.text(max_size=8))
        options.steps = draw(mostly(st.integers(0, 20), BIG))
        options.blur_kernel = draw(mostly(st.integers(0, 99), BIG))
        options.pointing_tolerance_px = draw(mostly(st.integers(0, 99), BIG))
    for _ in range(draw(mostly(st.just(0), st.integers(1, 2)))):
        request.ground_truth.boxes.add(**{k: draw(st.floats(-10, 80) | st.floats(width=32))
                                          for k in ("x_min", "y_min", "x_max", "y_max")})
    kind = draw(mostly(st.sampled_from(["good_tensor", "png"]),
                       st.sampled_from(["encoded", "corrupt_png", "tensor", "none"])))
    if kind == "encoded":
        request.image.encoded = draw(st.binary(max_size=2000))
    elif kind in ("png", "corrupt_png"):
        data = bytearray(draw(png))
        if kind == "corrupt_png":
            for i in draw(st.lists(st.integers(0, len(data) - 1), max_size=8)):
                data[i] = draw(st.integers(0, 255))  # a few bytes, headers included
        request.image.encoded = bytes(data)
    elif kind == "tensor":
        request.image.tensor.shape.extend(draw(dims))
        request.image.tensor.data = draw(st.binary(max_size=4000))
    elif kind == "good_tensor":
        request.image.tensor.shape.extend([64, 64, 3])
        request.image.tensor.data = IMAGE.tobytes()
    if draw(mostly(st.just(False), st.just(True))):
        request.ground_truth.has_label = True
        request.ground_truth.label = draw(mostly(st.integers(0, 2),
                                                 st.integers(-2**63, 2**63 - 1)))
    if draw(mostly(st.just(False), st.just(True))):
        request.ground_truth.mask_png = draw(mostly(MASK_PNG, st.binary(max_size=200) | png))
    return request


@st.composite
def infer_requests(draw) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=draw(names), model_version=draw(versions),
                                    id=draw(st.text(max_size=50)))
    good = st.sampled_from([("UINT8", [1, 64, 64, 3]), ("BYTES", [1])])
    for _ in range(draw(mostly(st.just(1), st.integers(0, 2)))):
        datatype, shape = draw(mostly(good, st.tuples(
            st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", ""]) | st.text(max_size=8),
            dims | st.just([1, 64, 64, 3]))))
        tensor = request.inputs.add(name=draw(st.text(max_size=10)), datatype=datatype,
                                    shape=shape)
        if draw(mostly(st.just(False), st.just(True))):
            tensor.contents.uint_contents.extend(draw(st.lists(BIG, max_size=50)))
        if draw(mostly(st.just(False), st.just(True))):
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=100)
                                                                | png, max_size=3)))
    raw = {"UINT8": st.just(IMAGE.tobytes()),
           "BYTES": png.map(lambda b: len(b).to_bytes(4, "little") + b)}
    datatype = request.inputs[0].datatype if request.inputs else ""
    for _ in range(draw(mostly(st.just(1), st.integers(0, 2)))):
        request.raw_input_contents.append(draw(mostly(
            raw.get(datatype, st.binary(max_size=3000)),
            st.binary(max_size=3000) | st.just(b"\xff\xff\xff\x7f") | st.just(b"\x05\x00"))))
    for _ in range(draw(mostly(st.integers(0, 1), st.integers(1, 3)))):
        request.outputs.add(name=draw(mostly(st.sampled_from(["logits", "saliency_map"]),
                                             st.sampled_from(["../x", ""]) | st.text(max_size=10))))
    return request


@pytest.fixture(scope="module")
def fuzz_target(repo):
    server = start(repo, max_message_bytes=1024 * 1024)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, channel
    channel.close()
    server.stop(grace=5)


def answer_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.details(), exc.code()  # a message that says what is wrong
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(request=st.one_of(explain_requests(), infer_requests()))
def test_fuzzed_requests_get_well_formed_answers(fuzz_target, request):
    _, channel = fuzz_target
    if isinstance(request, xpb.ExplainRequest):
        method = xgrpc.ExplanationServiceStub(channel).Explain
    else:
        method = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer
    code = answer_code(lambda: method(request, timeout=30))  # a deadline: a hang fails
    assert code in ALLOWED, (code, request)


def test_server_still_serves_after_fuzzing(fuzz_target):
    server, channel = fuzz_target
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    response = xgrpc.ExplanationServiceStub(channel).Explain(explain_request(), timeout=30)
    assert response.model_version == "1" and response.maps
    assert server.telemetry.in_flight._value.get() == 0


def test_the_token_is_in_no_repr(tmp_path):
    """A client's settings are printed in logs and errors, and bench's were written into
    bench.json with the token in them: the token is kept out of every repr."""
    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    access = ServerAccess.read(token_file=secret)
    assert access.token == "s3cret-token"
    for shown in (repr(access), str(access), repr(BenchSettings(access=access))):
        assert "s3cret" not in shown, shown
