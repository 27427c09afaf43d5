"""Build cache keys: a build is reused only when weights, code, signature, target, versions and CPU ISA match."""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import torch

from .calibration import update_with_array
from .host import cpu_isa
from .signature import Signature
from .target import Target


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
    h = hashlib.sha256()
    meta: dict[str, Any] = {"signature": signature.to_dict(), "target": target.to_dict(), "versions": versions,
                            "isa": cpu_isa(), "code": _module_code(model), "structure": repr(model),
                            "calibration": calibration_digest}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:".encode())
        update_with_array(h, tensor)
    return h.hexdigest()
