"""ONNX Runtime: ONNX from the export ladder, transformer fusions, an InferenceSession on the CPU provider."""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Sequence

from ...host import installed_versions
from ...lower import Lowered
from ...quantize import CalibrationPlan
from ...quiet import quiet
from ...settings import MAX_THREADS, option
from ...target import Target
from ..base import Backend, Engine, Optimized, Spec

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
MODEL_FILE = "model.onnx"


def install_clash() -> str | None:
    """onnxruntime and onnxruntime-gpu installed together overwrite each other's files."""
    found = [f"{dist}=={v}" for dist, v in installed_versions(("onnxruntime", "onnxruntime-gpu")).items()]
    if len(found) < 2:
        return None
    return (f"both {' and '.join(found)} are installed; they share the `onnxruntime` module, so whichever was "
            "installed last wins and the CUDA provider may silently disappear. Fix: "
            "pip uninstall -y onnxruntime onnxruntime-gpu, then install the one you need: pip install "
            "'compilers[cpu]' (the CPU targets compilers has today) or onnxruntime-gpu alone for your own CUDA use")


def op_counts(graph) -> collections.Counter:
    return collections.Counter(n.op_type for n in graph.node)


@dataclass(frozen=True)
class OrtSettings:
    threads: int = option(0, "intra-op threads; 0 = all cores", minimum=0, maximum=MAX_THREADS, runtime=True)
    spinning: bool = option(True, "intra-op threads spin between calls: lower latency for back-to-back calls, but "
                                  "they keep a core busy; false where other work shares the cores (a server)",
                            runtime=True)
    graph_optimization_level: str = option("all", "ORT graph optimization level", choices=tuple(_LEVELS))
    transformer_fusions: bool = option(True, "apply transformer fusions (Attention, SkipLayerNormalization, "
                                             "BiasGelu, ...) where the graph has the pattern")
    transformer_model_type: str = option("bert", "fusion family of onnxruntime.transformers.optimizer")


@dataclass(frozen=True)
class _Int8:
    """The QDQ model and the float model it was quantized from, loaded once for the accuracy loop's edits."""

    quantized: Any   # onnx.ModelProto
    source: Any


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    bound_libraries = ("onnxruntime",)
    precisions = ("fp32", "int8")
    Settings = OrtSettings
    serving_options = MappingProxyType({"spinning": False})   # spinning threads starve the server's event loop
    requires = ("onnxruntime",)

    def setup_reason(self, target: Target) -> str | None:
        clash = install_clash()
        if clash:
            warnings.warn(clash, RuntimeWarning, stacklevel=4)
        return None

    def probe(self, target: Target) -> str | None:
        import onnxruntime as ort
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime build has no CPUExecutionProvider"
        return None

    def optimize(self, lowered: Lowered, spec: Spec, calibration: CalibrationPlan | None) -> Optimized:
        import onnx
        if calibration is not None:
            return self._quantized(lowered, spec, calibration)
        opt = Optimized(lowered)
        settings: OrtSettings = spec.settings
        if not settings.transformer_fusions:
            return opt
        model = onnx.load(str(lowered.path))
        before = contrib_ops(model.graph)
        for name, fuse in (("onnxscript ort_fusions", fuse_onnxscript),
                           ("onnxruntime.transformers", lambda m: fuse_transformer(m, settings.transformer_model_type))):
            try:
                with quiet():
                    fused = fuse(copy.deepcopy(model))   # passes may edit in place; keep `model` to fall back on
                    check = OrtEngine(fused.SerializeToString(), settings)
                    if lowered.examples:
                        check.run(as_numpy(lowered.examples))
                model = fused
            except Exception as e:  # a pass that cannot handle a graph, or breaks it, must not sink the compile
                opt.notes.append(f"{name} fusion skipped: {type(e).__name__}: {str(e)[:200]}")
        fused = contrib_ops(model.graph) - before
        if fused:
            path = spec.workdir / "fused.onnx"
            onnx.save(model, str(path))
            opt.lowered = dataclasses.replace(lowered, path=path)
            opt.fused.update(fused)
        else:
            opt.notes.append("no transformer pattern found to fuse")
        return opt

    def _quantized(self, lowered: Lowered, spec: Spec, calibration: CalibrationPlan) -> Optimized:
        """Pre-process the float model as ONNX Runtime recommends, smooth a transformer's activations, then
        quantize it (quantize.py). `Optimized.quantization` holds the QDQ model and the float one it came from."""
        import onnx
        from .quantize import preprocess, quantize, uses_transformer_preset
        from .smooth import smooth
        scheme = spec.target.quantization
        alpha = scheme.smooth_quant
        source, path = spec.workdir / "int8-source.onnx", spec.workdir / "int8.onnx"
        notes = []
        with quiet():
            skipped = preprocess(lowered.path, source)
            model = onnx.load(str(lowered.path if skipped else source))
            smoothed = smooth(model, calibration, spec.signature.input_names, alpha) \
                if alpha >= 0 and uses_transformer_preset(model.graph, scheme) else 0
            onnx.save(model, str(source))
            notes += quantize(source, path, calibration, scheme, spec.signature.input_names)
        if skipped:
            notes.append(f"onnxruntime pre-quantization pass skipped: {skipped}")
        if smoothed:
            notes.append(f"SmoothQuant (alpha {alpha:g}): {smoothed} activations smoothed into the weights of the "
                         "MatMuls that read them")
        notes.append("transformer fusions are not applied to int8 models (ONNX Runtime fuses the QDQ pairs)")
        int8 = _Int8(onnx.load(str(path)), model)
        return Optimized(dataclasses.replace(lowered, path=path, model=None), notes=notes, quantization=int8)

    def quantized_layers(self, optimized: Optimized) -> list[str]:
        from .qdq import quantized_layers
        return quantized_layers(optimized.quantization.quantized) if optimized.quantization is not None else []

    def keep_float(self, optimized: Optimized, layers: Sequence[str]) -> Optimized:
        """The int8 model with `layers` and the float path into them put back in float (no re-calibration:
        the other tensors keep their ranges)."""
        from .qdq import keep_float
        int8: _Int8 = optimized.quantization
        model = keep_float(int8.quantized, int8.source, layers)
        return dataclasses.replace(optimized, lowered=dataclasses.replace(optimized.lowered, model=model))

    def build(self, optimized: Optimized, spec: Spec) -> Engine:
        lowered = optimized.lowered
        model_bytes = lowered.model.SerializeToString() if lowered.model is not None else Path(lowered.path).read_bytes()
        final = spec.workdir / "ort-optimized.onnx"     # what the session made of it, to describe
        engine = OrtEngine(model_bytes, spec.settings, optimized_path=final)
        import onnx
        graph = onnx.load(str(final)).graph
        engine.info = {"nodes": len(graph.node), "ops": dict(op_counts(graph)), "fused": dict(contrib_ops(graph))}
        return engine

    def load(self, spec: Spec) -> Engine:
        model_bytes = (spec.workdir / MODEL_FILE).read_bytes()
        refuse_external_data(model_bytes, spec.workdir / MODEL_FILE)
        return OrtEngine(model_bytes, spec.settings)


def refuse_external_data(model_bytes: bytes, path: Path) -> None:
    """ArtifactError when the ONNX model names external data files: a session made from bytes would read them
    relative to the current directory, outside the verified artifact (and this backend saves whole models)."""
    if b"location" not in model_bytes:     # every external tensor names its file under the key "location"
        return
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    from ...errors import ArtifactError
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable ONNX model ({e}); re-save the artifact") from None
    external = [tensor for tensor in _get_all_tensors(model) if uses_external_data(tensor)]
    if external:
        named = sorted({entry.value for tensor in external for entry in tensor.external_data if entry.key == "location"})
        raise ArtifactError(f"{path} names external data file(s) {named}: a compilers artifact keeps the whole ONNX "
                            "model in model.onnx and loads no tensor from other files; re-save it with cm.save(dir)")


def as_numpy(values: Sequence[Any]) -> list[Any]:
    return [v.detach().cpu().numpy() if hasattr(v, "detach") else v for v in values]


def contrib_ops(graph) -> collections.Counter:
    """ONNX Runtime's fused (com.microsoft) operators in a graph, by type."""
    return collections.Counter(n.op_type for n in graph.node if n.domain == "com.microsoft")


def fuse_onnxscript(model):
    """onnxscript's ORT fusions: recognize the attention of torch.export graphs (SDPA) as Attention."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    fused, _ = optimize_for_ort(ir.from_proto(model))
    return ir.to_proto(fused)


def fuse_transformer(model, model_type: str):
    """onnxruntime.transformers fusions (SkipLayerNormalization, BiasGelu, BERT attention of older exports)."""
    from onnxruntime.transformers.optimizer import optimize_by_fusion
    return optimize_by_fusion(tanh_gelu_as_fast_gelu(model), model_type=model_type, num_heads=0, hidden_size=0).model


def tanh_gelu_as_fast_gelu(model: Any) -> Any:
    """`model` with every ONNX Gelu(approximate="tanh") replaced by ONNX Runtime's FastGelu, the same function.

    onnxruntime.transformers fuses the bias Add in front of any op named Gelu into BiasGelu, which computes the
    exact (erf) GELU whatever the Gelu's `approximate` said; in front of a FastGelu it fuses it into FastGelu,
    which keeps the tanh form (ONNX Runtime's own session optimizer makes the same choice)."""
    tanh = [n for n in model.graph.node if n.op_type == "Gelu" and n.domain in ("", "ai.onnx")
            and any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute)]
    for node in tanh:
        node.op_type, node.domain = "FastGelu", "com.microsoft"
        del node.attribute[:]
    if tanh and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    return model


class OrtEngine(Engine):
    """An InferenceSession on the CPU provider (its run() is thread-safe)."""

    array_kind = "numpy"

    def __init__(self, model_bytes: bytes, settings: OrtSettings, optimized_path: Path | None = None):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[settings.graph_optimization_level])
        so.intra_op_num_threads = settings.threads or (os.cpu_count() or 1)
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        self.model_bytes = model_bytes
        self.session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info: dict[str, Any] = {}
        self.config = {"graph_optimization_level": _LEVELS[settings.graph_optimization_level],
                       "intra_op_num_threads": so.intra_op_num_threads, "allow_spinning": settings.spinning}

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        return self.session.run(self.output_names, dict(zip(self.input_names, inputs)))

    def raw_call(self, inputs: Sequence[Any]) -> Callable[[], Any]:
        run, names, feed = self.session.run, self.output_names, dict(zip(self.input_names, inputs))
        return lambda: run(names, feed)

    def may_share(self) -> frozenset[int]:
        """No output: session.run without IO binding returns each output in an OrtValue allocated for that run; an
        initializer or an input that is a graph output is copied into one (onnxruntime PR #3912)."""
        return frozenset()

    def save(self, directory: Path) -> None:
        (directory / MODEL_FILE).write_bytes(self.model_bytes)

    def describe(self) -> dict[str, Any]:
        return {**self.info, "config": dict(self.config)}
