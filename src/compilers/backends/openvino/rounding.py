"""Roundings to float16 / bfloat16 that a model asks for (`x.half().float()`), kept on OpenVINO's CPU plugin.

The plugin computes f16 in f32 unless it runs f16 itself (INFERENCE_PRECISION_HINT f16 on a CPU with f16
arithmetic), and bf16 in f32 on a CPU without bf16: its ConvertPrecision pass retypes a Convert to f16 / bf16 as
a Convert to f32, which EliminateConvert then removes, and the rounding the model asked for is gone. Rounding
the value in f32 arithmetic first, exactly as the Convert would, keeps the model's result whether the plugin
drops the Convert or not (rounding an already rounded value changes nothing).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Format:
    bits: int             # significand bits, the leading one included
    min_normal: float     # below it the format's spacing is fixed (subnormals)
    overflow: float       # from here on a value rounds to infinity (the largest finite value + half its spacing)


_FORMATS = {"f16": _Format(11, 2.0 ** -14, 65520.0), "bf16": _Format(8, 2.0 ** -126, (2 - 2 ** -8) * 2.0 ** 127)}
_F32_BITS = 24
_SCALE = 2.0 ** 64    # values at least this large are split scaled down, so that the split cannot overflow


def _rounded(x: Any, fmt: _Format) -> Any:
    """An f32 output `x` rounded to `fmt` (to nearest, ties to even; infinity past its range), still f32."""
    import numpy as np
    import openvino.opset13 as ops

    def const(v: float) -> Any:
        return ops.constant(np.float32(v))

    magnitude, sign = ops.abs(x), ops.sign(x)
    # Veltkamp's split: c - (c - x) with c = x * (2^(24 - bits) + 1) is x to `bits` significant bits
    big = ops.greater_equal(magnitude, const(_SCALE))
    scale = ops.select(big, const(1 / _SCALE), const(1.0))
    scaled = ops.multiply(x, scale)
    c = ops.multiply(scaled, const(2.0 ** (_F32_BITS - fmt.bits) + 1))
    normal = ops.divide(ops.subtract(c, ops.subtract(c, scaled)), scale)
    # below min_normal the spacing is fixed: adding and removing a number whose f32 spacing is that one rounds;
    # a tensor, not a constant, which the plugin would fold away (x + c - c = x)
    small = ops.logical_and(ops.less(magnitude, const(fmt.min_normal)), ops.greater(magnitude, const(0.0)))
    spacing = fmt.min_normal * 2.0 ** (1 - fmt.bits)
    magic = ops.select(small, const(1.5 * 2.0 ** (_F32_BITS - 1) * spacing), const(0.0))
    subnormal = ops.multiply(ops.subtract(ops.add(magnitude, magic), magic), sign)
    out = ops.select(small, subnormal, normal)
    return ops.select(ops.greater_equal(magnitude, const(fmt.overflow)), ops.multiply(sign, const(np.inf)), out)


def keep_roundings(model: Any) -> tuple[Any, collections.Counter]:
    """`model` (a copy, when anything changes) with the input of every Convert from f32 to f16 or bf16 rounded
    in f32 arithmetic first, and the number of Converts covered, by type."""
    if not _narrowing_converts(model):
        return model, collections.Counter()
    model = model.clone()
    converts = _narrowing_converts(model)
    for op, to in converts:
        op.input(0).replace_source_output(_rounded(op.input_value(0), _FORMATS[to]).output(0))
    model.validate_nodes_and_infer_types()
    return model, collections.Counter(to for _, to in converts)


def _narrowing_converts(model: Any) -> list[tuple[Any, str]]:
    """(Convert, its type) for each Convert of an f32 value to f16 or bf16."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convert" and op.input_value(0).get_element_type().get_type_name() == "f32":
            to = op.get_output_element_type(0).get_type_name()
            if to in _FORMATS:
                found.append((op, to))
    return found
