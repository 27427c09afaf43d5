"""Speed checks for the ort-cpu target, in one process, medians of interleaved repeated runs.

1. Call overhead: `cm(x)` vs the raw `session.run` of the same ORT session, 64-wide MLP, batch 1.
   Target: at most 25 us.
2. ort-cpu vs eager PyTorch on the real all-MiniLM-L6-v2 at batch 8, sequence 128. Target: >= 1.0x.

    .venv/bin/python benchmarks/overhead.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
from timing import interleaved  # noqa: E402

OVERHEAD_LIMIT_US = 25.0


def call_overhead() -> dict:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(1, 64)
    cm = compilers.compile(mlp, "ort-cpu", (x,))
    session, feed = cm.engine.session, {cm.engine.input_names[0]: x.numpy()}
    names = cm.engine.output_names
    t = interleaved({"compiled": lambda: cm(x), "session.run": lambda: session.run(names, feed)},
                    blocks=30, per_block=300)
    over = (t["compiled"] - t["session.run"]) * 1e6
    return {"session_run_us": t["session.run"] * 1e6, "compiled_us": t["compiled"] * 1e6,
            "overhead_us": over, "limit_us": OVERHEAD_LIMIT_US, "ok": over <= OVERHEAD_LIMIT_US}


def minilm_speed() -> dict:
    import minilm
    parts = minilm.factory()
    model = parts["model"]
    cm = compilers.compile(model, "ort-cpu", parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    x = minilm.batch(8, 128)
    with torch.inference_mode():
        t = interleaved({"eager": lambda: model(**x), "ort-cpu": lambda: cm(**x)}, blocks=15, per_block=2)
    speedup = t["eager"] / t["ort-cpu"]
    return {"eager_ms": t["eager"] * 1e3, "ort_cpu_ms": t["ort-cpu"] * 1e3, "speedup": speedup,
            "fused": cm.report.fused, "threads": torch.get_num_threads(), "ok": speedup >= 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    o = call_overhead()
    print(f"call overhead, 64-wide MLP, batch 1: session.run {o['session_run_us']:.1f} us, compiled "
          f"{o['compiled_us']:.1f} us, overhead {o['overhead_us']:.1f} us (limit {OVERHEAD_LIMIT_US:.0f}) "
          f"{'OK' if o['ok'] else 'FAIL'}")
    m = minilm_speed()
    print(f"MiniLM-L6 b8 s128: eager {m['eager_ms']:.1f} ms, ort-cpu {m['ort_cpu_ms']:.1f} ms, "
          f"{m['speedup']:.2f}x (need >= 1.0x) {'OK' if m['ok'] else 'FAIL'}; fused {m['fused']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"overhead": o, "minilm": m}, indent=1))
    return 0 if o["ok"] and m["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
