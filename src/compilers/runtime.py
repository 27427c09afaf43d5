"""CompiledModel: called like the model, saved as an artifact (`artifact.py`) and loaded from one."""
from __future__ import annotations

import cmath
import dataclasses
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from . import artifact
from .artifact import malformed, manifest_records
from .backends import get_backend
from .backends.base import Engine, Spec
from .errors import ArtifactError, BackendUnavailable, CompilerError, EngineError, InputError, TargetError, brief
from .host import library_versions
from .records import from_json
from .reference import probe_label
from .report import Report
from .settings import runtime_options
from .pipeline import FOLDER as PIPELINE_FOLDER, CompiledPipeline, Steps
from .signature import Signature, numpy_dtype, storage_address, to_numpy, to_torch
from .target import Target
from .validate import ValidationReport


#: load options that change how calls are checked, not the engine: `[tolerance] nonfinite_inputs`
CALL_OPTIONS = ("nonfinite_inputs",)


class CompiledModel:
    """A compiled model: `cm(*args, **kwargs)` returns what `model(*args, **kwargs)` returns."""

    def __init__(self, engine: Engine, signature: Signature, target: Target, report: Report):
        self.engine = engine
        self.signature = signature
        self.target = target
        self.report = report
        self.digest: str | None = None   # "sha256:...": the content digest of the artifact it was saved to / loaded from
        self._numpy_engine = engine.array_kind == "numpy"
        self._engine_device = torch.device(engine.device)
        self._out_dtypes = [s.dtype for s in signature.outputs]
        self._out_np_dtypes = [numpy_dtype(s.dtype) for s in signature.outputs]     # None: numpy has none
        self._numpy_outputs = None not in self._out_np_dtypes
        # numpy <-> torch: through ml_dtypes' bfloat16 only where the signature holds bfloat16 (the call path's
        # conversions, chosen once)
        self._to_torch = to_torch if any(s.dtype == torch.bfloat16 for s in signature.inputs) else torch.from_numpy
        bf16_out = any(s.dtype == torch.bfloat16 for s in signature.outputs)
        self._out_to_torch = to_torch if bf16_out else torch.from_numpy
        self._out_to_numpy = to_numpy if bf16_out else torch.Tensor.numpy
        self._run = engine.run if engine.thread_safe else _serialized(engine.run)
        # outputs in memory a caller may edit and a later call reads or returns again (`_own_memory`): only those
        # the engine's graph may return in memory not its call's own are checked, none when it proves all fresh;
        # what eager's outputs share is all they may share
        shares = engine.may_share()
        self._checked = tuple(range(len(signature.outputs))) if shares is None else tuple(sorted(shares))
        held = engine.constants() if self._checked else None
        self._engine_memory = None if held is None else frozenset(filter(None, map(storage_address, held)))
        shares: list[set] = [set() for _ in signature.outputs]
        for a in signature.aliases:
            shares[a.output].add((a.of, a.index))
        self._shares = tuple(map(frozenset, shares))
        self._whole = tuple(a for a in signature.aliases if a.whole)
        self._refusals: tuple[Any, Any, tuple] = (None, None, ())      # (validation, target, nonfinite_refused)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.signature.flatten(args, kwargs)
        return self.signature.unflatten(self.run_flat(flat, refuse_nonfinite=self._refused()))

    def check_inputs(self, flat: list[Any]) -> None:
        """InputError unless `flat` are inputs this model takes: the Signature's checks, the engine's own
        (`Engine.check_inputs`), and no NaN/Inf where the engine computes them otherwise than eager
        (`nonfinite_refused`). What a server checks per request, before requests share an engine call."""
        self.signature.check(flat)
        self.engine.check_inputs(flat)
        refused = self._refused()
        if refused:
            self._check_finite(flat, refused)

    def _refused(self) -> tuple[tuple[int, str], ...]:
        """`nonfinite_refused(self)`, remade only when the validation or the target changed."""
        if self.report.validation is not self._refusals[0] or self.target is not self._refusals[1]:
            self._refusals = (self.report.validation, self.target,
                              nonfinite_refused(self.signature, self.target, self.report.validation))
        return self._refusals[2]

    def _check_finite(self, flat: list[Any], refused: tuple[tuple[int, str], ...]) -> None:
        check_finite(flat, refused, self.signature, self.target)

    def run_flat(self, flat: list[Any], refuse_nonfinite: tuple[tuple[int, str], ...] = ()) -> list[Any]:
        """Run on checked flat inputs; outputs come back as torch tensors on the inputs' device (numpy
        arrays for numpy inputs), in the eager model's dtypes. CPU tensors and numpy arrays are handed
        over without copies; a torch engine gets tensors on its own device. An output shares memory with an
        input or another output only where eager's does (`Signature.aliases`), and never with the engine.
        `refuse_nonfinite` (`nonfinite_refused`): inputs checked for NaN/Inf on the arrays the engine gets (one
        conversion)."""
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), None)
        if device is None and not self._numpy_outputs:
            lacking = sorted({str(s.dtype) for s, d in zip(self.signature.outputs, self._out_np_dtypes) if d is None})
            raise InputError(f"the model gives {', '.join(lacking)} outputs, which numpy has no dtype for; call it "
                             "with torch tensors, not numpy arrays")
        try:
            if self._numpy_engine:
                arrays = [_as_numpy(x) if isinstance(x, torch.Tensor) else x for x in flat]
            else:
                arrays = [self._to_torch(x).to(self._engine_device) if isinstance(x, np.ndarray)
                          else x.to(self._engine_device) for x in flat]
            if refuse_nonfinite:
                self._check_finite(arrays, refuse_nonfinite)
            outs = self._run(arrays)
        except CompilerError:
            raise
        except Exception as e:
            raise self._engine_error(flat, e) from e
        if self._checked:
            outs = self._own_memory(outs, arrays)
        if self._numpy_engine:
            if device is not None:
                outs = [self._out_to_torch(o) for o in outs]
        elif device is None:
            outs = [self._out_to_numpy(o.detach().cpu()) for o in outs]
        if device is not None:
            outs = [o if o.dtype == dt and o.device == device else o.to(device=device, dtype=dt)
                    for o, dt in zip(outs, self._out_dtypes)]
        else:
            outs = [o if o.dtype == dt else o.astype(dt) for o, dt in zip(outs, self._out_np_dtypes)]
        if self._whole:
            self._as_eager(outs, flat, device)
        return outs

    def _own_memory(self, outs: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The engine's outputs, each copied that shares memory with an input, an earlier output or the engine's
        own constants where eager's output does not (`Signature.aliases`): no output is memory that a later call
        reads or returns again, so a caller may edit it as eager's. Only the outputs the engine may return in
        such memory are looked at (`Engine.may_share`): the others cannot share any."""
        held, checked = self._engine_memory, self._checked
        if held is not None:
            try:      # the common case, in one pass: no output shares memory with anything
                seen = set()
                for x in inputs:
                    seen.add(x.untyped_storage().data_ptr())
                for j in checked:
                    address = outs[j].untyped_storage().data_ptr()
                    if address in seen or address in held or not address:
                        break
                    seen.add(address)
                else:
                    return outs
            except (RuntimeError, NotImplementedError):    # a layout without storage (storage_address: 0)
                pass
        shares = self._shares
        owners: dict[int, tuple[str, int]] = {}
        for i, x in enumerate(inputs):
            owners.setdefault(storage_address(x), ("input", i))
        outs = list(outs)
        for j in checked:
            o = outs[j]
            address = storage_address(o)
            if not address:
                continue
            owner = owners.get(address)
            if owner is None and held is not None and address not in held:
                owners[address] = ("output", j)      # memory of this call's own
            elif owner is None or owner not in shares[j]:
                outs[j] = o.clone()
                owners[storage_address(outs[j])] = ("output", j)
        return outs

    def _as_eager(self, outs: list[Any], flat: Sequence[Any], device: torch.device | None) -> None:
        """Each output that eager returns as an input or an earlier output itself made that object (the caller's
        own input, as eager's), wherever the engine's answer holds its values."""
        for a in self._whole:
            same = flat[a.index] if a.of == "input" else outs[a.index]
            if device is not None and isinstance(same, np.ndarray):
                same = self._to_torch(same)
            got = outs[a.output]
            if got is not same and isinstance(got, torch.Tensor) == isinstance(same, torch.Tensor) \
                    and (_same_view(got, same) or _same_values(got, same)):
                outs[a.output] = same

    predict = __call__

    def _engine_error(self, flat: list[Any], e: Exception) -> EngineError:
        sizes = ", ".join(f"{spec.name}: {tuple(x.shape)}" for spec, x in zip(self.signature.inputs, flat))
        return EngineError(f"the {self.target.backend} engine of {self.target.name} failed on these inputs ({sizes}): "
                           f"{brief(e)}. Eager usually rejects such inputs too (an index out "
                           "of range, a size the model cannot take); if model(...) runs on them, please report it "
                           "with these shapes")

    def raw_call(self, *args: Any, **kwargs: Any) -> Callable[[], Any] | None:
        """The backend library's own call on these inputs, converted once up front: `cm(...)` minus this
        package's work (binding, checks, conversions). None for an engine that has none."""
        flat = self.signature.flatten(args, kwargs)
        if self._numpy_engine:
            flat = [_as_numpy(x) if isinstance(x, torch.Tensor) else x for x in flat]
        else:
            flat = [self._to_torch(x) if isinstance(x, np.ndarray) else x for x in flat]
            flat = [x.to(self._engine_device) for x in flat]
        return self.engine.raw_call(flat)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target.name!r}, route={self.report.route!r})"

    def save(self, path: str | os.PathLike, *, steps: Steps | None = None) -> Path:
        """Write the artifact directory atomically and return `path`: readers of `path` see the old artifact or
        the new one, never a half-written one, nor none. An existing `path` is replaced only when it is empty
        or a compilers artifact; anything else is an ArtifactError, with nothing deleted. Sets `self.digest`,
        the content digest that `load(path, digest=...)` pins (also in the manifest). `steps`: a pipeline's
        pre-processing and labels, saved with the model (CompiledPipeline.save)."""
        path = Path(path)
        backend = get_backend(self.target.backend)
        records = {"target": self.target.to_dict(), "signature": self.signature.to_dict(),
                   "versions": library_versions(backend.versions()), "bound": backend.versions(),
                   "report": self.report.to_dict()}
        if steps is not None:
            records["pipeline"] = steps.to_dict()

        def save_files(directory: Path) -> None:
            self.engine.save(directory)
            if steps is not None:
                steps.save(directory / PIPELINE_FOLDER)
        self.digest = artifact.write(path, save_files, records, self.target.backend)
        return path


def nonfinite_refused(signature: Signature, target: Target,
                      validation: ValidationReport | None) -> tuple[tuple[int, str], ...]:
    """The float inputs (flat index, what the engine does) in which a call may not hold NaN/Inf: those whose
    NaN/Inf probe found the engine placing non-finite values otherwise than eager (OpenVINO's relu(NaN) = 0),
    and, on a target known to deviate (`[tolerance] nonfinite = "report"`), those no probe judged. None when
    the target allows them (`[tolerance] nonfinite_inputs = "allow"`)."""
    tolerance = target.tolerance
    if tolerance.nonfinite_inputs == "allow":
        return ()
    deviations = {c.probe: c.difference for c in validation.nonfinite} if validation is not None else {}
    skipped = {note.split(":")[0] for note in validation.skipped} if validation is not None else set()
    refused = []
    for i, spec in enumerate(signature.inputs):
        label = probe_label(spec.name)
        if not spec.dtype.is_floating_point:
            continue
        if label in deviations:
            refused.append((i, f"its validation found: {deviations[label]}"))
        elif tolerance.nonfinite == "report" and (validation is None or label in skipped):
            refused.append((i, "its NaN/Inf are a known deviation of this target, not checked for this model"))
    return tuple(refused)


def check_finite(flat: list[Any], refused: tuple[tuple[int, str], ...], signature: Signature, target: Target) -> None:
    """InputError naming the first input of `refused` (from `nonfinite_refused`) that holds NaN or Inf."""
    for i, deviation in refused:
        if not _finite(flat[i]):
            raise InputError(
                f"input {signature.inputs[i].name!r} holds NaN or Inf, which {target.name} computes otherwise than "
                f"eager ({deviation}): it would return ordinary numbers. Replace them (e.g. torch.nan_to_num), or "
                "accept what the engine computes: load(path, options={'nonfinite_inputs': 'allow'}), serving.toml "
                "[engine] nonfinite_inputs = \"allow\", or a descriptor's [tolerance] nonfinite_inputs = \"allow\"")


def _finite(x: Any) -> bool:
    """Whether every element of an array or tensor is finite. x.x (BLAS's dot) is finite only when every element
    is: NaN and Inf carry through, and a sum of squares is never NaN; so finite settles it, and only Inf (an
    overflow, or a real Inf) takes the exact check. One call with no temporary array: right after an engine's
    call it took a third of np.isfinite(x).all()'s time, a tenth of torch's, in a one-off loop (2026-12-04)."""
    if isinstance(x, torch.Tensor):
        try:
            x = x.numpy()    # CPU memory without grad, conjugate or negative bits, in a dtype numpy has
        except (RuntimeError, TypeError):
            return bool(torch.isfinite(x).all())
    return cmath.isfinite(np.vdot(x, x)) or bool(np.isfinite(x).all())


def _same_view(a: Any, b: Any) -> bool:
    """Whether two arrays (or two tensors) are views of the same memory with the same layout."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__ == b.__array_interface__
    return (a.data_ptr(), a.shape, a.stride(), a.dtype, a.device) == (b.data_ptr(), b.shape, b.stride(), b.dtype, b.device)


def _same_values(a: Any, b: Any) -> bool:
    """Whether two arrays (or two tensors) hold the same elements, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    return (a.is_floating_point() or a.is_complex()) and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (a copy for a tensor on another device)."""
    try:
        return x.numpy()                # a numpy engine takes no bfloat16: its backends refuse such models
    except (RuntimeError, TypeError):   # a tensor that requires grad, or lives on another device
        return x.detach().cpu().numpy()


def _serialized(run: Any) -> Any:
    """`run` behind a lock, for engines that cannot take calls from several threads at once."""
    lock = threading.Lock()

    def locked(inputs: list[Any]) -> list[Any]:
        with lock:
            return run(inputs)
    return locked


def load(path: str | os.PathLike, *, check_versions: bool = True,
         options: Mapping[str, Any] | None = None, digest: str | None = None) -> CompiledModel | CompiledPipeline:
    """Load a saved artifact; no source model needed (a CompiledPipeline when it carries a pipeline). ArtifactError if a file is missing, unlisted or altered,
    or (with `check_versions`) if the backend library the engine is bound to has another version here.

    `digest` ("sha256:...", printed by `compilers compile`, `cm.digest` after save) pins the artifact: one with
    other content is an ArtifactError before any of its files reaches the backend. Pin artifacts you did not
    build yourself: TorchScript and AOTInductor files run code when loaded (see README, Artifacts).

    `options` changes the backend's runtime options for this engine (threads, streams, spinning: how it runs,
    not what was compiled and validated); TargetError for any other key.

    A save that replaces `path` meanwhile makes load start over, so it returns the old or the new artifact."""
    def open_verified(where: Path, manifest: dict[str, Any]) -> CompiledModel | CompiledPipeline:
        cm = _load_verified(where, manifest, check_versions, options)
        cm.digest = manifest["digest"]
        if "pipeline" not in manifest:
            return cm
        steps = malformed(where, lambda: Steps.load(manifest["pipeline"], where / PIPELINE_FOLDER))
        return CompiledPipeline(cm, steps)
    return artifact.read(Path(path), digest, open_verified)


def _load_verified(path: Path, manifest: dict[str, Any], check_versions: bool,
                   options: Mapping[str, Any] | None) -> CompiledModel:
    target, signature, report = manifest_records(path, manifest)
    bound = malformed(path, lambda: from_json(dict[str, str], manifest.get("bound", {}), "bound"))
    backend = get_backend(target.backend)
    options = dict(options or {})
    calls = {k: options.pop(k) for k in CALL_OPTIONS if k in options}
    if calls:
        try:
            target = target.with_(**calls)
        except TargetError as e:
            raise TargetError(f"load options {calls}: {e}") from None
    if options:
        allowed = runtime_options(backend.Settings)
        fixed = sorted(set(options) - set(allowed))
        if fixed:
            raise TargetError(f"option(s) {fixed} cannot change at load: they shaped the compiled engine; recompile "
                              f"with them. Runtime options of {target.backend}: {', '.join(allowed + list(CALL_OPTIONS))}")
        target = target.with_(**options)
    known = {f.name for f in dataclasses.fields(backend.Settings)}
    dropped = sorted(set(target.options) - known)
    if dropped:   # an option an older compilers had: the engine's files do not depend on it
        warnings.warn(f"{path}: ignoring option(s) {dropped} that this compilers no longer has", RuntimeWarning, stacklevel=3)
        target = dataclasses.replace(target, options={k: v for k, v in target.options.items() if k in known})
    try:
        settings = backend.settings(target)
    except TargetError as e:
        if options:
            raise TargetError(f"load options {dict(options)}: {e}") from None
        raise ArtifactError(f"{path} holds options this compilers cannot use ({e}); recompile it") from None
    reason = backend.unavailable_reason(target) or backend.probe(target)
    if reason:
        raise BackendUnavailable(f"cannot load {path}: {reason}")
    if check_versions:
        installed = backend.versions()
        for lib, built in bound.items():
            if installed.get(lib) != built:
                raise ArtifactError(f"{path} was built with {lib} {built}, but {installed.get(lib, 'no version')} is "
                                    f"installed; recompile, or load(..., check_versions=False) to try it anyway")
    engine = backend.load(Spec(target, settings, signature, path))
    return CompiledModel(engine, signature, target, report)
