"""A model whose eager outputs vary from call to call (random numbers in forward, dropout kept on, state kept
between calls) is refused with an InputError naming the cause, never validated against its own randomness;
deterministic models, dropout left in train mode by the caller included, compile as before."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compilers
from compilers.capture import capture
from compilers.determinism import same_outputs

RANDOM = "gives different outputs for the same inputs on two eager calls"


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 4)

    def forward(self, x):
        return self.l(x)


class Noisy(Plain):          # the repro: passed on ort-cpu with cosine -0.647
    def forward(self, x):
        y = self.l(x)
        return y + torch.rand_like(y)


class DropoutForced(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 4)

    def forward(self, x):
        return F.dropout(self.l(x), 0.5, training=True)


class KeepsDropoutOn(nn.Module):
    """Puts its dropout back in train mode inside forward, whatever mode compile put it in."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        self.drop.train()
        return self.drop(self.l(x))


class Randn(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 4)

    def forward(self, x):
        return {"mean": self.l(x), "sample": self.l(x) + 0.1 * torch.randn(x.shape[0], 4)}


class Counts(nn.Module):
    """Deterministic kernels, but its answer depends on how often it was called."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.l(x) * self.calls


class Seeded(nn.Module):
    """Noise from a generator seeded inside forward: eager gives the same numbers on every call."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 4)

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        return self.l(x) + torch.rand(4, generator=g)


def x() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model, output, op", [
    (Noisy(), "output", "aten.rand_like"),
    (DropoutForced(), "output", "aten.dropout"),
    (KeepsDropoutOn(), "output", "aten.dropout"),
    (Randn(), "output.sample", "aten.randn"),
], ids=["rand_like", "F.dropout(training=True)", "submodule set to train in forward", "randn"])
def test_a_random_model_is_refused_naming_the_output_the_cause_and_the_way_out(model, output, op):
    model.eval()
    with pytest.raises(compilers.InputError, match=RANDOM) as e:
        compilers.compile(model, "ort-cpu", (x(),))
    msg = str(e.value)
    assert f"({output}: max difference" in msg and "output.mean" not in msg
    assert f"forward draws random numbers ({op} x" in msg
    assert "training=self.training" in msg and "pass them in as an input" in msg
    assert not any(m.training for m in model.modules())      # compile put back the modes it found


def test_a_random_model_is_refused_whatever_the_target():
    for target in ("torchscript-cpu", "inductor-cpu"):
        with pytest.raises(compilers.InputError, match=RANDOM):
            compilers.compile(DropoutForced().eval(), target, (x(),))


def test_an_auto_target_refuses_a_random_model():
    with pytest.raises(compilers.InputError, match=RANDOM):
        compilers.compile(Noisy().eval(), "auto-cpu", (x(),))


def test_state_kept_between_calls_is_refused_as_such():
    with pytest.raises(compilers.InputError, match=RANDOM) as e:
        compilers.compile(Counts().eval(), "ort-cpu", (x(),))
    assert "No operation drew random numbers on a third call, so Counts.forward keeps something" in str(e.value)


def test_validate_refuses_a_random_model_too():
    plain = Plain().eval()
    cm = compilers.compile(plain, "ort-cpu", (x(),))
    noisy = Noisy().eval()
    noisy.load_state_dict(plain.state_dict())
    with pytest.raises(compilers.InputError, match=RANDOM):
        compilers.validate(cm, noisy, [(x(),), (x() * 2,)])
    assert compilers.validate(cm, plain, [(x(),), (x() * 2,)]).passed


def test_a_generator_seeded_inside_forward_is_not_refused_as_random():
    model = Seeded().eval()
    captured = capture(model, (x(),), None, {})       # eager repeats itself: the check lets it through
    assert [s.name for s in captured.signature.outputs] == ["output"]
    # no lowering carries the generator: a target refuses it (export fails, or validation sees the traced
    # generator advance between calls), or its engine gives eager's answer; never a silently other one
    try:
        cm = compilers.compile(model, "torchscript-cpu", (x(),))
    except (compilers.ValidationError, compilers.ExportError):
        return
    other = torch.randn(3, 16)
    torch.testing.assert_close(cm(other), model(other), rtol=1e-5, atol=1e-6)


def test_ordinary_models_compile_as_before():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)   # dropout modules, in train mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the train-mode note, and nested-tensor chatter
        cm = compilers.compile(layer, "ort-cpu", (torch.randn(2, 8, 32),))
    assert cm.report.validation.passed and layer.training      # compiled in eval mode, handed back in train mode
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).eval()
    assert compilers.compile(mlp, "ort-cpu", (x(),)).report.validation.passed


def test_same_outputs_allows_reduction_order_bits_only():
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    ulp = torch.nextafter(a, torch.full_like(a, float("inf")))
    assert same_outputs([a, 3, "x"], [a.clone(), 3, "x"])
    assert same_outputs([a], [ulp])                                     # one step of fp32 everywhere
    assert same_outputs([a.half()], [ulp.half().nextafter(torch.tensor(9.0).half())])   # and of fp16
    assert not same_outputs([a], [a + 1e-3 * torch.rand_like(a)])
    assert not same_outputs([a], [a, a]) and not same_outputs([a, 3], [a, 4])
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert same_outputs([nan], [nan.clone()]) and not same_outputs([nan], [a])
    assert not same_outputs([torch.arange(4)], [torch.arange(4).flip(0)])
