"""The cache in `cache_dir`, behind one object: builds with the eager outputs on the example of the model each
was made from, eager References (outputs on the validation samples), the marks left once eager ran over
calibration data, and auto targets' choices.

Every entry is keyed on the model's `fingerprint`: what it computes, as far as Python can see it (every
module's parameters, buffers, plain tensor attributes and other Python attributes, hooks, torch's global
forward hooks, the code of its classes with the globals that code reads), plus what else decides the entry
(signature, target, library versions, CPU ISA, the data's digest). A cache hit is still validated against
eager, or without validation its stored eager outputs on the example are compared with those of the eager run
compile makes anyway, and the cached References are checked against that run too: an entry that disagrees is
rebuilt, never served. What the cache cannot protect against: whoever can write the cache directory can change what
compile returns, as with any build cache (keep it private, like a build directory).
"""
from __future__ import annotations

import enum
import functools
import hashlib
import json
import logging
import re
import sys
import types
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .calibration import update_with_array
from .errors import ArtifactError
from .files import remove, replacing, write_text
from .host import cpu_isa
from .reference import Reference
from .runtime import CompiledModel, load
from .signature import Signature
from .target import Auto, Target

log = logging.getLogger("compilers")

#: Python objects a fingerprint walks at most (a model holding a whole dataset is not hashed object by object);
#: the parameters, buffers and tensor attributes of every module are hashed whatever this budget
MAX_OBJECTS = 200_000
#: the layout of a cached Reference: references of another layout are remade (2: the perturbed-rounding outputs)
REFERENCE_FORMAT = 2
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class Cache:
    """One cache directory. Each entry's key is the model's fingerprint (computed once per compile) and the
    rest of what decides it; entries are written atomically and one that cannot be read is remade."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    # -- builds --------------------------------------------------------------------------------------
    def build_path(self, fingerprint: str, signature: Signature, target: Target, versions: dict[str, str],
                   calibration_digest: str | None = None) -> Path:
        """Where the build of `target` for the model with `fingerprint` lives: keyed also on the signature,
        target, library versions, CPU ISA and the calibration data's digest where the build uses it."""
        key = _key(fingerprint, {"signature": signature.to_dict(), "target": target.to_dict(), "versions": versions,
                                 "isa": cpu_isa(), "calibration": calibration_digest})
        return self.directory / f"{target.name}-{key[:24]}"

    def load_build(self, path: Path) -> CompiledModel | None:
        """The build at `path` (report.cache = "hit"), or None when there is none or it fails its integrity
        check (it is then rebuilt over)."""
        if not path.is_dir():
            return None
        try:
            cm = load(path)
        except ArtifactError as e:
            log.warning("cache entry %s is unusable (%s); rebuilding", path, e)
            return None
        cm.report.cache = "hit"
        cm.report.seconds = {}
        return cm

    def save_build(self, path: Path, cm: CompiledModel, example_outputs: Sequence[torch.Tensor]) -> None:
        """Save the build with the eager outputs on the example of the model it was made from."""
        self._save_example_outputs(path, example_outputs)
        cm.save(path)

    def drop_build(self, path: Path) -> None:
        """Remove a build that failed its check against eager, so no later compile finds it."""
        remove(path)
        self._example_outputs_path(path).unlink(missing_ok=True)

    def example_outputs(self, path: Path) -> list[torch.Tensor] | None:
        """The eager outputs on the example of the model the build at `path` was made from, or None when there
        are none (an entry made before they were kept, or a file that cannot be read)."""
        where = self._example_outputs_path(path)
        if not where.is_file():
            return None
        try:
            outputs = torch.load(where, weights_only=True)
            if not isinstance(outputs, list) or not all(isinstance(t, torch.Tensor) for t in outputs):
                raise ValueError("not a list of tensors")
            return outputs
        except Exception as e:
            log.warning("cached eager outputs %s are unusable (%s)", where, e)
            return None

    def keep_example_outputs(self, path: Path, outputs: Sequence[torch.Tensor]) -> None:
        """Store `outputs` as the build's eager outputs on the example where none are stored (a build made
        before they were kept, since validated against this model)."""
        if not self._example_outputs_path(path).is_file():
            self._save_example_outputs(path, outputs)

    def _save_example_outputs(self, path: Path, outputs: Sequence[torch.Tensor]) -> None:
        with replacing(self._example_outputs_path(path)) as tmp:
            torch.save([t.detach().cpu() for t in outputs], tmp)

    def _example_outputs_path(self, path: Path) -> Path:
        return self.directory / "example-outputs" / f"{path.name}.pt"

    # -- references ----------------------------------------------------------------------------------
    def reference_path(self, fingerprint: str, signature: Signature, labels: Sequence[str],
                       samples: Sequence[Sequence[Any]], float64: bool) -> Path:
        """Where the Reference of the model on these samples is kept: keyed also on the signature, the
        samples' bytes, whether float64 outputs are in it, and torch's version."""
        h = hashlib.sha256()
        for flat in samples:
            for x in flat:
                update_with_array(h, x) if isinstance(x, torch.Tensor) else h.update(repr(x).encode())
        key = _key(fingerprint, {"signature": signature.to_dict(), "labels": list(labels), "samples": h.hexdigest(),
                                 "float64": float64, "torch": torch.__version__, "format": REFERENCE_FORMAT})
        return self.directory / "references" / f"{key[:32]}.pt"

    def load_reference(self, path: Path) -> Reference | None:
        """The cached Reference at `path`, or None when there is none (or it cannot be read: it is remade)."""
        if not path.is_file():
            return None
        try:
            reference = Reference(**torch.load(path, weights_only=True))
            return replace(reference, note=f"{reference.note}, read from the cache")
        except Exception as e:
            log.warning("cached reference %s is unusable (%s); running eager again", path, e)
            return None

    def save_reference(self, path: Path, reference: Reference) -> None:
        """Write `reference` (without its metric: the user's function is not data) atomically to `path`."""
        with replacing(path) as tmp:
            torch.save({f.name: getattr(reference, f.name) for f in fields(reference) if f.name != "metric"}, tmp)

    # -- calibration checks --------------------------------------------------------------------------
    def _calibration_mark(self, fingerprint: str, signature: Signature, digest: str) -> Path:
        key = _key(fingerprint, {"signature": signature.to_dict(), "calibration": digest, "torch": torch.__version__})
        return self.directory / "references" / f"calibration-{key[:32]}.ok"

    def calibration_checked(self, fingerprint: str, signature: Signature, digest: str) -> bool:
        """Whether eager already ran on every sample of the calibration data with `digest`."""
        return self._calibration_mark(fingerprint, signature, digest).is_file()

    def mark_calibration_checked(self, fingerprint: str, signature: Signature, digest: str) -> None:
        write_text(self._calibration_mark(fingerprint, signature, digest), "")

    # -- auto choices --------------------------------------------------------------------------------
    def choice_path(self, fingerprint: str, auto: Auto, example: dict[str, Any], versions: dict[str, str],
                    data_digests: dict[str, str | None]) -> Path:
        """Where the choice of `auto` for the model is kept: keyed also on the example's structure, dtypes and
        shapes with the dynamic dims (`example`), the auto descriptor and each candidate's content, the
        calibration and validation data's digests, library versions and CPU ISA."""
        described = auto.to_dict()     # the candidates by content, not by where their files lie
        described["auto"] = {k: v for k, v in described["auto"].items() if k != "candidates"}
        key = _key(fingerprint, {"example": example, "auto": described, "versions": versions, "isa": cpu_isa(),
                                 "data": data_digests})
        return self.directory / "auto" / f"{auto.name}-{key[:32]}.json"

    def load_choice(self, path: Path) -> dict[str, Any] | None:
        """The stored auto choice at `path`, or None when there is none (or it cannot be read: it is remade)."""
        if not path.is_file():
            return None
        try:
            choice = json.loads(path.read_text())
            if not isinstance(choice.get("chosen"), str) or not isinstance(choice.get("candidates"), list):
                raise ValueError("no 'chosen' target or 'candidates' table")
            return choice
        except (OSError, ValueError, AttributeError) as e:
            log.warning("cached auto choice %s is unusable (%s); choosing again", path, e)
            return None

    def save_choice(self, path: Path, choice: dict[str, Any]) -> None:
        """Write the auto choice (JSON) atomically to `path`."""
        write_text(path, json.dumps(choice, indent=1))


def _key(fingerprint: str, meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**meta, "model": fingerprint}, sort_keys=True, default=str).encode()).hexdigest()


# -- what a model computes -------------------------------------------------------------------------------
def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over everything in `model` that can change what it computes, as far as Python can see it: each
    module's type with the code of its class (bytecode, constants and the globals it reads, so no source file
    is needed), its parameters and buffers (names, dtypes, shapes, bytes), and every other attribute (numbers,
    strings, flags, plain tensors, containers and objects holding them, hooks and other functions with their
    closures and defaults), and torch's global forward hooks. Every module's parameters, buffers and tensor
    attributes are hashed; the other Python objects, up to MAX_OBJECTS of them. Code of installed packages
    (transformers, torch) enters by the package's version. Memory addresses never enter it, so the same model
    gives the same fingerprint in another process."""
    walker = _Walker()
    walker.feed(f"packages {sorted(_packages(model).items())};")
    walker.feed("global forward hooks:")
    walker.walk(_global_forward_hooks())
    for name, module in model.named_modules(remove_duplicate=False):
        walker.feed(f"module {name}:")
        walker.walk(module)
    return walker.h.hexdigest()


def _global_forward_hooks() -> list[Any]:
    """The hooks `torch.nn.modules.module.register_module_forward_(pre_)hook` installed for every module, in
    the order they run, each with how it is called."""
    m = torch.nn.modules.module
    return [list(m._global_forward_pre_hooks.values()),
            [(hook, handle in m._global_forward_hooks_with_kwargs, handle in m._global_forward_hooks_always_called)
             for handle, hook in m._global_forward_hooks.items()]]


class _Walker:
    """Feeds a deterministic encoding of Python objects to a sha256."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}      # id -> order first seen: cycles and shared objects by reference
        self.keep: list[Any] = []           # what `seen` refers to, alive until the walk ends (ids stay unique)
        self.count = 0
        self.modules: set[tuple[int, tuple[str, ...]]] = set()     # (module, names) followed from code

    def feed(self, text: str) -> None:
        self.h.update(text.encode("utf-8", "backslashreplace"))

    def walk(self, x: Any, depth: int = 0) -> None:
        self.count += 1
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                       torch.Size, enum.Enum, np.dtype, range, slice)):
            self.feed(f"{type(x).__name__}:{x!r};")
            return
        if isinstance(x, (torch.Tensor, np.ndarray)):
            self.feed("tensor:" if isinstance(x, torch.Tensor) else "array:")
            if isinstance(x, torch.Tensor) and (x.is_meta or x.layout is not torch.strided):
                self.feed(f"{x.dtype}{tuple(x.shape)}{x.layout};")
            else:
                update_with_array(self.h, x)
            return
        if id(x) in self.seen:
            self.feed(f"ref {self.seen[id(x)]};")
            return
        self.seen[id(x)] = len(self.seen)
        self.keep.append(x)
        bounded = self.count > MAX_OBJECTS or depth > 64
        if isinstance(x, torch.nn.Module):
            self._module(x, depth, bounded)
        elif bounded:
            self.feed(f"{_qualname(type(x))}:…;")       # the bounded rest: the eager checks still judge it
        elif isinstance(x, (list, tuple)):
            self.feed(f"{type(x).__name__}[{len(x)}](")
            for v in x:
                self.walk(v, depth + 1)
            self.feed(")")
        elif isinstance(x, dict):
            self.feed(f"{type(x).__name__}{{{len(x)}}}(")
            for k, v in _sorted_items(x):
                self.walk(k, depth + 1)
                self.walk(v, depth + 1)
            self.feed(")")
        elif isinstance(x, (set, frozenset)):
            self.feed(f"set[{len(x)}]({sorted(_ADDRESS.sub('', repr(v)) for v in x)})")
        elif isinstance(x, (types.FunctionType, types.MethodType, functools.partial)):
            self._function(x, depth)
        elif isinstance(x, type):
            self._class(x, depth)
        elif isinstance(x, (types.ModuleType, types.BuiltinFunctionType)) or callable(x) and not hasattr(x, "__dict__"):
            self.feed(f"{type(x).__name__}:{_qualname(x)};")
        else:
            self.feed(f"object {_qualname(type(x))}(")
            state = getattr(x, "__dict__", None)
            if state is not None:
                self.walk(dict(state), depth + 1)
            for slot in _slots(type(x)):
                if hasattr(x, slot):
                    self.walk(slot, depth + 1)
                    self.walk(getattr(x, slot), depth + 1)
            if state is None and not _slots(type(x)):
                self.feed(_ADDRESS.sub("", repr(x))[:1000])
            self.feed(")")

    def _module(self, m: torch.nn.Module, depth: int, bounded: bool) -> None:
        """A module's class code, its parameters, buffers and tensor attributes by name, its other attributes
        (hooks included); its submodules by name only: `fingerprint` walks each of them itself. Past the
        walk's bounds, its tensors only (they are hashed whatever the budget)."""
        self.feed(f"nn.Module {_qualname(type(m))}(")
        if not bounded:
            self._class(type(m), depth)
        for key, value in sorted(vars(m).items()):
            if key == "_modules":
                self.feed(f"children {[(n, _qualname(type(c))) for n, c in value.items()]};")
            elif key in ("_parameters", "_buffers"):
                for name, t in value.items():
                    self.feed(f"{key} {name} {'frozen' if t is not None and not t.requires_grad else ''}:")
                    self.walk(None if t is None else t.detach(), depth + 1)
            elif bounded:
                if isinstance(value, torch.Tensor):
                    self.feed(f"{key}=")
                    self.walk(value, depth + 1)
            elif "hooks" in key and isinstance(value, dict):      # keyed by handle ids, which vary by process
                self.feed(f"{key}=")
                self.walk(list(value.values()), depth + 1)
            elif key != "training":          # compile always runs and builds the eval-mode model
                self.feed(f"{key}=")
                self.walk(value, depth + 1)
        self.feed("…)" if bounded else ")")

    def _class(self, cls: type, depth: int) -> None:
        """A class by name and the code of the functions its own namespace and its bases' define (below
        torch's and Python's own classes, whose code the library versions pin)."""
        self.feed(f"class {_qualname(cls)}:")
        for klass in cls.__mro__:
            if _library(klass.__module__):
                continue
            for name, value in sorted(vars(klass).items()):
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if isinstance(value, property):
                    value = value.fget
                if isinstance(value, types.FunctionType):
                    self.feed(f"def {klass.__qualname__}.{name}:")
                    self._function(value, depth + 1)
                elif not name.startswith("__") and not callable(value):
                    self.feed(f"{klass.__qualname__}.{name}=")     # class attributes (a constant, a table)
                    self.walk(value, depth + 1)

    def _function(self, f: Any, depth: int) -> None:
        if isinstance(f, functools.partial):
            self.feed("partial(")
            self.walk(f.func, depth + 1)
            self.walk(f.args, depth + 1)
            self.walk(f.keywords, depth + 1)
            self.feed(")")
            return
        if isinstance(f, types.MethodType):
            self.feed("method(")
            self._function(f.__func__, depth + 1)
            if _followed(f.__self__):
                self.feed("bound to ")
                self.walk(f.__self__, depth + 1)        # a reference where the object was walked already
                self.feed(")")
            else:
                self.feed(f"bound to {_qualname(type(f.__self__))})")
            return
        if _library(getattr(f, "__module__", "") or ""):
            self.feed(f"function {_qualname(f)};")
            return
        self.feed(f"function {_qualname(f)}(")
        self._code(f.__code__, f.__globals__, depth)
        self.walk(f.__defaults__, depth + 1)
        self.walk(f.__kwdefaults__, depth + 1)
        for cell in f.__closure__ or ():
            try:
                self.walk(cell.cell_contents, depth + 1)
            except ValueError:         # an empty cell
                self.feed("empty cell;")
        self.feed(")")

    def _code(self, code: types.CodeType, globals_: dict[str, Any], depth: int) -> None:
        """Bytecode, constants (nested code too) and the globals it reads (`_followed`)."""
        self.h.update(code.co_code)
        self.feed(f"names {code.co_names};")
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self._code(const, globals_, depth)
            else:
                self.walk(const, depth + 1)
        for name in code.co_names:
            self._global(name, globals_.get(name, _MISSING), code.co_names, depth)

    def _global(self, name: str, value: Any, names: tuple[str, ...], depth: int) -> None:
        """A global the code reads, when it is `_followed`; of a module of the user's own code, the attributes
        the code can reach (`module.attribute`: the attribute's name is among the code's `names`)."""
        if isinstance(value, types.ModuleType):
            if _library(value.__name__) or (id(value), names) in self.modules:
                return
            self.modules.add((id(value), names))
            self.keep.append(value)
            attributes = vars(value)
            for attribute in names:
                if attribute in attributes:
                    self._global(f"{name}.{attribute}", attributes[attribute], names, depth)
        elif _followed(value):
            self.feed(f"global {name}=")
            self.walk(value, depth + 1)


_MISSING = object()
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, enum.Enum,
            np.dtype, torch.Tensor, np.ndarray)


def _followed(x: Any) -> bool:
    """A global the fingerprint follows: data (`_data`), functions, torch modules, the classes of the user's own
    code and their instances (a config object), and objects that hold only data (a SimpleNamespace); not a
    logger, a lock, an imported module or a library's class, whose code the library's version pins and whose
    state is no part of what the model computes."""
    if x is _MISSING:
        return False
    if _data(x) or isinstance(x, (types.FunctionType, types.MethodType, functools.partial, torch.nn.Module)):
        return True
    if isinstance(x, type):
        return _users(x)
    if isinstance(x, types.ModuleType):
        return False
    if _users(type(x)):
        return True
    state = getattr(x, "__dict__", None)
    return isinstance(state, dict) and _data(dict(state))


def _data(x: Any, depth: int = 0) -> bool:
    """Plain data: numbers, strings, tensors, and containers holding only those."""
    if isinstance(x, _SCALARS):
        return True
    if depth < 3 and isinstance(x, (list, tuple, set, frozenset)) and len(x) <= 10_000:
        return all(_data(v, depth + 1) for v in x)
    if depth < 3 and isinstance(x, dict) and len(x) <= 10_000:
        return all(_data(k, depth + 1) and _data(v, depth + 1) for k, v in x.items())
    return False


def _users(cls: type) -> bool:
    """Whether `cls` is defined in the user's own code, neither Python's nor an installed package's."""
    module = getattr(cls, "__module__", None)
    return isinstance(module, str) and bool(module) and not _library(module)


@functools.lru_cache(maxsize=None)
def _library(module: str) -> bool:
    """Code of Python itself or of an installed package (torch, numpy, transformers...): the package's version
    (`_packages`, and the library versions in every key) pins it, so it is named, not walked."""
    root = module.split(".")[0]
    if root in sys.stdlib_module_names or root in ("torch", "numpy", "builtins"):
        return True
    file = getattr(sys.modules.get(root), "__file__", None) or ""
    return any(part in ("site-packages", "dist-packages") for part in Path(file).parts)


def _packages(model: torch.nn.Module) -> dict[str, str]:
    """The version of each installed package that defines a module class of `model`."""
    found = {}
    for m in model.modules():
        root = type(m).__module__.split(".")[0]
        if _library(type(m).__module__) and root not in found:
            found[root] = str(getattr(sys.modules.get(root), "__version__", "unknown"))
    return found


def _qualname(x: Any) -> str:
    return f"{getattr(x, '__module__', '') or ''}.{getattr(x, '__qualname__', getattr(x, '__name__', type(x).__name__))}"


def _slots(cls: type) -> list[str]:
    return [s for klass in cls.__mro__ for s in getattr(klass, "__slots__", ()) if isinstance(s, str)
            and s not in ("__dict__", "__weakref__")]


def _sorted_items(d: dict) -> list[tuple[Any, Any]]:
    try:
        return sorted(d.items())
    except TypeError:           # keys of mixed types
        return sorted(d.items(), key=lambda kv: f"{type(kv[0]).__name__}:{kv[0]!r}")
