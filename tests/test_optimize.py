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


def test_a_text_pipeline_is_pruned_distilled_and_compiled_with_its_steps(tmp_path):
    """A Pipeline (tokenizer + tiny BERT + mean pooling + normalize): its module loses half the heads of each
    layer, is distilled on the tensors the tokenizer makes of the calibration texts, and compiles with the steps;
    the metric scores pipelines (texts in) at every step."""
    pytest.importorskip("tokenizers")
    from test_pipeline_text import SENTENCES, encoder
    from torch.nn import functional as F

    from compilers.pipeline import CompiledPipeline
    pipe = encoder()
    teacher = pipe(SENTENCES)["embedding"]
    cosine = Metric(lambda p: F.cosine_similarity(p(SENTENCES)["embedding"], teacher).mean().item(), max_drop=0.5,
                    name="cosine")
    batches = [SENTENCES[i:i + 4] for i in range(0, len(SENTENCES), 4)]
    cm = compilers.compile(pipe, "ort-cpu", SENTENCES[:4], calibration=batches, metric=cosine,
                           prune={"heads": 0.5}, distill={"epochs": 3, "progress": False})
    assert isinstance(cm, CompiledPipeline) and cm(["the cat sat"])["embedding"].shape == (1, 32)
    o = cm.report.optimization
    heads = [(layer["kept"], layer["total"]) for layer in o["prune"]["layers"] if layer["unit"] == "heads"]
    assert heads == [(1, 2)] * 2 and o["prune"]["params_after"] < o["prune"]["params_before"]
    assert o["scores"]["original"] == pytest.approx(1.0) and o["scores"]["compiled"] == cosine.fn(cm)   # what returned
    assert list(o["scores"]) == ["original", "pruned", "distilled", "compiled"] and o["distill"]["steps"] > 0
    assert o["speed"]["batch"] == 4 and o["speed"]["speedup"] > 0
    cm.save(tmp_path / "small")
    loaded = compilers.load(tmp_path / "small")
    assert isinstance(loaded, CompiledPipeline) and loaded.report.optimization == o
    assert cosine.fn(loaded) == o["scores"]["compiled"]
