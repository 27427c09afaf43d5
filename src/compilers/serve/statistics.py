"""Triton's statistics extension: what each loaded model version has done since it loaded, in Triton's fields, so
that Triton's tools (perf_analyzer, model analyzer, tritonclient's `get_inference_statistics`) profile this server
as they profile Triton. `GET /v2/models[/{m}[/versions/{v}]]/stats` and gRPC ModelStatistics answer
`Statistics.json` of the versions asked for.

A request's stages, as Triton splits them, mapped onto this server's:

    queue           from its arrival in the batcher's queue to its engine call being picked
    compute_input   preparing the engine's inputs: a pipeline's pre-processing (tokenizing, decoding images) and a
                    handler's preprocess, per request; then the call's hand-over to a worker thread, concatenation
                    and padding (`BatchStats.input_seconds`)
    compute_infer   the engine's run over the whole batch (`BatchStats.infer_seconds`)
    compute_output  splitting and trimming the batch's outputs and handing them back to the event loop
                    (`BatchStats.output_seconds`); then a pipeline's naming and labels and a handler's postprocess,
                    per request
    success / fail  the request in ModelService.infer, from its arrival to its answer (before the transport
                    encodes it): its count and total time

As in Triton, each request of an engine call adds the call's compute times to its own (`inference_stats`), while
`batch_stats` count each call once per batch size; `inference_count` counts rows (samples), `execution_count` engine
calls; the counts of queue and compute are the success count (Triton reports them so; no response cache here:
cache_hit and cache_miss stay 0). Their times are added when the engine call ends, so a request that fails after
its call (a pipeline's labels, a handler's postprocess, a client gone) leaves its times in, where Triton would not.

What counts as a failure follows Triton's core: a request that fails after it was queued (the engine failed, a
Ray replica was lost, its client cancelled or its deadline passed while it waited, its post-processing failed).
A request refused before it is queued is no inference and is not counted: an invalid request (400; Triton's
request normalization), a full queue (503; Triton's failed enqueue), an unknown or unloaded model.

Every figure is recorded where the Prometheus metrics are, from the same measurements (ModelService's batch hook
and its `infer`), in the event loop's thread: plain integer adds, no lock. A version loaded anew (a reload) starts
from zero, as Triton's counts restart with a model's load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .batcher import BatchStats


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


@dataclass
class Duration:
    """Triton's StatisticDuration: how many times, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += _ns(seconds)

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _BatchSize:
    """Triton's InferBatchStatistics of one batch size: engine calls, and their stages' total nanoseconds."""

    count: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass
class Statistics:
    """One loaded version's statistics (see the module doc)."""

    last_inference: int = 0                  # ms since the epoch, at the end of the last engine call
    inference_count: int = 0                 # rows
    execution_count: int = 0                 # engine calls
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    batches: dict[int, _BatchSize] = field(default_factory=dict)

    def batch(self, stats: BatchStats) -> None:
        """An engine call ended (the batcher's hook)."""
        self.last_inference = time.time_ns() // 1_000_000
        self.execution_count += 1
        self.inference_count += stats.rows
        self.queue_ns += _ns(sum(stats.queue_seconds))
        put, infer, out = _ns(stats.input_seconds), _ns(stats.infer_seconds), _ns(stats.output_seconds)
        size = self.batches.setdefault(stats.rows, _BatchSize())
        size.count += 1
        size.input_ns, size.infer_ns, size.output_ns = size.input_ns + put, size.infer_ns + infer, size.output_ns + out
        self.input_ns += put * stats.requests         # each request of the call took part in all of it
        self.infer_ns += infer * stats.requests
        self.output_ns += out * stats.requests

    def pre(self, seconds: float) -> None:
        """A request's own input preparation (a pipeline's pre-processing, a handler's preprocess)."""
        self.input_ns += _ns(seconds)

    def post(self, seconds: float) -> None:
        """A request's own output work (a pipeline's naming and labels, a handler's postprocess)."""
        self.output_ns += _ns(seconds)

    def json(self, name: str, version: int) -> dict[str, Any]:
        """The version's entry in `model_stats`, with every field Triton's server answers."""
        done = self.success.count                  # no response cache: every success was computed
        stage = lambda ns: {"count": done, "ns": ns}     # noqa: E731
        return {
            "name": name, "version": str(version), "last_inference": self.last_inference,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.json(), "fail": self.fail.json(), "queue": stage(self.queue_ns),
                "compute_input": stage(self.input_ns), "compute_infer": stage(self.infer_ns),
                "compute_output": stage(self.output_ns),
                "cache_hit": Duration().json(), "cache_miss": Duration().json()},
            "response_stats": {},
            "batch_stats": [{"batch_size": rows, "compute_input": {"count": b.count, "ns": b.input_ns},
                             "compute_infer": {"count": b.count, "ns": b.infer_ns},
                             "compute_output": {"count": b.count, "ns": b.output_ns}}
                            for rows, b in sorted(self.batches.items())],
            "memory_usage": [],
        }
