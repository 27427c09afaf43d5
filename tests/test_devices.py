"""Models and inputs off the CPU (devices.py, runtime.run_flat): a model on a GPU compiles from a CPU copy and is
left where it was, untouched; the compiled model answers on its inputs' device; pruning and distillation run
where the model is. The CUDA tests need a GPU (they ran on the device machine lent to a session, see the
closing notes; here they skip with the reason); the meta device is refused everywhere."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compilers
from compilers import InputError, Metric

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")
TARGETS = [t for t in ("ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu")
           if compilers.unavailable_reason(compilers.load_target(t)) is None]


class TwoHeads(nn.Module):
    """A Linear stack (matmuls only: no TF32 convolution on the GPU) with a tuple output and a tied weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 10))

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.c(h) * self.scale, h.mean(-1)


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return TwoHeads().eval().to(device)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_model_without_values_is_refused_with_what_to_do():
    with pytest.raises(InputError, match="on the meta device: it has no values.*Load its weights first"):
        compilers.compile(_model("meta"), "ort-cpu", (torch.randn(2, 32),))


@cuda
@pytest.mark.parametrize("target", TARGETS)
def test_a_compiled_model_answers_cuda_inputs_on_cuda(target):
    model, x = _model(), torch.randn(5, 32)
    cm = compilers.compile(model, target, (x,))
    on_cpu = cm(x)
    logits, mean = cm(x.cuda())
    assert logits.device.type == mean.device.type == "cuda" and logits.dtype == mean.dtype == torch.float32
    assert torch.equal(logits.cpu(), on_cpu[0]) and torch.equal(mean.cpu(), on_cpu[1])   # the same engine call


@cuda
def test_a_model_on_the_gpu_compiles_from_a_cpu_copy_and_stays_where_it_was(tmp_path):
    model = _model("cuda")
    before = _state(model)
    x, other = torch.randn(4, 32, device="cuda"), torch.randn(7, 32, device="cuda")
    seen = []

    def agreement(m):          # the user's metric, written for their GPU model: inputs on cuda
        seen.append(next(m.parameters()).device.type if isinstance(m, nn.Module) else "compiled")
        return (m(other)[0].argmax(-1) == model(other)[0].argmax(-1)).float().mean().item()

    cm = compilers.compile(model, "ort-cpu", (x,), samples=[(other,)], metric=Metric(agreement, max_drop=0.0))
    assert seen[0] == "cuda" and "compiled" in seen       # eager's score from the user's own (GPU) model
    assert all(p.device.type == "cuda" for p in model.parameters()) and model.scale.device.type == "cuda"
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training
    assert any("the model was on cuda:0: compiled and validated from a CPU copy" in n for n in cm.report.notes)
    logits, mean = cm(other)
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits, model(other)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, model(other)[1], rtol=1e-4, atol=1e-4)
    cm.save(tmp_path / "a")
    assert torch.equal(compilers.load(tmp_path / "a")(other)[0], logits)


@cuda
def test_prune_and_distill_run_on_the_gpu_then_compile_from_the_cpu():
    pytest.importorskip("torch_pruning")
    model = _model("cuda")
    before = _state(model)
    data = [(torch.randn(16, 32, device="cuda"),) for _ in range(8)]
    probe = torch.randn(64, 32, device="cuda")
    agreement = Metric(lambda m: (m(probe)[0].argmax(-1) == model(probe)[0].argmax(-1)).float().mean().item(),
                       max_drop=1.0, name="agreement")
    cm = compilers.compile(model, "ort-cpu", data[0], calibration=data, metric=agreement,
                           prune={"flops": 0.5}, distill={"epochs": 3, "progress": False, "seed": 0})
    o = cm.report.optimization
    assert o["prune"]["macs_after"] <= 0.5 * o["prune"]["macs_before"] and o["distill"]["steps"] > 0
    assert o["speed"]["target"] == "ort-cpu" and o["speed"]["speedup"] > 0
    assert cm(probe)[0].device.type == "cuda"
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and next(model.parameters()).is_cuda


@cuda
def test_distillation_on_the_gpu_repeats_exactly_and_leaves_the_rng_alone():
    teacher = _model("cuda")
    data = [(torch.randn(16, 32, device="cuda"),) for _ in range(6)]

    torch.manual_seed(1)
    students = [TwoHeads().to("cuda") for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    rng = torch.cuda.get_rng_state()
    first, second = (compilers.distill(teacher, s, data, max_steps=12, seed=0, progress=False).model for s in students)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert next(first.parameters()).is_cuda and torch.equal(torch.cuda.get_rng_state(), rng)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), students[0].state_dict().values()))
