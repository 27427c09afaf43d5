"""OpenVINO: direct import of the module (convert_model), else the ONNX of the export ladder; CPU plugin.

Precision is explicit: on CPUs with AMX/AVX512-BF16 the CPU plugin runs bf16 unless told f32, so every
target sets INFERENCE_PRECISION_HINT, and build checks the precisions the compiled model really runs.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading

import numpy as np
import torch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ...errors import ExportError
from ...lower import Lowered
from ...quantize import CalibrationPlan
from ...settings import MAX_THREADS, option
from ...signature import FlatModule, Signature
from ...target import Target
from ..base import Backend, Engine, Optimized, Spec
from .integers import plan

MODEL_XML = "model.xml"
# the precision the plugin computes in; int8 models compute their unquantized layers in f32, never silently bf16
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


@dataclass(frozen=True)
class OpenVinoSettings:
    performance_hint: str = option("LATENCY", "OpenVINO PERFORMANCE_HINT", choices=("LATENCY", "THROUGHPUT"),
                                   runtime=True)
    streams: int = option(0, "NUM_STREAMS; 0 = the plugin's choice for the performance hint", minimum=0,
                          maximum=MAX_THREADS, runtime=True)
    threads: int = option(0, "INFERENCE_NUM_THREADS; 0 = all cores", minimum=0, maximum=MAX_THREADS, runtime=True)
    cache_dir: str = option("", "OpenVINO CACHE_DIR for compiled blobs; empty = none", runtime=True)


class OpenVinoBackend(Backend):
    name = "openvino"
    routes = ("openvino-direct", "onnx-dynamo", "onnx-torchscript")
    bound_libraries = ("openvino",)
    precisions = tuple(_HINTS)
    Settings = OpenVinoSettings
    requires = ("openvino",)

    def probe(self, target: Target) -> str | None:
        import openvino as ov
        if "CPU" not in ov.Core().available_devices:
            return "OpenVINO sees no CPU device"
        return None

    def lower(self, route: str, module: FlatModule, examples: Sequence[Any], spec: Spec) -> Lowered:
        import openvino as ov
        model = ov.convert_model(module, example_input=tuple(examples), input=input_shapes(spec.signature))
        return Lowered(route=route, model=model, nodes=len(model.get_ops()))

    def optimize(self, lowered: Lowered, spec: Spec, calibration: CalibrationPlan | None) -> Optimized:
        if calibration is None:
            return self._keep_roundings(lowered, spec.target)
        from .quantize import quantize
        model = self._model(lowered)
        name_inputs(model, spec.signature)
        quantized, notes = quantize(model, calibration, spec.target.quantization)
        return Optimized(dataclasses.replace(lowered, model=quantized), notes=notes,
                         quantization=_Int8(model, calibration, spec.target.quantization))

    def _keep_roundings(self, lowered: Lowered, target: Target) -> Optimized:
        """The lowered model with each rounding to f16 / bf16 it asks for (`x.half().float()`) done in f32 first,
        which the plugin would otherwise drop (rounding.py). On fp32 targets: f32 arithmetic does it exactly,
        and their contract is exact; a lossy target's arithmetic and contract are not."""
        if target.precision != "fp32":
            return Optimized(lowered)
        from .rounding import keep_roundings
        model, covered = keep_roundings(self._model(lowered))
        optimized = Optimized(dataclasses.replace(lowered, model=model))   # read once: build uses it as it is
        if covered:
            which = ", ".join(f"{n} to {to}" for to, n in sorted(covered.items()))
            optimized.notes.append(f"roundings the model asks for ({which}) computed in f32: OpenVINO's CPU plugin "
                                   "computes f16 (and bf16 on CPUs without it) in f32 and would drop them")
        return optimized

    def quantized_layers(self, optimized: Optimized) -> list[str]:
        from .quantize import quantized_layers
        return quantized_layers(optimized.lowered.model) if optimized.quantization is not None else []

    def probe_float(self, optimized: Optimized, layer: str) -> Optimized:
        from .quantize import bypass
        return dataclasses.replace(optimized, lowered=dataclasses.replace(
            optimized.lowered, model=bypass(optimized.lowered.model, [layer])))

    def keep_float(self, optimized: Optimized, layers: Sequence[str]) -> Optimized:
        from .quantize import quantize
        int8: _Int8 = optimized.quantization
        model, notes = quantize(int8.float_model, int8.calibration, int8.scheme, keep=layers)
        return dataclasses.replace(optimized, lowered=dataclasses.replace(optimized.lowered, model=model), notes=notes)

    def build(self, optimized: Optimized, spec: Spec) -> Engine:
        wide = [t.name for t in (*spec.signature.inputs, *spec.signature.outputs) if t.dtype == torch.float64]
        if wide:
            raise ExportError(f"OpenVINO's CPU plugin computes float64 in float32, so {', '.join(wide)} would lose "
                              "precision and range silently; use ort-cpu or torchscript-cpu for a float64 model, or "
                              "cast the model and its inputs to float32")
        model = self._model(optimized.lowered)
        name_inputs(model, spec.signature)
        engine = OpenVinoEngine(model, spec.target, spec.settings, spec.signature)
        engine.check_precision(spec.target)
        problem = engine.integers.problem()
        if problem:
            raise ExportError(f"{problem}. It would answer otherwise than eager: use ort-cpu or torchscript-cpu, "
                              "which compute integers as eager does")
        note = engine.integers.describe()
        if note and note not in optimized.notes:
            optimized.notes.append(note)
        return engine

    @staticmethod
    def _model(lowered: Lowered) -> Any:
        import openvino as ov
        return lowered.model if lowered.model is not None else ov.Core().read_model(str(lowered.path))

    def load(self, spec: Spec) -> Engine:
        import openvino as ov
        return OpenVinoEngine(ov.Core().read_model(str(spec.workdir / MODEL_XML)), spec.target, spec.settings,
                              spec.signature)


@dataclass(frozen=True)
class _Int8:
    """What re-quantizing with layers kept in float needs: the model before quantization and the calibration."""

    float_model: Any
    calibration: CalibrationPlan
    scheme: Any


def input_shapes(signature: Signature) -> list[tuple[Any, Any]]:
    """(PartialShape, element type) per input; dynamic dims become ranges where the target bounds them."""
    import openvino as ov
    out = []
    for spec in signature.inputs:
        dims = []
        for d in spec.shape:
            if isinstance(d, int):
                dims.append(ov.Dimension(d))
            else:
                rng = signature.dims[d]
                dims.append(ov.Dimension(rng.min, rng.max if rng.max is not None else -1))
        out.append((ov.PartialShape(dims), ov.Type(spec.numpy_dtype)))
    return out


def name_inputs(model: Any, signature: Signature) -> None:
    """Give the model's inputs the signature's names and shape ranges (engines feed by position)."""
    names = [n for port in model.inputs for n in port.get_names()]
    if len(model.inputs) != len(signature.inputs):
        raise ExportError(f"the lowered model has {len(model.inputs)} inputs, the signature {len(signature.inputs)} "
                          f"({names}); an input the model ignores was dropped by the exporter")
    shapes = input_shapes(signature)
    for port, spec in zip(model.inputs, signature.inputs):
        port.get_tensor().set_names({spec.name})
    model.reshape({port: shape for port, (shape, _) in zip(model.inputs, shapes)})


class OpenVinoEngine(Engine):
    """A CompiledModel on the CPU plugin; one infer request per calling thread makes run() thread-safe."""

    array_kind = "numpy"

    def __init__(self, model: Any, target: Target, settings: OpenVinoSettings, signature: Signature):
        import openvino as ov
        config = {"INFERENCE_PRECISION_HINT": _HINTS[target.precision], "PERFORMANCE_HINT": settings.performance_hint,
                  "INFERENCE_NUM_THREADS": settings.threads or os.cpu_count() or 1}
        if settings.streams:
            config["NUM_STREAMS"] = str(settings.streams)
        if settings.cache_dir:
            config["CACHE_DIR"] = settings.cache_dir
        self.model = model
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.outputs = list(self.compiled.outputs)
        self._tensor = ov.Tensor
        self._local = threading.local()   # an infer request serves one call at a time: one per thread
        # the CPU plugin computes int64 in int32, and some integer ops in float32: each call's integer inputs are
        # checked to keep what it computes exact (integers.py)
        self.integers = plan(model, signature)

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        if self.integers.inputs:
            self.integers.check([x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                                 for x in inputs])

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        # The low-level request calls: InferRequest.infer(inputs) costs ~35 us more per call on a small model.
        local = self._local
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = self.compiled.create_infer_request()
            local.bound = [None] * len(inputs)
        if self.integers.inputs:
            self.integers.check(inputs)
        bound, converted = local.bound, []
        for i, x in enumerate(inputs):   # shares the arrays' memory: no copy of the inputs
            # The request reads an input's memory when infer() runs: a tensor set on the same address with the
            # same layout already reads this array, and setting a new one costs several microseconds. One
            # __array_interface__ gives the address, the read-only flag, shape, strides (None: C order) and type.
            where = _layout(x)
            if bound[i] == where:
                continue
            if where[2] is not None or where[0][1]:   # OpenVINO shares only C-ordered writable memory
                x = np.array(x, order="C")
                converted.append(x)      # alive until infer() has read it: a freed copy's memory goes to the next
                where = _layout(x)
                if bound[i] == where:
                    continue
            request.set_input_tensor(i, self._tensor(x, shared_memory=True))
            bound[i] = where
        request.infer()
        del converted
        # the request reuses its output buffers on the next call: hand out copies
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.outputs))]

    def raw_call(self, inputs: Sequence[Any]) -> Callable[[], Any]:
        request, n = self.compiled.create_infer_request(), len(self.outputs)
        inputs = [np.ascontiguousarray(x) for x in inputs]
        for i, x in enumerate(inputs):    # bound once: each call is infer() and the output arrays, nothing more
            request.set_input_tensor(i, self._tensor(x, shared_memory=True))

        def raw() -> list[Any]:
            request.infer()
            return [request.get_output_tensor(i).data for i in range(n)]
        return raw

    def may_share(self) -> frozenset[int]:
        """No output: run() copies each output out of the infer request's buffers."""
        return frozenset()

    def save(self, directory: Path) -> None:
        import openvino as ov
        # save_model compresses weights to fp16 by default; an fp32 (or bf16) target must keep its weights
        ov.save_model(self.model, str(directory / MODEL_XML), compress_to_fp16=False)

    def _runtime_layers(self) -> list[tuple[str, list[str], str]]:
        """(layer type, names of the model's operations merged into it, runtime precision) per executed layer."""
        out = []
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind in ("Input", "Output", "Const"):
                continue
            names = [n for n in info["originalLayersNames"].astype(str).split(",") if n]
            out.append((kind, names, info["runtimePrecision"].astype(str)))
        return out

    def layers(self) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
        """Executed layer types, original operations merged into each type, runtime precisions."""
        layers, merged, precisions = collections.Counter(), collections.Counter(), collections.Counter()
        for kind, names, precision in self._runtime_layers():
            layers[kind] += 1
            merged[kind] += len(names)
            precisions[precision] += 1
        return layers, merged, precisions

    def check_precision(self, target: Target) -> None:
        """Fail closed when the plugin runs a lower float precision than the target asked for. A layer made
        only of operations that already take or give that precision in the model's own graph (a model that
        rounds through bf16 on purpose, `x.to(torch.bfloat16)`) runs what the model asks for: not blamed."""
        lower = {"fp32": ("bf16", "f16", "fp16"), "int8": ("bf16", "f16", "fp16"), "bf16": ("f16", "fp16")}.get(
            target.precision, ())
        asked = model_precisions(self.model)
        silent: collections.Counter = collections.Counter()
        where: list[str] = []
        for kind, names, precision in self._runtime_layers():
            p = _canonical(precision)
            if p in lower and not (names and all(p in asked.get(n, ()) for n in names)):
                silent[precision] += 1
                where.append(f"{kind} {','.join(names)[:80]}")
        if silent:
            raise ExportError(f"OpenVINO runs {dict(silent)} layers ({'; '.join(where[:4])}) although target "
                              f"{target.name!r} is {target.precision} and the model computes them in f32: this "
                              "OpenVINO ignores INFERENCE_PRECISION_HINT here; use a bf16 target or another backend")

    def describe(self) -> dict[str, Any]:
        layers, merged, precisions = self.layers()
        return {
            "nodes": sum(layers.values()),
            "fused": {k: merged[k] - n for k, n in layers.items() if merged[k] > n},
            "executed": {k: [n, merged[k]] for k, n in sorted(layers.items())},
            "precisions": dict(precisions),
            "config": {k: _text(self.compiled.get_property(k)) for k in
                       ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")},
        }


def _layout(x: np.ndarray) -> tuple:
    """((address, read-only), shape, strides or None for C order, type string) of an array's memory."""
    face = x.__array_interface__
    return face["data"], face["shape"], face["strides"], face["typestr"]


def _canonical(precision: str) -> str:
    """An element type's name as the runtime model writes it ("fp16" and "f16" are one)."""
    p = precision.lower()
    return {"fp16": "f16", "fp32": "f32", "bfloat16": "bf16"}.get(p, p)


def model_precisions(model: Any) -> dict[str, set[str]]:
    """The element types each operation of the model's own graph takes or gives, by its friendly name."""
    out = {}
    for op in model.get_ops():
        types = {op.get_input_element_type(i).get_type_name() for i in range(op.get_input_size())}
        types |= {op.get_output_element_type(i).get_type_name() for i in range(op.get_output_size())}
        out[op.get_friendly_name()] = {_canonical(t) for t in types}
    return out


def _text(value: Any) -> str:
    """A plugin property as the string compile_model accepts back (an element type as "f32", not "<Type ...>")."""
    return value.to_string() if hasattr(value, "to_string") else str(value)
