"""Speed checks of the call path, with compilers.benchmark (interleaved, every call timed, in one process).

1. Call overhead: p50 of `cm(x)` minus p50 of the backend's own call on the same engine (`cm.raw_call`), for
   every available fp32 target, the 64-wide MLP of examples/mlp.py, batch 1 (what `compilers bench
   examples/mlp.py:factory --batch-sizes 1 --overhead` shows too). Target: at most 25 us each.
2. ort-cpu vs eager PyTorch on the real all-MiniLM-L6-v2 at batch 8, sequence 128. Target: >= 1.0x.

    .venv/bin/python benchmarks/overhead.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compilers  # noqa: E402

OVERHEAD_LIMIT_US = 25.0
TARGETS = ("ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu")


def call_overhead() -> tuple[bool, compilers.Benchmark]:
    import mlp as tiny
    parts = tiny.factory()
    mlp, (x,) = parts["model"], parts["example_inputs"]
    cms = {t: compilers.compile(mlp, t, (x,)) for t in TARGETS if compilers.unavailable_reason(compilers.load_target(t)) is None}
    timed = compilers.benchmark(cms, (x,), baseline=mlp, batch_sizes=[1], raw=True, min_time=2.0)
    return all(timed.overhead_us(t) <= OVERHEAD_LIMIT_US for t in cms), timed


def minilm_speed() -> tuple[bool, compilers.Benchmark]:
    import minilm
    parts = minilm.factory()
    cm = compilers.compile(parts["model"], "ort-cpu", parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    timed = compilers.benchmark(cm, minilm.batch(8, 128), baseline=parts["model"], min_time=2.0)
    return timed.speedup("ort-cpu") >= 1.0, timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    ok_o, over = call_overhead()
    print(f"call overhead, 64-wide MLP, batch 1 (limit {OVERHEAD_LIMIT_US:.0f} us per target):\n{over}")
    for name in over.names:
        if name != "eager" and not name.endswith(" raw"):
            noisy = over.get(name, 1).noisy or over.get(name + " raw", 1).noisy
            print(f"  {name}: overhead {over.overhead_us(name, 1):.1f} us "
                  f"{'OK' if over.overhead_us(name, 1) <= OVERHEAD_LIMIT_US else 'FAIL'}"
                  + (" (timings noisy: the machine was busy; rerun on an idle one before trusting this)" if noisy else ""))
    ok_m, mini = minilm_speed()
    print(f"\nMiniLM-L6 b8 s128:\n{mini}\n  ort-cpu {mini.speedup('ort-cpu'):.2f}x eager (need >= 1.0x) "
          f"{'OK' if ok_m else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"overhead": over.to_dict(), "minilm": mini.to_dict()}, indent=1))
    return 0 if ok_o and ok_m else 1


if __name__ == "__main__":
    sys.exit(main())
