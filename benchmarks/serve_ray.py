"""The demo model on a local Ray Serve against `compilers serve` on the same box, under the same load.

all-MiniLM-L6-v2 (sequence 128, the demo's) compiled for openvino-cpu-bf16 and published into a repository
(batching max 32, 5 ms). 32 concurrent tritonclient.http clients send single-sample requests of real sentences,
bounded in requests and seconds, in four phases of one run (the host's speed drifts, so they are interleaved):

  1. `compilers serve REPO`, a child process (as benchmarks/serve.py runs it);
  2. the same repository on a local Ray Serve (`compilers.serve.ray`, as `compilers serve --ray` runs it), one
     replica with the box's 2 CPUs;
  3. `compilers serve` again: its two runs are averaged;
  4. Ray Serve with two replicas (1 CPU each), one killed halfway.

Checks (the scale-out issue's): in 2, Ray Serve's samples/s >= 0.7x `compilers serve`'s with a mean of >= 4 rows
per engine call (its /metrics) and no failure; every answer of every phase equals the compiled model's own
output for that sentence (cosine >= 0.9999); in 4, both replicas answered, every failure was a retriable 503,
and two replicas run again afterwards.

    .venv/bin/python benchmarks/serve_ray.py
"""
from __future__ import annotations

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
from ray import serve  # noqa: E402

import compilers  # noqa: E402
from compilers.serve.ray import INGRESS, running  # noqa: E402
from compilers.serve.repository import publish  # noqa: E402
from serve import CLIENTS, Server, line, load, mean_batch, tensor  # noqa: E402
from timing import run_checks  # noqa: E402

SECONDS, MAX_REQUESTS, WARM_UP = 20.0, 20_000, 5.0
BATCHING = "[batching]\nmax_batch_size = 32\nmax_queue_delay_ms = 5\nqueue_size = 1024\n"


class Answers:
    """Checks each answer against the compiled model's own output for its sentence: the worst cosine."""

    def __init__(self, want: list[np.ndarray], output: str):
        self.want, self.output, self.worst = want, output, 1.0

    def __call__(self, k: int, result) -> None:
        got, ref = result.as_numpy(self.output).ravel(), self.want[k % len(self.want)].ravel()
        self.worst = min(self.worst, float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))))


def repository(root: Path, artifact: Path, replicas: str) -> Path:
    publish(artifact, root / "minilm")
    (root / "minilm" / "serving.toml").write_text(BATCHING + "[replicas]\n" + replicas)
    return root


def on_ray(repo: Path, requests: list, answers: Answers) -> tuple[dict, float]:
    """Phase 2: the load on one replica; its result and mean rows per engine call."""
    with running(repo, num_cpus=2) as port:
        url = f"127.0.0.1:{port}"
        load(url, "minilm", requests, 200, WARM_UP)
        r = load(url, "minilm", requests, MAX_REQUESTS, SECONDS, answered=answers)
        metrics = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    return r, mean_batch(metrics, "minilm")


def on_server(repo: Path, requests: list, answers: Answers) -> tuple[dict, float]:
    server = Server(repo)
    try:
        load(server.url, "minilm", requests, 200, WARM_UP)
        r = load(server.url, "minilm", requests, MAX_REQUESTS, SECONDS, answered=answers)
        return r, mean_batch(server.metrics(), "minilm")
    finally:
        server.stop()


def kill_a_replica(repo: Path, requests: list, sentences: list, answers: Answers) -> tuple[dict, int, int]:
    """Phase 4: two replicas, one killed halfway through the load; the load's result, the replicas that answer
    afterwards, and how many run again."""
    with running(repo, num_cpus=2) as port:
        url = f"127.0.0.1:{port}"
        load(url, "minilm", requests, 200, WARM_UP)

        def killer(client) -> None:
            gevent.sleep(SECONDS / 2)
            name = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                        if "minilm-v1" in a["name"] and a["name"].startswith("SERVE_REPLICA"))
            ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
        r = load(url, "minilm", requests, MAX_REQUESTS, SECONDS, during=killer, answered=answers)
        deadline = time.monotonic() + 120
        while serve.status().applications[INGRESS].deployments["minilm-v1"].replica_states.get("RUNNING", 0) < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        alive = serve.status().applications[INGRESS].deployments["minilm-v1"].replica_states.get("RUNNING", 0)
        handle = serve.get_deployment_handle("minilm-v1", app_name=INGRESS)
        calls = [handle.remote([sentences[i]["input_ids"].numpy(), sentences[i]["attention_mask"].numpy()])
                 for i in range(32)]
        replicas = {call.result(timeout_s=120)[1] for call in calls}      # (outputs, the replica that ran it)
    return r, len(replicas), alive


def minilm() -> tuple[bool, list[str]]:
    import minilm as m
    parts = m.factory()
    cm = compilers.compile(parts["model"], "openvino-cpu-bf16", parts["example_inputs"],
                           dynamic_shapes=parts["dynamic_shapes"], samples=parts["samples"])
    root = Path(tempfile.mkdtemp(prefix="compilers-ray-bench-"))
    cm.save(root / "artifact")
    one = repository(root / "one", root / "artifact", "min = 1\nmax = 1\ncpus = 2\n")
    two = repository(root / "two", root / "artifact", "min = 2\nmax = 2\ncpus = 1\n")
    sentences = [m.batch(1, 128, offset=i) for i in range(64)]
    want = [cm.run_flat([s["input_ids"].numpy(), s["attention_mask"].numpy()])[0] for s in sentences]
    requests = [[tensor("input_ids", s["input_ids"].numpy()), tensor("attention_mask", s["attention_mask"].numpy())]
                for s in sentences]
    answers = Answers(want, "output")
    served = [on_server(one, requests, answers)]
    ray_run, ray_batch = on_ray(one, requests, answers)
    served.append(on_server(one, requests, answers))
    killed, replicas, alive = kill_a_replica(two, requests, sentences, answers)

    server_rate = sum(r["samples_per_s"] for r, _ in served) / 2
    ratio = ray_run["samples_per_s"] / server_rate
    fast = ratio >= 0.7 and ray_batch >= 4 and not ray_run["failures"]
    right = answers.worst >= 0.9999 and not any(r["failures"] for r, _ in served)
    retriable = all(f.startswith("InferenceServerException: [503]") for f in killed["failures"])
    recovered = replicas == 2 and alive == 2 and retriable
    lines = [f"all-MiniLM-L6-v2 s128, openvino-cpu-bf16: {CLIENTS} concurrent tritonclient.http clients, single-sample "
             f"requests, {SECONDS:.0f} s a phase",
             line(f"compilers serve (mean {served[0][1]:.1f})", served[0][0]),
             line(f"Ray Serve, 1 replica (mean {ray_batch:.1f})", ray_run),
             line(f"compilers serve (mean {served[1][1]:.1f})", served[1][0]),
             f"  Ray / compilers serve ({server_rate:,.0f}, the mean of its two runs) = {ratio:.2f} (need >= 0.7), "
             f"mean rows per engine call {ray_batch:.1f} (need >= 4), {len(ray_run['failures'])} failed: "
             f"{'OK' if fast else 'MISSED'}",
             line("Ray Serve, 2 replicas, 1 killed", killed),
             f"  replicas that answered afterwards: {replicas} (need 2); RUNNING after the kill: {alive} (need 2); "
             f"every failure a retriable 503: {retriable}: {'OK' if recovered else 'MISSED'}",
             f"  worst cosine of any answer vs the compiled model's own output {answers.worst:.6f} (need >= 0.9999); "
             f"failures outside the kill: {sum(len(r['failures']) for r, _ in served) + len(ray_run['failures'])}: "
             f"{'OK' if right else 'MISSED'}"]
    lines += [f"    {f[:300]}" for r in (ray_run, killed) for f in sorted(set(r["failures"]))[:3]]
    return fast and right and recovered, lines


if __name__ == "__main__":
    sys.exit(run_checks(__doc__, {"minilm": minilm}))
