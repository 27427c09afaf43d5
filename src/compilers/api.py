"""compile / validate / targets: the pipeline resolve -> capture -> lower -> optimize -> build -> validate -> package."""
from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .backends import get_backend, unavailable_reason
from .backends.base import Backend, Optimized, Spec
from .calibration import Calibration, calibration_set, flat_samples
from .analysis.batch import rows_verdict
from .analysis.graph import Exported, export
from .analysis.padding import mask_candidates, masks_by_flow, padded_verdict
from .capture import Captured, capture
from .determinism import same_outputs
from .devices import devices_of, on_cpu
from .errors import (BackendUnavailable, CompilerError, ExportError, InputError, TargetError,
                     ValidationError, brief)
from .host import library_versions
from .lower import FROZEN_NOTE, run_ladder
from .pipeline import CompiledPipeline, Pipeline
from .quantize import CalibrationPlan, accuracy_loop, check_in_eager, plan_calibration
from .reference import Reference, compute_reference, repeatable_run
from .report import Report
from .request import Request
from .runtime import CompiledModel
from .select import compile_auto
from .signature import Signature, mask_problem
from .state import restore_modes, train_mode_note, train_modes, unchanged_state
from .target import Auto, Target, Tolerance, builtin_targets, load_descriptor, load_target
from .validate import Metric, MetricCheck, ValidationReport, compare

log = logging.getLogger("compilers")
MAX_VALIDATION_SAMPLES = 32
GROWN = "grown example"

__all__ = ["compile", "validate", "targets", "unavailable_reason", "resolve", "Resolved"]


def targets() -> list[Target]:
    """The built-in targets (`unavailable_reason(t)` says whether each runs here)."""
    return builtin_targets()


@dataclass(frozen=True)
class Resolved:
    """A target, checked: its backend, and its [options] parsed into the backend's typed settings."""

    target: Target
    backend: Backend
    settings: Any


def resolve(target: str | Path | Target) -> Resolved:
    """The Target, its backend and typed settings; TargetError for bad options, BackendUnavailable if it cannot run here."""
    t = load_target(target)
    backend = get_backend(t.backend)
    settings = backend.settings(t)
    reason = backend.unavailable_reason(t) or backend.probe(t)
    if reason:
        raise BackendUnavailable(f"target {t.name!r} cannot run here: {reason}")
    return Resolved(t, backend, settings)


def target_problem(target: Target) -> str | None:
    """Why `target` cannot be compiled for here (options its backend refuses, a backend not installed), or None;
    imports no backend library (`resolve` also probes the runtime)."""
    try:
        get_backend(target.backend).settings(target)
    except TargetError as e:
        return f"TargetError: {e}"
    return unavailable_reason(target)


def check_supported(model: torch.nn.Module, target: Target) -> None:
    """ExportError when the model holds a module type the target's descriptor declares unsupported."""
    for m in model.modules():
        cls = type(m)
        for name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            if name in target.unsupported:
                raise ExportError(f"target {target.name!r} does not support {cls.__name__} modules: "
                                  f"{target.unsupported[name]} (declared in {target.source}); choose another target")


def compile(model: torch.nn.Module | Pipeline, target: str | Path | Target | Auto, example_inputs: Any, *,
            dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
            calibration: Iterable[Any] | None = None, samples: Iterable[Any] | None = None,
            validate: bool | str = True, metric: Metric | None = None,
            cache_dir: str | Path | None = None, accept_traced_branches: bool = False,
            masks: Mapping[str, str] | None = None, prune: Mapping[str, Any] | None = None,
            distill: Mapping[str, Any] | None = None) -> CompiledModel | CompiledPipeline:
    """Compile `model` for `target`, validate it against eager, and return a CompiledModel.

    A `compilers.pipeline.Pipeline` (a model with its pre- and post-processing) compiles to a CompiledPipeline:
    example_inputs is then a batch of items (texts, encoded images), calibration and samples are batches or
    single items; its post-processing is compiled and validated with the model.

    example_inputs: a tuple (positional args), a dict (keyword args) or a lone tensor.
    dynamic_shapes: {input_name: {dim: "dim_name"}}; default: dim 0 of each batch-sized input is "batch".
    calibration: samples shaped like example_inputs, for int8 calibration (any iterable, or a DataLoader).
    samples: validation samples shaped like example_inputs; when not given, validation uses the example
        and up to 31 calibration samples.
    validate: True raises ValidationError on a mismatch, "warn" warns, False skips.
    metric: a task metric (e.g. accuracy on labelled data) the compiled model must also keep, within its
        `max_drop` of eager's score; the int8 accuracy loop keeps layers in float until it does.
    cache_dir: reuse a build when weights, code, signature, target, versions and CPU ISA match and it still
        agrees with eager (validated, or with validate=False checked on the example).
    accept_traced_branches: a lowering route that traces (TorchScript tracing, OpenVINO's direct import)
        records only the branch the example takes through data-dependent control flow (`if x.sum() > 0:`);
        compile refuses such a build with ExportError naming the line, unless this is True (the branch is
        then frozen, and the report notes it).
    masks: padding masks among the inputs, {input name: "keep" | "pad"}: "keep" where nonzero marks a real
        position (Hugging Face's attention_mask), "pad" where nonzero/True marks padding (PyTorch's
        key_padding_mask). Outputs with the mask's (batch, sequence) dims are validated at the real positions
        only. Default: integer/bool inputs of shape (batch, sequence) named like attention_mask ("keep") or
        key_padding_mask ("pad"); {} judges every position.

    The model compiles and validates in eval mode; its own train/eval modes, each submodule's included,
    are restored when compile returns.

    prune: make a smaller model first, `compilers.prune`'s keyword arguments (e.g. {"flops": 0.5}; its data-driven
        criteria use `calibration`); distill: then train it towards `model` on `calibration`, `compilers.distill`'s
        keyword arguments (e.g. {"epochs": 20, "labels": y}). Both need `metric`, judged against `model`'s own
        score: the smaller model, and then the compiled one, must stay within `max_drop` of it, or compile
        refuses them (ValidationError with the scores). `cm.report.optimization` has the figures.

    An auto target (e.g. "auto-cpu") compiles and validates each of its candidates, times the valid ones
    and returns the fastest; `cm.report.candidates` holds every candidate's verdict and timing. With
    `cache_dir` the choice is kept, and a second compile builds only the chosen target.
    """
    if prune is not None or distill is not None:
        return _compile_smaller(model, target, example_inputs, prune, distill, dynamic_shapes=dynamic_shapes,
                                calibration=calibration, samples=samples, validate=validate, metric=metric,
                                cache_dir=cache_dir, accept_traced_branches=accept_traced_branches, masks=masks)
    if isinstance(model, Pipeline):
        return _compile_pipeline(model, target, example_inputs, dynamic_shapes=dynamic_shapes, calibration=calibration,
                                 samples=samples, validate=validate, metric=metric, cache_dir=cache_dir,
                                 accept_traced_branches=accept_traced_branches, masks=masks)
    model, example_inputs, calibration, samples, metric, devices = on_cpu(model, example_inputs, calibration,
                                                                          samples, metric)
    request = Request.of(model, example_inputs, dynamic_shapes=dynamic_shapes, calibration=calibration,
                         samples=samples, validate=validate, metric=metric, cache_dir=cache_dir,
                         accept_traced_branches=accept_traced_branches, masks=masks)
    cm = _compile(request, target)
    if devices:
        cm.report.notes.append(f"the model was on {', '.join(devices)}: compiled and validated from a CPU copy (the "
                               "targets run on the CPU); called with tensors on any device, it answers on theirs")
    return cm


#: compile(prune=): seconds of timed calls (and of warm-up) per model when the smaller model is timed against the
#: unpruned one
SPEED_SECONDS, SPEED_WARMUP = 1.0, 0.2


def _compile_smaller(model: torch.nn.Module | Pipeline, target: str | Path | Target | Auto, example_inputs: Any,
                     prune: Mapping[str, Any] | None, distill: Mapping[str, Any] | None, *,
                     calibration: Iterable[Any] | None, metric: Metric | None,
                     **options: Any) -> CompiledModel | CompiledPipeline:
    """compile(prune=..., distill=...): prune a copy of `model`, distill it back towards `model`, and compile it,
    the task metric judged against `model`'s own score at every step: a smaller model that misses it is refused,
    never returned. The compile of the smaller model gets the drop that is left (`max_drop` less what pruning
    and distillation cost), so the compiled model, int8 included, stays within `max_drop` of `model`. A
    Pipeline's module (model + post-processing) is pruned and distilled on the tensors its pre-processing makes
    of the items, and the metric scores pipelines around each smaller module."""
    from . import optimize
    if not isinstance(model, (torch.nn.Module, Pipeline)):
        raise InputError(f"prune= and distill= take a torch.nn.Module or a Pipeline, not {type(model).__name__}")
    if prune is None:
        raise InputError("distill= trains a pruned model back towards yours: give prune= too")
    if metric is None or not isinstance(metric, Metric):
        raise InputError("prune= needs metric=compilers.Metric(fn, max_drop): a smaller model is judged by your task "
                         "metric against your model's own score")
    data = None if calibration is None else list(calibration)
    if distill is not None and not data:
        raise InputError("distill= trains on calibration=: pass samples shaped like example_inputs (unlabeled is fine)")
    if isinstance(model, Pipeline):
        module, example = model.module, model.tensors(example_inputs)
        tensors = None if data is None else [model.tensors(batch) for batch in data]
        whole = lambda smaller: _with_module(model, smaller)   # noqa: E731  (what the metric and compile get)
    else:
        module, example, tensors, whole = model, example_inputs, data, lambda smaller: smaller
    original = _score(metric, model, "the model before pruning")
    pruned = optimize.prune(module, example, calibration=tensors, **prune)
    scores = {"original": original, "pruned": _score(metric, whole(pruned.model), "the pruned model")}
    student = pruned.model
    record: dict[str, Any] = {"metric": metric.name, "max_drop": metric.max_drop, "prune": pruned.report.to_dict()}
    if distill is not None:
        distilled = optimize.distill(module, student, tensors, **distill)
        student = distilled.model
        scores["distilled"] = _score(metric, whole(student), "the distilled model")
        record["distill"] = distilled.report.to_dict()
    record["scores"] = scores
    left = metric.max_drop - (original - scores[list(scores)[-1]])
    figures = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    if left < 0:
        raise ValidationError(f"the smaller model misses metric {metric.name!r} ({figures}; at most {metric.max_drop:g} "
                              "below the original allowed): prune less, or distill longer")
    try:
        cm = compile(whole(student), target, example_inputs, calibration=data, metric=replace(metric, max_drop=left),
                     **options)
    except ValidationError as e:
        raise ValidationError(f"the smaller model ({figures}) compiled for {target} misses its tolerance or metric "
                              f"{metric.name!r} (compiled: at most {metric.max_drop:g} below the original "
                              f"{original:.4f}): {e}", e.report) from e
    checked = cm.report.validation.metric if cm.report.validation else None
    if checked is not None:
        scores["compiled"] = checked.compiled
    record["speed"] = _speed(model, cm, example_inputs, data, options)
    cm.report.optimization = record
    return cm


def _with_module(pipe: Pipeline, module: torch.nn.Module) -> Pipeline:
    """`pipe` with its composed module (model + post-processing) replaced by a smaller one."""
    smaller = copy.copy(pipe)
    smaller.module = module
    return smaller


def _speed(model: torch.nn.Module | Pipeline, smaller: CompiledModel | CompiledPipeline, example_inputs: Any,
           calibration: list[Any] | None, options: dict[str, Any]) -> dict[str, Any]:
    """What the smaller model gains: `model` compiled for the same target as `smaller` (not validated: it is only
    timed), both timed on example_inputs in one interleaved `compilers.benchmark` (a Pipeline's compiled modules
    on the tensors its pre-processing makes of them). An unpruned model that does not build is recorded as such
    (the smaller one was judged already)."""
    from .bench import benchmark
    try:
        unpruned = compile(model, smaller.target, example_inputs, calibration=calibration, validate=False,
                           **{k: v for k, v in options.items() if k not in ("validate", "samples")})
        if isinstance(model, Pipeline):     # the pre-processing is the same for both: time the compiled modules
            unpruned, smaller, example_inputs = unpruned.model, smaller.model, model.tensors(example_inputs)
        timed = benchmark({"unpruned": unpruned, "smaller": smaller}, example_inputs, warmup=SPEED_WARMUP,
                          min_time=SPEED_SECONDS, blocks=5)
    except CompilerError as e:
        return {"error": f"the unpruned model could not be compiled and timed for {smaller.target.name}: {e}"}
    before, after = timed.get("unpruned"), timed.get("smaller")
    return {"target": smaller.target.name, "batch": after.batch, "unpruned_p50_ms": before.p50_ms,
            "smaller_p50_ms": after.p50_ms, "speedup": before.p50_ms / after.p50_ms,
            "noisy": before.noisy or after.noisy}


def _compile_pipeline(pipe: Pipeline, target: str | Path | Target | Auto, example_inputs: Any, *,
                      dynamic_shapes: Mapping[str, Mapping[int, str]] | None, calibration: Iterable[Any] | None,
                      samples: Iterable[Any] | None, metric: Metric | None, **options: Any) -> CompiledPipeline:
    """compile for a Pipeline: its items (texts, encoded images) pre-processed into the tensors its module takes
    (example_inputs: one batch of items; calibration and samples: batches, or single items), the module (model +
    post-processing) compiled and validated like any model, and the pipeline's steps carried with it. A metric
    scores the pipelines themselves (eager, and the compiled candidates wrapped as CompiledPipeline)."""
    steps = pipe.steps
    devices = devices_of(pipe.module)
    if devices:
        raise InputError(f"the pipeline's module is on {', '.join(devices)}: compile it from the CPU "
                         "(Pipeline(module.cpu(), ...)); the targets run on the CPU")

    def batches(items: Iterable[Any] | None) -> list[dict[str, torch.Tensor]] | None:
        return None if items is None else [steps.tensors(batch) for batch in items]
    if metric is not None:
        score = metric.fn
        metric = replace(metric, fn=lambda m: score(pipe if m is pipe.module else CompiledPipeline(m, steps)))
    example = steps.tensors(example_inputs)
    request = Request.of(pipe.module, example,
                         dynamic_shapes=steps.pre.dynamic_shapes if dynamic_shapes is None else dynamic_shapes,
                         calibration=batches(calibration), samples=batches(samples), metric=metric,
                         pad=dict(steps.pre.pad), **options)
    cm = _compile(request, target)
    padded = bool(cm.report.padding and cm.report.padding["padded"])
    if not padded:
        cm.report.notes.append(f"padding is not proven harmless ({cm.report.padding['why']}): a server batches "
                               "only requests of equal length")
    return CompiledPipeline(cm, replace(steps, padded=padded))


def _compile(request: Request, target: str | Path | Target | Auto) -> CompiledModel:
    descriptor = load_descriptor(target)
    if isinstance(descriptor, Auto):
        return _compile_auto(request, descriptor)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    r = resolve(descriptor)
    model = request.model
    check_supported(model, r.target)
    modes = train_modes(model)
    mode_note = train_mode_note(modes)
    model.eval()
    try:
        captured = capture(model, request.example_inputs, request.dynamic_shapes, r.target.shapes)
        if request.masks is not None:
            problem = mask_problem(captured.signature.inputs, request.masks)
            if problem:
                raise InputError(f"masks: {problem}")
            captured = replace(captured, signature=replace(captured.signature, masks=dict(request.masks)))
        sig = captured.signature
        calib = None if request.calibration is None else \
            calibration_set(sig, request.calibration, request.example_inputs)
        plan = plan_calibration(r.target, calib) if r.target.precision == "int8" else None
        if plan is not None:
            _check_calibration(request, sig, plan, calib.digest)
        extra = flat_samples(sig, request.samples, request.example_inputs, "validation") \
            if request.samples is not None else list(calib.samples if calib else ())
        if request.masks is None and mask_candidates(sig, captured.runs[0].inputs):
            # masks decide where outputs are judged (the reference, the cache key): found before either
            exported = _exported(request, sig, captured.runs[0].inputs)
            captured = replace(captured, signature=_masks_by_flow(sig, exported, captured.runs[0].inputs,
                                                                  captured.notes))
        seconds["capture"] = time.perf_counter() - t0

        reference = None
        if request.validate:
            t1 = time.perf_counter()
            reference = _reference(request, captured, extra[:MAX_VALIDATION_SAMPLES - 1],
                                   r.target.tolerance.noise is not None)
            reference = _with_metric(reference, request.metric, model)
            seconds["reference"] = time.perf_counter() - t1
        cm = _cached_or_built(request, r, captured, plan, calib, reference, seconds, extra)
        if request.pad is not None:
            cm.report.padding = _padding(request, cm.signature, _exported(request, captured.signature,
                                                                          captured.runs[0].inputs),
                                         captured.runs[0].inputs)
    finally:
        restore_modes(modes)
    if mode_note and mode_note not in cm.report.notes:
        cm.report.notes.append(mode_note)
    cm.report.seconds["total"] = time.perf_counter() - t0
    return cm


def _exported(request: Request, signature: Signature, example: list[Any]) -> Exported:
    """The model's exported graph (`analysis.graph.export`) on the example, made once per request and signature
    (an auto target's candidates share it)."""
    key = ("exported", signature.inputs, tuple(signature.dims.items()), tuple(map(id, example)))
    if key not in request._memo:
        request._memo[key] = export(request.model, signature, example)
    return request._memo[key]


def _rows_of_batch(request: Request, captured: Captured, extra: list[list[Any]]) -> tuple[Captured, Exported]:
    """`captured` with its signature saying whether the rows of a batch are independent (`analysis.batch.
    rows_verdict`: proven from the exported graph, confirmed in eager on the example and `extra`), and the report
    notes that say what couples them; and the exported graph, for the ONNX route to lower."""
    sig, example = captured.signature, captured.runs[0].inputs
    exported = _exported(request, sig, example)
    rows = rows_verdict(request.model, sig, exported, [example, *extra])
    notes = list(captured.notes)
    if sig.batch is not None and rows.independent is not True:
        notes.append(f"{rows.why}: a server runs each request alone, never with other clients' rows "
                     "(serving.toml [batching] rows_independent = true overrides this)")
    if rows.unknown_ops:
        notes.append(f"ops without a rule in the batch analysis (each counted as coupling the rows of a batch): "
                     f"{', '.join(rows.unknown_ops)}")
    sig = replace(sig, batch_independent=rows.independent, batch_evidence=rows.why)
    return replace(captured, signature=sig, notes=notes), exported


def _masks_by_flow(signature: Signature, exported: Exported, example: list[Any], notes: list[str]) -> Signature:
    """`signature` with the padding masks found by where the inputs flow (`analysis.padding.masks_by_flow`) added
    to those found by name (the flow decides the meaning where both see one), each new one said in `notes`."""
    found = masks_by_flow(exported, signature, example)
    masks = dict(signature.masks)
    for name, (meaning, where) in found.items():
        if masks.get(name) != meaning:
            notes.append(f"input {name!r} is taken for a padding mask ({meaning!r}: "
                         f"{'nonzero marks a real position' if meaning == 'keep' else 'nonzero marks padding'}) "
                         f"because it masks the {where}; outputs with its (batch, sequence) dims are judged at its "
                         f"real positions (masks= says otherwise)")
            masks[name] = meaning
    return replace(signature, masks=masks)


def _padding(request: Request, signature: Signature, exported: Exported, example: list[Any]) -> dict[str, Any]:
    """Whether a server may pad this request's inputs with `request.pad` (`analysis.padding.padded_verdict`),
    decided once per request (an auto target's candidates share it)."""
    key = ("padding", id(exported))
    if key not in request._memo:
        padded, why = padded_verdict(request.model, signature, exported, example, request.pad)
        request._memo[key] = {"padded": padded, "why": why}
    return dict(request._memo[key])


def _cached_or_built(request: Request, r: Resolved, captured: Captured, plan: CalibrationPlan | None,
                     calib: Calibration | None, reference: Reference | None,
                     seconds: dict[str, float], extra: list[list[Any]]) -> CompiledModel:
    """The build from the cache when there is one that passes validation, or without validation one made from a
    model whose eager outputs on the example are this model's (an entry that fails either is removed and
    rebuilt, and the rebuild's report says so); else a new build: validated, and cached when it passes. A cached
    build keeps the verdict on the rows of a batch it was built with (entries are keyed on the model's fingerprint,
    which decides its graph); a new build has the graph analysed first (`_rows_of_batch`, on the example and
    `extra`)."""
    sig, cache = captured.signature, request.cache
    versions = library_versions(r.backend.versions())
    entry, cm, rebuilt = None, None, None
    if cache is not None:
        digest = calib.digest if calib is not None and r.target.precision == "int8" else None
        entry = cache.build_path(request.fingerprint(), sig, r.target, versions, digest)
        cm = cache.load_build(entry)
        if cm is not None and not request.accept_traced_branches and any(FROZEN_NOTE in n for n in cm.report.notes):
            cm = None   # built with a frozen branch accepted: lower again, which refuses it
        if cm is not None and reference is not None:
            t = time.perf_counter()
            cm.report.validation = check(cm, reference)
            cm.report.seconds["validate"] = time.perf_counter() - t
            if cm.report.validation.passed:
                cache.keep_example_outputs(entry, captured.runs[0].outputs)
                return cm
            rebuilt = (f"the cached build {entry.name} disagreed with eager ({_first_failure(cm.report.validation)}) "
                       "and was removed; this build replaces it")
        elif cm is not None:
            stored = cache.example_outputs(entry)
            if stored is not None and same_outputs(stored, captured.runs[0].outputs):
                return cm
            rebuilt = (f"the cached build {entry.name} was made from a model whose eager outputs on the example "
                       "differ from this model's (it changed in a way its fingerprint cannot see)" if stored is not None
                       else f"the cached build {entry.name} has no eager outputs on the example to check it against")
            rebuilt += " and was removed; this build replaces it"
        if rebuilt:
            log.warning("%s: %s", r.target.name, rebuilt)
            cache.drop_build(entry)
            cm = None
    t = time.perf_counter()
    captured, exported = _rows_of_batch(request, captured, extra)
    seconds["rows"] = time.perf_counter() - t
    judged = None     # the accuracy loop's verdict on the model it returns, where it ran
    judge = None if plan is None or reference is None else lambda candidate: check(candidate, reference)
    cm = _build(request.model, r, captured.signature, captured.runs[0].inputs, plan, seconds, versions, judge,
                request.accept_traced_branches, exported)
    judged = cm.report.validation
    cm.report.notes.extend(captured.notes)
    if rebuilt:
        cm.report.notes.append(rebuilt)
    if plan is not None and request.samples is None:
        cm.report.notes.append("validated on the calibration data: pass samples= to validate on held-out inputs")
    cm.report.cache = None if entry is None else "miss"
    if reference is not None:
        t = time.perf_counter()
        result = judged if judged is not None else check(cm, reference)
        cm.report.validation = result
        cm.report.seconds["validate"] = time.perf_counter() - t
        if not result.passed:
            tried = "".join(f"; {route} failed: {why[:200]}" for route, why in cm.report.attempts)
            msg = (f"{r.target.name}: compiled model (lowered by {cm.report.route}{tried}) disagrees with eager "
                   f"beyond tolerance{_int8_advice(cm)}\n{result}\n{_mask_advice(sig, result)}"
                   f"{_refusal_advice(r.target)}"
                   + (f"\nBefore this build, {rebuilt}." if rebuilt else ""))
            if request.validate is True:
                raise ValidationError(msg, result)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
    if entry is not None and (reference is None or cm.report.validation.passed):
        cache.save_build(entry, cm, captured.runs[0].outputs)
    return cm


def _first_failure(result: ValidationReport) -> str:
    failed = next((f"{o.name}: {o.failure}" for o in result.outputs if not o.passed), None)
    return (failed or (result.errors[0] if result.errors else str(result.metric) if result.metric else
                       "NaN/Inf placed otherwise"))[:300]


def _compile_auto(request: Request, auto: Auto) -> CompiledModel:
    """compile() for an auto target: `select.compile_auto` with a builder that compiles one candidate."""
    if request.validate is not True:
        raise InputError(f"auto target {auto.name!r} validates every candidate and never returns one that fails: "
                         "leave validate=True, or pass a concrete target to compile it with validate=False or 'warn'")
    request = request.reusable()
    return compile_auto(request, auto, lambda candidate: _compile(request, candidate))


def _reference(request: Request, captured: Captured, extra: list[list[Any]], float64: bool) -> Reference:
    """Eager's outputs on the example, the grown example and the `extra` samples; read from the cache when an
    earlier compile of the same model on the same samples made them, and its eager outputs on the example
    are those this compile's capture just saw (else the cached ones are stale: made again)."""
    model, cache = request.model, request.cache
    runs = list(zip(["example", GROWN], captured.runs))
    samples = [(f"sample {i + 1}", flat) for i, flat in enumerate(extra)]
    path = None if cache is None else cache.reference_path(
        request.fingerprint(), captured.signature, [label for label, _ in runs + samples],
        [run.inputs for _, run in runs] + extra, float64)
    reference = None if path is None else cache.load_reference(path)
    fresh = [run.outputs for _, run in runs]
    if reference is not None and not all(map(same_outputs, reference.outputs[:len(runs)], fresh)):
        log.warning("cached reference %s disagrees with eager on the example: the model changed in a way its "
                    "fingerprint cannot see; running eager again", path)
        reference = None
    if reference is None:
        reference = compute_reference(model, captured.signature, runs, samples, float64=float64)
        if path is not None:
            cache.save_reference(path, reference)
    return reference


def _check_calibration(request: Request, signature: Signature, plan: CalibrationPlan, digest: str) -> None:
    """Eager on every calibration sample (InputError for one it fails on), once per model and data in the cache."""
    cache = request.cache
    if cache is not None and cache.calibration_checked(request.fingerprint(), signature, digest):
        return
    check_in_eager(request.model, signature, plan)
    if cache is not None:
        cache.mark_calibration_checked(request.fingerprint(), signature, digest)


def _int8_advice(cm: CompiledModel) -> str:
    loop = cm.report.quantization
    if not loop:
        return ""
    kept = ", ".join(name for name, _ in loop["kept_float"]) or "none helped"
    return (f"; the int8 accuracy loop kept {len(loop['kept_float'])} of {loop['layers']} quantized layers in float "
            f"({kept}) and the contract still fails: try a bf16 target (openvino-cpu-bf16), more representative "
            "calibration data, or a larger [quantization] max_float_layers")


def _build_failed(target: Target, signature: Signature, e: Exception) -> str:
    bf16 = [t.name for t in (*signature.inputs, *signature.outputs) if t.dtype == torch.bfloat16]
    hint = (f" The model takes or gives bfloat16 ({', '.join(bf16)}), which {target.backend} cannot take here: "
            "cast to float32 around the model (openvino-cpu-bf16 computes in bf16 from float32), or use "
            "torchscript-cpu / inductor-cpu" if bf16 else " Try another target (`compilers targets`).")
    return f"{target.name}: {target.backend} could not build an engine for this model: {brief(e)}.{hint}"


def _mask_advice(signature: Signature, result: ValidationReport) -> str:
    """How to declare a padding mask, where a failing output has the (batch, sequence) dims of an integer or bool
    input that is not one: values a model leaves at padding are nobody's answer, and are then not judged."""
    failing = {o.name for o in result.outputs if not o.passed}
    for spec in signature.outputs:
        if spec.name not in failing or signature.mask_axes(spec) is not None:
            continue
        likely = sorted(signature.inputs, key=lambda i: (i.dtype != torch.bool, "mask" not in i.name.lower()))
        for given in likely:
            if given.name in signature.masks or mask_problem(signature.inputs, {given.name: "keep"}) is not None:
                continue
            if replace(signature, masks={given.name: "keep"}).mask_axes(spec) is not None:
                return (f"If input {given.name!r} marks padding, declare it and {spec.name} is judged at the real "
                        f"positions only: compile(..., masks={{{given.name!r}: \"pad\"}}) where nonzero/True marks "
                        f"padding, or masks={{{given.name!r}: \"keep\"}} where nonzero marks a real position.\n")
    return ""


def _refusal_advice(target: Target) -> str:
    """What a user can do about a model that validation refused, in the order worth trying."""
    return (f"What to do: if these errors are acceptable for your use, loosen the tolerance: a descriptor with "
            f"extends = \"{target.name}\" and its own [tolerance] table, or "
            f"compilers.load_target({target.name!r}).with_(noise=..., atol=...); "
            f"or keep this model anyway with validate=\"warn\" (CLI: --no-fail); or try another target "
            f"(`compilers targets` lists them). If the outputs look wrong rather than imprecise, please report it "
            f"with the table above.")


def _build(model: torch.nn.Module, r: Resolved, signature: Signature, example: list[Any],
           calibration: CalibrationPlan | None, seconds: dict[str, float], versions: dict[str, str],
           judge: Callable[[CompiledModel], ValidationReport] | None = None,
           accept_traced_branches: bool = False, exported: Exported | None = None) -> CompiledModel:
    """Lower, optimize and build; for int8 with a `judge` (the validation), run the accuracy loop, whose
    verdict on the model returned is left in its report. `exported`: the model already exported on `example`,
    for the ONNX route to lower instead of exporting again."""
    report = Report(target=r.target.name, backend=r.backend.name, precision=r.target.precision, versions=versions)
    report.seconds = seconds
    with tempfile.TemporaryDirectory(prefix="compilers-") as work:
        spec = Spec(r.target, r.settings, signature, Path(work))
        t = time.perf_counter()
        lowered = run_ladder(r.backend.routes_for(r.settings),
                             lambda route, flat, examples: r.backend.lower(route, flat, examples, spec),
                             model, signature, example, spec.workdir, accept_traced_branches,
                             exported.program_for(example) if exported is not None else None)
        seconds["lower"] = time.perf_counter() - t
        if lowered.dims:   # the lowered model holds for part of these dims' ranges: calls outside are InputErrors
            signature = replace(signature, dims={**signature.dims, **lowered.dims})
            spec = replace(spec, signature=signature)
        report.notes.extend(lowered.notes)
        report.route, report.attempts, report.opset, report.nodes_before = \
            lowered.route, lowered.attempts, lowered.opset, lowered.nodes
        t = time.perf_counter()
        optimized = r.backend.optimize(lowered, spec, calibration)
        seconds["optimize"] = time.perf_counter() - t
        t = time.perf_counter()

        def engine(chosen: Optimized) -> CompiledModel:
            try:
                return CompiledModel(r.backend.build(chosen, spec), signature, r.target, report)
            except CompilerError:
                raise
            except Exception as e:        # the backend library refused the lowered model
                raise ExportError(_build_failed(r.target, signature, e)) from e

        def build(keep: tuple[str, ...]) -> CompiledModel:
            return engine(r.backend.keep_float(optimized, keep) if keep else optimized)

        def probe(layer: str) -> CompiledModel:
            return engine(r.backend.probe_float(optimized, layer))
        max_float = r.target.quantization.max_float_layers
        layers = r.backend.quantized_layers(optimized) if judge and max_float else []
        cm, summary, report.validation = accuracy_loop(build, probe, layers, judge, max_float) if layers else \
            (build(()), None, None)
        if summary is not None:
            report.quantization = asdict(summary)
            report.notes.append(f"int8 accuracy loop: {summary}")
        seconds["build"] = time.perf_counter() - t
    info = cm.engine.describe()
    report.nodes_after = info.get("nodes")
    report.fused = dict(info.get("fused") or optimized.fused)
    report.executed = dict(info.get("executed") or {})
    report.precisions = dict(info.get("precisions") or {})
    report.notes.extend(optimized.notes)
    return cm


def check(cm: CompiledModel, reference: Reference, tolerance: Tolerance | None = None) -> ValidationReport:
    """Run `cm` on every sample of `reference` and give the verdict. A compiled model that raises on a sample
    fails (the grown example is skipped where the engine declares its size out of range)."""
    results: list[list[Any] | None] = []
    errors, skipped = [], []
    for label, flat in zip(reference.labels, reference.samples):
        try:
            results.append(cm.run_flat(flat))
            continue
        except InputError as e:
            if label != GROWN:
                raise
            skipped.append(f"the {label}: {e}")
        except Exception as e:
            hint = " The export probably baked a size in; check dynamic_shapes." if label == GROWN else ""
            errors.append(f"the compiled model fails on the {label} ({_sizes(cm.signature, flat)}): "
                          f"{type(e).__name__}: {str(e)[:300]}.{hint}")
        results.append(None)
    sig = cm.signature
    result = compare(sig, reference, results, tolerance or cm.target.tolerance, errors, skipped)
    if reference.metric is None:
        return result
    metric, eager = reference.metric
    return replace(result, metric=MetricCheck(metric.name, eager, _score(metric, cm, "the compiled model"), metric.max_drop))


def _with_metric(reference: Reference, metric: Metric | None, model: torch.nn.Module) -> Reference:
    return reference if metric is None else replace(reference, metric=(metric, _score(metric, model, "eager")))


def _score(metric: Metric, model: Callable[..., Any], what: str) -> float:
    """`metric.fn(model)` as a float; InputError when the user's metric fails or gives no number."""
    try:
        with torch.inference_mode(), unchanged_state(model) if isinstance(model, torch.nn.Module) else nullcontext():
            score = float(metric.fn(model))
    except CompilerError:
        raise
    except Exception as e:
        raise InputError(f"metric {metric.name!r} failed on {what}: {type(e).__name__}: {e}") from e
    if score != score:
        raise InputError(f"metric {metric.name!r} gave NaN on {what}")
    return score


def _sizes(signature: Signature, flat: list[Any]) -> str:
    sizes = signature.dim_sizes(flat)
    return ", ".join(f"{d}={n}" for d, n in sizes.items()) or "static shapes"


def validate(cm: CompiledModel | CompiledPipeline, model: torch.nn.Module | Pipeline, samples: Iterable[Any],
             metric: Metric | None = None, *, tolerance: Tolerance | Mapping[str, Any] | None = None) -> ValidationReport:
    """Compare `cm` with eager `model` on `samples` (each shaped like the example inputs), and on `metric`.
    `tolerance` judges instead of the target's: a Tolerance, or keys (noise, atol, min_cosine, ...) that
    replace the target's."""
    if isinstance(cm, CompiledPipeline) != isinstance(model, Pipeline):
        raise InputError("validate compares a CompiledPipeline with its eager Pipeline, or a CompiledModel with "
                         "its model; got a mix")
    if isinstance(cm, CompiledPipeline):      # the compiled tensor model against the composed module, on tensors
        samples = [model.tensors(items) for items in samples]
        cm, model = cm.model, model.module
    tolerance = _tolerance(cm.target.tolerance, tolerance)
    flats = flat_samples(cm.signature, samples, None, "validation")
    if not flats:
        raise InputError("validate needs at least one sample")
    modes = train_modes(model)
    model.eval()
    try:
        sig = cm.signature
        first = repeatable_run(model, sig, "sample 1", flats[0])
        reference = compute_reference(model, sig, [("sample 1", first)],
                                      [(f"sample {i + 1}", f) for i, f in enumerate(flats[1:], 1)],
                                      float64=tolerance.noise is not None)
        return check(cm, _with_metric(reference, metric, model), tolerance)
    finally:
        restore_modes(modes)


def _tolerance(base: Tolerance, given: Tolerance | Mapping[str, Any] | None) -> Tolerance:
    if given is None or isinstance(given, Tolerance):
        return given or base
    if not isinstance(given, Mapping):
        raise InputError(f"tolerance must be a compilers.Tolerance or a dict of its keys, not {type(given).__name__}")
    unknown = set(given) - set(asdict(base))
    if unknown:
        raise InputError(f"unknown tolerance key(s) {sorted(unknown)}; allowed: {sorted(asdict(base))}")
    return replace(base, **given)      # Tolerance checks the values (TargetError)
