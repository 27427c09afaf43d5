"""The export ladder: try each lowering route in the backend's order, keep the first that works.

The ONNX routes live here: "onnx-dynamo" (torch.export -> ONNX) and "onnx-torchscript" (the
TorchScript-based exporter). A backend may put routes of its own (a direct import) in front.
Every attempt is recorded, so the report says which route worked and why the others failed.
"""
from __future__ import annotations

import linecache
import logging
import re
import time
import warnings
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
    notes: list[str] = field(default_factory=list)   # what the report should say about the lowering


OwnRoute = Callable[[str, FlatModule, tuple], "Lowered"]
#: routes that run torch.export, which refuses data-dependent control flow instead of tracing through it
EXPORT_ROUTES = ("onnx-dynamo", "torch-export")
#: the API keyword that accepts a data-dependent branch frozen by tracing (compile(..., accept_traced_branches=True))
ACCEPT = "accept_traced_branches"
FROZEN_NOTE = "data-dependent control flow frozen by tracing, accepted with accept_traced_branches=True"


def run_ladder(routes: Sequence[str], own_route: OwnRoute, model: torch.nn.Module, signature: Signature,
               examples: Sequence[torch.Tensor], workdir: Path, accept_traced_branches: bool = False) -> Lowered:
    """Lower `model` by the first of `routes` that works; ExportError listing every failure if none does.

    The ONNX routes are this module's; any other route is the backend's own, run by `own_route(route,
    flat_module, examples)`.

    A route that traces (TorchScript tracing, OpenVINO's direct import) records one path through Python
    control flow. When torch.export refused the model for data-dependent control flow (an earlier route, or
    a probe run when the tracer converted a tensor to a Python value), a tracing route that succeeds has
    frozen the branch the example took: ExportError naming the line, unless `accept_traced_branches`."""
    attempts: list[tuple[str, str]] = []
    refused: str | None = None    # torch.export's reason for refusing data-dependent control flow
    exported = False              # whether a torch.export route ran (its verdict on the control flow is known)
    flat = FlatModule(model, signature).eval()
    for route in routes:
        t0 = time.perf_counter()
        try:
            with quiet(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", torch.jit.TracerWarning)
                if route in ONNX_ROUTES:
                    lowered = ONNX_ROUTES[route](flat, signature, tuple(examples), workdir / f"{route}.onnx")
                else:
                    lowered = own_route(route, flat, tuple(examples))
        except Exception as e:  # every exporter failure is a reason to try the next route
            stop = interruption(e)
            if stop is not None:   # Ctrl-C (or exit) that an exporter wrapped: stop the compile, try nothing else
                raise stop
            exported = exported or route in EXPORT_ROUTES
            refused = refused or data_dependent(e)
            attempts.append((route, _first_line(e)))
            logging.getLogger(__name__).info("route %s failed: %s", route, attempts[-1][1])
            continue
        if route not in EXPORT_ROUTES:
            conversions = tracer_conversions(caught)
            if conversions and refused is None and not exported:
                refused = _export_probe(flat, signature, tuple(examples))
            if refused is not None:
                message = frozen_branch_message(route, conversions, refused)
                if not accept_traced_branches:
                    raise ExportError(message)
                lowered.notes.append(f"{FROZEN_NOTE}: {message.split(';')[0]}")
        lowered.attempts = attempts
        lowered.seconds = time.perf_counter() - t0
        lowered.examples = tuple(examples)
        return lowered
    ops = sorted({_op_name(op) for _, why in attempts for op in _ATEN_OP.findall(why)})
    detail = "; ".join(f"{r}: {why}" for r, why in attempts)
    hint = f"unsupported operator(s): {', '.join(ops)}. " if ops else ""
    if refused is not None:
        hint += (f"torch.export refused data-dependent control flow at {_call_site(refused) or 'an unknown line'}: "
                 "express it with torch.where or torch.cond. ")
    raise ExportError(f"every lowering route failed for {type(model).__name__}. {hint}{detail}. "
                      "Rewrite the offending code with supported ops, or try another target (`compilers targets`).")


# -- data-dependent control flow ---------------------------------------------------------------------
_CONVERSION = re.compile(r"Converting a tensor to a Python (boolean|number|integer|float|index)")
_RAISED_AT = re.compile(r'File "([^"]+)", line (\d+)')


def interruption(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit behind an exception, if an exporter caught one and raised its own
    error from it (torch.export does): a reason to stop, not a route that failed."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def data_dependent(e: BaseException) -> str | None:
    """torch.export's message when `e` (or its cause) is its refusal of data-dependent control flow."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if type(e).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in text:
            return _ANSI.sub("", text)
        e = e.__cause__ or e.__context__
    return None


def tracer_conversions(caught: Sequence[warnings.WarningMessage]) -> list[tuple[str, int, str]]:
    """(file, line, what) of each tensor the tracer turned into a Python bool or number (a frozen value)."""
    found = {}
    for w in caught:
        m = _CONVERSION.search(str(w.message)) if issubclass(w.category, torch.jit.TracerWarning) else None
        if m:
            found.setdefault((w.filename, w.lineno), f"a tensor converted to a Python {m.group(1)}")
    return [(f, line, what) for (f, line), what in found.items()]


def _call_site(reason: str) -> str | None:
    """`file:line (code)` where torch.export says the data-dependent guard was raised."""
    after = reason.split("raised this error", 1)[-1]
    sites = [(f, int(n)) for f, n in _RAISED_AT.findall(after)]
    user = [s for s in sites if "/site-packages/" not in s[0] and "/torch/" not in s[0]] or sites
    return _where(*user[-1]) if user else None


def _where(filename: str, lineno: int) -> str:
    code = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}" + (f" (`{code[:120]}`)" if code else "")


def _export_probe(flat: FlatModule, signature: Signature, examples: tuple) -> str | None:
    """torch.export's reason if it refuses the model for data-dependent control flow; None if it accepts it
    or fails for another reason (then the tracer's conversions are taken to follow shapes, which the grown
    example validates)."""
    _, per_input = export_dims(signature)
    try:
        with quiet():
            torch.export.export(flat, examples, dynamic_shapes=(per_input,), strict=False)
    except Exception as e:
        return data_dependent(e)
    return None


def frozen_branch_message(route: str, conversions: Sequence[tuple[str, int, str]], refused: str) -> str:
    """ExportError text: the lines where tracing froze a data-dependent value, and what to do."""
    sites = [f"{_where(f, n)}: {what}" for f, n, what in conversions[:3]] or \
        [f"{_call_site(refused) or 'an unknown line'}: torch.export found a data-dependent branch"]
    return (f"the {route} route traced through data-dependent control flow at {'; '.join(sites)}; the compiled "
            "model would always take the branch (or keep the value) of the example, whatever the inputs. "
            "torch.export refused it for that reason. Express it with torch.where or torch.cond, use "
            "torchscript-cpu with mode = \"script\", or, if the branch never changes for your inputs, accept it "
            f"with compile(..., {ACCEPT}=True)")


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
