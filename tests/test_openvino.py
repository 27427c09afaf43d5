"""OpenVINO targets: explicit precision, IR artifacts without fp16 compression, shape ranges, routes."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import compilers
from compilers.target import load_target
from conftest import NO_BF16, cpu_has_bf16

ov = pytest.importorskip("openvino")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.f(x).flatten(1))


@pytest.fixture(scope="module")
def convnet():
    return ConvNet().eval(), torch.randn(2, 3, 16, 16)


def test_fp32_target_runs_fp32_only(convnet):
    model, x = convnet
    cm = compilers.compile(model, "openvino-cpu", (x,))
    assert cm.report.route == "openvino-direct"
    assert cm.report.precisions and not {"bf16", "f16", "fp16"} & {p.lower() for p in cm.report.precisions}
    assert cm.report.validation.passed and cm.report.validation.outputs[0].max_abs < 1e-4
    assert "Convolution" in cm.report.executed


def test_bf16_target_runs_bf16_and_is_judged_by_cosine(convnet):
    if not cpu_has_bf16():
        pytest.skip(NO_BF16)
    model, x = convnet
    t = load_target("openvino-cpu-bf16")
    assert (t.tolerance.noise, t.tolerance.atol, t.tolerance.min_cosine) == (None, None, 0.99)
    cm = compilers.compile(model, t, (x,))
    assert "bf16" in {p.lower() for p in cm.report.precisions}
    out = cm.report.validation.outputs[0]
    assert out.cosine >= 0.99 and out.max_abs > 0   # really lossy, really within the cosine bound


def test_tight_cosine_bound_refuses_bf16(convnet):
    if not cpu_has_bf16():
        pytest.skip(NO_BF16)
    model, x = convnet
    with pytest.raises(compilers.ValidationError, match="cosine"):
        compilers.compile(model, load_target("openvino-cpu-bf16").with_(min_cosine=0.9999999999), (x,))


@pytest.mark.parametrize("target", ["openvino-cpu", "openvino-cpu-bf16"])
def test_ir_artifact_keeps_fp32_weights(convnet, tmp_path, target):
    model, x = convnet
    cm = compilers.compile(model, target, (x,))
    out = cm.save(tmp_path / "art")
    assert {p.name for p in out.iterdir()} == {"model.xml", "model.bin", "manifest.json"}
    consts = [layer.find("data").get("element_type") for layer in ET.parse(out / "model.xml").getroot().iter("layer")
              if layer.get("type") == "Const"]
    assert "f32" in consts and "f16" not in consts
    loaded = compilers.load(out)
    assert loaded.report.precisions == cm.report.precisions
    y = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(y)
    got = loaded(y)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert got.shape == ref.shape and cos > 0.99


def test_shape_ranges_become_partial_shapes(convnet):
    model, x = convnet
    t = load_target("openvino-cpu").with_(shapes={"x": {0: compilers.DimRange(min=1, max=4)}})
    cm = compilers.compile(model, t, (x,))
    assert str(cm.engine.compiled.inputs[0].get_partial_shape()) == "[1..4,3,16,16]"
    assert cm(torch.randn(4, 3, 16, 16)).shape == (4, 5)
    with pytest.raises(compilers.InputError, match="allowed 1..4"):
        cm(torch.randn(5, 3, 16, 16))


def test_options_reach_the_plugin(convnet):
    model, x = convnet
    t = load_target("openvino-cpu").with_(performance_hint="THROUGHPUT", threads=1)
    cm = compilers.compile(model, t, (x,))
    assert str(cm.engine.compiled.get_property("PERFORMANCE_HINT")) .endswith("THROUGHPUT")
    assert cm.engine.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    with pytest.raises(compilers.TargetError, match="choose one of"):
        compilers.compile(model, load_target("openvino-cpu").with_(performance_hint="FAST"), (x,))


def test_direct_import_failure_falls_back_to_onnx():
    class Diff(nn.Module):
        """aten::diff has no OpenVINO conversion rule (the same op stops GPT-2's direct import)."""

        def forward(self, x):
            return torch.diff(x, dim=-1) * 2

    cm = compilers.compile(Diff(), "openvino-cpu", (torch.randn(3, 6),))
    assert cm.report.attempts[0][0] == "openvino-direct"
    assert cm.report.route.startswith("onnx-")
    x = torch.randn(5, 6)
    torch.testing.assert_close(cm(x), torch.diff(x, dim=-1) * 2, atol=1e-5, rtol=1e-4)



# -- what the CPU plugin computes narrower than asked (found by probing, 2026-12-02) -----------------------
def test_int64_inputs_outside_int32_are_refused_not_wrapped():
    class Affine(torch.nn.Module):
        def forward(self, x):
            return x * 3 + 1

    cm = compilers.compile(Affine(), "openvino-cpu", (torch.tensor([[1, 2, 3]]),))
    x = torch.tensor([[5, -7, -2 ** 31]])
    torch.testing.assert_close(cm(x[:, :2].repeat(1, 2)[:, :3]), Affine()(x[:, :2].repeat(1, 2)[:, :3]))
    assert cm(x).shape == (1, 3)                              # int32's own limits are taken
    with pytest.raises(compilers.InputError, match=r"holds 1099511627777, outside int32"):
        cm(torch.tensor([[2 ** 40 + 1, 0, 3]]))              # was computed in int32, silently, before


def test_a_float64_model_is_refused_rather_than_run_in_float32():
    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(compilers.ExportError, match="computes float64 in float32"):
        compilers.compile(Double(), "openvino-cpu", (torch.randn(2, 3, dtype=torch.float64),))
