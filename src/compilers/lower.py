"""The export ladder: try each lowering route in the backend's order, keep the first that works.

The ONNX routes live here: "onnx-dynamo" (torch.export -> ONNX) and "onnx-torchscript" (the
TorchScript-based exporter). A backend may put routes of its own (a direct import) in front.
Every attempt is recorded, so the report says which route worked and why the others failed.
"""
from __future__ import annotations

import contextlib
import linecache
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .compat import rnn_kernels_kept
from .errors import ExportError
from .quiet import quiet
from .signature import FlatModule, Signature
from .target import DimRange

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
    #: dynamic dims the lowered model holds for on part of their range only (the compiled model takes only those sizes)
    dims: dict[str, DimRange] = field(default_factory=dict)


OwnRoute = Callable[[str, FlatModule, tuple], "Lowered"]
#: routes that run torch.export, which refuses data-dependent control flow instead of tracing through it
EXPORT_ROUTES = ("onnx-dynamo", "torch-export")
#: the API keyword that accepts a data-dependent branch frozen by tracing (compile(..., accept_traced_branches=True))
ACCEPT = "accept_traced_branches"
FROZEN_NOTE = "data-dependent control flow frozen by tracing, accepted with accept_traced_branches=True"


def run_ladder(routes: Sequence[str], own_route: OwnRoute, model: torch.nn.Module, signature: Signature,
               examples: Sequence[torch.Tensor], workdir: Path, accept_traced_branches: bool = False,
               program: Any = None) -> Lowered:
    """Lower `model` by the first of `routes` that works; ExportError listing every failure if none does.

    The ONNX routes are this module's; any other route is the backend's own, run by `own_route(route,
    flat_module, examples)`.

    A route that traces (TorchScript tracing, OpenVINO's direct import) records one path through Python
    control flow. When the tracer converted a tensor to a Python value, torch.export (an earlier route, or a
    probe) says whether that path holds for other inputs: when it refuses the model for data-dependent control
    flow, the traced branch is frozen: ExportError quoting it, unless `accept_traced_branches`; when its guards
    keep a dynamic dim to part of its range, the lowered model's `dims` narrow it; when they fit no range, as
    for a frozen branch. Attributes a route sets on the model while tracing are undone after it.

    `program`: the model's ExportedProgram on `examples`, made as torch.onnx.export makes it
    (`analysis.graph.export`): the onnx-dynamo route converts it instead of exporting again."""
    flat = FlatModule(model, signature).eval()
    with fast_paths_off():
        return _ladder(routes, own_route, flat, model, signature, examples, workdir, accept_traced_branches,
                       program)


def _ladder(routes: Sequence[str], own_route: OwnRoute, flat: FlatModule, model: torch.nn.Module,
            signature: Signature, examples: Sequence[torch.Tensor], workdir: Path, accept_traced_branches: bool,
            program: Any) -> Lowered:
    attempts: list[tuple[str, str]] = []
    refused: str | None = None    # torch.export's refusal of the path a trace takes (data-dependent control flow)
    exported = False              # whether a torch.export route ran (its verdict on the control flow is known)
    for route in routes:
        t0 = time.perf_counter()
        try:
            with quiet(), warnings.catch_warnings(record=True) as caught, attributes_kept(flat):
                warnings.simplefilter("always", torch.jit.TracerWarning)
                if route == "onnx-dynamo" and program is not None:
                    lowered = _onnx_dynamo(program, signature, tuple(examples), workdir / f"{route}.onnx")
                elif route in ONNX_ROUTES:
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
                held = None if program is None else held_ranges(program, signature, tuple(examples))
                probe = Probe(dims=held) if held is not None else _export_probe(flat, signature, tuple(examples))
                refused, lowered.dims = probe.refused, probe.dims
                if probe.dims:
                    lowered.notes.append(narrowed_note(signature, probe.dims, probe.said))
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
        hint += (f"torch.export refused data-dependent control flow at {_call_site(refused) or 'an unknown line'} "
                 f"(\"{_quoted(refused, 300)}\"): express it with torch.where or torch.cond. ")
    raise ExportError(f"every lowering route failed for {type(model).__name__}. {hint}{detail}. "
                      "Rewrite the offending code with supported ops, or try another target (`compilers targets`).")


# -- data-dependent control flow ---------------------------------------------------------------------
_CONVERSION = re.compile(r"Converting a tensor to a (Python \w+|NumPy array)")
_RAISED_AT = re.compile(r'File "([^"]+)", line (\d+)')
_RAISED_BY = "The following call raised this error:"
#: torch.export's suggested range for a dim: `seq = Dim('seq', max=64)`, `batch = Dim('batch', min=5, max=64)`
_RANGE_FIX = re.compile(r"(\w+) = Dim\('\1'(?:, min=(\d+))?(?:, max=(\d+|oo))?\)")
_PINNED = re.compile(r"\w+ = \d+")   # torch.export's fix for a dynamic dim its guards pin to one size


@contextlib.contextmanager
def fast_paths_off() -> Iterator[None]:
    """PyTorch's native multi-head-attention fast path off while lowering: in eval mode nn.TransformerEncoder
    (and nn.MultiheadAttention) given a key_padding_mask runs on nested tensors built from the example's mask,
    which a trace records with that mask's pattern baked in; the regular path is the same function of the
    inputs at every real position."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def attributes_kept(module: torch.nn.Module) -> Iterator[None]:
    """Puts back, on exit, the plain attributes of `module` and its submodules that the block set, replaced
    or added. Lowering runs the model's Python code, which may store what it computed (transformers' Swin
    keeps its window size as a tensor while torch.jit traces it); that must not reach the next route, the
    export probe, or the caller's model."""
    saved = [(m, dict(vars(m))) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            now = vars(m)
            if now.keys() != attrs.keys() or any(now[k] is not v for k, v in attrs.items()):
                now.clear()
                now.update(attrs)


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
    """torch.export's message when `e` (or its cause) is its refusal of data-dependent control flow: the
    innermost such message (an exporter that wraps torch.export repeats it below its own words)."""
    seen: set[int] = set()
    found = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if type(e).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in text:
            found = _ANSI.sub("", text)
        e = e.__cause__ or e.__context__
    return found


def tracer_conversions(caught: Sequence[warnings.WarningMessage]) -> list[tuple[str, int, str]]:
    """(file, line, what) of each tensor the tracer turned into a Python bool or number (a frozen value)."""
    found = {}
    for w in caught:
        m = _CONVERSION.search(str(w.message)) if issubclass(w.category, torch.jit.TracerWarning) else None
        if m:
            found.setdefault((w.filename, w.lineno), f"a tensor converted to a {m.group(1)}")
    return [(f, line, what) for (f, line), what in found.items()]


def _raised_at(reason: str) -> tuple[str, int] | None:
    """(file, line) where torch.export says the data-dependent guard was raised."""
    after = reason.split("raised this error", 1)[-1]
    sites = [(f, int(n)) for f, n in _RAISED_AT.findall(after)]
    user = [s for s in sites if "/site-packages/" not in s[0] and "/torch/" not in s[0]] or sites
    return user[-1] if user else None


def _call_site(reason: str) -> str | None:
    """`file:line (code)` where torch.export says the data-dependent guard was raised."""
    site = _raised_at(reason)
    return _where(*site) if site else None


def _where(filename: str, lineno: int) -> str:
    code = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}" + (f" (`{code[:120]}`)" if code else "")


def constraint_violation(e: BaseException) -> str | None:
    """torch.export's message when `e` (or its cause) says the model's code holds for part of a dynamic dim's
    range only (its guards on the size are not true for every size of the declared range)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "Constraints violated" in str(e):
            return _ANSI.sub("", getattr(e, "msg", str(e)))
        e = e.__cause__ or e.__context__
    return None


@dataclass
class Probe:
    """What torch.export says of the path a trace took through the model's Python code."""

    refused: str | None = None     # its message refusing the path
    dims: dict[str, DimRange] = field(default_factory=dict)   # the ranges it keeps dynamic dims to
    said: str = ""                 # its message on those ranges


def _export_probe(flat: FlatModule, signature: Signature, examples: tuple) -> Probe:
    """What torch.export says of the path a trace took through the model's Python code:
    - its refusal when the path depends on tensor values, or holds only for some residue of a dynamic dim's
      size (`if x.shape[0] % 2 == 0:`), which no range keeps and the grown example may not leave;
    - the ranges its guards keep dynamic dims to (`if x.shape[0] > 4:`: batch >= 5; BERT: seq <= its
      position table), where the traced path holds;
    - nothing when it accepts the model, pins a dynamic dim to the example's size (nn.LSTM's sequence, which
      its decomposition unrolls; the grown example, of another size, validates the trace there), or fails for
      another reason (the tracer's conversions are then taken to follow sizes, which validation checks)."""
    _, per_input = export_dims(signature)
    try:
        with quiet(), attributes_kept(flat):
            torch.export.export(flat, examples, dynamic_shapes=(per_input,), strict=False)
    except Exception as e:
        violation = constraint_violation(e)
        if violation is None:
            return Probe(refused=data_dependent(e))
        dims = _suggested_ranges(violation, signature)
        return Probe(refused=violation) if dims is None else Probe(dims=dims, said=violation)
    return Probe()


def _suggested_ranges(violation: str, signature: Signature) -> dict[str, DimRange] | None:
    """The signature's dims narrowed to the ranges torch.export suggests (a dim it pins to one size is left
    out); None when a suggestion is neither (a dim that must be a multiple of another)."""
    fixes = [l.strip() for l in violation.partition("Suggested fixes:")[2].strip().split("\n\n")[0].splitlines()
             if l.strip()]
    names = {re.sub(r"\W", "_", name): name for name in signature.dims}
    dims = {}
    for fix in fixes:
        if _PINNED.fullmatch(fix):
            continue
        m = _RANGE_FIX.fullmatch(fix)
        if m is None or m.group(1) not in names:
            return None
        name = names[m.group(1)]
        hi = m.group(3)
        rng = _within(signature.dims[name], int(m.group(2) or 0), None if hi in (None, "oo") else int(hi))
        if rng is None:
            return None
        dims[name] = rng
    return dims if fixes else None


def _within(old: DimRange, lo: int, hi: int | None) -> DimRange | None:
    """`old` narrowed to lo..hi (None: unbounded), keeping its `opt` where that still lies inside; None if empty."""
    lo = max(lo, old.min)
    hi = old.max if hi is None else hi if old.max is None else min(hi, old.max)
    if hi is not None and hi < lo:
        return None
    keeps_opt = old.opt is not None and lo <= old.opt and (hi is None or old.opt <= hi)
    return DimRange(lo, old.opt if keeps_opt else None, hi)


def narrowed_note(signature: Signature, dims: dict[str, DimRange], said: str = "") -> str:
    """Report note: which dynamic dims the lowered model holds for on part of their range, in torch.export's
    words where it gave them."""
    ranges = ", ".join(f"{name} {signature.dims[name]} -> {rng}" for name, rng in dims.items())
    return (f"torch.export keeps dynamic dims to part of their range for this model's code ({ranges}); the "
            "compiled model takes those sizes only, others raise InputError"
            + (f". torch.export: \"{_quoted(said)}\"" if said else ""))


def frozen_branch_message(route: str, conversions: Sequence[tuple[str, int, str]], refused: str) -> str:
    """ExportError text: the lines where tracing froze a branch or value, torch.export's own words, and what to do.
    The conversions at the line torch.export refused come first."""
    site = _raised_at(refused)
    ordered = sorted(conversions, key=lambda c: (c[0], c[1]) != site)    # stable: the others keep their order
    sites = [f"{_where(f, n)}: {what}" for f, n, what in ordered[:3]] or \
        [f"{_call_site(refused) or 'an unknown line'}: torch.export found a data-dependent branch"]
    quote = f"torch.export refused the model: \"{_quoted(refused)}\""
    if refused.lstrip().startswith("Constraints violated"):
        return (f"the {route} route traced through Python control flow on the size of a dynamic dim at "
                f"{'; '.join(sites)}; the compiled model would take the example's path at every size, and "
                f"{quote}, with no range of sizes where that path holds. Declare the dim static (dynamic_shapes) or "
                "give it a range that the path holds for (a target descriptor's [shapes] table), express the "
                f"branch with torch.where or torch.cond, or accept the example's path with compile(..., {ACCEPT}=True)")
    return (f"the {route} route traced through data-dependent control flow at {'; '.join(sites)}; the compiled "
            "model would always take the branch (or keep the value) of the example, whatever the inputs. "
            f"{quote}. Express it with torch.where or torch.cond, use "
            "torchscript-cpu with mode = \"script\", or, if the branch never changes for your inputs, accept it "
            f"with compile(..., {ACCEPT}=True)")


def _quoted(message: str, limit: int = 600) -> str:
    """The first lines of torch.export's message that say what it refused and where: its first line, the
    guards it could not keep, its suggested fixes, and the call that raised it."""
    lines = [l.strip() for l in message.splitlines()]
    keep = lines[:1]
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("- "):
            keep.append(line)
        elif line.startswith(("Suggested fixes:", _RAISED_BY)):   # with the block under it
            block = lines[i:i + 5]
            keep.extend(block[:block.index("")] if "" in block else block)
    text = " ".join(keep)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def _onnx_dynamo(flat: FlatModule | Any, signature: Signature, examples: tuple, path: Path) -> Lowered:
    """torch.export -> ONNX; `flat` may be the module's ExportedProgram already (`analysis.graph.export`)."""
    _, per_input = export_dims(signature)
    with rnn_kernels_kept():
        program = torch.onnx.export(flat, examples, dynamo=True, dynamic_shapes=(per_input,), verbose=False,
                                    input_names=signature.input_names, output_names=signature.output_names)
    program.save(str(path))
    lowered = _described("onnx-dynamo", path, signature)
    # torch.onnx relaxes the Dims it is given where the model's code keeps them to part of their range
    # (`if x.shape[0] > 4:`), and the ONNX graph does not check sizes: the signature must
    lowered.dims = exported_ranges(program.exported_program, signature)
    if lowered.dims:
        lowered.notes.append(narrowed_note(signature, lowered.dims))
    return lowered


def held_ranges(program: Any, signature: Signature, examples: Sequence[Any],
                only: str | None = None) -> dict[str, DimRange] | None:
    """The dynamic dims an ExportedProgram (exported on `examples`) holds for part of their declared range only,
    with that part: narrower range constraints, and its runtime checks on one dim's size, solved for the sizes they
    allow (the part holding the example's size). Checks that only rule out sizes 0 and 1 are no branch of the
    model's (torch.export's size-oblivious capture makes them). None when a check cannot be solved so (a branch on
    a size's parity, on two sizes at once): then only torch.export's own refusal can say what holds. `only`: the
    checks on that dim alone."""
    dims = exported_ranges(program, signature)
    symbols = {}
    for node, spec in zip(_user_placeholders(program), signature.inputs):
        for size, dim in zip(node.meta["val"].shape, spec.shape):
            if isinstance(dim, str) and isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and \
                    only in (None, dim):
                symbols[size.node.expr] = dim
    sizes = signature.dim_sizes(examples)
    for node in program.graph.nodes:
        check = node.args[0] if node.target is torch.ops.aten._assert_scalar.default else None
        cond = check.meta.get("val") if isinstance(check, torch.fx.Node) else None
        if not isinstance(cond, torch.SymBool) or not set(cond.node.expr.free_symbols) & set(symbols):
            continue
        if len(cond.node.expr.free_symbols) > 1:
            return None
        (symbol,) = cond.node.expr.free_symbols
        name = symbols[symbol]
        old = dims.get(name, signature.dims[name])
        part = _part_held(cond.node.expr, symbol, sizes[name], old)
        rng = None if part is None else _within(old, *part)
        if rng is None:
            return None
        if (rng.min, rng.max) != (old.min, old.max):
            dims[name] = rng
    return dims


def _part_held(condition: Any, symbol: Any, size: int, old: DimRange) -> tuple[int, int | None] | None:
    """(lo, hi) of the run of sizes around `size` where `condition` holds, sizes 0 and 1 aside; None if unsolved."""
    import sympy
    floor = max(old.min, min(2, size))
    held = _solved(condition, symbol, sympy.Interval(floor, old.max if old.max is not None else sympy.oo))
    part = next((p for p in (held.args if isinstance(held, sympy.Union) else (held,)) if size in p), None) \
        if held is not None else None
    if part is None or not isinstance(part, (sympy.Interval, sympy.FiniteSet)):
        return None
    lo, hi = sympy.ceiling(part.inf), part.sup
    if isinstance(part, sympy.Interval) and part.left_open and lo == part.inf:
        lo += 1
    if hi != sympy.oo:
        hi = sympy.floor(hi) - (1 if isinstance(part, sympy.Interval) and part.right_open and hi == part.sup else 0)
    return (old.min if lo <= floor else int(lo)), (None if hi == sympy.oo else int(hi))


def _solved(condition: Any, symbol: Any, domain: Any) -> Any:
    """The sizes in `domain` where `condition` holds (a sympy Set of intervals), or None where sympy cannot say."""
    import sympy
    if isinstance(condition, (sympy.Or, sympy.And)):
        parts = [_solved(c, symbol, domain) for c in condition.args]
        if any(p is None for p in parts):
            return None
        return sympy.Union(*parts) if isinstance(condition, sympy.Or) else sympy.Intersection(*parts)
    try:
        held = sympy.solveset(condition, symbol, domain)
    except Exception:       # a form solveset does not take (Mod, Min of two sizes): not solved
        return None
    return None if held.has(sympy.ConditionSet) or isinstance(held, sympy.ConditionSet) else held


def _user_placeholders(program: Any) -> list[Any]:
    names = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


def exported_ranges(program: Any, signature: Signature) -> dict[str, DimRange]:
    """The signature's dynamic dims whose range in an ExportedProgram is narrower than declared, with that range."""
    from torch.utils._sympy.numbers import int_oo
    dims: dict[str, DimRange] = {}
    for node, spec in zip(_user_placeholders(program), signature.inputs):
        for size, dim in zip(node.meta["val"].shape, spec.shape):
            vr = program.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
            if vr is None or not isinstance(dim, str):
                continue
            old = dims.get(dim, signature.dims[dim])
            rng = _within(old, int(vr.lower), None if vr.upper == int_oo else int(vr.upper))
            if rng is not None and (rng.min, rng.max) != (old.min, old.max):
                dims[dim] = rng
    return dims


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
