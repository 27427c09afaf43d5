"""ONNX Runtime static int8 quantization to a QDQ model (onnxruntime.quantization.quantize_static).

The scheme follows TensorRT's explicit-quantization rules, so the same QDQ file serves a later TensorRT
target: int8 weights, symmetric, per output channel; int8 activations, symmetric unless the descriptor
asks for asymmetric; QuantizeLinear/DequantizeLinear pairs around each quantized operator. ONNX Runtime
fuses the pairs into integer kernels (VNNI / AMX on this CPU) when it builds the session. Only the inputs
of weighted operators are quantized (`QUANTIZED_OPS`), the placement TensorRT expects.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Sequence

from ...quantize import CalibrationPlan
from ...target import Quantization

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: the operators whose inputs are quantized (as TensorRT's explicit quantization and NNCF do): the weighted ones.
#: Everything between them stays float, so keeping one operator in float leaves its inputs unquantized.
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quantize(source: Path, output: Path, plan: CalibrationPlan, scheme: Quantization, input_names: Sequence[str],
             keep: Sequence[str] = ()) -> list[str]:
    """Write the QDQ int8 model of `source` to `output`, with the nodes named in `keep` (and the operation
    types of `scheme.keep_float`) left in float; return notes for the report."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source), load_external_data=False).graph
    exclude = sorted(set(keep) | {n.name for n in graph.node if n.op_type in scheme.keep_float})
    symmetric = scheme.activations != "asymmetric"
    quantize_static(
        str(source), str(output), _Reader(plan, input_names), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=scheme.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, _METHODS[scheme.method]), nodes_to_exclude=exclude or None,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    counts = collections.Counter(n.op_type for n in onnx.load(str(output), load_external_data=False).graph.node)
    return [f"onnxruntime static int8 (QDQ): {counts['QuantizeLinear']} QuantizeLinear, {counts['DequantizeLinear']} "
            f"DequantizeLinear; {scheme.method} ranges, activations {'symmetric' if symmetric else 'asymmetric'}, "
            f"weights symmetric {'per channel' if scheme.per_channel else 'per tensor'}"
            + (f", kept in float: {', '.join(scheme.keep_float)}" if scheme.keep_float else ""), *plan.notes]


class _Reader:
    """The calibration samples as ONNX Runtime's CalibrationDataReader wants them: one feed dict at a time."""

    def __init__(self, plan: CalibrationPlan, input_names: Sequence[str]):
        self._feeds = iter([{name: x.detach().cpu().numpy() if hasattr(x, "detach") else x
                             for name, x in zip(input_names, flat)} for flat in plan.samples])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def quantized_layers(model: Any) -> list[str]:
    """The nodes (by name) that read a dequantized input, in graph order."""
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in produced_by_dq for i in n.input)]


def bypass(model: Any, layer: str) -> Any:
    """A copy of `model` whose node `layer` reads its activations before quantization (its weights stay
    int8-rounded): a quick approximation of keeping it in float, to rank layers."""
    import copy as _copy
    out = _copy.deepcopy(model)
    dq = {o: n for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q = {o: n for n in out.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    for node in out.graph.node:
        if node.name == layer:
            for i, name in enumerate(node.input):
                source = dq.get(name)
                if source is not None and source.input[0] in q:     # activation: DQ(Q(x)) -> x
                    node.input[i] = q[source.input[0]].input[0]
    return out
