"""Prometheus metrics of a server, per model and version: requests by outcome, a pipeline's pre- and
post-processing time, time in the queue, rows per engine call, engine time, end-to-end request time, and which
versions are loaded (the stages of a request's latency, as Triton splits them: queue, compute_input,
compute_infer, compute_output). Each server has its own
registry (served at /metrics), so several servers in one process do not mix their counts."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELS = ("model", "version")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("compilers_inference_requests", "Inference requests by outcome: ok, invalid "
                                "(HTTP 400), rejected (queue full, 503), failed (engine error, 500)",
                                (*_LABELS, "outcome"), registry=r)
        self.preprocess_seconds = Histogram("compilers_preprocess_seconds", "Time a pipeline's pre-processing "
                                            "took for one request (tokenizing, decoding images)", _LABELS,
                                            buckets=_SECONDS, registry=r)
        self.postprocess_seconds = Histogram("compilers_postprocess_seconds", "Time a pipeline's post-processing "
                                             "outside the graph took for one request (naming, labels)", _LABELS,
                                             buckets=_SECONDS, registry=r)
        self.queue_seconds = Histogram("compilers_queue_seconds", "Time a request waited in the batcher's queue",
                                       _LABELS, buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("compilers_batch_size", "Rows (samples) per engine call", _LABELS,
                                    buckets=_ROWS, registry=r)
        self.inference_seconds = Histogram("compilers_inference_seconds", "Time of one engine call (a whole batch)",
                                           _LABELS, buckets=_SECONDS, registry=r)
        self.request_seconds = Histogram("compilers_request_seconds", "Time from a request's body read to its "
                                         "response, in the server", _LABELS, buckets=_SECONDS, registry=r)
        self.loaded = Gauge("compilers_version_loaded", "1 while the version is loaded and serving", _LABELS,
                            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
