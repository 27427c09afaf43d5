"""Text pipelines served (issue 20): the real all-MiniLM-L6-v2 as `examples/minilm.py:pipeline` (its tokenizer,
BERT, mean pooling and L2 normalization compiled into the graph), sentences in, embeddings out.

Checks:
  accuracy    compiled for ort-cpu, openvino-cpu and openvino-cpu-int8 (int8 calibrated on the 96 calibration
              sentences) and served by `compilers serve`: the 32 held-out sentences sent as plain JSON strings
              (what curl sends), and by tritonclient.http as BYTES in JSON and binary, 8 per request; every
              sentence's embedding against the eager pipeline's on the same 8: cosine >= 0.9999 (fp32), >= 0.99
              (int8)
  throughput  openvino-cpu, 32 concurrent tritonclient.http clients each sending single real sentences of
              varying length (requests batched after tokenization, padded to the longest): the server's
              sentences/s >= 0.8x the pipeline called directly at its best batch size (1, 8, 16, 32; tokenizing
              included, timed before and after the server's run, averaged); zero errors; the server's per-stage
              means from /metrics (pre-processing, queue, inference per call, post-processing, whole request)
  padding     the same engine on the same sentences, batches of 8: padded to each batch's longest (the pipeline)
              against padded to 128 (the fixed-length model's inputs), interleaved: the throughput ratio

    .venv/bin/python benchmarks/pipeline.py [--models accuracy,throughput,padding]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tritonclient.http as triton  # noqa: E402

import compilers  # noqa: E402
import minilm  # noqa: E402
from serve import CLIENTS, ROOT, Server, add_model, line, load  # noqa: E402
from timing import run_checks  # noqa: E402

TARGETS = {"ort-cpu": 0.9999, "openvino-cpu": 0.9999, "openvino-cpu-int8": 0.99}
SERVING = "[batching]\nmax_batch_size = 32\nmax_queue_delay_ms = 2\nqueue_size = 1024\n"
_compiled: dict[str, compilers.CompiledPipeline] = {}


def compiled(target: str) -> compilers.CompiledPipeline:
    if target not in _compiled:
        parts = minilm.pipeline()
        _compiled[target] = compilers.compile(parts["model"], target, parts["example_inputs"],
                                              calibration=parts["calibration"], samples=parts["samples"])
    return _compiled[target]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def curl(port: int, model: str, sentences: list[str]) -> np.ndarray:
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(sentences)],
                                   "data": sentences}]}).encode()
    answer = json.load(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer", body, {"Content-Type": "application/json"}), timeout=60))
    out = answer["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def texts(sentences: list[str], binary: bool) -> list:
    t = triton.InferInput("text", [len(sentences)], "BYTES")
    t.set_data_from_numpy(np.array(sentences, dtype=object), binary_data=binary)
    return [t]


def accuracy() -> tuple[bool, list[str]]:
    pipe = minilm.pipeline()["model"]
    batches = [minilm.HELD_OUT[i:i + 8] for i in range(0, len(minilm.HELD_OUT), 8)]
    eager = np.concatenate([pipe(b)["embedding"].numpy() for b in batches])
    repo = ROOT / "pipeline-repo"
    for target in TARGETS:
        add_model(repo, target, compiled(target), SERVING)
    ok, lines = True, [f"all-MiniLM-L6-v2 text pipeline: the {len(minilm.HELD_OUT)} held-out sentences, 8 per "
                       "request; per-sentence cosine to the eager pipeline, lowest"]
    server = Server(repo)
    try:
        client = triton.InferenceServerClient(server.url, network_timeout=120)
        for target, need in TARGETS.items():
            got = {"curl (JSON strings)": np.concatenate([curl(server.port, target, b) for b in batches])}
            for binary in (False, True):
                got[f"tritonclient BYTES {'binary' if binary else 'JSON'}"] = np.concatenate(
                    [client.infer(target, texts(b, binary)).as_numpy("embedding") for b in batches])
            direct = np.concatenate([compiled(target)(b)["embedding"].numpy() for b in batches])
            worst = {how: float(cosines(e, eager).min()) for how, e in got.items()}
            worst["Python cm(sentences)"] = float(cosines(direct, eager).min())
            passed = min(worst.values()) >= need
            ok &= passed
            lines.append(f"  {target:18s} " + ", ".join(f"{how} {c:.6f}" for how, c in worst.items())
                         + f" (need >= {need}): {'OK' if passed else 'MISSED'}")
    finally:
        server.stop()
    return ok, lines


def direct_rate(cm, sentences: list[str], batch: int, seconds: float = 1.5) -> float:
    """Sentences per second of cm(batch of sentences), cycling through `sentences`."""
    calls, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cm([sentences[(i + k) % len(sentences)] for k in range(batch)])
        i, calls = i + batch, calls + 1
    return calls * batch / (time.perf_counter() - t0)


def throughput() -> tuple[bool, list[str]]:
    target = "openvino-cpu"
    cm = compiled(target)
    sentences = minilm.SENTENCES + minilm.HELD_OUT
    repo = ROOT / "pipeline-load"
    add_model(repo, "minilm", cm, SERVING)
    requests = [texts([s], True) for s in sentences]
    sizes = (1, 8, 16, 32)
    before = {b: direct_rate(cm, sentences, b) for b in sizes}
    server = Server(repo)
    try:
        load(server.url, "minilm", requests, 200, 10)                            # warm-up
        warm = server.metrics()
        r = load(server.url, "minilm", requests, 20_000, 20)
        metrics = server.metrics()
    finally:
        server.stop()
    after = {b: direct_rate(cm, sentences, b) for b in sizes}
    per_size = {b: (before[b] + after[b]) / 2 for b in sizes}
    best = max(per_size, key=per_size.get)
    ratio = r["samples_per_s"] / per_size[best]
    stages = _delta_means(warm, metrics, "minilm")
    passed = ratio >= 0.8 and not r["failures"]
    lines = [f"all-MiniLM-L6-v2 text pipeline, {target}: {CLIENTS} concurrent tritonclient.http clients, one real "
             f"sentence ({len(sentences)} of 5-30 words) per request, BYTES binary",
             line(f"server (max 32, 2 ms; mean {stages['rows']:.1f})", r),
             "  direct cm(sentences) (before/after): " + ", ".join(
                 f"b{b} {before[b]:,.0f}/{after[b]:,.0f}" for b in sizes) + " sentences/s",
             f"  server / direct best (b{best}, {per_size[best]:,.0f}) = {ratio:.2f} (need >= 0.8), "
             f"{len(r['failures'])} failed: {'OK' if passed else 'MISSED'}",
             "  server stages, mean ms: " + ", ".join(
                 f"{k} {v * 1e3:.2f}" for k, v in stages.items() if k != "rows")
             + " (inference is per engine call, the others per request)"]
    lines += [f"    {f}" for f in r["failures"][:5]]
    return passed, lines


def _delta_means(before: str, after: str, model: str) -> dict[str, float]:
    """stage_means over what happened between two /metrics readings, and the mean rows per engine call."""
    def totals(text: str) -> dict[str, float]:
        got: dict[str, float] = {}
        for row in text.splitlines():
            if f'model="{model}"' in row and row.startswith("compilers_") and ("_sum{" in row or "_count{" in row):
                key = row.split("{")[0]
                got[key] = got.get(key, 0.0) + float(row.split()[-1])
        return got
    a, b = totals(before), totals(after)
    d = {k: b[k] - a.get(k, 0.0) for k in b}
    means = {}
    for stage in ("preprocess", "queue", "inference", "postprocess", "request"):
        n = d.get(f"compilers_{stage}_seconds_count", 0.0)
        means[stage] = d.get(f"compilers_{stage}_seconds_sum", 0.0) / n if n else float("nan")
    calls = d.get("compilers_batch_size_count", 0.0)
    means["rows"] = d.get("compilers_batch_size_sum", 0.0) / calls if calls else float("nan")
    return means


def padding() -> tuple[bool, list[str]]:
    target = "openvino-cpu"
    cm = compiled(target)
    sentences = minilm.SENTENCES + minilm.HELD_OUT
    batches = [sentences[i:i + 8] for i in range(0, len(sentences) - 7, 8)]
    longest = [cm.steps.tensors(b) for b in batches]
    fixed = [minilm.tokenize(b, 128) for b in batches]
    rates: dict[str, list[float]] = {"longest": [], "fixed 128": []}
    for _ in range(5):                       # interleaved rounds: the host's speed drifts
        for name, inputs in (("longest", longest), ("fixed 128", fixed)):
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                cm.model(**inputs[calls % len(inputs)])
                calls += 1
            rates[name].append(calls * 8 / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    tokens = np.mean([t["input_ids"].shape[1] for t in longest])
    return True, [f"all-MiniLM-L6-v2, {target}, batches of 8 of the same {len(batches) * 8} sentences, tokenized "
                  "(tokenizing not timed), median of 5 interleaved rounds:",
                  f"  padded to each batch's longest (mean {tokens:.0f} tokens): {med['longest']:,.0f} sentences/s",
                  f"  padded to 128: {med['fixed 128']:,.0f} sentences/s",
                  f"  longest / fixed = {med['longest'] / med['fixed 128']:.2f}x (reported)"]


if __name__ == "__main__":
    sys.exit(run_checks(__doc__, {"accuracy": accuracy, "throughput": throughput, "padding": padding}))
