"""`compilers serve` end to end: real servers on free loopback ports, queried with the real tritonclient.http
client. Versions load, reload and unload under load without failing a request; a corrupt reload keeps the old
version serving and says why; the canary split holds; a full queue answers 503; shutdown drains the queue."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn
from tritonclient.utils import InferenceServerException

import compilers
from compilers.serve.repository import Repository, publish
from compilers.serve.server import free_port, running
from compilers.serve.service import ModelService

from test_batcher import SEQ, Pool


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, mlp):
    """Two saved artifacts of the MLP's shape: version "a" (the model) and "b" (other weights)."""
    root = tmp_path_factory.mktemp("artifacts")
    mlp.save(root / "a")
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    b = compilers.compile(other, "ort-cpu", (torch.randn(4, 6),))
    b.save(root / "b")
    return {"a": root / "a", "b": root / "b", "b_model": b}


def make_repo(root: Path, versions: list[Path], serving: str = "") -> Path:
    shutil.rmtree(root, ignore_errors=True)
    for artifact in versions:
        publish(artifact, root / "mlp")
    if serving:
        (root / "mlp" / "serving.toml").write_text(serving)
    return root


def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)


def infer(c, x: np.ndarray, model: str = "mlp", version: str = "", binary: bool = True):
    t = triton.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("output", binary_data=binary)
    return c.infer(model, [t], model_version=version, outputs=[out])


X = np.random.default_rng(0).standard_normal((3, 6), dtype=np.float32)


def test_tritonclient_infers_with_json_and_binary_tensors(tmp_path, mlp, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"]])
    with running(repo) as server:
        c = client(server)
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mlp")
        want = mlp(torch.from_numpy(X)).numpy()
        for binary in (True, False):
            r = infer(c, X, binary=binary)
            np.testing.assert_allclose(r.as_numpy("output"), want, rtol=1e-6, atol=1e-6)
            assert r.get_response()["model_version"] == "1"
        meta = c.get_model_metadata("mlp")
        assert meta["versions"] == ["1"] and meta["platform"] == "compilers_onnxruntime"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
        assert c.get_model_repository_index() == [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]


def test_padded_requests_of_different_lengths_are_batched_and_trimmed(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 5))
    cm = compilers.compile(Pool().eval(), "ort-cpu", {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           dynamic_shapes=SEQ)
    cm.save(tmp_path / "pool")
    publish(tmp_path / "pool", tmp_path / "repo" / "pool")
    (tmp_path / "repo" / "pool" / "serving.toml").write_text(
        "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 200\n[batching.pad]\ninput_ids = 0\nattention_mask = 0\n")
    rng = np.random.default_rng(0)
    requests = [rng.integers(1, 50, (1, n)) for n in (3, 7, 5, 7)]
    results = [None] * len(requests)
    with running(tmp_path / "repo") as server:
        def send(i):
            ids = requests[i]
            inputs = []
            for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                t = triton.InferInput(name, list(value.shape), "INT64")
                t.set_data_from_numpy(value)
                inputs.append(t)
            results[i] = client(server).infer("pool", inputs)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    for ids, r in zip(requests, results):
        want = cm(torch.from_numpy(ids), torch.ones_like(torch.from_numpy(ids)))
        np.testing.assert_allclose(r.as_numpy("output.0"), want[0].numpy(), rtol=1e-5, atol=1e-6)
        assert r.as_numpy("output.1").shape == tuple(want[1].shape)          # trimmed back to its own length
        np.testing.assert_allclose(r.as_numpy("output.1"), want[1].numpy(), rtol=1e-5, atol=1e-6)
    assert 'compilers_batch_size_count{model="pool",version="1"} 1.0' in metrics    # all four in one call


def load_loop(server, stop: threading.Event, results: dict, clients: int = 4, limit: int = 5000):
    """`clients` threads sending single-sample requests until `stop` (or `limit` requests each)."""
    def one():
        c = client(server)
        for i in range(limit):
            if stop.is_set():
                return
            x = X[i % 3:i % 3 + 1]
            try:
                r = infer(c, x)
                results.setdefault(r.get_response()["model_version"], []).append(1)
            except Exception as e:            # noqa: BLE001 - every failure is the test's business
                results.setdefault("failures", []).append(repr(e))
    threads = [threading.Thread(target=one) for _ in range(clients)]
    [t.start() for t in threads]
    return threads


def test_reload_and_new_version_under_load_fail_no_request(tmp_path, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"]],
                     "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 1\n")
    with running(repo) as server:
        c = client(server)
        stop, results = threading.Event(), {}
        threads = load_loop(server, stop, results)
        try:
            time.sleep(0.3)
            for _ in range(3):
                c.load_model("mlp")                  # reload version 1 in place
                time.sleep(0.2)
            publish(artifacts["b"], repo / "mlp")    # version 2 appears; policy latest: it replaces 1
            c.load_model("mlp")
            time.sleep(0.3)
        finally:
            stop.set()
            [t.join(60) for t in threads]
        assert results.get("failures", []) == []
        assert len(results["1"]) > 0 and len(results["2"]) > 0
        assert c.get_model_metadata("mlp")["versions"] == ["2"]
        want = artifacts["b_model"](torch.from_numpy(X)).numpy()
        np.testing.assert_allclose(infer(c, X).as_numpy("output"), want, rtol=1e-6, atol=1e-6)


def test_a_corrupt_reload_keeps_the_old_version_serving_and_says_why(tmp_path, mlp, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"]])
    with running(repo) as server:
        c = client(server)
        onnx = next((repo / "mlp" / "1").glob("*.onnx"))
        onnx.write_bytes(b"not an onnx model")
        with pytest.raises(InferenceServerException) as e:
            c.load_model("mlp")
        assert e.value.status() == "400" and "sha256" in e.value.message()
        assert "still serving version(s) [1]" in e.value.message()
        np.testing.assert_allclose(infer(c, X).as_numpy("output"), mlp(torch.from_numpy(X)).numpy(), rtol=1e-6, atol=1e-6)
        [row] = c.get_model_repository_index()
        assert row["state"] == "READY" and "sha256" in row["reason"]

        # a new version that is broken does not replace the one serving either
        shutil.copytree(artifacts["b"], repo / "mlp" / "2")
        (repo / "mlp" / "2" / "manifest.json").write_text("{")
        with pytest.raises(InferenceServerException, match="corrupt"):
            c.load_model("mlp")
        assert c.get_model_metadata("mlp")["versions"] == ["1"]
        # so does a serving.toml that does not parse
        shutil.rmtree(repo / "mlp" / "2")
        (repo / "mlp" / "serving.toml").write_text("[batching]\nmax_batch_size = 0\n")
        with pytest.raises(InferenceServerException, match="max_batch_size"):
            c.load_model("mlp")
        assert c.is_model_ready("mlp")


def test_unload_then_load(tmp_path, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"]])
    with running(repo) as server:
        c = client(server)
        c.unload_model("mlp")
        assert not c.is_model_ready("mlp")
        assert c.is_server_ready()          # unloaded on purpose: readiness does not wait for it
        with pytest.raises(InferenceServerException) as e:
            infer(c, X)
        assert e.value.status() == "503" and "unloaded" in e.value.message()
        assert c.get_model_repository_index() == [{"name": "mlp", "state": "UNAVAILABLE", "reason": "unloaded"}]
        c.load_model("mlp")
        assert c.is_model_ready("mlp")
        assert infer(c, X).as_numpy("output").shape == (3, 3)
        with pytest.raises(InferenceServerException) as e:
            c.load_model("nope")
        assert e.value.status() == "404"


def test_a_bad_model_at_start_is_reported_and_the_others_serve(tmp_path, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"]])
    publish(artifacts["a"], repo / "broken")
    (repo / "broken" / "1" / "manifest.json").write_text("[]")
    with running(repo) as server:
        c = client(server)
        assert not c.is_server_ready()              # strict readiness: a model is not serving
        assert c.is_model_ready("mlp") and not c.is_model_ready("broken")
        rows = {r["name"]: r for r in c.get_model_repository_index()}
        assert rows["broken"]["state"] == "UNAVAILABLE" and "format" in rows["broken"]["reason"]
        assert infer(c, X).as_numpy("output").shape == (3, 3)


def test_canary_split_lands_within_three_points(tmp_path, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"], artifacts["b"]],
                     "[versions]\npolicy = \"all\"\n[traffic]\n1 = 90\n2 = 10\n[batching]\nmax_queue_delay_ms = 0.5\n")
    service = ModelService(Repository(repo), rng=random.Random(0))
    counts: dict[str, int] = {}
    with running(service) as server:
        def send(share: int) -> None:
            c = client(server)
            for i in range(share):
                v = infer(c, X[:1]).get_response()["model_version"]
                counts[v] = counts.get(v, 0) + 1
        threads = [threading.Thread(target=send, args=(125,)) for _ in range(8)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        c = client(server)
        # an explicit version is served even outside the split, and a missing one is a 404
        assert infer(c, X[:1], version="2").get_response()["model_version"] == "2"
        with pytest.raises(InferenceServerException) as e:
            infer(c, X[:1], version="3")
        assert e.value.status() == "404"
    assert sum(counts.values()) == 1000
    assert abs(counts["2"] / 1000 - 0.10) <= 0.03, counts


def test_a_full_queue_answers_503_at_once(tmp_path, artifacts):
    # the first request waits out a long delay in a queue of one; the next ones find it full
    repo = make_repo(tmp_path / "repo", [artifacts["a"]],
                     "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 1500\nqueue_size = 1\n")
    with running(repo) as server:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", infer(client(server), X[:1])))
        t.start()
        time.sleep(0.3)
        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as e:
            infer(client(server), X[:1])
        assert e.value.status() == "503" and "queue_size 1" in e.value.message()
        assert time.perf_counter() - started < 1.0          # refused at once, not after the delay
        t.join(30)
        assert first["r"].as_numpy("output").shape == (1, 3)
        metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
        assert 'compilers_inference_requests_total{model="mlp",outcome="rejected",version="1"} 1.0' in metrics


def test_cli_publish_serve_and_drain_on_sigterm(tmp_path, mlp, artifacts):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "compilers.cli"]
    out = subprocess.run(cli + ["publish", str(artifacts["a"]), str(tmp_path / "repo" / "mlp")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and (tmp_path / "repo" / "mlp" / "1" / "manifest.json").is_file(), out.stderr
    (tmp_path / "repo" / "mlp" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 700\n")
    port = free_port()
    server = subprocess.Popen(cli + ["serve", str(tmp_path / "repo"), "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        c = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                if c.is_server_ready():
                    break
            except Exception:                 # noqa: BLE001 - not listening yet
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        results = []
        threads = [threading.Thread(target=lambda: results.append(infer(
            triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60), X[:1]))) for _ in range(3)]
        [t.start() for t in threads]
        time.sleep(0.3)                       # the requests now wait in the queue (700 ms delay)
        server.send_signal(signal.SIGTERM)
        [t.join(60) for t in threads]
        assert server.wait(60) in (0, -signal.SIGTERM)      # uvicorn re-raises the signal once drained
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stdout.read()
    assert len(results) == 3, log             # every queued request answered before the server stopped
    want = mlp(torch.from_numpy(X[:1])).numpy()
    for r in results:
        np.testing.assert_allclose(r.as_numpy("output"), want, rtol=1e-6, atol=1e-6)
    assert "Finished server process" in log


def test_a_model_removed_from_disk_is_dropped_and_no_longer_holds_readiness(tmp_path, artifacts):
    repo = make_repo(tmp_path / "repo", [artifacts["a"]])
    broken = repo / "bad" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{")                # fails to load at start: the server is not ready
    with running(repo) as server:
        c = client(server)
        assert not c.is_server_ready() and c.is_model_ready("mlp")
        shutil.rmtree(repo / "bad")
        with pytest.raises(InferenceServerException) as e:
            c.load_model("bad")
        assert e.value.status() == "404" and "no longer in the repository" in e.value.message()
        assert c.is_server_ready()                              # was stuck at 503 until a restart
        assert [r["name"] for r in c.get_model_repository_index()] == ["mlp"]


def test_a_server_owning_its_process_freezes_what_loading_made_and_a_reload_thaws_it(tmp_path, artifacts):
    """`compilers serve` moves what the process holds once its models load out of the collector's scans; the next
    load gives it back, so the engines a reload retires stay collectable."""
    import asyncio
    import gc
    from compilers.serve.app import create_app
    repo = make_repo(tmp_path / "repo", [artifacts["a"]])

    async def main():
        app = create_app(str(repo), freeze_startup=True)
        async with app.router.lifespan_context(app):
            frozen = gc.get_freeze_count()
            await app.state.service.load("mlp")
            return frozen, gc.get_freeze_count()
    assert gc.get_freeze_count() == 0
    try:
        frozen, after_reload = asyncio.run(main())
    finally:
        gc.unfreeze()
    assert frozen > 1000 and after_reload == 0
