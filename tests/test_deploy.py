"""The deployment files in deploy/, checked offline with the tools their platforms use.

- Dockerfiles: hadolint (no findings, no ignores); the wheel the image installs is built from
  exactly what the Dockerfiles copy.
- Kubernetes: `kubectl kustomize` renders each kustomization; every object is validated against
  the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) or, for KServe kinds,
  against KServe's CRD schemas (tests/data/kserve, made strict the way the API server's strict
  field validation is); then the pieces must fit together (ports, names, probes, security).
- docker compose: the Compose Specification schema (tests/data/compose-spec.json).
- systemd: `systemd-analyze verify` (no warnings) and `systemd-analyze security` (exposure <= 2).
- Prometheus alerting rules: every expression parsed by a PromQL parser (promql-parser, a port
  of Prometheus's own), and every metric it names exported by a running server.
Each validator is also shown a broken copy and must reject it, so these tests can fail.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).resolve().parent / "data"
BIN = Path(sys.executable).parent
VERSION = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # oldest we claim, newest
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))


def tool(name: str) -> str:
    """A command from this environment's bin (the `test` extra installs them), else PATH."""
    here = BIN / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


def entrypoint_variables() -> set[str]:
    return set(re.findall(r"\bXAISERVE_[A-Z_]+\b", (DEPLOY / "entrypoint.sh").read_text()))


# --- container images -------------------------------------------------------------------------

def hadolint(path: Path) -> list[dict]:
    result = subprocess.run([tool("hadolint"), "--no-fail", "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"[ \t]*\\\n\s*", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_has_no_lint_findings(dockerfile):
    assert hadolint(dockerfile) == []
    assert not (DEPLOY / ".hadolint.yaml").exists(), "no ignores: fix the finding instead"


def test_lint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(DOCKERFILES[0].read_text().replace("USER 10001:10001", "USER root")
                   .replace("pip install --no-cache-dir", "pip install"))
    codes = {finding["code"] for finding in hadolint(bad)}
    assert {"DL3002", "DL3042"} <= codes, codes  # last user root; pip cache kept


WHEEL = "/tmp/wheels/xaiserve-${XAISERVE_VERSION}-py3-none-any.whl"


def test_the_build_context_holds_what_the_images_copy_and_nothing_else():
    """.dockerignore admits each COPY source of the build stages (a missing one fails the
    build) and nothing more: `.venv` alone is several GB of context otherwise."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    admitted = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for dockerfile in DOCKERFILES:
        for op, arg in instructions(dockerfile):
            if op == "COPY" and not arg.startswith("--from"):
                *sources, _ = [part for part in arg.split() if not part.startswith("--")]
                copied |= set(sources)
    assert copied == admitted, (copied, admitted)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_user_and_install_this_version(dockerfile):
    steps = instructions(dockerfile)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert f"ARG XAISERVE_VERSION={VERSION}" in dockerfile.read_text()
    installs = " ".join(arg for op, arg in final if op == "RUN" and "pip install" in arg)
    if dockerfile.name == "runtime.Dockerfile":
        assert f'"{WHEEL}"' in installs  # no extras: no torch
        (check,) = [arg for op, arg in final if op == "HEALTHCHECK"]
        assert check.endswith('CMD ["xaiserve-entrypoint", "health"]'), check
        assert ("ENTRYPOINT", '["xaiserve-entrypoint"]') in final
        assert ("COPY", "--chmod=0755 deploy/entrypoint.sh /usr/local/bin/xaiserve-entrypoint") \
            in final
    else:
        assert f'"{WHEEL}[export]"' in installs
    assert "--find-links" not in installs  # by its path: an index cannot supply another


def test_the_wheel_builds_from_what_the_dockerfiles_copy(tmp_path):
    """The image's build stage copies only some files: a wheel built from just those must hold
    the whole server (protos included) and require no torch outside the `export` extra."""
    context = tmp_path / "context"
    context.mkdir()
    for dockerfile in DOCKERFILES:
        steps = instructions(dockerfile)
        stage = steps[:[op for op, _ in steps].index("FROM", 1 + [op for op, _ in steps]
                                                       .index("FROM"))]
        for op, arg in stage:
            if op == "COPY":
                *sources, _ = arg.split()
                for source in sources:
                    target = context / source
                    if (ROOT / source).is_dir():
                        shutil.copytree(ROOT / source, target, dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        shutil.copy2(ROOT / source, target)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                             "--no-build-isolation",  # the venv's setuptools: no index asked
                             "--wheel-dir", str(tmp_path / "wheels"), str(context)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob(f"xaiserve-{VERSION}-*.whl")
    assert wheel.name == Path(WHEEL.replace("${XAISERVE_VERSION}", VERSION)).name  # what the
    # images install by its path
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"xaiserve-{VERSION}.dist-info/METADATA").decode()
    for module in ("service/server.py", "service/health.py", "service/cli.py",
                   "service/commands/serve.py", "service/proto/grpc_predict_v2_pb2.py",
                   "export/pipeline.py"):
        assert f"xaiserve/{module}" in names, module
    runtime = [line for line in metadata.splitlines()
               if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any("openvino" in line for line in runtime)
    assert not any(re.search(r"\b(torch|timm|nncf)\b", line) for line in runtime), runtime


def test_entrypoint_passes_shellcheck():
    result = subprocess.run([tool("shellcheck"), "--shell=sh", str(DEPLOY / "entrypoint.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# --- Kubernetes and KServe --------------------------------------------------------------------

def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def strict(schema):
    """Reject unknown fields, as `kubectl apply --validate=strict` does for custom resources:
    every object schema that lists its properties and does not preserve unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def kserve_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators = {}
    for path in sorted((DATA / "kserve").glob("*.json")):
        data = json.loads(path.read_text())
        schema = strict(data["schema"])
        validators[(f"{data['group']}/{data['version']}", data["kind"])] = \
            jsonschema.Draft4Validator(schema)
    return validators


KSERVE = kserve_validators()


def validate(doc: dict) -> str:
    """Raise on any schema error; say which schema checked the object."""
    key = (doc["apiVersion"], doc["kind"])
    if key in KSERVE:
        errors = sorted(KSERVE[key].iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise jsonschema.ValidationError(
                f"{doc['kind']}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}"
                                               for e in errors[:5]))
        return "kserve-crd"
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
    return "kubernetes"


@pytest.fixture(scope="module")
def cluster() -> dict[str, dict]:
    docs = kustomize(DEPLOY / "kubernetes")
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def kserve() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in kustomize(DEPLOY / "kubernetes" / "kserve")}


def test_every_rendered_object_matches_its_schema(cluster, kserve):
    assert set(cluster) == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment",
                            "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"}
    assert set(kserve) == {"ServingRuntime", "InferenceService"}
    checked = {kind: validate(doc) for kind, doc in {**cluster, **kserve}.items()}
    assert checked["ServingRuntime"] == checked["InferenceService"] == "kserve-crd"
    assert checked["Deployment"] == "kubernetes"


BROKEN = [
    # (which object, how it is broken)
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
     ["grpc"].update(prot=9000)),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
     ["grpc"].update(port="grpc")),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"]
     .update(readOnlyRootFileSystem=True)),
    ("HorizontalPodAutoscaler", lambda d: d["spec"].update(targetCPUUtilizationPercentage=70)),
    ("Service", lambda d: d["spec"]["ports"][0].update(port="9000")),
    ("ServingRuntime", lambda d: d["spec"].update(protocolVersion="grpc-v2")),
    ("ServingRuntime", lambda d: d["spec"]["containers"][0]["readinessProbe"]["grpc"]
     .update(port="h2c")),
    ("ServingRuntime", lambda d: d["spec"].update(multiModel="no")),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(storageURI="s3://m")),
    ("InferenceService", lambda d: d["spec"]["predictor"].update(minReplicas="one")),
]


@pytest.mark.parametrize("kind, breakage", BROKEN, ids=[f"{k}-{i}" for i, (k, _) in
                                                         enumerate(BROKEN)])
def test_a_broken_copy_fails_validation(cluster, kserve, kind, breakage):
    doc = copy.deepcopy({**cluster, **kserve}[kind])
    breakage(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def container(pod_spec: dict) -> dict:
    (only,) = pod_spec["containers"]
    return only


def env(c: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in c.get("env", [])}


def assert_locked_down(c: dict) -> None:
    security = c["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def assert_probes(c: dict, port: int) -> None:
    """grpc.health.v1 on the serving port: readiness asks the server ("", NOT_SERVING while a
    model serves no version), startup and liveness the API service (the process is up: a
    restart does not mend a broken export); the server answers for each (model_health)."""
    from xaiserve.service.server import API_SERVICES

    assert c["readinessProbe"]["grpc"] == {"port": port}
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port and c[probe]["grpc"]["service"] in API_SERVICES


def test_deployment_probes_grpc_health_on_the_serving_port(cluster):
    pod = cluster["Deployment"]["spec"]["template"]["spec"]
    c = container(pod)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    variables = env(c)
    assert ports == {"grpc": int(variables["XAISERVE_PORT"]),
                     "metrics": int(variables["XAISERVE_METRICS_PORT"]),
                     "http": int(variables["XAISERVE_REST_PORT"])}
    assert_probes(c, ports["grpc"])
    assert set(variables) <= entrypoint_variables()
    assert c["image"] == f"xaiserve:{VERSION}"
    assert_locked_down(c)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # The pod outlives the server's shutdown: the preStop pause plus its grace period.
    assert pod["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + 10

    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"]["mountPath"] == variables["XAISERVE_REPOSITORY"]
    assert mounts["models"]["readOnly"] is True
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == \
        cluster["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == cluster["ConfigMap"]["metadata"]["name"]
    config_file = Path(variables["XAISERVE_CONFIG"])
    assert mounts["config"]["mountPath"] == str(config_file.parent)
    assert config_file.name in cluster["ConfigMap"]["data"]


def test_the_config_map_is_a_config_the_server_accepts(cluster, tmp_path):
    from xaiserve.service.config import load_settings

    (tmp_path / "serve.yaml").write_text(cluster["ConfigMap"]["data"]["serve.yaml"])
    settings = load_settings(tmp_path / "serve.yaml")
    assert settings.defaults.device == "CPU"


def test_service_and_autoscaler_point_at_the_deployment(cluster):
    deployment = cluster["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(deployment["spec"]["template"]["spec"])
    service = cluster["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["ports"]} == {p["name"] for p in c["ports"]}
    grpc_port = next(p for p in service["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"

    hpa = cluster["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in c["resources"]["requests"]  # utilisation is relative to the request
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"]  # the autoscaler's count survives a re-apply
    pdb = cluster["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb == {**pdb, "maxUnavailable": 1} and "minAvailable" not in pdb  # a drain: 1 pod

    # the token from a Secret; the serving ports open, metrics only to the monitoring namespace
    pod = deployment["spec"]["template"]["spec"]
    token = Path(env(c)["XAISERVE_TOKEN_FILE"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(token.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "xaiserve-token" and mount["readOnly"] is True
    policy = cluster["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    opened = {port["port"]: rule.get("from") for rule in policy["ingress"]
              for port in rule["ports"]}
    assert set(opened) == set(ports.values())
    assert opened[ports["grpc"]] is None and opened[ports["http"]] is None
    assert opened[ports["metrics"]]


def test_kserve_runtime_serves_v2_grpc_and_the_inference_service_uses_it(kserve):
    runtime = kserve["ServingRuntime"]
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert "openvino" in {f["name"] for f in spec["supportedModelFormats"]}
    c = container(spec)
    variables = env(c)
    assert set(variables) <= entrypoint_variables()
    assert variables["XAISERVE_REPOSITORY"] == "/mnt/models"  # KServe's storage initializer
    assert c["ports"] == [{"name": "h2c", "containerPort": int(variables["XAISERVE_PORT"]),
                           "protocol": "TCP"}]
    assert_probes(c, int(variables["XAISERVE_PORT"]))
    assert "initialDelaySeconds" not in c["livenessProbe"]  # the startup probe waits instead
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] > 0  # out of the endpoints first
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")  # read-only root
    assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in spec["volumes"])
    assert spec["annotations"]["prometheus.kserve.io/port"] == variables["XAISERVE_METRICS_PORT"]
    assert c["image"] == f"xaiserve:{VERSION}"
    assert_locked_down(c)

    model = kserve["InferenceService"]["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["modelFormat"] in spec["supportedModelFormats"] or \
        {**model["modelFormat"], "autoSelect": False} in spec["supportedModelFormats"]
    predictor = kserve["InferenceService"]["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    assert re.match(r"^[a-z0-9]+://", model["storageUri"])


# --- docker compose ---------------------------------------------------------------------------

def compose_validator() -> jsonschema.Validator:
    return jsonschema.Draft7Validator(json.loads((DATA / "compose-spec.json").read_text()))


def test_compose_file_matches_the_compose_spec():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    validator = compose_validator()
    assert [e.message for e in validator.iter_errors(compose)] == []

    broken = copy.deepcopy(compose)
    broken["services"]["xaiserve"]["healthcheck"]["intervall"] = "15s"
    assert list(validator.iter_errors(broken))
    broken = copy.deepcopy(compose)
    broken["services"]["xaiserve"]["ports"] = "9000:9000"  # a list, not a string
    assert list(validator.iter_errors(broken))


def test_compose_service_is_locked_down_and_uses_the_images():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    server = compose["services"]["xaiserve"]
    assert server["healthcheck"]["test"] == ["CMD", "xaiserve-entrypoint", "health"]
    assert server["read_only"] is True and server["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in server["security_opt"]
    assert not server["user"].startswith(("0", "root"))
    assert all(p.startswith("127.0.0.1:") for p in server["ports"])
    assert set(server["environment"]) <= entrypoint_variables()
    port = server["environment"]["XAISERVE_PORT"]
    assert f"127.0.0.1:{port}:{port}" in server["ports"]
    (models,) = server["volumes"]
    assert models["target"] == server["environment"]["XAISERVE_REPOSITORY"]
    assert models["read_only"] is True
    for name, image in (("xaiserve", "runtime"), ("export", "export")):
        service = compose["services"][name]
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]) == DEPLOY / f"{image}.Dockerfile"
        assert service["image"].endswith(f":{VERSION}")


# --- systemd ----------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "xaiserve.service"


def unit_copy(directory: Path, text: str) -> Path:
    """The unit as installed, but starting this checkout's entrypoint (verify needs the
    ExecStart program to exist)."""
    path = directory / "xaiserve.service"
    path.write_text(re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={DEPLOY / 'entrypoint.sh'}", text))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("systemd-analyze"), *args], capture_output=True, text=True,
                          timeout=120)


def test_systemd_unit_verifies_without_warnings(tmp_path):
    ours = analyze("verify", str(unit_copy(tmp_path, UNIT.read_text())))
    assert ours.returncode == 0 and ours.stderr == "", ours.stderr
    typo = analyze("verify", str(unit_copy(tmp_path, UNIT.read_text().replace(
        "ProtectSystem=strict", "ProtectSystm=strict"))))
    assert "Unknown key 'ProtectSystm'" in typo.stderr


def exposure(unit: Path) -> float:
    """systemd's own score of what a compromised service could do: 0 (nothing) .. 10."""
    result = analyze("security", "--offline=yes", str(unit))
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)[1])


def test_systemd_unit_is_sandboxed(tmp_path):
    assert exposure(unit_copy(tmp_path, UNIT.read_text())) <= 2.0  # systemd calls it "OK"
    assert exposure(unit_copy(tmp_path, "[Service]\nExecStart=/bin/true\n")) > 9.0


def test_systemd_unit_runs_the_entrypoint_with_known_settings():
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    assert values["ExecStart"] == ["/opt/xaiserve/bin/xaiserve-entrypoint"]
    settings = dict(v.split("=", 1) for v in values["Environment"])
    assert set(settings) <= entrypoint_variables()
    assert settings["XAISERVE_BIN"] == "/opt/xaiserve/bin/xaiserve"
    assert values["RestartPreventExitStatus"] == ["2"]  # the entrypoint's "bad settings"
    assert values["KillSignal"] == ["SIGTERM"]
    for key, value in (("DynamicUser", "yes"), ("NoNewPrivileges", "yes"),
                       ("ProtectSystem", "strict"), ("CapabilityBoundingSet", "")):
        assert values[key] == [value], key


# --- Prometheus alerting rules --------------------------------------------------------------

ALERTS = DEPLOY / "prometheus" / "xaiserve-alerts.yaml"


def selected_metrics(expression: str) -> set[str]:
    """The metric names an expression selects (PromQL syntax errors raise ValueError)."""
    import promql_parser

    names = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        for child in ("expr", "lhs", "rhs", "param", "vector_selector"):
            value = getattr(node, child, None)
            if isinstance(value, promql_parser.Expr):
                visit(value)
        for arg in getattr(node, "args", None) or ():
            visit(arg)
    visit(promql_parser.parse(expression))
    return names


def exported_metric_names(small_export, tmp_path) -> set[str]:
    """Every sample name a running server's /metrics can carry (from its TYPE lines)."""
    import urllib.request

    from xaiserve.service.config import ServerSettings
    from xaiserve.service.server import Server

    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    server = Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                                   metrics_port=0)).start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                      timeout=10).read().decode()
    finally:
        server.stop(grace=0)
    names = set()
    for name, kind in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum"),
                    "info": ("_info",)}.get(kind, ("",))
        names |= {name + suffix for suffix in suffixes} | {name}
    return names


@pytest.fixture(scope="module")
def exported(small_export, tmp_path_factory) -> set[str]:
    return exported_metric_names(small_export, tmp_path_factory.mktemp("metrics"))


def test_alert_rules_parse_and_name_only_metrics_the_server_exports(exported):
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]]
    assert len(rules) >= 5
    for rule in rules:
        assert rule["alert"].startswith("Xaiserve") and rule["labels"]["severity"] in (
            "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        named = selected_metrics(rule["expr"])
        assert named and named <= exported | {"up"}, (rule["alert"], named - exported)  # up:
        # Prometheus's own series for each target it scrapes
    # the check can fail: a renamed metric and a syntax error are caught
    assert not selected_metrics("rate(xaiserve_request_total[5m])") <= exported
    with pytest.raises(ValueError):
        selected_metrics("sum(rate(xaiserve_requests_total[5m])")


DASHBOARD = DEPLOY / "grafana" / "xaiserve-dashboard.json"


def test_grafana_dashboard_queries_parse_and_name_only_exported_metrics(exported):
    """The dashboard people look at: every panel's query is valid PromQL (Grafana's
    $__rate_interval as a duration) over metrics the server exports, filtered by the model
    variable where the metric has a model label."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 6
    for panel in panels:
        assert panel["title"] and panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expression = target["expr"].replace("$__rate_interval", "5m")
            named = selected_metrics(expression)
            assert named and named <= exported, (panel["title"], named - exported)
    assert any('model=~"$model"' in t["expr"] for p in panels for t in p["targets"])

