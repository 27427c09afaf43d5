"""onnxruntime artifacts on Triton's onnxruntime backend: `model.onnx` as is, the runtime options as that backend's
parameters, and the backend's load-time checks of the graph replayed here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import ArtifactError
from .base import ALL_TYPES, Export, TritonBackend

# artifact graph_optimization_level -> the onnxruntime backend's `optimization { graph { level } }`
# (-1 basic, 1 extended, 2 disabled; unset: ORT_ENABLE_ALL)
_ORT_LEVELS = {"basic": -1, "extended": 1, "disable": 2}


def _configure(export: Export) -> None:
    # onnxruntime_backend README "Model Config Options" and src/onnxruntime.cc (ModelState::ModelState)
    settings = export.settings
    export.param("intra_op_thread_count", settings.threads)
    level = _ORT_LEVELS.get(settings.graph_optimization_level)
    if level is not None:
        export.config.optimization.graph.level = level
    if not settings.spinning:
        export.notes.append("intra-op thread spinning: `compilers serve` turns it off (spinning = false), but the "
                            "Triton onnxruntime backend has no parameter for session.intra_op.allow_spinning, so "
                            "ORT's default (spinning on) applies")
    _check_onnx(export.path / TRITON.files[0], export.config, export.max_batch)


def _check_onnx(file: Path, config: Any, max_batch: int) -> None:
    """What the Triton onnxruntime backend checks at load (`CompareDimsSupported` in its onnxruntime_utils.cc): names
    found in the graph; inputs' dims equal where the model's dim is fixed; outputs' dims equal exactly (-1 for a
    symbolic dim); with batching, a symbolic first dim everywhere."""
    try:
        import onnx
    except ImportError:
        return                                    # onnxruntime without the onnx package: the Signature decides
    model = onnx.load(str(file), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    graph = {"input": {v.name: v for v in model.graph.input if v.name not in weights},
             "output": {v.name: v for v in model.graph.output}}
    for kind in ("input", "output"):
        for io in getattr(config, kind):
            value = graph[kind].get(io.name)
            if value is None:
                raise ArtifactError(f"{file}: the ONNX graph has no {kind} {io.name!r} ({', '.join(graph[kind])}); "
                                    "Triton finds tensors by name. Recompile the artifact")
            model_dims = [d.dim_value if d.HasField("dim_value") else -1
                          for d in value.type.tensor_type.shape.dim]
            dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
            full = ([-1] + dims) if max_batch > 0 else dims
            ok = len(model_dims) == len(full) and (max_batch == 0 or model_dims[0] == -1) and all(
                m == c for m, c in zip(model_dims, full) if kind == "output" or m != -1)
            if not ok:
                raise ArtifactError(f"{file}: {kind} {io.name!r} has shape {model_dims} in the ONNX graph, but the "
                                    f"Signature gives {full}; Triton's onnxruntime backend would refuse to load it. "
                                    "Recompile the artifact")


TRITON = TritonBackend("onnxruntime", files=("model.onnx",), types=ALL_TYPES, configure=_configure)
