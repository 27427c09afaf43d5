"""auto-cpu and auto-cpu-lossy pick the fastest valid target.

For MiniLM-L6 (real weights, batch 8, sequence 128) and ResNet-50 (random init, batch 8): compile with the
auto target (which compiles, validates and times every candidate), then time its choice again together with
every candidate that passed validation, in a fresh compilers.benchmark run. Target: the choice's p50 is within
3% of the fastest valid candidate's in that run, for auto-cpu (fp32 candidates) and auto-cpu-lossy (bf16 and
int8 too, with the calibration data), and the choice passed validation.

    .venv/bin/python benchmarks/auto.py [--models minilm,resnet50]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
from compilers.report import candidates_table  # noqa: E402
from timing import resnet50_setup, run_checks  # noqa: E402

LIMIT = 1.03
VALID = ("chosen", "valid")


def check(label: str, model, example, x, **kw) -> tuple[bool, list[str]]:
    """Both auto targets on one model; the candidates' builds are shared through a cache directory."""
    ok, lines = True, [label]
    with tempfile.TemporaryDirectory(prefix="auto-bench-") as cache:
        for auto in ("auto-cpu", "auto-cpu-lossy"):
            cm = compilers.compile(model, auto, example, cache_dir=cache, **kw)
            table = cm.report.candidates
            lines.append(f"  {auto}: chose {cm.target.name}")
            lines += ["    " + l for l in candidates_table(table).splitlines()]
            valid = [c["target"] for c in table if c["verdict"] in VALID]
            rivals = {name: compilers.compile(model, name, example, cache_dir=cache, **kw) for name in valid}
            timed = compilers.benchmark(rivals, x, min_time=3.0)
            fastest = timed.fastest(valid)
            ratio = timed.get(cm.target.name).p50_ms / timed.get(fastest).p50_ms
            passed = ratio <= LIMIT and cm.report.validation.passed
            ok &= passed
            lines.append(f"    re-timed together: " + ", ".join(f"{n} {timed.get(n).p50_ms:.1f} ms" for n in valid))
            lines.append(f"    {auto}: {cm.target.name} p50 / fastest valid ({fastest}) p50 = {ratio:.3f} "
                         f"(limit {LIMIT}), validation {'passed' if cm.report.validation.passed else 'FAILED'}: "
                         f"{'OK' if passed else 'MISSED'}")
    return ok, lines


def minilm() -> tuple[bool, list[str]]:
    import minilm as m
    parts = m.factory()
    x = m.batch(8, 128)      # the example is the shape to optimise for
    return check("MiniLM-L6 b8 s128", parts["model"], x, x,
                 dynamic_shapes=parts["dynamic_shapes"], calibration=parts["calibration"], samples=parts["samples"])


def resnet50() -> tuple[bool, list[str]]:
    model, calib, samples, x = resnet50_setup()
    return check("ResNet-50 b8 224x224", model, (x,), (x,), calibration=calib, samples=samples)


if __name__ == "__main__":
    sys.exit(run_checks(__doc__, {"minilm": minilm, "resnet50": resnet50}))
