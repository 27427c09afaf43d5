"""Running the app: `serve` in the foreground (the CLI; SIGINT / SIGTERM stop taking connections, finish the
requests in flight and drain every queue), or `running` in a background thread on a free port (tests,
notebooks, benchmarks)."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Iterator

import uvicorn
import uvicorn.logging

from .app import create_app
from .connections import protocol
from .limits import Limits
from .repository import Repository
from .service import ModelService


def _config(app, host: str, port: int, log_level: str, limits: Limits) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, http=protocol(limits), timeout_keep_alive=limits.idle_timeout,
                          log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=limits.drain_timeout)


def serve(repository: str | Repository | ModelService, host: str = "127.0.0.1", port: int = 8000, *,
          limits: Limits = Limits(), log_level: str = "info", handlers: bool = False,
          grpc_port: int | None = None) -> None:
    """Serve the repository until interrupted (SIGINT / SIGTERM: in-flight requests finish, queues drain).
    `handlers`: run the handler code models pin in their serving.toml. `grpc_port`: serve it over gRPC too, on
    this port of `host` (the same models, batchers and metrics)."""
    log = logging.getLogger("compilers")
    if not log.handlers:                  # what loaded, what failed: in uvicorn's format, beside its lines
        handler = logging.StreamHandler()
        handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
    grpc = (host, grpc_port) if grpc_port is not None else None
    app = create_app(repository, limits=limits, handlers=handlers, grpc=grpc, freeze_startup=True)
    uvicorn.Server(_config(app, host, port, log_level, limits)).run()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a server started right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Running:
    """A server started by `running`: its `url` (http://host:port), `service`, and `grpc_port` (None: no gRPC)."""

    def __init__(self, server: uvicorn.Server, service: ModelService, grpc_port: int | None = None):
        self.server, self.service = server, service
        self.host, self.port = server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.grpc_port = grpc_port


@contextlib.contextmanager
def running(repository: str | Repository | ModelService, host: str = "127.0.0.1", port: int = 0, *,
            limits: Limits = Limits(), log_level: str = "warning", start_timeout: float = 120.0,
            grpc_port: int | None = None) -> Iterator[Running]:
    """A server in a background thread (port 0: a free one), up and with its models loaded inside the block,
    stopped and drained after it. `grpc_port`: serve gRPC too (0: on a free port, `Running.grpc_port`)."""
    app = create_app(repository, limits=limits, grpc=(host, grpc_port) if grpc_port is not None else None)
    server = uvicorn.Server(_config(app, host, port, log_level, limits))
    thread = threading.Thread(target=server.run, name="compilers-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {start_timeout:.0f} s")
        time.sleep(0.01)
    try:
        yield Running(server, app.state.service, app.state.grpc_port)
    finally:
        server.should_exit = True
        thread.join(limits.drain_timeout + 10)
