"""A smaller model, judged by your task metric: prune -> distill -> compile on the digits CNN
(`calibration/digits.py`: scikit-learn's 8x8 handwritten digits, real labels, no download).

`compile(prune=..., distill=...)` removes half the MACs (whole channels), trains the pruned model back towards
yours on unlabeled images, compiles it, and checks your metric at each step against your model's own score:
a smaller model that falls more than `max_drop` below it is refused, never returned.

    .venv/bin/python examples/optimize.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
import digits  # noqa: E402

import compilers  # noqa: E402

splits = digits.split()
model = digits.train(splits)                          # a small CNN, trained in a few seconds
example = (splits.test_x[:64],)                   # a batch of 64: what compile times the smaller model at
images = [(x,) for x in splits.train_x.split(64)]     # unlabeled: what pruning and distillation read

# the task metric: accuracy on labelled digits that neither training nor distillation sees
accuracy = compilers.Metric(lambda m: digits.accuracy(m, splits.calib_x, splits.calib_y), max_drop=0.01,
                            name="accuracy")

cm = compilers.compile(model, "ort-cpu", example, calibration=images, metric=accuracy,
                       prune={"flops": 0.5},     # half the MACs; widths kept multiples of 16 where that reaches it
                       distill={"epochs": 10, "progress": False})
report = str(cm.report).splitlines()
start = next(i for i, line in enumerate(report) if line.startswith("optimized"))
print("\n".join(report[start:start + 3]))
print(f"test accuracy: unpruned {digits.accuracy(model, splits.test_x, splits.test_y):.2%}, "
      f"pruned + distilled + compiled {digits.accuracy(cm, splits.test_x, splits.test_y):.2%}")

# ask for too much (80% of the MACs, no distillation, at most 0.1 point lost) and compile refuses
strict = compilers.Metric(accuracy.fn, max_drop=0.001, name="accuracy")
try:
    compilers.compile(model, "ort-cpu", example, calibration=images, metric=strict,
                      prune={"flops": 0.8, "importance": "magnitude"})
except compilers.ValidationError as e:
    print(f"refused: {e}")
