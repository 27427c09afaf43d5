"""The seam every backend implements: can I run here, lower, optimize, build, and load an engine.

Call conventions, pytrees, dtypes and devices are handled once in `signature.py` / `runtime.py`;
an engine only ever sees a flat list of arrays in the order of `Signature.inputs`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..lower import Lowered
from ..signature import Signature
from ..target import Target


@dataclass(frozen=True)
class Option:
    """A backend option a descriptor may set."""

    default: Any
    doc: str
    choices: tuple | None = None


@dataclass
class Optimized:
    """What the optimize stage hands to build: the (rewritten) lowered model and what was done to it."""

    lowered: Lowered
    fused: dict[str, int] = field(default_factory=dict)   # fused operator type -> count
    notes: list[str] = field(default_factory=list)


class Engine(ABC):
    """A built, runnable model: flat arrays in, flat arrays out."""

    #: what run() takes and returns: "numpy" arrays or "torch" tensors
    array_kind: str = "numpy"

    @abstractmethod
    def run(self, inputs: Sequence[Any]) -> list[Any]:
        """Run on the flat inputs (in Signature.inputs order); return the flat outputs."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the engine's files into `directory` (which exists and is empty)."""

    def describe(self) -> dict[str, Any]:
        """What the engine is made of: node count and executed/fused operator types, where known."""
        return {}


class Backend(ABC):
    """One inference compiler behind the common seam."""

    name: str = ""
    #: lowering routes, most preferred first; "onnx-dynamo" and "onnx-torchscript" are lower.py's own
    routes: tuple[str, ...] = ("onnx-dynamo", "onnx-torchscript")
    #: options a descriptor may set in [options]
    options: Mapping[str, Option] = {}
    #: libraries whose exact version an artifact of this backend is bound to
    bound_libraries: tuple[str, ...] = ()
    #: pip extra that installs this backend
    extra: str = "cpu"

    def routes_for(self, target: Target) -> tuple[str, ...]:
        """The routes to try for `target` (a descriptor option may pick one); default: `routes`."""
        return self.routes

    #: devices and precisions the backend implements
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)

    def unavailable_reason(self, target: Target) -> str | None:
        """None if the backend can run `target` here, else why not and the command that fixes it."""
        if target.device not in self.devices:
            return f"device {target.device!r} is not supported by the {self.name} backend yet ({', '.join(self.devices)} only)"
        if target.precision not in self.precisions:
            return (f"precision {target.precision} is not supported by the {self.name} backend yet "
                    f"({', '.join(self.precisions)} only)")
        return self.runtime_reason(target)

    @abstractmethod
    def runtime_reason(self, target: Target) -> str | None:
        """None if the backend's runtime is installed and usable here, else why not and how to fix it."""

    def lower(self, route: str, module: Any, signature: Signature, examples: Sequence[Any], workdir: Path) -> Lowered:
        """Lower by a route of the backend's own (a direct import); ONNX routes are lower.py's."""
        raise NotImplementedError(route)

    def optimize(self, lowered: Lowered, target: Target, calibration: Sequence[Sequence[Any]] | None,
                 workdir: Path) -> Optimized:
        """Graph-level fusion and, for int8 targets, calibration and quantization."""
        return Optimized(lowered)

    @abstractmethod
    def build(self, optimized: Optimized, target: Target, signature: Signature) -> Engine:
        """The runnable engine."""

    @abstractmethod
    def load(self, directory: Path, target: Target, signature: Signature) -> Engine:
        """An engine from the files its `save` wrote."""

    def versions(self) -> dict[str, str]:
        """Installed versions of this backend's libraries (recorded in every artifact)."""
        from importlib.metadata import PackageNotFoundError, version
        found = {}
        for lib in self.bound_libraries:
            try:
                found[lib] = version(lib)
            except PackageNotFoundError:
                pass
        return found
