"""Which pruning criterion keeps the most accuracy (issue 22): the digits CNN (calibration/digits.py, real
labels) pruned to at least 50% fewer MACs by each criterion of `compilers.optimize.prune`, test accuracy with no
retraining and after a short fine-tune (plain cross-entropy on the train split). The evidence behind prune's
default criterion; exits 1 when a run removes less than half the MACs or the default is not the best
before retraining.

    .venv/bin/python benchmarks/prune.py
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
import digits  # noqa: E402

from compilers.bench import text_table  # noqa: E402
from compilers.optimize.prune import prune  # noqa: E402

FLOPS = 0.5
EPOCHS = 5


def fine_tune(model: nn.Module, splits: digits.Splits, epochs: int = EPOCHS) -> nn.Module:
    """`model` trained `epochs` more on the train split (one thread, fixed order: reproducible)."""
    return digits.train(splits, epochs=epochs, model=model)


def main() -> None:
    splits = digits.split()
    model = digits.train(splits)
    calibration = digits.calibration_samples(splits)
    example = (splits.calib_x[:8],)

    def acc(m: nn.Module) -> float:
        return digits.accuracy(m, splits.test_x, splits.test_y)

    rows = [["(unpruned)", "0.0%", "0.0%", f"{acc(model):.2%}", ""]]
    runs = [("magnitude", None, "magnitude"), ("taylor", None, "taylor"), ("activation", None, "activation"),
            ("taylor, loss = output energy", lambda y: 0.5 * y.pow(2).mean(), "taylor")]
    pruned_acc, removed = {}, {}
    for name, loss, criterion in runs:
        pruned = prune(model, example, flops=FLOPS, importance=criterion, calibration=calibration, loss=loss)
        r = pruned.report
        pruned_acc[name], removed[name] = acc(pruned.model), r.flops_removed
        rows.append([name, f"{r.flops_removed:.1%}", f"{r.params_removed:.1%}", f"{pruned_acc[name]:.2%}",
                     f"{acc(fine_tune(pruned.model, splits)):.2%}"])
    print(f"digits CNN, {len(splits.test_y)} test digits; pruned to >= {FLOPS:.0%} fewer MACs, "
          f"{len(splits.calib_y)} calibration digits; fine-tune = {EPOCHS} epochs on {len(splits.train_y)}")
    print("\n".join(text_table(["criterion", "MACs removed", "params removed", "test acc", "fine-tuned"], rows,
                               left=(0,))))
    default = inspect.signature(prune).parameters["importance"].default
    ok = all(f >= FLOPS for f in removed.values()) and max(pruned_acc, key=pruned_acc.get) == default
    print(f"every run removed >= {FLOPS:.0%} of the MACs; the default criterion {default!r} keeps the most "
          f"accuracy before retraining: {'OK' if ok else 'MISSED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
