"""deploy/kubernetes/ (a Deployment of `compilers serve`, its Service and HorizontalPodAutoscaler, and the image's
Dockerfile), checked offline: no cluster, no image build (deploy/kubernetes/smoke.sh builds and runs the image).

- Every manifest validates against the Kubernetes API's own OpenAPI schemas (kubernetes-validate's copies, no
  network) in strict mode, where an unknown field is an error as with `kubectl apply` (field validation Strict),
  for the oldest and the newest Kubernetes release the README claims. Broken copies (a misspelled field, a wrong
  type, a missing required field, an API version the release no longer serves) fail, so the check can fail.
- What the schemas cannot see is cross-checked: the Service selects the pods and names their ports; the container's
  arguments are flags `compilers serve` accepts (parsed by compilers.cli's own parser, after the image's
  entrypoint) and name the ports and the mounted repository; the probes' paths answer as the probes expect on a
  real server; the HPA scales this Deployment on CPU, which the container requests; the grace period covers the
  preStop pause and the server's drain; the image's extras, user and CMD agree with the manifest.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from compilers.cli import parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
MANIFESTS = {"deployment.yaml": ("apps/v1", "Deployment"), "service.yaml": ("v1", "Service"),
             "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler")}
# The releases the manifests are written for (deploy/kubernetes/README.md): the oldest and the newest one
# kubernetes-validate 1.37.0 has schemas of. Pinned, so that a new kubernetes-validate cannot move them silently.
KUBERNETES = ("1.25.0", "1.37.0")


def load(name: str, text: str | None = None) -> dict:
    docs = [d for d in yaml.safe_load_all(text if text is not None else (DEPLOY / name).read_text()) if d]
    assert len(docs) == 1, f"{name} holds {len(docs)} documents, expected one"
    return docs[0]


def schema_errors(doc: dict, version: str) -> str | None:
    """None when `doc` is valid under the release's schemas (strict), else the first error as path: message."""
    try:
        validated = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.path))}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    assert validated == version.rsplit(".", 1)[0], f"validated against {validated}, not {version}"
    return None


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) for each instruction of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(dockerfile, name: str) -> list[str]:
    return [args for op, args in dockerfile if op == name]


@pytest.fixture(scope="module")
def serve_args(container, dockerfile):
    """The container's command line as `compilers serve` parses it: the image's ENTRYPOINT then the args."""
    [entrypoint] = instruction(dockerfile, "ENTRYPOINT")
    entrypoint = json.loads(entrypoint)
    assert entrypoint[0] == "compilers" and "command" not in container, "the image's entrypoint runs the server"
    return parse_serve(entrypoint[1:] + container["args"])


def parse_serve(argv: list[str]):
    try:
        args = parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"compilers {' '.join(argv)}: refused by compilers' argument parser (see its message above)")
    assert args.command == "serve", argv
    return args


# --- the Kubernetes API schemas -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_under_the_kubernetes_api_schemas(name, version):
    doc = load(name)
    assert (doc["apiVersion"], doc["kind"]) == MANIFESTS[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])     # a DNS-1123 label
    assert schema_errors(doc, version) is None, schema_errors(doc, version)


@pytest.mark.parametrize("name, old, new, expect", [
    ("deployment.yaml", "readinessProbe:", "readinesProbe:", "'readinesProbe' was unexpected"),     # misspelled
    ("deployment.yaml", "containerPort: 8000", 'containerPort: "8000"', "is not of type 'integer'"),
    ("deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: yes please", "of type 'boolean'"),
    ("deployment.yaml", "sizeLimit: 1Gi", "sizelimit: 1Gi", "'sizelimit' was unexpected"),
    ("service.yaml", "{name: http, port: 8000,", "{name: http, port: http,", "is not of type 'integer'"),
    ("hpa.yaml", "  maxReplicas: 10\n", "\n", "'maxReplicas' is a required property"),
    ("hpa.yaml", "averageUtilization: 70", "averageUtilization: 70%", "is not of type 'integer'"),
    ("hpa.yaml", "stabilizationWindowSeconds: 300", "stabilisationWindowSeconds: 300",
     "'stabilisationWindowSeconds' was unexpected"),
    ("hpa.yaml", "apiVersion: autoscaling/v2\n", "apiVersion: autoscaling/v2beta2\n", "Couldn't find schema"),
])
def test_the_schema_check_fails_on_broken_copies(name, old, new, expect):
    text = (DEPLOY / name).read_text()
    assert text.count(old) == 1, f"{name} no longer holds {old!r} once: update this case"
    broken = load(name, text.replace(old, new))
    found = schema_errors(broken, KUBERNETES[-1])
    assert found is not None and expect in found, f"{name} with {new!r}: expected {expect!r}, got {found!r}"


# --- the parts that must agree ------------------------------------------------------------------------------

def test_the_service_selects_the_pods_and_names_their_ports(deployment, container):
    service = load("service.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()    # the API requires it too
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, f"Service port {port['name']} targets no container port"
        assert port["name"] == port["targetPort"] and port["port"] == ports[port["targetPort"]]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc"}


def test_the_arguments_are_flags_of_compilers_serve_naming_the_ports_and_the_repository(deployment, container,
                                                                                      serve_args):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert serve_args.host == "0.0.0.0", "the server must listen beyond loopback for the kubelet and the Service"
    assert (serve_args.port, serve_args.grpc_port) == (ports["http"], ports["grpc"])
    assert not serve_args.ray and not serve_args.handlers
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == serve_args.repository]
    assert mount["readOnly"] is True
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "compilers-models", "readOnly": True}


def test_the_argument_check_can_fail():
    with pytest.raises(pytest.fail.Exception, match="refused"):
        parse_serve(["serve", "/models", "--grpc_port", "8001"])                # misspelled flag


def test_the_images_cmd_user_and_ports_are_the_deployments(deployment, container, dockerfile):
    [cmd] = instruction(dockerfile, "CMD")
    assert json.loads(cmd) == container["args"]                 # `docker run IMAGE` serves as a pod does
    [user] = instruction(dockerfile, "USER")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and user == f"{security['runAsUser']}:{security['runAsGroup']}"
    [expose] = instruction(dockerfile, "EXPOSE")
    assert {int(port) for port in expose.split()} == {p["containerPort"] for p in container["ports"]}


def test_the_image_installs_the_extras_the_arguments_need(dockerfile, serve_args):
    import tomllib
    extras = re.search(r'"/tmp/compilers-src\[([a-z,]+)\]"', " ".join(instruction(dockerfile, "RUN")))
    assert extras, "the Dockerfile installs the package from the source tree with its extras"
    extras = set(extras.group(1).split(","))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(declared), f"extras the package does not declare: {extras - set(declared)}"
    assert {"cpu", "serve"} <= extras and "ray" not in extras
    assert serve_args.grpc_port is None or "grpc" in extras, "--grpc-port needs the grpc extra"
    args = dict(a.split("=", 1) for a in instruction(dockerfile, "ARG"))
    assert args["BASE"] == "python:3.11-slim" and args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert len(set(re.findall(r"torch==(\S+)", " ".join(instruction(dockerfile, "RUN"))))) == 1  # one torch pin


def test_probes_ask_the_servers_health_routes_on_its_http_port(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert ports.get(get["port"], get["port"]) == ports["http"], probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                     "readinessProbe": "/v2/health/ready"}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_probes_paths_answer_on_a_real_server(container, tmp_path):
    """Live and ready on a repository that loaded; live but not ready when a model failed to load (the pod leaves
    the Service and is not restarted in a loop)."""
    pytest.importorskip("uvicorn")
    from compilers.serve.server import running

    get = {probe: container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")}
    (tmp_path / "good").mkdir()
    with running(tmp_path / "good") as server:
        assert {p: _status(server.url + path) for p, path in get.items()} == {"livenessProbe": 200,
                                                                               "readinessProbe": 200}
    (tmp_path / "bad" / "broken" / "1").mkdir(parents=True)       # a version without an artifact
    with running(tmp_path / "bad") as server:
        assert {p: _status(server.url + path) for p, path in get.items()} == {"livenessProbe": 200,
                                                                               "readinessProbe": 503}


def _quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (2 -> 2, 500m -> 0.5, 4Gi -> 4 * 2**30); refuses what the API
    server would (the schema takes any string)."""
    suffixes = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match and match.group(2) in suffixes, f"{value!r} is not a resource quantity"
    return float(match.group(1)) * suffixes[match.group(2)]


def test_the_hpa_scales_this_deployment_on_the_cpu_it_requests(deployment, container):
    hpa = load("hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (deployment["apiVersion"], deployment["kind"],
                                                                      deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the count; a fixed one is reset by every apply"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is a share of the request: without a CPU request the HPA cannot compute it.
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert "cpu" in requests and "memory" in requests
    for resource in requests:
        assert _quantity(requests[resource]) <= _quantity(limits.get(resource, requests[resource])), resource
    with pytest.raises(AssertionError, match="not a resource quantity"):
        _quantity("2 cores")


def test_shutdown_and_the_read_only_root_filesystem(deployment, container, serve_args):
    pod = deployment["spec"]["template"]["spec"]
    [_, pause] = container["lifecycle"]["preStop"]["exec"]["command"]
    # SIGTERM comes after the preStop pause; the server then drains for up to --drain-timeout seconds.
    assert pod["terminationGracePeriodSeconds"] > int(pause) + serve_args.drain_timeout, "the kubelet would kill a drain"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp[0]["name"])
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
