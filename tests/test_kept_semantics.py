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
