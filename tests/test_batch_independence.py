"""A server never answers a client with something that depends on other clients' requests (issue 18, item 2).

compile checks, in eager, that each row of a batch is answered as that row alone (rows taken from the example
and samples, or the example's one row and a flipped copy of it), records it in the Signature, and neither
`compilers serve` nor Ray Serve (the same Combiner) runs two requests of a model whose rows mix in one call.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn

import compilers
from compilers.serve.batcher import Batching, Combiner
from compilers.serve.repository import publish
from compilers.serve.server import running

from test_batcher import serve


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
