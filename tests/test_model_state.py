"""The compiled model is the model, and compile leaves the model as it found it (issue 18, items 4 and 5).

A model that writes into its own parameters or buffers in forward is refused before the write happens, on
every target and at whichever eager run meets it (the example, a validation sample, a NaN/Inf probe): the
model's state is unchanged after the refusal. And the outputs of every target take in-place updates and
autograd as eager's outputs do."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compilers

FP32 = ["ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu"]


class RunningMean(nn.Module):
    """The issue's repro: a buffer updated in forward (eager's answer drifts with every call)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 4)
        self.register_buffer("mu", torch.zeros(4))

    def forward(self, x):
        y = self.l(x)
        self.mu.mul_(0.9).add_(0.1 * y.mean(0))
        return y - self.mu


class StepCounter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 4)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.step += 1
        return self.l(x)


class ReplacesItsBuffer(StepCounter):
    def forward(self, x):
        self.step = self.step + 1          # not in place: the module's buffer is replaced by a new tensor
        return self.l(x)


class CountsNonFinite(nn.Module):
    """Writes into a buffer only when an input holds NaN: only the NaN/Inf probes of validation meet it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(torch.isnan(x).any().float())
        return self.l(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("target", FP32)
@pytest.mark.parametrize("make, change", [(RunningMean, "changes its own buffer 'mu' in place"),
                                          (StepCounter, "changes its own buffer 'step' in place"),
                                          (ReplacesItsBuffer, "replaces its own buffer 'step'"),
                                          (CountsNonFinite, "changes its own buffer 'seen' in place")])
def test_a_model_that_changes_its_state_is_refused_and_left_unchanged(target, make, change):
    model = make().train()
    model.l.eval()
    before, modes = _state(model), [m.training for m in model.modules()]
    with pytest.raises(compilers.InputError, match=f"{change}.*not changed"):
        compilers.compile(model, target, (torch.randn(4, 8),))
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed: {before[k]} -> {after[k]}"
    assert [m.training for m in model.modules()] == modes


def test_a_write_that_only_a_validation_sample_makes_is_refused_too():
    class Clips(RunningMean):
        def forward(self, x):
            y = self.l(x)
            if bool(x.abs().max() > 100):
                self.mu.copy_(y.mean(0))
            return y
    model = Clips().eval()
    before = _state(model)
    with pytest.raises(compilers.InputError, match="changes its own buffer 'mu'"):
        compilers.compile(model, "ort-cpu", (torch.randn(4, 8),), samples=[(torch.randn(2, 8) * 1000,)])
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_a_model_that_only_reads_its_state_is_untouched_by_compile():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    before = copy.deepcopy(model.state_dict())
    compilers.compile(model, "ort-cpu", (torch.randn(4, 8),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, {t: compilers.compile(model, t, (torch.randn(4, 8),)) for t in FP32}


@pytest.mark.parametrize("target", FP32)
def test_outputs_take_in_place_updates_and_autograd_as_eagers_do(compiled, target):
    """torchscript-cpu and inductor-cpu returned inference tensors: `cm(x).add_(1)` raised "Inplace update to
    inference tensor outside InferenceMode" and a loss over them could not be backpropagated."""
    model, cms = compiled
    cm, x = cms[target], torch.randn(3, 8)
    expected = model(x).detach() + 1
    out = cm(x)
    assert not out.is_inference() and not out.requires_grad
    torch.testing.assert_close(out.add_(1), expected, rtol=1e-4, atol=1e-5)
    w = torch.randn(4, requires_grad=True)
    (cm(x) * w).sum().backward()
    torch.testing.assert_close(w.grad, model(x).detach().sum(0), rtol=1e-4, atol=1e-5)
