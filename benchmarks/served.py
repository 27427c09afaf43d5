"""Served as fast as called (issue 33): `compilers serve` under `wrk`, a C load generator that leaves the server its
cores, against the same artifact called directly in the same run.

Models (compiled once into --work, reused by later runs):
  int8     all-MiniLM-L6-v2 as a text pipeline (`examples/minilm.py:pipeline`) on openvino-cpu-int8
  bf16     the same on openvino-cpu-bf16
  tensors  all-MiniLM-L6-v2 as tensors (`examples/minilm.py:factory`) on openvino-cpu-bf16, requests at sequence 128
  mlp      the 64-wide MLP of examples/mlp.py on ort-cpu
Text requests are real English sentences of 5-30 words (calibration/*.txt), one per request, as JSON BYTES; tensor
requests are one row each, as JSON.

Checks (the issue's "done when"):
  one connection    served with the defaults, p50 <= direct b1 (mean) + 1 ms, for int8 and mlp
  32 connections    served >= 0.9x the direct best batch (1, 8, 16, 32; timed before and after the served runs,
                    averaged), for int8, bf16 and tensors, with the serving.toml given (--serving MODEL=FILE, e.g.
                    the one `compilers tune` wrote; else the defaults)
  vs eager          int8 served sentences/s >= 3x the eager sentence-transformers recipe (transformers BertModel +
                    tokenizers, padded to the batch's longest, b32, mean pooling + normalize), same run
  and zero non-2xx answers everywhere. The server's split (queue, pre, infer per call, rows per call) from /metrics.

    .venv/bin/python benchmarks/served.py [--models int8,bf16,tensors,mlp] [--work DIR] [--seconds S]
                                          [--serving int8=REPO/minilm/serving.toml ...] [--against REV]

`--against REV` serves each model from REV's tree too, with its defaults, in the same run (the figures before).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import compilers  # noqa: E402
import minilm  # noqa: E402
from compilers.serve.perf import scrape, split  # noqa: E402
from compilers.serve.repository import publish  # noqa: E402
from serve import Server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = minilm.SENTENCES + minilm.HELD_OUT
SIZES = (1, 8, 16, 32)
MODELS = {"int8": ("pipeline", "openvino-cpu-int8"), "bf16": ("pipeline", "openvino-cpu-bf16"),
          "tensors": ("factory", "openvino-cpu-bf16"), "mlp": ("mlp", "ort-cpu")}


def artifact(work: Path, name: str) -> Path:
    """The model's compiled artifact in `work`, compiled on first use."""
    out = work / "artifacts" / name
    if out.is_dir():
        return out
    kind, target = MODELS[name]
    if kind == "mlp":
        import mlp
        parts = mlp.factory()
        cm = compilers.compile(parts["model"], target, parts["example_inputs"])
    else:
        parts = getattr(minilm, kind)()
        cm = compilers.compile(parts["model"], target, parts["example_inputs"], calibration=parts["calibration"],
                               samples=parts["samples"], dynamic_shapes=parts.get("dynamic_shapes"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cm.save(tmp)
    tmp.rename(out)
    return out


def requests(name: str, cm) -> tuple[list[bytes], list]:
    """JSON bodies, one row each, and the matching direct-call inputs."""
    if MODELS[name][0] == "pipeline":
        bodies = [json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [s]}]})
                  for s in SENTENCES]
        return [b.encode() for b in bodies], SENTENCES
    rows = []
    if name == "tensors":
        for i in range(len(SENTENCES)):
            t = minilm.batch(1, 128, offset=i, pool=SENTENCES)
            rows.append({k: v.numpy() for k, v in t.items()})
    else:
        rng = np.random.default_rng(0)
        spec = cm.signature.inputs[0]
        rows = [{spec.name: rng.standard_normal((1, *spec.shape[1:])).astype(np.float32)} for _ in range(64)]
    bodies = [json.dumps({"inputs": [{"name": k, "datatype": "INT64" if v.dtype == np.int64 else "FP32",
                                      "shape": list(v.shape), "data": v.ravel().tolist()} for k, v in r.items()]})
              for r in rows]
    return [b.encode() for b in bodies], rows


def direct(cm, inputs: list, batch: int, seconds: float) -> tuple[float, float]:
    """Rows per second and mean ms per call of cm(batch of rows), cycling through `inputs`."""
    text = isinstance(inputs[0], str)
    batches = []
    for i in range(0, len(inputs), batch):
        part = [inputs[(i + k) % len(inputs)] for k in range(batch)]
        batches.append(part if text else {n: np.concatenate([p[n] for p in part]) for n in part[0]})
    call = (lambda b: cm(b)) if text else (lambda b: cm(**{k: torch.from_numpy(v) for k, v in b.items()}))
    for b in batches[:3]:
        call(b)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call(batches[calls % len(batches)])
        calls += 1
    took = time.perf_counter() - t0
    return calls * batch / took, 1000 * took / calls


def eager_recipe(seconds: float) -> float:
    """Sentences per second of the sentence-transformers recipe in eager PyTorch: tokenizers padding each batch of
    32 to its longest, BertModel, mean pooling over the mask, L2 normalization."""
    encoder = minilm.load_encoder()
    batches = [minilm.tokenize([SENTENCES[(i + k) % len(SENTENCES)] for k in range(32)])
               for i in range(0, len(SENTENCES), 32)]
    with torch.inference_mode():
        encoder(**batches[0])
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            encoder(**batches[calls % len(batches)])
            calls += 1
    return calls * 32 / (time.perf_counter() - t0)


def lua(path: Path, model: str, bodies: list[bytes]) -> Path:
    """A wrk script cycling through the bodies."""
    quoted = []
    for b in bodies:
        level = "=" * 4
        assert f"]{level}]".encode() not in b
        quoted.append(f"[{level}[{b.decode()}]{level}]")
    path.write_text("local bodies = {\n" + ",\n".join(quoted) + "\n}\nlocal i = 0\n"
                    "request = function()\n  i = i + 1\n"
                    f"  return wrk.format('POST', '/v2/models/{model}/infer', "
                    "{['Content-Type'] = 'application/json'}, bodies[(i % #bodies) + 1])\nend\n")
    return path


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    """wrk's requests/s, p50 and p99 (ms) and non-2xx answers."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                          f"http://{url}"], capture_output=True, text=True, check=True).stdout
    latency = {p: float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency["50"],
            "p99": latency["99"], "bad": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def serve_model(work: Path, name: str, serving: str | None) -> tuple[Path, str]:
    repo = work / f"repo-{name}"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / name).mkdir(parents=True)
    publish(artifact(work, name), repo / name)
    if serving:
        shutil.copy(serving, repo / name / "serving.toml")
    return repo, (repo / name / "serving.toml").read_text() if (repo / name / "serving.toml").exists() else ""


def served(work: Path, name: str, script: Path, seconds: float, serving: str | None, src: str | None) -> dict:
    """The model served by `compilers serve` (from `src`, another tree's src/, when given) with `serving` (a
    serving.toml; None: the defaults), under wrk at 1 and 32 connections, with the server's split of each."""
    repo, config = serve_model(work, name, serving)
    env = os.environ.get("PYTHONPATH")
    if src:
        os.environ["PYTHONPATH"] = src
    try:
        server = Server(repo)
    finally:
        if src:
            os.environ.pop("PYTHONPATH") if env is None else os.environ.__setitem__("PYTHONPATH", env)
    try:
        wrk(server.url, script, 1, 2)                                   # warm-up
        metrics = f"http://{server.url}/metrics"
        s0 = scrape(metrics, name)
        one = wrk(server.url, script, 1, seconds)
        s1 = scrape(metrics, name)
        wrk(server.url, script, 32, 2)
        s2 = scrape(metrics, name)
        many = wrk(server.url, script, 32, seconds)
        s3 = scrape(metrics, name)
    finally:
        server.stop()
    return {"config": " ".join(config.split()) or "defaults", "one": one, "many": many,
            "one_split": split(s0, s1), "many_split": split(s2, s3)}


def measure(work: Path, name: str, seconds: float, serving: str | None, against: tuple[str, str] | None) -> list[str]:
    """The model served (this tree with `serving`; and `against`, (REV, its src/), with its defaults) against
    the direct call; the issue's checks."""
    cm = compilers.load(artifact(work, name))
    bodies, inputs = requests(name, cm)
    script = lua(work / f"{name}.lua", name, bodies)
    before = {b: direct(cm, inputs, b, seconds / 4) for b in SIZES}
    runs = {}
    if against:
        runs[f"before ({against[0]}, its defaults)"] = served(work, name, script, seconds, None, against[1])
    runs["this tree, its defaults"] = served(work, name, script, seconds, None, None)
    if serving:
        runs["this tree, the serving.toml given"] = served(work, name, script, seconds, serving, None)
    after = {b: direct(cm, inputs, b, seconds / 4) for b in SIZES}
    rate = {b: (before[b][0] + after[b][0]) / 2 for b in SIZES}
    b1_ms = (before[1][1] + after[1][1]) / 2
    best = max(rate, key=rate.get)
    rows = f"{'sentence' if MODELS[name][0] == 'pipeline' else 'row'}s/s"
    lines = [f"{name}: {MODELS[name][1]}",
             "  direct " + ", ".join(f"b{b} {rate[b]:,.0f}" for b in SIZES) + f" {rows} (b1 {b1_ms:.2f} ms a call; "
             "before and after the served runs, averaged)"]
    for run, r in runs.items():
        lines.append(f"  {run}, serving.toml: {r['config']}")
        for label, w, v in (("1 connection", r["one"], r["one_split"]), ("32 connections", r["many"], r["many_split"])):
            lines.append(f"    {label:14s} {w['rate']:8,.0f} {rows}  p50 {w['p50']:7.2f} ms  p99 {w['p99']:7.2f} ms"
                         f"  non-2xx {w['bad']}, socket errors {w['socket_errors']}  | server: queue "
                         f"{v['queue_ms'] or 0:.2f} ms, pre {v['preprocess_ms'] or 0:.2f}, infer/call "
                         f"{v['inference_ms'] or 0:.2f}, request {v['request_ms'] or 0:.2f}, rows/call "
                         f"{v['batch_size'] or 0:.1f}")
        lines.append(f"    1 connection: p50 - direct b1 = {r['one']['p50'] - b1_ms:+.2f} ms; 32 connections: "
                     f"{r['many']['rate'] / rate[best]:.2f}x direct best (b{best}, {rate[best]:,.0f})")
    one = runs["this tree, its defaults"]["one"]                          # a lone client: the defaults
    many = runs["this tree, the serving.toml given" if serving else "this tree, its defaults"]["many"]
    ok = not any(w["bad"] or w["socket_errors"] for r in runs.values() for w in (r["one"], r["many"]))
    if name in ("int8", "mlp"):
        passed = one["p50"] <= b1_ms + 1.0
        ok &= passed
        lines.append(f"  one connection: p50 {one['p50']:.2f} ms vs direct b1 {b1_ms:.2f} + 1 ms: "
                     f"{'OK' if passed else 'MISSED'} ({one['p50'] - b1_ms:+.2f} ms)")
    if name in ("int8", "bf16", "tensors"):
        ratio = many["rate"] / rate[best]
        passed = ratio >= 0.9
        ok &= passed
        lines.append(f"  32 connections: {ratio:.2f}x direct best (b{best}, {rate[best]:,.0f}), need >= 0.9: "
                     f"{'OK' if passed else 'MISSED'}")
    if name == "int8":
        eager = eager_recipe(seconds / 2)
        ratio = many["rate"] / eager
        passed = ratio >= 3
        ok &= passed
        lines.append(f"  vs eager sentence-transformers recipe (b32, {eager:,.0f}/s): served {ratio:.2f}x, direct "
                     f"best {rate[best] / eager:.2f}x, need >= 3x: {'OK' if passed else 'MISSED'}")
    lines.append(f"  {'OK' if ok else 'MISSED'}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compilers-served")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--serving", action="append", default=[], metavar="MODEL=FILE")
    p.add_argument("--against", metavar="REV", help="also serve each model from REV's tree with its defaults (the "
                   "figures before), in the same run")
    a = p.parse_args()
    if shutil.which("wrk") is None:
        print("needs wrk (apt install wrk)", file=sys.stderr)
        return 2
    serving = dict(s.split("=", 1) for s in a.serving)
    against = None
    if a.against:
        against = tempfile.mkdtemp(prefix="compilers-served-against-")
        subprocess.run(f"git -C {ROOT} archive {a.against} src | tar -x -C {against}", shell=True, check=True)
        against = (a.against, str(Path(against) / "src"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads")
    ok = True
    for name in a.models.split(","):
        lines = measure(a.work, name, a.seconds, serving.get(name), against)
        print("\n".join(lines), flush=True)
        ok &= lines[-1].strip() == "OK"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
