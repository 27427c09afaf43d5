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
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..lower import Lowered
from ..signature import FlatModule, Signature
from ..target import Target
from .base import Backend, Engine, Optimized, Option

MODEL_FILE = "model.pt"
_ROUTES = {"trace": "torchscript-trace", "script": "torchscript-script"}


class TorchScriptBackend(Backend):
    name = "torchscript"
    routes = tuple(_ROUTES.values())
    options = {
        "mode": Option("trace", "torch.jit.trace the flat module (records one path through Python control flow), "
                                "or torch.jit.script the model (keeps control flow; the model must be scriptable)",
                       tuple(_ROUTES)),
        "threads": Option(0, "intra-op threads while the engine runs (the previous torch setting is restored after "
                             "each call); 0 = leave torch's setting alone (all physical cores by default)"),
        "freeze": Option(True, "torch.jit.freeze: weights and submodules become constants, conv+batchnorm folds"),
        "optimize_for_inference": Option(True, "torch.jit.optimize_for_inference (implies freezing): MKLDNN "
                                               "convolutions and other CPU rewrites; re-applied at load"),
    }
    # No bound library: torch.jit.load reads TorchScript files saved by older torch releases.
    bound_libraries = ()

    def routes_for(self, target: Target) -> tuple[str, ...]:
        return (_ROUTES[target.options.get("mode", "trace")],)

    def runtime_reason(self, target: Target) -> str | None:
        return None  # torch itself is the runtime

    def lower(self, route: str, module: Any, signature: Signature, examples: Sequence[Any], workdir: Path) -> Lowered:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            if route == _ROUTES["trace"]:
                # check_trace would re-run the model only on the same examples; validation does better
                scripted = torch.jit.trace(module, tuple(examples), check_trace=False)
            elif route == _ROUTES["script"]:
                scripted = torch.jit.script(module.model)
            else:
                raise ValueError(f"unknown torchscript route {route!r}")
        tracer = list(dict.fromkeys(f"{str(w.message).split('. ')[0].rstrip('.')} ({Path(w.filename).name}:{w.lineno})"
                                    for w in caught if issubclass(w.category, torch.jit.TracerWarning)))
        return Lowered(route=route, model=_Lowered(scripted.eval(), tracer), nodes=len(graph_nodes(scripted.inlined_graph)))

    def optimize(self, lowered: Lowered, target: Target, calibration, workdir: Path) -> Optimized:
        scripted, tracer = lowered.model.module, lowered.model.tracer_warnings
        before = graph_kinds(scripted.inlined_graph)
        with _no_deprecation():
            portable = torch.jit.freeze(scripted) if target.options.get("freeze", True) else scripted
            data = _save(portable)
        runner, portable_kinds = _runner(data, target)
        opt = Optimized(Lowered(**{**lowered.__dict__, "model": _Frozen(data, runner, portable_kinds)}))
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

    def build(self, optimized: Optimized, target: Target, signature: Signature) -> Engine:
        frozen = optimized.lowered.model
        return TorchScriptEngine(frozen.data, frozen.runner, frozen.portable_kinds, target, signature)

    def load(self, directory: Path, target: Target, signature: Signature) -> Engine:
        data = (directory / MODEL_FILE).read_bytes()
        return TorchScriptEngine(data, *_runner(data, target), target, signature)


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
    array_kind = "torch"

    def __init__(self, data: bytes, runner: torch.jit.ScriptModule, portable_kinds: collections.Counter,
                 target: Target, signature: Signature):
        self.data = data
        self.runner = runner
        self.threads = int(target.options.get("threads", 0))
        script = target.options.get("mode", "trace") == "script"
        # script mode: the scripted model takes the model's own arguments; FlatModule maps flat tensors to them
        self.call = FlatModule(_ScriptCall(runner), signature).eval() if script else runner
        kinds = graph_kinds(runner.inlined_graph)
        self.info = {"nodes": sum(kinds.values()), "fused": fused_kinds(portable_kinds, kinds), "ops": dict(kinds)}

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        with torch.inference_mode(), _intra_op_threads(self.threads):
            return list(self.call(*inputs))

    def save(self, directory: Path) -> None:
        (directory / MODEL_FILE).write_bytes(self.data)

    def describe(self) -> dict[str, Any]:
        return self.info


def _runner(data: bytes, target: Target) -> tuple[torch.jit.ScriptModule, collections.Counter]:
    """The module that runs (a fresh load of the portable file, optimized for this CPU if the target asks),
    and the node kinds of the portable graph."""
    module = _load(data)
    portable_kinds = graph_kinds(module.inlined_graph)
    if target.options.get("optimize_for_inference", True):
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


def graph_kinds(graph: Any) -> collections.Counter:
    return collections.Counter(n.kind() for n in graph_nodes(graph))


def fused_kinds(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """Node kinds that only the optimized graph has, leaving out plain aten ops (decompositions such as
    linear -> matmul + add), constants and MKLDNN layout plumbing: what remains are fused kernels."""
    return {k: n for k, n in sorted(after.items())
            if k not in before and not k.startswith(("aten::", "prim::Constant")) and "MKLDNNTensor" not in k}


@contextlib.contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    # torch's intra-op pool is process-wide: set it only for the call and restore it, so eager code elsewhere
    # in the process keeps its setting (concurrent callers with different settings would still race).
    before = torch.get_num_threads()
    if not threads or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_deprecation() -> Iterator[None]:
    """torch.jit warns that TorchScript is deprecated on every call; the target's description says so once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
