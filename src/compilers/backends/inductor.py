"""AOTInductor: torch.export of the flat module, compiled ahead of time to C++ kernels in a `.pt2` package.

The package holds a shared library compiled for this CPU (-march=native) against this torch: it is bound
to the torch version (manifest check) and to the CPU's instruction set (checked at load from `aoti.json`).
"""
from __future__ import annotations

import collections
import json
import re
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch._inductor

from ..analysis.aliasing import program_outputs
from ..errors import ArtifactError, CompilerError, InputError
from ..host import cpu_isa
from ..lower import Lowered, export_dims
from ..quiet import quiet
from ..settings import option
from ..signature import FlatModule, Signature
from ..target import Target
from .base import Backend, Engine, Optimized, Spec

MODEL_FILE = "model.pt2"
META_FILE = "aoti.json"   # the CPU the kernels were built for, and size limits export found


@dataclass(frozen=True)
class InductorSettings:
    wrapper_opt_level: str = option("O0", "C++ optimization level of the host-side wrapper, which only sequences "
                                          "kernel calls; the generated kernels are always built at -O3. O0 compiles "
                                          "about a second faster per model", choices=("O0", "O1", "O2", "O3"))


class InductorBackend(Backend):
    name = "inductor"
    routes = ("torch-export",)
    bound_libraries = ("torch",)
    Settings = InductorSettings

    def setup_reason(self, target: Target) -> str | None:
        compilers = cxx_candidates()
        if not any(shutil.which(c) for c in compilers):
            return (f"AOTInductor compiles C++ with {' or '.join(compilers)}, and none is on PATH: install a C++ "
                    "compiler with OpenMP (Debian/Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++), "
                    "or point the CXX environment variable at one")
        return None

    def lower(self, route: str, module: FlatModule, examples: Sequence[Any], spec: Spec) -> Lowered:
        if route != "torch-export":
            raise ValueError(f"unknown inductor route {route!r}")
        # the compiled kernels index inputs with the examples' strides; engines pass contiguous inputs
        examples = tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in examples)
        exported, notes = export_program(module, examples, spec.signature)
        nodes = sum(1 for n in exported.graph.nodes if n.op == "call_function")
        return Lowered(route=route, model=_Exported(exported, notes, narrowed_dims(exported, spec.signature)), nodes=nodes)

    def optimize(self, lowered: Lowered, spec: Spec, calibration) -> Optimized:
        return Optimized(lowered, notes=list(lowered.model.notes))

    def build(self, optimized: Optimized, spec: Spec) -> Engine:
        # the package outlives the build's scratch directory: it is the engine's file until saved
        program = optimized.lowered.model.program
        shares = may_share(program)
        workdir = Path(tempfile.mkdtemp(prefix="compilers-aoti-"))
        path = workdir / MODEL_FILE
        configs = {"aot_inductor.compile_wrapper_opt_level": spec.settings.wrapper_opt_level}
        try:
            with quiet():
                torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
        except BaseException as e:       # an interrupted build leaves no scratch directory behind either
            shutil.rmtree(workdir, ignore_errors=True)
            if not isinstance(e, Exception):
                raise
            first = next((l for l in str(e).splitlines() if l.strip()), "")
            raise CompilerError(f"AOTInductor could not compile the exported program: {type(e).__name__}: "
                                f"{first[:500]}. Try the torchscript-cpu or ort-cpu target") from e
        meta = {"isa": cpu_isa(), "bounds": optimized.lowered.model.bounds,
                "may_share": None if shares is None else sorted(shares)}
        return InductorEngine(path, meta, workdir)

    def load(self, spec: Spec) -> Engine:
        directory = spec.workdir
        try:
            meta = json.loads((directory / META_FILE).read_text())
            built_isa = meta["isa"]
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{directory}: {META_FILE} is missing or unreadable ({e}); recompile the model") from None
        missing = missing_isa(built_isa, cpu_isa())
        if missing:
            raise ArtifactError(f"{directory} was compiled by AOTInductor for a CPU with {missing}, which this CPU "
                                "lacks; its kernels would crash here. Recompile the model on this machine")
        return InductorEngine(directory / MODEL_FILE, meta)


@dataclass
class _Exported:
    """What lower hands on: the ExportedProgram, notes for the report, and the dims export narrowed."""

    program: Any
    notes: list[str]
    bounds: list[list[Any]]


def export_program(module: torch.nn.Module, examples: tuple, signature: Signature) -> tuple[Any, list[str]]:
    """torch.export with the signature's dynamic dims. When the model's code only supports part of a dim's
    range (BERT: seq <= max_position_embeddings), export again with the range torch.export suggests, and
    say so; when it pins a dynamic dim to one size (nn.LSTM's sequence length), fail with what to do."""
    _, per_input = export_dims(signature)
    try:
        return torch.export.export(module, examples, dynamic_shapes=(per_input,)), []
    except Exception as e:
        msg = getattr(e, "msg", str(e))
        if "Suggested fixes:" not in msg:
            raise
        fixes = [l.strip() for l in msg.split("Suggested fixes:")[1].strip().split("\n\n")[0].splitlines() if " = " in l]
        pinned = [f for f in fixes if re.fullmatch(r"\w+ = -?\d+", f)]
        if pinned:
            raise ValueError(f"torch.export pins dynamic dim(s) to one size for this model's code ({'; '.join(pinned)}); "
                             "declare them static in dynamic_shapes, or use a target whose lowering keeps them "
                             "dynamic (torchscript-cpu, ort-cpu)") from None
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
        refined = refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + "\n".join(fixes), (per_input,))
        program = torch.export.export(module, examples, dynamic_shapes=refined)
        return program, [f"torch.export narrowed dynamic dims to what the model's code supports: {'; '.join(fixes)}; "
                         "other sizes raise InputError"]


def narrowed_dims(program: Any, signature: Signature) -> list[list[Any]]:
    """[input index, input name, axis, lo, hi (None = unbounded)] for each input dim whose exported range is
    narrower than the signature's: the compiled kernels do not check sizes, so the engine must."""
    from torch.utils._sympy.numbers import int_oo
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    bounds = []
    for i, (node, spec) in enumerate(zip(placeholders, signature.inputs)):
        for axis, (size, dim) in enumerate(zip(node.meta["val"].shape, spec.shape)):
            if not isinstance(size, torch.SymInt) or not isinstance(dim, str):
                continue
            vr = program.range_constraints.get(size.node.expr)
            if vr is None:
                continue
            want = signature.dims[dim]
            lo, hi = max(int(vr.lower), want.min), (None if vr.upper == int_oo else int(vr.upper))
            if lo > want.min or (hi is not None and (want.max is None or hi < want.max)):
                bounds.append([i, spec.name, axis, lo, hi])
    return bounds


def may_share(program: Any) -> frozenset[int] | None:
    """The outputs the compiled program may return as an input, a view of one, or another output's memory (one
    tensor returned twice). Not its constants: AOTInductor's generated code returns a copy of a constant (or of a
    view of one) that is a graph output (torch._inductor.codegen.cpp_wrapper_cpu: generate_return,
    NOTE(return_constant)), and Inductor's passes add no aliasing between inputs and outputs nor between outputs
    (torch._inductor.fx_passes.post_grad: remove_noop_ops). None under inductor's freezing, whose
    common-subexpression pass may turn two equal outputs into one."""
    from torch._inductor import config
    if config.freezing:
        return None
    return program_outputs(program, held_copied=True)


def cxx_candidates() -> list[str]:
    """The C++ compilers inductor tries, in order (torch._inductor.config.cpp.cxx; it honours $CXX)."""
    from torch._inductor import config
    cxx = config.cpp.cxx
    return [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]


def missing_isa(built: str, here: str) -> str:
    """What the CPU the package was built for has and this one lacks ("" if this one can run it)."""
    built_arch, _, built_flags = built.partition(":")
    arch, _, flags = here.partition(":")
    if built_arch != arch:
        return f"architecture {built_arch} (this one is {arch})"
    lacking = sorted(set(built_flags.split(",")) - set(flags.split(",")) - {""})
    return ", ".join(lacking)


class InductorEngine(Engine):
    """An AOTInductor package's model container (it serializes concurrent calls itself)."""

    array_kind = "torch"

    def __init__(self, path: Path, meta: dict[str, Any], workdir: Path | None = None):
        self.path = path
        self.meta = meta
        if workdir is not None:  # the build's own package file: removed with the engine
            weakref.finalize(self, shutil.rmtree, workdir, True)
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.info = describe_package(path)

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        for i, name, axis, lo, hi in self.meta.get("bounds", ()):
            size = inputs[i].shape[axis]
            if size < lo or (hi is not None and size > hi):
                raise InputError(f"input {name!r}: size {size} of dim {axis} lies outside {lo}..{hi if hi is not None else 'inf'}, "
                                 "the sizes this AOTInductor build supports (torch.export narrowed the range to what "
                                 "the model's code handles)")
        # The kernels assume contiguous inputs and do not check: a transposed view would be read wrongly.
        with torch.no_grad():   # not inference_mode: outputs must take in-place ops and autograd as eager's do
            return list(self.runner(*[x.contiguous() for x in inputs]))

    def raw_call(self, inputs: Sequence[Any]) -> Callable[[], Any]:
        runner, inputs = self.runner, [x.contiguous() for x in inputs]

        def raw() -> Any:
            with torch.no_grad():
                return runner(*inputs)
        return raw

    def may_share(self) -> frozenset[int] | None:
        """Found from the exported program when built (`may_share`, saved in aoti.json); None for a package saved
        before it was."""
        found = self.meta.get("may_share")
        return None if found is None else frozenset(found)

    def constants(self) -> list[Any]:
        """None that run() returns (`may_share`)."""
        return []

    def save(self, directory: Path) -> None:
        if not self.path.is_file():
            raise ArtifactError(f"the package {self.path} this model was loaded from is gone; load it again or recompile")
        shutil.copyfile(self.path, directory / MODEL_FILE)
        (directory / META_FILE).write_text(json.dumps(self.meta))

    def describe(self) -> dict[str, Any]:
        return self.info


_KERNEL = re.compile(r'extern "C"\s+void\s+(cpp_fused_\w+?)_\d+\(')
_EXTERN = re.compile(r"\baoti_torch_cpu_(\w+)\(")


def describe_package(path: Path) -> dict[str, Any]:
    """Kernels of an AOTInductor package, read from the C++ it ships: generated (fused) kernels and calls
    into torch's own kernels (matmuls, attention, ...). Empty where the package holds no sources."""
    try:
        with zipfile.ZipFile(path) as z:
            sources = {n: z.read(n).decode(errors="replace") for n in z.namelist()
                       if n.endswith((".kernel.cpp", ".wrapper.cpp"))}
    except (OSError, zipfile.BadZipFile):
        return {}
    kernels = collections.Counter(m for n, text in sources.items() if n.endswith(".kernel.cpp")
                                  for m in _KERNEL.findall(text))
    extern = collections.Counter(m for n, text in sources.items() if n.endswith(".wrapper.cpp")
                                 for m in _EXTERN.findall(text))
    if not kernels and not extern:
        return {}
    return {"nodes": sum(kernels.values()) + sum(extern.values()),
            "fused": {"cpp_fused": sum(kernels.values())} if kernels else {},
            "kernels": dict(kernels), "extern": dict(extern)}
