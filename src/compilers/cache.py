"""The cache in `cache_dir`: builds, reused only when weights, code, signature, target, versions and CPU ISA
match; and References (eager's outputs on the validation samples), reused by every target compiled from
the same model and samples, so a second target, or a re-compile, does not run eager over the data again.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .calibration import update_with_array
from .host import cpu_isa
from .reference import Reference
from .signature import Signature
from .target import Target

log = logging.getLogger("compilers")


def _module_code(model: torch.nn.Module) -> list[str]:
    code = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        code.append(f"{cls.__module__}.{cls.__qualname__}\n{source}")
    return code


def cache_key(model: torch.nn.Module, signature: Signature, target: Target, versions: dict[str, str],
              calibration_digest: str | None = None) -> str:
    """sha256 over everything that decides what a build contains: weights, module code, signature, target,
    library versions, CPU ISA, and the calibration data's digest where the build uses calibration data."""
    return _model_hash(model, {"signature": signature.to_dict(), "target": target.to_dict(), "versions": versions,
                               "isa": cpu_isa(), "calibration": calibration_digest})


def _model_hash(model: torch.nn.Module, meta: dict[str, Any]) -> str:
    """sha256 over `meta`, the model's code and structure, and its weights."""
    h = hashlib.sha256()
    meta = {**meta, "code": _module_code(model), "structure": repr(model)}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:".encode())
        update_with_array(h, tensor)
    return h.hexdigest()


def reference_path(cache_dir: Path, model: torch.nn.Module, signature: Signature, labels: Sequence[str],
                   samples: Sequence[Sequence[Any]], float64: bool) -> Path:
    """Where the Reference of `model` on these samples is kept: keyed by weights, code, signature, the
    samples' bytes, whether float64 outputs are in it, and torch's version."""
    h = hashlib.sha256()
    for flat in samples:
        for x in flat:
            update_with_array(h, x) if isinstance(x, torch.Tensor) else h.update(repr(x).encode())
    key = _model_hash(model, {"signature": signature.to_dict(), "labels": list(labels), "samples": h.hexdigest(),
                              "float64": float64, "torch": torch.__version__})
    return cache_dir / "references" / f"{key[:32]}.pt"


def calibration_checked(cache_dir: Path, model: torch.nn.Module, signature: Signature, digest: str) -> Path:
    """The marker left in `cache_dir` once eager ran on every calibration sample (keyed like a reference)."""
    key = _model_hash(model, {"signature": signature.to_dict(), "calibration": digest, "torch": torch.__version__})
    return cache_dir / "references" / f"calibration-{key[:32]}.ok"


def load_reference(path: Path) -> Reference | None:
    """The cached Reference at `path`, or None when there is none (or it cannot be read: it is remade)."""
    if not path.is_file():
        return None
    try:
        reference = Reference(**torch.load(path, weights_only=True))
        return replace(reference, note=f"{reference.note}, read from the cache")
    except Exception as e:
        log.warning("cached reference %s is unusable (%s); running eager again", path, e)
        return None


def save_reference(path: Path, reference: Reference) -> None:
    """Write `reference` (without its metric: the user's function is not data) atomically to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".reference-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({f.name: getattr(reference, f.name) for f in fields(reference) if f.name != "metric"}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
