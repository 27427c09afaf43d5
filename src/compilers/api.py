"""compile / validate / targets: the pipeline resolve -> capture -> lower -> optimize -> build -> validate -> package."""
from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .backends import get_backend
from .backends.base import Backend
from .cache import cache_key
from .errors import ArtifactError, BackendUnavailable, ExportError, InputError, TargetError, ValidationError
from .lower import run_ladder
from .report import Report
from .runtime import CompiledModel, library_versions, load
from .signature import FlatModule, Signature, as_call, capture
from .target import Target, builtin_targets, load_target
from .validate import ValidationReport, compare

log = logging.getLogger("compilers")
MAX_VALIDATION_SAMPLES = 32


def targets() -> list[Target]:
    """The built-in targets; each has `.available` and `.unavailable_reason`."""
    return builtin_targets()


def resolve(target: str | Path | Target) -> tuple[Target, Backend]:
    """The Target and its backend, checked: known options, backend runnable here."""
    t = load_target(target)
    backend = get_backend(t.backend)
    unknown = set(t.options) - set(backend.options)
    if unknown:
        raise TargetError(f"target {t.name!r}: unknown option(s) {sorted(unknown)} for backend {backend.name}; "
                          f"known: {', '.join(sorted(backend.options))}")
    for key, opt in backend.options.items():
        if opt.choices and key in t.options and t.options[key] not in opt.choices:
            raise TargetError(f"target {t.name!r}: option {key} = {t.options[key]!r}; choose one of {opt.choices}")
    reason = backend.unavailable_reason(t)
    if reason:
        raise BackendUnavailable(f"target {t.name!r} cannot run here: {reason}")
    return t, backend


def check_supported(model: torch.nn.Module, target: Target) -> None:
    """ExportError when the model holds a module type the target's descriptor declares unsupported."""
    for m in model.modules():
        cls = type(m)
        for name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            if name in target.unsupported:
                raise ExportError(f"target {target.name!r} does not support {cls.__name__} modules: "
                                  f"{target.unsupported[name]} (declared in {target.source}); choose another target")


def compile(model: torch.nn.Module, target: str | Path | Target, example_inputs: Any, *,
            dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
            calibration: Iterable[Any] | None = None, validate: bool | str = True,
            cache_dir: str | Path | None = None) -> CompiledModel:
    """Compile `model` for `target`, validate it against eager, and return a CompiledModel.

    example_inputs: a tuple (positional args), a dict (keyword args) or a lone tensor.
    dynamic_shapes: {input_name: {dim: "dim_name"}}; default: dim 0 of each batch-sized input is "batch".
    calibration: samples shaped like example_inputs (int8 calibration; also extra validation samples).
    validate: True raises ValidationError on a mismatch, "warn" warns, False skips.
    cache_dir: reuse a build when weights, code, signature, target, versions and CPU ISA match.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if validate not in (True, False, "warn"):
        raise InputError(f"validate must be True, False or 'warn', not {validate!r}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tgt, backend = resolve(target)
    check_supported(model, tgt)
    was_training = model.training
    model.eval()
    try:
        signature = capture(model, example_inputs, dynamic_shapes, tgt.shapes)
        example = signature.flatten(*as_call(example_inputs))
        calib = None if calibration is None else [signature.flatten(*as_call(s)) for s in calibration]
        samples = [example, *(calib or [])[:MAX_VALIDATION_SAMPLES - 1]]
        seconds["capture"] = time.perf_counter() - t0
        versions = library_versions(backend.versions())

        cm, entry = None, None
        if cache_dir is not None:
            entry = Path(cache_dir) / f"{tgt.name}-{cache_key(model, signature, tgt, versions)[:24]}"
            cm = _cached(entry)
        if cm is None:
            cm = _build(model, tgt, backend, signature, example, calib, seconds, versions)
        cm.report.cache = None if entry is None else ("hit" if cm.report.cache == "hit" else "miss")

        if validate:
            t1 = time.perf_counter()
            result = _check(cm, model, samples, probe=True)
            cm.report.validation = result
            cm.report.seconds["validate"] = time.perf_counter() - t1
            if not result.passed:
                tried = "".join(f"; {r} failed: {why[:200]}" for r, why in cm.report.attempts)
                msg = (f"{tgt.name}: compiled model (lowered by {cm.report.route}{tried}) disagrees with eager "
                       f"beyond tolerance\n{result}")
                if validate is True:
                    raise ValidationError(msg, result)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if entry is not None and cm.report.cache == "miss" and (not validate or cm.report.validation.passed):
            cm.save(entry)
    finally:
        model.train(was_training)
    cm.report.seconds["total"] = time.perf_counter() - t0
    return cm


def _cached(entry: Path) -> CompiledModel | None:
    if not entry.is_dir():
        return None
    try:
        cm = load(entry)
    except ArtifactError as e:  # stale or damaged: rebuild over it
        log.warning("cache entry %s is unusable (%s); rebuilding", entry, e)
        return None
    cm.report.cache = "hit"
    cm.report.seconds = {}
    return cm


def _build(model: torch.nn.Module, tgt: Target, backend: Backend, signature: Signature, example: list[Any],
           calibration: list[list[Any]] | None, seconds: dict[str, float], versions: dict[str, str]) -> CompiledModel:
    report = Report(target=tgt.name, backend=backend.name, precision=tgt.precision, versions=versions)
    report.seconds = seconds
    with tempfile.TemporaryDirectory(prefix="compilers-") as work:
        t = time.perf_counter()
        lowered = run_ladder(backend, tgt, model, signature, example, Path(work))
        seconds["lower"] = time.perf_counter() - t
        report.route, report.attempts, report.opset, report.nodes_before = \
            lowered.route, lowered.attempts, lowered.opset, lowered.nodes
        t = time.perf_counter()
        optimized = backend.optimize(lowered, tgt, calibration, Path(work))
        seconds["optimize"] = time.perf_counter() - t
        t = time.perf_counter()
        engine = backend.build(optimized, tgt, signature)
        seconds["build"] = time.perf_counter() - t
    info = engine.describe()
    report.nodes_after = info.get("nodes")
    report.fused = dict(info.get("fused") or optimized.fused)
    report.executed = dict(info.get("executed") or {})
    report.precisions = dict(info.get("precisions") or {})
    report.notes.extend(optimized.notes)
    return CompiledModel(engine, signature, tgt, report)


def _resized(signature: Signature, flat: Sequence[Any]) -> list[Any] | None:
    """`flat` doubled along every dynamic dim (catches sizes an export baked in); None if that leaves a range."""
    out = []
    for spec, x in zip(signature.inputs, flat):
        if not isinstance(x, torch.Tensor):
            return None
        for i, d in enumerate(spec.shape):
            if isinstance(d, str) and x.shape[i] > 0:
                if not signature.dims[d].contains(2 * x.shape[i]):
                    return None
                x = torch.cat([x, x], dim=i)
        out.append(x)
    return out


def _check(cm: CompiledModel, model: torch.nn.Module, samples: list[list[Any]], probe: bool = False) -> ValidationReport:
    """Compiled vs eager on flat samples; with `probe`, also on the first sample grown along its dynamic dims."""
    sig = cm.signature
    eager = FlatModule(model, sig).eval()
    with torch.inference_mode():
        refs = [eager(*flat) for flat in samples]
    gots = [cm.run_flat(flat) for flat in samples]
    grown = _resized(sig, samples[0]) if probe and sig.dims else None
    if grown is not None:
        try:
            with torch.inference_mode():
                ref = eager(*grown)
        except Exception as e:
            cm.report.notes.append(f"grown validation sample skipped: eager fails on it ({type(e).__name__})")
        else:
            try:
                got = cm.run_flat(grown)
            except InputError as e:   # the engine declares those sizes out of its range
                cm.report.notes.append(f"grown validation sample skipped: {e}")
            except Exception as e:
                raise ValidationError(f"{cm.target.name}: the compiled model fails on inputs grown along its dynamic "
                                      f"dims ({', '.join(sig.dims)}): {type(e).__name__}: {str(e)[:300]}. "
                                      "The export probably baked a size in; check dynamic_shapes") from None
            else:
                refs.append(ref)
                gots.append(got)
    return compare(sig.output_names, refs, gots, cm.target.tolerance)


def validate(cm: CompiledModel, model: torch.nn.Module, samples: Iterable[Any]) -> ValidationReport:
    """Compare `cm` with eager `model` on `samples` (each shaped like the example inputs)."""
    flats = [cm.signature.flatten(*as_call(s)) for s in samples]
    if not flats:
        raise InputError("validate needs at least one sample")
    was_training = model.training
    model.eval()
    try:
        return _check(cm, model, flats)
    finally:
        model.train(was_training)
