"""The export ladder: try each lowering route in the backend's order, keep the first that works.

The ONNX routes live here: "onnx-dynamo" (torch.export -> ONNX) and "onnx-torchscript" (the
TorchScript-based exporter). A backend may put routes of its own (a direct import) in front.
Every attempt is recorded, so the report says which route worked and why the others failed.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ExportError
from .quiet import quiet
from .signature import FlatModule, Signature

ONNX_OPSET = 18  # for the TorchScript-based route; the dynamo route picks its own


@dataclass
class Lowered:
    """A lowered model: an ONNX file (`path`) or a backend's in-memory model (`model`)."""

    route: str
    path: Path | None = None
    model: Any = None
    opset: int | None = None
    nodes: int | None = None
    attempts: list[tuple[str, str]] = field(default_factory=list)   # (route, why it failed)
    seconds: float = 0.0
    examples: tuple = ()             # the flat inputs it was lowered with (to check rewrites of it on)


OwnRoute = Callable[[str, FlatModule, tuple], "Lowered"]


def run_ladder(routes: Sequence[str], own_route: OwnRoute, model: torch.nn.Module, signature: Signature,
               examples: Sequence[torch.Tensor], workdir: Path) -> Lowered:
    """Lower `model` by the first of `routes` that works; ExportError listing every failure if none does.

    The ONNX routes are this module's; any other route is the backend's own, run by `own_route(route,
    flat_module, examples)`."""
    attempts: list[tuple[str, str]] = []
    flat = FlatModule(model, signature).eval()
    for route in routes:
        t0 = time.perf_counter()
        try:
            with quiet():
                if route in ONNX_ROUTES:
                    lowered = ONNX_ROUTES[route](flat, signature, tuple(examples), workdir / f"{route}.onnx")
                else:
                    lowered = own_route(route, flat, tuple(examples))
        except Exception as e:  # every exporter failure is a reason to try the next route
            attempts.append((route, _first_line(e)))
            logging.getLogger(__name__).info("route %s failed: %s", route, attempts[-1][1])
            continue
        lowered.attempts = attempts
        lowered.seconds = time.perf_counter() - t0
        lowered.examples = tuple(examples)
        return lowered
    ops = sorted({_op_name(op) for _, why in attempts for op in _ATEN_OP.findall(why)})
    detail = "; ".join(f"{r}: {why}" for r, why in attempts)
    hint = f"unsupported operator(s): {', '.join(ops)}. " if ops else ""
    raise ExportError(f"every lowering route failed for {type(model).__name__}. {hint}{detail}. "
                      "Rewrite the offending code with supported ops, or try another target (`compilers targets`).")


_ATEN_OP = re.compile(r"\baten(?:::|\.)[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _op_name(op: str) -> str:
    """aten.linalg_eig.default / aten::linalg_eig -> aten::linalg_eig"""
    name = op.replace("aten::", "aten.").split(".")[1]
    return f"aten::{name}"


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", f"{type(e).__name__}: {e}")
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if cause is not None and not _ATEN_OP.search(text):
        text += f" (caused by {type(cause).__name__}: {cause})"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    keep = [l for l in lines if _ATEN_OP.search(l)][:3]
    return " | ".join(dict.fromkeys(lines[:1] + keep))[:1200]


def export_dims(signature: Signature) -> tuple[dict[str, torch.export.Dim], tuple[dict[int, Any], ...]]:
    """torch.export Dims for the signature's dynamic dims: by dim name, and per input {axis: Dim} (None if static)."""
    dims = {}
    for name, rng in signature.dims.items():
        kwargs = {"min": rng.min} if rng.max is None else {"min": rng.min, "max": rng.max}
        dims[name] = torch.export.Dim(re.sub(r"\W", "_", name), **kwargs)
    per_input = tuple({i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} or None
                      for s in signature.inputs)
    return dims, per_input


def _onnx_dynamo(flat: FlatModule, signature: Signature, examples: tuple, path: Path) -> Lowered:
    _, per_input = export_dims(signature)
    program = torch.onnx.export(flat, examples, dynamo=True, dynamic_shapes=(per_input,), verbose=False,
                                input_names=signature.input_names, output_names=signature.output_names)
    program.save(str(path))
    return _described("onnx-dynamo", path, signature)


def _onnx_torchscript(flat: FlatModule, signature: Signature, examples: tuple, path: Path) -> Lowered:
    axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in signature.inputs}
    torch.onnx.export(flat, examples, str(path), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=signature.input_names, output_names=signature.output_names,
                      dynamic_axes={k: v for k, v in axes.items() if v})
    return _described("onnx-torchscript", path, signature)


def _described(route: str, path: Path, signature: Signature) -> Lowered:
    """The Lowered for an ONNX file; a dim the signature declares dynamic must have stayed dynamic."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    specs = {s.name: s for s in signature.inputs}
    for inp in proto.graph.input:
        spec = specs.get(inp.name)
        for i, dim in enumerate(inp.type.tensor_type.shape.dim if spec else ()):
            if isinstance(spec.shape[i], str) and dim.HasField("dim_value"):
                raise ExportError(f"the export fixed dynamic dim {i} ({spec.shape[i]!r}) of input {inp.name!r} to "
                                  f"{dim.dim_value}: the model's code pins it (e.g. int(x.shape[0]) or a Python "
                                  "loop over it); declare it static in dynamic_shapes or change that code")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return Lowered(route=route, path=path, opset=opset, nodes=len(proto.graph.node))


ONNX_ROUTES = {"onnx-dynamo": _onnx_dynamo, "onnx-torchscript": _onnx_torchscript}
