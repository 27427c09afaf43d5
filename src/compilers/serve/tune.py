"""`compilers tune REPO/MODEL`: a model's serving.toml chosen by measurement (Triton's Model Analyzer, built in).

A grid of candidate configurations over [batching] and [engine] keys is measured one candidate at a time: a
`compilers serve` child process on a free loopback port serves a temporary repository holding only this model
(its version directories and other files linked, not copied) with the candidate's serving.toml, the model's own
with the grid's keys set; once it answers ready (bounded), `perf.measure` loads it at each concurrency, then it
is stopped, always (errors and Ctrl-C included). Every candidate's serving.toml is rendered and parsed before any
server starts, by the function that writes the chosen one, so what was measured is what is written.

The choice: per candidate, its best samples/s among the levels whose client p99 is within the budget and that
had no errors; the candidate with the highest wins (a tie: the lower p99). `write` puts the chosen serving.toml
in the model's directory (its other tables, keys and comments kept) and tune.json beside it (every candidate's
levels, the budget, the machine), each replaced in one rename. The measurements are a probe of this machine
under this load generator: they say nothing of other machines, loads or inputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..artifact import manifest_records, read_manifest
from ..backends import get_backend
from ..bench import text_table
from ..errors import ArtifactError, CompilerError, ConfigError, InputError, TargetError, brief
from ..files import replacing
from ..host import cpu_name, own_version
from ..plot import plot_format, pyplot, save
from ..settings import parse, runtime_options
from .batcher import Batching
from .perf import Level, measure
from .perf import figure
from .repository import CONFIG, Repository, alone_reason, parse_config

TUNE_FILE = "tune.json"
DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_DURATION = 3.0           # seconds measured per level
DEFAULT_WARMUP = 1.0
BATCH_CAP = 32                   # the default grid's largest max_batch_size
DELAYS = (0.0, 2.0)              # the default grid's queue delays: never wait; wait up to 2 ms for a fuller batch
START_SECONDS = 5.0              # a server start and stop, for the time estimate
START_TIMEOUT = 120.0            # a candidate whose server is not ready by then failed
#: [batching] keys that change what is computed, not how fast: never tuned
NOT_TUNED = ("rows_independent", "pad")
_SCALARS = (int, float, bool, str)


# -- what may be tuned ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """The facts about REPO/MODEL the grid rests on, read from its directory and its live versions' manifests."""

    path: Path
    live: tuple[int, ...]
    keys: dict[str, type]                # tunable key ("batching.max_batch_size", "engine.threads") -> its type
    settings: tuple[type, ...]           # the backend Settings classes of the live versions
    batch_bound: int | None              # rows per call the compiled engines take at most; None: no bound
    batched: bool                        # every live version has a batch dim
    alone: str | None                    # why requests never share a call (rows not proven independent)
    handler: bool                        # serving.toml has a [handler]
    base: Batching                       # the model's own [batching]
    cores: int


def read_model(model_dir: str | os.PathLike) -> Model:
    """REPO/MODEL checked and described; InputError for a directory that is not a model with a live version."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"{path} is not a model directory; give REPO/MODEL, a model of a repository "
                         "(compilers publish ARTIFACT REPO/MODEL makes one)")
    try:
        entry = Repository(path.parent).model(path.name)
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None
    if not entry.live:
        raise InputError(f"{path} has no version to serve; publish one first: compilers publish ARTIFACT {path}")
    settings, bounds, batched, alone = [], [], True, None
    for version in entry.live:
        directory = entry.version_path(version)
        try:
            target, signature, _ = manifest_records(directory, read_manifest(directory))
            backend = get_backend(target.backend)
            alone = alone or alone_reason(directory)
        except (ArtifactError, TargetError, ConfigError) as e:
            raise InputError(f"{directory}: {e}") from None
        settings.append(backend.Settings)
        if signature.batch is None:
            batched = False
        elif signature.dims[signature.batch].max is not None:
            bounds.append(signature.dims[signature.batch].max)
    hints = typing.get_type_hints(Batching)
    keys = {f"batching.{f.name}": hints[f.name] for f in dataclasses.fields(Batching)
            if f.name not in NOT_TUNED and hints[f.name] in _SCALARS}
    engine = set.intersection(*(set(runtime_options(s)) for s in settings))
    for s in settings:
        types = typing.get_type_hints(s)
        keys.update({f"engine.{name}": types[name] for name in runtime_options(s) if name in engine})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Model(path, entry.live, keys, tuple(dict.fromkeys(settings)), min(bounds) if bounds else None, batched,
                 alone, entry.config.handler is not None, entry.config.batching, cores)


def default_grid(model: Model) -> dict[str, list[Any]]:
    """max_batch_size 1, 8, 16 and 32 (at most the compiled bound, which is added when below 32); queue delay 0 and
    2 ms; instances the powers of two up to the cores, and the cores. A model whose requests never share a
    call (or that has no batch dim) keeps its own batching. Engine threads follow instances (`candidates`)."""
    base = model.base
    if model.batched and model.alone is None:
        top = min(BATCH_CAP, model.batch_bound or BATCH_CAP)
        sizes = sorted({1, top, *(n for n in (8, 16, BATCH_CAP) if n <= top)})
        delays = list(DELAYS)
    else:
        sizes, delays = [base.max_batch_size if model.batched else 1], [base.max_queue_delay_ms]
    instances = sorted({model.cores, *(2 ** k for k in range(model.cores.bit_length()) if 2 ** k <= model.cores)})
    return {"batching.max_batch_size": sizes, "batching.max_queue_delay_ms": delays, "batching.instances": instances}


def parse_grid(items: Sequence[str], model: Model) -> dict[str, list[Any]]:
    """`--grid` items (`batching.max_batch_size=8,16,32`, `engine.threads=1,2`) as axes, each value checked against
    the [batching] fields and the live versions' backend settings; InputError naming the valid keys otherwise."""
    valid = ", ".join(model.keys)
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key or not text:
            raise InputError(f"--grid {item!r}: write KEY=V1,V2,... with a key of {valid}")
        if key not in model.keys:
            extra = f" ({key.split('.', 1)[1]} changes what is computed, not how fast)" \
                if key.split(".", 1)[-1] in NOT_TUNED else ""
            raise InputError(f"--grid: {key} is not a key to tune{extra}; the keys: {valid}")
        if key in axes:
            raise InputError(f"--grid: {key} is given twice; list its values once, comma-separated")
        values = list(dict.fromkeys(_value(key, v.strip(), model.keys[key]) for v in text.split(",")))
        for value in values:
            _check(key, value, model)
        axes[key] = values
    return axes


def _value(key: str, text: str, kind: type) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        return kind(text) if kind is not float else float(text)
    except ValueError:
        raise InputError(f"--grid {key}: {text!r} is not {kind.__name__ if kind is not bool else 'true or false'}") \
            from None


def _check(key: str, value: Any, model: Model) -> None:
    table, name = key.split(".", 1)
    if table == "batching":
        parse(Batching, {name: value}, f"--grid {key}", error=InputError)
        if name == "max_batch_size" and value > 1 and not model.batched:
            raise InputError(f"--grid {key}={value}: the model has no batch dim, so each call takes one request; "
                             "tune max_batch_size = 1 only")
        if name == "max_batch_size" and model.batch_bound is not None and value > model.batch_bound:
            raise InputError(f"--grid {key}={value}: the compiled engine takes at most {model.batch_bound} rows")
    else:
        for settings in model.settings:
            parse(settings, {name: value}, f"--grid {key}", error=InputError)


def candidates(model: Model, axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The grid's configurations, each {key: value}: the product of the axes (the default grid's, with the given
    ones in their place); unless given as axes, OpenVINO's engine.streams = instances (its threads stay all the
    cores), other backends' engine.threads = cores // instances; max_batch_size 1 measured once, at the first queue delay (one row fills a batch: no wait)."""
    axes = {**default_grid(model), **axes}
    # an engine per instance, sharing the cores: OpenVINO as a stream each (one stream serializes calls from
    # several threads), the others with cores // instances threads each
    streams = "engine.streams" in model.keys and "engine.streams" not in axes
    threads = not streams and "engine.threads" in model.keys and "engine.threads" not in axes
    delay = "batching.max_queue_delay_ms"
    found: list[dict[str, Any]] = []
    for values in itertools.product(*axes.values()):
        config = dict(zip(axes, values))
        if streams:
            config["engine.streams"] = config.get("batching.instances", 1)
        elif threads:
            config["engine.threads"] = max(1, model.cores // config.get("batching.instances", 1))
        if config.get("batching.max_batch_size") == 1 and delay in config:
            config[delay] = axes[delay][0]
        if config not in found:
            found.append(config)
    return found


def render(text: str, config: Mapping[str, Any]) -> str:
    """serving.toml `text` with the configuration's keys set in their tables, everything else kept (comments
    too); preferred_batch_sizes above a new max_batch_size are dropped, as they could never be reached."""
    import tomlkit
    doc = tomlkit.parse(text)
    for key, value in config.items():
        table, name = key.split(".", 1)
        if table not in doc:
            doc[table] = tomlkit.table()
        doc[table][name] = value
    most = config.get("batching.max_batch_size")
    preferred = doc.get("batching", {}).get("preferred_batch_sizes")
    if most is not None and preferred is not None:
        kept = [n for n in preferred if n <= most]
        if kept:
            doc["batching"]["preferred_batch_sizes"] = kept
        else:
            del doc["batching"]["preferred_batch_sizes"]
    return tomlkit.dumps(doc)


def _checked(text: str, config: Mapping[str, Any], where: str) -> str:
    """`text`, once it parses as a serving.toml holding each of `config`'s values; InputError otherwise."""
    try:
        parsed = parse_config(tomllib.loads(text), where)
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"the configuration {label(config)} makes an invalid serving.toml: {e}") from None
    for key, value in config.items():
        table, name = key.split(".", 1)
        got = getattr(parsed.batching, name) if table == "batching" else parsed.engine.get(name)
        if got != value:
            raise InputError(f"{where}: {key} reads back as {got!r}, not {value!r}; simplify the file's "
                             f"[{table}] table (plain keys) and tune again")
    return text


def label(config: Mapping[str, Any]) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={_show(v)}" for k, v in config.items())


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a run measures: the model, the candidates and their serving.toml texts, and the load."""

    model: Model
    p99_ms: float
    axes: dict[str, list[Any]]
    configs: list[dict[str, Any]]
    texts: list[str]
    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    input_data: str | None
    handlers: bool

    @property
    def seconds(self) -> float:
        """About how long the run takes: configs x (a server start + levels x (warm-up + duration))."""
        return len(self.configs) * (START_SECONDS + len(self.concurrency) * (self.warmup + self.duration))

    def describe(self) -> str:
        lines = [f"{len(self.configs)} configurations x {len(self.concurrency)} levels (concurrency "
                 f"{','.join(map(str, self.concurrency))}) x ({self.warmup:g} s warm-up + {self.duration:g} s), plus a "
                 f"server start each: about {_duration(self.seconds)}, for p99 <= {self.p99_ms:g} ms"]
        lines += [f"  {i}: {label(c)}" for i, c in enumerate(self.configs, 1)]
        return "\n".join(lines)


def plan(model_dir: str | os.PathLike, p99_ms: float, *, concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
         duration: float = DEFAULT_DURATION, warmup: float = DEFAULT_WARMUP, grid: Sequence[str] = (),
         input_data: str | os.PathLike | None = None, handlers: bool = False) -> Plan:
    """Everything a run needs, checked before any server starts: InputError for a directory that is not a model
    with a live version, a budget, load or grid key/value out of range, an input file that is missing, or a
    [handler] without `handlers`."""
    if isinstance(p99_ms, bool) or not isinstance(p99_ms, (int, float)) or not (math.isfinite(p99_ms) and p99_ms > 0):
        raise InputError(f"--p99-ms must be a positive number of milliseconds, not {p99_ms!r}")
    if not concurrency or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in concurrency):
        raise InputError(f"--concurrency takes positive integers, like 1,8,32; got {list(concurrency)}")
    for flag, value, least in (("--duration", duration, 0.0), ("--warmup", warmup, -1e-9)):
        if not (math.isfinite(value) and value > least):
            raise InputError(f"{flag} must be {'positive' if least == 0 else 'zero or more'} (seconds), not {value}")
    if input_data is not None and not Path(input_data).is_file():
        raise InputError(f"--input-data {input_data} is not a file; give a perf_analyzer-style JSON file "
                         '({"data": [{"INPUT": [...]}, ...]})')
    model = read_model(model_dir)
    if model.handler and not handlers:
        raise InputError(f"{model.path / CONFIG} has a [handler] (the model's own code), which the servers tune "
                         "starts run only with --handlers, as compilers serve --handlers does; pass --handlers")
    axes = parse_grid(grid, model)
    configs = candidates(model, axes)
    original = _read_text(model.path / CONFIG)
    texts = [_checked(render(original, c), c, f"{model.path / CONFIG} with {label(c)}") for c in configs]
    return Plan(model, float(p99_ms), {**default_grid(model), **axes}, configs, texts, tuple(concurrency),
                float(duration), float(warmup), None if input_data is None else str(input_data), handlers)


def _read_text(file: Path) -> str:
    try:
        return file.read_text() if file.exists() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: cannot read it ({e})") from None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# -- measuring --------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One candidate's measurements: a Level per concurrency, or why it could not be measured."""

    config: dict[str, Any]
    levels: list[Level] = field(default_factory=list)
    error: str | None = None


def within(level: Level, p99_ms: float) -> bool:
    """The level answered every request, and its client p99 is within the budget."""
    p99 = level.latency_ms.get("p99")
    return level.errors == 0 and level.requests > 0 and p99 is not None and p99 <= p99_ms


def client_limited(level: Level) -> bool:
    """The load generator, not the server, may have been the limit (perf's word)."""
    return level.client_limited


@dataclass
class Tuning:
    """A run: its plan, each candidate's Result, when it started, and the choice."""

    plan: Plan
    results: list[Result]
    date: str

    def best(self, result: Result) -> Level | None:
        """The candidate's level with the most samples/s within the budget (a tie: the lower p99)."""
        ok = [x for x in result.levels if within(x, self.plan.p99_ms)]
        return max(ok, key=lambda x: (x.samples_per_second, -x.latency_ms["p99"]), default=None)

    @property
    def chosen(self) -> int | None:
        """The index of the chosen candidate; None when none met the budget."""
        scored = [(best.samples_per_second, -best.latency_ms["p99"], -i) for i, r in enumerate(self.results)
                  if (best := self.best(r)) is not None]
        return -max(scored)[2] if scored else None

    def lowest_p99(self) -> tuple[float, int, int] | None:
        """(p99 ms, candidate index, concurrency) of the lowest p99 of an error-free level."""
        seen = [(x.latency_ms["p99"], i, x.concurrency) for i, r in enumerate(self.results) for x in r.levels
                if x.errors == 0 and x.latency_ms.get("p99") is not None]
        return min(seen) if seen else None

    def table(self) -> str:
        """Every candidate's levels, then the choice (or why there is none)."""
        keys = list(self.plan.axes) + [k for c in self.plan.configs for k in c if k not in self.plan.axes]
        keys = list(dict.fromkeys(keys))
        head = ["config", *(k.split(".", 1)[1] for k in keys), "concurrency", "samples/s", "p50 ms", "p99 ms",
                "rows/call", "errors", "within budget"]
        chosen, rows, notes = self.chosen, [], []
        for i, r in enumerate(self.results):
            values = [_show(r.config[k]) if k in r.config else "-" for k in keys]
            best = self.best(r)
            for x in r.levels:
                verdict = "yes" if within(x, self.plan.p99_ms) else "no"
                if x is best:
                    verdict += " <- chosen" if i == chosen else " (its best)"
                if client_limited(x):
                    verdict += " (client-limited)"
                rows.append([str(i + 1), *values, str(x.concurrency), figure(x.samples_per_second),
                             figure(x.latency_ms.get("p50")), figure(x.latency_ms.get("p99")),
                             figure((x.server or {}).get("batch_size")), str(x.errors), verdict])
            if r.error:
                rows.append([str(i + 1), *values, "-", "-", "-", "-", "-", "-", "failed"])
                notes.append(f"config {i + 1} failed: {r.error}")
        lines = [f"{self.plan.model.path}: {len(self.results)} configurations, p99 budget {self.plan.p99_ms:g} ms, "
                 f"{self.plan.duration:g} s per level after {self.plan.warmup:g} s of warm-up"]
        lines += text_table(head, rows, left=(len(head) - 1,))
        lines += notes
        if any(client_limited(x) for r in self.results for x in r.levels):
            lines.append("client-limited: the load generator used most of a core there; the server may do more")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: the choice, or that none met the budget and the lowest p99 seen."""
        if self.chosen is None:
            low = self.lowest_p99()
            failed = next((f"config {i + 1} failed: {r.error}" for i, r in enumerate(self.results) if r.error), "")
            seen = f"the lowest p99 seen: {low[0]:.3g} ms (config {low[1] + 1} at concurrency {low[2]})" if low \
                else f"no level answered without errors ({failed or 'none answered'})"
            return f"no configuration kept p99 within {self.plan.p99_ms:g} ms without errors; {seen}"
        r = self.results[self.chosen]
        best = self.best(r)
        return (f"chosen: config {self.chosen + 1} ({label(r.config)}): {figure(best.samples_per_second)} samples/s "
                f"at concurrency {best.concurrency}, p99 {figure(best.latency_ms['p99'])} ms <= {self.plan.p99_ms:g} ms")

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        chosen = self.chosen
        return {
            "model": p.model.path.name, "versions": list(p.model.live), "p99_ms": p.p99_ms, "date": self.date,
            "compilers": own_version(),
            "machine": {"cpu": cpu_name(), "cores": p.model.cores, "platform": platform.platform(),
                        "python": platform.python_version()},
            "load": {"concurrency": list(p.concurrency), "duration": p.duration, "warmup": p.warmup,
                     "input_data": p.input_data},
            "grid": p.axes,
            "chosen": None if chosen is None else {"config": chosen + 1, "serving": self.results[chosen].config,
                                                   "level": self.best(self.results[chosen]).concurrency},
            "configs": [{"config": r.config, "error": r.error,
                         "best": None if (b := self.best(r)) is None else b.concurrency,
                         "levels": [{**x.to_dict(), "within_budget": within(x, p.p99_ms),
                                     "client_limited": client_limited(x)} for x in r.levels]}
                        for r in self.results]}


def run(p: Plan, *, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Tuning:
    """Measure each candidate of the plan on its own server; a candidate whose server fails to start or whose
    every request fails is recorded with the reason, and the run goes on."""
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    with tempfile.TemporaryDirectory(prefix="compilers-tune-") as tmp:
        repo = Path(tmp) / "repo"
        model_dir = _linked(p.model.path, repo)
        server_log = Path(tmp) / "server.log"
        for i, (config, text) in enumerate(zip(p.configs, p.texts), 1):
            log(f"config {i}/{len(p.configs)}: {label(config)}")
            (model_dir / CONFIG).write_text(text)
            result = Result(config)
            try:
                with serving(repo, handlers=p.handlers, log_file=server_log) as url:
                    perf = measure(url, model_dir.name, concurrency=p.concurrency, duration=p.duration,
                                   warmup=p.warmup, input_data=p.input_data, log=lambda m: log(f"  {m}"))
                result.levels = perf.levels
            except (CompilerError, ServerFailed, RuntimeError, OSError) as e:
                result.error = str(e) if isinstance(e, (CompilerError, ServerFailed)) else brief(e)
                log(f"  failed: {result.error}")
            results.append(result)
    return Tuning(p, results, date)


def _linked(model_dir: Path, repo: Path) -> Path:
    """REPO/MODEL in a new repository: a link to each entry of the model's directory (versions, a handler's
    file), but its serving.toml and tune.json."""
    linked = repo / model_dir.name
    linked.mkdir(parents=True)
    for entry in model_dir.iterdir():
        if entry.name not in (CONFIG, TUNE_FILE) and not entry.name.startswith("."):
            (linked / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return linked


class ServerFailed(Exception):
    """A candidate's server did not start, or stopped, or did not load the model."""


@contextlib.contextmanager
def serving(repo: Path, *, handlers: bool = False, log_file: Path, timeout: float = START_TIMEOUT) -> Iterator[str]:
    """`compilers serve repo` as a child process on a free loopback port, ready inside the block (its URL), and
    stopped after it, whatever happens. ServerFailed when it is not ready within `timeout` seconds, exits, or
    does not load every model (with the server's reason)."""
    from .server import free_port                # uvicorn: only where a server is started
    env = dict(os.environ)
    source = str(Path(__file__).resolve().parents[2])          # the same compilers in the child
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    for attempt in range(3):                    # another process may take the free port before the server does
        port = free_port()
        command = [sys.executable, "-m", "compilers.cli", "serve", str(repo), "--host", "127.0.0.1", "--port",
                   str(port), "--log-level", "warning", *(["--handlers"] if handlers else [])]
        start = log_file.stat().st_size if log_file.exists() else 0
        with open(log_file, "ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(process, url, timeout)
            except ServerFailed as e:
                said = log_file.read_bytes()[start:].decode(errors="replace").strip()
                if process.poll() is None:
                    raise
                if "address already in use" in said.lower() and attempt < 2:
                    continue
                raise ServerFailed(f"{e}; its last words: {' | '.join(said.splitlines()[-3:]) or 'none'}") from None
            yield url
            return
        finally:
            _stop(process)


def _wait_ready(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerFailed(f"the server exited ({process.returncode}) while starting")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5):
                return
        except urllib.error.HTTPError as e:            # listening, so its models are loaded: one is not serving
            raise ServerFailed(f"the server did not load the model: {_index_reason(url) or e}") from None
        except (urllib.error.URLError, OSError):
            pass                                        # not listening yet
        if time.monotonic() > deadline:
            raise ServerFailed(f"the server was not ready within {timeout:.0f} s")
        time.sleep(0.1)


def _index_reason(url: str) -> str | None:
    try:
        request = urllib.request.Request(f"{url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as answer:
            rows = json.loads(answer.read())
    except (OSError, ValueError):
        return None
    return "; ".join(str(r.get("reason")) for r in rows if r.get("state") != "READY" and r.get("reason")) or None


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited after a while; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


# -- the outcome ------------------------------------------------------------------------------------------------
def write(t: Tuning) -> tuple[Path, Path]:
    """Write the chosen serving.toml into the model's directory (its other tables, keys and comments as they are
    now) and tune.json beside it, each replaced in one rename, after the new serving.toml parsed and read back the
    chosen values. InputError, with nothing written, when no candidate met the budget."""
    chosen = t.chosen
    if chosen is None:
        raise InputError(f"{t.verdict()}. Nothing was written: raise --p99-ms, lower --concurrency, or give "
                         "--grid other values")
    model_dir = t.plan.model.path
    config = t.results[chosen].config
    text = _checked(render(_read_text(model_dir / CONFIG), config), config, str(model_dir / CONFIG))
    report = json.dumps(t.to_dict(), indent=1)
    with replacing(model_dir / TUNE_FILE) as report_tmp, replacing(model_dir / CONFIG) as config_tmp:
        report_tmp.write_text(report)
        config_tmp.write_text(text)
    return model_dir / CONFIG, model_dir / TUNE_FILE


def tuned(model_dir: str | os.PathLike) -> bool:
    """Whether the model's tune.json measured its newest version (what `compilers publish` asks before its tip)."""
    path = Path(model_dir)
    try:
        measured = json.loads((path / TUNE_FILE).read_text()).get("versions", [])
        newest = Repository(path.parent).model(path.name).versions[-1]
    except (OSError, ValueError, AttributeError, IndexError, CompilerError):
        return False
    return newest in measured


def plot(t: Tuning, path: str | os.PathLike) -> Path:
    """Throughput versus client p99, a point per candidate and level (a line joins a candidate's levels), the
    budget as a vertical line and the chosen point starred. The format from the suffix (png, svg, pdf). Needs
    matplotlib (the `bench` extra)."""
    plt = pyplot()
    plot_format(path)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, r in enumerate(t.results):
        shown = [x for x in r.levels if x.requests and x.latency_ms.get("p99") is not None]
        if shown:
            ax.plot([x.latency_ms["p99"] for x in shown], [x.samples_per_second for x in shown], marker="o",
                    alpha=0.8, label=f"{i + 1}: {label(r.config)}")
    ax.axvline(t.plan.p99_ms, color="red", linestyle="--", label=f"budget: p99 {t.plan.p99_ms:g} ms")
    chosen = t.chosen
    if chosen is not None:
        best = t.best(t.results[chosen])
        ax.scatter([best.latency_ms["p99"]], [best.samples_per_second], marker="*", s=400, color="gold",
                   edgecolors="black", zorder=5, label=f"chosen: config {chosen + 1}, concurrency {best.concurrency}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("client p99 latency, ms")
    ax.set_ylabel("samples/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"compilers tune: {t.plan.model.path.name}, a point per configuration and concurrency "
                 f"({','.join(map(str, t.plan.concurrency))})", fontsize="medium")
    return save(fig, path)
