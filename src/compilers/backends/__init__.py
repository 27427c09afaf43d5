"""Backend registry: target `backend = "name"` -> the module implementing it, imported on first use.

A new backend is one module in this package and one line here.
"""
from __future__ import annotations

import importlib

from ..errors import TargetError
from ..target import Target
from .base import Backend

_REGISTRY = {
    "onnxruntime": "compilers.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "compilers.backends.openvino:OpenVinoBackend",
    "torchscript": "compilers.backends.torchscript:TorchScriptBackend",
    "inductor": "compilers.backends.inductor:InductorBackend",
}
_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend registered as `name`; TargetError naming the known ones otherwise."""
    if name not in _instances:
        if name not in _REGISTRY:
            raise TargetError(f"unknown backend {name!r}; known backends: {', '.join(sorted(_REGISTRY))}")
        module, _, cls = _REGISTRY[name].partition(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def unavailable_reason(target: Target) -> str | None:
    """None when `target` can run on this machine; otherwise why not and how to fix it."""
    return get_backend(target.backend).unavailable_reason(target)
