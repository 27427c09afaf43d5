"""CompiledModel: called like the model; saved to and loaded from a directory with a manifest."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .backends import get_backend
from .backends.base import Engine, Spec
from .errors import ArtifactError, BackendUnavailable, TargetError
from .host import library_versions
from .report import Report
from .settings import runtime_options
from .signature import Signature
from .target import Target

FORMAT = "compilers-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CompiledModel:
    """A compiled model: `cm(*args, **kwargs)` returns what `model(*args, **kwargs)` returns."""

    def __init__(self, engine: Engine, signature: Signature, target: Target, report: Report):
        self.engine = engine
        self.signature = signature
        self.target = target
        self.report = report
        self._numpy_engine = engine.array_kind == "numpy"
        self._engine_device = torch.device(engine.device)
        self._out_dtypes = [s.dtype for s in signature.outputs]
        self._out_np_dtypes = [s.numpy_dtype for s in signature.outputs]
        self._run = engine.run if engine.thread_safe else _serialized(engine.run)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.signature.unflatten(self.run_flat(self.signature.flatten(args, kwargs)))

    def run_flat(self, flat: list[Any]) -> list[Any]:
        """Run on checked flat inputs; outputs come back as torch tensors on the inputs' device (numpy
        arrays for numpy inputs), in the eager model's dtypes. CPU tensors and numpy arrays are handed
        over without copies; a torch engine gets tensors on its own device."""
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), None)
        if self._numpy_engine:
            outs = self._run([_as_numpy(x) if isinstance(x, torch.Tensor) else x for x in flat])
            if device is not None:
                outs = [torch.from_numpy(o) for o in outs]
        else:
            outs = self._run([torch.from_numpy(x).to(self._engine_device) if isinstance(x, np.ndarray)
                              else x.to(self._engine_device) for x in flat])
            if device is None:
                outs = [o.detach().cpu().numpy() for o in outs]
        if device is not None:
            return [o if o.dtype == dt and o.device == device else o.to(device=device, dtype=dt)
                    for o, dt in zip(outs, self._out_dtypes)]
        return [o if o.dtype == dt else o.astype(dt) for o, dt in zip(outs, self._out_np_dtypes)]

    predict = __call__

    def raw_call(self, *args: Any, **kwargs: Any) -> Callable[[], Any] | None:
        """The backend library's own call on these inputs, converted once up front: `cm(...)` minus this
        package's work (binding, checks, conversions). None for an engine that has none."""
        flat = self.signature.flatten(args, kwargs)
        if self._numpy_engine:
            flat = [_as_numpy(x) if isinstance(x, torch.Tensor) else x for x in flat]
        else:
            flat = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in flat]
            flat = [x.to(self._engine_device) for x in flat]
        return self.engine.raw_call(flat)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target.name!r}, route={self.report.route!r})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory atomically: a half-written artifact never appears at `path`."""
        path = Path(path)
        if path.exists() and not (path / MANIFEST).is_file() and any(path.iterdir()):
            raise ArtifactError(f"{path} exists and is not a compilers artifact; choose an empty or new directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)     # mkdtemp makes it private; an artifact is as readable as any new directory
        try:
            self.engine.save(tmp)
            files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "target": self.target.to_dict(), "signature": self.signature.to_dict(),
                "versions": library_versions(get_backend(self.target.backend).versions()),
                "bound": get_backend(self.target.backend).versions(),
                "files": files, "report": self.report.to_dict(),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (a copy for a tensor on another device)."""
    try:
        return x.numpy()
    except (RuntimeError, TypeError):   # a tensor that requires grad, or lives on another device
        return x.detach().cpu().numpy()


def _serialized(run: Any) -> Any:
    """`run` behind a lock, for engines that cannot take calls from several threads at once."""
    lock = threading.Lock()

    def locked(inputs: list[Any]) -> list[Any]:
        with lock:
            return run(inputs)
    return locked


def _replace_dir(new: Path, path: Path) -> None:
    if not path.exists():
        os.rename(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / "artifact")
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at `path`, after checking its format and every file's sha256 (no backend
    library needed); ArtifactError saying what is wrong otherwise."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise ArtifactError(f"{path} is not a compilers artifact: {MANIFEST} is missing; save one with cm.save(dir)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / MANIFEST} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version", 0) > FORMAT_VERSION:
        got = manifest if not isinstance(manifest, dict) else f"{manifest.get('format')} v{manifest.get('format_version')}"
        raise ArtifactError(f"{path}: artifact format {got} is not readable by this compilers (reads {FORMAT} "
                            f"v{FORMAT_VERSION}); upgrade compilers, or save the model again with cm.save(dir)")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing; re-save the artifact")
        if _sha256(file) != digest:
            raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest (altered or corrupt); re-save the artifact")
    return manifest


def load(path: str | os.PathLike, *, check_versions: bool = True,
         options: Mapping[str, Any] | None = None) -> CompiledModel:
    """Load a saved artifact; no source model needed. ArtifactError if a file is missing or altered, or
    (with `check_versions`) if the backend library the engine is bound to has another version here.

    `options` changes the backend's runtime options for this engine (threads, streams, spinning: how it runs,
    not what was compiled and validated); TargetError for any other key."""
    path = Path(path)
    manifest = verify(path)
    target = Target.from_dict(manifest["target"], source=str(path / MANIFEST))
    backend = get_backend(target.backend)
    if options:
        allowed = runtime_options(backend.Settings)
        fixed = sorted(set(options) - set(allowed))
        if fixed:
            raise TargetError(f"option(s) {fixed} cannot change at load: they shaped the compiled engine; recompile "
                              f"with them. Runtime options of {target.backend}: {', '.join(allowed) or 'none'}")
        target = target.with_(**options)
    known = {f.name for f in dataclasses.fields(backend.Settings)}
    dropped = sorted(set(target.options) - known)
    if dropped:   # an option an older compilers had: the engine's files do not depend on it
        warnings.warn(f"{path}: ignoring option(s) {dropped} that this compilers no longer has", RuntimeWarning, stacklevel=2)
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
        for lib, built in manifest.get("bound", {}).items():
            if installed.get(lib) != built:
                raise ArtifactError(f"{path} was built with {lib} {built}, but {installed.get(lib, 'no version')} is "
                                    f"installed; recompile, or load(..., check_versions=False) to try it anyway")
    signature = Signature.from_dict(manifest["signature"])
    engine = backend.load(Spec(target, settings, signature, path))
    return CompiledModel(engine, signature, target, Report.from_dict(manifest["report"]))
