"""The model repository: `REPO/<model>/<version>/` saved artifacts plus an optional `REPO/<model>/serving.toml`.

A version is a directory named by a positive integer (`1`, `2`, ... as in Triton and TF Serving) that holds a
saved artifact (`manifest.json`). Hidden entries (`.publish-*` staging dirs) and names that are not digits are
ignored. An entry named like a version that is not one (no manifest.json, a file, `0`, `007`) is neither served
nor silently skipped: it is listed in `ModelEntry.problems`, for the server to report. serving.toml, when
present, chooses the live versions, splits traffic between them and configures the batcher; a malformed one is
a ConfigError naming the file and the key.

A data layer only: reading the layout, `load_version` (one artifact), `publish` (add the next version) and
`choose_version` (the canary split). No server code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..artifact import MANIFEST, manifest_records, read_manifest, verify
from ..backends import get_backend
from ..errors import ArtifactError, BackendUnavailable, ConfigError, TargetError
from ..files import remove, staging_dir, swapped_in
from ..runtime import CompiledModel, load
from ..settings import option, parse
from .handlers import HandlerConfig, parse_handler
from .batcher import Batching, alone

CONFIG = "serving.toml"


@dataclass(frozen=True)
class Versions:
    """serving.toml `[versions]`: which versions are live."""

    policy: str = option("latest", "which versions are live: the newest `latest`, all, or those in `specific`",
                         choices=("latest", "all", "specific"))
    latest: int = option(1, "how many of the newest versions are live (policy latest)", minimum=1)
    specific: tuple[int, ...] = option((), "the versions live under policy specific", minimum=1)


@dataclass(frozen=True)
class Replicas:
    """serving.toml `[replicas]`: how many Ray Serve replicas serve each version (`compilers serve --ray`);
    min < max turns on Ray Serve's autoscaling. `compilers serve` on one machine uses [batching] instances."""

    min: int = option(1, "replicas at least", minimum=0)
    max: int = option(1, "replicas at most", minimum=1)
    target_ongoing_requests: float = option(2.0, "autoscaling aims at this many batches in flight per replica",
                                            minimum=0.01)
    cpus: float = option(1.0, "CPUs Ray reserves for each replica", minimum=0)


@dataclass(frozen=True)
class ServingConfig:
    """A model's serving.toml; the defaults are what a model without one gets."""

    versions: Versions = field(default_factory=Versions)
    traffic: Mapping[int, float] = field(default_factory=dict)   # version -> percent; empty: newest live takes all
    batching: Batching = field(default_factory=Batching)
    engine: Mapping[str, Any] = field(default_factory=dict)      # runtime options for load (threads, spinning, ...)
    replicas: Replicas = field(default_factory=Replicas)
    handler: HandlerConfig | None = None     # [handler]: the model's own code, run only by `serve --handlers`


def parse_config(data: Mapping[str, Any], where: str) -> ServingConfig:
    """A ServingConfig from a parsed serving.toml (`where` names the file in errors). Checks that need the
    versions on disk (traffic to a live version, specific versions present) happen in `Repository.model`."""
    tables = ("versions", "traffic", "batching", "engine", "replicas", "handler")
    unknown = sorted(set(data) - set(tables))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; serving.toml has {', '.join(f'[{t}]' for t in tables)}")
    for name in tables:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{where}: {name} must be a table ([{name}]), not {data[name]!r}")
    table = data.get("versions", {})
    versions = parse(Versions, table, f"{where} [versions]", error=ConfigError)
    if versions.policy == "specific" and not versions.specific:
        raise ConfigError(f"{where} [versions]: policy = \"specific\" needs the live versions, e.g. specific = [1, 2]")
    for key, policy in (("specific", "specific"), ("latest", "latest")):
        if key in table and versions.policy != policy:
            raise ConfigError(f"{where} [versions]: {key} is set but policy is {versions.policy!r}, so it has no "
                              f"effect; set policy = \"{policy}\" or remove {key}")
    engine = data.get("engine", {})
    for key, value in engine.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"{where} [engine]: {key} = {value!r} must be a number, string or boolean")
    replicas = parse(Replicas, data.get("replicas", {}), f"{where} [replicas]", error=ConfigError)
    if replicas.min > replicas.max:
        raise ConfigError(f"{where} [replicas]: min = {replicas.min} exceeds max = {replicas.max}")
    handler = parse_handler(data["handler"], where) if "handler" in data else None
    return ServingConfig(versions, _parse_traffic(data.get("traffic", {}), where),
                         _parse_batching(data.get("batching", {}), where), dict(engine), replicas, handler)


def _parse_traffic(table: Mapping[str, Any], where: str) -> dict[int, float]:
    weights = {}
    for key, value in table.items():
        version = version_number(key)
        if version is None:
            raise ConfigError(f"{where} [traffic]: key {key!r} is not a version; keys are version numbers "
                              f"(positive integers, e.g. 1 = 90)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{where} [traffic]: {key} = {value!r} must be a percentage >= 0")
        weights[version] = float(value)
    if weights and not math.isclose(sum(weights.values()), 100.0, abs_tol=1e-6):
        raise ConfigError(f"{where} [traffic]: the weights sum to {sum(weights.values()):g}, not 100; they are "
                          f"percentages of the requests (e.g. 1 = 90, 2 = 10)")
    return dict(sorted(weights.items()))


def _parse_batching(table: Mapping[str, Any], where: str) -> Batching:
    table = dict(table)
    pad = table.pop("pad", {})
    if not isinstance(pad, dict):
        raise ConfigError(f"{where} [batching]: pad must be a table [batching.pad] of input name = pad value, "
                          f"not {pad!r}")
    for name, value in pad.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} [batching.pad]: {name} = {value!r} must be a number (the pad value)")
    batching = parse(Batching, table, f"{where} [batching]", error=ConfigError)
    too_big = [n for n in batching.preferred_batch_sizes if n > batching.max_batch_size]
    if too_big:
        raise ConfigError(f"{where} [batching]: preferred_batch_sizes {too_big} exceed max_batch_size "
                          f"{batching.max_batch_size} and could never be reached; lower them or raise max_batch_size")
    return dataclasses.replace(batching, pad={k: float(v) for k, v in pad.items()})


def read_config(model_dir: Path) -> ServingConfig:
    """The model's serving.toml parsed and checked; the defaults without one."""
    file = model_dir / CONFIG
    return read_config_file(file) if file.exists() else ServingConfig()


def read_config_file(file: Path) -> ServingConfig:
    """A serving.toml file parsed and checked; ConfigError naming the file otherwise."""
    try:
        data = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{file}: cannot read it as TOML ({e}); fix the syntax") from None
    return parse_config(data, str(file))


@dataclass(frozen=True)
class ModelEntry:
    """One model of a repository as found on disk."""

    name: str
    path: Path
    versions: tuple[int, ...]              # every artifact version, ascending
    live: tuple[int, ...]                  # those the policy serves, ascending
    config: ServingConfig
    problems: tuple[str, ...] = ()         # entries named like versions that are not artifacts, and the like

    @property
    def weights(self) -> dict[int, float]:
        """Percent of requests per live version: the [traffic] split, else the newest live version takes all.
        A live version left out of [traffic] gets no share (it is still reachable by its explicit number)."""
        if self.config.traffic:
            return dict(self.config.traffic)
        return {self.live[-1]: 100.0} if self.live else {}

    def version_path(self, version: int) -> Path:
        return self.path / str(version)


def choose_version(weights: Mapping[int, float], rng: random.Random | None = None) -> int:
    """The version a request goes to, drawn by `weights` (percent per version; e.g. `ModelEntry.weights`).
    Deterministic for a seeded `rng`."""
    versions = sorted(v for v, w in weights.items() if w > 0)
    if not versions:
        raise ConfigError("no live version takes traffic: publish a version or fix the model's serving.toml")
    return (rng or random).choices(versions, [weights[v] for v in versions])[0]


class Repository:
    """A directory of models, each a directory of integer versions. Reads the disk on every call, so a
    version published or a serving.toml edited meanwhile is seen by the next call."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"model repository {self.path} is not a directory; create it or point at the right one")

    def models(self) -> list[str]:
        """The model names: the repository's sub-directories (hidden ones aside), sorted."""
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))

    def model(self, name: str) -> ModelEntry:
        """The model's versions, config and live versions; ConfigError if it is missing or its serving.toml is
        malformed or names versions that are not there."""
        path = self.path / name
        if name.startswith(".") or "/" in name or not path.is_dir():
            raise ConfigError(f"no model {name!r} in {self.path}; models: {', '.join(self.models()) or 'none'}")
        config = read_config(path)
        versions, problems = _scan(path)
        policy = config.versions
        if policy.policy == "all":
            live = versions
        elif policy.policy == "latest":
            live = versions[-policy.latest:] if versions else ()
        else:
            missing = sorted(set(policy.specific) - set(versions))
            if missing:
                raise ConfigError(f"{path / CONFIG} [versions]: specific names version(s) {missing} that are not "
                                  f"artifacts in {path} (available: {list(versions)}); publish them or drop them")
            live = tuple(sorted(set(policy.specific)))
        stray = sorted(set(config.traffic) - set(live))
        if stray:
            raise ConfigError(f"{path / CONFIG} [traffic]: version(s) {stray} are not live (live: {list(live)}); "
                              f"route traffic only to live versions, or make them live in [versions]")
        if not live:
            problems.append(f"{path}: no version to serve; publish one (compilers publish ARTIFACT {path})")
        return ModelEntry(name, path, versions, live, config, tuple(problems))

    def load_version(self, model: str, version: int, *, check_versions: bool = True,
                     options: Mapping[str, Any] | None = None) -> CompiledModel:
        """The artifact of one version, loaded (live or not: the caller decides what it serves) with the runtime
        `options` (serving.toml [engine]). An artifact that fails to load raises its ArtifactError /
        BackendUnavailable, naming the model and version; options its backend cannot change, ConfigError."""
        path = self.path / model / str(version)
        if not (path / MANIFEST).is_file():
            raise ArtifactError(f"model {model!r} has no version {version} (no {path / MANIFEST}); "
                                f"versions: {list(self.model(model).versions)}")
        try:
            return load(path, check_versions=check_versions, options={**_serving_options(path), **(options or {})})
        except (ArtifactError, BackendUnavailable) as e:
            raise type(e)(f"model {model!r} version {version}: {e}") from e
        except TargetError as e:
            raise ConfigError(f"{self.path / model / CONFIG} [engine]: {e}") from None


def _serving_options(artifact: Path) -> dict[str, Any]:
    """The runtime options the artifact's backend asks of a server (serving.toml [engine] overrides them)."""
    try:
        return dict(get_backend(read_manifest(artifact)["target"]["backend"]).serving_options)
    except (ArtifactError, KeyError, TypeError, TargetError):
        return {}                                   # load() reports what is wrong with the artifact


def version_number(name: str) -> int | None:
    """The version a directory name stands for: a positive integer written without leading zeros."""
    if name.isdigit() and name.isascii() and name[0] != "0":
        return int(name)
    return None


def _scan(model_dir: Path) -> tuple[tuple[int, ...], list[str]]:
    versions, problems = [], []
    for entry in sorted(model_dir.iterdir()):
        if not (entry.name.isdigit() and entry.name.isascii()):
            continue                                   # serving.toml, README, hidden staging dirs
        number = version_number(entry.name)
        if number is None:
            problems.append(f"{entry}: version names are positive integers without leading zeros; rename or remove it")
        elif not (entry / MANIFEST).is_file():
            problems.append(f"{entry}: named like a version but holds no {MANIFEST}, so it is not served; "
                            f"publish an artifact there or remove it")
        else:
            versions.append(number)
    return tuple(sorted(versions)), problems


def check_artifact(path: Path) -> dict[str, Any]:
    """The manifest; ArtifactError unless `path` is a complete compilers artifact (format and every file's
    sha256; no backend library needed)."""
    return verify(path)


def alone_reason(version_dir: str | os.PathLike) -> str | None:
    """Why a server runs each request of this published version alone (its rows depend on each other, or its
    artifact does not say), or, for a pipeline, why it batches only requests of equal length, given its model's
    serving.toml; None when requests of any length may share calls."""
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    _, signature, _ = manifest_records(version_dir, manifest)
    batching = read_config(version_dir.parent).batching
    reason = alone(signature, batching) if signature.batch is not None else None
    pipeline = manifest.get("pipeline")
    if reason is None and isinstance(pipeline, dict) and pipeline.get("padded") is False:
        reason = ("padding is not proven harmless for this pipeline (compile's report says why): requests share "
                  "engine calls only when their items pre-process to equal lengths")
    return reason


def publish(artifact: str | os.PathLike, model_dir: str | os.PathLike) -> Path:
    """Copy a saved artifact into `model_dir` as its next version and return that version's directory.

    The copy is staged in a hidden directory inside `model_dir` and renamed into place, so a half-written
    version never appears; concurrent publishers each get their own number. ArtifactError (with nothing
    written) if `artifact` is not a complete compilers artifact."""
    source, model_dir = Path(artifact), Path(model_dir)
    check_artifact(source)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(model_dir, ".publish-")
    try:
        staged = staging / "version"
        shutil.copytree(source, staged)
        number = _next_number(model_dir)
        while True:
            try:
                with swapped_in(staged, model_dir / str(number), replace=False):
                    return model_dir / str(number)
            except (FileExistsError, NotADirectoryError):   # another publisher took the number (or a stray file)
                number = max(number + 1, _next_number(model_dir))
    finally:
        remove(staging)


def _next_number(model_dir: Path) -> int:
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.name.isascii()]
    return max(taken, default=0) + 1
