"""What the model asks for is what the engine computes: operator variants and roundings that a backend's
graph passes must keep (or refuse with the reason), checked by compiling small models on the real backends."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compilers
from conftest import assert_same_output


class TanhGeluMLP(nn.Module):
    """Linear -> GELU(approximate="tanh") -> Linear on (batch, seq, features): exported as MatMul, bias Add, Gelu."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = nn.Linear(16, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def _bert_with_one_tanh_gelu_layer() -> nn.Module:
    """A BERT whose first layer uses the tanh GELU ("gelu_pytorch_tanh") and the others the exact one."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    model = BertModel(config)
    tanh = BertModel(BertConfig(**{**config.to_dict(), "hidden_act": "gelu_pytorch_tanh"}))
    model.encoder.layer[0].intermediate.intermediate_act_fn = tanh.encoder.layer[0].intermediate.intermediate_act_fn
    return model.eval()


def test_ort_keeps_the_tanh_gelu_through_the_bias_gelu_fusion():
    pytest.importorskip("onnxruntime")
    model, x = TanhGeluMLP().eval(), 3 * torch.randn(2, 5, 16)
    cm = compilers.compile(model, "ort-cpu", (x,))
    assert cm.report.validation.passed
    assert "BiasGelu" not in cm.report.fused      # the exact-GELU kernel would compute erf, not tanh
    y = 3 * torch.randn(3, 5, 16)
    assert_same_output(cm(y), model(y), atol=2e-5, rtol=1e-4)


def test_ort_bert_with_a_tanh_gelu_layer_compiles_and_keeps_each_gelu():
    pytest.importorskip("transformers")
    model = _bert_with_one_tanh_gelu_layer()
    ids = torch.randint(1, 100, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cm = compilers.compile(model, "ort-cpu", inputs,
                           dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    assert cm.report.validation.passed
    assert cm.report.fused.get("BiasGelu") == 1 and cm.report.fused.get("FastGelu") == 1   # erf layer, tanh layer


class RoundsThrough(nn.Module):
    """Linear -> a round trip through a narrower float type the model asks for (`x.half().float()`) -> Linear."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.dtype, self.up, self.down = dtype, nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x).to(self.dtype).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_openvino_keeps_the_rounding_the_model_asks_for(dtype, tmp_path):
    pytest.importorskip("openvino")
    model, x = RoundsThrough(dtype).eval(), 3 * torch.randn(4, 16)
    with torch.no_grad():   # the round trip matters: without it the outputs differ beyond the fp32 tolerance
        assert (model.down(model.up(x)) - model(x)).abs().max() > 1e-4
    cm = compilers.compile(model, "openvino-cpu", (x,))
    assert cm.report.validation.passed
    y = 3 * torch.randn(5, 16)
    assert_same_output(cm(y), model(y), atol=1e-6, rtol=1e-6)
    cm.save(tmp_path / "m")
    assert_same_output(compilers.load(tmp_path / "m")(y), model(y), atol=1e-6, rtol=1e-6)


def _f32_values() -> torch.Tensor:
    """float32 values across the whole range, each sign: ties of f16 and bf16 rounding and their neighbours in
    every binade, subnormals, the edges of f16's range, infinities and NaN."""
    bits = torch.arange(0, 255, dtype=torch.int32) << 23     # each binade's start, subnormals' first
    offsets = torch.tensor([0, 1, 2, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x18000,
                            0x7FFFFF], dtype=torch.int32)     # the f16 and bf16 ties are at 0x1000 and 0x8000 ulps
    x = (bits[:, None] + offsets).flatten().view(torch.float32)
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -149,
                          float("inf"), float("nan")])
    draw = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, generator=draw) * 10.0 ** torch.randint(-30, 30, (4096,), generator=draw).float()
    x = torch.cat([x, spread, edges])
    return torch.cat([x, -x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_openvino_rounding_is_exactly_the_conversion(dtype):
    ov = pytest.importorskip("openvino")
    from compilers.backends.openvino.rounding import keep_roundings
    narrow = {torch.float16: ov.Type.f16, torch.bfloat16: ov.Type.bf16}[dtype]
    x = ov.opset13.parameter([-1], ov.Type.f32)
    round_trip = ov.Model([ov.opset13.convert(ov.opset13.convert(x, narrow), ov.Type.f32)], [x])
    kept, covered = keep_roundings(round_trip)
    assert dict(covered) == {narrow.get_type_name(): 1}
    compiled = ov.Core().compile_model(kept, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    values = _f32_values()
    got, want = torch.from_numpy(compiled(values.numpy())[0]), values.to(dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
