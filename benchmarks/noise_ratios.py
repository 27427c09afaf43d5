"""The evidence behind the fp32 noise rule's factor: compiled error / eager fp32 error, both against float64.

For correct compiles of the small models of the test suite (tests/test_models.py, tests/test_mutants.py) on
every fp32 target, and for the planted defects of tests/test_mutants.py, prints the largest ratio per
model and target, RMS and worst element. Correct compiles must sit well below the rule's factor (5 RMS,
10 worst element), defects well above.

    .venv/bin/python benchmarks/noise_ratios.py [--targets a,b]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import compilers  # noqa: E402
import test_models  # noqa: E402
import test_mutants  # noqa: E402


def ratios(result: compilers.ValidationReport, tol: compilers.Tolerance, failed_only: bool = False
           ) -> tuple[float, float] | None:
    """(RMS ratio, worst-element ratio) over the outputs judged by the noise rule (only the failed ones with
    `failed_only`); None where there is no such output."""
    rows = [o for o in result.outputs if o.rule == "noise" and o.noise and not (failed_only and o.passed)]
    if not rows:
        return None
    worst = max(rows, key=lambda o: o.error / o.noise)
    max_noise = max((o.max_allowed - tol.floor) / (2 * tol.noise) for o in rows)
    return worst.error / worst.noise, max(o.max_error for o in rows) / max_noise if max_noise > 0 else 0.0


def _case(case: test_models.Case) -> tuple:
    return case.model.eval(), case.example, case.dynamic_shapes, case.calls


def _subject(name: str) -> tuple:
    model, s = test_mutants.original(name)
    return model, s.example, s.dynamic_shapes, s.samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="ort-cpu,openvino-cpu,torchscript-cpu,inductor-cpu")
    a = ap.parse_args()
    targets = a.targets.split(",")
    print(f"{'kind':8s} {'model':36s} {'target':16s} {'RMS ratio':>10s} {'worst ratio':>12s}")
    correct, defects = [], []
    subjects = {name: (lambda make=make: _case(make())) for name, make in test_models.CASES.items()}
    subjects.update({f"mutation subject {name}": (lambda name=name: _subject(name)) for name in test_mutants.SUBJECTS})
    for name, make in subjects.items():
        for target in targets:
            torch.manual_seed(0)
            model, example, dynamic, calls = make()
            try:
                cm = compilers.compile(model, target, example, dynamic_shapes=dynamic, validate=False)
            except compilers.CompilerError as e:
                print(f"{'correct':8s} {name:36s} {target:16s} not compiled: {type(e).__name__}")
                continue
            r = ratios(compilers.validate(cm, model, [example, *calls]), cm.target.tolerance)
            if r:
                correct.append(r)
                print(f"{'correct':8s} {name:36s} {target:16s} {r[0]:10.2f} {r[1]:12.2f}", flush=True)
            else:
                print(f"{'correct':8s} {name:36s} {target:16s} exact (no output with fp32 noise)")
    for target in ("ort-cpu", "openvino-cpu"):
        for mutant in test_mutants.MUTANTS:
            _, how, result = test_mutants.run_mutant(target, mutant)
            r = ratios(result, compilers.load_target(target).tolerance, failed_only=True) if result is not None else None
            if r:
                defects.append(r)
                print(f"{'defect':8s} {mutant:36s} {target:16s} {r[0]:10.3g} {r[1]:12.3g}", flush=True)
            else:
                print(f"{'defect':8s} {mutant:36s} {target:16s} {how[:60]}")
    print(f"\ncorrect compiles: RMS ratio {min(c[0] for c in correct):.2f}-{max(c[0] for c in correct):.2f}, "
          f"worst element {min(c[1] for c in correct):.2f}-{max(c[1] for c in correct):.2f}")
    print(f"planted defects judged by the noise rule: the larger of the two ratios >= {min(max(d) for d in defects):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
