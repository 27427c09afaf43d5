"""CompiledModel: called like the model; saved to and loaded from a directory with a manifest."""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .backends import get_backend
from .backends.base import Engine, Spec
from .errors import ArtifactError, BackendUnavailable, CompilerError, EngineError, InputError, TargetError, brief
from .files import staging_dir
from .host import library_versions
from .records import from_json
from .report import Report
from .settings import runtime_options
from .signature import Signature, numpy_dtype
from .target import Target

FORMAT = "compilers-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIGEST_PREFIX = "sha256:"
_ATTEMPTS = 40      # reads of an artifact that a concurrent save keeps replacing, before giving up


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
        self._out_np_dtypes = [numpy_dtype(s.dtype) for s in signature.outputs]     # None: numpy has none (bf16)
        self._numpy_outputs = None not in self._out_np_dtypes
        self._run = engine.run if engine.thread_safe else _serialized(engine.run)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.signature.unflatten(self.run_flat(self.signature.flatten(args, kwargs)))

    def run_flat(self, flat: list[Any]) -> list[Any]:
        """Run on checked flat inputs; outputs come back as torch tensors on the inputs' device (numpy
        arrays for numpy inputs), in the eager model's dtypes. CPU tensors and numpy arrays are handed
        over without copies; a torch engine gets tensors on its own device."""
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), None)
        if device is None and not self._numpy_outputs:
            raise InputError(f"the model gives {', '.join(str(s.dtype) for s in self.signature.outputs)} outputs; "
                             "numpy has no bfloat16, so call it with torch tensors, not numpy arrays")
        try:
            if self._numpy_engine:
                outs = self._run([_as_numpy(x) if isinstance(x, torch.Tensor) else x for x in flat])
            else:
                outs = self._run([torch.from_numpy(x).to(self._engine_device) if isinstance(x, np.ndarray)
                                  else x.to(self._engine_device) for x in flat])
        except CompilerError:
            raise
        except Exception as e:
            raise self._engine_error(flat, e) from e
        if self._numpy_engine:
            if device is not None:
                outs = [torch.from_numpy(o) for o in outs]
        elif device is None:
            outs = [o.detach().cpu().numpy() for o in outs]
        if device is not None:
            return [o if o.dtype == dt and o.device == device else o.to(device=device, dtype=dt)
                    for o, dt in zip(outs, self._out_dtypes)]
        return [o if o.dtype == dt else o.astype(dt) for o, dt in zip(outs, self._out_np_dtypes)]

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
            flat = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in flat]
            flat = [x.to(self._engine_device) for x in flat]
        return self.engine.raw_call(flat)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target.name!r}, route={self.report.route!r})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory atomically and return `path`: readers of `path` see the old artifact or
        the new one, never a half-written one, nor none (see _replace_dir). An existing `path` is replaced only
        when it is empty or a compilers artifact; anything else is an ArtifactError, with nothing deleted.
        Sets `self.digest`, the content digest that `load(path, digest=...)` pins (also in the manifest)."""
        path = Path(path)
        check_destination(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(path.parent, f".{path.name}.tmp-")
        try:
            self.engine.save(tmp)
            present, odd = _tree(tmp)
            if odd:
                raise ArtifactError(f"the {self.target.backend} engine saved links or special files {odd}; an "
                                    "artifact holds regular files only (a bug in its backend: please report it)")
            files = {name: _sha256(file) for name, file in sorted(present.items())}
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "target": self.target.to_dict(), "signature": self.signature.to_dict(),
                "versions": library_versions(get_backend(self.target.backend).versions()),
                "bound": get_backend(self.target.backend).versions(),
                "files": files, "report": self.report.to_dict(),
            }
            manifest["digest"] = _content_digest(files, manifest)
            manifest["generation"] = uuid.uuid4().hex   # tells one save from the next of the same model (load)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _sync_tree(tmp)
            _replace_dir(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        self.digest = manifest["digest"]
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
    """Put the directory `new` at `path`, replacing what is there so that `path` never goes missing.

    On Linux, renameat2(RENAME_EXCHANGE) swaps the two directories in one step (ext4, xfs, btrfs, tmpfs,
    overlayfs...); the old artifact, now at `new`, is removed afterwards. Where it is unavailable, the old
    artifact is renamed aside and the new one renamed in: `path` is missing for the moment between the two
    renames (load() waits that out when it sees a save in progress), and an exception in between puts the
    old one back."""
    if not os.path.lexists(path):
        try:
            os.rename(new, path)
            _sync_dir(path.parent)
            return
        except OSError as e:        # another save put something there first
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(new, path):
        _sync_dir(path.parent)
        _remove(new)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.rename(path, old / "artifact")
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old / "artifact", path)
            raise
        _sync_dir(path.parent)
    finally:
        _remove(old)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries `a` and `b` (Linux renameat2); False where that is unsupported."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
        except (AttributeError, OSError):     # a libc without renameat2 (glibc < 2.28)
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False                          # this filesystem or kernel cannot exchange: rename aside instead
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so a rename never publishes data still in the page cache."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(dirpath))


def _tree(root: Path) -> tuple[dict[str, Path], list[str]]:
    """The regular files under `root` by relative posix path (the top-level manifest aside), and the entries
    that are neither regular files nor directories (links, devices...), without following any link."""
    files: dict[str, Path] = {}
    odd: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    odd.append(name)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                elif entry.is_file(follow_symlinks=False):
                    files[name] = Path(entry.path)
                else:
                    odd.append(name)
    files.pop(MANIFEST, None)
    return files, sorted(odd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_digest(files: Mapping[str, str], manifest: Mapping[str, Any]) -> str:
    """The artifact's content digest: sha256 over its files (sorted path and sha256 pairs), its signature and
    its target, i.e. everything load() runs. The rest of the manifest (report, versions) is description."""
    content = {"files": sorted(files.items()), "signature": manifest["signature"], "target": manifest["target"]}
    return DIGEST_PREFIX + hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_manifest(path: Path) -> bytes | None:
    """The manifest's bytes, None when there is none; never through a link."""
    try:
        fd = os.open(path / MANIFEST, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"{path / MANIFEST} is a symbolic link; an artifact holds regular files only: "
                                "re-save or fetch the artifact again") from None
        raise ArtifactError(f"{path / MANIFEST} cannot be read ({e}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's manifest, format checked but files not hashed (what it says, not proof of what is there:
    `load` and `verify` check the files); ArtifactError when there is none or it is malformed."""
    path = Path(path)
    raw = _read_manifest(path)
    if raw is None:
        raise ArtifactError(f"{path} is not a compilers artifact: {MANIFEST} is missing")
    return _parse_manifest(path, raw)


def _parse_manifest(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / MANIFEST} is corrupt: {e}") from None
    version = manifest.get("format_version", 0) if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(version, int) \
            or version > FORMAT_VERSION:
        got = manifest if not isinstance(manifest, dict) else f"{manifest.get('format')} v{manifest.get('format_version')}"
        raise ArtifactError(f"{path}: artifact format {got} is not readable by this compilers (reads {FORMAT} "
                            f"v{FORMAT_VERSION}); upgrade compilers, or save the model again with cm.save(dir)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in files.items()):
        raise ArtifactError(f"{path / MANIFEST}: 'files' must list every file of the artifact with its sha256; "
                            "re-save the artifact")
    for key in ("target", "signature"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{path / MANIFEST}: '{key}' is missing or malformed; re-save the artifact")
    return manifest


def _check_files(path: Path, manifest: Mapping[str, Any]) -> str:
    """The content digest, after checking that the directory's files are exactly those the manifest lists,
    each with its sha256. Only files found inside `path` (no link followed) are read, so a listed name
    outside it (`../x`, `/etc/x`) is as absent as any other: the message reveals nothing about it."""
    listed: dict[str, str] = manifest["files"]
    present, odd = _tree(path)
    missing = sorted(set(listed) - set(present))
    unlisted = sorted(set(present) - set(listed))
    altered = sorted(name for name in set(listed) & set(present) if _sha256(present[name]) != listed[name])
    if missing or unlisted or altered or odd or not listed:
        parts = ([f"{name} listed in the manifest is missing" for name in missing]
                 + [f"{name} is not listed in the manifest" for name in unlisted]
                 + [f"{name} does not match its sha256 in the manifest" for name in altered]
                 + [f"{name} is a link or special file" for name in odd]) or ["the manifest lists no model file"]
        raise ArtifactError(f"{path}: its files are not those its manifest lists ({'; '.join(parts)}): the artifact "
                            "is incomplete or was altered; re-save it or fetch it again")
    return _content_digest(listed, manifest)


def _save_in_progress(path: Path) -> bool:
    """A save to `path` is under way (its staging or set-aside directory exists)."""
    try:
        return any(p.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-")) for p in path.parent.iterdir())
    except OSError:
        return False


def _changed(path: Path, raw: bytes | None) -> bool:
    """The artifact at `path` is not the one whose manifest read `raw` (a save replaced it meanwhile)."""
    try:
        now = _read_manifest(path)
    except ArtifactError:         # the manifest became a link or unreadable: report that, do not wait
        return False
    return now != raw or (raw is None and _save_in_progress(path))


def _pause(attempt: int) -> None:
    time.sleep(min(0.001 * 2 ** attempt, 0.05))


def _verified(path: Path, digest: str | None) -> tuple[dict[str, Any], bytes]:
    """The checked manifest (with its computed "digest") and its bytes; retried while a save replaces `path`."""
    if digest is not None and not (isinstance(digest, str) and digest.startswith(DIGEST_PREFIX)):
        raise ArtifactError(f"digest={digest!r}: pin an artifact with the 'sha256:...' digest that save printed "
                            "(cm.digest, compilers.runtime.digest(path))")
    last: ArtifactError | None = None
    for attempt in range(_ATTEMPTS):
        raw = None
        try:
            raw = _read_manifest(path)
            if raw is None:
                raise ArtifactError(f"{path} is not a compilers artifact: {MANIFEST} is missing; save one with cm.save(dir)")
            manifest = _parse_manifest(path, raw)
            try:
                computed = _check_files(path, manifest)
            except OSError as e:        # a file went away while it was read
                raise ArtifactError(f"{path}: a file could not be read ({e}); re-save the artifact") from None
            if digest is not None and computed != digest:
                raise ArtifactError(f"{path} is not the artifact you pinned: its digest is {computed}, not {digest}; "
                                    "nothing in it was loaded. Fetch the artifact you pinned, or pin this one if you trust it")
            manifest["digest"] = computed      # a stored one is what save printed; only a pinned one is checked
            return manifest, raw
        except ArtifactError as e:
            if not _changed(path, raw):
                raise
            last = e
        _pause(attempt)
    raise ArtifactError(f"{path} kept changing while it was read ({_ATTEMPTS} tries; the last: {last}); something "
                        "saves over it continually (or a save was killed, leaving its .tmp-/.old- directory beside "
                        "it): load it again once that stops")


def verify(path: str | os.PathLike, *, digest: str | None = None) -> dict[str, Any]:
    """The manifest of the artifact at `path`, after checking its format and that its directory holds exactly
    the files the manifest lists, each with its sha256 (no backend library needed); its "digest" is the
    content digest computed from them. ArtifactError saying what is wrong otherwise, or when `digest`
    ("sha256:...") is given and differs."""
    return _verified(Path(path), digest)[0]


def digest(path: str | os.PathLike) -> str:
    """The content digest ("sha256:...") of the verified artifact at `path`: what load(path, digest=...) pins."""
    return verify(path)["digest"]


def check_destination(path: str | os.PathLike) -> bool:
    """Whether `save(path)` would replace an artifact (True) or write a new one (False); ArtifactError, before
    anything is built, when it cannot write there: `path` or a parent is a file, or `path` is a directory that
    is not a compilers artifact. An artifact whose directory holds only the files its manifest lists may be
    replaced (they may be damaged: a cache rebuilds over those)."""
    path = Path(path)
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write an artifact at {path}: {parent} is a file, not a directory")
    if not os.path.lexists(path):
        return False
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory, so not a compilers artifact; choose an empty "
                            "or new directory")
    try:
        present, odd = _tree(path)
        raw = _read_manifest(path)
        if raw is None and not present and not odd:
            return False
        manifest = _parse_manifest(path, raw) if raw is not None else None
    except (ArtifactError, OSError):
        manifest = None
    if manifest is None or odd or set(present) != set(manifest["files"]):
        raise ArtifactError(f"{path} exists and is not a compilers artifact (it holds files no artifact manifest "
                            "lists); nothing was deleted. Choose an empty or new directory, or remove it yourself")
    return True


def load(path: str | os.PathLike, *, check_versions: bool = True,
         options: Mapping[str, Any] | None = None, digest: str | None = None) -> CompiledModel:
    """Load a saved artifact; no source model needed. ArtifactError if a file is missing, unlisted or altered,
    or (with `check_versions`) if the backend library the engine is bound to has another version here.

    `digest` ("sha256:...", printed by `compilers compile`, `cm.digest` after save) pins the artifact: one with
    other content is an ArtifactError before any of its files reaches the backend. Pin artifacts you did not
    build yourself: TorchScript and AOTInductor files run code when loaded (see README, Artifacts).

    `options` changes the backend's runtime options for this engine (threads, streams, spinning: how it runs,
    not what was compiled and validated); TargetError for any other key.

    A save that replaces `path` meanwhile makes load start over, so it returns the old or the new artifact."""
    path = Path(path)
    for attempt in range(_ATTEMPTS):
        manifest, raw = _verified(path, digest)
        try:
            cm = _load_verified(path, manifest, check_versions, options)
        except CompilerError:
            if not _changed(path, raw):
                raise
        except Exception as e:
            if not _changed(path, raw):
                backend = manifest["target"].get("backend")
                raise ArtifactError(f"{path}: the {backend} engine cannot be loaded from its files "
                                    f"({type(e).__name__}: {e}); they match the manifest, so they were saved "
                                    f"broken or for another {backend}: re-save the artifact") from e
        else:
            if not _changed(path, raw):
                cm.digest = manifest["digest"]
                return cm
        _pause(attempt)
    raise ArtifactError(f"{path} kept changing while it was loaded ({_ATTEMPTS} tries): something saves over it "
                        "continually; load it again once that stops")


def manifest_records(path: str | os.PathLike, manifest: Mapping[str, Any]) -> tuple[Target, Signature, Report]:
    """The target, signature and report a manifest (from `read_manifest` or `verify`) holds, each checked field
    by field; ArtifactError naming the field when one is malformed."""
    path = Path(path)
    return _malformed(path, lambda: (Target.from_dict(manifest["target"], source=str(path / MANIFEST)),
                                     Signature.from_dict(manifest["signature"]),
                                     Report.from_dict(manifest.get("report"))))


def _malformed(path: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (ValueError, TargetError) as e:
        raise ArtifactError(f"{path / MANIFEST} is malformed: {e}. Re-save the artifact (or fetch it again)") from None


def _load_verified(path: Path, manifest: dict[str, Any], check_versions: bool,
                   options: Mapping[str, Any] | None) -> CompiledModel:
    target, signature, report = manifest_records(path, manifest)
    bound = _malformed(path, lambda: from_json(dict[str, str], manifest.get("bound", {}), "bound"))
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
