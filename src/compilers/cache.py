"""Build cache keys: a build is reused only when weights, code, signature, target, versions and CPU ISA match."""
from __future__ import annotations

import hashlib
import inspect
import json
import platform
import re
from functools import lru_cache
from typing import Any

import torch

from .signature import Signature
from .target import Target


@lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The CPU's vector/matrix extensions (engines tuned for AMX or AVX-512 must not run elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        flags = []
    keep = sorted(f for f in flags if re.match(r"(avx|amx|sse|fma|f16c|vnni|bf16|neon|sve)", f))
    return f"{platform.machine()}:{','.join(keep) or platform.processor()}"


def _module_code(model: torch.nn.Module) -> list[str]:
    code = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        code.append(f"{cls.__module__}.{cls.__qualname__}\n{source}")
    return code


def cache_key(model: torch.nn.Module, signature: Signature, target: Target, versions: dict[str, str]) -> str:
    """sha256 over everything that decides what a build contains."""
    h = hashlib.sha256()
    meta: dict[str, Any] = {"signature": signature.to_dict(), "target": target.to_dict(), "versions": versions,
                            "isa": cpu_isa(), "code": _module_code(model), "structure": repr(model)}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
