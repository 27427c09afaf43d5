"""The repository on a real local Ray Serve: the same Open Inference Protocol app, queried with
tritonclient.http, and the same service over Ray Serve's gRPC ingress, queried with tritonclient.grpc (the same
answers and errors); the ingress batches requests into replica calls and /metrics shows it; two replicas serve
concurrently; a replica killed mid-load costs only retriable (503) answers, and the deployment recovers."""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as triton
from torch import nn
from tritonclient.utils import InferenceServerException

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

import compilers  # noqa: E402
from compilers.serve.ray import INGRESS, running  # noqa: E402
from compilers.serve.repository import publish  # noqa: E402
from compilers.serve.server import free_port  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 6), dtype=np.float32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlp):
    root = tmp_path_factory.mktemp("ray")
    mlp.save(root / "a")
    publish(root / "a", root / "repo" / "mlp")
    (root / "repo" / "mlp" / "serving.toml").write_text(
        "[batching]\nmax_batch_size = 16\nmax_queue_delay_ms = 20\n[replicas]\nmin = 2\nmax = 2\ncpus = 0.5\n")
    torch.manual_seed(2)
    other = compilers.compile(nn.Sequential(nn.Linear(4, 2)).eval(), "openvino-cpu", (torch.randn(2, 4),))
    other.save(root / "b")
    publish(root / "b", root / "repo" / "small")
    grpc_port = free_port("127.0.0.1")
    with running(root / "repo", grpc_port=grpc_port, num_cpus=4) as port:
        yield {"port": port, "url": f"http://127.0.0.1:{port}", "other": other, "grpc": f"127.0.0.1:{grpc_port}"}


def client(cluster) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{cluster['port']}", network_timeout=60)


def infer(c, x: np.ndarray):
    t = triton.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return c.infer("mlp", [t])


def batch_sizes(cluster) -> tuple[float, float]:
    text = urllib.request.urlopen(cluster["url"] + "/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        for key in ("compilers_batch_size_sum", "compilers_batch_size_count"):
            if line.startswith(key + '{model="mlp"'):
                values[key] = float(line.split()[-1])
    return values.get("compilers_batch_size_sum", 0.0), values.get("compilers_batch_size_count", 0.0)


def test_the_same_app_answers_tritonclient_on_ray(cluster, mlp):
    c = client(cluster)
    assert c.is_server_ready() and c.is_model_ready("mlp") and c.is_model_ready("small")
    np.testing.assert_allclose(infer(c, X).as_numpy("output"), mlp(torch.from_numpy(X)).numpy(), rtol=1e-6, atol=1e-6)
    assert c.get_model_metadata("small")["platform"] == "compilers_openvino"
    with pytest.raises(InferenceServerException) as e:         # refused at the ingress, as in compilers serve
        infer(c, X[:, :4].copy())
    assert e.value.status() == "400" and e.value.message() == "input 'input': shape [3, 4], expected [-1, 6]"
    rows = {r["name"]: r["state"] for r in c.get_model_repository_index()}
    assert rows == {"mlp": "READY", "small": "READY"}


def test_the_same_service_answers_tritonclient_grpc_on_ray(cluster, mlp):
    g = tg.InferenceServerClient(cluster["grpc"])
    try:
        assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("mlp")
        meta, http_meta = g.get_model_metadata("mlp"), client(cluster).get_model_metadata("mlp")
        assert (meta.name, list(meta.versions), meta.platform) == \
            (http_meta["name"], http_meta["versions"], http_meta["platform"])
        tensors = [*meta.inputs, *meta.outputs]
        assert [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors] == \
            http_meta["inputs"] + http_meta["outputs"]
        successes = lambda: client(cluster).get_inference_statistics("mlp")["model_stats"][0][  # noqa: E731
            "inference_stats"]["success"]["count"]
        before = successes()
        t = tg.InferInput("input", list(X.shape), "FP32")
        t.set_data_from_numpy(X)
        got = g.infer("mlp", [t]).as_numpy("output")
        assert successes() == before + 1             # one ModelService: HTTP's statistics count the gRPC request
        np.testing.assert_array_equal(got, infer(client(cluster), X).as_numpy("output"))
        np.testing.assert_allclose(got, mlp(torch.from_numpy(X)).numpy(), rtol=1e-6, atol=1e-6)
        t = tg.InferInput("input", [3, 4], "FP32")
        t.set_data_from_numpy(X[:, :4].copy())
        with pytest.raises(InferenceServerException) as e:        # HTTP's 400, with its message
            g.infer("mlp", [t])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert e.value.message() == "input 'input': shape [3, 4], expected [-1, 6]"
        with pytest.raises(InferenceServerException) as e:
            g.get_model_metadata("nope")
        with pytest.raises(InferenceServerException) as http_e:
            client(cluster).get_model_metadata("nope")
        assert (e.value.status(), http_e.value.status()) == ("StatusCode.NOT_FOUND", "404")
        assert e.value.message() == http_e.value.message() == "no model 'nope'; models: mlp, small"
    finally:
        g.close()


def test_replicas_batch_concurrent_requests_and_metrics_show_it(cluster, mlp):
    before = batch_sizes(cluster)
    results = [None] * 24

    def send(i):
        results[i] = infer(client(cluster), X[i % 3:i % 3 + 1])
    threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for i, r in enumerate(results):
        want = mlp(torch.from_numpy(X[i % 3:i % 3 + 1])).numpy()
        np.testing.assert_allclose(r.as_numpy("output"), want, rtol=1e-6, atol=1e-6)
    rows, calls = (a - b for a, b in zip(batch_sizes(cluster), before))
    assert rows == 24 and calls < 24, (rows, calls)          # 24 requests in fewer engine calls


def test_two_replicas_serve_concurrently(cluster):
    handle = serve.get_deployment_handle("mlp-v1", app_name=INGRESS)
    responses = [handle.remote([X[i % 3:i % 3 + 1]]) for i in range(64)]
    replicas = {r.result(timeout_s=60)[1] for r in responses}          # (outputs, the replica that ran the batch)
    assert len(replicas) == 2, replicas


def test_a_replica_killed_mid_load_costs_only_retriable_answers(cluster, mlp):
    stop, ok, failures = threading.Event(), [], []

    def loop():
        c = client(cluster)
        for i in range(3000):
            if stop.is_set():
                return
            try:
                r = infer(c, X[:1])
                ok.append(r)
            except InferenceServerException as e:
                failures.append((e.status(), e.message()))
    threads = [threading.Thread(target=loop) for _ in range(4)]
    [t.start() for t in threads]
    try:
        time.sleep(1.0)
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                       if "mlp-v1" in a["name"] and a["name"].startswith("SERVE_REPLICA"))
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        time.sleep(2.0)
    finally:
        stop.set()
        [t.join(60) for t in threads]
    print(f'answered {len(ok)}, failed {len(failures)}: {failures[:2]}')
    assert len(ok) > 50
    assert all(status == "503" for status, _ in failures), failures[:3]    # retriable, never a wrong answer
    want = mlp(torch.from_numpy(X[:1])).numpy()
    assert all(np.allclose(r.as_numpy("output"), want, rtol=1e-6, atol=1e-6) for r in ok[:: max(len(ok) // 50, 1)])
    deadline = time.monotonic() + 90                           # Ray Serve replaces the replica
    while time.monotonic() < deadline:
        status = serve.status().applications[INGRESS].deployments["mlp-v1"]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    assert status.replica_states.get("RUNNING", 0) == 2, status
    assert infer(client(cluster), X).as_numpy("output").shape == (3, 3)
