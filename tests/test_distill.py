"""compilers.optimize.distill: a student learns the teacher's outputs (logits by KL, embeddings by MSE / cosine),
labels add their cross-entropy, the same seed gives the same weights, bounds stop it, mismatches are refused,
and neither model passed in is changed."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compilers.errors import InputError
from compilers.optimize.distill import distill

ROWS, FEATURES, CLASSES = 96, 8, 5


def _mlp(hidden: int, out: int = CLASSES, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, out))


def _data(rows: int = ROWS, batch: int = 16) -> list[tuple[torch.Tensor]]:
    x = torch.randn(rows, FEATURES, generator=torch.Generator().manual_seed(1))
    return [(b,) for b in x.split(batch)]


def _all(data: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.cat([x for (x,) in data])


def _kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(teacher || student) of the softened distributions, per row."""
    with torch.no_grad():
        p, q = (F.softmax(m(x) / temperature, -1) for m in (teacher, student))
        return float((p * (p.log() - q.log())).sum(-1).mean())


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_learns_the_teachers_logits_by_kl():
    teacher, student, data = _mlp(32).eval(), _mlp(6, seed=1), _data()
    d = distill(teacher, student, data, epochs=40, lr=1e-2, temperature=3.0, progress=False)
    assert d.report.losses == {"output": "kl"} and not d.report.labels
    x = _all(data)
    assert d.report.probe_rows == ROWS
    assert d.report.loss_start == pytest.approx(9 * _kl(student, teacher, x, temperature=3.0), rel=1e-5)
    assert d.report.loss_end < d.report.loss_start / 4
    assert _kl(d.model, teacher, x) < _kl(student, teacher, x) / 4
    assert d.report.stopped_by == "epochs" and d.report.epochs == 40 and d.report.steps == 40 * math.ceil(ROWS / 32)
    assert not d.model.training


class Encoder(nn.Module):
    """(batch, tokens, features) -> hidden states (batch, tokens, width) and, optionally, a pooled unit vector."""

    def __init__(self, width: int, outputs: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Sequential(nn.Linear(FEATURES, width), nn.Tanh(), nn.Linear(width, 12))
        self.outputs = outputs

    def forward(self, tokens: torch.Tensor):
        hidden = self.layer(tokens)
        embedding = F.normalize(hidden.mean(1), dim=-1)
        if self.outputs == "hidden":
            return hidden
        if self.outputs == "embedding":
            return embedding
        return {"last_hidden_state": hidden, "pooled": (embedding, hidden.argmax(-1))}


def _tokens(batches: int = 4, rows: int = 8, length: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{"tokens": torch.randn(rows, length, FEATURES, generator=g)} for _ in range(batches)]


@pytest.mark.parametrize("outputs, kinds", [
    ("hidden", {"output": "mse"}),
    ("embedding", {"output": "cosine"}),
    ("nested", {"output.last_hidden_state": "mse", "output.pooled.0": "cosine", "output.pooled.1": "ignored"}),
])
def test_hidden_states_and_embeddings_by_mse_and_cosine_in_any_structure(outputs, kinds):
    teacher, student, data = Encoder(32, outputs).eval(), Encoder(8, outputs, seed=1), _tokens()
    d = distill(teacher, student, data, epochs=30, lr=1e-2, progress=False)
    assert d.report.losses == kinds
    assert d.report.loss_end < d.report.loss_start / 3
    tokens = torch.cat([b["tokens"] for b in data])
    with torch.no_grad():
        cos = [F.cosine_similarity(m.layer(tokens).mean(1), teacher.layer(tokens).mean(1), -1).mean()
               for m in (student, d.model)]
    assert cos[1] > max(cos[0], 0.9)


def test_a_tuple_of_logits_and_features_sums_both_losses():
    class Two(nn.Module):
        def __init__(self, hidden: int, seed: int):
            super().__init__()
            self.body = _mlp(hidden, out=CLASSES + 3, seed=seed)

        def forward(self, x):
            y = self.body(x)
            return y[:, :CLASSES], y[:, CLASSES:].unsqueeze(1)
    teacher, student = Two(32, 0).eval(), Two(6, 1)
    d = distill(teacher, student, _data(), epochs=30, lr=1e-2, progress=False)
    assert d.report.losses == {"output.0": "kl", "output.1": "mse"}
    assert d.report.loss_end < d.report.loss_start / 4


def test_labels_add_their_cross_entropy():
    teacher, student, data = _mlp(32).eval(), _mlp(6, seed=1), _data()
    x = _all(data)
    with torch.no_grad():
        disagree = (teacher(x).argmax(-1) + 1) % CLASSES     # labels that contradict the teacher everywhere
    only_teacher = distill(teacher, student, data, epochs=30, lr=1e-2, progress=False).model
    only_labels = distill(teacher, student, data, labels=disagree, alpha=0.0, epochs=30, lr=1e-2,
                          progress=False)
    assert only_labels.report.labels
    with torch.no_grad():
        agree = [float((m(x).argmax(-1) == disagree).float().mean()) for m in (only_teacher, only_labels.model)]
    assert agree[0] < 0.2 and agree[1] > 0.8
    per_item = distill(teacher, student, data, labels=list(disagree.split(16)), alpha=0.0, epochs=30, lr=1e-2,
                       progress=False)
    assert _same(per_item.model.state_dict(), only_labels.model.state_dict())


def test_the_same_seed_gives_the_same_weights_and_another_seed_others():
    teacher, data = _mlp(32).eval(), _data()
    student = nn.Sequential(_mlp(6, seed=1), nn.Dropout(0.5), nn.Linear(CLASSES, CLASSES))
    runs = []
    for seed, elsewhere in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(elsewhere)           # the process's RNG state before the call must not matter
        runs.append(distill(teacher, student, data, epochs=3, seed=seed, progress=False).model.state_dict())
    assert _same(runs[0], runs[1])
    assert not _same(runs[0], runs[2])


def test_bounds_stop_training_and_the_report_says_which():
    teacher, student, data = _mlp(32).eval(), _mlp(6, seed=1), _data()
    timed = distill(teacher, student, data, epochs=3000, max_seconds=0.2, progress=False)
    assert timed.report.stopped_by == "seconds" and 0.2 <= timed.report.seconds < 5
    assert 0 < timed.report.steps < 3000 * math.ceil(ROWS / 32)
    stepped = distill(teacher, student, data, max_steps=5, max_seconds=60, progress=False)
    assert stepped.report.stopped_by == "steps" and stepped.report.steps == 5
    assert stepped.report.epochs == pytest.approx(5 / math.ceil(ROWS / 32))
    with pytest.raises(InputError, match="needs a bound"):
        distill(teacher, student, data, progress=False)


def test_mismatched_outputs_are_refused_with_what_each_returns():
    teacher, data = _mlp(32).eval(), _data()

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp(6)

        def forward(self, x):
            return self.body(x), x
    with pytest.raises(InputError, match=r"structured differently.*teacher tensor\(32, 5\).*student tuple"):
        distill(teacher, Pair(), data, max_steps=1, progress=False)
    with pytest.raises(InputError, match=r"output is tensor\(32, 5\) from the teacher but tensor\(32, 3\)"):
        distill(teacher, _mlp(6, out=3), data, max_steps=1, progress=False)
    with pytest.raises(InputError, match="one logits output"):
        distill(Encoder(8, "hidden"), Encoder(8, "hidden"), _tokens(), labels=torch.zeros(32, dtype=torch.long),
                max_steps=1, progress=False)
    with pytest.raises(InputError, match="labels has 3 rows but the data has 96"):
        distill(teacher, _mlp(6), data, labels=torch.zeros(3, dtype=torch.long), max_steps=1, progress=False)
    with pytest.raises(InputError, match="iterable of inputs"):
        distill(teacher, _mlp(6), _all(data), max_steps=1, progress=False)


def test_neither_model_passed_in_is_changed_nor_the_process_state():
    teacher, student, data = _mlp(32).eval(), _mlp(6, seed=1), _data()
    before_teacher, before_student = _weights(teacher), _weights(student)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(2)
    try:
        d = distill(teacher, student, data, epochs=2, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert _same(_weights(teacher), before_teacher) and not teacher.training
    assert _same(_weights(student), before_student) and student.training and d.model is not student
    assert not _same(_weights(d.model), before_student)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in teacher.parameters())
    teacher.train()
    distill(teacher, student, data, max_steps=1, progress=False)
    assert teacher.training


def test_items_that_cannot_be_pooled_are_batches_as_given():
    g = torch.Generator().manual_seed(3)
    data = [{"tokens": torch.randn(4, length, FEATURES, generator=g)} for length in (3, 5, 7)]
    teacher, student = Encoder(16, "embedding").eval(), Encoder(8, "embedding", seed=1)
    d = distill(teacher, student, data, epochs=2, progress=False)
    assert "3 items as given" in d.report.batching and "beyond dim 0" in d.report.batching
    assert d.report.steps == 6 and d.report.probe_rows == 12


def test_a_callable_loss_is_the_whole_objective():
    teacher, student, data = _mlp(32).eval(), _mlp(6, seed=1), _data()
    seen = []

    def loss(got, wanted, labels):
        seen.append(labels)
        return F.mse_loss(got.softmax(-1), wanted.softmax(-1))
    d = distill(teacher, student, data, loss=loss, epochs=20, lr=1e-2, progress=False)
    assert d.report.losses == {} and set(seen) == {None}
    assert d.report.loss_end < d.report.loss_start / 2


def _deep(width: int, seed: int) -> nn.Sequential:
    """Two hidden layers of `width` (modules "1" and "3" return them) before the logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, CLASSES))


def _hidden_gap(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """Relative MSE between the student's first hidden layer and the teacher's second."""
    with torch.no_grad():
        s, t = student[:2](x), teacher[:4](x)
        return float(F.mse_loss(s, t) / t.pow(2).mean())


def test_hidden_states_are_matched_by_module_name_where_output_only_does_not():
    teacher, data = _deep(16, seed=0).eval(), _data()
    student = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    x = _all(data)
    plain = distill(teacher, student, data, epochs=60, lr=1e-2, progress=False)
    runs = [distill(teacher, student, data, epochs=60, lr=1e-2, hidden={"1": "3"}, progress=False) for _ in range(2)]
    matched = runs[0]
    assert matched.report.hidden == {"1": "3"} and plain.report.hidden == {}
    assert "1 x hidden-state relative mse on 1 module pair" in str(matched.report)
    gaps = [_hidden_gap(m, teacher, x) for m in (student, plain.model, matched.model)]
    assert gaps[2] < gaps[0] / 4 and gaps[2] < gaps[1] / 4      # only the hidden loss brings the layer closer
    assert _kl(matched.model, teacher, x) < _kl(student, teacher, x) / 4   # and the outputs are still learned
    assert _same(runs[0].model.state_dict(), runs[1].model.state_dict())  # deterministic per seed
    heavier = distill(teacher, student, data, epochs=60, lr=1e-2, hidden={"1": "3"}, hidden_weight=10,
                      progress=False)
    assert _hidden_gap(heavier.model, teacher, x) < gaps[2]
    for m in (teacher, matched.model, heavier.model):               # no hook is left behind
        assert all(not mod._forward_hooks for mod in m.modules())


def test_hidden_names_and_shapes_are_checked_with_what_to_do():
    teacher, data = _deep(16, seed=0).eval(), _data()
    student = nn.Sequential(nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, CLASSES))
    with pytest.raises(InputError, match=r"the student \(Sequential\) has no submodule '7'.*named_modules"):
        distill(teacher, student, data, max_steps=1, hidden={"7": "3"}, progress=False)
    with pytest.raises(InputError, match=r"teacher \(Sequential\) has no submodule 'layer.3'; did you mean '3'"):
        distill(teacher, student, data, max_steps=1, hidden={"1": "layer.3"}, progress=False)
    with pytest.raises(InputError, match=r"student's '1' returns \(32, 6\) but the teacher's '3' \(32, 16\); map "
                                         r"modules whose outputs have the same shape"):
        distill(teacher, student, data, max_steps=1, hidden={"1": "3"}, progress=False)
    with pytest.raises(InputError, match="non-empty dict"):
        distill(teacher, student, data, max_steps=1, hidden=["1", "3"], progress=False)
    with pytest.raises(InputError, match="hidden_weight must be positive"):
        distill(teacher, student, data, max_steps=1, hidden={"1": "3"}, hidden_weight=0, progress=False)
    assert all(not m._forward_hooks for m in teacher.modules())     # refused calls leave no hook either


def _counted(model: nn.Module) -> list[int]:
    """Rows the model has been called on, one entry per call."""
    calls: list[int] = []
    model.register_forward_hook(lambda m, args, out: calls.append(len(out)))
    return calls


def test_the_teacher_runs_once_per_sample_not_at_every_step(monkeypatch):
    module = importlib.import_module("compilers.optimize.distill")   # the package exports the function as distill
    teacher, student, data = _mlp(32).eval(), _mlp(6, seed=1), _data()
    calls = _counted(teacher)
    cached = distill(teacher, student, data, epochs=10, progress=False)
    assert cached.report.teacher_cached and "teacher computed once per sample" in str(cached.report)
    # first batch (the loss kinds) + the probe before training + one pass over the 96 rows; nothing per step,
    # nor for the probe after training
    assert sum(calls) == 32 + ROWS + ROWS and cached.report.steps == 10 * 3
    calls.clear()
    monkeypatch.setattr(module, "CACHE_BYTES", 0)                  # too big to keep: run at every step
    every = distill(teacher, student, data, epochs=10, progress=False)
    assert not every.report.teacher_cached and sum(calls) == 32 + ROWS + 10 * ROWS + ROWS
    for a, b in zip(cached.model.state_dict().values(), every.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    items = [{"tokens": torch.randn(4, length, FEATURES, generator=g)} for length in (3, 5, 7)]
    monkeypatch.undo()
    encoder = Encoder(16, "embedding").eval()
    calls = _counted(encoder)
    d = distill(encoder, Encoder(8, "embedding", seed=1), items, epochs=5, progress=False)
    assert d.report.teacher_cached and len(calls) == 1 + 3 + 3      # items as given: each item once
