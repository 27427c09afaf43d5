"""The dynamic batcher alone (no HTTP yet): 32 concurrent in-process clients sending single-sample requests,
with batching on (max_batch_size 32) and off (max_batch_size 1), against calling the compiled model directly
at its best batch size (compilers.benchmark over batch sizes 1..32).

Models: the 64-wide MLP of examples/mlp.py on ort-cpu (where per-call cost dominates, batching matters
most) and all-MiniLM-L6-v2 on openvino-cpu-bf16 at sequence 16 (short sentences).
Targets (the serving issue's, here without the HTTP layer): batching on >= 2x batching off on the MLP;
batching on >= 80% of the direct call's best throughput on MiniLM.

    .venv/bin/python benchmarks/batcher.py [--models mlp,minilm]
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
from compilers.serve.batcher import Batcher, Batching  # noqa: E402
from timing import run_checks  # noqa: E402

CLIENTS = 32


def load(cm: compilers.CompiledModel, config: Batching, requests: list[list[np.ndarray]], seconds: float) -> dict:
    """CLIENTS concurrent clients, each sending its requests one after another, for at most `seconds` or until
    all are answered; samples per second and latency percentiles."""
    latencies: list[float] = []
    sizes: list[int] = []

    async def main() -> float:
        b = Batcher(cm.run_flat, cm.signature, config, on_batch=lambda s: sizes.append(s.rows))
        await b.start()
        stop = time.perf_counter() + seconds

        async def client(i: int) -> None:
            for req in requests[i::CLIENTS]:
                if time.perf_counter() > stop:
                    return
                t0 = time.perf_counter()
                await b.infer(req)
                latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        spent = time.perf_counter() - t0
        await b.stop()
        return spent
    spent = asyncio.run(main())
    ms = np.asarray(latencies) * 1e3
    return {"samples_per_s": len(latencies) / spent, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_batch": float(np.mean(sizes)), "requests": len(latencies)}


def check(label: str, cm, example, requests, need_vs_off: float | None, need_vs_direct: float | None):
    direct = compilers.benchmark(cm, example, batch_sizes=[1, 8, 32], min_time=1.0)
    best = max(direct.batch_sizes, key=lambda b: direct.get(cm.target.name, b).throughput)
    best_tp = direct.get(cm.target.name, best).throughput
    on = load(cm, Batching(max_batch_size=32, max_queue_delay_ms=2, queue_size=1024), requests, 10.0)
    off = load(cm, Batching(max_batch_size=1, max_queue_delay_ms=0, queue_size=1024), requests, 10.0)
    lines = [f"{label}: {CLIENTS} concurrent clients, single-sample requests"]
    for name, r in (("batching on (max 32, 2 ms)", on), ("batching off", off)):
        lines.append(f"  {name:28s} {r['samples_per_s']:9,.0f} samples/s  p50 {r['p50_ms']:7.2f} ms  p99 "
                     f"{r['p99_ms']:7.2f} ms  mean batch {r['mean_batch']:5.1f}  ({r['requests']} requests)")
    lines.append(f"  direct call, best batch size {best:2d}  {best_tp:9,.0f} samples/s")
    ok = True
    ratio_off, ratio_direct = on["samples_per_s"] / off["samples_per_s"], on["samples_per_s"] / best_tp
    if need_vs_off is not None:
        ok &= ratio_off >= need_vs_off
        lines.append(f"  batching on / off = {ratio_off:.2f}x (need >= {need_vs_off}): {'OK' if ratio_off >= need_vs_off else 'MISSED'}")
    if need_vs_direct is not None:
        ok &= ratio_direct >= need_vs_direct
        lines.append(f"  batching on / direct best = {ratio_direct:.2f} (need >= {need_vs_direct}): "
                     f"{'OK' if ratio_direct >= need_vs_direct else 'MISSED'}")
    return ok, lines


def mlp() -> tuple[bool, list[str]]:
    import mlp as tiny
    parts = tiny.factory()
    cm = compilers.compile(parts["model"], "ort-cpu", parts["example_inputs"])
    rng = np.random.default_rng(0)
    requests = [[rng.standard_normal((1, 64), dtype=np.float32)] for _ in range(20_000)]
    return check("64-wide MLP, ort-cpu", cm, parts["example_inputs"], requests, 2.0, None)


def minilm() -> tuple[bool, list[str]]:
    import minilm as m
    parts = m.factory()
    cm = compilers.compile(parts["model"], "openvino-cpu-bf16", parts["example_inputs"],
                           dynamic_shapes=parts["dynamic_shapes"], samples=parts["samples"])
    x = m.batch(1, 16)
    requests = []
    for i in range(2_000):
        one = m.batch(1, 16, offset=i)
        requests.append([one["input_ids"].numpy(), one["attention_mask"].numpy()])
    return check("all-MiniLM-L6-v2 s16, openvino-cpu-bf16", cm, x, requests, None, 0.8)


if __name__ == "__main__":
    sys.exit(run_checks(__doc__, {"mlp": mlp, "minilm": minilm}))
