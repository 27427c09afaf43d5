"""The sending side of `compilers perf`: worker processes that hold a level's connections and keep one request
in flight on each (a closed loop, as perf_analyzer's concurrency), cheaply enough that the client is not the
bottleneck of a small server on the same machine.

Each worker process (multiprocessing, spawn context) runs one asyncio event loop (uvloop when importable) with its
share of the level's connections:
- http: keep-alive HTTP/1.1 connections; a request's bytes (headers and body, tensors in the Open Inference
  Protocol's binary extension, made by tritonclient.http's `generate_request_body`) are built once per input entry
  and written as they are; answers are parsed by httptools. A non-200 answer is an error with the server's
  `error` message.
- grpc: a grpc.aio channel per connection (a subchannel of its own, so a TCP connection of its own) calling
  GRPCInferenceService/ModelInfer with the serialized `ModelInferRequest` of the entry (`raw_input_contents`),
  built once; answers are kept as bytes.
The first answer to each entry in each process is checked in full (parsed by tritonclient; every output the
model declares is there, of its datatype and shape, for the model asked), and every answer to it until one
passes, so a server answering the wrong thing is counted in errors, not measured as fast.

A level: the parent sends each process its share (connections, requests), the processes connect and warm up,
say they are ready, and wait; the parent reads the server's /metrics and says go; each runs its window and sends
back its latencies, counts, errors and the CPU seconds it spent in the window. Every request that fails is
counted once and never retried. Client side only: nothing here imports the server.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import ssl
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import quote

import numpy as np

from .addresses import grpc_address, http_url

ERRORS_KEPT = 5                  # distinct error messages kept per level
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


# -- what is sent -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one protocol's requests go and what they are: prebuilt, one per input entry (picklable)."""
    protocol: str                                    # http or grpc
    address: str                                     # http: the server's URL; grpc: host:port
    model: str
    version: str
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]    # the outputs the model declares: name, datatype, shape
    payloads: tuple[bytes, ...]                      # the request of each entry, as sent
    rows: tuple[int, ...]                            # the samples in each
    timeout: float


def http_payloads(url: str, model: str, version: str, entries: Sequence[dict[str, np.ndarray]],
                  datatypes: dict[str, str]) -> list[bytes]:
    """Each entry as a whole HTTP/1.1 infer request, tensors in the binary extension, every output asked in
    binary."""
    import tritonclient.http as http
    parsed = http_url(url)
    path = f"{parsed.path.rstrip('/')}/v2/models/{quote(model)}" + (f"/versions/{quote(version)}" if version else "")
    made = []
    for arrays in entries:
        inputs = []
        for name, x in arrays.items():
            t = http.InferInput(name, list(x.shape), datatypes[name])
            t.set_data_from_numpy(x, binary_data=True)
            inputs.append(t)
        body, json_size = http.InferenceServerClient.generate_request_body(inputs)
        head = (f"POST {path}/infer HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Length: {len(body)}\r\n"
                + (f"Inference-Header-Content-Length: {json_size}\r\n" if json_size is not None else "") + "\r\n")
        made.append(head.encode("latin-1") + body)
    return made


def grpc_payloads(model: str, version: str, entries: Sequence[dict[str, np.ndarray]],
                  datatypes: dict[str, str]) -> list[bytes]:
    """Each entry as a serialized ModelInferRequest, tensors in `raw_input_contents`, every output asked."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype
    made = []
    for arrays in entries:
        request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        for name, x in arrays.items():
            datatype = datatypes[name]
            if datatype == "BYTES":
                serialized = serialize_byte_tensor(np.asarray(x, dtype=object))     # one element: the bytes
                raw = serialized.item() if serialized.size else b""
            else:
                x = np.ascontiguousarray(x)
                if np_to_triton_dtype(x.dtype) != datatype:
                    raise ValueError(f"input {name} is {x.dtype}, not of datatype {datatype} "
                                     f"({triton_to_np_dtype(datatype)})")
                raw = x.tobytes()
            request.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
            request.raw_input_contents.append(raw)
        made.append(request.SerializeToString())
    return made


# -- checking an answer -----------------------------------------------------------------------------------------
class WrongAnswer(Exception):
    """A successful answer that is not the model's inference response."""


def check_http(target: Target, body: bytes, header_length: int | None) -> None:
    """WrongAnswer unless `body` is an inference response of the model with every output it declares."""
    import tritonclient.http as http
    try:
        result = http.InferenceServerClient.parse_response_body(body, header_length=header_length)
        response = result.get_response()
        tensors = {o["name"]: (o.get("datatype"), o.get("shape")) for o in response.get("outputs") or []}
        _check(target, response.get("model_name"), tensors, result.as_numpy)
    except WrongAnswer:
        raise
    except Exception as e:
        raise WrongAnswer(_not_an_answer(target, e)) from None


def check_grpc(target: Target, raw: bytes) -> None:
    """WrongAnswer unless `raw` is a ModelInferResponse of the model with every output it declares."""
    from tritonclient.grpc import InferResult, service_pb2
    try:
        response = service_pb2.ModelInferResponse.FromString(raw)
        tensors = {o.name: (o.datatype, list(o.shape)) for o in response.outputs}
        _check(target, response.model_name, tensors, InferResult(response).as_numpy)
    except WrongAnswer:
        raise
    except Exception as e:
        raise WrongAnswer(_not_an_answer(target, e)) from None


def _not_an_answer(target: Target, e: Exception) -> str:
    return f"the answer is not an inference response of model {target.model!r}: {type(e).__name__}: {e}"[:300]


def _check(target: Target, model_name: Any, tensors: dict[str, tuple[Any, Any]],
           as_numpy: Callable[[str], Any]) -> None:
    if model_name != target.model:
        raise WrongAnswer(f"the answer is for model {model_name!r}, not {target.model!r}")
    for name, datatype, shape in target.outputs:
        if name not in tensors:
            raise WrongAnswer(f"the answer lacks output {name!r} (it has {sorted(tensors)})")
        got_type, got_shape = tensors[name]
        x = as_numpy(name)
        if got_type != datatype or x is None or len(x.shape) != len(shape) or list(x.shape) != list(got_shape) \
                or any(d not in (-1, g) for d, g in zip(shape, x.shape)):
            raise WrongAnswer(f"the answer's output {name!r} is {got_type} {list(np.shape(x))}; the model declares "
                              f"{datatype} {list(shape)}")


# -- connections ------------------------------------------------------------------------------------------------
class Failed(Exception):
    """A request that failed, with the message to report."""


class HttpConnection:
    """A keep-alive HTTP/1.1 connection with at most one request in flight; a new TCP connection (a `_Wire`)
    when the last one was closed, lost or timed out."""

    def __init__(self, target: Target):
        import httptools
        self.httptools, self.target = httptools, target
        parsed = http_url(target.address)
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parsed.scheme == "https" else None
        self.wire: _Wire | None = None

    async def send(self, payload: bytes) -> tuple[bytes, int | None]:
        """The answer's body and its Inference-Header-Content-Length; Failed for a non-200 answer or a lost,
        refused or timed-out connection."""
        loop = asyncio.get_running_loop()
        if self.wire is None or self.wire.transport is None:
            try:
                _, self.wire = await asyncio.wait_for(loop.create_connection(
                    lambda: _Wire(self.httptools.HttpResponseParser), self.host, self.port, ssl=self.ssl),
                    self.target.timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise Failed(f"cannot connect to {self.host}:{self.port}: {type(e).__name__}: {e}") from None
        wire = self.wire
        waiter = wire.send(payload)
        timer = loop.call_later(self.target.timeout, wire.expire, self.target.timeout)
        try:
            status, body = await waiter
        finally:
            timer.cancel()
        if status != 200:
            raise Failed(f"[{status}] {_server_error(body)}")
        return body, wire.header_length

    def close(self) -> None:
        if self.wire is not None:
            self.wire.close()


class _Wire(asyncio.Protocol):
    """One TCP connection of an HttpConnection: its parser and the answer awaited."""

    def __init__(self, parser: Callable[[Any], Any]):
        self.parser = parser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.body: list[bytes] = []
        self.header_length: int | None = None

    def send(self, payload: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.body, self.header_length = [], None
        self.transport.write(payload)
        return self.waiter

    def expire(self, seconds: float) -> None:
        self._fail(f"no answer within {seconds:g} s (--timeout)")
        self.close()                         # an answer may still come: this connection is done with

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _fail(self, message: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Failed(message))

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as e:               # httptools.HttpParserError and its kinds
            self._fail(f"the server's answer is not HTTP: {e}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(f"the server closed the connection{': ' + str(exc) if exc else ''}")

    # httptools.HttpResponseParser
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            try:
                self.header_length = int(value)
            except ValueError:
                self.header_length = -1      # the check refuses it

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))
        if not self.parser.should_keep_alive():
            self.close()


def _server_error(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except Exception:
        return body[:200].decode("utf-8", "replace") or "(no body)"


class GrpcConnection:
    """One gRPC channel on a TCP connection of its own, at most one call in flight. Create it in the loop."""

    def __init__(self, target: Target):
        import grpc
        self.grpc, self.target = grpc, target
        self.channel = grpc.aio.insecure_channel(grpc_address(target.address), options=[
            ("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1)])
        self.call = self.channel.unary_unary(MODEL_INFER)           # bytes in, bytes out

    async def send(self, payload: bytes) -> tuple[bytes]:
        try:
            return (await self.call(payload, timeout=self.target.timeout),)
        except self.grpc.aio.AioRpcError as e:
            raise Failed(f"[{e.code()}] {e.details()}") from None

    async def aclose(self) -> None:
        await self.channel.close()


# -- one process's share of a level -----------------------------------------------------------------------------
@dataclass
class Share:
    """What one process measured in a level's window."""
    requests: int = 0
    samples: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)    # seconds, of the successful requests
    seconds: float = 0.0                                    # its window: go to its last answer
    cpu_seconds: float = 0.0                                # the process's CPU over its window

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < ERRORS_KEPT and message not in self.messages:
            self.messages.append(message)


class _Level:
    """A process's connections for one level, and the send loop each runs."""

    def __init__(self, target: Target, connections: int, first: int):
        self.target, self.n, self.first = target, connections, first
        self.connections: list[Any] = []
        self.unchecked = set(range(len(target.payloads)))
        self.share = Share()
        self.budget = 0
        self.start = 0.0

    async def open(self) -> None:
        make = HttpConnection if self.target.protocol == "http" else GrpcConnection
        self.connections = [make(self.target) for _ in range(self.n)]

    async def run(self, until: float, budget: int, counted: bool) -> None:
        self.budget = budget
        await asyncio.gather(*(self._send_loop(c, self.first + i, until, counted)
                               for i, c in enumerate(self.connections)))

    async def _send_loop(self, connection: Any, k: int, until: float, counted: bool) -> None:
        t, share, clock = self.target, self.share, time.perf_counter
        check = check_http if t.protocol == "http" else check_grpc
        entries = len(t.payloads)
        while clock() < until and self.budget > 0:
            self.budget -= 1
            i = k % entries
            k += 1
            started = clock()
            try:
                answer = await connection.send(t.payloads[i])
                elapsed = clock() - started
                if i in self.unchecked:
                    check(t, *answer)
                    self.unchecked.discard(i)
            except (Failed, WrongAnswer) as e:
                if counted:
                    share.error(str(e))
            except Exception as e:                  # anything else a request met: an error of the level
                if counted:
                    share.error(" ".join(f"{type(e).__name__}: {e}".split())[:300])
            else:
                if counted:
                    share.latencies.append(elapsed)
                    share.requests += 1
                    share.samples += t.rows[i]
            if counted:
                share.seconds = clock() - self.start

    async def close(self) -> None:
        for c in self.connections:
            if isinstance(c, GrpcConnection):
                await c.aclose()
            else:
                c.close()
        await asyncio.sleep(0)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _work(pipe: Any, targets: dict[str, Target]) -> None:
    """A worker process: runs each level the parent sends until told to stop (or the parent is gone)."""
    while True:
        try:
            order = pipe.recv()
        except (EOFError, OSError):
            return
        if order[0] != "level":
            return
        _, protocol, connections, first, warm_budget, budget, warmup, duration = order
        loop = _new_loop()
        level = _Level(targets[protocol], connections, first)
        try:
            loop.run_until_complete(level.open())
            loop.run_until_complete(level.run(time.perf_counter() + warmup, warm_budget, counted=False))
            pipe.send(("ready",))
            if pipe.recv() != ("go",):
                return
            cpu = time.process_time()
            level.start = time.perf_counter()
            loop.run_until_complete(level.run(level.start + duration, budget, counted=True))
            level.share.cpu_seconds = time.process_time() - cpu
            pipe.send(("done", level.share))
        except Exception:
            pipe.send(("failed", traceback.format_exc()))
        finally:
            loop.run_until_complete(level.close())
            loop.close()


# -- the processes ----------------------------------------------------------------------------------------------
class Workers:
    """`k` worker processes (spawned once, kept for every level) holding the prebuilt requests of each protocol."""

    def __init__(self, k: int, targets: dict[str, Target], start_timeout: float = 300.0):
        context = multiprocessing.get_context("spawn")
        self.start_timeout = start_timeout
        self.pipes, self.processes = [], []
        for i in range(k):
            here, there = context.Pipe()
            p = context.Process(target=_work, args=(there, targets), name=f"compilers-perf-{i}", daemon=True)
            p.start()
            there.close()
            self.pipes.append(here)
            self.processes.append(p)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in self.processes:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(10)
        for pipe in self.pipes:
            pipe.close()

    def level(self, protocol: str, connections: int, processes: int, *, duration: float, max_requests: int,
              warmup: float, timeout: float, snapshot: Callable[[], Any]) -> tuple[list[Share], Any, Any]:
        """One level: `connections` spread over the first `processes` workers, `max_requests` (and as many
        warm-up requests at most) split likewise; the shares, and `snapshot()` taken as the window opened and
        after it closed."""
        used = self.pipes[:processes]
        per = _spread(connections, processes)
        budgets, firsts = _spread(max_requests, processes), [sum(per[:i]) for i in range(processes)]
        for pipe, n, first, budget in zip(used, per, firsts, budgets):
            pipe.send(("level", protocol, n, first, budget, budget, warmup, duration))
        for pipe in used:
            self._receive(pipe, "ready", self.start_timeout + warmup + 2 * timeout)
        before = snapshot()
        for pipe in used:
            pipe.send(("go",))
        shares = [self._receive(pipe, "done", duration + 2 * timeout + 60)[1] for pipe in used]
        return shares, before, snapshot()

    def _receive(self, pipe: Any, expected: str, seconds: float) -> tuple:
        if not pipe.poll(seconds):
            raise RuntimeError(f"a compilers perf worker process did not answer within {seconds:.0f} s")
        try:
            message = pipe.recv()
        except EOFError:
            raise RuntimeError("a compilers perf worker process died (see its output above)") from None
        if message[0] == "failed":
            raise RuntimeError(f"a compilers perf worker process failed:\n{message[1]}")
        if message[0] != expected:
            raise RuntimeError(f"a compilers perf worker process said {message[0]!r}, not {expected!r}")
        return message


def _spread(total: int, parts: int) -> list[int]:
    """`total` split in `parts` as evenly as integers allow, the larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]
