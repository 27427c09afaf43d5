"""inductor artifacts (AOTInductor `.pt2` packages): refused, with the reason and the targets to compile instead."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ...target import Target
from .base import TritonBackend


def _refusal(path: Path, target: Target, manifest: Mapping[str, Any]) -> str:
    torch_version = manifest.get("bound", {}).get("torch", "this torch")
    return (f"{path} is an AOTInductor package (target {target.name!r}, model.pt2), which Triton cannot serve as "
            f"built: the package holds a shared library compiled for this CPU (-march=native) and bound to torch "
            f"{torch_version}, while Triton's PyTorch backend runs NGC's own libtorch build, and that backend's "
            "`torch_aoti` platform (Triton 26.03+) is still in development, without batch sizes above 1. Compile for "
            "ort-cpu (Triton onnxruntime), openvino-cpu or openvino-cpu-bf16 (Triton openvino) or torchscript-cpu "
            "(Triton pytorch) and export that artifact instead")


TRITON = TritonBackend(refusal=_refusal)
