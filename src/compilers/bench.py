"""Benchmarking: the one timing method of this package. `compilers.benchmark`, `compilers bench`, the
auto targets, `make demo` and the scripts in benchmarks/ all measure with it.

Every model is timed in one process, interleaved: the models take turns block by block, so machine noise
(another process, a clock change) hits all of them alike. Each call is timed on its own, so a result holds
the latency distribution (min, p50, p90, p99, max), not only a mean. The spread of the per-block medians
says how steady the machine was; a timing whose spread exceeds NOISY is flagged as too noisy to trust.

A pipeline (texts or images in) is timed the same way on a batch of its items, whole, and each compiled one also
stage by stage: pre-processing, inference, post-processing (`Benchmark.split`).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_leaves, tree_map

from .errors import InputError
from .host import cpu_name
from .pipeline import CompiledPipeline, Pipeline
from .progress import track
from .runtime import CompiledModel
from .signature import Signature, as_call

#: a timing whose per-block medians spread more than this (interquartile range / median) is flagged noisy
NOISY = 0.10
#: pause before each block: thread pools (OpenMP, ONNX Runtime, TBB) spin-wait for a while after a call and
#: would slow whichever model runs next
SETTLE = 0.01
EAGER = "eager"
RAW = " raw"
#: a compiled pipeline's stages, each timed apart as "<name> <stage>": pre-processing (items to tensors), the
#: compiled tensor model on those tensors, post-processing outside the graph (labels)
STAGES = ("pre", "inference", "post")
SPLIT_TITLE = "per stage: p50 ms (share of the whole call's p50)"
#: the batch sizes a pipeline is timed at unless told: its example items are cycled to fill each
PIPELINE_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class Timing:
    """One model at one batch size: per-call latency in milliseconds, or why it could not run."""

    name: str
    batch: int
    calls: int = 0
    min_ms: float = math.nan
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    spread: float = math.nan     # interquartile range of the per-block medians, relative to their median
    error: str | None = None

    @property
    def throughput(self) -> float:
        """Samples per second, one call at a time."""
        return self.batch / self.mean_ms * 1e3 if self.error is None else math.nan

    @property
    def noisy(self) -> bool:
        return self.error is None and self.spread > NOISY

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput, "noisy": self.noisy}


@dataclass
class Benchmark:
    """Timings of several models at several batch sizes, measured together."""

    timings: list[Timing]
    batch_sizes: list[int]
    baseline: str | None = None     # the eager model's name, when it was timed
    threads: int = 0                # torch's intra-op threads during the run (eager and torch engines)
    machine: str = ""
    settings: dict[str, Any] = field(default_factory=dict)   # warmup, min_time, blocks, sizes
    stages: list[Timing] = field(default_factory=list)        # compiled pipelines' stages, "<name> <stage>"

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(t.name for t in self.timings))

    def get(self, name: str, batch: int | None = None) -> Timing:
        """The timing of `name` at `batch` (default: the only, or first, batch size)."""
        batch = self.batch_sizes[0] if batch is None else batch
        for t in self.timings:
            if t.name == name and t.batch == batch:
                return t
        raise KeyError(f"no timing of {name!r} at batch {batch}; timed: {', '.join(self.names)}")

    def speedup(self, name: str, batch: int | None = None) -> float:
        """The baseline's p50 over `name`'s: above 1 is faster than eager."""
        if self.baseline is None:
            return math.nan
        return self.get(self.baseline, batch).p50_ms / self.get(name, batch).p50_ms

    def overhead_us(self, name: str, batch: int | None = None) -> float:
        """p50 of `name` minus p50 of the backend's own call on the same engine, in microseconds."""
        raw = name + RAW
        if raw not in self.names:
            return math.nan
        return (self.get(name, batch).p50_ms - self.get(raw, batch).p50_ms) * 1e3

    @property
    def noisy(self) -> list[Timing]:
        return [t for t in self.timings + self.stages if t.noisy]

    @property
    def pipelines(self) -> list[str]:
        """The names of the compiled pipelines whose stages were timed."""
        return list(dict.fromkeys(t.name.rsplit(" ", 1)[0] for t in self.stages))

    def split(self, name: str, batch: int | None = None) -> dict[str, float]:
        """Pipeline `name`'s p50 ms per stage (pre, inference, post) and of its whole call (total); NaN where one
        failed. The stages' p50s need not add up to the total's: each is its own distribution."""
        batch = self.batch_sizes[0] if batch is None else batch
        found = {t.name: t.p50_ms for t in self.stages if t.batch == batch}
        return {**{s: found.get(f"{name} {s}", math.nan) for s in STAGES}, "total": self.get(name, batch).p50_ms}

    def fastest(self, names: list[str] | None = None, batch: int | None = None, objective: str = "latency") -> str:
        """The name among `names` (default: all but eager and raw calls) with the lowest p50 ("latency")
        or the highest samples/s ("throughput") at `batch`."""
        names = names if names is not None else [n for n in self.names if n != self.baseline and not n.endswith(RAW)]
        ok = [self.get(n, batch) for n in names if self.get(n, batch).error is None]
        if not ok:
            raise InputError("no model ran: " + "; ".join(f"{n}: {self.get(n, batch).error}" for n in names))
        best = min(ok, key=(lambda t: t.p50_ms) if objective == "latency" else (lambda t: -t.throughput))
        return best.name

    def to_dict(self) -> dict[str, Any]:
        d = {"batch_sizes": self.batch_sizes, "baseline": self.baseline, "threads": self.threads,
             "machine": self.machine, "settings": self.settings, "noisy_above": NOISY,
             "timings": [t.to_dict() for t in self.timings]}
        if self.stages:
            d["stages"] = [t.to_dict() for t in self.stages]
            d["split"] = [{"model": name, "batch": batch, **{f"{k}_ms": v for k, v in split.items()},
                           **{f"{s}_share": split[s] / split["total"] for s in STAGES}}
                          for batch in self.batch_sizes for name in self.pipelines
                          for split in [self.split(name, batch)]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Benchmark":
        fields = set(Timing.__dataclass_fields__)
        timings = lambda key: [Timing(**{k: v for k, v in t.items() if k in fields}) for t in d.get(key, [])]
        return cls(timings("timings"), list(d["batch_sizes"]), d.get("baseline"), d.get("threads", 0),
                   d.get("machine", ""), dict(d.get("settings", {})), timings("stages"))

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """The table: a header and one row per model and batch size (what `str()` and the CLI print)."""
        overheads = any(n.endswith(RAW) for n in self.names)
        head = ["batch", "model", "p50 ms", "p90 ms", "p99 ms", "samples/s"]
        head += ["vs eager"] * (self.baseline is not None) + ["overhead us"] * overheads + ["spread"]
        rows = []
        for batch in self.batch_sizes:
            for name in self.names:
                t = self.get(name, batch)
                if t.error is not None:
                    rows.append([str(batch), name, "failed"] + [""] * (len(head) - 3))
                    continue
                row = [str(batch), name, _ms(t.p50_ms), _ms(t.p90_ms), _ms(t.p99_ms), f"{t.throughput:,.0f}"]
                if self.baseline is not None:
                    row.append(f"{self.speedup(name, batch):.2f}x")
                if overheads:
                    over = self.overhead_us(name, batch)
                    row.append("" if math.isnan(over) else f"{over:.1f}")
                row.append(f"±{t.spread * 50:.1f}%" + (" noisy" if t.noisy else ""))
                rows.append(row)
        return head, rows

    def split_rows(self) -> tuple[list[str], list[list[str]]]:
        """The split of each compiled pipeline's time: p50 ms per stage with its share of the whole call's p50,
        "noisy" after a row of which a timing is."""
        head = ["batch", "pipeline", "pre ms", "inference ms", "post ms", "total ms"]
        rows = []
        for batch in self.batch_sizes:
            for name in self.pipelines:
                split = self.split(name, batch)
                if any(math.isnan(v) for v in split.values()):
                    rows.append([str(batch), name, "failed"] + [""] * (len(head) - 3))
                    continue
                noisy = any(t.noisy for t in self.timings + self.stages
                            if t.batch == batch and t.name in {name, *(f"{name} {s}" for s in STAGES)})
                rows.append([str(batch), name] + [f"{_ms(split[s])} ({split[s] / split['total']:.0%})" for s in STAGES]
                            + [_ms(split["total"]) + " noisy" * noisy])
        return head, rows

    def __str__(self) -> str:
        lines = text_table(*self.rows())
        if self.stages:
            lines += ["", SPLIT_TITLE] + text_table(*self.split_rows())
        lines.append(self.footnote())
        return "\n".join(lines)

    def footnote(self) -> str:
        s = self.settings
        text = (f"{self.machine}, {self.threads} torch threads; per model and batch size: {s.get('blocks')} "
                f"interleaved blocks, >= {s.get('min_time')} s of calls, each call timed; spread: half the "
                "interquartile range of the block medians")
        failures: dict[tuple[str, str], list[int]] = {}
        for t in self.timings + self.stages:
            if t.error is not None:
                failures.setdefault((t.name, t.error), []).append(t.batch)
        for (name, error), batches in failures.items():
            text += f"\n{name} failed at batch {', '.join(map(str, batches))}: {error}"
        if self.noisy:
            text += (f"\n{len(self.noisy)} timing(s) spread more than ±{NOISY * 50:.1f}% between blocks: too noisy "
                     "to trust; rerun on an idle machine or with a longer min_time")
        return text


def text_table(head: list[str], rows: list[list[str]], left: tuple[int, ...] = (1,)) -> list[str]:
    """A plain-text table's lines: columns as wide as their widest cell, right-aligned but those in `left`."""
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [head] + rows]


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def benchmark(models: Any, inputs: Any, *, baseline: torch.nn.Module | Pipeline | None = None,
              batch_sizes: list[int] | None = None, sizes: Mapping[str, int] | None = None,
              warmup: float = 0.2, min_time: float = 1.0, blocks: int = 10, threads: int | None = None,
              raw: bool = False) -> Benchmark:
    """Time compiled models (and eager) on `inputs`, interleaved in this process.

    models: a CompiledModel, an eager nn.Module, or a mapping name -> either (or any callable called like
        the model). A CompiledModel is named after its target, a lone module "eager".
    inputs: like compile's example_inputs: a tuple (positional), a dict (keywords) or one tensor.
    baseline: the eager model, timed alongside as "eager"; `Benchmark.speedup` compares with it.
    batch_sizes: resize the inputs along the batch dim (by repeating samples) and time each size.
    sizes: other dynamic dims to set first, by name (e.g. {"seq": 64}); needs a CompiledModel among `models`.
    warmup: seconds of calls per model before timing; min_time: seconds of timed calls per model and size,
        split into `blocks` interleaved blocks.
    threads: torch's intra-op threads during the run (eager and torch engines; other engines keep the
        threads their target set).
    raw: also time each compiled engine's own backend call ("<name> raw") to measure the call overhead.

    Pipelines: models CompiledPipelines (or a mapping to them), inputs a list of items (texts, encoded images),
    cycled to fill each batch size (default PIPELINE_BATCH_SIZES), baseline the eager Pipeline. Each compiled
    pipeline's stages are timed too, interleaved with the rest (`Benchmark.split`); sizes= and raw= are for
    tensor models.
    """
    named = _named(models, baseline)
    if min_time <= 0 or warmup < 0 or blocks < 1:
        raise InputError("min_time must be > 0, warmup >= 0 and blocks >= 1")
    if any(isinstance(m, (Pipeline, CompiledPipeline)) for m in named.values()):
        batches, calls_at = _pipeline_plan(named, inputs, batch_sizes, sizes, raw)
    else:
        batches, calls_at = _tensor_plan(named, inputs, batch_sizes, sizes, raw)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    timings: list[Timing] = []
    try:
        for batch in batches:
            try:
                calls = calls_at(batch)
            except InputError as e:
                timings += [Timing(name, batch, error=str(e)) for name in named]
                continue
            timings += _time_calls(calls, batch, warmup, min_time, blocks)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    stages = {f"{n} {s}" for n, m in named.items() if isinstance(m, CompiledPipeline) for s in STAGES}
    return Benchmark([t for t in timings if t.name not in stages], batches, EAGER if EAGER in named else None, used,
                     cpu_name(), {"warmup": warmup, "min_time": min_time, "blocks": blocks, "sizes": dict(sizes or {})},
                     [t for t in timings if t.name in stages])


_Plan = tuple[list[int], Callable[[int], dict[str, Callable[[], Any]]]]


def _tensor_plan(named: dict[str, Callable[..., Any]], inputs: Any, batch_sizes: list[int] | None,
                 sizes: Mapping[str, int] | None, raw: bool) -> _Plan:
    """The batch sizes to time tensor models at, and the calls to time at each."""
    args, kwargs = as_call(inputs)
    signature = next((m.signature for m in named.values() if isinstance(m, CompiledModel)), None)
    unknown = set(sizes or {}) - set(signature.dims if signature is not None else ())
    if unknown:
        raise InputError(f"the model has no dynamic dim {', '.join(map(repr, sorted(unknown)))}; sizes= names dims of "
                         f"a compiled model's signature ({', '.join(signature.dims) if signature else 'none given'})")
    return (_batch_sizes(signature, args, kwargs, batch_sizes),
            lambda batch: _model_calls(named, signature, args, kwargs, batch, dict(sizes or {}), raw))


def _pipeline_plan(named: dict[str, Callable[..., Any]], inputs: Any, batch_sizes: list[int] | None,
                   sizes: Mapping[str, int] | None, raw: bool) -> _Plan:
    """The batch sizes to time pipelines at, and the calls to time at each."""
    if sizes or raw:
        raise InputError("sizes= and raw= are for tensor models: a pipeline's sizes come from its items, and its "
                         "inference is timed apart (Benchmark.split)")
    items = [inputs] if isinstance(inputs, (str, bytes)) else inputs
    if not isinstance(items, Sequence) or not items:
        raise InputError(f"a pipeline is timed on a list of items (texts, encoded images), not "
                         f"{type(inputs).__name__}")
    batches = _batch_sizes(None, (), {}, list(PIPELINE_BATCH_SIZES) if batch_sizes is None else batch_sizes)
    return batches, lambda batch: _pipeline_calls(named, [items[i % len(items)] for i in range(batch)])


def synthetic_inputs(signature: Signature, sizes: Mapping[str, int] | None = None, seed: int = 0) -> tuple[tuple, dict]:
    """Inputs that fit `signature`, for timing a saved artifact without its model: floats random normal,
    integers 1, bools True; each dynamic dim at its size in `sizes`, else its range's opt, else its min."""
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(signature.dims)
    if unknown:
        raise InputError(f"the model has no dynamic dim {', '.join(sorted(unknown))}; its dynamic dims are "
                         f"{', '.join(signature.dims) or 'none'}")
    g = torch.Generator().manual_seed(seed)
    flat = []
    for spec in signature.inputs:
        shape = [d if isinstance(d, int) else sizes.get(d) or signature.dims[d].opt or max(signature.dims[d].min, 1)
                 for d in spec.shape]
        if spec.dtype.is_floating_point:
            flat.append(torch.randn(shape, generator=g).to(spec.dtype))
        else:
            flat.append(torch.ones(shape, dtype=spec.dtype))
    return signature.call_args(flat)


def _named(models: Any, baseline: torch.nn.Module | Pipeline | None) -> dict[str, Callable[..., Any]]:
    if isinstance(models, Mapping):
        named = dict(models)
    elif isinstance(models, (CompiledModel, CompiledPipeline)):
        named = {models.target.name: models}
    elif isinstance(models, torch.nn.Module):
        named = {EAGER: models}
    else:
        raise InputError("models must be a CompiledModel (or CompiledPipeline), a torch.nn.Module or a mapping "
                         f"name -> either, not {type(models).__name__}")
    if baseline is not None:
        if EAGER in named:
            raise InputError("a model is already named 'eager'; pass the eager model once")
        named = {EAGER: baseline, **named}
    for name, m in named.items():
        if not callable(m):
            raise InputError(f"model {name!r} is a {type(m).__name__}, which cannot be called")
    return named


def _batch_sizes(signature: Signature | None, args: tuple, kwargs: dict, wanted: list[int] | None) -> list[int]:
    if wanted is not None:
        if not wanted or any(not isinstance(b, int) or b < 1 for b in wanted):
            raise InputError(f"batch_sizes must be positive integers, not {wanted!r}")
        return list(wanted)
    if signature is not None and signature.batch is not None:
        return [signature.dim_sizes(signature.flatten(args, kwargs))[signature.batch]]
    first = _tensors(args, kwargs)
    return [int(first[0].shape[0])] if first and first[0].dim() else [1]


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


def _inputs_at(signature: Signature | None, args: tuple, kwargs: dict, batch: int,
               sizes: dict[str, int]) -> tuple[tuple, dict]:
    """The inputs with the batch dim (and `sizes`) set, samples repeated to fill it. The batch dim is the
    signature's; without one, dim 0 of every tensor whose dim 0 has the example's batch size."""
    if signature is not None and (signature.batch is not None or sizes):
        flat = signature.flatten(args, kwargs)
        if signature.batch is not None:
            sizes = {**sizes, signature.batch: batch}
        return signature.call_args(signature.resized(flat, sizes))
    if sizes:
        raise InputError("sizes= needs a CompiledModel among the models (its signature names the dims)")
    n = _batch_sizes(None, args, kwargs, None)[0]
    resize = lambda x: x.index_select(0, torch.arange(batch) % n) \
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n and batch != n else x
    return tree_map(resize, args), tree_map(resize, kwargs)


def _model_calls(named: dict[str, Callable[..., Any]], signature: Signature | None, args: tuple, kwargs: dict,
                 batch: int, sizes: dict[str, int], raw: bool) -> dict[str, Callable[[], Any]]:
    """Each model's call on the inputs at `batch` (and its raw backend call)."""
    a, k = _inputs_at(signature, args, kwargs, batch, sizes)
    calls: dict[str, Callable[[], Any]] = {}
    for name, model in named.items():
        calls[name] = (lambda m: lambda: m(*a, **k))(model)
        if raw and isinstance(model, CompiledModel):
            try:
                call = model.raw_call(*a, **k)
            except Exception:   # the compiled call fails the same way; _time_calls reports it
                call = None
            if call is not None:
                calls[name + RAW] = call
    return calls


def _pipeline_calls(named: dict[str, Callable[..., Any]], items: list[Any]) -> dict[str, Callable[[], Any]]:
    """Each pipeline's whole call on `items`, and each compiled one's STAGES apart: pre-processing of the items,
    the compiled tensor model on those tensors, post-processing of its outputs."""
    calls: dict[str, Callable[[], Any]] = {}
    for name, pipe in named.items():
        calls[name] = (lambda p: lambda: p(items))(pipe)
        if isinstance(pipe, CompiledPipeline):
            try:
                with torch.inference_mode():
                    tensors = pipe.steps.tensors(items)
                    outputs = pipe.model(**tensors)
            except Exception:   # the whole call fails the same way; _time_calls reports it
                continue
            stages = _stages(pipe, items, tensors, outputs)
            calls.update({f"{name} {stage}": call for stage, call in zip(STAGES, stages)})
    return calls


def _stages(pipe: CompiledPipeline, items: list[Any], tensors: dict[str, torch.Tensor],
            outputs: dict[str, Any]) -> tuple[Callable[[], Any], ...]:
    """The calls of `pipe(items)` one by one, each on what the one before answers."""
    return lambda: pipe.steps.tensors(items), lambda: pipe.model(**tensors), lambda: pipe.steps.finish(outputs)


def _time_calls(calls: dict[str, Callable[[], Any]], batch: int, warmup: float, min_time: float,
                blocks: int) -> list[Timing]:
    """Time each call (no arguments) over `blocks` interleaved blocks, each call timed on its own."""
    failed: dict[str, str] = {}
    per_block: dict[str, int] = {}
    with torch.inference_mode():
        for name, call in calls.items():
            try:
                per_block[name] = _calls_per_block(call, warmup, min_time / blocks)
            except Exception as e:
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        live = {n: c for n, c in calls.items() if n not in failed}
        times = {n: [] for n in live}
        block_medians = {n: [] for n in live}
        enabled = gc.isenabled()
        gc.collect()     # once, here: a full collection between blocks can take a second in a big process
        gc.disable()
        try:
            for _ in track(range(blocks), blocks, f"timing batch {batch}"):
                for name, call in live.items():
                    time.sleep(SETTLE)   # the previous model's thread pool stops spinning
                    call()               # and this one's wakes up, untimed
                    spent = []
                    for _ in range(per_block[name]):
                        t0 = time.perf_counter_ns()
                        call()
                        spent.append(time.perf_counter_ns() - t0)
                    times[name] += spent
                    block_medians[name].append(float(np.median(spent)))
        finally:
            if enabled:
                gc.enable()
    out = []
    for name in calls:
        if name in failed:
            out.append(Timing(name, batch, error=failed[name]))
            continue
        ms = np.asarray(times[name], dtype=np.float64) / 1e6
        medians = np.asarray(block_medians[name])
        q25, q50, q75 = np.percentile(medians, [25, 50, 75])
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        out.append(Timing(name, batch, len(ms), float(ms.min()), float(p50), float(p90), float(p99),
                          float(ms.max()), float(ms.mean()), float((q75 - q25) / q50) if q50 > 0 else 0.0))
    return out


def _calls_per_block(call: Callable[[], Any], warmup: float, block_time: float) -> int:
    """Warm `call` up for `warmup` seconds (at least twice); how many calls fill `block_time`."""
    start = time.perf_counter()
    spent = []
    while len(spent) < 2 or time.perf_counter() - start < warmup:
        t0 = time.perf_counter()
        call()
        spent.append(time.perf_counter() - t0)
    return max(1, round(block_time / float(np.median(spent[len(spent) // 2:]))))
