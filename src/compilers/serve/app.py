"""The HTTP app: the Open Inference Protocol (KServe v2) routes on Starlette, over a ModelService.

    GET  /v2/health/live | /v2/health/ready                  liveness, readiness (every model serving)
    GET  /v2                                                 server metadata
    GET  /v2/models/{name}[/versions/{v}]                    model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready              model readiness (200 ready, 503 not)
    POST /v2/models/{name}[/versions/{v}]/infer              inference: JSON tensors or binary tensor data
    GET  /v2/models/{name}[/versions/{v}]/config             the model configuration extension (`model_config`)
    GET  /v2/models[/{name}[/versions/{v}]]/stats            the statistics extension (`statistics`)
    POST /v2/repository/index                                the repository extension: every model's state,
    POST /v2/repository/models/{name}/load | /unload          and (re)load / unload while serving
    GET  /metrics                                            Prometheus metrics

Errors are `{"error": message}`: 400 for a bad request (the InputError a Python caller would get), or a
failed load; 404 for an unknown model or version; 503 when the model is not loaded, its queue is full or the
server holds as many request bodies as it may (retry); 500 for an engine failure. No request can stop the server.

The event loop only routes: a body is refused from its headers when it is larger than any valid request for its
model could be (`limits.request_bytes`) before a byte of it is read, large bodies are decoded and large answers
encoded on worker threads, and the bodies held at once are bounded (`limits.BodyBudget`).
"""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import CompilerError, ConfigError, InputError
from ..host import own_version
from .batcher import QueueFull, alone
from .limits import CONTROL_BYTES, BodyBudget, Busy, Limits
from .model_config import platform, triton_config
from .protocol import HEADER_LENGTH, decode_request, encode_response, parse_json, tensor_metadata
from .repository import Repository
from .service import LoadFailed, ModelService, NotReady, Unavailable, UnknownModel

log = logging.getLogger("compilers")

DECODE_IN_LOOP = 64 << 10       # bodies this large or larger are decoded on the codec thread
ENCODE_IN_LOOP = 1 << 14        # answers of this many elements or more are encoded on the codec thread
_VERSION = own_version()
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
_STATUS = ((InputError, 400), (LoadFailed, 400), (ConfigError, 400), (UnknownModel, 404), (NotReady, 503),
           (QueueFull, 503), (Unavailable, 503), (Busy, 503))


class Disconnected(CompilerError):
    """The client closed its connection before its request body had arrived (nobody reads the answer)."""


def create_app(repository: str | Repository | ModelService, *, limits: Limits = Limits(),
               handlers: bool = False, grpc: tuple[str, int] | None = None, freeze_startup: bool = False) -> Starlette:
    """The server app for a model repository (a path, a Repository, or a ModelService to share). Models load
    when the app starts (its lifespan) and drain when it stops. `limits`: the bodies it takes (the connection
    limits are the HTTP protocol's, set by `server.serve` / `server.running`). `handlers`: run the handler code
    models pin in their serving.toml (`serve --handlers`; a ModelService given says so itself). `grpc`: (host,
    port) to serve the same service over gRPC too (`serve.grpc`), started in the lifespan once the models are
    loaded, in the same event loop, and stopped (its RPCs in flight finished) before they drain; the port it
    got (port 0: a free one) is `app.state.grpc_port`. `freeze_startup`, for a server that owns its process
    (`compilers serve`): once the models are loaded, what the process holds then (the libraries, the engines) is
    moved out of the garbage collector's scans (`gc.freeze`), which otherwise walk it again and again under load
    (benchmarks/README.md, issue 33); the first load or unload after that unfreezes it, so what a reload retires
    is collected as usual."""
    if isinstance(repository, ModelService):
        service = repository
    else:
        service = ModelService(repository if isinstance(repository, Repository) else Repository(repository),
                               handlers=handlers)
    api = _Routes(service, limits)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        if freeze_startup:
            gc.freeze()
        grpc_server = None
        try:
            if grpc is not None:
                from . import grpc as grpc_transport     # grpcio only for a server that serves gRPC
                grpc_server, app.state.grpc_port = await grpc_transport.start(service, *grpc, limits)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(limits.drain_timeout)
            await service.stop()
            api.codec_thread.shutdown(wait=False)

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", api.live),
        Route("/v2/health/ready", api.ready),
        Route("/v2", api.server_metadata),
        Route("/v2/models/stats", api.statistics),            # before the model routes: not a model named "stats"
        Route(model, api.model_metadata), Route(version, api.model_metadata),
        Route(model + "/config", api.model_config), Route(version + "/config", api.model_config),
        Route(model + "/stats", api.statistics), Route(version + "/stats", api.statistics),
        Route(model + "/ready", api.model_ready), Route(version + "/ready", api.model_ready),
        Route(model + "/infer", api.infer, methods=["POST"]), Route(version + "/infer", api.infer, methods=["POST"]),
        Route("/v2/repository/index", api.index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", api.load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", api.unload, methods=["POST"]),
        Route("/metrics", api.metrics),
    ]
    app = _App(api.infer, routes=routes, lifespan=lifespan,
               exception_handlers={CompilerError: _error, Exception: _error})
    app.state.service = service
    app.state.grpc_port = None
    return app


_INFER = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class _App(Starlette):
    """The server's Starlette app, with inference straight to its handler: an infer request (POST
    /v2/models/{m}[/versions/{v}]/infer) skips the router's walk over every route and the middleware layers, and
    is answered as they would answer it (the same handler, the same error answers; an unexpected error is
    answered 500 and re-raised for the server to log, as ServerErrorMiddleware does). The rest goes through
    Starlette. A lean path for the one route that carries the load (issue 33: the event loop's time per request
    is time the engine threads lose on a small machine)."""

    def __init__(self, infer: Callable[[Request], Awaitable[Response]], **kwargs: Any):
        super().__init__(**kwargs)
        self._infer = infer

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        matched = scope["type"] == "http" and scope["method"] == "POST" and _INFER.fullmatch(scope["path"])
        if not matched:
            return await super().__call__(scope, receive, send)
        scope["app"] = self
        scope["path_params"] = {k: v for k, v in matched.groupdict().items() if v is not None}
        request = Request(scope, receive, send)
        try:
            response = await self._infer(request)
        except Exception as exc:
            await _error(request, exc)(scope, receive, send)
            if not isinstance(exc, CompilerError):
                raise
            return
        await response(scope, receive, send)


def _error(request: Request, exc: Exception) -> Response:
    """The answer to a request that raised: 4xx/503 with the message, where the repository's place on this
    machine reads REPO (clients name models, not paths); 500 with no detail, which goes to the log."""
    if isinstance(exc, Disconnected):
        log.info("%s", exc)
        return Response(status_code=400)
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            headers = {"retry-after": "1"} if status == 503 else None
            return JSONResponse({"error": _public(request, str(exc))}, status, headers=headers)
    # an engine failure (CompilerError) or a bug: 500; Starlette logs anything that is not a CompilerError
    if isinstance(exc, CompilerError):
        log.error("request %s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"}, 500)


def _public(request: Request, message: str) -> str:
    return request.app.state.service.public(message)


class _Routes:
    def __init__(self, service: ModelService, limits: Limits):
        self.service = service
        self.limits = limits
        self.bodies = BodyBudget(limits.bodies_bytes, limits.body_wait)
        # JSON parsing and writing hold the GIL: one thread for them, so that the event loop is the only other
        # thread waiting for it between the pieces they work in (benchmarks/flood.py answers, the slowest
        # /v2/health/live over runs: a thread per request 34-90 ms, this one thread 33-54 ms)
        self.codec_thread = ThreadPoolExecutor(1, thread_name_prefix="compilers-codec")

    # -- health and metadata ----------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.service.ready
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "compilers", "version": _VERSION, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(model_metadata(self.service, request.path_params["name"], _version(request)))

    async def model_ready(self, request: Request) -> Response:
        name, number = request.path_params["name"], _version(request)
        self.service.model(name)                       # 404 for a model the repository lacks
        try:
            self.service.version(name, number)
            ready = True
        except (NotReady, UnknownModel):
            ready = False
        return JSONResponse({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(model_config(self.service, request.path_params["name"], _version(request)))

    async def statistics(self, request: Request) -> Response:
        return JSONResponse(model_statistics(self.service, request.path_params.get("name"), _version(request)))

    # -- inference --------------------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            number = _version(request)
            limit, takes = infer_limit(self.service, self.limits, name, number)
            async with self.bodies.hold(_room(request, limit, takes)):
                body = await self._body(request, limit, takes)
                started = time.perf_counter()
                header = request.headers.get(HEADER_LENGTH)
                decoded = decode_request(body, header) if len(body) < DECODE_IN_LOOP else \
                    await self._codec(decode_request, body, header)   # a big body must not stall other requests
                del body
        except InputError:                 # counted for a model served here (no series for made-up names)
            model = self.service.models.get(name)
            if model is not None:
                version = request.path_params.get("version", "")
                version = version if version in {str(v) for v in model.versions} else ""
                self.service.metrics.requests.labels(name, version, "invalid").inc()
            raise
        served, outputs = await self.service.infer(name, number, decoded.inputs, decoded.outputs)
        specs = served.outputs
        encode = functools.partial(encode_response, name, served.number, decoded,
                                   dict(zip((s.name for s in specs), outputs)), specs)
        content, headers = encode() if sum(x.size for x in outputs) < ENCODE_IN_LOOP else await self._codec(encode)
        self.service.metrics.request_seconds.labels(name, str(served.number)).observe(time.perf_counter() - started)
        return Response(content, headers=headers)

    async def _codec(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self.codec_thread, work, *args)

    async def _body(self, request: Request, limit: int, takes: str) -> bytes:
        """The request body, decompressed (gzip / deflate), refused as soon as it runs past `limit` bytes (what
        `takes` so much; its Content-Length is checked by `_room`)."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise InputError(f"the request body exceeds {limit} bytes, the most {takes}")
                chunks.append(chunk)
        except ClientDisconnect:
            raise Disconnected(f"client {_peer(request)} disconnected during its request body ({request.method} "
                               f"{request.url.path}, {size} bytes received)") from None
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):
            inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
            try:
                body = inflate.decompress(body, limit + 1)
            except zlib.error as e:
                raise InputError(f"the request body is not valid {encoding} data ({e})") from None
            if len(body) > limit or inflate.unconsumed_tail:
                raise InputError(f"the request body inflates past {limit} bytes, the most {takes}")
            if not inflate.eof or inflate.unused_data:
                raise InputError(f"the request body is not one complete {encoding} stream (cut off, or followed "
                                 f"by other bytes)")
        elif encoding != "identity":
            raise InputError(f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate")
        return body

    # -- repository extension ---------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        options = await self._json(request)
        rows = self.service.index()
        if options.get("ready"):
            rows = [r for r in rows if r["state"] == "READY"]
        return JSONResponse(rows)

    async def load(self, request: Request) -> Response:
        options = await self._json(request)
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InputError(f'"parameters" must be a JSON object, not {type(parameters).__name__}')
        if set(parameters) - {"unload_dependents"}:
            raise InputError("load takes no config or files here: publish the artifact into the repository "
                             "(compilers publish ARTIFACT REPO/<model>), then load")
        await self.service.load(request.path_params["name"])
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        await self.service.unload(request.path_params["name"])
        return JSONResponse({})

    async def _json(self, request: Request) -> dict[str, Any]:
        takes = "the repository API takes; send a small JSON object"
        async with self.bodies.hold(_room(request, CONTROL_BYTES, takes)):
            body = await self._body(request, CONTROL_BYTES, takes)
            value = parse_json(body, "send a JSON object") if body.strip() else {}
        if not isinstance(value, dict):
            raise InputError("the request body must be a JSON object")
        return value

    async def metrics(self, request: Request) -> Response:
        return Response(self.service.metrics.render(), media_type=self.service.metrics.content_type)


def _room(request: Request, limit: int, takes: str) -> int:
    """The room in the server's budget for bodies a request takes while it is read and decoded: its
    Content-Length (refused when over `limit`, what `takes` so much) for an identity body, else `limit`."""
    declared = _content_length(request, limit, takes)
    identity = request.headers.get("content-encoding", "identity").lower() == "identity"
    return declared if declared is not None and identity else limit


def _content_length(request: Request, limit: int, takes: str) -> int | None:
    """The body's declared length; InputError when it is over `limit`."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    refuse_oversized(int(declared), limit, takes)
    return int(declared)


def refuse_oversized(size: int, limit: int, takes: str) -> None:
    """InputError for a request of `size` bytes when that is over `limit`, the most `takes` (`infer_limit`)."""
    if size > limit:
        raise InputError(f"the request body is {size} bytes, more than {limit}, the most {takes}")


def infer_limit(service: ModelService, limits: Limits, name: str, number: int | None) -> tuple[int, str]:
    """The largest infer request for this model (version), in bytes, and who takes that much: the largest valid
    request of any version that could serve it (as JSON, which bounds its binary and gRPC forms too), or the
    server's limit when that is smaller or unbounded. UnknownModel / NotReady before a byte of it is read."""
    versions = [service.version(name, number)] if number is not None else \
        list(service.model(name).versions.values()) or [service.version(name)]
    sizes = [v.largest_request for v in versions]
    if None in sizes or max(sizes) >= limits.max_body_bytes:
        return limits.max_body_bytes, "this server takes; send fewer samples per request (or raise the " \
                                      "server's --max-body-mb)"
    return max(sizes), (f"a request for model {name!r} can take (max_batch_size samples, as JSON); send fewer "
                        "samples per request")


def model_metadata(service: ModelService, name: str, number: int | None) -> dict[str, Any]:
    """A model's (version's) metadata, as both transports answer it; UnknownModel / NotReady."""
    served = service.version(name, number)
    versions = [number] if number is not None else sorted(service.model(name).versions)
    sig = served.signature
    return {
        "name": name, "versions": [str(v) for v in versions],
        "platform": platform(served),
        "inputs": [tensor_metadata(s) for s in served.inputs],
        "outputs": [tensor_metadata(s) for s in served.outputs],
        "parameters": {"target": served.target.name, "batch_dim": sig.batch,
                       "max_batch_size": served.batching.max_batch_size,
                       "batch_independent": sig.batch_independent,
                       "requests_share_calls": served.batching.max_batch_size > 1 and
                       alone(sig, served.batching) is None},
    }


def model_config(service: ModelService, name: str, number: int | None) -> dict[str, Any]:
    """A model's (version's) Triton model config, as both transports answer it; UnknownModel / NotReady."""
    return triton_config(name, service.version(name, number), service.model(name).policy)


def model_statistics(service: ModelService, name: str | None, number: int | None) -> dict[str, Any]:
    """Triton's statistics of every loaded version of every model (no name), of a model, or of one version, as
    both transports answer them; UnknownModel / NotReady as for the other model routes."""
    if not name:
        chosen = [(m, v) for m in sorted(service.models) for _, v in sorted(service.models[m].versions.items())]
    elif number is not None:
        chosen = [(name, service.version(name, number))]
    else:
        service.version(name)             # NotReady for a model with no version loaded
        chosen = [(name, v) for _, v in sorted(service.model(name).versions.items())]
    return {"model_stats": [v.statistics.json(m, v.number) for m, v in chosen]}


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "(unknown)"


def _version(request: Request) -> int | None:
    return version_number(request.path_params.get("version"))


def version_number(text: str | None) -> int | None:
    """A model version as a client names it (None or "": the server's choice); InputError for what is not one."""
    if text is None or text == "":
        return None
    if not (text.isdigit() and text.isascii()) or len(text) > 18 or int(text) < 1:
        raise InputError(f"version {text[:40]!r} is not a version number (a positive integer)")
    return int(text)
