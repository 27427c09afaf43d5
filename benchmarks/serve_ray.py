"""The demo model on a local Ray Serve, through the same app as `compilers serve`, under tritonclient.http load.

all-MiniLM-L6-v2 compiled for openvino-cpu-bf16 and published into a repository whose serving.toml asks for two
replicas (batching max 32, 5 ms). Ray Serve runs locally (`compilers.serve.ray.build`, as `compilers serve
--ray` does). 32 concurrent tritonclient.http clients send single-sample requests of real sentences (sequence
128, the demo's) for a bounded time; one replica is killed halfway.

Checks (the scale-out issue's): every answer equals the compiled model's own output for that sentence (cosine
>= 0.9999); batching shows in the server's /metrics (mean rows per engine call > 1); both replicas answered
calls; every failed request is a retriable 503; the deployment is back to two replicas afterwards.

    .venv/bin/python benchmarks/serve_ray.py
"""
from __future__ import annotations

import collections
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gevent  # noqa: E402
import ray  # noqa: E402
import tritonclient.http as triton  # noqa: E402
from ray import serve  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import compilers  # noqa: E402
from compilers.serve.ray import INGRESS, running  # noqa: E402
from compilers.serve.repository import publish  # noqa: E402
from serve import mean_batch, tensor  # noqa: E402
from timing import run_checks  # noqa: E402

CLIENTS, SECONDS = 32, 20.0


def minilm() -> tuple[bool, list[str]]:
    import minilm as m
    parts = m.factory()
    cm = compilers.compile(parts["model"], "openvino-cpu-bf16", parts["example_inputs"],
                           dynamic_shapes=parts["dynamic_shapes"], samples=parts["samples"])
    root = Path(tempfile.mkdtemp(prefix="compilers-ray-bench-"))
    cm.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "minilm")
    (root / "repo" / "minilm" / "serving.toml").write_text(
        "[batching]\nmax_batch_size = 32\nmax_queue_delay_ms = 5\nqueue_size = 1024\n"
        "[replicas]\nmin = 2\nmax = 2\ncpus = 1\n")
    sentences = [m.batch(1, 128, offset=i) for i in range(64)]
    want = [cm.run_flat([s["input_ids"].numpy(), s["attention_mask"].numpy()])[0] for s in sentences]
    requests = [[tensor("input_ids", s["input_ids"].numpy()), tensor("attention_mask", s["attention_mask"].numpy())]
                for s in sentences]
    t0 = time.perf_counter()
    with running(root / "repo", num_cpus=2) as port:
        started = time.perf_counter() - t0
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", concurrency=CLIENTS + 1, network_timeout=120)
        out_name = client.get_model_metadata("minilm")["outputs"][0]["name"]
        latencies, failures, worst, messages = [], collections.Counter(), [1.0], {}
        stop = time.perf_counter() + SECONDS

        def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = client.infer("minilm", requests[k % len(requests)])
                except InferenceServerException as e:
                    failures[e.status()] += 1
                    messages.setdefault(e.status(), e.message())
                    continue
                latencies.append(time.perf_counter() - t)
                got, ref = r.as_numpy(out_name).ravel(), want[k % len(requests)].ravel()
                worst[0] = min(worst[0], float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))))
                k += CLIENTS

        def killer() -> None:
            gevent.sleep(SECONDS / 2)
            name = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                        if "minilm-v1" in a["name"] and a["name"].startswith("SERVE_REPLICA"))
            ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
        t0 = time.perf_counter()
        gevent.joinall([gevent.spawn(worker, i) for i in range(CLIENTS)] + [gevent.spawn(killer)], raise_error=True)
        spent = time.perf_counter() - t0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        handle = serve.get_deployment_handle("minilm-v1", app_name=INGRESS)
        deadline = time.monotonic() + 120
        while serve.status().applications[INGRESS].deployments["minilm-v1"].replica_states.get("RUNNING", 0) < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        alive = serve.status().applications[INGRESS].deployments["minilm-v1"].replica_states.get("RUNNING", 0)
        replicas = set()
        for response in [handle.remote([x.numpy() for x in (sentences[i]["input_ids"], sentences[i]["attention_mask"])])
                         for i in range(64)]:
            stats = response.result(timeout_s=120)[1]
            if stats is not None:
                replicas.add(stats["replica"])
    ms = np.asarray(latencies) * 1e3
    batch = mean_batch(metrics, "minilm")
    retriable = set(failures) <= {"503"}
    ok = worst[0] >= 0.9999 and batch > 1 and len(replicas) == 2 and retriable and alive == 2
    return ok, [
        f"all-MiniLM-L6-v2 s128, openvino-cpu-bf16 on local Ray Serve (2 replicas, 1 CPU each; up in {started:.0f} s): "
        f"{CLIENTS} tritonclient.http clients for {spent:.0f} s, one replica killed halfway",
        f"  {len(latencies)} answered, {len(latencies) / spent:,.0f} samples/s, p50 {np.percentile(ms, 50):.0f} ms, "
        f"p99 {np.percentile(ms, 99):.0f} ms; failed: {dict(failures) or 'none'}",
        f"  worst cosine vs the compiled model's own output {worst[0]:.6f} (need >= 0.9999); mean rows per engine "
        f"call {batch:.1f} (need > 1, from /metrics)",
        *(f"  {status}: {message[:300]}" for status, message in messages.items()),
        f"  replicas that answered afterwards: {len(replicas)} (need 2); RUNNING after the kill: {alive} (need 2); "
        f"every failure retriable (503): {retriable}",
        f"  {'OK' if ok else 'MISSED'}"]


if __name__ == "__main__":
    sys.exit(run_checks(__doc__, {"minilm": minilm}))
