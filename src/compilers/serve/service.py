"""The models a server serves: each live version of each model loaded from the repository with its own
dynamic batcher, requests routed to a version by the traffic split, and load / unload while serving.

A load (at start, or `load(name)` from the repository API) re-reads the model's directory and serving.toml
and loads every live version afresh, verifying each artifact. It takes effect completely or not at all:
if any version fails (a corrupt artifact, a bad serving.toml, a model that cannot be batched as configured,
or any other exception, a bug included) the engines it opened are stopped and dropped, the versions already
serving stay, untouched, and LoadFailed, the index and one WARNING line in the log say why. Versions that are
replaced or no longer live stop taking new requests at once and finish the ones they hold, so a reload under
load fails none. What clients read names the repository REPO (`ModelService.public`); the log keeps its path.

Requests reach a version's batcher in the same event-loop step that looks the version up, so a swap can
never hand a request to a batcher that has stopped. HTTP-free: the app (and tests) call it directly.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
import re
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from ..errors import CompilerError, ConfigError, InputError
from ..pipeline import BytesSpec, CompiledPipeline, Steps
from ..signature import Signature, TensorSpec
from ..target import Target
from .batcher import Batcher, Batching, BatchStats, QueueFull
from .handlers import Handler, HandlerError, context_of
from .limits import items_bytes, request_bytes
from .metrics import Metrics
from .protocol import check_outputs, flat_inputs
from .repository import ModelEntry, Repository, Versions, choose_version
from .statistics import Statistics

log = logging.getLogger("compilers")
UNLOADED = "unloaded"      # a model's reason after an explicit unload: it does not hold readiness back
#: a pipeline request whose items hold at most this many bytes is pre-processed in the event loop (tokenizing
#: a few sentences takes less than handing them to a thread); a larger one in a thread
PRE_IN_LOOP = 4096


class UnknownModel(CompilerError):
    """No such model in the repository, or no such version loaded (HTTP 404)."""


class NotReady(CompilerError):
    """The model is in the repository but has no version loaded: unloaded, or its load failed (HTTP 503)."""


class Unavailable(CompilerError):
    """The version's engine could not answer (a Ray Serve replica died or is restarting): retry (HTTP 503)."""


class LoadFailed(CompilerError):
    """A load or reload failed; the versions that were serving still serve (HTTP 400, as Triton answers)."""


@dataclass(eq=False)
class Version:
    """One loaded version, wherever its engine runs: what it takes and returns, and how to reach it."""

    number: int
    signature: Signature
    target: Target
    batching: Batching
    # one request's flat inputs -> its flat outputs; checks and enqueues before its first await
    infer: Callable[[list[np.ndarray]], Awaitable[list[np.ndarray]]]
    stop: Callable[[], Awaitable[None]]          # stop taking requests, finish the ones held
    steps: Steps | None = None                   # a pipeline's pre-processing and labels, run around `infer`
    handler: Handler | None = None               # the model's own code (serve --handlers), around all of it
    statistics: Statistics = field(default_factory=Statistics, init=False)    # Triton's, since it loaded
    holding: int = field(default=0, init=False)  # requests being pre-processed for this version (`hold`)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def hold(self) -> "_Holding":
        """While a request awaits something (pre-processing in a thread) before it reaches `infer`: `retire`
        waits for it, so a reload never stops the batcher under a request that chose this version."""
        return _Holding(self)

    async def retire(self) -> None:
        """Stop, once the requests it holds have reached the batcher (new ones no longer find it)."""
        if self.holding:
            await self._idle.wait()
        await self.stop()

    @property
    def own_inputs(self) -> tuple[TensorSpec | BytesSpec, ...]:
        """What the version takes: the pipeline's inputs (texts, images), or the tensor model's."""
        return self.signature.inputs if self.steps is None else self.steps.inputs

    @functools.cached_property
    def own_outputs(self) -> tuple[TensorSpec | BytesSpec, ...]:
        """What the version answers: the pipeline's named outputs (and labels), or the tensor model's."""
        return self.signature.outputs if self.steps is None else self.steps.outputs(self.signature)

    @functools.cached_property
    def largest_request(self) -> int | None:
        """The most bytes a valid request can take, as JSON (which bounds its binary and gRPC forms too); None when
        unbounded: a handler takes what its code takes, or a dim has no upper bound. Once per version: its
        handler is in place before it serves."""
        if self.handler is not None:
            return None
        if self.steps is None:
            return request_bytes(self.signature, self.batching.max_batch_size)
        return items_bytes(self.steps.pre.max_item_bytes, self.batching.max_batch_size)

    @property
    def inputs(self) -> tuple[Any, ...]:
        """What clients send: the handler's INPUTS, else the version's own."""
        declared = self.handler.inputs if self.handler is not None else None
        return declared or self.own_inputs

    @property
    def outputs(self) -> tuple[Any, ...]:
        """What clients get back: the handler's OUTPUTS, else the version's own."""
        declared = self.handler.outputs if self.handler is not None else None
        return declared or self.own_outputs


def _thaw() -> None:
    """Give the garbage collector back what a server froze once its models had loaded (`create_app`'s
    `freeze_startup`): a load or unload retires engines, whose cycles must be collectable."""
    if gc.get_freeze_count():
        gc.unfreeze()


class _Holding:
    """`Version.hold`'s block (a class: an async generator costs more per request)."""

    __slots__ = ("version",)

    def __init__(self, version: Version):
        self.version = version

    async def __aenter__(self) -> None:
        self.version.holding += 1
        self.version._idle.clear()

    async def __aexit__(self, *exc: object) -> None:
        self.version.holding -= 1
        if not self.version.holding:
            self.version._idle.set()


class LocalEngines:
    """Versions whose engines run in this process: the artifact loaded, with its own dynamic Batcher."""

    def __init__(self, check_versions: bool = True, handlers: bool = False):
        self.check_versions = check_versions
        self.handlers = handlers          # run models' handler code (`serve --handlers`)

    async def open(self, repository: Repository, entry: ModelEntry, number: int,
                   observe: Callable[[BatchStats], None]) -> Version:
        cm = await asyncio.to_thread(repository.load_version, entry.name, number, check_versions=self.check_versions,
                                     options=entry.config.engine)
        steps, batching = None, entry.config.batching
        if isinstance(cm, CompiledPipeline):   # batched after pre-processing, padded as the pre-processing pads
            steps, cm = cm.steps, cm.model
            if steps.padded:       # compile proved padding harmless (the graph) and eager confirmed it
                other = {k: v for k, v in batching.pad.items() if steps.pre.pad.get(k, v) != v}
                if other:          # the proof holds for the pipeline's own pad values, not for these
                    own = ", ".join(f"{k} = {steps.pre.pad[k]}" for k in sorted(other))
                    raise ConfigError(f"serving.toml [batching.pad] pads {', '.join(sorted(other))} with another value "
                                      f"than the pipeline's own ({own}), for which compile proved padding harmless: "
                                      "remove those lines")
                batching = replace(batching, pad={**steps.pre.pad, **batching.pad})
            elif batching.pad:
                raise ConfigError("serving.toml [batching.pad] pads a pipeline whose padding compile did not prove "
                                  "harmless (its report says why): remove it; requests then share calls at equal "
                                  "lengths")
        batcher = Batcher(cm.run_flat, cm.signature, batching, on_batch=observe, check=cm.check_inputs)
        for said in (batcher.combiner.alone, batcher.combiner.overridden):
            if said:
                log.warning("model %s version %s: %s", entry.name, number, said)
        version = Version(number, cm.signature, cm.target, batching, batcher.infer, batcher.stop, steps)
        if entry.config.handler is not None:
            if not self.handlers:
                raise ConfigError(f"model {entry.name!r} has a handler (serving.toml [handler] {entry.config.handler.file}"
                                  "): code, which this server runs only when started with --handlers")
            context = context_of(entry.name, number, entry.path, version.own_inputs, version.own_outputs)
            version.handler = await asyncio.to_thread(Handler.load, entry.config.handler, context)
        await batcher.start()
        return version


@dataclass(eq=False)
class Model:
    """A model's serving state: its loaded versions and traffic split, or why it has none."""

    name: str
    versions: dict[int, Version] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    reason: str = ""                       # why the last load failed, or why nothing is loaded
    policy: Versions = field(default_factory=Versions)     # serving.toml [versions] of the versions serving
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def newest(self) -> Version:
        return self.versions[max(self.versions)]


class ModelService:
    """Loads the repository's models and serves inference on them. `start()` and every other call run in the
    server's event loop; `stop()` drains every batcher."""

    def __init__(self, repository: Repository, metrics: Metrics | None = None, *, rng: random.Random | None = None,
                 check_versions: bool = True, engines: Any = None, handlers: bool = False):
        """`handlers`: run the handler code a model's serving.toml names and pins (serve --handlers)."""
        self.repository = repository
        self.metrics = metrics or Metrics()
        self.rng = rng or random.Random()
        self.engines = engines or LocalEngines(check_versions, handlers)   # here, or on Ray Serve replicas
        self.models: dict[str, Model] = {}
        self.started = False
        root = repository.path
        forms = sorted({str(root.resolve()), str(root.absolute()), str(root)} - {"", "."}, key=len, reverse=True)
        # a whole path only: not inside a longer one (/x/repo2, /y/x/repo), nor the word in "repository"
        self._paths = re.compile(r"(?<![\w./-])(?:" + "|".join(map(re.escape, forms)) + r")(?![\w-]|\.[\w-])")

    def public(self, message: str) -> str:
        """`message` with the repository's place on this machine (as given, absolute or resolved) written REPO,
        for clients: they name models, not paths. The server's own log keeps the paths."""
        return self._paths.sub("REPO", message)

    # -- life cycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model of the repository. One that fails is kept with the reason (the index shows it,
        and the server is not ready); the others serve."""
        for name in self.repository.models():
            try:
                await self.load(name)
            except LoadFailed:
                pass                               # load logged why, and the index says it
            except UnknownModel as e:              # its directory went away meanwhile
                log.warning("%s", e)
        self.started = True

    async def stop(self) -> None:
        """Stop taking requests and finish every queued one."""
        self.started = False
        for model in self.models.values():
            async with model.lock:
                await self._retire(model, list(model.versions.values()))
                model.versions, model.weights = {}, {}
                model.reason = "the server is shutting down"

    @property
    def ready(self) -> bool:
        """Started, and every model of the repository has a version serving (Triton's strict readiness), but for
        models unloaded on purpose."""
        return self.started and all(m.versions or m.reason == UNLOADED for m in self.models.values())

    # -- loading ----------------------------------------------------------------------------------------
    async def load(self, name: str) -> None:
        """(Re)load the model's live versions from disk; all or nothing (see the module doc). LoadFailed when
        any of it fails, for whatever reason; UnknownModel when the repository has no such model."""
        if name not in await asyncio.to_thread(self.repository.models):
            gone = self.models.pop(name, None)
            if gone is not None:       # its directory was removed: stop serving it, as Triton does
                async with gone.lock:
                    for number in gone.versions:
                        self.metrics.loaded.labels(name, str(number)).set(0)
                    await self._retire(gone, list(gone.versions.values()))
                raise UnknownModel(f"model {name!r} is no longer in the repository {self.repository.path}; "
                                   "unloaded it")
            raise UnknownModel(f"no model {name!r} in repository {self.repository.path}")
        _thaw()
        model = self.models.setdefault(name, Model(name))
        async with model.lock:
            fresh: list[Version] = []
            failure: str | None = None
            try:
                entry = await asyncio.to_thread(self.repository.model, name)
                if not entry.live:
                    raise ConfigError("; ".join(entry.problems) or f"model {name!r} has no version to serve")
                for number in entry.live:
                    statistics = Statistics()
                    fresh.append(await self.engines.open(self.repository, entry, number,
                                                         self._observer(name, number, statistics)))
                    fresh[-1].statistics = statistics
            except BaseException as e:             # cancelled too: what it opened must not outlive it
                await self._retire(model, fresh)
                fresh.clear()                      # a traceback holding this frame must not hold the engines
                if not isinstance(e, Exception):
                    raise
                failure = self._failure(name, e)
            if failure is not None:                # raised here, not in the except: it holds no traceback
                serving = f"; still serving version(s) {sorted(model.versions)}" if model.versions else ""
                log.warning("model %r: load failed: %s%s", name, failure, serving)
                model.reason = self.public(f"load failed: {failure}{serving}")
                raise LoadFailed(f"model {name!r}: {model.reason}")
            old = list(model.versions.values())
            model.versions = {v.number: v for v in fresh}
            model.weights = {v: w for v, w in entry.weights.items() if w > 0}
            model.policy = entry.config.versions
            model.reason = ""
            for v in fresh:
                self.metrics.loaded.labels(name, str(v.number)).set(1)
            for number in set(v.number for v in old) - set(model.versions):
                self.metrics.loaded.labels(name, str(number)).set(0)
            await self._retire(model, old)
            log.info("model %s: serving version(s) %s", name, sorted(model.versions))

    async def unload(self, name: str) -> None:
        """Stop serving every version of the model (queued requests finish first)."""
        _thaw()
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(f"model {name!r} is not loaded (repository models: {', '.join(self.repository.models())})")
        async with model.lock:
            old = list(model.versions.values())
            model.versions, model.weights = {}, {}
            model.reason = UNLOADED
            for v in old:
                self.metrics.loaded.labels(name, str(v.number)).set(0)
            await self._retire(model, old)

    @staticmethod
    def _failure(name: str, e: Exception) -> str:
        """Why a load failed, from its exception: the message of a CompilerError, the type too of anything else
        (a bug: its traceback is logged at DEBUG). Drops the locals of the frames it went through."""
        if isinstance(e, CompilerError):
            failure = str(e)
        else:
            failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.debug("model %r: the load failed unexpectedly", name, exc_info=e)
        traceback.clear_frames(e.__traceback__)
        return failure

    async def _retire(self, model: Model, versions: list[Version]) -> None:
        await asyncio.gather(*(v.retire() for v in versions))

    def _observer(self, model: str, version: int, statistics: Statistics) -> Callable[[BatchStats], None]:
        """The batch hook of a version: each engine call into its Prometheus metrics and its Triton statistics."""
        labels = (model, str(version))
        batch, queue, infer = (self.metrics.batch_size.labels(*labels), self.metrics.queue_seconds.labels(*labels),
                               self.metrics.inference_seconds.labels(*labels))

        def observe(stats: BatchStats) -> None:
            batch.observe(stats.rows)
            infer.observe(stats.infer_seconds)
            for waited in stats.queue_seconds:
                queue.observe(waited)
            statistics.batch(stats)
        return observe

    # -- lookups ----------------------------------------------------------------------------------------
    def model(self, name: str) -> Model:
        """The model's state; UnknownModel if the repository has no such model."""
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(f"no model {name!r}; models: {', '.join(sorted(self.models)) or 'none'}")
        return model

    def version(self, name: str, version: int | None = None) -> Version:
        """A loaded version (the newest when `version` is None); UnknownModel / NotReady otherwise."""
        model = self.model(name)
        if not model.versions:
            raise NotReady(f"model {name!r} has no version loaded ({model.reason or 'not loaded'}); load it with "
                           f"POST /v2/repository/models/{name}/load")
        if version is None:
            return model.newest
        if version not in model.versions:
            raise UnknownModel(f"model {name!r} has no version {version} loaded; loaded: {sorted(model.versions)}")
        return model.versions[version]

    def index(self) -> list[dict[str, Any]]:
        """The repository index: every loaded version READY (with the last load's failure, if it failed), every
        model without one UNAVAILABLE with why; paths in the repository read REPO/..."""
        rows = []
        for name in sorted(set(self.models) | set(self.repository.models())):
            model = self.models.get(name)
            reason = self.public(model.reason) if model is not None else "not loaded"
            if model is not None and model.versions:
                rows += [{"name": name, "version": str(v), "state": "READY", "reason": reason}
                         for v in sorted(model.versions)]
            else:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return rows

    # -- inference --------------------------------------------------------------------------------------
    async def infer(self, name: str, version: int | None, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str] | None = None) -> tuple[Version, list[np.ndarray]]:
        """Run one request (named numpy inputs) on the given version, or on one drawn by the traffic split.
        Returns the version that ran it and its flat outputs. `outputs`: names the caller asked for (checked)."""
        model = self.model(name)
        if version is None:
            if not model.versions:
                self.version(name)                     # raises NotReady with the reason
            weights = model.weights
            version = next(iter(weights)) if len(weights) == 1 else choose_version(weights, self.rng)
        served = self.version(name, version)
        labels = (name, str(served.number))
        started = time.perf_counter()
        try:
            check_outputs(outputs, served.outputs)
            flat = flat_inputs(inputs, served.inputs)
            if served.steps is None and served.handler is None:
                outputs = await served.infer(flat)   # no await before the enqueue: a reload cannot stop it first
            else:
                async with served.hold():
                    outputs = await self._stages(name, served, flat)
        except InputError:
            self.metrics.requests.labels(*labels, "invalid").inc()
            raise
        except QueueFull:
            self.metrics.requests.labels(*labels, "rejected").inc()
            raise
        except asyncio.CancelledError:             # its client left, or its deadline passed: Triton's CANCELED
            served.statistics.fail.add(time.perf_counter() - started)
            raise
        except Exception:
            self.metrics.requests.labels(*labels, "failed").inc()
            served.statistics.fail.add(time.perf_counter() - started)
            raise
        self.metrics.requests.labels(*labels, "ok").inc()
        served.statistics.success.add(time.perf_counter() - started)
        return served, outputs

    async def _stages(self, name: str, served: Version, flat: list[np.ndarray]) -> list[np.ndarray]:
        """A request through the stages around the batcher, each timed: the handler's preprocess, a pipeline's
        pre-processing (a large request in a thread), the engine call shared with other requests, the
        pipeline's naming and labels, the handler's postprocess."""
        labels = (name, str(served.number))
        if served.handler is not None:
            started = time.perf_counter()
            named = dict(zip((s.name for s in served.inputs), flat))
            named = await asyncio.to_thread(served.handler.preprocess, named)
            self._stage(labels, served, "pre", time.perf_counter() - started)
            try:
                flat = flat_inputs(named, served.own_inputs)
            except InputError as e:
                raise HandlerError(f"the model's handler's preprocess gave what the model does not take: {e}") from None
        if served.steps is None:
            outputs = await served.infer(flat)
        else:
            outputs = await self._pipeline(labels, served, flat)
        if served.handler is not None:
            started = time.perf_counter()
            named = dict(zip((s.name for s in served.own_outputs), outputs))
            named = await asyncio.to_thread(served.handler.postprocess, named)
            missing = [s.name for s in served.outputs if s.name not in named]
            if missing:
                raise HandlerError(f"the model's handler's postprocess returned no {', '.join(missing)}")
            outputs = [named[s.name] for s in served.outputs]
            self._stage(labels, served, "post", time.perf_counter() - started)
        return outputs

    async def _pipeline(self, labels: tuple[str, str], served: Version, flat: list[np.ndarray]) -> list[np.ndarray]:
        """A pipeline's items pre-processed, their tensors batched, the outputs named and labelled."""
        items = flat[0].reshape(-1)
        if items.size > served.batching.max_batch_size:
            raise InputError(f"input {served.own_inputs[0].name!r} holds {items.size} items; model {labels[0]!r} "
                             f"takes at most {served.batching.max_batch_size} per request (max_batch_size): send fewer")
        started = time.perf_counter()
        if sum(len(x) for x in items) <= PRE_IN_LOOP:
            tensors = served.steps.arrays(items)
        else:
            tensors = await asyncio.to_thread(served.steps.arrays, items)
        self._stage(labels, served, "pre", time.perf_counter() - started)
        outputs = await served.infer([tensors[n] for n in served.steps.pre.tensor_names])
        started = time.perf_counter()
        outputs = served.steps.answer(served.signature, outputs)
        self._stage(labels, served, "post", time.perf_counter() - started)
        return outputs

    def _stage(self, labels: tuple[str, str], served: Version, stage: str, seconds: float) -> None:
        """A request's own pre- or post-processing ("pre", "post") took `seconds`: into the Prometheus histogram
        and the version's statistics (compute_input, compute_output)."""
        if stage == "pre":
            self.metrics.preprocess_seconds.labels(*labels).observe(seconds)
            served.statistics.pre(seconds)
        else:
            self.metrics.postprocess_seconds.labels(*labels).observe(seconds)
            served.statistics.post(seconds)
