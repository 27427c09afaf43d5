"""Knowledge distillation on a real task (issue 22): the digits CNN (`calibration/digits.py`, real labels) as the
teacher, and a student with half its channels and hidden units (about a quarter of its FLOPs).

The student is trained with `compilers.optimize.distill` on the train split's images, in four ways: on the labels
alone (`alpha=0`: cross-entropy only, the same loop, batches and seed: a from-scratch baseline), distilled from the
teacher without labels, and distilled with labels (`alpha=0.5`); each from a random start and from the teacher's
own first channels (a crude structured prune, what `prune.py` makes properly). Test-split accuracy, mean (min-max)
over three seeds. Target (issue 22's "pruned and distilled"): from the teacher's channels, distilled with and
without labels, each within a point of the teacher (mean over the seeds). The random start is reported, not judged.

    .venv/bin/python benchmarks/distill.py [--epochs 20] [--seeds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
import digits  # noqa: E402
from compilers.bench import text_table  # noqa: E402
from compilers.optimize.distill import distill  # noqa: E402

ONE_POINT = 0.01


def student(seed: int) -> nn.Sequential:
    """digits.cnn() with half the channels and hidden units, randomly initialised."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


def sliced(teacher: nn.Sequential) -> nn.Sequential:
    """The student holding the teacher's first 8 / 16 channels and first 32 hidden units."""
    s = student(0)
    kept = torch.arange(32 * 4 * 4).reshape(32, 16)[:16].reshape(-1)   # Flatten's (channel, 4x4) features
    with torch.no_grad():
        for i, rows, cols in ((0, slice(8), slice(None)), (2, slice(16), slice(8)), (6, slice(32), kept),
                              (8, slice(None), slice(32))):
            s[i].weight.copy_(teacher[i].weight[rows][:, cols])
            s[i].bias.copy_(teacher[i].bias[rows])
    return s


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    splits = digits.split()
    teacher = digits.train(splits)

    def accuracy(model: nn.Module) -> float:
        return digits.accuracy(model, splits.test_x, splits.test_y)
    one = splits.test_x[:1]
    ratio = flops(student(0), one) / flops(teacher, one)
    print(f"digits: train {len(splits.train_y)} images, test {len(splits.test_y)}; student {ratio:.0%} of the "
          f"teacher's FLOPs ({1 - ratio:.0%} fewer); {args.epochs} epochs, batch 32, Adam lr 1e-3, T 2, seeds "
          f"0-{args.seeds - 1}")
    data = [(splits.train_x,)]
    ways = {"labels only (cross-entropy)": dict(labels=splits.train_y, alpha=0.0),
            "distilled, no labels": {},
            "distilled + labels (alpha 0.5)": dict(labels=splits.train_y, alpha=0.5)}
    starts = {"random": lambda seed: student(seed + 1), "teacher's first channels": lambda seed: sliced(teacher)}
    t = accuracy(teacher)
    rows = [["teacher (digits.cnn)", "", f"{t:.2%}", "", ""]]
    judged = {}
    for start, make in starts.items():
        if start != "random":
            rows.append(["student, untrained", start, f"{accuracy(make(0)):.2%}", "", ""])
        for way, options in ways.items():
            scores, seconds = [], []
            for seed in range(args.seeds):
                d = distill(teacher, make(seed), data, epochs=args.epochs, seed=seed, progress=False, **options)
                scores.append(accuracy(d.model))
                seconds.append(d.report.seconds)
            mean = statistics.mean(scores)
            if start != "random" and way != "labels only (cross-entropy)":
                judged[way] = mean
            rows.append([f"student, {way}", start, f"{mean:.2%}", f"{min(scores):.2%}-{max(scores):.2%}",
                         f"{statistics.mean(seconds):.1f}"])
    print("\n".join(text_table(["model", "start", "test accuracy", "min-max", "s per run"], rows, left=(0, 1))))
    ok = all(a >= t - ONE_POINT for a in judged.values())
    print(f"from the teacher's channels: {', '.join(f'{w} {a:.2%}' for w, a in judged.items())} vs teacher {t:.2%} "
          f"(need within 1 point): {'OK' if ok else 'MISSED'}; {time.perf_counter() - started:.0f} s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
