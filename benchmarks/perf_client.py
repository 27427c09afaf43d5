"""The load generator's own cost: `compilers perf`'s worker processes (asyncio, keep-alive HTTP/1.1, requests
prebuilt) vs the threaded tritonclient.http client it replaced (a thread and a client per connection, in one
interpreter), both over HTTP against the 64-wide MLP of examples/mlp.py (ort-cpu, batch 1) served by
`compilers serve` in its own process. Per concurrency: requests/s and the client's CPU ms per request (its
processes' CPU over the measured window; the server's is not in it). Figures, not a check: exit 1 only when a
client failed.

    .venv/bin/python benchmarks/perf_client.py [--concurrency 1,8,32] [--duration 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
from compilers.serve.perf import measure  # noqa: E402
from compilers.serve.repository import publish  # noqa: E402
from serve import Server  # noqa: E402


def threaded(url: str, model: str, n: int, duration: float, warmup: float) -> tuple[float, float, int]:
    """The old `compilers perf` path: n threads, each with its own tritonclient.http client sending one binary
    request at a time. Returns (requests/s, client CPU ms per request, errors)."""
    import tritonclient.http as http
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    counts, errors = [0] * n, [0] * n
    marks: dict[str, float] = {}

    def opened():
        marks["cpu"], marks["start"] = time.process_time(), time.perf_counter()

    barrier = threading.Barrier(n, action=opened)

    def worker(i: int) -> None:
        client = http.InferenceServerClient(url, connection_timeout=30, network_timeout=30)
        request = http.InferInput("input", [1, 64], "FP32")
        request.set_data_from_numpy(x, binary_data=True)
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            client.infer(model, [request])
        barrier.wait()
        end = marks["start"] + duration
        while time.perf_counter() < end:
            try:
                client.infer(model, [request])
                counts[i] += 1
            except Exception:
                errors[i] += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - marks["start"], time.process_time() - marks["cpu"]
    sent = sum(counts) + sum(errors)
    return sum(counts) / seconds, 1000 * cpu / sent, sum(errors)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    a = p.parse_args()
    from mlp import factory
    made = factory()
    root = Path(tempfile.mkdtemp(prefix="compilers-perf-client-"))
    compilers.compile(made["model"], "ort-cpu", made["example_inputs"]).save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mlp")
    server = Server(root / "repo")
    rows, failed = [], False
    try:
        for n in (int(c) for c in a.concurrency.split(",")):
            old_rps, old_ms, old_errors = threaded(server.url, "mlp", n, a.duration, a.warmup)
            (level,) = measure(server.url, "mlp", concurrency=[n], duration=a.duration, warmup=a.warmup,
                               log=lambda m: None).levels
            failed |= bool(old_errors or level.errors)
            rows.append((n, old_rps, old_ms, level.throughput, level.client_cpu_ms_per_request, level.processes,
                         max(level.client_process_cores), level.client_limited))
    finally:
        server.stop()
    print(f"64-wide MLP (ort-cpu, batch 1) over HTTP, {a.duration:g} s per level; client CPU ms per request")
    print(f"{'concurrency':>11}  {'threaded req/s':>14}  {'threaded ms/req':>15}  {'perf req/s':>10}  "
          f"{'perf ms/req':>11}  {'procs':>5}  {'busiest core':>12}  client-limited")
    for n, old_rps, old_ms, rps, ms, procs, busiest, limited in rows:
        print(f"{n:>11}  {old_rps:>14.0f}  {old_ms:>15.3f}  {rps:>10.0f}  {ms:>11.3f}  {procs:>5}  {busiest:>12.2f}  "
              f"{'yes' if limited else 'no'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
