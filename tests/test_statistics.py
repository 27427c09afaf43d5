"""Triton's statistics and model configuration extensions of `compilers serve`, over HTTP and gRPC: a real server
on free loopback ports, queried with tritonclient.http and tritonclient.grpc. The statistics add up (requests, rows,
engine calls, batch sizes as /metrics counts them, stage times within the requests' time), both transports give the
same, a request cancelled by its deadline counts failed, an invalid one not at all, and a reload starts them anew;
the config describes the MLP as `compilers export-triton` writes it."""
from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from compilers.export.triton import triton_model
from compilers.pipeline import BytesSpec
from compilers.serve.model_config import config_datatype, config_dims
from compilers.serve.repository import publish, read_config
from compilers.serve.server import running

MAX_BATCH = 4
DELAY_MS = 20
ROWS = [1, 2, 3, 1, 2, 3, 4, 1, 2, 1, 3, 2]          # one request each, half over HTTP, half over gRPC


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlp):
    """mlp (batches of up to MAX_BATCH, waiting DELAY_MS for them to fill) and slow (waiting 3 s)."""
    root = tmp_path_factory.mktemp("statistics")
    mlp.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mlp")
    (root / "repo" / "mlp" / "serving.toml").write_text(
        f"[batching]\nmax_batch_size = {MAX_BATCH}\nmax_queue_delay_ms = {DELAY_MS}\npreferred_batch_sizes = [2]\n")
    publish(root / "artifact", root / "repo" / "slow")
    (root / "repo" / "slow" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 3000\n")
    return root / "repo"


@pytest.fixture(scope="module")
def server(repo):
    with running(repo, grpc_port=0) as s:
        yield s


def infer(server, i: int, rows: int, model: str = "mlp", width: int = 6, **kw) -> np.ndarray:
    """One request of `rows` rows of `width` (the MLP takes 6), over HTTP for even i and gRPC for odd i, with its
    own client."""
    module = th if i % 2 == 0 else tg
    c = th.InferenceServerClient(f"{server.host}:{server.port}") if module is th else \
        tg.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    try:
        t = module.InferInput("input", [rows, width], "FP32")
        t.set_data_from_numpy(np.full((rows, width), i, np.float32))
        return c.infer(model, [t], **kw).as_numpy("output")
    finally:
        c.close()


def metric(server, name: str, model: str) -> float:
    """The sum of a Prometheus series of /metrics over the model's labels."""
    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'model="{model}"' in line)


def both(clients, model: str, version: str = "") -> dict:
    """The model's statistics over HTTP, checked equal to gRPC's (message and tritonclient's JSON)."""
    g, h = clients
    http = h.get_inference_statistics(model, version)
    grpc_message = g.get_inference_statistics(model, version)
    assert json_format.ParseDict(http, pb.ModelStatisticsResponse()) == grpc_message
    assert json_format.ParseDict(g.get_inference_statistics(model, version, as_json=True),
                                 pb.ModelStatisticsResponse()) == grpc_message
    return http


def test_statistics_add_up_and_agree_over_both_transports(server, clients):
    g, h = clients
    before = time.time() * 1000
    assert both(clients, "mlp")["model_stats"][0]["execution_count"] == 0
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda a: infer(server, *a), enumerate(ROWS)))
    assert [a.shape[0] for a in answers] == ROWS
    # invalid requests (400) are refused before they are queued: no inference, counted in neither success nor fail
    for i in range(2):
        with pytest.raises(InferenceServerException):
            infer(server, i, 2, width=5)
    stats = both(clients, "mlp")
    assert len(stats["model_stats"]) == 1
    s = stats["model_stats"][0]
    assert (s["name"], s["version"]) == ("mlp", "1")
    assert before <= s["last_inference"] <= time.time() * 1000
    st = s["inference_stats"]
    assert st["success"]["count"] == len(ROWS) and st["fail"] == {"count": 0, "ns": 0}
    assert s["inference_count"] == sum(ROWS)
    # engine calls: at most one per request, each counted once per batch size, as /metrics counts them
    calls = sum(b["compute_infer"]["count"] for b in s["batch_stats"])
    assert 1 <= s["execution_count"] == calls <= len(ROWS)
    assert s["execution_count"] == metric(server, "compilers_batch_size_count", "mlp")
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in s["batch_stats"]) == sum(ROWS) == \
        metric(server, "compilers_batch_size_sum", "mlp")
    assert all(1 <= b["batch_size"] <= MAX_BATCH for b in s["batch_stats"])
    assert [b["batch_size"] for b in s["batch_stats"]] == sorted({b["batch_size"] for b in s["batch_stats"]})
    for b in s["batch_stats"]:
        assert b["compute_input"]["count"] == b["compute_output"]["count"] == b["compute_infer"]["count"]
        assert all(b[stage]["ns"] > 0 for stage in ("compute_input", "compute_infer", "compute_output"))
    # the stages of each request, counted per request, within its time in the server
    stages = ("queue", "compute_input", "compute_infer", "compute_output")
    assert all(st[stage]["count"] == len(ROWS) and st[stage]["ns"] > 0 for stage in stages)
    assert st["cache_hit"] == st["cache_miss"] == {"count": 0, "ns": 0}
    assert sum(st[stage]["ns"] for stage in stages) <= st["success"]["ns"]
    # a request's compute times are its engine call's, which every request of the call took part in
    assert st["compute_infer"]["ns"] >= sum(b["compute_infer"]["ns"] for b in s["batch_stats"])
    http_seconds = metric(server, "compilers_request_seconds_sum", "mlp")      # HTTP and gRPC, decoding included
    assert st["success"]["ns"] <= http_seconds * 1e9 + len(ROWS)
    assert metric(server, "compilers_inference_requests_total", "mlp") == len(ROWS) + 2       # the invalid ones too
    # the same by version, and among every model's
    assert both(clients, "mlp", "1") == stats
    every = both(clients, "")["model_stats"]
    assert [(m["name"], m["version"]) for m in every] == [("mlp", "1"), ("slow", "1")]
    assert every[0] == s


def test_a_request_cancelled_by_its_deadline_counts_failed_and_a_reload_starts_anew(server, clients):
    g, h = clients
    with pytest.raises(InferenceServerException) as e:
        infer(server, 1, 1, model="slow", client_timeout=0.3)       # its batch waits 3 s to fill
    assert e.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
    deadline = time.monotonic() + 5
    while both(clients, "slow")["model_stats"][0]["inference_stats"]["fail"]["count"] == 0 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    s = both(clients, "slow")["model_stats"][0]
    assert s["inference_stats"]["fail"]["count"] == 1 and s["inference_stats"]["fail"]["ns"] > 0
    assert s["inference_stats"]["success"]["count"] == s["execution_count"] == s["inference_count"] == 0
    assert s["batch_stats"] == [] and s["last_inference"] == 0
    h.load_model("slow")                        # a version loaded anew: Triton's counts restart with its load
    assert both(clients, "slow")["model_stats"][0]["inference_stats"]["fail"]["count"] == 0


def test_the_config_over_both_transports_is_what_export_triton_writes(server, clients, repo):
    g, h = clients
    config = h.get_model_config("mlp")
    served = g.get_model_config("mlp").config
    assert json_format.ParseDict(config, model_config_pb2.ModelConfig()) == served
    assert h.get_model_config("mlp", "1") == config
    assert json_format.ParseDict(g.get_model_config("mlp", as_json=True)["config"],
                                 model_config_pb2.ModelConfig()) == served
    signature = server.service.version("mlp").signature
    assert config["name"] == "mlp" and config["max_batch_size"] == MAX_BATCH
    assert config["input"] == [{"name": s.name, "data_type": "TYPE_FP32", "dims": list(s.shape[1:])}
                               for s in signature.inputs]
    assert config["output"] == [{"name": s.name, "data_type": "TYPE_FP32", "dims": list(s.shape[1:])}
                                for s in signature.outputs]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == DELAY_MS * 1000
    assert config["dynamic_batching"]["preferred_batch_size"] == [2]
    assert config["backend"] == "onnxruntime" and config["platform"] == h.get_model_metadata("mlp")["platform"]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    # what `compilers export-triton` writes for the same artifact and serving.toml
    exported = triton_model(repo / "mlp" / "1", "mlp", read_config(repo / "mlp")).config
    for field in ("max_batch_size", "input", "output", "dynamic_batching", "version_policy", "instance_group"):
        assert getattr(exported, field) == getattr(served, field), field


def test_unknown_models_and_versions_are_404_over_both(clients):
    g, h = clients
    for call in ("get_model_config", "get_inference_statistics"):
        for args in (("nope",), ("mlp", "7")):
            errors = []
            for client in (g, h):
                with pytest.raises(InferenceServerException) as e:
                    getattr(client, call)(*args)
                errors.append(e.value)
            assert errors[0].status() == str(grpc.StatusCode.NOT_FOUND) and errors[1].status() == "404", errors
            assert errors[0].message() == errors[1].message() and args[0] in errors[0].message()


def test_the_extensions_are_listed(clients):
    g, h = clients
    for extensions in (h.get_server_metadata()["extensions"], g.get_server_metadata().extensions):
        assert {"statistics", "model_configuration"} <= set(extensions)


def test_a_pipelines_texts_are_triton_strings_shaped_by_rows():
    """A pipeline's BYTES input (one text per row, shape [batch]) in a batching model's config: TYPE_STRING with
    dims [] (Triton adds the batch dim: requests are [rows])."""
    text = BytesSpec("text", ("batch",))
    assert config_datatype(text) == "TYPE_STRING" and config_dims(text.shape, batched=True) == []
    assert config_dims(text.shape, batched=False) == [-1]
