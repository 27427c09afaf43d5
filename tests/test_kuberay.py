"""deploy/kuberay/rayservice.yaml, checked offline (no cluster, no Ray instance):

- the manifest parses and validates against KubeRay's RayService CRD schema (vendored in tests/data/kuberay/,
  with the Kubernetes pod template fields it embeds), read strictly as `kubectl apply` does (an unknown field is
  an error, not pruned); broken copies of it fail, so the check can fail;
- its serveConfigV2 is a Serve config that Ray's own model (`ServeDeploySchema`) accepts, with no key Ray would
  silently ignore, and whose import path is `compilers.serve.ray.build`;
- that builder, given the manifest's args with the repository swapped for a small temporary one, builds the
  application the way the Serve controller does (`build_app`): `mlp-v1` autoscaling 1..4 from serving.toml,
  and the `compilers` ingress;
- the parts that must agree do: the volume's mount path and the builder's repository, the serve port of the
  containers and of the Serve config, the autoscaler on, the image's Ray version and rayVersion.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
SCHEMA = Path(__file__).resolve().parent / "data" / "kuberay" / "rayservice-v1.schema.json"


# --- the manifest --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest() -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()) if d is not None]
    assert len(docs) == 1, f"rayservice.yaml holds {len(docs)} documents, expected the RayService alone"
    return docs[0]


@pytest.fixture(scope="module")
def serve_config(manifest) -> dict:
    text = manifest["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string in KubeRay's ray.io/v1, not a mapping"
    return yaml.safe_load(text)


def pods(manifest) -> Iterator[tuple[str, dict]]:
    """(group, pod spec) for the head and every worker group."""
    cluster = manifest["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


# --- the CRD schema, read as the API server does -------------------------------------------------------------

def strict(schema: Any) -> Any:
    """The schema with every object that lists its `properties` closed (`additionalProperties: false`), unless it
    says otherwise: a structural schema prunes unknown fields, `kubectl apply` (field validation Strict) refuses
    them, and a misspelled field is what a manifest most often gets wrong."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v)
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items with the same keys (a key's default counts when absent,
    as `protocol: TCP` of container ports)."""
    if not validator.is_type(instance, "array") or schema.get("x-kubernetes-list-type") != "map":
        return
    props = schema.get("items", {}).get("properties", {})
    seen = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same {dict(zip(keys, key))}")
        seen.setdefault(key, i)


@pytest.fixture(scope="module")
def crd_validator():
    schema = json.loads(SCHEMA.read_text())
    assert "ray-project/kuberay" in schema["$comment"]                      # the source is recorded with it
    Validator = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                             {"x-kubernetes-list-map-keys": _list_map_keys})
    strict_schema = strict(schema)
    Validator.check_schema(strict_schema)
    return Validator(strict_schema)


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_manifest_is_a_rayservice_valid_under_the_kuberay_crd_schema(manifest, crd_validator):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])   # a DNS-1123 label
    assert errors(crd_validator, manifest) == []


def _set(doc: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    if value is _DELETE:
        del doc[last]
    else:
        doc[int(last) if isinstance(doc, list) else last] = value


_DELETE = object()
RC = "spec.rayClusterConfig"
WORKER = f"{RC}.workerGroupSpecs.0"
HEAD_CONTAINER = f"{RC}.headGroupSpec.template.spec.containers.0"


@pytest.mark.parametrize("path, value, expect", [
    (f"{RC}.enableInTreeAutoscaling", "true", "is not of type 'boolean'"),             # a string, not a bool
    (f"{WORKER}.maxReplica", 8, "Additional properties are not allowed"),                # misspelled field
    (f"{WORKER}.groupName", _DELETE, "'groupName' is a required property"),
    (f"{HEAD_CONTAINER}.ports.0.containerPort", "6379", "is not of type 'integer'"),
    (f"{HEAD_CONTAINER}.ports.1", {"containerPort": 6379, "name": "again"}, "have the same"),  # duplicate port
    (f"{HEAD_CONTAINER}.volumeMounts.0.mountPath", None, "is not of type 'string'"),
    (f"{RC}.headGroupSpec.template.spec.volumes.0.persistentVolumeClaim.claimname", "x", "Additional properties"),
    (f"{RC}.headGroupSpec.rayStartParams.num-cpus", 0, "is not of type 'string'"),      # ray start params are strings
    ("spec.serveConfigV2", {"applications": []}, "is not of type 'string'"),
])
def test_the_schema_check_fails_on_broken_copies(manifest, crd_validator, path, value, expect):
    broken = copy.deepcopy(manifest)
    _set(broken, path, value)
    found = errors(crd_validator, broken)
    assert any(expect in e for e in found), f"{path} = {value!r}: expected {expect!r}, got {found}"


# --- the Serve config ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve_schema():
    pytest.importorskip("ray")
    from ray.serve import schema
    return schema


def _unknown_keys(data: dict, model) -> set[str]:
    """Keys the pydantic model has no field for: Ray's Serve schemas ignore them (forward compatibility), so a
    misspelled option would be dropped without a word."""
    return set(data) - set(model.model_fields)


def test_serve_config_is_accepted_by_rays_config_model(serve_config, serve_schema):
    config = serve_schema.ServeDeploySchema.model_validate(serve_config)
    assert _unknown_keys(serve_config, serve_schema.ServeDeploySchema) == set()
    assert _unknown_keys(serve_config.get("http_options", {}), serve_schema.HTTPOptionsSchema) == set()
    [app] = serve_config["applications"]
    assert _unknown_keys(app, serve_schema.ServeApplicationSchema) == set()
    [parsed] = config.applications
    assert (parsed.name, parsed.route_prefix, parsed.import_path) == ("compilers", "/", "compilers.serve.ray:build")
    assert parsed.args == {"repository": "/models"}
    assert not parsed.deployments            # replicas and autoscaling come from serving.toml, not overrides


@pytest.mark.parametrize("change", [
    {"import_path": "compilers.serve.ray:build:app"},         # at most one colon
    {"args": ["/models"]},                                     # args is a mapping
    {"import_path": None},
])
def test_rays_config_model_refuses_broken_copies(serve_config, serve_schema, change):
    from pydantic import ValidationError
    broken = copy.deepcopy(serve_config)
    broken["applications"][0].update(change)
    with pytest.raises(ValidationError):
        serve_schema.ServeDeploySchema.model_validate(broken)


def test_import_path_resolves_to_the_builder(serve_config, serve_schema):
    from ray._common.utils import import_attr     # what the Serve controller imports it with

    import compilers.serve.ray
    assert import_attr(serve_config["applications"][0]["import_path"]) is compilers.serve.ray.build


def test_the_builder_builds_the_application_without_a_cluster(serve_config, serve_schema, tmp_path, mlp):
    import ray
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from compilers.serve.repository import publish

    mlp.save(tmp_path / "a")
    repo = tmp_path / "repo"
    publish(tmp_path / "a", repo / "mlp")
    (repo / "mlp" / "serving.toml").write_text("[replicas]\nmin = 1\nmax = 4\n")
    app_config = serve_config["applications"][0]
    args = {**app_config["args"], "repository": str(repo)}
    # As the controller's build task does (ray.serve._private.application_state.build_serve_application).
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config["import_path"]), args)
    assert isinstance(app, Application)
    built = build_app(app, name=app_config["name"], route_prefix=app_config["route_prefix"])
    built.validate_single_fastapi_ingress()
    deployments = {d.name: d for d in built.deployments}
    assert set(deployments) == {"mlp-v1", "compilers"} and built.ingress_deployment_name == "compilers"
    scaling = deployments["mlp-v1"]._deployment_config.autoscaling_config
    assert scaling is not None and (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert deployments["mlp-v1"].ray_actor_options["num_cpus"] == 1.0
    assert deployments["compilers"].ray_actor_options["num_cpus"] == 0          # fits the num-cpus 0 head
    # deploy/kuberay/README.md redeploys after a publish by adding a key the builder ignores to the args
    assert isinstance(call_user_app_builder_with_args_if_necessary(import_attr(app_config["import_path"]),
                                                                   {**args, "revision": 2}), Application)
    assert not ray.is_initialized()


# --- the parts that must agree ------------------------------------------------------------------------------

def test_the_repository_volume_is_mounted_read_only_where_the_builder_reads(manifest, serve_config):
    repository = serve_config["applications"][0]["args"]["repository"]
    claims = set()
    for group, pod in pods(manifest):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        [container] = pod["containers"]
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == repository]
        assert len(mounts) == 1, f"{group}: nothing mounted at the builder's repository {repository}"
        assert mounts[0].get("readOnly") is True, group
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
        assert claim.get("readOnly") is True, group
        claims.add(claim["claimName"])
    assert claims == {"compilers-models"}                  # one repository, the same on every pod


def test_ports_autoscaling_and_head(manifest, serve_config):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
    serve_port = serve_config.get("http_options", {}).get("port", 8000)
    assert serve_port == 8000
    for group, pod in pods(manifest):
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert ports.get("serve") == serve_port, group     # KubeRay's serve Service uses the port named serve
        limits, requests = pod["containers"][0]["resources"]["limits"], pod["containers"][0]["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), group
    head_ports = {p["name"]: p["containerPort"] for p in next(pods(manifest))[1]["containers"][0]["ports"]}
    assert head_ports["gcs-server"] == 6379 and head_ports["dashboard"] == 8265
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["dashboard-host"] == "0.0.0.0"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], "the autoscaler would have no room to add workers"


def test_every_pod_runs_serve_in_the_high_throughput_mode_the_local_instances_use(manifest):
    from compilers.serve.ray import THROUGHPUT
    for group, pod in pods(manifest):
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
        assert THROUGHPUT.items() <= env.items(), (group, env)


def test_the_image_is_the_dockerfiles_and_its_ray_is_rayversion(manifest):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cpu\s*$", dockerfile, re.M)
    assert base, "the Dockerfile builds FROM rayproject/ray:<version>-py<python>-cpu"
    ray_version = base.group(1)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    assert f'"ray[serve]=={ray_version}"' in dockerfile          # the extras cannot move Ray off the base's
    assert "torch==" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    images = {c["image"] for _, pod in pods(manifest) for c in pod["containers"]}
    assert len(images) == 1 and images.pop().split("/")[-1].startswith("compilers-ray:")
