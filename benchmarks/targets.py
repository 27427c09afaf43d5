"""Every available target against eager PyTorch on the real all-MiniLM-L6-v2 at batch 8, sequence 128,
and the cost of going through `compilers` for openvino-cpu-bf16: the compiled call vs a direct
OpenVINO call on the same converted model, same compile config (target: within 3%).

Medians of interleaved repeated runs, in one process.

    .venv/bin/python benchmarks/targets.py [--targets a,b] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
import minilm  # noqa: E402
from timing import interleaved  # noqa: E402

OV_RATIO_LIMIT = 1.03


def openvino_direct(cm: compilers.CompiledModel, x: dict) -> callable:
    """A direct OpenVINO call of the model `cm` converted: its own compile, same config, numpy feed."""
    import openvino as ov
    config = {k: cm.engine.compiled.get_property(k) for k in
              ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")}
    request = ov.Core().compile_model(cm.engine.model, "CPU", config).create_infer_request()
    feed = [x["input_ids"].numpy(), x["attention_mask"].numpy()]
    return lambda: request.infer(feed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", help="comma-separated; default: every available built-in target")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    names = a.targets.split(",") if a.targets else [t.name for t in compilers.targets() if compilers.unavailable_reason(t) is None]
    parts = minilm.factory()
    model = parts["model"]
    x = minilm.batch(8, 128)
    fns = {"eager": lambda: model(**x)}
    compiled = {}
    for name in names:
        print(f"compiling {name}...", file=sys.stderr, flush=True)
        cm = compilers.compile(model, name, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                               calibration=parts["calibration"], samples=parts["samples"])
        compiled[name] = cm
        fns[name] = (lambda c: lambda: c(**x))(cm)
    if "openvino-cpu-bf16" in compiled:
        fns["openvino direct (bf16)"] = openvino_direct(compiled["openvino-cpu-bf16"], x)
    with torch.inference_mode():
        t = interleaved(fns, blocks=15, per_block=2)

    print(f"\nall-MiniLM-L6-v2, batch 8, sequence 128, {torch.get_num_threads()} threads, median of 15 interleaved blocks")
    print(f"{'':26s} {'ms':>8s} {'vs eager':>9s}  route")
    for name, sec in t.items():
        route = compiled[name].report.route if name in compiled else ""
        print(f"{name:26s} {sec * 1e3:8.1f} {t['eager'] / sec:8.2f}x  {route}")
    results = {"ms": {k: v * 1e3 for k, v in t.items()}}
    ok = True
    if "openvino direct (bf16)" in t:
        ratio = t["openvino-cpu-bf16"] / t["openvino direct (bf16)"]
        ok = ratio <= OV_RATIO_LIMIT
        results["openvino_bf16_ratio"] = ratio
        print(f"\nopenvino-cpu-bf16 through compilers / direct OpenVINO = {ratio:.3f} "
              f"(limit {OV_RATIO_LIMIT}) {'OK' if ok else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
