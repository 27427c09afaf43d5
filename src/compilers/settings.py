"""Typed backend settings: a descriptor's `[options]` table, checked once against a backend's dataclass.

Each backend declares a frozen dataclass whose fields are its options (`option(default, doc, ...)`):
defaults live there and nowhere else, and every stage receives the parsed instance instead of reading
`target.options` with a default of its own.

    @dataclass(frozen=True)
    class Settings:
        threads: int = option(0, "intra-op threads; 0 = all cores", minimum=0)
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from .errors import TargetError

MAX_THREADS = 1024    # a thread count above this is a typo (ORT would try to start them all), not a setting
_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", str: "strings"}


def option(default: Any, doc: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, runtime: bool = False) -> Any:
    """A settings field: its default, what it does, and the values it accepts. A `runtime` option changes how
    the engine runs (threads, streams), not what was compiled: it may be changed when an artifact is loaded."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices, "minimum": minimum,
                                                        "maximum": maximum, "runtime": runtime})


def runtime_options(cls: type) -> list[str]:
    """The names of a settings class's runtime options."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime")]


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """A backend without options."""


def parse(cls: type, options: Mapping[str, Any], where: str, error: type[Exception] = TargetError) -> Any:
    """`cls(**options)` with every key, type, choice and bound checked; `error` (TargetError) saying what is allowed."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise error(f"{where}: unknown option(s) {unknown}; known: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in options.items():
        meta, want = fields[name].metadata, hints[name]
        if typing.get_origin(want) is tuple:    # tuple[str, ...] / tuple[int, ...]: a TOML array
            item = typing.get_args(want)[0]
            if not isinstance(value, (list, tuple)) or \
                    not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise error(f"{where}: option {name} = {value!r} must be a list of {_PLURAL.get(item, item.__name__)}")
            if meta.get("minimum") is not None and any(v < meta["minimum"] for v in value):
                raise error(f"{where}: option {name} = {value!r}: each must be >= {meta['minimum']} ({meta['doc']})")
            values[name] = tuple(value)
            continue
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise error(f"{where}: option {name} = {value!r} must be {_TYPES.get(want, want.__name__)}")
        if meta.get("choices") and value not in meta["choices"]:
            raise error(f"{where}: option {name} = {value!r}; choose one of {meta['choices']}")
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise error(f"{where}: option {name} = {value!r} must be >= {meta['minimum']} ({meta['doc']})")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise error(f"{where}: option {name} = {value!r} must be <= {meta['maximum']} ({meta['doc']})")
        values[name] = value
    return cls(**values)


def describe(cls: type) -> list[dict[str, Any]]:
    """The options of a settings class: name, type, default, doc and choices (for docs and `compilers targets`)."""
    hints = typing.get_type_hints(cls)
    return [{"name": f.name, "type": getattr(hints[f.name], "__name__", str(hints[f.name])), "default": f.default, "doc": f.metadata.get("doc", ""),
             "choices": f.metadata.get("choices"), "runtime": f.metadata.get("runtime", False)}
            for f in dataclasses.fields(cls)]
