"""TorchScript: torch.jit.trace (or script), freeze, optimize_for_inference; run by the TorchScript interpreter.

TorchScript is deprecated in recent PyTorch (torch.export and AOTInductor replace it). The backend stays
because users still ship TorchScript files, e.g. to libtorch (C++) services that load `model.pt`.

The artifact is the frozen module, saved with torch.jit.save: in trace mode a module over the flat tensor
list (what `Signature.inputs` names), in script mode the scripted model itself. optimize_for_inference is
applied again at load: it converts weights to MKLDNN layouts for this CPU, and a module holding MKLDNN
constants cannot be saved.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..analysis.aliasing import script_outputs
from ..lower import Lowered
from ..settings import option
from ..signature import FlatModule
from .base import Backend, Engine, Optimized, Spec

MODEL_FILE = "model.pt"
_ROUTES = {"trace": "torchscript-trace", "script": "torchscript-script"}


@dataclass(frozen=True)
class TorchScriptSettings:
    # No `threads`: torch's intra-op pool is process-wide (torch.set_num_threads); a compiled model must not
    # change it behind the caller's back, so it runs with whatever the process has set.
    mode: str = option("trace", "torch.jit.trace the flat module (records one path through Python control flow), "
                                "or torch.jit.script the model (keeps control flow; the model must be scriptable)",
                       choices=tuple(_ROUTES))
    freeze: bool = option(True, "torch.jit.freeze: weights and submodules become constants, conv+batchnorm folds")
    optimize_for_inference: bool = option(True, "torch.jit.optimize_for_inference (implies freezing): MKLDNN "
                                                "convolutions and other CPU rewrites; re-applied at load")


class TorchScriptBackend(Backend):
    name = "torchscript"
    routes = tuple(_ROUTES.values())
    Settings = TorchScriptSettings
    # No bound library: torch.jit.load reads TorchScript files saved by older torch releases.
    bound_libraries = ()

    def routes_for(self, settings: TorchScriptSettings) -> tuple[str, ...]:
        return (_ROUTES[settings.mode],)

    def lower(self, route: str, module: FlatModule, examples: Sequence[Any], spec: Spec) -> Lowered:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            if route == _ROUTES["trace"]:
                # check_trace would re-run the model only on the same examples; validation does better
                scripted = torch.jit.trace(module, tuple(examples), check_trace=False)
            elif route == _ROUTES["script"]:
                scripted = torch.jit.script(module.model)
            else:
                raise ValueError(f"unknown torchscript route {route!r}")
        for w in caught:   # passed on to the export ladder, which refuses a frozen data-dependent branch
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        tracer = list(dict.fromkeys(f"{str(w.message).split('. ')[0].rstrip('.')} ({Path(w.filename).name}:{w.lineno})"
                                    for w in caught if issubclass(w.category, torch.jit.TracerWarning)))
        return Lowered(route=route, model=_Lowered(scripted.eval(), tracer), nodes=len(graph_nodes(scripted.inlined_graph)))

    def optimize(self, lowered: Lowered, spec: Spec, calibration) -> Optimized:
        scripted, tracer = lowered.model.module, lowered.model.tracer_warnings
        before = graph_kinds(scripted.inlined_graph)
        with _no_deprecation():
            portable = torch.jit.freeze(scripted) if spec.settings.freeze else scripted
            data = _save(portable)
        runner, portable_kinds = _runner(data, spec.settings)
        opt = Optimized(dataclasses.replace(lowered, model=_Frozen(data, runner, portable_kinds)))
        after = graph_kinds(runner.inlined_graph)
        opt.fused.update(fused_kinds(portable_kinds, after))
        gone = {k: n for k, n in before.items() if k.startswith("aten::") and k not in after}
        if gone:
            top = sorted(gone.items(), key=lambda kv: (-kv[1], kv[0]))
            more = f" (+{len(top) - 8} more kinds)" if len(top) > 8 else ""
            opt.notes.append("freeze/optimize_for_inference folded or rewrote away: "
                             + ", ".join(f"{k} {n}" for k, n in top[:8]) + more)
        for message in tracer[:5]:
            opt.notes.append(f"torch.jit.trace warned: {message}; the trace holds only the path these examples took")
        return opt

    def build(self, optimized: Optimized, spec: Spec) -> Engine:
        frozen = optimized.lowered.model
        return TorchScriptEngine(frozen.data, frozen.runner, frozen.portable_kinds, spec)

    def load(self, spec: Spec) -> Engine:
        data = (spec.workdir / MODEL_FILE).read_bytes()
        return TorchScriptEngine(data, *_runner(data, spec.settings), spec)


@dataclass
class _Lowered:
    """What lower hands to optimize: the traced or scripted module and the tracer's warnings."""

    module: torch.jit.ScriptModule
    tracer_warnings: list[str]


@dataclass
class _Frozen:
    """What optimize hands to build: the portable TorchScript file's bytes, the module that runs, and the
    node kinds of the portable graph."""

    data: bytes
    runner: torch.jit.ScriptModule
    portable_kinds: collections.Counter


class _ScriptCall(torch.nn.Module):
    """A loaded ScriptModule behind a Python forward, so that FlatModule can call it by argument name
    (inspect cannot read a loaded ScriptMethod's signature; TorchScript has no positional-only parameters)."""

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class TorchScriptEngine(Engine):
    """The TorchScript interpreter, in torch's own thread pool (calls from several threads are safe)."""

    array_kind = "torch"

    def __init__(self, data: bytes, runner: torch.jit.ScriptModule, portable_kinds: collections.Counter, spec: Spec):
        self.data = data
        self.runner = runner
        # script mode: the scripted model takes the model's own arguments; FlatModule maps flat tensors to them
        self.call = FlatModule(_ScriptCall(runner), spec.signature).eval() if spec.settings.mode == "script" else runner
        kinds = graph_kinds(runner.inlined_graph)
        self.info = {"nodes": sum(kinds.values()), "fused": fused_kinds(portable_kinds, kinds), "ops": dict(kinds)}
        self.frozen = spec.settings.freeze or spec.settings.optimize_for_inference
        # unfrozen, the JIT executor folds constants of its own while it runs the module (`torch.ones(2) * 3`),
        # which no graph shows: every output is checked
        self.shares = script_outputs(runner.inlined_graph, len(spec.signature.outputs)) if self.frozen else None

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        with torch.no_grad():   # not inference_mode: outputs must take in-place ops and autograd as eager's do
            return list(self.call(*inputs))

    def raw_call(self, inputs: Sequence[Any]) -> Callable[[], Any]:
        call = self.call

        def raw() -> Any:
            with torch.no_grad():
                return call(*inputs)
        return raw

    def may_share(self) -> frozenset[int] | None:
        """The outputs the frozen graph may return as an input, a view of one, one of its constants (weights and
        everything freezing folded: `table + 0`, which the interpreter returns by reference) or another output's
        memory. None for a module that is not frozen."""
        return self.shares

    def constants(self) -> list[Any] | None:
        """The frozen graph's constants; None for a module that is not frozen."""
        return held_tensors(self.runner) if self.frozen else None

    def save(self, directory: Path) -> None:
        (directory / MODEL_FILE).write_bytes(self.data)

    def describe(self) -> dict[str, Any]:
        return self.info


def _runner(data: bytes, settings: TorchScriptSettings) -> tuple[torch.jit.ScriptModule, collections.Counter]:
    """The module that runs (a fresh load of the portable file, optimized for this CPU if the target asks),
    and the node kinds of the portable graph."""
    module = _load(data)
    portable_kinds = graph_kinds(module.inlined_graph)
    if settings.optimize_for_inference:
        with _no_deprecation():
            module = torch.jit.optimize_for_inference(module)  # rewrites the loaded copy in place
    return module, portable_kinds


def _save(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _load(data: bytes) -> torch.jit.ScriptModule:
    with _no_deprecation():
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def graph_nodes(graph: Any) -> list[Any]:
    """Every node of a TorchScript graph, including those inside loops and ifs."""
    nodes = []
    for node in graph.nodes():
        nodes.append(node)
        for block in node.blocks():
            nodes.extend(graph_nodes(block))
    return nodes


def held_tensors(module: torch.jit.ScriptModule) -> list[torch.Tensor]:
    """The tensors a ScriptModule's graph holds as constants (in lists and tuples too), and its parameters and
    buffers (a frozen module has none left)."""
    found, stack = [], [n.output().toIValue() for n in graph_nodes(module.inlined_graph) if n.kind() == "prim::Constant"]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return found + list(module.parameters()) + list(module.buffers())


def graph_kinds(graph: Any) -> collections.Counter:
    return collections.Counter(n.kind() for n in graph_nodes(graph))


def fused_kinds(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """Node kinds that only the optimized graph has, leaving out plain aten ops (decompositions such as
    linear -> matmul + add), constants and MKLDNN layout plumbing: what remains are fused kernels."""
    return {k: n for k, n in sorted(after.items())
            if k not in before and not k.startswith(("aten::", "prim::Constant")) and "MKLDNNTensor" not in k}


@contextlib.contextmanager
def _no_deprecation() -> Iterator[None]:
    """torch.jit warns that TorchScript is deprecated on every call; the target's description says so once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
