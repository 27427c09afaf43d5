"""The dynamic batcher on real compiled models: requests grouped along the batch dim, split back, padded
where declared (and equal to unpadded runs), bounded queue, errors kept to their requests."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from torch import nn

import compilers
from compilers.errors import ConfigError, InputError
from compilers.serve.batcher import Batcher, Batching, QueueFull


class Pool(nn.Module):
    """Token embeddings, a per-token output and a masked mean: padding with mask 0 changes nothing."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lin = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        h = self.lin(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1), h


SEQ = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


@pytest.fixture(scope="module")
def pool():
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 5))
    return compilers.compile(Pool().eval(), "ort-cpu", {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             dynamic_shapes=SEQ)


def serve(cm, config, requests, delays=None):
    """Start a batcher, send `requests` concurrently (each after its delay in seconds, if given), return the
    results (outputs or exceptions) and the batches run."""
    batches = []

    async def main():
        b = Batcher(cm.run_flat, cm.signature, config, on_batch=lambda s: batches.append(s))
        await b.start()

        async def one(i, req):
            await asyncio.sleep(delays[i] if delays else 0)
            return await b.infer(req)
        try:
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)), return_exceptions=True)
        finally:
            await b.stop()
    return asyncio.run(main()), batches


def test_concurrent_requests_share_engine_calls_and_get_their_own_rows(mlp):
    rng = np.random.default_rng(0)
    requests = [[rng.standard_normal((1, 6), dtype=np.float32)] for _ in range(16)]
    results, batches = serve(mlp, Batching(max_batch_size=8, max_queue_delay_ms=50), requests)
    assert sum(b.rows for b in batches) == 16
    assert max(b.rows for b in batches) == 8          # full batches go at once
    for req, out in zip(requests, results):
        np.testing.assert_allclose(out[0], mlp.run_flat(req)[0], rtol=1e-6, atol=1e-6)


def test_a_lone_request_waits_out_the_delay_then_runs_alone(mlp):
    t0 = time.perf_counter()
    results, batches = serve(mlp, Batching(max_batch_size=8, max_queue_delay_ms=30),
                             [[np.ones((1, 6), np.float32)]])
    assert [b.rows for b in batches] == [1]
    assert 0.025 <= time.perf_counter() - t0 < 2
    assert results[0][0].shape == (1, 3)


def test_requests_of_several_samples_and_preferred_sizes(mlp):
    requests = [[np.full((n, 6), n, np.float32)] for n in (2, 2, 3, 1)]
    results, batches = serve(mlp, Batching(max_batch_size=8, max_queue_delay_ms=500, preferred_batch_sizes=(4,)),
                             requests, delays=[0, 0.03, 0.06, 0.09])
    assert [b.rows for b in batches] == [4, 4]          # 2 + 2, then 3 + 1: sent at a preferred size, not at 8
    for req, out in zip(requests, results):
        assert out[0].shape == (len(req[0]), 3)
        np.testing.assert_allclose(out[0], mlp.run_flat(req)[0], rtol=1e-6, atol=1e-6)


def test_padded_batches_equal_unpadded_runs(pool):
    rng = np.random.default_rng(1)
    requests = []
    for seq in (3, 7, 5, 7):
        ids = rng.integers(1, 50, (1, seq))
        requests.append([ids, np.ones_like(ids)])
    config = Batching(max_batch_size=4, max_queue_delay_ms=100, pad={"input_ids": 0, "attention_mask": 0})
    results, batches = serve(pool, config, requests)
    assert [b.rows for b in batches] == [4]             # different lengths, one call
    for req, (pooled, tokens) in zip(requests, results):
        alone = pool.run_flat(req)
        assert tokens.shape == alone[1].shape == (1, req[0].shape[1], 4)
        np.testing.assert_allclose(pooled, alone[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tokens, alone[1], rtol=1e-5, atol=1e-6)


def test_without_padding_only_equal_lengths_batch_together(pool):
    requests = [[np.ones((1, n), np.int64), np.ones((1, n), np.int64)] for n in (3, 4, 3, 4)]
    results, batches = serve(pool, Batching(max_batch_size=4, max_queue_delay_ms=100), requests)
    assert sorted(b.rows for b in batches) == [2, 2]
    assert [r[1].shape[1] for r in results] == [3, 4, 3, 4]


def test_a_full_queue_refuses_at_once_and_an_oversized_request_is_an_input_error(mlp):
    requests = [[np.ones((1, 6), np.float32)] for _ in range(5)] + [[np.ones((9, 6), np.float32)]]
    results, _ = serve(mlp, Batching(max_batch_size=8, max_queue_delay_ms=100, queue_size=3), requests)
    assert sum(isinstance(r, QueueFull) for r in results) == 2
    assert sum(isinstance(r, list) for r in results) == 3
    assert isinstance(results[-1], InputError) and "max_batch_size" in str(results[-1])


def test_a_bad_request_is_refused_alone(mlp):
    requests = [[np.ones((1, 6), np.float32)], [np.ones((1, 5), np.float32)], [np.ones((1, 6), np.float64)]]
    results, _ = serve(mlp, Batching(max_queue_delay_ms=20), requests)
    assert isinstance(results[0], list)
    assert isinstance(results[1], InputError) and "dim 1 is 5" in str(results[1])
    assert isinstance(results[2], InputError) and "dtype" in str(results[2])


def test_an_engine_failure_reaches_the_requests_of_that_call_only(mlp):
    calls = []

    def flaky(flat):
        calls.append(len(flat[0]))
        if len(calls) == 1:
            raise RuntimeError("engine fell over")
        return mlp.run_flat(flat)

    class Flaky:
        run_flat = staticmethod(flaky)
        signature = mlp.signature
    first = [[np.ones((1, 6), np.float32)] for _ in range(2)]
    later = [[np.ones((1, 6), np.float32)]]
    results, _ = serve(Flaky, Batching(max_batch_size=2, max_queue_delay_ms=5), first + later, delays=[0, 0, 0.1])
    assert all(isinstance(r, RuntimeError) for r in results[:2])
    assert isinstance(results[2], list) and results[2][0].shape == (1, 3)


def test_stop_drains_the_queue(mlp):
    async def main():
        b = Batcher(mlp.run_flat, mlp.signature, Batching(max_batch_size=4, max_queue_delay_ms=10_000))
        await b.start()
        tasks = [asyncio.create_task(b.infer([np.ones((1, 6), np.float32)])) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert b.queued == 3                   # waiting for a fourth or the 10 s delay
        await b.stop()                         # sends them now
        return await asyncio.gather(*tasks)
    assert [r[0].shape for r in asyncio.run(main())] == [(1, 3)] * 3


def test_configurations_that_cannot_batch_are_refused(pool, mlp):
    with pytest.raises(ConfigError, match="does not take"):
        Batcher(pool.run_flat, pool.signature, Batching(pad={"tokens": 0}))
    with pytest.raises(ConfigError, match="add it to"):
        Batcher(pool.run_flat, pool.signature, Batching(pad={"input_ids": 0}))
    summed = compilers.compile(nn.Sequential(nn.Linear(6, 3)).eval(), "ort-cpu", (torch.randn(4, 6),),
                               dynamic_shapes={"input": {}})
    with pytest.raises(ConfigError, match="max_batch_size = 1"):
        Batcher(summed.run_flat, summed.signature, Batching(max_batch_size=4))
    Batcher(summed.run_flat, summed.signature, Batching(max_batch_size=1))   # no batching: fine


class Gate:
    """An engine that holds its first call until released, and records every call's batched shape: requests sent
    meanwhile queue up behind a busy instance."""

    def __init__(self, cm):
        import threading
        self.cm, self.entered, self.release = cm, threading.Event(), threading.Event()
        self.shapes: list[tuple[int, ...]] = []

    def run(self, flat):
        self.shapes.append(flat[0].shape)
        if len(self.shapes) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self.cm.run_flat(flat)


def gated(cm, config, first, later):
    """`first` sent to a free instance, `later` sent (in order) while its call is held; results and call shapes."""
    gate = Gate(cm)

    async def main():
        b = Batcher(gate.run, cm.signature, config)
        await b.start()
        try:
            head = asyncio.create_task(b.infer(first))
            assert await asyncio.to_thread(gate.entered.wait, 30)     # went at once: no delay, no company needed
            rest = []
            for req in later:
                rest.append(asyncio.create_task(b.infer(req)))
                await asyncio.sleep(0)                               # queued in this order
            assert b.queued == len(later)
            gate.release.set()
            return await asyncio.gather(head, *rest)
        finally:
            gate.release.set()
            await b.stop()
    return asyncio.run(main()), gate.shapes


def test_a_free_instance_takes_a_lone_request_at_once_and_requests_gather_while_it_is_busy(mlp):
    rng = np.random.default_rng(2)
    requests = [[rng.standard_normal((1, 6), dtype=np.float32)] for _ in range(6)]
    results, shapes = gated(mlp, Batching(max_batch_size=4), requests[0], requests[1:])
    assert [s[0] for s in shapes] == [1, 4, 1]     # alone at once; then the 5 that gathered, 4 + 1
    for req, out in zip(requests, results):
        np.testing.assert_allclose(out[0], mlp.run_flat(req)[0], rtol=1e-6, atol=1e-6)


def _ids(n, seed=0):
    ids = np.random.default_rng(seed + n).integers(1, 50, (1, n))
    return [ids, np.ones_like(ids)]


def test_padded_requests_gather_by_length_the_oldest_first(pool):
    config = Batching(max_batch_size=2, pad={"input_ids": 0, "attention_mask": 0})
    later = [_ids(n) for n in (3, 20, 4, 19, 5)]
    results, shapes = gated(pool, config, _ids(7), later)
    # the oldest (3) joined by the closest (4); then the oldest left (20) by 19; then 5 alone
    assert shapes == [(1, 7), (2, 4), (2, 20), (1, 5)]
    for req, (pooled, tokens) in zip([_ids(7), *later], results):
        alone = pool.run_flat(req)
        np.testing.assert_allclose(pooled, alone[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tokens, alone[1], rtol=1e-5, atol=1e-6)


def test_a_token_budget_bounds_rows_times_padded_length(pool):
    config = Batching(max_batch_size=8, max_batch_tokens=40, pad={"input_ids": 0, "attention_mask": 0})
    later = [_ids(n) for n in (10, 30, 9, 10, 8, 41)]
    results, shapes = gated(pool, config, _ids(2), later)
    # 10 + 9 + 10 + 8 padded to 10: 4 x 10 = 40 tokens; 30 then 41 each alone (a request alone always goes)
    assert shapes == [(1, 2), (4, 10), (1, 30), (1, 41)]
    for req, (pooled, _) in zip([_ids(2), *later], results):
        np.testing.assert_allclose(pooled, pool.run_flat(req)[0], rtol=1e-5, atol=1e-6)


def test_an_instance_takes_the_next_call_without_waiting_for_the_event_loop(mlp):
    """The engine thread starts the next queued call the moment one ends, even while the event loop is busy."""
    gate = Gate(mlp)

    async def main():
        b = Batcher(gate.run, mlp.signature, Batching(max_batch_size=1))
        await b.start()
        try:
            tasks = [asyncio.create_task(b.infer([np.full((1, 6), i, np.float32)])) for i in range(4)]
            assert await asyncio.to_thread(gate.entered.wait, 30)
            assert b.queued == 3
            gate.release.set()
            deadline = time.perf_counter() + 30
            while len(gate.shapes) < 4 and time.perf_counter() < deadline:
                time.sleep(0.01)                   # the event loop blocked: no coroutine runs
            calls_while_blocked = len(gate.shapes)
            return calls_while_blocked, await asyncio.gather(*tasks)
        finally:
            gate.release.set()
            await b.stop()
    calls, results = asyncio.run(main())
    assert calls == 4
    for i, out in enumerate(results):
        np.testing.assert_allclose(out[0], mlp.run_flat([np.full((1, 6), i, np.float32)])[0], rtol=1e-6)
