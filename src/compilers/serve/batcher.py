"""The dynamic batcher: requests from many callers grouped into one engine call.

An engine instance that is free takes what is queued at once: a lone request never waits for company that is not
coming. While every instance is busy, requests gather, so batches grow with the load by themselves, up to
`max_batch_size` rows. `max_queue_delay_ms` (0 by default) lets a free instance wait that long at most for a
fuller batch, for those who trade latency for it. Each call is led by the oldest request, joined by compatible
ones. Requests batch together only when their other dims match, except along dims whose every input is declared
paddable (`pad`, e.g. `input_ids` and `attention_mask` padded with 0 along `seq`): those are padded to the longest
of the call, so the oldest request is joined by those closest to its length first, within `max_batch_tokens`
(rows x padded length) when set; the outputs that carry the dim are cut back to each request's own size. A full
queue refuses a request at once (`QueueFull`) instead of growing.

Asyncio, threads and numpy, no HTTP: the server and the tests drive it the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import CompilerError, ConfigError, InputError
from ..settings import option
from ..signature import Signature

log = logging.getLogger("compilers")


@dataclass(frozen=True)
class Batching:
    """A model's `[batching]` table in serving.toml."""

    max_batch_size: int = option(8, "rows (samples) per engine call at most; 1 turns batching off", minimum=1)
    max_queue_delay_ms: float = option(0.0, "how long a free engine instance may wait for a fuller batch (the oldest "
                                            "request's wait at most); 0: it takes what is queued at once, and "
                                            "batches grow only while every instance is busy", minimum=0)
    max_batch_tokens: int = option(0, "for requests padded along a dim (text): rows x padded length per engine "
                                      "call at most, so short requests batch wide and long ones narrow; 0: "
                                      "max_batch_size alone bounds a call", minimum=0)
    preferred_batch_sizes: tuple[int, ...] = option((), "a batch this many rows is sent at once, without "
                                                        "waiting out the delay", minimum=1)
    queue_size: int = option(256, "requests waiting at most; one more is refused at once (HTTP 503)", minimum=1)
    instances: int = option(1, "engine calls running at once for this model (workers)", minimum=1)
    rows_independent: bool = option(False, "let requests share calls even where compile did not prove the rows of "
                                           "a batch independent (the server logs that this overrides compile)")
    pad: Mapping[str, float] = field(default_factory=dict)   # input name -> pad value ([batching.pad])


class QueueFull(CompilerError):
    """The model's request queue is full: retry later (HTTP 503)."""


@dataclass(eq=False)     # identity: the deque removes this request, not one with equal arrays
class _Request:
    inputs: list[np.ndarray]
    rows: int
    key: tuple
    sizes: dict[str, int]              # the request's own size of each padded dim
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    """One engine call: rows, requests, each request's wait in the queue, and the call's stages in seconds (Triton's
    split): input, from the group leaving the queue to the engine starting (handing it to a worker thread,
    concatenating, padding); infer, the engine's run; output, from the engine's end to the answers back in the event
    loop (splitting, trimming)."""

    rows: int
    requests: int
    queue_seconds: tuple[float, ...]
    input_seconds: float
    infer_seconds: float
    output_seconds: float


class Combiner:
    """What may share an engine call and how: a request's rows and compatibility key, and one call over a group
    of compatible requests (concatenated, padded where declared, outputs split and trimmed back), for the Batcher
    (in `compilers serve`, and in the ingress on Ray Serve)."""

    def __init__(self, signature: Signature, config: Batching, check: Callable[[list[np.ndarray]], None] | None = None):
        self.signature = signature
        self.config = config
        self.check = check or signature.check     # a request's own checks (CompiledModel.check_inputs)
        self._in_axes = [signature.batch_axis(s) for s in signature.inputs]
        self._out_axes = [signature.batch_axis(s) for s in signature.outputs]
        self._padded = _paddable_dims(signature, config.pad)
        if config.max_batch_size > 1:
            if signature.batch is None:
                raise ConfigError("the model has no batch dim, so requests cannot be batched: set "
                                  "[batching] max_batch_size = 1")
            lacking = [s.name for s, a in zip(signature.outputs, self._out_axes) if a is None]
            if lacking:
                raise ConfigError(f"output(s) {', '.join(lacking)} have no batch dim, so batched requests could not "
                                  "be told apart: set [batching] max_batch_size = 1")
        self.alone = alone(signature, config)     # why requests never share a call; None: they may
        self.overridden = overridden(signature, config)    # serving.toml's word against compile's, to be logged

    def admit(self, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int, tuple, dict[str, int]]:
        """A request checked against the signature: its flat arrays, rows, compatibility key and the sizes of its
        padded dims. InputError if it does not fit or holds more rows than max_batch_size."""
        flat = [np.asarray(x) for x in inputs]
        self.check(flat)
        sizes = self.signature.dim_sizes(flat)
        rows = 1 if self.signature.batch is None else sizes[self.signature.batch]
        if rows > self.config.max_batch_size:
            raise InputError(f"the request holds {rows} samples, more than this model's max_batch_size "
                             f"{self.config.max_batch_size}; split it")
        return flat, rows, self._key(flat, sizes), {d: sizes[d] for d in self._padded if d in sizes}

    def _key(self, flat: list[np.ndarray], sizes: dict[str, int]) -> tuple:
        """What must match for requests to share a call: every dim that is neither the batch nor padded, and
        the inputs without a batch dim, by value."""
        dims = tuple(sorted((d, n) for d, n in sizes.items() if d != self.signature.batch and d not in self._padded))
        fixed = tuple(x.tobytes() for x, axis in zip(flat, self._in_axes) if axis is None)
        return dims, fixed

    def groups(self, keys_and_rows: Sequence[tuple[tuple, int]]) -> list[list[int]]:
        """Requests (key, rows) in arrival order split into engine calls, each led by the oldest request left (see
        `pick`). Returns the requests' indexes per call."""
        left = list(range(len(keys_and_rows)))
        calls = []
        while left:
            chosen = self.pick([(*keys_and_rows[i], {}) for i in left])
            calls.append([left[i] for i in chosen])
            taken = set(chosen)
            left = [x for n, x in enumerate(left) if n not in taken]
        return calls

    def pick(self, queued: Sequence[tuple[tuple, int, Mapping[str, int]]]) -> list[int]:
        """The engine call of the oldest of the queued requests (each: key, rows, padded sizes; the oldest first):
        its indexes, in arrival order. The oldest is joined by the compatible requests closest to its padded size
        first, while the call stays within max_batch_size rows and max_batch_tokens."""
        key, rows, sizes = queued[0]
        if self.alone:
            return [0]
        others = [i for i in range(1, len(queued)) if queued[i][0] == key]
        if sizes:
            own = _volume(sizes)
            others.sort(key=lambda i: (abs(_volume(queued[i][2]) - own), i))
        chosen, longest = [0], dict(sizes)
        for i in others:
            _, more, their = queued[i]
            if rows + more > self.config.max_batch_size:
                continue
            wider = {d: max(n, their[d]) for d, n in longest.items()}
            if self.config.max_batch_tokens and wider and (rows + more) * _volume(wider) > self.config.max_batch_tokens:
                continue
            chosen.append(i)
            rows, longest = rows + more, wider
        return sorted(chosen)

    def full(self, rows: int, sizes: Mapping[str, int]) -> bool:
        """Whether a call of `rows` rows padded to `sizes` is as large as it should get (a free instance waiting
        for a fuller batch sends it at once)."""
        if rows >= self.config.max_batch_size or rows in self.config.preferred_batch_sizes:
            return True
        return bool(self.config.max_batch_tokens and sizes) and (rows + 1) * _volume(sizes) > self.config.max_batch_tokens

    def call(self, run: Callable[[list[np.ndarray]], list[np.ndarray]],
             group: Sequence[tuple[list[np.ndarray], int, dict[str, int]]]) -> list[list[np.ndarray]]:
        """One engine call of `run` over compatible requests (each: flat inputs, rows, padded sizes); the
        outputs of each request."""
        if len(group) == 1 and not self._padded:
            return [run(group[0][0])]
        target = {d: max(sizes[d] for _, _, sizes in group) for d in group[0][2]}
        batched = []
        for i, (spec, axis) in enumerate(zip(self.signature.inputs, self._in_axes)):
            parts = [_pad(inputs[i], spec.shape, target, self.config.pad.get(spec.name)) for inputs, _, _ in group]
            batched.append(parts[0] if axis is None else np.concatenate(parts, axis=axis))
        outputs = run(batched)
        split, start = [[] for _ in group], 0
        for j, (_, rows, sizes) in enumerate(group):
            for out, spec, axis in zip(outputs, self.signature.outputs, self._out_axes):
                piece = np.take(out, range(start, start + rows), axis=axis)
                split[j].append(_trim(piece, spec.shape, sizes))
            start += rows
        return split


class Batcher:
    """Groups `infer` calls into engine calls of `run` (flat numpy inputs in Signature order -> flat outputs).

    Each engine instance is a thread of its own that takes the next group from the queue the moment its call
    ends, without a turn of the event loop in between; the answers go back to the loop in one callback per call.
    `start()` in the event loop that calls `infer`; `stop()` drains what is queued, then ends the threads."""

    def __init__(self, run: Callable[[list[np.ndarray]], list[np.ndarray]], signature: Signature, config: Batching,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 check: Callable[[list[np.ndarray]], None] | None = None):
        self.run = run
        self.signature = signature
        self.config = config
        self.on_batch = on_batch
        self.combiner = Combiner(signature, config, check)
        self._pending: deque[_Request] = deque()       # guarded by _changed's lock
        self._changed = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # -- life cycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._threads = [threading.Thread(target=self._work, name=f"compilers-engine_{i}", daemon=True)
                         for i in range(self.config.instances)]
        for t in self._threads:
            t.start()

    async def stop(self) -> None:
        """Finish every queued request, then end the threads."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        threads, self._threads = self._threads, []
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        await asyncio.sleep(0)        # the answers of the last calls, posted to the loop, are set

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- requests ---------------------------------------------------------------------------------------
    async def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for one request (flat numpy inputs, checked against the signature)."""
        if self._loop is None or self._closing:
            raise QueueFull("the model is not serving (stopped or being unloaded); retry")
        flat, rows, key, sizes = self.combiner.admit(inputs)
        request = _Request(flat, rows, key, sizes, self._loop.create_future())
        with self._changed:
            if len(self._pending) >= self.config.queue_size:
                raise QueueFull(f"{len(self._pending)} requests are queued, the most this model takes "
                                f"(queue_size {self.config.queue_size}); retry later")
            self._pending.append(request)
            self._changed.notify()
        try:
            return await request.future
        except asyncio.CancelledError:      # its client gave up (a gRPC deadline): still queued, it leaves the queue
            with self._changed, contextlib.suppress(ValueError):   # not queued any more: in a call, or answered
                self._pending.remove(request)
            raise

    # -- the engine threads -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._changed:
                try:
                    group = self._next()
                except Exception as e:    # a bug: fail what is queued rather than leave it waiting forever
                    log.exception("the batcher failed to group requests")
                    failed = list(self._pending)
                    self._pending.clear()
                    self._post(self._fail, failed, e)
                    continue
            if group is None:
                return
            started = time.perf_counter()
            try:
                outputs, ran, ended = self._call(group)
            except Exception as e:        # the engine failed: every request of the call gets the error
                self._post(self._fail, group, e)
                continue
            self._post(self._answer, group, outputs, started, ran, ended)

    def _next(self) -> list[_Request] | None:
        """The next group, out of the queue (holding the lock; waits for one); None once closing and drained."""
        while True:
            if not self._pending:
                if self._closing:
                    return None
                self._changed.wait()
                continue
            group, ready = self._group()
            if ready:
                for r in group:
                    self._pending.remove(r)
                return group
            left = self.config.max_queue_delay_ms / 1e3 - (time.perf_counter() - group[0].arrived)
            self._changed.wait(max(left, 0.0))

    def _group(self) -> tuple[list[_Request], bool]:
        """The oldest request and the compatible ones that join it (`Combiner.pick`); and whether the group goes
        now: at once unless a queue delay is set, then when it is full or its oldest has waited the delay."""
        pending = list(self._pending)
        group = [pending[i] for i in self.combiner.pick([(r.key, r.rows, r.sizes) for r in pending])]
        if not self.config.max_queue_delay_ms or self._closing or self.combiner.alone:
            return group, True
        sizes = {d: max(r.sizes[d] for r in group) for d in group[0].sizes}
        full = self.combiner.full(sum(r.rows for r in group), sizes)
        waited = time.perf_counter() - group[0].arrived >= self.config.max_queue_delay_ms / 1e3
        return group, full or waited

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` in the event loop (a closed loop: its requests have no one to answer)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # -- back in the event loop -------------------------------------------------------------------------
    @staticmethod
    def _fail(group: list[_Request], error: Exception) -> None:
        for r in group:
            if not r.future.done():
                r.future.set_exception(error)

    def _answer(self, group: list[_Request], outputs: list[list[np.ndarray]], started: float, ran: float,
                ended: float) -> None:
        done = time.perf_counter()
        for r, out in zip(group, outputs):
            if not r.future.done():       # cancelled meanwhile: nobody waits for it
                r.future.set_result(out)
        if self.on_batch is not None:
            try:
                self.on_batch(BatchStats(sum(r.rows for r in group), len(group),
                                         tuple(started - r.arrived for r in group), ran - started, ended - ran,
                                         done - ended))
            except Exception:     # a metrics hook must not fail the requests
                log.exception("the batch hook failed")

    # -- one engine call (in an engine thread) ----------------------------------------------------------
    def _call(self, group: list[_Request]) -> tuple[list[list[np.ndarray]], float, float]:
        """The outputs of each request of the group, and when the engine's run started and ended."""
        times: list[float] = []

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            times.append(time.perf_counter())
            try:
                return self.run(inputs)
            finally:
                times.append(time.perf_counter())
        outputs = self.combiner.call(run, [(r.inputs, r.rows, r.sizes) for r in group])
        return outputs, times[0], times[1]


def alone(signature: Signature, config: Batching) -> str | None:
    """Why this model's requests must each run alone, never in one call with other clients' rows (None: they may
    share calls, up to max_batch_size rows): compile did not prove its rows independent (they are coupled, it could
    not tell, or the artifact predates the proof), and serving.toml does not say `rows_independent = true`."""
    if config.max_batch_size <= 1 or signature.batch_independent or config.rows_independent:
        return None
    evidence = signature.batch_evidence or ("the artifact does not record whether the rows of a batch are "
                                            "independent (it was compiled before compilers checked)")
    return (f"each request runs alone, so that no client is answered with something that depends on another "
            f"client's request: {evidence}. Recompile after changing the model, or set [batching] "
            "rows_independent = true in serving.toml if you know better")


def overridden(signature: Signature, config: Batching) -> str | None:
    """What serving.toml's `rows_independent = true` overrides (None: nothing, compile proved it or it is unset)."""
    if not config.rows_independent or signature.batch_independent or config.max_batch_size <= 1:
        return None
    return (f"requests share engine calls because serving.toml says rows_independent = true, although compile did "
            f"not prove the rows of a batch independent ({signature.batch_evidence or 'no record'}): a client may "
            "be answered with something that depends on other clients' requests if serving.toml is wrong")


def _paddable_dims(signature: Signature, pad: Mapping[str, float]) -> set[str]:
    """The dynamic dims (other than the batch) that every input carrying them may be padded along."""
    unknown = set(pad) - set(signature.input_names)
    if unknown:
        raise ConfigError(f"[batching.pad] names {', '.join(sorted(unknown))}, which the model does not take; its "
                          f"inputs: {', '.join(signature.input_names)}")
    dims: set[str] = set()
    for spec in signature.inputs:
        if spec.name in pad:
            dims |= {d for d in spec.shape if isinstance(d, str) and d != signature.batch}
    for spec in signature.inputs:
        if spec.name not in pad:
            shared = dims & {d for d in spec.shape if isinstance(d, str)}
            if shared:
                raise ConfigError(f"input {spec.name!r} shares dim(s) {', '.join(sorted(shared))} with padded inputs "
                                  f"but is not padded itself: add it to [batching.pad]")
    return dims


def _volume(sizes: Mapping[str, int]) -> int:
    """Elements per row along the padded dims (a request's tokens, for text)."""
    return math.prod(sizes.values())


def _pad(x: np.ndarray, shape: Sequence[Any], target: Mapping[str, int], value: float | None) -> np.ndarray:
    widths = [(0, target[d] - x.shape[i]) if isinstance(d, str) and d in target else (0, 0) for i, d in enumerate(shape)]
    if not any(w for _, w in widths):
        return x
    return np.pad(x, widths, constant_values=value)


def _trim(x: np.ndarray, shape: Sequence[Any], sizes: Mapping[str, int]) -> np.ndarray:
    index = tuple(slice(0, sizes[d]) if isinstance(d, str) and d in sizes else slice(None) for d in shape)
    return x[index] if any(s.stop is not None for s in index) else x
