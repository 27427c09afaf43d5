"""Triton's `inference.GRPCInferenceService` on Ray Serve's gRPC ingress, from the ingress's own ModelService:
the same `grpc.Servicer` as `compilers serve --grpc-port`, so the answers, errors and metrics are the same.

Ray Serve's gRPC ingress (`serve.start(grpc_options=...)`, with SERVICER_FUNCTION) decodes each RPC's request
and calls the ingress deployment's method named after the RPC with it and its `RayServegRPCContext`; with Ray
Serve's high-throughput mode HAProxy takes the gRPC port and hands RPCs straight to the ingress replica's own
gRPC server. `RPCs` holds those methods, one for each RPC of the service's descriptor, each unary one delegating to
the ingress's `servicer` with a `RayContext`: the servicer ends a request that fails with `context.abort(code,
message)`, which here sets the status on Ray's context and answers an empty response of the RPC's type, what
Ray sends with that status (Ray takes no aborting context). Ray's ingress, not the servicer, bounds what
`compilers serve --grpc-port` bounds with grpcio (see docs/serving.md, "gRPC on Ray Serve"): its messages may be
up to RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (2 GiB by default; a ModelInfer larger than its model's largest valid
request is still refused with HTTP's message), the RPCs at once are the ingress's max_ongoing_requests (beyond,
RESOURCE_EXHAUSTED). ModelStreamInfer (streaming) answers UNIMPLEMENTED, as the servicer does.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
from ray.serve.grpc_util import RayServegRPCContext
from tritonclient.grpc import service_pb2 as pb

SERVICER_FUNCTION = "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class Ended(Exception):
    """The RPC's status is set on Ray's context (`RayContext.abort`)."""


class RayContext:
    """What `grpc.Servicer` uses of a grpc.aio context, on Ray Serve's."""

    def __init__(self, context: RayServegRPCContext):
        self.context = context

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.set_code(code)
        self.set_details(details)
        raise Ended()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.context.set_code(code)

    def set_details(self, details: str) -> None:
        self.context.set_details(details)

    def peer(self) -> str:
        return self.context.peer()

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.context.invocation_metadata()


def _rpc(name: str, response: type) -> Callable[..., Any]:
    async def rpc(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        # Ray passes its context to a parameter named grpc_context; an RPC the servicer lacks sets UNIMPLEMENTED
        # and raises NotImplementedError (grpcio's generated base class)
        try:
            return await getattr(self.servicer, name)(request, RayContext(grpc_context))
        except (Ended, NotImplementedError):
            return response()          # sent with the status set on grpc_context
    rpc.__name__ = rpc.__qualname__ = name
    return rpc


async def _unimplemented_stream(self, requests: Any, grpc_context: RayServegRPCContext) -> Any:
    """A streaming RPC (ModelStreamInfer): UNIMPLEMENTED, as the servicer answers it (`compilers serve` serves no
    decoupled models); Ray Serve would otherwise answer UNKNOWN, naming the ingress's methods."""
    grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    grpc_context.set_details("Method not implemented!")
    return
    yield                              # an async generator: what Ray Serve calls for a streaming RPC


# the ingress's RPC methods (a base class of it); it holds the grpc.Servicer as `servicer`
RPCs = type("RPCs", (), {
    m.name: _unimplemented_stream if m.client_streaming or m.server_streaming
    else _rpc(m.name, getattr(pb, m.output_type.name)) for m in SERVICE.methods})
