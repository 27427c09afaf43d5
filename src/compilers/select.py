"""Auto targets: compile each candidate, keep those that pass their own accuracy contract, time the valid
ones together (`bench.benchmark`, interleaved), and return the fastest by the auto target's objective.

A candidate that cannot run here, fails to compile, fails validation, or crashes is recorded with why
and never chosen; when none is valid, compile raises with every candidate's verdict. With a cache
directory the choice is kept (`Cache.choice_path`), and a second compile of the same model builds
only the chosen target, without timing anything again.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .backends import get_backend, unavailable_reason
from .bench import NOISY, Benchmark, benchmark
from .calibration import update_with_array
from .errors import BackendUnavailable, CompilerError, ExportError, InputError, TargetError, ValidationError
from .host import library_versions
from .progress import track
from .report import candidates_table
from .request import Request
from .runtime import CompiledModel
from .signature import as_call
from .target import Auto, Target
from .validate import ValidationReport

log = logging.getLogger("compilers")

CHOSEN, VALID, FAILED_VALIDATION, FAILED, UNAVAILABLE, SKIPPED = \
    "chosen", "valid", "failed validation", "failed", "unavailable", "skipped"
#: seconds of timed calls when a single candidate is valid: its timing is recorded, nothing is compared
SHORT_BENCH = 0.1
CACHED_NOTE = "auto choice read from the cache"

#: compiles one concrete candidate (api.compile with the caller's model, inputs and data), validated
Build = Callable[[Target], CompiledModel]


@dataclass
class Candidate:
    """One row of an auto target's table: a candidate target, its verdict and why, and its timing."""

    target: str
    verdict: str
    reason: str = ""
    compile_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None    # samples per second, one call at a time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Selection:
    """What `choose` found: the chosen compiled model, every candidate's row, and the dims timed at."""

    chosen: CompiledModel
    candidates: list[Candidate]
    shapes: dict[str, int]
    benchmark: Benchmark


def choose(auto: Auto, build: Build, inputs: Any, *, calibration_given: bool) -> Selection:
    """Build every available candidate of `auto` with `build`, time the valid ones on `inputs` (at the auto
    target's batch size and sizes), and return the fastest. ValidationError (or the error that fits best)
    listing every verdict when no candidate is valid."""
    rows: list[Candidate] = []
    built: dict[str, CompiledModel] = {}
    errors: list[BaseException] = []
    spent = 0.0
    for target in track(auto.targets, len(auto.targets), f"{auto.name}: compiling candidates", min_items=1):
        row, cm, error = _attempt(auto, target, build, calibration_given, spent)
        rows.append(row)
        spent += row.compile_s or 0.0
        if error is not None:
            errors.append(error)
        if cm is not None:
            if not built:
                _check_shapes(auto, cm)   # before compiling the rest: a descriptor that cannot be timed here
            built[target.name] = cm
        log.info("%s: %s %s%s", auto.name, target.name, row.verdict, f" ({row.reason})" if row.reason else "")
    if not built:
        raise _nothing_valid(auto, rows, errors)

    compared = len(built) > 1
    bench_time = auto.bench_seconds if compared else min(auto.bench_seconds, SHORT_BENCH)
    bench = benchmark(built, inputs, batch_sizes=[auto.batch_size] if auto.batch_size else None,
                      sizes=dict(auto.sizes), min_time=bench_time, warmup=min(0.2, bench_time),
                      blocks=10 if compared else 3)
    batch = bench.batch_sizes[0]
    by_name = {r.target: r for r in rows}
    timed = []
    for name in built:
        t = bench.get(name, batch)
        row = by_name[name]
        if t.error is not None:
            row.verdict, row.reason = FAILED, f"failed while timed: {t.error}"[:300]
            errors.append(CompilerError(row.reason))
            continue
        row.p50_ms, row.p99_ms, row.throughput = t.p50_ms, t.p99_ms, t.throughput
        timed.append(name)
    if not timed:
        raise _nothing_valid(auto, rows, errors)
    best = bench.fastest(timed, batch, auto.objective)
    chosen = by_name[best]
    for name in timed:
        row, t = by_name[name], bench.get(name, batch)
        if name == best:
            row.verdict = CHOSEN
            row.reason = ("only valid candidate" if len(timed) == 1 else
                          "lowest p50" if auto.objective == "latency" else "most samples/s")
        else:
            row.verdict = VALID
            row.reason = (f"p50 {row.p50_ms / chosen.p50_ms:.2f}x the chosen's" if auto.objective == "latency" else
                          f"{row.throughput / chosen.throughput:.2f}x the chosen's samples/s")
        if t.noisy and len(timed) > 1:
            row.reason += f"; timing noisy (±{t.spread * 50:.0f}%)"
    cm = built[best]
    sig = cm.signature
    shapes = sig.dim_sizes(sig.flatten(*as_call(inputs)))
    shapes.update(auto.sizes)
    if sig.batch is not None:
        shapes[sig.batch] = batch
    return Selection(cm, rows, shapes, bench)


def _attempt(auto: Auto, target: Target, build: Build, calibration_given: bool,
             spent: float) -> tuple[Candidate, CompiledModel | None, BaseException | None]:
    """Build one candidate: its row, the compiled model when it is valid, and the error when it failed."""
    name = target.name
    if auto.compile_budget_s and spent >= auto.compile_budget_s:
        return Candidate(name, SKIPPED, f"compile budget of {auto.compile_budget_s:g} s spent"), None, None
    try:
        reason = unavailable_reason(target)
    except TargetError as e:     # an unknown backend
        return Candidate(name, FAILED, f"TargetError: {_first_line(e)}"), None, e
    if reason:
        return Candidate(name, UNAVAILABLE, reason), None, None
    if target.precision == "int8" and not calibration_given:
        return Candidate(name, SKIPPED, "int8 needs calibration data: pass calibration= to compile"), None, None
    t0 = time.perf_counter()
    try:
        cm = build(target)
    except ValidationError as e:
        return Candidate(name, FAILED_VALIDATION, _failure(e), time.perf_counter() - t0), None, e
    except BackendUnavailable as e:
        return Candidate(name, UNAVAILABLE, _first_line(e), time.perf_counter() - t0), None, e
    except Exception as e:       # one crashing backend must not end the selection
        return Candidate(name, FAILED, f"{type(e).__name__}: {_first_line(e)}", time.perf_counter() - t0), None, e
    return Candidate(name, VALID, "", time.perf_counter() - t0), cm, None


def _failure(e: ValidationError) -> str:
    """The first failing output of a validation, and why; else the first error the compiled model raised."""
    report: ValidationReport | None = e.report
    if report is not None:
        failed = next((o for o in report.outputs if not o.passed), None)
        if failed is not None:
            return f"{failed.name}: {failed.failure}"[:300]
        if report.errors:
            return report.errors[0][:300]
        if report.metric is not None and not report.metric.passed:
            return str(report.metric)
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _check_shapes(auto: Auto, cm: CompiledModel) -> None:
    """InputError when the auto target asks for a batch size or dim sizes the compiled model cannot take."""
    sig = cm.signature
    if auto.batch_size and sig.batch is None:
        raise InputError(f"auto target {auto.name!r} times batch size {auto.batch_size}, but the model has no batch "
                         "dim; set batch_size = 0 in its [auto] table, or name the batch dim in dynamic_shapes")
    for dim, size in auto.sizes.items():
        if dim not in sig.dims:
            raise InputError(f"auto target {auto.name!r} times {dim}={size}, but the model has no dynamic dim "
                             f"{dim!r} (its dynamic dims: {', '.join(sig.dims) or 'none'}); fix [auto.sizes] or "
                             "name the dim in dynamic_shapes")


def _nothing_valid(auto: Auto, rows: list[Candidate], errors: list[BaseException]) -> CompilerError:
    """The error when no candidate can be chosen: it lists every verdict; its type follows the failures."""
    table = candidates_table([r.to_dict() for r in rows])
    msg = (f"auto target {auto.name!r}: no candidate is valid, so none is returned:\n{table}\n"
           "Choose a target yourself, give calibration data for int8 candidates, or write an auto descriptor "
           "whose candidates' contracts fit this model")
    refused = [e for e in errors if isinstance(e, ValidationError)]
    if refused:
        return ValidationError(msg, refused[0].report)
    if errors and all(isinstance(e, InputError) for e in errors):
        return InputError(msg)     # the caller's inputs, not a backend: every candidate refused them
    if not errors:
        return BackendUnavailable(msg)
    if all(isinstance(e, ExportError) for e in errors):
        return ExportError(msg)
    return CompilerError(msg)


# -- compile with an auto target, with its choice cached ---------------------------------------------------
def compile_auto(request: Request, auto: Auto, build: Build) -> CompiledModel:
    """The chosen candidate of `auto`, compiled by `build`, its report holding every candidate's row.

    With a cache, a choice made before for the same model, inputs, data, descriptor, library versions and CPU
    ISA is read back: only the chosen target is built (from compile's own cache) and nothing is timed.
    `request` must be `reusable` (its data is read once per candidate)."""
    t0 = time.perf_counter()
    cache, metric = request.cache, request.metric
    path = None if cache is None else cache.choice_path(
        request.fingerprint(), auto, _example_key(request.example_inputs, request.dynamic_shapes), _versions(auto),
        {"calibration": _digest(request.calibration), "samples": _digest(request.samples),
         "metric": None if metric is None else
         f"{metric.name}:{metric.max_drop}:{getattr(metric.fn, '__qualname__', '')}"})
    cm = None if path is None else _from_choice(auto, build, cache.load_choice(path))
    if cm is None:
        selection = choose(auto, build, request.example_inputs, calibration_given=request.calibration is not None)
        cm = selection.chosen
        bench = selection.benchmark
        cm.report.candidates = [r.to_dict() for r in selection.candidates]
        cm.report.auto = {"name": auto.name, "objective": auto.objective, "shapes": selection.shapes,
                          "bench_seconds": bench.settings.get("min_time"), "machine": bench.machine}
        if bench.noisy and len(bench.names) > 1:
            cm.report.notes.append(f"{auto.name}: timings spread more than ±{NOISY * 50:.0f}% between blocks; "
                                   "the choice may differ on an idle machine")
        if path is not None:
            cache.save_choice(path, {"chosen": cm.target.name, "candidates": cm.report.candidates,
                                     "auto": cm.report.auto})
    cm.report.seconds["auto"] = time.perf_counter() - t0
    return cm


def _from_choice(auto: Auto, build: Build, choice: dict[str, Any] | None) -> CompiledModel | None:
    """The stored choice, built again (compile's cache makes that quick), or None to choose afresh."""
    if choice is None or choice["chosen"] not in [t.name for t in auto.targets]:
        return None
    try:
        cm = build(auto.target(choice["chosen"]))
    except Exception as e:        # e.g. a new metric refuses it: choose again, recording why each fails
        log.warning("%s: the cached choice %s no longer compiles (%s); choosing again", auto.name, choice["chosen"], e)
        return None
    cm.report.candidates = [Candidate.from_dict(r).to_dict() for r in choice["candidates"]]
    cm.report.auto = dict(choice.get("auto") or {"name": auto.name, "objective": auto.objective})
    cm.report.notes.append(CACHED_NOTE)
    return cm


def _example_key(example_inputs: Any, dynamic_shapes: Mapping[str, Mapping[int, str]] | None) -> dict[str, Any]:
    """The example's structure, dtypes and shapes, and the dynamic dims: with the model, what decides the
    Signature and the shapes timed (the example's batch size is timed when the descriptor names none)."""
    leaves, spec = tree_flatten(as_call(example_inputs))
    return {"tree": str(spec),
            "leaves": [[str(x.dtype), list(x.shape)] if isinstance(x, torch.Tensor) else repr(x) for x in leaves],
            "dynamic": None if dynamic_shapes is None else
            {str(k): {str(d): str(n) for d, n in v.items()} for k, v in dynamic_shapes.items()}}


def _digest(items: Any) -> str | None:
    """sha256 over every item's arrays and constants (calibration data, validation samples)."""
    if items is None:
        return None
    h = hashlib.sha256()
    for item in items if isinstance(items, (list, tuple)) else [items]:
        leaves, spec = tree_flatten(item)
        h.update(str(spec).encode())
        for x in leaves:
            update_with_array(h, x) if isinstance(x, (torch.Tensor, np.ndarray)) else h.update(repr(x).encode())
    return h.hexdigest()


def _versions(auto: Auto) -> dict[str, str]:
    """Python, the core libraries and every candidate backend's library versions."""
    extra: dict[str, str] = {}
    for t in auto.targets:
        try:
            extra.update(get_backend(t.backend).versions())
        except TargetError:
            pass
    return library_versions(extra)
