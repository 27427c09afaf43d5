"""Every available target against eager PyTorch on the real all-MiniLM-L6-v2 at batch 8, sequence 128, and the
cost of going through `compilers`: each compiled call vs the backend's own call on the same engine (target for
openvino-cpu-bf16: within 3%). One compilers.benchmark run: interleaved, every call timed, in one process.

    .venv/bin/python benchmarks/targets.py [--targets a,b] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compilers  # noqa: E402
import minilm  # noqa: E402

OV_RATIO_LIMIT = 1.03


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", help="comma-separated; default: every available built-in target")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    names = a.targets.split(",") if a.targets else [t.name for t in compilers.targets() if compilers.unavailable_reason(t) is None]
    parts = minilm.factory()
    model = parts["model"]
    compiled = {}
    for name in names:
        print(f"compiling {name}...", file=sys.stderr, flush=True)
        compiled[name] = compilers.compile(model, name, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                                           calibration=parts["calibration"], samples=parts["samples"])
    timed = compilers.benchmark(compiled, minilm.batch(8, 128), baseline=model, raw=True, min_time=2.0)
    print(f"\nall-MiniLM-L6-v2, batch 8, sequence 128\n{timed}")
    ok = True
    if "openvino-cpu-bf16" in compiled:
        ratio = timed.get("openvino-cpu-bf16").p50_ms / timed.get("openvino-cpu-bf16 raw").p50_ms
        ok = ratio <= OV_RATIO_LIMIT
        print(f"\nopenvino-cpu-bf16 through compilers / its own OpenVINO call = {ratio:.3f} "
              f"(limit {OV_RATIO_LIMIT}) {'OK' if ok else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps(timed.to_dict(), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
