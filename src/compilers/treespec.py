"""Saving pytree structures (TreeSpecs) as JSON, so a loaded artifact rebuilds the model's output types.

torch's `treespec_dumps` handles registered containers (dict, list, tuple, HF ModelOutput); namedtuples
and structseqs such as `torch.return_types.topk` get a `module.qualname` serialization name here.
"""
from __future__ import annotations

import collections
import importlib
import inspect
import json
import re
import sys
from typing import Any, Mapping

import torch
from torch.utils import _pytree as pytree

from .errors import ArtifactError


def dumps(spec: pytree.TreeSpec) -> Any:
    """A JSON-able form of `spec`; ArtifactError when a container type has no serialization name."""
    _name_tuple_types(spec)
    try:
        return json.loads(pytree.treespec_dumps(spec))
    except (NotImplementedError, TypeError) as e:
        raise ArtifactError(f"the structure {spec} cannot be saved: {e} Register the container type with "
                            "torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)") from None


def _is_tuple_type(cls: Any) -> bool:
    """A namedtuple class, or a structseq such as torch.return_types.topk (what torch.topk/max/sort return)."""
    return isinstance(cls, type) and issubclass(cls, tuple) and (hasattr(cls, "_fields") or hasattr(cls, "n_fields"))


def _name_tuple_type(cls: type) -> str:
    """Give a tuple type the serialization name that pytree leaves unset for namedtuples and structseqs."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    known = pytree.SUPPORTED_SERIALIZED_TYPES.get(cls)
    if known is None or known.serialized_type_name == pytree.NO_SERIALIZED_TYPE_NAME_FOUND:
        pytree.SUPPORTED_SERIALIZED_TYPES[cls] = pytree._SerializeNodeDef(cls, name, None, None)
        pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name] = cls
    return name


def _name_tuple_types(spec: pytree.TreeSpec) -> None:
    if spec.is_leaf():
        return
    cls = spec.context if spec.type is collections.namedtuple else spec.type
    if _is_tuple_type(cls):
        _name_tuple_type(cls)
    for child in spec.children() if hasattr(spec, "children") else spec.children_specs:
        _name_tuple_types(child)


# Modules whose container types `loads` may import itself: the output classes of an installed transformers
# (ModelOutput subclasses register themselves as pytree nodes when their module is imported). These are
# fixed patterns of this library, checked against the name; any other module must already be imported.
_IMPORTABLE = re.compile(r"transformers\.(modeling_outputs|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)")


def loads(schema: Any) -> pytree.TreeSpec:
    """treespec_loads for a saved schema, never importing a module a name in it asks for.

    A container type is rebuilt when it is registered with pytree (builtins, and the types of code already
    imported, which registers them), a namedtuple or structseq of a module that is already imported (found
    without running anything), or a transformers ModelOutput (its fixed modules are imported from the
    installed transformers). Anything else is an ArtifactError, with nothing imported: a manifest must not
    choose code to run."""
    try:
        wanted = set(_names(schema[1])) - {None}
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ArtifactError(f"the saved output structure is malformed ({type(e).__name__}: {e}); re-save the artifact") from None
    for name in sorted(wanted - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)):
        if not isinstance(name, str):
            raise ArtifactError(f"the saved output structure names a type {name!r} that is not a name; re-save the artifact")
        _resolve(name)
    try:
        return pytree.treespec_loads(json.dumps(schema))
    except Exception as e:      # a schema this torch cannot read: a wrong shape, an unknown protocol
        raise ArtifactError(f"the saved output structure cannot be read by torch {torch.__version__} "
                            f"({type(e).__name__}: {e}); re-save the artifact with this torch") from None


def _names(node: Mapping[str, Any]):
    yield node["type"]
    if node["type"] == "collections.namedtuple":
        yield node["context"]
    for child in node["children_spec"]:
        yield from _names(child)


def _resolve(name: str) -> None:
    """Register the container type `name` for treespec_loads, or raise ArtifactError; imports no module but
    the fixed transformers ones of _IMPORTABLE."""
    module_name, _, _ = name.rpartition(".")
    if _IMPORTABLE.fullmatch(module_name) and module_name not in sys.modules:
        try:
            importlib.import_module(module_name)
        except ImportError:
            raise ArtifactError(f"the output type {name} cannot be rebuilt: install transformers (it defines "
                                "it) before loading") from None
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            return
    cls = _imported(name)
    if _is_tuple_type(cls):
        _name_tuple_type(cls)
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        raise ArtifactError(f"the output type {name} cannot be rebuilt: it is not a container type this process "
                            "knows. load() never imports modules named in an artifact; import (and register with "
                            "torch.utils._pytree) the code you trust that defines it, then load again")


def _imported(name: str) -> Any:
    """The object a dotted `module.Qual.Name` names in a module that is already imported, else None. Looks
    in the modules' and classes' own dicts, so no module __getattr__ (lazy import) runs."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:cut]))
        if obj is None:
            continue
        for attr in parts[cut:]:
            obj = inspect.getattr_static(obj, attr, None)
        return obj
    return None
