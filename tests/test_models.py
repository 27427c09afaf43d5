"""The call contract on real model families: `cm(...)` returns what `model(...)` returns.

Each case compiles a small randomly initialised model once, then checks it against eager on fresh
inputs of *other* sizes than the example (type, pytree structure, dtype, shape and values per leaf),
again with numpy inputs (numpy in -> numpy out), and again after save + load. No weights are
downloaded: Hugging Face models are built from small random configs.

Add a target to TARGETS (or parametrize a backend's own test module over CASES) to run every case on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import compilers
from conftest import assert_same_output, to_numpy

TARGETS = ["ort-cpu"]


@dataclass
class Case:
    """A model, how to compile it, and fresh inputs (in example_inputs form) to call it with afterwards."""

    model: torch.nn.Module
    example: Any
    calls: list[Any]
    dynamic_shapes: dict[str, dict[int, str]] | None = None
    compile_kwargs: dict[str, Any] = field(default_factory=dict)


def call(fn: Callable, inputs: Any) -> Any:
    """fn called the way example_inputs describe: tuple = positional, dict = keyword, else one argument."""
    if isinstance(inputs, tuple):
        return fn(*inputs)
    if isinstance(inputs, dict):
        return fn(**inputs)
    return fn(inputs)


def _padded(batch: int, seq: int, vocab: int = 100) -> dict[str, torch.Tensor]:
    """input_ids and an attention_mask whose rows after the first are right-padded with zeros."""
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for row in range(1, batch):
        mask[row, max(1, seq - 2 * row):] = 0
    return {"input_ids": ids, "attention_mask": mask}


# -- the models ------------------------------------------------------------------------------------

def bert() -> Case:
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return Case(BertModel(config), _padded(2, 8), [_padded(3, 11), _padded(1, 5), _padded(4, 16)], dyn)


def gpt2() -> Case:
    # use_cache=False in the *config*, not in the example kwargs: with it in example_inputs it would be a
    # compiled-in constant that every later call must repeat (use_cache=False); in the config, the compiled
    # model is called exactly like the eager one (input_ids, attention_mask) and both return logits only.
    # With caching on, the output would hold a transformers Cache object, which is not a tensor pytree.
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return Case(GPT2LMHeadModel(config), _padded(2, 8), [_padded(3, 12), _padded(1, 4)], dyn)


def vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=5)
    return Case(ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 32, 32)},
                [{"pixel_values": torch.randn(3, 3, 32, 32)}, {"pixel_values": torch.randn(1, 3, 32, 32)}])


def resnet() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                          layer_type="basic", num_labels=5)
    model = ResNetForImageClassification(config)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return Case(model, (torch.randn(2, 3, 32, 32),), [(torch.randn(3, 3, 32, 32),), (torch.randn(1, 3, 32, 32),)])


class LSTMTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(input_size=8, hidden_size=16, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.lstm(x)  # output, (h_n, c_n)


def lstm() -> Case:
    return Case(LSTMTagger(), torch.randn(2, 5, 8), [torch.randn(3, 9, 8), torch.randn(1, 2, 8)],
                {"x": {0: "batch", 1: "seq"}})


class NestedOutputs(torch.nn.Module):
    """int64 inputs (an embedding lookup) in; a dict of tuples of lists with float, int64 and bool leaves out."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 6)
        self.proj = torch.nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> dict[str, Any]:
        e = self.emb(ids)                              # (B, L, 6) float32
        pooled = self.proj(e).mean(dim=1)              # (B, 3) float32
        shifted = ids + offsets[:, None]               # (B, L) int64
        return {"a": (pooled, [e, shifted]), "b": ids % 2 == 0}


def nested() -> Case:
    def inputs(b, l):
        return torch.randint(0, 50, (b, l)), torch.randint(-5, 5, (b,))
    return Case(NestedOutputs(), inputs(2, 7), [inputs(3, 4), inputs(1, 10)],
                {"ids": {0: "batch", 1: "seq"}, "offsets": {0: "batch"}})


class TopK(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = torch.topk(x * 2.0, k=3, dim=-1)
        return values, indices


def topk() -> Case:
    return Case(TopK(), torch.randn(2, 10), [torch.randn(5, 10), torch.randn(1, 10)])


CASES = {"bert": bert, "gpt2": gpt2, "vit": vit, "resnet": resnet, "lstm": lstm, "nested": nested, "topk": topk}


# -- the contract ----------------------------------------------------------------------------------

def check_calls(cm: Any, model: torch.nn.Module, calls: list[Any]) -> None:
    for inputs in calls:
        with torch.no_grad():
            ref = call(model, inputs)
        assert_same_output(call(cm, inputs), ref)
        numpy_inputs = to_numpy(inputs)
        assert_same_output(call(cm, numpy_inputs), to_numpy(ref))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target", TARGETS)
def test_model_contract(target: str, name: str, tmp_path) -> None:
    torch.manual_seed(0)
    case = CASES[name]()
    model = case.model.eval()
    cm = compilers.compile(model, target, case.example, dynamic_shapes=case.dynamic_shapes, **case.compile_kwargs)
    assert cm.report.validation is not None and cm.report.validation.passed
    assert target in str(cm.report)

    with torch.no_grad():
        assert_same_output(call(cm, case.example), call(model, case.example))
    check_calls(cm, model, case.calls)

    loaded = compilers.load(cm.save(tmp_path / name))
    check_calls(loaded, model, case.calls)
    assert model.training is False and model is case.model  # compile left the model as it was
