"""OpenVINO targets: explicit precision, IR artifacts without fp16 compression, shape ranges, routes."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
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
def _exact_or_refused(cm, model, *inputs) -> bool:
    """Whether `cm` refused the call (InputError); if it answered, the answer must be eager's."""
    try:
        got = cm(*inputs)
    except compilers.InputError:
        return True
    torch.testing.assert_close(got, model(*inputs), rtol=0, atol=0)
    return False


class Affine(nn.Module):
    def forward(self, x):
        return x * 3 + 1


def test_int64_inputs_outside_int32_are_refused_not_wrapped(tmp_path):
    built = compilers.compile(Affine(), "openvino-cpu", (torch.tensor([[1, 2, 3]]),))
    assert any("checked on every call" in note for note in built.report.notes)
    for cm in (built, compilers.load(built.save(tmp_path / "affine"))):     # the check is rebuilt from the IR
        assert not _exact_or_refused(cm, Affine(), torch.tensor([[5, -7, 715827882]]))   # 3x + 1 = 2**31 - 1
        assert not _exact_or_refused(cm, Affine(), torch.tensor([[-715827882, 0, 1]]))    # 3x = -2**31 + 2
        # inside int32, but 3x + 1 is not: the plugin answered -2147483647 where eager gives -6442450943
        with pytest.raises(compilers.InputError, match=r"Multiply .* values in \[-6442450944, 15\].* int64 in int32"):
            cm(torch.tensor([[5, -7, -2 ** 31]]))
        with pytest.raises(compilers.InputError, match="Multiply"):      # what a server checks per request
            cm.check_inputs([np.array([[5, -7, -2 ** 31]])])
        with pytest.raises(compilers.InputError, match=r"holds 1099511627777, outside int32"):
            cm(torch.tensor([[2 ** 40 + 1, 0, 3]]))              # was computed in int32, silently, before


def test_int64_arithmetic_leaving_int32_is_refused_whatever_route():
    """x * 4 at x = 2**30: an input inside int32 whose product is not (the plugin answered 0); and after
    torch.diff, which sends the model through ONNX, the same check holds."""
    class Times4(nn.Module):
        def forward(self, x):
            return x * 4

    class Diff(nn.Module):
        def forward(self, x):
            return torch.diff(x, dim=-1) * 2

    for model in (Times4(), Diff()):
        cm = compilers.compile(model, "openvino-cpu", (torch.tensor([[1, 2, 3]]),))
        assert not _exact_or_refused(cm, model, torch.tensor([[5, -7, 2 ** 28]]))
        assert _exact_or_refused(cm, model, torch.tensor([[2 ** 30, 0, -2 ** 30]]))
    assert cm.report.route.startswith("onnx-")


def test_an_integer_sum_past_float32s_integers_is_refused():
    """The plugin sums integers in float32: 2**24 + 1 and 2 summed to 16777218, eager 16777219."""
    class Total(nn.Module):
        def forward(self, x):
            return x.sum(1)

    cm = compilers.compile(Total(), "openvino-cpu", (torch.tensor([[1, 2, 3]]),),
                           dynamic_shapes={"x": {0: "batch", 1: "n"}})
    assert not _exact_or_refused(cm, Total(), torch.tensor([[2 ** 22, 2 ** 22, 2 ** 22, 2 ** 22]]))   # sum 2**24
    with pytest.raises(compilers.InputError, match=r"n=2\) make ReduceSum .* in float32"):
        cm(torch.tensor([[2 ** 24 + 1, 2]]))


def test_integer_floor_division_is_refused_where_the_plugin_truncates():
    """torch's // floors; the plugin's Divide truncates: -7 // 2 came back -3 where eager gives -4."""
    class Halve(nn.Module):
        def forward(self, x):
            return x // 2

    cm = compilers.compile(Halve(), "openvino-cpu", (torch.tensor([[1, 8, 3]]),))
    assert not _exact_or_refused(cm, Halve(), torch.tensor([[7, 0, 12345]]))
    with pytest.raises(compilers.InputError, match="truncates where the operands' signs differ"):
        cm(torch.tensor([[-7, 0, 3]]))


def test_an_index_only_input_keeps_only_the_int32_check():
    """input_ids that only index an embedding, an attention mask only multiplied in float: no integer arithmetic,
    so nothing more is checked per call than before (their int32 range), at any value an index can take."""
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(100, 8)

        def forward(self, input_ids, attention_mask):
            return (self.emb(input_ids) * attention_mask[..., None]).sum(1)

    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    cm = compilers.compile(Pooled(), "openvino-cpu", (ids, mask), dynamic_shapes=dyn)
    assert cm.engine.integers.steps == () and len(cm.engine.integers.inputs) == 2
    ids, mask = torch.randint(0, 100, (4, 300)), torch.randint(0, 2, (4, 300))
    torch.testing.assert_close(cm(ids, mask), Pooled()(ids, mask), atol=1e-4, rtol=1e-4)


def test_a_mask_summed_over_a_long_sequence_is_accepted():
    """attention_mask.sum(1) and a position count (cumsum) at realistic sizes are exact, and accepted."""
    class Lengths(nn.Module):
        def forward(self, input_ids, attention_mask):
            positions = attention_mask.cumsum(1) * attention_mask + 1     # RoBERTa's position ids
            return attention_mask.sum(1), positions, input_ids.ne(0).sum(-1)

    ids, mask = torch.randint(1, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    cm = compilers.compile(Lengths(), "openvino-cpu", (ids, mask), dynamic_shapes=dyn)
    assert {s.kind for s in cm.engine.integers.steps} >= {"ReduceSum", "CumSum"}
    ids, mask = torch.randint(0, 50000, (16, 4096)), torch.ones(16, 4096, dtype=torch.int64)
    mask[1:, 3000:] = 0
    assert not _exact_or_refused(cm, Lengths(), ids, mask)


def _one_op(make, *arrays):
    """What the CPU plugin computes for the one-op model `make(*parameters)` on `arrays`."""
    import openvino.opset13 as ops
    params = [ops.parameter(list(a.shape), a.dtype) for a in arrays]
    compiled = ov.Core().compile_model(ov.Model([make(*params)], params), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(list(arrays))[0]


def _i64(*values):
    return np.array(values, np.int64)


def _facts():
    """op type -> (builder, numpy reference, operands it computes exactly, operands it does not or None)."""
    import openvino.opset13 as ops
    c = lambda v: ops.constant(np.array(v, np.int64))   # noqa: E731
    big = _i64(2 ** 24 + 1, 2 ** 25 + 3, 123456789, -987654321, 7, 0)   # past float32's integers, inside int32
    near = _i64(2 ** 24, 2 ** 24 - 1, -2 ** 24, -2 ** 24 + 3, 7, 0)    # float32's own
    off = near + _i64(0, 1, 0, -1, 1, 0)
    past = _i64(2 ** 24 + 1, 2 ** 24 + 3, 5, 7, 1, 0)
    return {
        # int32 arithmetic: exact past float32's integers
        "Add": (ops.add, np.add, (big // 2, big[::-1] // 2), None),
        "Subtract": (ops.subtract, np.subtract, (big // 2, big[::-1] // 2), None),
        "Multiply": (ops.multiply, np.multiply, (big // 8, _i64(3, -2, 4, 2, 5, 9)), None),
        "Maximum": (ops.maximum, np.maximum, (big, big[::-1]), None),
        "Minimum": (ops.minimum, np.minimum, (big, big[::-1]), None),
        "SquaredDifference": (ops.squared_difference, lambda x, y: (x - y) ** 2, (big // 8, big // 8 + 3), None),
        "BitwiseAnd": (ops.bitwise_and, np.bitwise_and, (big, big[::-1]), None),
        "Negative": (ops.negative, np.negative, (big,), None),
        "Abs": (ops.abs, np.abs, (big,), None),
        "CumSum": (lambda p: ops.cumsum(p, c(0)), np.cumsum, (big // 8,), None),
        "Clamp": (lambda p: ops.clamp(p, -2 ** 24, 2 ** 25), lambda x: np.clip(x, -2 ** 24, 2 ** 25), (big,), None),
        "ReduceProd": (lambda p: ops.reduce_prod(p, c([0])), lambda x: np.prod(x, keepdims=False)[None][0],
                       (_i64(4097, 4099, 1, 1, 1, 1),), None),
        # moves
        "Concat": (lambda p, q: ops.concat([p, q], 0), lambda x, y: np.concatenate([x, y]), (big, big[::-1]), None),
        "Gather": (lambda p: ops.gather(p, c([3, 1, 0]), c(0)), lambda x: x[[3, 1, 0]], (big,), None),
        "Select": (lambda p, q: ops.select(ops.greater(p, c(0)), p, q), lambda x, y: np.where(x > 0, x, y),
                   (big, big[::-1]), None),
        "TopK": (lambda p: ops.topk(p, c(3), 0, "max", "value").output(0), lambda x: -np.sort(-x)[:3], (big,), None),
        "Convert": (lambda p: ops.convert(p, np.int32), lambda x: x.astype(np.int32), (big,), None),
        # float32 arithmetic: exact on float32's integers, not past them
        "Divide": (lambda p, q: _truncating(ops.divide(p, q)), _trunc_div, (near, _i64(3, -7, 5, 2 ** 24, 1, 9)),
                   (past, _i64(3, 1, 1, 1, 1, 1))),
        "FloorMod": (ops.floor_mod, np.mod, (near // 2, _i64(3, -7, 2 ** 23, -(2 ** 23), 2, 9)),
                     (past, _i64(3, 5, 7, 2, 1, 1))),
        "Equal": (ops.equal, np.equal, (near, off), (past, past - _i64(1, 0, 0, 0, 0, 0))),
        "Less": (ops.less, np.less, (near, off), (past - _i64(1, 0, 0, 0, 0, 0), past)),
        "Greater": (ops.greater, np.greater, (off, near), (past, past - _i64(1, 0, 0, 0, 0, 0))),
        "ReduceSum": (lambda p: ops.reduce_sum(p, c([0])), lambda x: x.sum(),
                      (_i64(2 ** 23, 2 ** 22, 2 ** 22 - 1, -1, 1, 0),), (_i64(2 ** 24, 1, 2, 0, 0, 0),)),
        "ReduceMax": (lambda p: ops.reduce_max(p, c([0])), lambda x: x.max(), (near,), (past,)),
        "ReduceMin": (lambda p: ops.reduce_min(p, c([0])), lambda x: x.min(), (near,), (-past,)),
        "MatMul": (lambda p: ops.matmul(p, c(np.ones(6, np.int64)), False, False), lambda x: x @ np.ones(6, np.int64),
                   (_i64(2 ** 23, 2 ** 22, 2 ** 22 - 1, -1, 1, 0),), (_i64(2 ** 24, 1, 2, 0, 0, 0),)),
        "Power": (lambda p: ops.power(p, c(2)), np.square, (_i64(4096, -4096, 4095, 3, 0, 1),),
                  (_i64(4097, 46339, 1, 1, 1, 1),)),
    }


def _truncating(divide):
    divide.set_attribute("m_pythondiv", False)
    return divide


def _trunc_div(a, b):
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) ^ (b < 0), -q, q)


@pytest.mark.parametrize("kind", list(_facts()))
def test_the_plugin_computes_integers_as_integers_py_says(kind):
    """The facts the per-call integer check rests on, op by op: int32 arithmetic and moves are exact past float32's
    integers, float32 arithmetic is exact within +-2**24 and wrong past it. A failure means this OpenVINO computes
    otherwise than the tables in integers.py say: move the op to the table that now holds."""
    from compilers.backends.openvino import integers
    make, reference, exact, inexact = _facts()[kind]
    table = integers.WRAPS if kind in integers.WRAPS else integers.MOVES if kind in integers.MOVES else integers.IN_F32
    assert kind in table and (inexact is None) == (table is not integers.IN_F32)
    np.testing.assert_array_equal(_one_op(make, *exact), reference(*exact))
    if inexact is not None:
        assert not np.array_equal(_one_op(make, *inexact), reference(*inexact))


def test_the_plugin_truncates_integer_floor_division():
    import openvino.opset13 as ops
    a, b = _i64(-7, 7, -7, 5), _i64(2, -2, -2, -7)
    np.testing.assert_array_equal(_one_op(ops.divide, a, b), _i64(-3, -3, 3, 0))     # eager's a // b: -4 -4 3 -1
    np.testing.assert_array_equal(_one_op(ops.divide, np.abs(a), np.abs(b)), np.abs(a) // np.abs(b))


def test_the_plugin_clamps_integers_to_float32_bounds():
    import openvino.opset13 as ops
    x = _i64(2 ** 25 + 7, 2 ** 25 + 1, 2 ** 24 + 1, -2 ** 25 - 7)
    np.testing.assert_array_equal(_one_op(lambda p: ops.clamp(p, -2 ** 25 - 1, 2 ** 25 + 1), x),
                                  _i64(2 ** 25, 2 ** 25, 2 ** 24 + 1, -2 ** 25))   # eager: 2**25 + 1, ..., -2**25 - 1


def test_an_int64_constant_past_int32_is_refused_at_compile():
    """The plugin saturates int64 constants to int32: where the mask is 0 this gave -2**31, eager -2**63. The
    examples never take that branch, so validation could not see it."""
    class Fill(nn.Module):
        def forward(self, x, mask):
            return torch.where(mask > 0, x, torch.iinfo(torch.int64).min)

    with pytest.raises(compilers.ExportError, match=r"Select .* \[-9223372036854775808, 0\] even on inputs of zeros"):
        compilers.compile(Fill(), "openvino-cpu", (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]])))


def test_arithmetic_on_integers_converted_from_float_is_refused_at_compile():
    """(x * 1000).long() * 3 has no range the inputs bound: refused with the op and the conversion named."""
    class Scaled(nn.Module):
        def forward(self, x):
            return (x * 1000).long() * 3

    with pytest.raises(compilers.ExportError, match=r"Multiply .* conversion .* from f32.* ort-cpu"):
        compilers.compile(Scaled(), "openvino-cpu", (torch.randn(2, 3),))


def test_a_float64_model_is_refused_rather_than_run_in_float32():
    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(compilers.ExportError, match="computes float64 in float32"):
        compilers.compile(Double(), "openvino-cpu", (torch.randn(2, 3, dtype=torch.float64),))
