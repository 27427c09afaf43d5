"""Speed checks of the call path, with compilers.benchmark (interleaved, every call timed, in one process).

1. Call overhead: p50 of `cm(x)` minus p50 of the backend's own call on the same engine (`cm.raw_call`), for
   every available fp32 target, the 64-wide MLP of examples/mlp.py, batch 1 (what `compilers bench
   examples/mlp.py:factory --batch-sizes 1 --overhead` shows too). Target: at most 25 us each.
2. ort-cpu vs eager PyTorch on the real all-MiniLM-L6-v2 at batch 8, sequence 128. Target: >= 1.0x.
3. The NaN/Inf input check (issue 18, item 3): on each target whose validation of the MLP recorded a non-finite
   deviation (OpenVINO: relu(NaN) = 0), `cm(x)` with the check (the default) against the same engine with it
   off (`nonfinite_inputs = "allow"`), interleaved. Reported, with the overhead of 1. still held to 25 us.

4. `--against REV`: only 1., for this tree and for git revision REV (a temporary worktree), in alternating
   processes, three rounds each: on a host whose timings drift between runs, a change's cost shows as the
   difference between the two columns of one run, not against a figure recorded on another day or machine.

    .venv/bin/python benchmarks/overhead.py [--json out.json] [--against REV]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compilers  # noqa: E402
from timing import alternating  # noqa: E402

OVERHEAD_LIMIT_US = 25.0
TARGETS = ("ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu")


def call_overhead() -> tuple[bool, compilers.Benchmark, dict[str, compilers.CompiledModel], object]:
    import mlp as tiny
    parts = tiny.factory()
    mlp, (x,) = parts["model"], parts["example_inputs"]
    cms = {t: compilers.compile(mlp, t, (x,)) for t in TARGETS if compilers.unavailable_reason(compilers.load_target(t)) is None}
    timed = compilers.benchmark(cms, (x,), baseline=mlp, batch_sizes=[1], raw=True, min_time=2.0)
    return all(timed.overhead_us(t) <= OVERHEAD_LIMIT_US for t in cms), timed, cms, x


def nonfinite_check_cost(cms: dict[str, compilers.CompiledModel], x) -> compilers.Benchmark | None:
    """cm(x) with the NaN/Inf input check and without it, on the targets that check (same engine, interleaved)."""
    from compilers.runtime import CompiledModel, nonfinite_refused
    checked = {t: cm for t, cm in cms.items() if nonfinite_refused(cm.signature, cm.target, cm.report.validation)}
    if not checked:
        return None
    pairs = {}
    for t, cm in checked.items():
        pairs[f"{t} check on"] = cm
        pairs[f"{t} check off"] = CompiledModel(cm.engine, cm.signature, cm.target.with_(nonfinite_inputs="allow"),
                                                cm.report)
    return compilers.benchmark(pairs, (x,), batch_sizes=[1], min_time=2.0)


def minilm_speed() -> tuple[bool, compilers.Benchmark]:
    import minilm
    parts = minilm.factory()
    cm = compilers.compile(parts["model"], "ort-cpu", parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    timed = compilers.benchmark(cm, minilm.batch(8, 128), baseline=parts["model"], min_time=2.0)
    return timed.speedup("ort-cpu") >= 1.0, timed


def against(rev: str, rounds: int = 3) -> int:
    """Print the call overhead per target of this tree's package and of `rev`'s, measured in alternating
    processes (this script with PYTHONPATH on each tree's src/); medians over the rounds."""
    got = alternating(__file__, ["--overhead-only"], rev, rounds)
    trees = list(got)
    print(f"call overhead, 64-wide MLP, batch 1, median of {rounds} alternating processes per tree (us):")
    print(f"{'target':18s}" + "".join(f"{name:>14s}" for name in trees))
    for target in got["this tree"][0]:
        print(f"{target:18s}" + "".join(f"{statistics.median(r[target] for r in got[name]):14.1f}" for name in trees))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--against", metavar="REV", help="only the call overhead, of this tree and of git revision REV")
    ap.add_argument("--overhead-only", action="store_true", help=argparse.SUPPRESS)   # one process of --against
    a = ap.parse_args()
    if a.against:
        return against(a.against)
    if a.overhead_only:
        _, over, cms, _ = call_overhead()
        print(json.dumps({t: over.overhead_us(t, 1) for t in cms}))
        return 0
    ok_o, over, cms, x = call_overhead()
    print(f"call overhead, 64-wide MLP, batch 1 (limit {OVERHEAD_LIMIT_US:.0f} us per target):\n{over}")
    for name in over.names:
        if name != "eager" and not name.endswith(" raw"):
            noisy = over.get(name, 1).noisy or over.get(name + " raw", 1).noisy
            print(f"  {name}: overhead {over.overhead_us(name, 1):.1f} us "
                  f"{'OK' if over.overhead_us(name, 1) <= OVERHEAD_LIMIT_US else 'FAIL'}"
                  + (" (timings noisy: the machine was busy; rerun on an idle one before trusting this)" if noisy else ""))
    check = nonfinite_check_cost(cms, x)
    if check is not None:
        print(f"\nNaN/Inf input check, 64-wide MLP, batch 1:\n{check}")
        for name in check.names:
            if name.endswith(" check on"):
                target = name.removesuffix(" check on")
                cost = (check.get(name, 1).p50_ms - check.get(f"{target} check off", 1).p50_ms) * 1e3
                print(f"  {target}: the check costs {cost:.1f} us per call (p50)")
    ok_m, mini = minilm_speed()
    print(f"\nMiniLM-L6 b8 s128:\n{mini}\n  ort-cpu {mini.speedup('ort-cpu'):.2f}x eager (need >= 1.0x) "
          f"{'OK' if ok_m else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"overhead": over.to_dict(), "minilm": mini.to_dict(),
                                            "nonfinite_check": check.to_dict() if check else None}, indent=1))
    return 0 if ok_o and ok_m else 1


if __name__ == "__main__":
    sys.exit(main())
