"""Int8 on a real task (issue 7): a CNN trained on scikit-learn's digits, calibrated on its own calibration
split, keeps its test-set accuracy (argmax vs the labels) within one point of fp32 on both int8 targets."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import compilers
from compilers.target import load_target

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
import digits  # noqa: E402

ONE_POINT = 0.01


@pytest.fixture(scope="module")
def trained():
    splits = digits.split()
    model = digits.train(splits)
    return splits, model, (splits.test_x[:4],)


def compiled(trained, target):
    reason = compilers.unavailable_reason(load_target(target))
    if reason:
        pytest.skip(reason)
    splits, model, example = trained
    return compilers.compile(model, target, example, calibration=digits.calibration_samples(splits),
                             samples=[(x,) for x in splits.test_x.split(135)])


@pytest.fixture(scope="module")
def fp32(trained):
    splits, model, _ = trained
    eager = digits.accuracy(model, splits.test_x, splits.test_y)
    cm = compiled(trained, "ort-cpu")
    return eager, digits.accuracy(cm, splits.test_x, splits.test_y)


def test_recipe_trains_a_real_classifier(fp32):
    eager, ort = fp32
    assert eager >= 0.95
    assert ort == eager


@pytest.mark.parametrize("target", ["openvino-cpu-int8", "ort-cpu-int8"])
def test_int8_keeps_test_accuracy_within_one_point(trained, fp32, target):
    if target.startswith("openvino"):
        pytest.importorskip("nncf")
    splits = trained[0]
    cm = compiled(trained, target)
    r = cm.report
    if target.startswith("openvino"):
        assert {"i8", "u8"} & set(r.precisions) and "bf16" not in r.precisions
    else:
        assert {"QLinearConv", "QGemm"} <= set(r.fused)
    assert r.validation.passed and r.validation.outputs[0].error > 1e-4   # really quantized, beyond fp32 noise
    int8 = digits.accuracy(cm, splits.test_x, splits.test_y)
    assert int8 >= fp32[0] - ONE_POINT, f"{target}: int8 test accuracy {int8:.4f}, fp32 {fp32[0]:.4f}"


def test_task_metric_is_part_of_the_contract(trained):
    """compile(metric=...): the user's task accuracy must stay within max_drop of eager's, beside the cosine."""
    splits, model, example = trained

    def accuracy(run) -> float:
        return digits.accuracy(run, splits.test_x, splits.test_y)
    calib = digits.calibration_samples(splits)
    cm = compilers.compile(model, "ort-cpu-int8", example, calibration=calib,
                           metric=compilers.Metric(accuracy, max_drop=ONE_POINT, name="test accuracy"))
    m = cm.report.validation.metric
    assert m.passed and m.name == "test accuracy" and m.eager >= 0.95 and m.compiled >= m.eager - ONE_POINT
    assert "test accuracy:" in str(cm.report) and cm.report.to_dict()["validation"]["metric"]["eager"] == m.eager
    with pytest.raises(compilers.ValidationError, match=r"must gain: .* FAIL"):
        compilers.compile(model, "ort-cpu", example, metric=compilers.Metric(accuracy, max_drop=-0.5, name="must gain"))
    with pytest.raises(compilers.InputError, match="metric 'broken' failed on eager: ZeroDivisionError"):
        compilers.compile(model, "ort-cpu", example, metric=compilers.Metric(lambda run: 1 / 0, name="broken"))
