"""The one door to private torch API: what this package uses of it, with the versions it was checked against.

Checked against torch 2.13.0. Each function falls back to public API where the private one is missing.
"""
from __future__ import annotations

from typing import Any

import torch


def export_as_onnx_does(module: torch.nn.Module, args: tuple, dynamic_shapes: Any) -> Any:
    """torch.export of `module` exactly as torch.onnx.export's first capture strategy makes it (non-strict, sizes
    0 and 1 kept symbolic, RNNs as loops that keep their sequence dynamic, dims narrowed to what torch.export
    suggests when the model's code supports part of a range only): an ExportedProgram that torch.onnx.export
    turns into the ONNX it would have made from the module. Raises what torch.export raises."""
    try:
        from torch.onnx._internal.exporter._capture_strategies import TorchExportNonStrictStrategy
    except ImportError:     # another torch: public torch.export, narrowed as torch.onnx does
        return _export_refined(module, args, dynamic_shapes)
    return TorchExportNonStrictStrategy()._capture(module, args, {}, dynamic_shapes)


def _export_refined(module: torch.nn.Module, args: tuple, dynamic_shapes: Any) -> Any:
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as e:
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
        refined = refine_dynamic_shapes_from_suggested_fixes(e.msg, dynamic_shapes)
        return torch.export.export(module, args, dynamic_shapes=refined, strict=False)
