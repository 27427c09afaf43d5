"""The seam every backend implements: can I run here, lower, optimize, build, and load an engine.

Call conventions, pytrees, dtypes and devices are handled once in `signature.py` / `runtime.py`;
an engine only ever sees a flat list of arrays in the order of `Signature.inputs`.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from ..host import installed_versions
from ..lower import Lowered
from ..quantize import CalibrationPlan
from ..settings import NoSettings, parse
from ..signature import FlatModule, Signature
from ..target import Target


@dataclass(frozen=True)
class Spec:
    """What a backend is asked to build (or load): the target, its parsed settings, the call signature,
    and a directory of its own (a scratch directory while building; the artifact directory when loading)."""

    target: Target
    settings: Any
    signature: Signature
    workdir: Path


@dataclass
class Optimized:
    """What the optimize stage hands to build: the (rewritten) lowered model and what was done to it."""

    lowered: Lowered
    fused: dict[str, int] = field(default_factory=dict)   # fused operator type -> count
    notes: list[str] = field(default_factory=list)
    quantization: Any = None    # int8: what the backend needs to rebuild with layers kept in float


class Engine(ABC):
    """A built, runnable model: flat arrays in, flat arrays out."""

    #: what run() takes and returns: "numpy" arrays or "torch" tensors (CPU numpy arrays and CPU torch
    #: tensors convert both ways without copying)
    array_kind: str = "numpy"
    #: where run() wants its inputs and leaves its outputs ("cpu", "cuda", "cuda:1", ...)
    device: str = "cpu"
    #: whether run() may be called from several threads at once; if not, the runtime serializes calls
    thread_safe: bool = True

    @abstractmethod
    def run(self, inputs: Sequence[Any]) -> list[Any]:
        """Run on the flat inputs (in Signature.inputs order); return the flat outputs."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the engine's files into `directory` (which exists and is empty)."""

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """InputError when the engine would compute these flat inputs (numpy arrays or CPU tensors) otherwise than
        eager for reasons of its own (OpenVINO's narrowed integers); run() refuses them too. Default: none."""

    def may_share(self) -> frozenset[int] | None:
        """The flat outputs run() may return in memory not allocated for that call alone: an input or a view of
        one, a constant or weight of the engine's own, or another output's memory; found from the engine's own
        graph when it is built or loaded (`analysis.aliasing`). Only these are checked on each call, and copied
        where they share memory that eager's outputs do not (`CompiledModel._own_memory`): empty, no call checks
        anything. None: unknown, every output is checked."""
        return None

    def constants(self) -> list[Any] | None:
        """The tensors the engine holds whose memory run() may return, or views of them (its weights and folded
        constants): what an output must not share, since a caller may edit it. None: the engine cannot list them,
        and every checked output (`may_share`) that does not share memory as eager's does is copied."""
        return None

    def describe(self) -> dict[str, Any]:
        """What the engine is made of: node count and executed/fused operator types, where known, and the
        backend's runtime `config` (threads, precision hint, ...) so others can reproduce it."""
        return {}

    def raw_call(self, inputs: Sequence[Any]) -> Callable[[], Any] | None:
        """The backend library's own call on `inputs` (already in this engine's array kind and device), with
        nothing of this package around it: what the call overhead is measured against. None if there is none."""
        return None


class Backend(ABC):
    """One inference compiler behind the common seam."""

    name: str = ""
    #: lowering routes, most preferred first; "onnx-dynamo" and "onnx-torchscript" are lower.py's own
    routes: tuple[str, ...] = ("onnx-dynamo", "onnx-torchscript")
    #: the options a descriptor may set in [options]: a frozen dataclass built with settings.option()
    Settings: type = NoSettings
    #: libraries whose exact version an artifact of this backend is bound to
    bound_libraries: tuple[str, ...] = ()
    #: Python modules the backend needs (checked without importing them)
    requires: tuple[str, ...] = ()
    #: pip extra that installs this backend
    extra: str = "cpu"
    #: devices and precisions the backend implements
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    #: runtime options a model server loads this backend's engines with (under its serving.toml [engine]):
    #: where an event loop shares the cores, an engine must not keep them busy between calls
    serving_options: Mapping[str, Any] = MappingProxyType({})

    def settings(self, target: Target) -> Any:
        """The target's [options] as this backend's typed Settings; TargetError if one is unknown or malformed."""
        return parse(self.Settings, target.options, f"target {target.name!r} (backend {self.name})")

    def routes_for(self, settings: Any) -> tuple[str, ...]:
        """The routes to try (a setting may pick one); default: `routes`."""
        return self.routes

    def unavailable_reason(self, target: Target) -> str | None:
        """None if the backend can run `target` here, else why not and the command that fixes it.

        Cheap: no backend library is imported (`compilers targets` calls it for every target); `probe`
        does the checks that need the library itself."""
        if target.device not in self.devices:
            return f"device {target.device!r} is not supported by the {self.name} backend yet ({', '.join(self.devices)} only)"
        if target.precision not in self.precisions:
            return (f"precision {target.precision} is not supported by the {self.name} backend yet "
                    f"({', '.join(self.precisions)} only)")
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed: pip install 'compilers[{self.extra}]'"
        return self.setup_reason(target)

    def setup_reason(self, target: Target) -> str | None:
        """A cheap check of the machine beyond installed modules (a C++ compiler, a package clash)."""
        return None

    def probe(self, target: Target) -> str | None:
        """None if the installed runtime really works for `target` (imports it), else why not and how to fix it."""
        return None

    def lower(self, route: str, module: FlatModule, examples: Sequence[Any], spec: Spec) -> Lowered:
        """Lower by a route of the backend's own (a direct import); ONNX routes are lower.py's."""
        raise NotImplementedError(route)

    def optimize(self, lowered: Lowered, spec: Spec, calibration: CalibrationPlan | None) -> Optimized:
        """Graph-level fusion and, for int8 targets, calibration and quantization (`calibration` is given
        exactly when the target is int8)."""
        return Optimized(lowered)

    def quantized_layers(self, optimized: Optimized) -> list[str]:
        """The quantized layers `keep_float` can put back in float (empty: no accuracy loop for this backend)."""
        return []

    def keep_float(self, optimized: Optimized, layers: Sequence[str]) -> Optimized:
        """`optimized` quantized again with `layers` left in float."""
        raise NotImplementedError(f"the {self.name} backend cannot keep quantized layers in float")

    def probe_float(self, optimized: Optimized, layer: str) -> Optimized:
        """A quick approximation of `keep_float(optimized, [layer])`, good enough to rank layers by how much
        keeping them in float helps (default: the real thing)."""
        return self.keep_float(optimized, [layer])

    @abstractmethod
    def build(self, optimized: Optimized, spec: Spec) -> Engine:
        """The runnable engine."""

    @abstractmethod
    def load(self, spec: Spec) -> Engine:
        """An engine from the files its `save` wrote into `spec.workdir`."""

    def versions(self) -> dict[str, str]:
        """Installed versions of this backend's libraries (recorded in every artifact)."""
        return installed_versions(self.bound_libraries)
