"""The call contract on real model families: `cm(...)` returns what `model(...)` returns.

Each case compiles a small randomly initialised model once, then checks it against eager on fresh
inputs of *other* sizes than the example (type, pytree structure, dtype, shape and values per leaf),
again with numpy inputs (numpy in -> numpy out), and again after save + load. No weights are
downloaded: Hugging Face models are built from small random configs.

Add a target to TARGETS (or parametrize a backend's own test module over CASES) to run every case on it.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch

import compilers
from conftest import assert_same_output, to_numpy

TARGETS = ["ort-cpu", "openvino-cpu", "openvino-cpu-bf16", "torchscript-cpu", "inductor-cpu"]
FP32 = {"atol": 1e-4, "rtol": 1e-3}
TOLERANCE = {"ort-cpu": FP32, "openvino-cpu": FP32, "torchscript-cpu": FP32, "inductor-cpu": FP32,
             "openvino-cpu-bf16": {"min_cosine": 0.99, "min_int_agreement": 0.99}}   # what leaves must meet
# (target, case) -> what compile must say instead of returning a model that is wrong on other sizes
REFUSED = {("inductor-cpu", "lstm"): "pins dynamic dim"}


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
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
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
    """Returns torch.topk's own result: a torch.return_types.topk (values float32, indices int64)."""

    def forward(self, x: torch.Tensor) -> torch.return_types.topk:
        return torch.topk(x * 2.0, k=3, dim=-1)


def topk() -> Case:
    return Case(TopK(), torch.randn(2, 10), [torch.randn(5, 10), torch.randn(1, 10)])


class TopKResult(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


class TopKNamed(torch.nn.Module):
    """The same, as a user-defined NamedTuple."""

    def forward(self, x: torch.Tensor) -> TopKResult:
        values, indices = torch.topk(x, k=2, dim=-1)
        return TopKResult(values, indices)


def topk_namedtuple() -> Case:
    return Case(TopKNamed(), torch.randn(2, 10), [torch.randn(5, 10), torch.randn(1, 10)])


CASES = {"bert": bert, "gpt2": gpt2, "vit": vit, "resnet": resnet, "lstm": lstm, "nested": nested, "topk": topk,
         "topk_namedtuple": topk_namedtuple}


# -- the contract ----------------------------------------------------------------------------------

def check_calls(cm: Any, model: torch.nn.Module, calls: list[Any], tol: dict[str, float]) -> None:
    for inputs in calls:
        with torch.no_grad():
            ref = call(model, inputs)
        assert_same_output(call(cm, inputs), ref, **tol)
        assert_same_output(call(cm, to_numpy(inputs)), to_numpy(ref), **tol)   # numpy in -> numpy out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target", TARGETS)
def test_model_contract(target: str, name: str, tmp_path) -> None:
    torch.manual_seed(0)
    case = CASES[name]()
    model = case.model.eval()
    if (target, name) in REFUSED:
        with pytest.raises(compilers.ExportError, match=REFUSED[target, name]):
            compilers.compile(model, target, case.example, dynamic_shapes=case.dynamic_shapes, **case.compile_kwargs)
        return
    cm = compilers.compile(model, target, case.example, dynamic_shapes=case.dynamic_shapes, **case.compile_kwargs)
    assert cm.report.validation is not None and cm.report.validation.passed
    assert target in str(cm.report)

    check_calls(cm, model, [case.example, *case.calls], TOLERANCE[target])

    loaded = compilers.load(cm.save(tmp_path / name))
    check_calls(loaded, model, case.calls, TOLERANCE[target])


@pytest.mark.parametrize("target", TARGETS)
def test_load_in_fresh_process(target: str, tmp_path: Path) -> None:
    """load() rebuilds the output types by itself: a process that never imported transformers, nor named
    torch.return_types / the NamedTuple, gets a ModelOutput, a structseq and a NamedTuple back."""
    names = ["vit", "topk", "topk_namedtuple"]
    models, inputs = {}, {}
    for name in names:
        torch.manual_seed(0)
        case = CASES[name]()
        models[name] = case.model.eval()
        compilers.compile(models[name], target, case.example, dynamic_shapes=case.dynamic_shapes).save(tmp_path / name)
        inputs[name] = case.calls[0]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch, compilers
        from test_models import call
        assert "transformers" not in sys.modules
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        outputs = {{n: call(compilers.load({str(tmp_path)!r} + "/" + n), x) for n, x in inputs.items()}}
        torch.save(outputs, {str(tmp_path / "outputs.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=False)
    for name in names:
        with torch.no_grad():
            assert_same_output(outputs[name], call(models[name], inputs[name]), **TOLERANCE[target])


def test_gpt2_with_cache_is_refused_clearly() -> None:
    """Why gpt2() sets use_cache=False: with the cache on, GPT-2 returns a transformers Cache object, which the
    contract cannot reproduce; compile says so instead of returning something else."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    with pytest.raises(compilers.InputError, match="Cache.*use_cache=False"):
        compilers.compile(GPT2LMHeadModel(config), TARGETS[0], _padded(2, 8))


def test_assert_same_output_catches_mismatches() -> None:
    """The helper is strict: container type, structure, dtype, shape, kind and values all count."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    ref = {"a": (t, [t.long()]), "b": t > 2}
    assert_same_output({"a": (t + 1e-6, [t.long()]), "b": t > 2}, ref)
    wrong = [
        {"a": [t, [t.long()]], "b": t > 2},                 # tuple became list
        {"a": (t, [t.long(), t]), "b": t > 2},              # extra leaf
        {"a": (t.double(), [t.long()]), "b": t > 2},        # dtype
        {"a": (t.reshape(3, 2), [t.long()]), "b": t > 2},   # shape
        {"a": (t + 1e-2, [t.long()]), "b": t > 2},          # value beyond tolerance
        {"a": (t, [t.long() + 1]), "b": t > 2},             # integer leaves are exact
        {"a": (t.numpy(), [t.long()]), "b": t > 2},         # numpy where eager gives torch
    ]
    for got in wrong:
        with pytest.raises(AssertionError):
            assert_same_output(got, ref)
    with pytest.raises(AssertionError):
        assert_same_output(torch.return_types.topk((t, t.long())), (t, t.long()))   # structseq vs tuple


@pytest.mark.parametrize("target", TARGETS)
def test_concurrent_calls_get_their_own_results(target: str) -> None:
    """Threads sharing one compiled model each get the answer to their own input."""
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    cm = compilers.compile(model, target, (torch.randn(3, 16),))
    inputs = [torch.randn(1 + i % 5, 16) for i in range(32)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(cm, inputs))
    for got, ref in zip(outs, refs):
        assert_same_output(got, ref, **TOLERANCE[target])
