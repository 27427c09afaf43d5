"""What tracing and export can silently get wrong, and what compile does instead (issue 11).

- data-dependent control flow: a tracing route (TorchScript tracing, OpenVINO's direct import, the
  TorchScript-based ONNX exporter) records the example's branch; compile refuses it with ExportError naming
  the line and quoting torch.export unless `accept_traced_branches=True`; branches on static sizes (Swin) are
  not refused, and a branch on a dynamic dim keeps that dim to the range torch.export finds it holds for;
- non-tensor outputs that depend on the inputs (`x.shape[0]`): read from an output's size at call time, or
  refused when they follow no output dim;
- out-of-range embedding indices: InputError, as eager raises IndexError (engines return zeros or a wrong row);
- compile leaves every submodule's own train/eval mode as it found it.

Small models only; inductor-cpu (slow to build) compiles once, in `test_inductor_outputs_indices_and_modes`.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compilers
from compilers.lower import FROZEN_NOTE
from compilers.signature import Signature

TARGETS = ["ort-cpu", "openvino-cpu", "torchscript-cpu"]


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


BRANCH_LINE = f"{Branch.forward.__code__.co_filename}:{inspect.getsourcelines(Branch.forward)[1] + 1}"


class ShapeBranch(nn.Module):
    """Python control flow on a shape only: tracing warns, torch.export accepts it; not a frozen branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * 2 if x.shape[0] >= 1 else self.lin(x)


class SwinLike(nn.Module):
    """transformers' Swin patterns: branches on static sizes only (`if width % patch != 0:` pads,
    `if min(resolution) <= window:` clamps the window), and a window size the model stores as a tensor while
    torch.jit traces it (`torch.min(torch.tensor(resolution)) if torch.jit.is_tracing() else min(...)`)."""

    def __init__(self, patch: int = 4, window: int = 7):
        super().__init__()
        torch.manual_seed(0)
        self.patch, self.window = patch, window
        self.embed = nn.Conv2d(3, 8, patch, stride=patch)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        width = x.shape[-1]
        if width % self.patch != 0:
            x = F.pad(x, (0, self.patch - width % self.patch))
        y = self.embed(x)
        resolution = y.shape[2:]
        if min(resolution) <= self.window:
            self.window = torch.min(torch.tensor(resolution)) if torch.jit.is_tracing() else min(resolution)
        return self.lin(y.flatten(2).transpose(1, 2)) * self.window


class DimBranch(nn.Module):
    """Python control flow on a dynamic dim's size: tracing freezes the example's branch (batch > 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 4:
            return self.lin(x)
        return -self.lin(x)


class WithSize(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), x.shape[0]


class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 2)

    def forward(self, ids):
        return self.lin(self.emb(ids))


class Mixed(nn.Module):
    """Submodules whose modes differ from the model's own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.lin(x)))


def _positive():
    return (torch.rand(8, 4) + 0.1,)


# -- 1. data-dependent control flow --------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS + ["inductor-cpu"])
def test_data_dependent_branch_is_refused_naming_the_line(target):
    with pytest.raises(compilers.ExportError) as info:
        compilers.compile(Branch().eval(), target, _positive())
    text = str(info.value)
    assert BRANCH_LINE in text and "x.sum() > 0" in text and "torch.where" in text
    if target != "inductor-cpu":   # torch.export refuses outright there: nothing traced, nothing to accept
        assert "accept_traced_branches=True" in text and "Python boolean" in text
        # torch.export's own words, not a paraphrase
        assert "Could not guard on data-dependent expression" in text, text


@pytest.mark.parametrize("target", TARGETS)
def test_accepted_traced_branch_is_noted(target):
    model = Branch().eval()
    # validate=False: validation's NaN/Inf probe may take the other branch and fail it
    cm = compilers.compile(model, target, _positive(), accept_traced_branches=True, validate=False)
    assert any(FROZEN_NOTE in n and BRANCH_LINE in n for n in cm.report.notes), cm.report.notes
    x = -torch.ones(2, 4)
    with torch.no_grad():
        assert not torch.allclose(cm(x), model(x))     # what was accepted: the example's branch, always


@pytest.mark.parametrize("target", TARGETS)
def test_shape_only_branch_is_not_refused(target):
    model = ShapeBranch().eval()
    cm = compilers.compile(model, target, _positive())
    assert not any(FROZEN_NOTE in n for n in cm.report.notes)
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target", ["torchscript-cpu", "openvino-cpu"])
def test_branches_on_static_sizes_are_not_refused(target):
    """Swin's `if width % patch != 0:` and `if min(resolution) <= window:` depend on static sizes only: torch.export
    takes the model, so the tracer's conversions there froze nothing. The model's own tracing-time state (a
    tensor window size) reaches neither the export probe nor the caller's model."""
    model = SwinLike().eval()
    cm = compilers.compile(model, target, (torch.randn(2, 3, 26, 26),))
    assert not any(FROZEN_NOTE in n for n in cm.report.notes), cm.report.notes
    assert type(model.window) is int            # as eager left it, not the tensor set while tracing
    x = torch.randn(5, 3, 26, 26)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-4)


def test_transformers_swin_compiles_on_torchscript():
    from transformers import SwinConfig, SwinModel
    # 28x28 / patch 4 -> 7x7 patches: the `min(input_resolution) <= window_size` branch is taken
    config = SwinConfig(image_size=28, embed_dim=8, depths=[1], num_heads=[1], window_size=7)
    torch.manual_seed(0)
    model = SwinModel(config).eval()
    cm = compilers.compile(model, "torchscript-cpu", (torch.randn(2, 3, 28, 28),))
    assert not any(FROZEN_NOTE in n for n in cm.report.notes), cm.report.notes
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(cm(x).last_hidden_state, model(x).last_hidden_state, atol=1e-4, rtol=1e-4)


def test_value_branch_beside_static_size_branches_is_refused_at_its_own_line():
    class SwinWithValueBranch(SwinLike):
        def forward(self, x):
            y = super().forward(x)
            return y if y.sum() > 0 else -y

    with pytest.raises(compilers.ExportError) as info:
        compilers.compile(SwinWithValueBranch().eval(), "torchscript-cpu", (torch.randn(2, 3, 26, 26),))
    text = str(info.value)
    value_line = inspect.getsourcelines(SwinWithValueBranch.forward)[1] + 2
    # the value branch is named first, and torch.export's own words say where it refused
    assert text.index(f":{value_line} (`return y if y.sum() > 0") < text.index("if width % self.patch"), text
    assert f'The following call raised this error: File "{__file__}", line {value_line}' in text, text


@pytest.mark.parametrize("target", TARGETS)
def test_branch_on_a_dynamic_dim_narrows_its_range(target):
    """Tracing keeps the example's `batch > 4` branch (and torch.onnx relaxes the Dim it was given); torch.export
    says the code's path holds for batch >= 5 only (the range of the graph compile exported for its analyses, or,
    where it has none, torch.export's refusal): the compiled model takes those sizes, refuses the others with
    InputError, and the report says so."""
    model = DimBranch().eval()
    cm = compilers.compile(model, target, (torch.randn(8, 4),))
    assert cm.signature.dims["batch"].min == 5
    assert any("batch 1..inf -> 5..inf" in n and "InputError" in n for n in cm.report.notes), cm.report.notes
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(compilers.InputError, match=r"dim 0 \('batch'\) is 2, allowed 5\.\.inf"):
        cm(torch.randn(2, 4))


def test_branch_on_a_dynamic_dim_that_no_range_keeps_is_refused():
    class Even(DimBranch):
        def forward(self, x):
            return self.lin(x) if x.shape[0] % 2 == 0 else -self.lin(x)

    with pytest.raises(compilers.ExportError, match=r"torchscript-trace.*dynamic dim.*% 2\) == 0.*Suggested fixes"):
        compilers.compile(Even().eval(), "torchscript-cpu", (torch.randn(8, 4),))


def test_cached_build_with_an_accepted_branch_is_not_reused_without_acceptance(tmp_path):
    compilers.compile(Branch().eval(), "ort-cpu", _positive(), cache_dir=tmp_path, accept_traced_branches=True,
                      validate=False)
    with pytest.raises(compilers.ExportError, match="accept_traced_branches"):
        compilers.compile(Branch().eval(), "ort-cpu", _positive(), cache_dir=tmp_path, validate=False)


# -- 2. non-tensor outputs that depend on the inputs ---------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_size_output_follows_the_inputs(target, tmp_path):
    model = WithSize().eval()
    cm = compilers.compile(model, target, (torch.randn(8, 4),))
    for batch in (3, 1, 11):
        x = torch.randn(batch, 4)
        y, n = cm(x)
        assert type(n) is int and n == batch and y.shape == (batch, 4)
        assert cm(x.numpy())[1] == batch
    loaded = compilers.load(cm.save(tmp_path / "m"))
    assert loaded(torch.randn(5, 4))[1] == 5


def test_a_shape_output_comes_back_as_a_torch_size(tmp_path):
    class WithShape(WithSize):
        def forward(self, x):
            return self.lin(x), x.shape          # pytree alone rebuilds a torch.Size as a plain tuple

    cm = compilers.compile(WithShape().eval(), "ort-cpu", (torch.randn(8, 4),))
    loaded = compilers.load(cm.save(tmp_path / "m"))
    for compiled in (cm, loaded):
        shape = compiled(torch.randn(3, 4))[1]
        assert type(shape) is torch.Size and shape == (3, 4)


def test_output_constant_that_follows_no_output_dim_is_refused():
    class Doubled(WithSize):
        def forward(self, x):
            return self.lin(x), x.shape[0] * 2

    with pytest.raises(compilers.ExportError, match=r"output leaf 'output\.1'.*16 for the example, 32"):
        compilers.compile(Doubled().eval(), "ort-cpu", (torch.randn(8, 4),))


def test_constant_outputs_stay_constants():
    class Tagged(WithSize):
        def forward(self, x):
            return self.lin(x), "tag", 4

    cm = compilers.compile(Tagged().eval(), "ort-cpu", (torch.randn(8, 4),))
    assert cm(torch.randn(3, 4))[1:] == ("tag", 4)


# -- 4. out-of-range indices ---------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_embedding_index_out_of_range_is_an_input_error(target):
    model = Lookup().eval()
    cm = compilers.compile(model, target, (torch.randint(0, 10, (2, 5)),))
    assert cm.signature.index_bounds == {"ids": (0, 10, "emb (nn.Embedding with 10 rows)")}
    for bad in (50, 10, -1):
        ids = torch.randint(0, 10, (3, 5))
        ids[1, 2] = bad
        with pytest.raises(IndexError):
            model(ids)
        with pytest.raises(compilers.InputError, match=rf"index {bad} is out of range for emb .*\[0, 9\]"):
            cm(ids)
        with pytest.raises(compilers.InputError, match=rf"index {bad}"):
            cm(ids.numpy())
    ids = torch.tensor([[0, 9, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(cm(ids), model(ids), atol=1e-5, rtol=1e-4)


class Tables(nn.Module):
    """Lookups into parameters by functional indexing, not nn.Embedding: the engines see a Gather whose
    table size they do not treat as a bound (openvino-cpu returned rows of garbage for index 50)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(10, 4))
        self.cols = nn.Parameter(torch.randn(3, 6))
        self.register_buffer("table", torch.randn(8, 2))

    def forward(self, rows, cols, picks):
        return self.w[rows] * 2, self.cols[:, cols].sum(0), torch.index_select(self.table, 0, picks)


@pytest.mark.parametrize("target", TARGETS)
def test_functional_index_out_of_range_is_an_input_error(target):
    model = Tables().eval()
    example = (torch.tensor([1, 2]), torch.tensor([0, 5]), torch.tensor([7, 0]))
    cm = compilers.compile(model, target, example)
    assert {k: v[:2] for k, v in cm.signature.index_bounds.items()} == \
        {"rows": (-10, 10), "cols": (-6, 6), "picks": (0, 8)}
    for i, (bad, allowed) in enumerate([(10, r"\[-10, 9\]"), (-11, r"\[-10, 9\]"), (6, r"\[-6, 5\]"),
                                        (-1, r"\[0, 7\]"), (8, r"\[0, 7\]")]):
        inputs = [x.clone() for x in example]
        inputs[0 if i < 2 else 1 if i == 2 else 2][0] = bad
        with pytest.raises((IndexError, RuntimeError)):
            model(*inputs)
        with pytest.raises(compilers.InputError, match=rf"index {bad} is out of range .*{allowed}"):
            cm(*inputs)
    inputs = (torch.tensor([-1, -10, 9]), torch.tensor([-6, 5, 0]), torch.tensor([0, 7, 3]))   # negative
    with torch.no_grad():                                                                  # as eager allows
        for got, want in zip(cm(*inputs), model(*inputs)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
def test_an_engine_failure_is_an_engine_error(target):
    class Gather(nn.Module):
        def forward(self, x, idx):
            return torch.gather(x, 1, idx)     # the bound is x's size, an input: no static index bound

    cm = compilers.compile(Gather(), target, (torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.long)))
    bad = (torch.randn(3, 5), torch.full((3, 2), 9))
    with pytest.raises(RuntimeError):
        Gather()(*bad)
    with pytest.raises(compilers.EngineError, match=rf"the \w+ engine of {target} failed on these inputs "
                                                    r"\(x: \(3, 5\), idx: \(3, 2\)\)") as e:
        cm(*bad)
    assert isinstance(e.value, RuntimeError) and e.value.__cause__ is not None


def test_index_bounds_survive_save_and_old_manifests(tmp_path):
    cm = compilers.compile(Lookup().eval(), "ort-cpu", (torch.randint(0, 10, (2, 5)),))
    d = cm.signature.to_dict()
    assert Signature.from_dict(d) == cm.signature
    d["index_bounds"] = {"ids": [10, "emb"]}      # as saved before bounds had a lower end
    assert Signature.from_dict(d) == cm.signature
    del d["index_bounds"]          # an artifact saved before index bounds existed
    assert Signature.from_dict(d).index_bounds == {}
    loaded = compilers.load(cm.save(tmp_path / "m"))
    with pytest.raises(compilers.InputError, match="out of range"):
        loaded(np.full((1, 5), 12, dtype=np.int64))


# -- 5. train/eval modes -------------------------------------------------------------------------
def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("target", TARGETS)
def test_compile_restores_each_submodules_mode(target):
    training = Mixed().train()
    training.bn.eval()                      # a frozen BatchNorm in a model that trains
    evaluating = Mixed().eval()
    evaluating.drop.train()                 # an MC-dropout layer in a model that infers
    for model in (training, evaluating):
        before = _modes(model)
        cm = compilers.compile(model, target, (torch.randn(4, 4),))
        assert _modes(model) == before
        compilers.validate(cm, model, [(torch.randn(2, 4),)])
        assert _modes(model) == before


# -- inductor, once ------------------------------------------------------------------------------
def test_inductor_outputs_indices_and_modes():
    class All(Lookup):
        def forward(self, ids):
            return self.lin(self.emb(ids)), ids.shape[0]

    model = All().train()
    model.emb.eval()
    before = _modes(model)
    cm = compilers.compile(model, "inductor-cpu", (torch.randint(0, 10, (4, 3)),))
    assert _modes(model) == before
    y, n = cm(torch.randint(0, 10, (2, 3)))
    assert n == 2 and y.shape == (2, 3, 2)
    with pytest.raises(compilers.InputError, match="index -1 is out of range"):
        cm(torch.full((2, 3), -1))
