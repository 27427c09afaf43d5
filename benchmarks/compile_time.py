"""Compile time of the demo model (the real all-MiniLM-L6-v2 of `make demo`, with its calibration sentences and
held-out samples) per target: the wall time of one `compilers.compile` call, each in a fresh process.

    .venv/bin/python benchmarks/compile_time.py [--targets ort-cpu,openvino-cpu] [--against REV] [--rounds 4]

With `--against REV`: this tree and git revision REV (a temporary worktree) in alternating processes, the
median of the rounds per tree and the ratio, in one run: the machine's drift between runs cancels out of the
ratio, not out of figures recorded on another day. Issue 32 asks that compile time stay within 5% of before.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from timing import alternating  # noqa: E402

TARGETS = "ort-cpu,openvino-cpu,torchscript-cpu"


def compile_once(targets: list[str]) -> dict[str, float]:
    """Seconds of one compile of the demo model for each target, in this process (the model loaded first)."""
    import compilers
    import minilm
    parts = minilm.factory()
    seconds = {}
    for target in targets:
        t = time.perf_counter()
        compilers.compile(parts["model"], target, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                          calibration=parts["calibration"], samples=parts["samples"])
        seconds[target] = time.perf_counter() - t
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=TARGETS)
    ap.add_argument("--against", metavar="REV", help="this tree and git revision REV, alternating")
    ap.add_argument("--rounds", type=int, default=4, help="per tree; even, so that each tree runs first as often")
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)    # one process of --against
    a = ap.parse_args()
    targets = a.targets.split(",")
    if a.once or not a.against:
        print(json.dumps(compile_once(targets)), flush=True)
        return 0
    got = {}
    for target in targets:      # one target per process: each compile starts from a fresh interpreter
        for tree, runs in alternating(__file__, ["--once", "--targets", target], a.against, a.rounds).items():
            got.setdefault(tree, {})[target] = [r[target] for r in runs]
    trees = list(got)
    print(f"compile of the demo model (all-MiniLM-L6-v2), median of {a.rounds} alternating processes per tree (s):")
    print(f"{'target':18s}" + "".join(f"{t:>14s}" for t in trees) + f"{'ratio':>9s}")
    for target in targets:
        mid = [statistics.median(got[t][target]) for t in trees]
        print(f"{target:18s}" + "".join(f"{m:14.2f}" for m in mid) + f"{mid[0] / mid[1]:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
