"""`compilers perf`: put a running server under load, as Triton's perf_analyzer does, and say where the time goes.

For each concurrency level, that many connections each keep one request in flight, back to back, for `duration`
seconds or `max_requests` requests in all, whichever comes first (both always bound a level), after a short
warm-up that is not counted. The connections are spread over worker processes (`processes`, or
`default_processes`: 1 up to 8 connections, else 2), each one asyncio event loop, all opening the measured window
together (`load`: the requests are built once per input entry and sent as bytes).

The protocols (`PROTOCOLS`; a class for each reads the model's metadata): `http`, the Open Inference Protocol over
HTTP/REST at the server's URL, and `grpc`, the same protocol over gRPC at the server's `--grpc-port`, host:port.
Both send tensors raw (HTTP's binary extension, gRPC's `raw_input_contents`), BYTES too, and check the first
answer to each entry in full. Several protocols are measured in one run side by side: at each concurrency every
protocol takes its turn before the next concurrency, so the machine's drift hits them alike.

A level (a concurrency over a protocol) reports:
- throughput: successful requests per second, and samples (rows) per second;
- client latency p50 / p90 / p95 / p99 of the successful requests, in ms (send to answer parsed);
- errors: how many, and the first few distinct messages (a failed request is never retried);
- the server's split, from its Prometheus `/metrics` (always over HTTP) read before and after the level (the
  deltas of the `compilers_*_seconds` histograms, labels model and version): mean ms in the queue, per engine
  call (a whole batch), in a pipeline's pre- and post-processing, and end to end in the server; and the mean
  rows per engine call (`compilers_batch_size`). The client's mean latency minus the server's is the network and
  the protocol stacks of both sides;
- the load generator's own cost: its processes' CPU seconds per request and the share of a core they used, and
  `client_limited` when one process used CORE_LIMIT of a core or more: then the client, not the server, was the
  limit (the table says so: more --processes, or another machine).

Inputs: synthetic by default, from the model's metadata (GET /v2/models/M; over HTTP when HTTP is measured, as
only its answer carries `max_batch_size` and the batch dim): a -1 first dim is the batch dim, of size `batch`,
other -1 dims are 1 unless `shapes` gives the dims after the batch dim (`--shape name:d1,d2`, as perf_analyzer's);
numbers are random with a fixed seed (floats standard normal, integers 0-9, booleans), BYTES inputs short ASCII
words. Or a JSON file in perf_analyzer's `--input-data` form, its entries cycled through:

    {"data": [{"INPUT": [1, 2, 3, 4, 5, 6]},                              (flat: the model's shape, as above)
              {"INPUT": [[1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]]},          (nested: its own shape)
              {"INPUT": {"content": [1, 2, 3, 4, 5, 6], "shape": [1, 6]}},  (explicit shape, batch dim included)
              {"TEXT": ["a sentence", "another one"]}]}                     (BYTES: strings)

The addresses are checked (`addresses`) before any client is built. Client side only: nothing here imports
the server.
"""
from __future__ import annotations

import json
import math
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..bench import text_table
from ..errors import InputError, brief
from .addresses import METRICS_FORM, grpc_address, http_url
from .load import ERRORS_KEPT, Share, Target, Workers, grpc_payloads, http_payloads

STAGES = {    # the server's split: key in the report -> its histogram in /metrics
    "queue": "compilers_queue_seconds", "inference": "compilers_inference_seconds",
    "preprocess": "compilers_preprocess_seconds", "postprocess": "compilers_postprocess_seconds",
    "request": "compilers_request_seconds"}
BATCH_SIZE = "compilers_batch_size"
PERCENTILES = (50, 90, 95, 99)
CORE_LIMIT = 0.8                 # a load-generator process past this share of one core is the limit
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


# -- the protocols -----------------------------------------------------------------------------------------------
class HttpClient:
    """The model's metadata over HTTP/REST (the Open Inference Protocol), through tritonclient.http."""

    def __init__(self, url: str, model: str, version: str = "", timeout: float = 30.0):
        try:
            import httptools  # noqa: F401  (the load's HTTP parser, in the worker processes)
            import tritonclient.http as http
        except ImportError as e:
            raise InputError(f"compilers perf needs tritonclient's HTTP client and httptools ({e.name} is "
                             "missing): pip install 'compilers[bench]'") from None
        parsed = http_url(url)
        self.model, self.version = model, version
        self.client = http.InferenceServerClient(parsed.netloc + parsed.path.rstrip("/"),
                                                 ssl=parsed.scheme == "https", connection_timeout=timeout,
                                                 network_timeout=timeout)

    def metadata(self) -> dict[str, Any]:
        return self.client.get_model_metadata(self.model, self.version)

    def close(self) -> None:
        self.client.close()


class GrpcClient:
    """The model's metadata over gRPC (Triton's GRPCInferenceService) at host:port, through tritonclient.grpc."""

    def __init__(self, address: str, model: str, version: str = "", timeout: float = 30.0):
        try:
            import tritonclient.grpc as grpc
        except ImportError as e:
            raise InputError(f"compilers perf --protocol grpc needs tritonclient's gRPC client ({e.name} is "
                             "missing): pip install 'compilers[grpc]'") from None
        self.module, self.model, self.version, self.timeout = grpc, model, version, timeout
        self.client = grpc.InferenceServerClient(grpc_address(address))

    def metadata(self) -> dict[str, Any]:
        """The model's metadata as HTTP gives it (shapes as ints; gRPC's has no `parameters`). ConnectionError
        when nothing answers at the address."""
        try:
            self.client.is_server_live(client_timeout=self.timeout)
        except self.module.InferenceServerException as e:
            raise ConnectionError(" ".join(str(e).split())) from None
        meta = self.client.get_model_metadata(self.model, self.version, as_json=True, client_timeout=self.timeout)
        for tensor in [*meta.get("inputs", []), *meta.get("outputs", [])]:
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]      # int64s come as JSON strings
        return meta

    def close(self) -> None:
        self.client.close()


PROTOCOLS: dict[str, type] = {"http": HttpClient, "grpc": GrpcClient}      # protocol -> its metadata probe


# -- inputs -----------------------------------------------------------------------------------------------------
def parse_shapes(items: Sequence[str] | None) -> dict[str, list[int]]:
    """`--shape name:d1,d2` items -> {name: [d1, d2]}."""
    shapes = {}
    for item in items or ():
        name, sep, dims = item.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            shapes[name] = []
        if not sep or not name or not shapes[name] or min(shapes[name]) < 1:
            raise InputError(f"--shape takes name:d1,d2 (positive dims after the batch dim), not {item!r}")
    return shapes


class Inputs:
    """What the model takes (from its metadata) and how to shape it: `batched` inputs have a -1 first dim."""

    def __init__(self, metadata: dict[str, Any], batch: int, shapes: dict[str, list[int]]):
        self.specs = {s["name"]: s for s in metadata.get("inputs", [])}
        if not self.specs:
            raise InputError(f"model {metadata.get('name')!r}'s metadata lists no inputs")
        unknown = set(shapes) - set(self.specs)
        if unknown:
            raise InputError(f"--shape names {', '.join(sorted(unknown))}, not an input of the model "
                             f"(its inputs: {', '.join(self.specs)})")
        has_batch = (metadata.get("parameters") or {}).get("batch_dim", "") is not None
        self.batched = {n for n, s in self.specs.items() if has_batch and s["shape"][:1] == [-1]}
        self.batch, self.shapes = batch, shapes

    def shape(self, name: str) -> list[int]:
        dims = list(self.specs[name]["shape"])
        rest = dims[1:] if name in self.batched else dims
        if name in self.shapes:
            given = self.shapes[name]
            if len(given) != len(rest) or any(d not in (-1, g) for d, g in zip(rest, given)):
                raise InputError(f"--shape {name}:{','.join(map(str, given))} does not fit its shape {dims} "
                                 f"({'after the batch dim ' if name in self.batched else ''}it needs "
                                 f"{len(rest)} dim{'s' * (len(rest) != 1)}; its -1 dims are free)")
            rest = given
        rest = [1 if d == -1 else d for d in rest]
        return [self.batch, *rest] if name in self.batched else rest

    def rows(self, arrays: dict[str, np.ndarray]) -> int:
        """Samples in a request: its first batched input's rows (1 for a model without a batch dim)."""
        name = next((n for n in self.specs if n in self.batched), None)
        return int(np.shape(arrays[name])[0]) if name is not None else 1

    def synthetic(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        arrays = {}
        for name, spec in self.specs.items():
            shape, datatype = self.shape(name), spec["datatype"]
            if datatype == "BYTES":
                arrays[name] = np.array([w.encode() for w in rng.choice(WORDS, size=shape).ravel()],
                                        dtype=object).reshape(shape)
            elif datatype == "BOOL":
                arrays[name] = rng.random(shape) < 0.5
            else:
                dtype = _numpy_dtype(datatype)
                numbers = rng.standard_normal(shape) if np.dtype(dtype).kind == "f" else rng.integers(0, 10, shape)
                arrays[name] = numbers.astype(dtype)
        return arrays

    def read(self, path: str | Path) -> list[dict[str, np.ndarray]]:
        """The entries of a perf_analyzer-style `--input-data` JSON file (see the module's docstring)."""
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise InputError(f"--input-data {path}: {brief(e)}") from None
        except ValueError as e:
            raise InputError(f"--input-data {path} is not JSON: {e}") from None
        entries = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries or not all(isinstance(x, dict) for x in entries):
            raise InputError(f"--input-data {path} must hold {{\"data\": [{{\"INPUT\": [values...]}}, ...]}}, "
                             "a non-empty list of entries, each naming every input")
        return [self._entry(path, i, entry) for i, entry in enumerate(entries)]

    def _entry(self, path: Any, i: int, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        where = f"--input-data {path}, entry {i}"
        if set(entry) != set(self.specs):
            raise InputError(f"{where} names {sorted(entry)}; the model's inputs are {sorted(self.specs)}")
        arrays = {}
        for name, value in entry.items():
            datatype = self.specs[name]["datatype"]
            shape = None
            if isinstance(value, dict):
                if "content" not in value or "shape" not in value:
                    raise InputError(f"{where}: input {name} must be a list or {{\"content\": [...], \"shape\": "
                                     "[...]}}")
                value, shape = value["content"], value["shape"]
            try:
                if datatype == "BYTES":
                    x = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in np.ravel(value)],
                                 dtype=object).reshape(np.shape(value))
                else:
                    x = np.array(value, dtype=bool if datatype == "BOOL" else _numpy_dtype(datatype))
                if shape is not None:
                    x = x.reshape(shape)
                elif x.ndim == 1 and len(self.shape(name)) != 1:        # flat: the model's shape
                    x = x.reshape(self.shape(name))
            except (TypeError, ValueError) as e:
                raise InputError(f"{where}: input {name} ({datatype}) does not fit: {e}") from None
            arrays[name] = x
        return arrays


def _numpy_dtype(datatype: str) -> Any:
    from tritonclient.utils import triton_to_np_dtype
    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise InputError(f"datatype {datatype} has no numpy type here")
    return dtype


# -- the server's metrics ---------------------------------------------------------------------------------------
def scrape(metrics_url: str, model: str, version: str = "", timeout: float = 10.0) -> dict[str, tuple[float, float]]:
    """The (sum, count) of each of the server's histograms for this model (this version, or all of its
    versions), from its Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        text = r.read().decode()
    wanted = {*STAGES.values(), BATCH_SIZE}
    totals = {name: [0.0, 0.0] for name in wanted}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for s in family.samples:
            if s.labels.get("model") != model or (version and s.labels.get("version") != version):
                continue
            if s.name == f"{family.name}_sum":
                totals[family.name][0] += s.value
            elif s.name == f"{family.name}_count":
                totals[family.name][1] += s.value
    return {name: (total, count) for name, (total, count) in totals.items()}


def split(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Mean ms per stage (None where nothing was observed, as pre- and post-processing of a plain model), the
    mean rows per engine call, the number of engine calls and of requests the server timed, between two
    scrapes."""
    def delta(name):
        return after[name][0] - before[name][0], after[name][1] - before[name][1]
    out: dict[str, Any] = {}
    for key, name in STAGES.items():
        total, count = delta(name)
        out[f"{key}_ms"] = 1000 * total / count if count > 0 else None
    total, count = delta(BATCH_SIZE)
    out["batch_size"] = total / count if count > 0 else None
    out["engine_calls"] = int(count)
    out["requests"] = int(delta(STAGES["request"])[1])
    return out


# -- one level --------------------------------------------------------------------------------------------------
@dataclass
class Level:
    """The figures of one concurrency level over one protocol."""
    concurrency: int
    requests: int                         # answered without error
    samples: int                          # rows in those
    seconds: float                        # the measured window: its start to the last answer
    latency_ms: dict[str, float | None]   # p50 p90 p95 p99 mean, of the successful requests
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    client_cpu_seconds: float = 0.0
    server: dict[str, Any] | None = None  # `split`; None when /metrics could not be read
    server_note: str | None = None
    protocol: str = "http"
    processes: int = 1                    # the load generator's worker processes
    client_process_cores: list[float] = field(default_factory=list)   # each one's CPU seconds / its window
    client_limited: bool = False          # a process used CORE_LIMIT of a core or more: the client was the limit

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def client_cpu_ms_per_request(self) -> float | None:
        sent = self.requests + self.errors
        return 1000 * self.client_cpu_seconds / sent if sent else None

    @property
    def client_cores(self) -> float:
        return self.client_cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "protocol": self.protocol, "requests": self.requests,
                "samples": self.samples, "seconds": self.seconds, "throughput": self.throughput,
                "samples_per_second": self.samples_per_second, "latency_ms": self.latency_ms,
                "errors": self.errors, "error_messages": self.error_messages,
                "client_cpu_seconds": self.client_cpu_seconds,
                "client_cpu_ms_per_request": self.client_cpu_ms_per_request, "client_cores": self.client_cores,
                "processes": self.processes, "client_process_cores": self.client_process_cores,
                "client_limited": self.client_limited, "server": self.server, "server_note": self.server_note}


def default_processes(concurrency: int) -> int:
    """Worker processes for a level when --processes is not given: one holds 8 connections well below a core
    on this load generator (see benchmarks/perf_client.py); past that, two."""
    return 1 if concurrency <= 8 else 2


def run_level(workers: Workers, protocol: str, n: int, processes: int, *, duration: float, max_requests: int,
              warmup: float, timeout: float, snapshot: Callable[[], Any] = lambda: None) -> tuple[Level, Any, Any]:
    """One level of `n` connections over `processes` of `workers`; returns it without its server split, and
    the snapshots (`snapshot()`) taken as the measured window opened and after it closed."""
    shares, before, after = workers.level(protocol, n, processes, duration=duration, max_requests=max_requests,
                                          warmup=warmup, timeout=timeout, snapshot=snapshot)
    return merge(n, protocol, shares), before, after


def merge(n: int, protocol: str, shares: Sequence[Share]) -> Level:
    """A level from its processes' shares: latencies pooled, counts and CPU seconds summed, the window the
    longest, and `client_limited` when a process used CORE_LIMIT of a core or more."""
    latencies = np.array([x for s in shares for x in s.latencies]) * 1000
    ms = {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(latencies, PERCENTILES))} \
        if latencies.size else {f"p{p}": None for p in PERCENTILES}
    ms["mean"] = float(latencies.mean()) if latencies.size else None
    messages = list(dict.fromkeys(m for s in shares for m in s.messages))[:ERRORS_KEPT]
    cores = [s.cpu_seconds / s.seconds if s.seconds > 0 else 0.0 for s in shares]
    return Level(n, int(latencies.size), sum(s.samples for s in shares), max((s.seconds for s in shares), default=0.0),
                 ms, sum(s.errors for s in shares), messages, sum(s.cpu_seconds for s in shares),
                 protocol=protocol, processes=len(shares), client_process_cores=cores,
                 client_limited=max(cores, default=0.0) >= CORE_LIMIT)


# -- a run ------------------------------------------------------------------------------------------------------
@dataclass
class Perf:
    """A run: its settings, what it sent, and a Level per concurrency and protocol (each concurrency's
    protocols side by side, in the order they ran)."""
    url: str                       # the server's HTTP address (its /metrics too)
    model: str
    version: str
    protocols: dict[str, str]      # protocol -> the address it was measured at
    settings: dict[str, Any]
    inputs: dict[str, Any]
    levels: list[Level] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "version": self.version, "protocols": self.protocols,
                "settings": self.settings, "inputs": self.inputs, "levels": [x.to_dict() for x in self.levels]}

    def table(self) -> str:
        """Plain-text tables: the client's view, the server's split, then errors and notes."""
        s = self.settings
        where = " and ".join(f"{address} ({protocol})" for protocol, address in self.protocols.items())
        lines = [f"{self.model}{' version ' + self.version if self.version else ''} at {where}: "
                 f"{self.inputs['source']}, {s['duration']:g} s or {s['max_requests']} requests per level after "
                 f"{s['warmup']:g} s of warm-up"]
        head = ["concurrency", "protocol", "requests", "errors", "req/s", "samples/s", "p50 ms", "p90 ms", "p95 ms",
                "p99 ms", "client cpu ms/req", "client cores", "procs"]
        rows = [[str(x.concurrency), x.protocol, str(x.requests), str(x.errors), figure(x.throughput),
                 figure(x.samples_per_second), *(figure(x.latency_ms[f"p{p}"]) for p in PERCENTILES),
                 figure(x.client_cpu_ms_per_request), f"{x.client_cores:.2f}", str(x.processes)] for x in self.levels]
        lines += text_table(head, rows, left=(1,))
        lines += ["", "server split, means from /metrics over each level (client - server: network and both sides' "
                      "protocol stacks)"]
        head = ["concurrency", "protocol", "queue ms", "infer ms/call", "pre ms", "post ms", "server ms", "client ms",
                "client - server", "rows/call"]
        rows = []
        for x in self.levels:
            v, client = x.server or {}, x.latency_ms["mean"]
            server = v.get("request_ms")
            rows.append([str(x.concurrency), x.protocol, *(figure(v.get(k)) for k in (
                         "queue_ms", "inference_ms", "preprocess_ms", "postprocess_ms", "request_ms")), figure(client),
                         figure(client - server if client is not None and server is not None else None),
                         figure(v.get("batch_size"))])
        lines += text_table(head, rows, left=(1,))
        for x in self.levels:
            at = f"concurrency {x.concurrency} over {x.protocol}"
            if x.errors:
                lines.append(f"{at}: {x.errors} errors, first: " + " | ".join(x.error_messages))
            if x.server_note:
                lines.append(f"{at}: {x.server_note}")
            if x.client_limited:
                busiest = max(x.client_process_cores, default=x.client_cores)
                lines.append(f"{at}: the client was the limit: a load-generator process used {busiest:.2f} of a core "
                             f"({x.processes} process{'es' * (x.processes != 1)}); these figures understate the "
                             + (f"server: rerun with --processes {min(2 * x.processes, x.concurrency)}, with cores to "
                                "spare for them" if x.processes < x.concurrency else
                                "server: run the load generator on another machine"))
        return "\n".join(lines)


def figure(v: float | None) -> str:
    """A measured figure for a table: 3 significant digits, whole numbers from 1000; "-" for none."""
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def measure(url: str, model: str, *, version: str = "", protocols: Sequence[str] = ("http",),
            grpc_url: str | None = None, concurrency: Sequence[int] = (1, 4, 16, 64), duration: float = 10.0,
            max_requests: int = 100_000, warmup: float = 1.0, batch: int = 1,
            shapes: dict[str, list[int]] | None = None, input_data: str | Path | None = None,
            metrics_url: str | None = None, timeout: float = 30.0, seed: int = 0,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
            processes: int | None = None) -> Perf:
    """Load the server at `url` (HTTP; `grpc_url`, host:port, its gRPC address) with each concurrency in turn,
    over each of `protocols` in turn (see the module's docstring); `metrics_url` defaults to URL/metrics.
    `processes`: the load generator's worker processes per level (at most one per connection; default
    `default_processes`).
    InputError for an address not of its form (before any client is built), settings out of range, a server
    that can't be reached, a model it doesn't serve, inputs that don't fit, or a level where every request
    failed."""
    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or unknown:
        raise InputError(f"--protocol takes {' or '.join(PROTOCOLS)} (both: http,grpc), not "
                         f"{','.join(unknown) or 'nothing'}")
    if "grpc" in protocols and not grpc_url:
        raise InputError("--protocol grpc needs --grpc-url host:port, the server's gRPC address "
                         "(`compilers serve --grpc-port P`); URL stays its HTTP address, for /metrics")
    if grpc_url and "grpc" not in protocols:
        raise InputError("--grpc-url is the address for --protocol grpc; add grpc to --protocol (e.g. http,grpc)")
    for flag, value, least in (("--duration", duration, 0), ("--warmup", warmup, -1e-9), ("--timeout", timeout, 0)):
        if not value > least or not math.isfinite(value):
            raise InputError(f"{flag} must be {'positive' if least == 0 else 'zero or more'}, not {value}")
    if not concurrency or min(concurrency) < 1:
        raise InputError(f"--concurrency takes positive integers, not {list(concurrency)}")
    for flag, value in (("--max-requests", max_requests), ("--batch", batch), ("--processes", 1 if processes is None else processes)):
        if value < 1:
            raise InputError(f"{flag} must be positive, not {value}")
    parsed = http_url(url)                              # every address checked before any client is built
    addresses = {p: url if p == "http" else grpc_address(grpc_url) for p in protocols}
    if metrics_url:
        metrics_url = http_url(metrics_url, "--metrics-url", METRICS_FORM).geturl()
    else:
        metrics_url = f"{parsed.scheme}://{parsed.netloc}/metrics"
    probes: dict[str, Any] = {}
    try:
        metadata = {}
        for p in protocols:
            probes[p] = PROTOCOLS[p](addresses[p], model, version, timeout)
            metadata[p] = _metadata(probes[p], addresses[p], model, version)
        meta = metadata.get("http") or metadata[protocols[0]]    # HTTP's has max_batch_size and the batch dim
        inputs = Inputs(meta, batch, shapes or {})
        most = (meta.get("parameters") or {}).get("max_batch_size")
        if inputs.batched and isinstance(most, int) and most > 0 and batch > most:
            raise InputError(f"--batch {batch} is more than model {model!r}'s max_batch_size, {most}")
        entries = inputs.read(input_data) if input_data else [inputs.synthetic(seed)]
        datatypes = {n: s["datatype"] for n, s in inputs.specs.items()}
        outputs = tuple((o["name"], o["datatype"], tuple(int(d) for d in o["shape"])) for o in meta.get("outputs", []))
        rows = tuple(inputs.rows(e) for e in entries)
        try:
            targets = {p: Target(p, addresses[p], model, version, outputs, tuple(
                http_payloads(url, model, version, entries, datatypes) if p == "http" else
                grpc_payloads(model, version, entries, datatypes)), rows, timeout) for p in protocols}
        except Exception as e:
            raise InputError(f"the inputs cannot be sent as the model's datatypes: {brief(e)}") from None
    finally:
        for probe in probes.values():
            probe.close()
    first = entries[0]
    described = {"source": f"{input_data} ({len(entries)} entries)" if input_data else f"synthetic (seed {seed})",
                 "entries": len(entries),
                 "tensors": [{"name": n, "datatype": datatypes[n], "shape": list(np.shape(x))} for n, x in first.items()]}
    perf = Perf(url, model, version, addresses, {"duration": duration, "max_requests": max_requests,
                                                 "warmup": warmup, "batch": batch, "timeout": timeout,
                                                 "metrics_url": metrics_url, "processes": processes}, described)
    notes: list[str] = []

    def snapshot():
        try:
            return scrape(metrics_url, model, version)
        except Exception as e:
            notes.append(f"no server split: {metrics_url} could not be read ({brief(e, 200)})")
            return None

    per_level = {n: min(processes or default_processes(n), n) for n in concurrency}
    with Workers(max(per_level.values()), targets) as workers:
        for n in concurrency:
            for p in protocols:           # interleaved: each concurrency over every protocol before the next
                log(f"concurrency {n} over {p}: {warmup:g} s warm-up, then {duration:g} s or {max_requests} "
                    f"requests...")
                notes.clear()
                level, before, after = run_level(workers, p, n, per_level[n], duration=duration,
                                                 max_requests=max_requests, warmup=warmup, timeout=timeout,
                                                 snapshot=snapshot)
                if before is not None and after is not None:
                    level.server = split(before, after)
                level.server_note = notes[0] if notes else None
                perf.levels.append(level)
                if level.requests == 0 and level.errors:
                    raise InputError(f"every request failed at concurrency {n} over {p} ({level.errors}); the "
                                     f"first: {level.error_messages[0]}")
    return perf


def _metadata(client: Any, address: str, model: str, version: str) -> dict[str, Any]:
    """The model's metadata through a protocol's client; InputError for a server that can't be reached or that
    doesn't serve the model."""
    try:
        return client.metadata()
    except OSError as e:
        raise InputError(f"cannot reach a server at {address}: {brief(e)}; is `compilers serve` running there?") \
            from None
    except Exception as e:
        what = f"model {model!r}" + (f" version {version}" if version else "")
        raise InputError(f"{address} does not serve {what}: {' '.join(str(e).split())}") from None


def plot(perf: Perf, path: str | Path) -> Path:
    """Versus concurrency, a colour per protocol: throughput (samples/s); client latency (p99 solid, p50 dashed);
    and the server's split of a request's mean (client solid, in the server dashed, of it queued dotted). The
    format from the suffix (png, svg, pdf). Needs matplotlib (the `bench` extra)."""
    from ..plot import plot_format, pyplot, save
    plt = pyplot()
    from matplotlib.ticker import NullFormatter
    plot_format(path)
    fig, (thr, lat, server) = plt.subplots(1, 3, figsize=(14, 4.2))
    for protocol in perf.protocols:
        levels = [x for x in perf.levels if x.protocol == protocol and x.requests]
        xs = [x.concurrency for x in levels]
        line, = thr.plot(xs, [x.samples_per_second for x in levels], marker="o", label=protocol)
        lat.plot(xs, [x.latency_ms["p99"] for x in levels], marker="o", color=line.get_color(),
                 label=f"{protocol} p99")
        lat.plot(xs, [x.latency_ms["p50"] for x in levels], marker=".", linestyle="--", color=line.get_color(),
                 label=f"{protocol} p50")
        server.plot(xs, [x.latency_ms["mean"] for x in levels], marker="o", color=line.get_color(),
                    label=f"{protocol} client")
        for key, style in (("request_ms", "--"), ("queue_ms", ":")):
            split_at = [(x.concurrency, x.server[key]) for x in levels if x.server and x.server[key] is not None]
            server.plot([c for c, _ in split_at], [v for _, v in split_at], marker=".", linestyle=style,
                        color=line.get_color(), label=f"{protocol} {'server' if key == 'request_ms' else 'queued'}")
    ticks = sorted({x.concurrency for x in perf.levels})
    for ax in (thr, lat, server):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    thr.set_title("throughput, samples/s", fontsize="medium")
    lat.set_title("client latency, ms: p99 (solid), p50 (dashed)", fontsize="medium")
    server.set_title("mean ms: client, in the server, queued", fontsize="medium")
    fig.suptitle(f"compilers perf: {perf.model} over {' and '.join(perf.protocols)}, batch {perf.settings['batch']}, "
                 f"{perf.settings['duration']:g} s per level", fontsize="medium")
    return save(fig, path)
