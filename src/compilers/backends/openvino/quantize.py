"""NNCF post-training quantization of an OpenVINO model: int8 weights and activations, calibrated on samples.

The transformer preset (NNCF's ModelType.TRANSFORMER) keeps softmax, layer norms and residual adds in
float; without it, quantizing an attention model destroys it (MiniLM: cosine 0.55 to eager, 0.995 with).
`preset = "auto"` picks it when the graph has attention.
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

from ...quantize import CalibrationPlan
from ...target import Quantization

ATTENTION_OPS = {"Softmax", "ScaledDotProductAttention"}


def has_attention(model: Any) -> bool:
    return any(op.get_type_name() in ATTENTION_OPS for op in model.get_ops())


def quantize(model: Any, plan: CalibrationPlan, scheme: Quantization, keep: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """The int8 model with the layers named in `keep` left in float, and notes for the report (scheme,
    quantizers inserted, samples)."""
    import nncf
    import numpy as np
    from nncf.quantization import advanced_parameters as advanced
    transformer = scheme.preset == "transformer" or (scheme.preset == "auto" and has_attention(model))
    presets = {"symmetric": nncf.QuantizationPreset.PERFORMANCE, "asymmetric": nncf.QuantizationPreset.MIXED}
    items: list[Sequence[Any]] = [[x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in flat]
                                  for flat in plan.samples]
    quantized = nncf.quantize(
        model, nncf.Dataset(items), preset=presets.get(scheme.activations),
        model_type=nncf.ModelType.TRANSFORMER if transformer else None, subset_size=len(items),
        fast_bias_correction=scheme.fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(names=list(keep), types=list(scheme.keep_float), validate=False)
        if scheme.keep_float or keep else None,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=advanced.AdvancedSmoothQuantParameters(matmul=scheme.smooth_quant),
            weights_quantization_params=None if scheme.per_channel else advanced.QuantizationParameters(per_channel=False)))
    fq = collections.Counter(op.get_type_name() for op in quantized.get_ops())["FakeQuantize"]
    notes = [f"NNCF post-training int8: {fq} quantizers, {'transformer' if transformer else 'default'} preset"
             + (" (the graph has attention)" if transformer and scheme.preset == "auto" else "")
             + (f", SmoothQuant alpha {scheme.smooth_quant:g}" if transformer and scheme.smooth_quant >= 0 else "")
             + f", activations {scheme.activations}, weights {'per channel' if scheme.per_channel else 'per tensor'}"
             + (f", kept in float: {', '.join(scheme.keep_float)}" if scheme.keep_float else ""), *plan.notes]
    return quantized, notes


def _quantized_inputs(op: Any) -> list[Any]:
    return [i for i in op.inputs() if i.get_source_output().get_node().get_type_name() == "FakeQuantize"]


def quantized_layers(model: Any) -> list[str]:
    """The layers (by friendly name) that read a quantized input, in graph order."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() != "FakeQuantize" and _quantized_inputs(op)]


def bypass(quantized: Any, layers: Sequence[str]) -> Any:
    """A copy of `quantized` whose `layers` read their inputs before quantization (other readers of the same
    quantizers keep them). Cheap, and close enough to rank layers; their weights stay int8-rounded and their
    biases corrected for quantization, so `quantize(..., keep=layers)` makes the model that is kept."""
    copy = quantized.clone()
    wanted = set(layers)
    for op in copy.get_ops():
        if op.get_friendly_name() in wanted:
            for port in _quantized_inputs(op):
                port.replace_source_output(port.get_source_output().get_node().input_value(0))
    return copy
