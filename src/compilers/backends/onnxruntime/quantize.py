"""ONNX Runtime static int8 quantization to a QDQ model (onnxruntime.quantization.quantize_static).

The scheme follows TensorRT's explicit-quantization rules, so the same QDQ file serves a later TensorRT
target: int8 weights, symmetric, per output channel; int8 activations, symmetric unless the descriptor
asks for asymmetric; QuantizeLinear/DequantizeLinear pairs on the inputs of the weighted operators
(`WEIGHTED`). Where they go besides depends on the preset:

* default (CNNs): also the residual Add and pooling inputs (TensorRT fuses a quantized residual add into
  the convolution before it) and the weighted operators' outputs, so that ONNX Runtime runs convolutions,
  adds and pools as QLinearConv / QLinearAdd with int8 in and out;
* transformer (the graph has attention): weighted operators' inputs only; their outputs, softmax, layer
  norms, GELU and residual adds stay float (NNCF's transformer scheme; ONNX Runtime runs the projections as
  MatMulIntegerToFloat).

Every Q/DQ pair serves one consumer and has its own scale initializer. ONNX Runtime's x86 kernels take
uint8 activations: it rewrites each int8 pair to uint8 when it loads the model, but only a pair whose Q
feeds a single DQ; a Q shared by several consumers (or two identical Qs, which its common-subexpression
pass merges) stays int8 and every operator behind it falls back to float (ResNet-50: 20 of 53
convolutions). Per-consumer pairs also make "keep this layer in float" local to that layer (`keep_float`).

A transformer's activations have a few outlier channels that one int8 scale per tensor cannot resolve
alongside the rest (MiniLM-L6: cosine 0.97 to eager); `smooth.py` moves them into the weights first.
The graph edits on the QDQ model (per-consumer pairs, layers kept in float) are in `qdq.py`.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Sequence

from ...host import cpu_isa
from ...progress import track
from ...quantize import CalibrationPlan
from ...target import Quantization
from .qdq import WEIGHTED, unshare

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: what the default preset quantizes besides: the operators ONNX Runtime (and TensorRT) fuse with their Q/DQ pairs
_CNN_OPS = WEIGHTED + ("Add", "MaxPool", "AveragePool", "GlobalAveragePool")
_ATTENTION = ("Softmax", "Attention", "MultiHeadAttention")


def is_transformer(graph: Any) -> bool:
    """Whether the graph has attention (a softmax, or ONNX Runtime's fused attention)."""
    return any(n.op_type in _ATTENTION for n in graph.node)


def preprocess(source: Path, output: Path) -> str | None:
    """ONNX Runtime's pre-quantization pass (constant folding, Conv+BatchNorm folding, shape inference) from
    `source` to `output`, as its documentation asks before quantize_static; None, or why it was skipped.
    Its symbolic shape inference is left out: it gives up on BERT's masks, and then leaves a copy of the model
    in the working directory."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    try:
        quant_pre_process(str(source), str(output), skip_symbolic_shape=True)
        return None
    except Exception as e:  # noqa: BLE001 - the quantizer can do without it
        return f"{type(e).__name__}: {str(e)[:200]}"


def uses_transformer_preset(graph: Any, scheme: Quantization) -> bool:
    return scheme.preset == "transformer" or (scheme.preset == "auto" and is_transformer(graph))


def quantize(source: Path, output: Path, plan: CalibrationPlan, scheme: Quantization,
             input_names: Sequence[str]) -> list[str]:
    """Write the QDQ int8 model of the float model `source` to `output` (the operation types of
    `scheme.keep_float` left in float); return notes for the report."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source), load_external_data=False).graph
    transformer = uses_transformer_preset(graph, scheme)
    ops = [op for op in (WEIGHTED if transformer else _CNN_OPS) if op not in scheme.keep_float]
    exclude = [n.name for n in graph.node if n.op_type in scheme.keep_float]
    symmetric = scheme.activations != "asymmetric"
    narrow = saturates()
    quantize_static(
        str(source), str(output), CalibrationReader(plan, input_names), quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
        per_channel=scheme.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, _METHODS[scheme.method]), nodes_to_exclude=exclude or None,
        reduce_range=narrow,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "DedicatedQDQPair": True,
                       "OpTypesToExcludeOutputQuantization": list(WEIGHTED) if transformer else []})
    model = unshare(onnx.load(str(output)))
    onnx.save(model, str(output))
    counts = collections.Counter(n.op_type for n in model.graph.node)
    where = ("transformer preset: inputs of " + "/".join(WEIGHTED) + " only" + (" (the graph has attention)"
             if scheme.preset == "auto" else "")) if transformer else \
        "default preset: inputs of " + "/".join(_CNN_OPS) + " and weighted outputs"
    return [f"onnxruntime static int8 (QDQ): {counts['QuantizeLinear']} QuantizeLinear, {counts['DequantizeLinear']} "
            f"DequantizeLinear, {where}; {scheme.method} ranges, activations "
            f"{'symmetric' if symmetric else 'asymmetric'}, weights symmetric "
            f"{'per channel' if scheme.per_channel else 'per tensor'}"
            + (f", kept in float: {', '.join(scheme.keep_float)}" if scheme.keep_float else "")
            + (", weights in 7 bits (reduce_range): this CPU has no VNNI, and ONNX Runtime's u8s8 kernels without it "
               "saturate int16 sums of full-range products" if narrow else ""), *plan.notes]


def saturates() -> bool:
    """An x86 CPU without VNNI, where ONNX Runtime's int8 kernels (VPMADDUBSW) add pairs of u8 x s8 products in
    int16 and saturate unless the weights keep to 7 bits (onnxruntime.quantization's `reduce_range`)."""
    arch, _, flags = cpu_isa().partition(":")
    return arch in ("x86_64", "AMD64") and not {"avx512_vnni", "avx_vnni"} & set(flags.split(","))


class CalibrationReader:
    """The calibration samples as ONNX Runtime's CalibrationDataReader wants them: one feed dict at a time."""

    def __init__(self, plan: CalibrationPlan, input_names: Sequence[str], what: str = "int8 calibration"):
        feeds = [{name: x.detach().cpu().numpy() if hasattr(x, "detach") else x for name, x in zip(input_names, flat)}
                 for flat in plan.samples]
        self._feeds = track(feeds, len(feeds), what)   # samples done / total, on a terminal

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)
