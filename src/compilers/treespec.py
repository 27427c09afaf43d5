"""Saving pytree structures (TreeSpecs) as JSON, so a loaded artifact rebuilds the model's output types.

torch's `treespec_dumps` handles registered containers (dict, list, tuple, HF ModelOutput); namedtuples
and structseqs such as `torch.return_types.topk` get a `module.qualname` serialization name here.
"""
from __future__ import annotations

import collections
import importlib
import json
from typing import Any, Mapping

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


def loads(schema: Any) -> pytree.TreeSpec:
    """treespec_loads, first importing the container types it names (a transformers ModelOutput, a namedtuple)."""
    def names(node: Mapping[str, Any]):
        yield node["type"]
        if node["type"] == "collections.namedtuple":
            yield node["context"]
        for child in node["children_spec"]:
            yield from names(child)

    for name in set(names(schema[1])) - {None} - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE):
        cls = _import_type(name)
        if _is_tuple_type(cls):
            _name_tuple_type(cls)
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise ArtifactError(f"the output type {name} cannot be rebuilt: it is not a registered pytree node "
                             "after importing its module; import the code that registers it before loading")
    return pytree.treespec_loads(json.dumps(schema))


def _import_type(name: str) -> Any:
    """The object a dotted `module.Qual.Name` names, importing the longest importable module prefix."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    raise ArtifactError(f"the output type {name} cannot be rebuilt: install the package that defines it")
