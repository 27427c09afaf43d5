"""Targets: what to compile for, read from TOML descriptors.

A descriptor names a backend, a device, a precision, backend options, optional shape ranges per
input dimension and the validation tolerance. Built-in descriptors ship inside the package; a user's
own file is given by path, or found by name in the directories of `$COMPILERS_TARGETS`
(separated like PATH). A descriptor may start from another with `extends = "name"` and override keys.

An auto descriptor has an `[auto]` table instead of a backend: the candidate targets `compile` tries,
validates and times, and what "fastest" means (see `Auto`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .errors import TargetError
from .settings import option, parse

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class Tolerance:
    """When a compiled output counts as equal to eager (see `validate.py` and the README's "Validation").

    fp32: `noise` (the default rule) lets the compiled output's error against a float64 eager run be at most
    `noise` times eager fp32's own error, or `perturbed` times that of eager with every operation's rounding
    perturbed (`roundoff.py`), plus `floor` (relative to the output's size). Lossy precisions
    set `min_cosine` / `min_snr_db` per output instead (`noise` then defaults to off). `atol`/`rtol` add
    an element-wise check against eager (an element fails only if it exceeds both). Integer and bool
    outputs must agree on at least `min_int_agreement` of their elements."""

    noise: float | None = 5.0
    perturbed: float = 2.0
    floor: float = 2e-7
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None
    min_int_agreement: float = 1.0
    nonfinite: str | None = None     # None/"strict": NaN/+-Inf must propagate as in eager on the NaN/Inf probes;
                                     # "report": differences are recorded as this target's known deviation
    nonfinite_inputs: str = "refuse"  # where that deviation was recorded: a call with NaN/Inf in such an input is
                                      # an InputError ("refuse"), or runs and gets what the backend computes ("allow")

    def __post_init__(self):
        if self.nonfinite not in (None, "strict", "report"):
            raise TargetError(f"tolerance nonfinite = {self.nonfinite!r} must be \"strict\" (NaN/Inf propagate as "
                              "in eager, else validation fails) or \"report\" (differences recorded as a known deviation)")
        if self.nonfinite_inputs not in ("refuse", "allow"):
            raise TargetError(f"tolerance nonfinite_inputs = {self.nonfinite_inputs!r} must be \"refuse\" (a call with "
                              "NaN/Inf in an input whose NaN/Inf the engine computes otherwise than eager is an "
                              "InputError) or \"allow\" (it runs, and returns what the engine computes)")
        for key in ("noise", "perturbed", "floor", "atol", "rtol", "min_int_agreement"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise TargetError(f"tolerance {key} = {value!r} must be a number >= 0")
        if self.noise is None and not {self.min_cosine, self.min_snr_db, self.atol, self.rtol} - {None}:
            raise TargetError("a tolerance without the noise rule needs min_cosine, min_snr_db or atol/rtol")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if (v is not None or k == "noise") and not (k == "nonfinite_inputs" and v == "refuse")}


@dataclass(frozen=True)
class DimRange:
    """The sizes one dynamic dimension may take; `opt` is the size engines tune for."""

    min: int = 1
    opt: int | None = None
    max: int | None = None

    def __post_init__(self):
        if self.min < 0 or (self.max is not None and self.max < self.min):
            raise TargetError(f"dimension range min={self.min} max={self.max} is empty; need 0 <= min <= max")
        if self.opt is not None and not (self.min <= self.opt <= (self.max or self.opt)):
            raise TargetError(f"dimension range opt={self.opt} lies outside min={self.min}..max={self.max}")

    def contains(self, size: int) -> bool:
        return size >= self.min and (self.max is None or size <= self.max)

    def __str__(self) -> str:
        return f"{self.min}..{self.max if self.max is not None else 'inf'}"


@dataclass(frozen=True)
class Quantization:
    """How an int8 target calibrates and quantizes: a descriptor's [quantization] table.

    Weights are quantized to symmetric int8 (per output channel unless `per_channel = false`), the scheme
    TensorRT's explicit quantization reads too; activations follow `activations`."""

    samples: int = option(300, "calibration samples used at most; fewer given is a note in the report", minimum=1)
    preset: str = option("auto", "transformer: the scheme for attention models (keeps softmax, layer norm and "
                                 "residual adds in float); auto: transformer when the graph has attention",
                         choices=("auto", "transformer", "default"))
    activations: str = option("auto", "activation quantization: symmetric, asymmetric, or the backend's "
                                      "default for the model type", choices=("auto", "symmetric", "asymmetric"))
    per_channel: bool = option(True, "weights quantized per output channel (else per tensor)")
    method: str = option("minmax", "activation range estimation where the backend lets you choose",
                         choices=("minmax", "entropy", "percentile"))
    fast_bias_correction: bool = option(True, "correct the bias shift that quantizing weights causes")
    smooth_quant: float = option(0.95, "SmoothQuant alpha for the MatMul inputs of transformer models (moves "
                                       "activation outlier channels into the weights); -1: off", minimum=-1)
    keep_float: tuple[str, ...] = option((), "operation types never quantized (e.g. [\"MatMul\"])")
    max_float_layers: int = option(8, "the accuracy loop keeps at most this many quantized layers in float "
                                      "before it gives up (0: no loop)", minimum=0)


_TOLERANCE_KEYS = {f.name for f in dataclasses.fields(Tolerance)}
_QUANTIZATION_KEYS = {f.name for f in dataclasses.fields(Quantization)}
_TOP_KEYS = {"name", "backend", "device", "precision", "description", "extends",
             "options", "tolerance", "shapes", "unsupported", "quantization"}


@dataclass(frozen=True)
class Target:
    """A compilation target: pure data, built from a descriptor, changed with `with_()`."""

    name: str
    backend: str
    device: str = "cpu"
    precision: str = "fp32"
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, Mapping[int, DimRange]] = field(default_factory=dict)
    tolerance: Tolerance = field(default_factory=Tolerance)
    unsupported: Mapping[str, str] = field(default_factory=dict)   # module type name -> why it is refused
    quantization: Quantization = field(default_factory=Quantization)   # used by int8 targets
    source: str = "<code>"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise TargetError(f"target {self.name!r}: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "shapes", MappingProxyType(
            {k: MappingProxyType(dict(v)) for k, v in self.shapes.items()}))
        object.__setattr__(self, "unsupported", MappingProxyType(dict(self.unsupported)))

    def with_(self, **overrides: Any) -> "Target":
        """A copy with fields, tolerance keys (noise, min_cosine, ...), quantization keys (samples, preset, ...)
        or backend options replaced."""
        fields, tol, quant, opts = {}, {}, {}, dict(self.options)
        for key, value in overrides.items():
            if key in _TOLERANCE_KEYS:
                tol[key] = value
            elif key in _QUANTIZATION_KEYS:
                quant[key] = value
            elif key in {f.name for f in dataclasses.fields(self)}:
                fields[key] = value
            else:
                opts[key] = value
        if tol:
            fields["tolerance"] = dataclasses.replace(fields.get("tolerance", self.tolerance), **tol)
        if quant:
            current = dataclasses.asdict(fields.get("quantization", self.quantization))
            fields["quantization"] = parse(Quantization, {**current, **quant}, f"target {self.name!r} [quantization]")
        return dataclasses.replace(self, options=opts, **fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; `Target.from_dict` reads it back."""
        return {
            "name": self.name, "backend": self.backend, "device": self.device,
            "precision": self.precision, "description": self.description,
            "options": dict(self.options), "tolerance": self.tolerance.to_dict(),
            "shapes": {inp: {str(d): dataclasses.asdict(r) for d, r in dims.items()}
                       for inp, dims in self.shapes.items()},
            "unsupported": dict(self.unsupported),
            "quantization": {k: list(v) if isinstance(v, tuple) else v
                             for k, v in dataclasses.asdict(self.quantization).items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Target":
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise TargetError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS - {'extends'})}")
        for key in ("name", "backend"):
            if not isinstance(data.get(key), str):
                raise TargetError(f"{source}: '{key}' must be a string")
        for table in ("options", "tolerance", "shapes", "quantization"):
            if not isinstance(data.get(table, {}), dict):
                raise TargetError(f"{source}: {table} must be a table ([{table}] with key = value lines), "
                                  f"not {data[table]!r}")
        tol = dict(data.get("tolerance", {}))
        if ("noise" not in tol and {"min_cosine", "min_snr_db"} & set(tol)) or tol.get("noise") is False:
            tol["noise"] = None   # lossy: judged by cosine / SNR (or atol/rtol), not against fp32 noise
        bad = set(tol) - _TOLERANCE_KEYS
        if bad:
            raise TargetError(f"{source}: unknown tolerance key(s) {sorted(bad)}; allowed: {sorted(_TOLERANCE_KEYS)}")
        if not isinstance(data.get("unsupported", {}), dict):
            raise TargetError(f"{source}: [unsupported] must be a table of module type name = \"reason\"")
        try:
            shapes = {inp: {int(d): DimRange(**r) for d, r in dims.items()}
                      for inp, dims in data.get("shapes", {}).items()}
        except (TypeError, ValueError) as e:
            raise TargetError(f"{source}: shapes must look like [shapes.input_name] 0 = {{min = 1, opt = 8, max = 64}}: {e}") from None
        return cls(name=data["name"], backend=data["backend"], device=data.get("device", "cpu"),
                   precision=data.get("precision", "fp32"), description=data.get("description", ""),
                   options=data.get("options", {}), shapes=shapes, tolerance=Tolerance(**tol),
                   unsupported=data.get("unsupported", {}), source=source,
                   quantization=parse(Quantization, data.get("quantization", {}), f"{source} [quantization]"))


_AUTO_TOP_KEYS = {"name", "description", "extends", "auto"}


@dataclass(frozen=True)
class Auto:
    """An auto target: `compile` builds each candidate, validates it under its own contract, times the
    valid ones at the shapes below, and returns the fastest (`select.py`). Pure data, like Target.

    In a descriptor: `name`, `description` and an `[auto]` table with the keys below (`sizes` as a
    sub-table `[auto.sizes]`). Candidates are built-in names, names on $COMPILERS_TARGETS, or .toml paths
    (relative to the auto descriptor's own directory); in code, Targets too."""

    name: str
    candidates: tuple[str, ...] = option((), "the targets tried, in order: names or .toml paths")
    description: str = ""
    objective: str = option("latency", "latency: the lowest p50 per call; throughput: the most samples/s",
                            choices=OBJECTIVES)
    batch_size: int = option(0, "the batch size timed; 0: the example's", minimum=0)
    sizes: Mapping[str, int] = field(default_factory=dict)   # dynamic dim name -> size timed (default: the example's)
    compile_budget_s: float = option(0.0, "seconds of compiling after which the remaining candidates are "
                                          "skipped; 0: no limit", minimum=0)
    bench_seconds: float = option(1.0, "seconds of timed calls per candidate", minimum=0.01)
    source: str = "<code>"
    targets: tuple[Target, ...] = ()   # the candidates resolved, in order (filled in from `candidates`)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise TargetError(f"auto target {self.name!r}: objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", 0)
        for key in ("batch_size", "compile_budget_s", "bench_seconds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (key == "bench_seconds" and value <= 0):
                raise TargetError(f"auto target {self.name!r}: {key} = {value!r} must be a number "
                                  f"{'> 0' if key == 'bench_seconds' else '>= 0'}")
        for dim, size in dict(self.sizes).items():
            if not isinstance(dim, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise TargetError(f"auto target {self.name!r}: sizes must map dynamic dim names to sizes >= 1 "
                                  f"(e.g. [auto.sizes] seq = 128), not {dim!r} = {size!r}")
        object.__setattr__(self, "sizes", MappingProxyType(dict(self.sizes)))
        if self.targets and not self.candidates:
            object.__setattr__(self, "candidates", tuple(t.name for t in self.targets))
        if not self.targets:
            if isinstance(self.candidates, (str, Target)) or not self.candidates:
                raise TargetError(f"auto target {self.name!r} needs a list of candidate targets, e.g. "
                                  'candidates = ["ort-cpu", "openvino-cpu"]')
            object.__setattr__(self, "targets", tuple(_candidate(c, self.name) for c in self.candidates))
            object.__setattr__(self, "candidates", tuple(c.name if isinstance(c, Target) else str(c)
                                                         for c in self.candidates))
        names = [t.name for t in self.targets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise TargetError(f"auto target {self.name!r}: candidate target name(s) {twice} appear more than once; "
                              "give each candidate its own name")

    def target(self, name: str) -> Target:
        """The candidate Target called `name`."""
        for t in self.targets:
            if t.name == name:
                return t
        raise TargetError(f"auto target {self.name!r} has no candidate {name!r}; candidates: "
                          f"{', '.join(t.name for t in self.targets)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, shaped like the descriptor, with each candidate's content under "targets"."""
        return {"name": self.name, "description": self.description,
                "auto": {"candidates": list(self.candidates), "objective": self.objective,
                         "batch_size": self.batch_size, "sizes": dict(self.sizes),
                         "compile_budget_s": self.compile_budget_s, "bench_seconds": self.bench_seconds},
                "targets": [t.to_dict() for t in self.targets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Auto":
        """An Auto from a descriptor's keys; relative candidate paths resolve against `source`'s directory."""
        if "backend" in data:
            raise TargetError(f"{source}: a descriptor with an [auto] table picks among its candidates and has no "
                              "'backend'; remove one of the two")
        unknown = set(data) - _AUTO_TOP_KEYS
        if unknown:
            raise TargetError(f"{source}: unknown key(s) {sorted(unknown)} in an auto descriptor; allowed: "
                              f"{sorted(_AUTO_TOP_KEYS - {'extends'})}")
        if not isinstance(data.get("name"), str):
            raise TargetError(f"{source}: 'name' must be a string")
        table = data["auto"]
        if not isinstance(table, dict):
            raise TargetError(f"{source}: 'auto' must be a table ([auto])")
        table = dict(table)
        sizes = table.pop("sizes", {})
        if not isinstance(sizes, dict):
            raise TargetError(f"{source}: sizes must be a table: [auto.sizes] seq = 128")
        keys = sorted(_AUTO_KEYS)
        bad = sorted(set(table) - _AUTO_KEYS)
        if bad:
            raise TargetError(f"{source} [auto]: unknown key(s) {bad}; known: {', '.join(keys + ['sizes'])}")
        if "candidates" not in table:
            raise TargetError(f'{source} [auto]: needs candidates = ["ort-cpu", ...]')
        auto = parse(cls, {"name": data["name"], "description": data.get("description", ""), "source": source,
                           **table}, f"{source} [auto]")
        return dataclasses.replace(auto, sizes=sizes) if sizes else auto


_AUTO_KEYS = {"candidates", "objective", "batch_size", "compile_budget_s", "bench_seconds"}


def builtin_dir() -> Path:
    """The built-in descriptor library: inside the installed wheel, or `targets/` of a source checkout."""
    packaged = Path(str(resources.files("compilers"))) / "targets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "targets"


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("COMPILERS_TARGETS", "").split(os.pathsep) if p]
    return extra + [builtin_dir()]


def _read_toml(path: Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise TargetError(f"{path}: not UTF-8 text ({e}); save the descriptor as UTF-8") from None
    auto = data.get("auto")
    if isinstance(auto, dict) and isinstance(auto.get("candidates"), list):   # relative to the file naming them
        auto["candidates"] = [str(path.parent / c) if isinstance(c, str) and c.endswith(".toml") and
                              not Path(c).is_absolute() else c for c in auto["candidates"]]
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if base_name in seen:
        raise TargetError(f"{path}: 'extends' forms a cycle: {' -> '.join(seen + (base_name,))}")
    merged = _read_toml(_find(base_name), seen + (base_name,))
    for key, value in data.items():  # tables merge one level deep, scalars replace
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def _find(name: str) -> Path:
    for d in _search_dirs():
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    known = list(descriptor_files())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise TargetError(f"unknown target {name!r}; {hint}known targets: {', '.join(sorted(known))}. "
                      "Pass a path to a .toml descriptor, or add its directory to $COMPILERS_TARGETS "
                      "(`compilers targets` lists them all).")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def descriptor_files() -> dict[str, Path]:
    """Every descriptor a name can find, name -> file: the directories of $COMPILERS_TARGETS in order, then the
    built-ins; a name found earlier shadows the same name later, as `load_descriptor` resolves it."""
    found: dict[str, Path] = {}
    for d in _search_dirs():
        for path in sorted(d.glob("*.toml")) if d.is_dir() else ():
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def _path_of(spec: "str | os.PathLike") -> Path:
    path = Path(spec)
    if path.suffix == ".toml":
        if not path.is_file():
            raise TargetError(f"target descriptor {path} does not exist")
        return path
    return _find(str(spec))


def _from_path(path: Path) -> "Target | Auto":
    data = _read_toml(path)
    return Auto.from_dict(data, source=str(path)) if "auto" in data else Target.from_dict(data, source=str(path))


def _candidate(spec: Any, auto: str) -> Target:
    """One candidate of auto target `auto`: a Target, a name, or a .toml path (a descriptor file's relative
    paths were made relative to that file when it was read)."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TargetError(f"auto target {auto!r}: candidate {spec!r} must be a target name or a .toml path")
    try:
        found = _from_path(_path_of(spec))
    except TargetError as e:
        raise TargetError(f"auto target {auto!r}, candidate {str(spec)!r}: {e}") from None
    if isinstance(found, Auto):
        raise TargetError(f"auto target {auto!r}: candidate {str(spec)!r} is itself an auto target; "
                          "list its candidates instead")
    return found


def load_descriptor(spec: "str | os.PathLike | Target | Auto") -> "Target | Auto":
    """A Target, or an Auto for a descriptor with an [auto] table: from a built-in name, a user's name on
    $COMPILERS_TARGETS, a .toml path, a Target or an Auto."""
    if isinstance(spec, (Target, Auto)):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TargetError(f"target must be a name, a path to a .toml file, a compilers.Target or an auto target, "
                          f"not {type(spec).__name__}")
    return _from_path(_path_of(spec))


def load_target(spec: "str | os.PathLike | Target") -> Target:
    """A Target from a built-in name, a user's name on $COMPILERS_TARGETS, a .toml path, or a Target."""
    found = load_descriptor(spec)
    if isinstance(found, Auto):
        raise TargetError(f"{found.name} is an auto target: pass it to compilers.compile, which picks among its "
                          f"candidates ({', '.join(found.candidates)})")
    return found


def builtin_targets() -> list[Target]:
    """Every built-in concrete target (`compilers.unavailable_reason(t)` says whether each runs here)."""
    return [d for d in (load_descriptor(n) for n in builtin_names()) if isinstance(d, Target)]


def builtin_autos() -> list[Auto]:
    """Every built-in auto target."""
    return [d for d in (load_descriptor(n) for n in builtin_names()) if isinstance(d, Auto)]
