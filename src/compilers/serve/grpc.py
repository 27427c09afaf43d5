"""The Open Inference Protocol over gRPC: Triton's `inference.GRPCInferenceService` (what `tritonclient.grpc`
speaks), served from the same ModelService as the HTTP app, in the same event loop: one service, two transports,
with the same batchers, versions, traffic split, errors and metrics.

    ServerLive / ServerReady / ServerMetadata, ModelReady / ModelMetadata     as GET /v2/health/..., /v2, /v2/models/...
    ModelInfer                                                                as POST .../infer
    ModelConfig / ModelStatistics                                             as GET .../config, .../stats
    RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload              the repository extension

ModelInfer takes each input from `raw_input_contents` (tritonclient's default: the binary extension's bytes, BYTES
elements each after its 4-byte little-endian length) or from its typed `contents` (fp32_contents, int64_contents,
bytes_contents, ...; FP16 and BF16 have none and come raw), and answers every output raw in
`raw_output_contents`, which is what tritonclient.grpc reads. Errors carry the HTTP app's messages (paths as REPO)
with the status codes of its HTTP statuses: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE, and anything
else INTERNAL with no detail (the log has it).

ModelConfig and ModelStatistics answer the HTTP routes' dicts (`app.model_config`, `app.model_statistics`) parsed
into Triton's messages (`json_format.ParseDict`), so the two transports cannot differ.

Bounded as the HTTP server is: a message larger than the server's largest body (`Limits.max_body_bytes`) is
refused by gRPC itself (RESOURCE_EXHAUSTED), and so is an answer that large; a ModelInfer larger than its model's
largest valid request (`app.infer_limit`, what HTTP refuses from Content-Length) is refused before its tensors are
decoded, with HTTP's message (INVALID_ARGUMENT); at most `Limits.grpc_max_rpcs` RPCs run at once (beyond,
RESOURCE_EXHAUSTED at once). A client whose deadline passes or that cancels gets its RPC's task cancelled: a
request still queued leaves its batcher's queue (`Batcher.infer`), and the model's statistics count it failed.
A stopping server lets the RPCs in flight finish for `Limits.drain_timeout`.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ..errors import CompilerError, InputError
from .app import (_STATUS, _VERSION, EXTENSIONS, infer_limit, model_config, model_metadata, model_statistics,
                  refuse_oversized, version_number)
from .limits import Limits
from .protocol import datatype, output_to_wire, tensor_from_values, tensor_from_wire
from .service import ModelService, NotReady, UnknownModel

log = logging.getLogger("compilers")

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}
# the typed contents field of each datatype (FP16 and BF16 have none: they come in raw_input_contents)
_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
           "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
           "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_ALL_FIELDS = sorted(set(_FIELDS.values()))


def status_of(exc: Exception, service: ModelService) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message of a request that raised, as the HTTP app answers it (its `_STATUS`)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return _CODES[status], service.public(str(exc))
    if isinstance(exc, CompilerError):        # an engine failure
        log.error("gRPC request failed: %s", exc)
    else:                                     # a bug
        log.error("gRPC request failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server's log has the details"


def _answers(method):
    """A servicer method whose exceptions become the RPC's status (`status_of`), as the HTTP app's `_error`."""
    @functools.wraps(method)
    async def wrapped(self: "Servicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as e:
            code, message = status_of(e, self.service)
        await context.abort(code, message)          # raises: the RPC ends with this status
    return wrapped


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's GRPCInferenceService over a ModelService (methods not here answer UNIMPLEMENTED)."""

    def __init__(self, service: ModelService, limits: Limits = Limits()):
        self.service = service
        self.limits = limits

    # -- health and metadata ----------------------------------------------------------------------------
    @_answers
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_answers
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    @_answers
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="compilers", version=_VERSION, extensions=EXTENSIONS)

    @_answers
    async def ModelReady(self, request, context):
        number = version_number(request.version)
        self.service.model(request.name)                # NOT_FOUND for a model the repository lacks
        try:
            self.service.version(request.name, number)
            ready = True
        except (NotReady, UnknownModel):
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    @_answers
    async def ModelMetadata(self, request, context):
        meta = model_metadata(self.service, request.name, version_number(request.version))
        tensors = lambda entries: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in entries]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    @_answers
    async def ModelConfig(self, request, context):
        config = model_config(self.service, request.name, version_number(request.version))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    @_answers
    async def ModelStatistics(self, request, context):
        number = version_number(request.version) if request.name else None
        stats = model_statistics(self.service, request.name, number)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    # -- inference --------------------------------------------------------------------------------------
    @_answers
    async def ModelInfer(self, request, context):
        name = request.model_name
        try:
            number = version_number(request.model_version)
            refuse_oversized(request.ByteSize(), *infer_limit(self.service, self.limits, name, number))
            started = time.perf_counter()
            inputs = self._inputs(request)
            outputs = self._requested(request)
        except InputError:                 # counted for a model served here, as the HTTP app counts them
            model = self.service.models.get(name)
            if model is not None:
                version = request.model_version if request.model_version in {str(v) for v in model.versions} else ""
                self.service.metrics.requests.labels(name, version, "invalid").inc()
            raise
        served, arrays = await self.service.infer(name, number, inputs, outputs)
        kinds = {s.name: datatype(s) for s in served.outputs}
        named = dict(zip(kinds, arrays))
        response = pb.ModelInferResponse(model_name=name, model_version=str(served.number), id=request.id)
        for out in outputs if outputs is not None else kinds:
            array = named[out]
            kind, blob = output_to_wire(array, kinds[out], out)
            response.outputs.add(name=out, datatype=kind, shape=array.shape)
            response.raw_output_contents.append(blob)
        self.service.metrics.request_seconds.labels(name, str(served.number)).observe(time.perf_counter() - started)
        return response

    def _inputs(self, request: Any) -> dict[str, Any]:
        """The request's inputs as named numpy arrays: all from raw_input_contents, or all from typed contents."""
        if not request.inputs:
            raise InputError("the request needs inputs: a non-empty list of tensors (name, shape, datatype and their "
                             "contents or raw_input_contents)")
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InputError(f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
                             "send raw contents for every input, or typed contents for every input")
        size = request.ByteSize()
        inputs = {}
        for i, tensor in enumerate(request.inputs):
            name, shape, kind = tensor.name, list(tensor.shape), tensor.datatype
            given = [f for f in _ALL_FIELDS if len(getattr(tensor.contents, f))]
            if raw:
                if given:
                    raise InputError(f"input {name!r} has both contents and raw_input_contents; send one")
                array = tensor_from_wire(raw[i], name, shape, kind, size, f"raw_input_contents[{i}]")
            else:
                field = _FIELDS.get(kind)
                if given and given != [field]:
                    takes = f"in {field} or raw_input_contents" if field else "only in raw_input_contents"
                    raise InputError(f"input {name!r}: datatype {kind} comes {takes}, not in {', '.join(given)}")
                if field is None and kind in ("FP16", "BF16"):
                    raise InputError(f"input {name!r}: datatype {kind} has no typed contents in the protocol; send "
                                     "it in raw_input_contents")
                values = getattr(tensor.contents, field) if field is not None else []
                array = tensor_from_values(values, name, shape, kind, size, field or "contents")
            if name in inputs:
                raise InputError(f"input {name!r} is given twice")
            inputs[name] = array
        return inputs

    @staticmethod
    def _requested(request: Any) -> tuple[str, ...] | None:
        names: list[str] = []
        for out in request.outputs:
            if out.name in names:
                raise InputError(f"output {out.name!r} is requested twice")
            names.append(out.name)
        return tuple(names) or None          # none named: every output, as in Triton

    # -- repository extension ---------------------------------------------------------------------------
    @_answers
    async def RepositoryIndex(self, request, context):
        rows = self.service.index()
        if request.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    @_answers
    async def RepositoryModelLoad(self, request, context):
        if set(request.parameters) - {"unload_dependents"}:
            raise InputError("load takes no config or files here: publish the artifact into the repository "
                             "(compilers publish ARTIFACT REPO/<model>), then load")
        await self.service.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(self, request, context):
        await self.service.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def address(host: str, port: int) -> str:
    """host:port as gRPC takes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(service: ModelService, host: str, port: int, limits: Limits = Limits()) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server for the service in the running event loop, and the port it listens on (port 0:
    a free one). Stop it with `await server.stop(limits.drain_timeout)`."""
    server = grpc.aio.server(maximum_concurrent_rpcs=limits.grpc_max_rpcs, options=[
        ("grpc.max_receive_message_length", limits.max_body_bytes),
        ("grpc.max_send_message_length", limits.max_body_bytes),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(service, limits), server)
    bound = server.add_insecure_port(address(host, port))
    if not bound:                                      # older grpcio answer 0 instead of raising
        raise RuntimeError(f"gRPC could not listen on {address(host, port)}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address(host, bound))
    return server, bound
