"""The cache in `cache_dir`: builds, reused only when weights, code, signature, target, versions and CPU ISA
match; and References (eager's outputs on the validation samples), reused by every target compiled from
the same model and samples, so a second target, or a re-compile, does not run eager over the data again;
and the choices of auto targets, so a second compile of the same model does not time the candidates again.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .calibration import update_with_array
from .files import replacing, write_text
from .host import cpu_isa
from .reference import Reference
from .signature import Signature
from .target import Auto, Target

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
    with replacing(path) as tmp:
        torch.save({f.name: getattr(reference, f.name) for f in fields(reference) if f.name != "metric"}, tmp)


def auto_choice_path(cache_dir: Path, model: torch.nn.Module, auto: Auto, example: dict[str, Any],
                     versions: dict[str, str], data_digests: dict[str, str | None]) -> Path:
    """Where the choice of `auto` for `model` is kept: keyed by weights, code, the example's structure, dtypes
    and shapes with the dynamic dims (`example`), the auto descriptor and each candidate's content, the
    calibration and validation data's digests, library versions and CPU ISA."""
    described = auto.to_dict()     # the candidates by content, not by where their files lie
    described["auto"] = {k: v for k, v in described["auto"].items() if k != "candidates"}
    key = _model_hash(model, {"example": example, "auto": described, "versions": versions, "isa": cpu_isa(),
                              "data": data_digests})
    return cache_dir / "auto" / f"{auto.name}-{key[:32]}.json"


def load_choice(path: Path) -> dict[str, Any] | None:
    """The stored auto choice at `path`, or None when there is none (or it cannot be read: it is remade)."""
    if not path.is_file():
        return None
    try:
        choice = json.loads(path.read_text())
        if not isinstance(choice.get("chosen"), str) or not isinstance(choice.get("candidates"), list):
            raise ValueError("no 'chosen' target or 'candidates' table")
        return choice
    except (OSError, ValueError) as e:
        log.warning("cached auto choice %s is unusable (%s); choosing again", path, e)
        return None


def save_choice(path: Path, choice: dict[str, Any]) -> None:
    """Write the auto choice (JSON) atomically to `path`."""
    write_text(path, json.dumps(choice, indent=1))
