"""compile(prune=..., distill=...) (issue 22): prune -> distill -> compile, the task metric judged against the
unpruned model's own score at every step; a smaller model that misses it is refused, never returned. On the digits
CNN (real labels, calibration/digits.py) with ort-cpu."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import compilers
from compilers import InputError, Metric, ValidationError

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
import digits  # noqa: E402


@pytest.fixture(scope="module")
def task():
    splits = digits.split()
    model = digits.train(splits)
    accuracy = Metric(lambda m: digits.accuracy(m, splits.test_x, splits.test_y), max_drop=0.01, name="accuracy")
    data = [(x,) for x in splits.train_x.split(64)]
    return splits, model, accuracy, data


def test_pruned_distilled_and_compiled_keeps_the_metric_of_the_unpruned_model(task, tmp_path):
    splits, model, accuracy, data = task
    cm = compilers.compile(model, "ort-cpu", (splits.test_x[:4],), calibration=data, metric=accuracy,
                           prune={"flops": 0.5}, distill={"epochs": 6, "progress": False})
    o = cm.report.optimization
    scores = o["scores"]
    assert list(scores) == ["original", "pruned", "distilled", "compiled"]
    assert scores["original"] == digits.accuracy(model, splits.test_x, splits.test_y)
    assert scores["compiled"] == digits.accuracy(cm, splits.test_x, splits.test_y)     # the model returned
    assert scores["compiled"] >= scores["original"] - 0.01
    assert o["prune"]["macs_after"] <= 0.5 * o["prune"]["macs_before"]
    assert o["distill"]["steps"] > 0
    assert "optimized   pruned by taylor" in str(cm.report) and "accuracy: original" in str(cm.report)
    speed = o["speed"]       # timed against the unpruned model compiled for the same target, interleaved
    assert (speed["target"], speed["batch"]) == ("ort-cpu", 4) and speed["smaller_p50_ms"] > 0
    assert speed["speedup"] == pytest.approx(speed["unpruned_p50_ms"] / speed["smaller_p50_ms"])
    assert f"speed: {speed['speedup']:.2f}x the unpruned model on ort-cpu at batch 4" in str(cm.report)
    cm.save(tmp_path / "small")
    loaded = compilers.load(tmp_path / "small")
    assert loaded.report.optimization == o                                   # carried in the artifact
    assert digits.accuracy(loaded, splits.test_x, splits.test_y) == scores["compiled"]


def test_a_smaller_model_that_misses_the_metric_is_refused(task):
    splits, model, accuracy, data = task
    strict = Metric(accuracy.fn, max_drop=0.001, name="accuracy")
    with pytest.raises(ValidationError, match=r"misses metric 'accuracy' \(original 0\.\d+, pruned 0\.\d+;") as e:
        compilers.compile(model, "ort-cpu", (splits.test_x[:4],), calibration=data, metric=strict,
                          prune={"flops": 0.8, "importance": "magnitude"})
    assert "prune less, or distill longer" in str(e.value)


@pytest.mark.parametrize("options, message", [
    ({"prune": {"flops": 0.5}}, "prune= needs metric="),
    ({"distill": {"epochs": 1}, "metric": True}, "distill= trains a pruned model back towards yours"),
    ({"prune": {"flops": 0.5}, "distill": {"epochs": 1}, "metric": True, "calibration": None},
     "distill= trains on calibration="),
])
def test_what_the_stage_needs_is_asked_for_by_name(task, options, message):
    splits, model, accuracy, data = task
    options = {"calibration": data, **options}
    if options.pop("metric", False):
        options["metric"] = accuracy
    with pytest.raises(InputError, match=message):
        compilers.compile(model, "ort-cpu", (splits.test_x[:4],), **options)
