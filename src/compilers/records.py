"""Dataclass records read back from JSON (an artifact's manifest, a cache entry), checked field by field.

A manifest is input like any other: `from_json(Report, data, "report")` gives a Report whose every field has
its declared type, or a ValueError naming the field (`report.validation.outputs[0].error: expected a number,
got 'x'`), instead of a record that fails later, far from the file, when it is printed or used."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def from_json(hint: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) checked against the type `hint` and converted: lists to tuples, objects to
    dataclasses, integers to floats. Keys a dataclass does not have are ignored (another version's fields);
    missing ones take their defaults. ValueError naming `where` when `value` does not fit."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return from_json(options[0], value, where)
        for option in options:
            try:
                return from_json(option, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {_short(value)} is none of {hint}")
    if dataclasses.is_dataclass(hint):
        return _record(hint, value, where)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {_short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [from_json(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list or hint is list else tuple(items)
    if origin in (dict, typing.Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {_short(value)}")
        key, item = args if args else (Any, Any)
        return {from_json(key, k, f"{where} key"): from_json(item, v, f"{where}[{k!r}]") for k, v in value.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool, type(None)):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"from_json cannot read type {hint!r}")      # a field type this reader does not know
    raise ValueError(f"{where}: expected {_NAMES[hint]}, got {_short(value)}")


def _record(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {_short(value)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in value:
            kwargs[f.name] = from_json(hints[f.name], value[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: '{f.name}' is missing")
    try:
        return cls(**kwargs)
    except Exception as e:        # the record's own checks (__post_init__)
        raise ValueError(f"{where}: {e}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
