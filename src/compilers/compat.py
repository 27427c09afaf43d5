"""The one door to private torch API: what this package uses of it, with the versions it was checked against.

Checked against torch 2.13.0. Each function falls back to public API where the private one is missing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

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
    with rnn_kernels_kept():
        return TorchExportNonStrictStrategy()._capture(module, args, {}, dynamic_shapes)


@contextlib.contextmanager
def rnn_kernels_kept() -> Iterator[None]:
    """Leaves torch's LSTM and GRU kernels as the block found them. torch.onnx.export swaps in while-loop
    decompositions of them for the export and swaps them back, but the op's dispatch cache keeps the swapped
    kernel (torch 2.13): every later export in the process, torch.export's for AOTInductor included, would then
    decompose an LSTM into a loop, so that what one compile does would depend on the compiles before it."""
    ops = [op for op in (getattr(torch.ops.aten.lstm, "input", None), getattr(torch.ops.aten.gru, "input", None))
           if op is not None]
    try:
        yield
    finally:
        for op in ops:
            cache = getattr(op, "_dispatch_cache", None)
            if cache is not None:
                cache.clear()


def _export_refined(module: torch.nn.Module, args: tuple, dynamic_shapes: Any) -> Any:
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as e:
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
        refined = refine_dynamic_shapes_from_suggested_fixes(e.msg, dynamic_shapes)
        return torch.export.export(module, args, dynamic_shapes=refined, strict=False)
