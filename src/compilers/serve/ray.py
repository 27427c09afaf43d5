"""The model repository on Ray Serve: the same Open Inference Protocol app as `compilers serve` (app.py over
a ModelService), with the versions' engines running in Ray Serve replicas instead of the server's process.

- One ingress deployment, `compilers`, runs the HTTP app. Its ModelService batches each version's requests with
  the Batcher of `compilers serve` (`[batching]`: max_batch_size, max_queue_delay_ms, padding, queue_size), so
  routing, the traffic split, errors, batching, /metrics and Triton's statistics are the ones `compilers serve`
  has. An engine call is one call of the version's deployment with the whole batch (`RayEngines`).
- One deployment per live model version, `<model>-v<version>`. Each replica loads the artifact itself from the
  repository path (a volume every node mounts on a cluster; no engine is pickled), with serving.toml's
  `[engine]` options, and runs the batches it is sent one at a time; it holds BATCHES_PER_REPLICA (the next
  one waits there, so the engine never waits for the ingress). The ingress keeps that many batches in flight
  per replica it may have.
- Replicas per version from `[replicas]`: a fixed count, or Ray Serve's autoscaling between min and max on
  `target_ongoing_requests` (batches in flight per replica). A replica that dies mid-call fails the requests of
  its batch with 503 (retry); Ray Serve starts another.
- With `grpc_port` (`compilers serve --ray --grpc-port P`), Ray Serve's gRPC ingress serves Triton's gRPC service
  too, by the ingress's methods named after its RPCs (`ray_grpc`), over the same ModelService as the HTTP app.
- Ray instances started here (`running`, `compilers serve --ray` without --address) use Ray Serve's
  high-throughput mode (`THROUGHPUT`); a cluster sets it in its pods (deploy/kuberay/rayservice.yaml).

Why this shape (benchmarks/serve_ray.py, profiled with py-spy; benchmarks/README.md has the figures): with
Ray Serve's `@serve.batch` in the replicas, each request crossed Ray's Python HTTP proxy, the ingress and a
handle's router on its own, ~10 ms of CPU per request outside the engine on a 2-core box, and requests reached
the replica one or two at a time. Batching in the ingress makes one replica call per batch; HAProxy with direct
ingress removes the proxy actor's per-request calls.

On Ray the versions are the application's: the repository's load re-reads serving.toml (traffic, which
deployed versions are live) but a version without a deployment needs a redeploy (`compilers serve --ray`
again, or the RayService's serveConfigV2). Needs the `ray` extra.

    compilers serve REPO --ray [--grpc-port 8001] [--address ray://head:10001]
    # or in a Serve config (KubeRay): import_path compilers.serve.ray:build, args {repository: /models}
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from ray import serve
from ray.exceptions import RayActorError

from ..artifact import manifest_records, read_manifest
from ..errors import ConfigError
from ..pipeline import CompiledPipeline
from ..runtime import CALL_OPTIONS, check_finite, nonfinite_refused
from .app import create_app
from .batcher import Batcher, BatchStats
from .limits import Limits
from .repository import ModelEntry, Repository
from .server import free_port
from .service import ModelService, Unavailable, Version

try:                                   # the grpc extra: Triton's gRPC service too
    from .grpc import Servicer
    from .ray_grpc import RPCs, SERVICER_FUNCTION
except ModuleNotFoundError:
    Servicer, RPCs, SERVICER_FUNCTION = None, object, None

log = logging.getLogger("compilers")

INGRESS = "compilers"
INGRESS_CONCURRENCY = 2048
# Ray Serve's high-throughput mode (Ray 2.55 and later), for the Ray instances this module starts: HAProxy takes the
# HTTP port and hands requests straight to the ingress replica's own HTTP server ("direct ingress"), instead of
# Ray's Python proxy actor, which calls the ingress for each request and is called back for its body; replicas
# talk gRPC, and the router and user code run in each replica's own event loop. Set before Ray starts (a cluster's
# pods need them in their environment: deploy/kuberay/rayservice.yaml); a value already set is kept.
THROUGHPUT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
QUICK_STOP = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
BATCHES_PER_REPLICA = 2      # batches a replica holds: one running, the next one waiting
_RETRIABLE: tuple[type[BaseException], ...] = (RayActorError,)
try:                                   # names that moved between Ray releases
    from ray.exceptions import ActorUnavailableError
    from ray.serve.exceptions import BackPressureError      # the deployment's queue is full
    _RETRIABLE += (ActorUnavailableError, BackPressureError)
except ImportError:                    # pragma: no cover
    pass


def deployment_name(model: str, version: int) -> str:
    return f"{model}-v{version}"


class VersionReplica:
    """A Ray Serve replica of one model version: loads the artifact and runs the batches the ingress sends it, one
    at a time (the engine uses the replica's CPUs for each; replicas are the parallelism)."""

    def __init__(self, repository: str, model: str, version: int):
        repo = Repository(repository)
        entry = repo.model(model)
        loaded = repo.load_version(model, version, options=entry.config.engine)
        # a pipeline's tensor model: RayEngines.open refuses pipelines (the ingress does not pre-process yet)
        self.model = loaded.model if isinstance(loaded, CompiledPipeline) else loaded
        self.engine = asyncio.Lock()
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, flat: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
        """A whole batch (flat inputs, already checked and combined by the ingress) -> its outputs, and which
        replica ran it."""
        async with self.engine:
            return await asyncio.to_thread(self.model.run_flat, flat), self.replica


class RayEngines:
    """ModelService's engines seam on Ray Serve: each version has the ingress's own dynamic Batcher, as in
    `compilers serve`, whose engine call is a call of the version's deployment with the whole batch."""

    def __init__(self, handles: Mapping[str, Any]):
        self.handles = dict(handles)

    async def open(self, repository: Repository, entry: ModelEntry, number: int,
                   observe: Callable[[BatchStats], None]) -> Version:
        handle = self.handles.get(deployment_name(entry.name, number))
        if handle is None:
            raise ConfigError(f"model {entry.name!r} version {number} has no deployment in this Ray Serve "
                              f"application (deployed: {', '.join(sorted(self.handles)) or 'none'}); redeploy it")
        where = repository.path / entry.name / str(number)
        if entry.config.handler is not None:
            raise ConfigError(f"model {entry.name!r} has a handler (serving.toml [handler]): Ray Serve does not run "
                              "handlers yet; serve it with `compilers serve --handlers` (without --ray)")
        manifest = read_manifest(where)
        if "pipeline" in manifest:
            raise ConfigError(f"model {entry.name!r} version {number} is a pipeline (texts or images in): Ray Serve "
                              "does not serve pipelines yet; serve it with `compilers serve` (without --ray)")
        target, signature, report = manifest_records(where, manifest)
        target = target.with_(**{k: v for k, v in entry.config.engine.items() if k in CALL_OPTIONS})
        refused = nonfinite_refused(signature, target, report.validation)

        def check(flat: list[np.ndarray]) -> None:     # each request, in the ingress, before it is queued
            signature.check(flat)
            check_finite(flat, refused, signature, target)

        loop = asyncio.get_running_loop()       # a handle is called from its event loop (Ray's router may run in it)

        async def call(flat: list[np.ndarray]) -> list[np.ndarray]:
            outputs, _ = await handle.remote(flat)
            return outputs

        def run(flat: list[np.ndarray]) -> list[np.ndarray]:      # one batch, in a batcher worker thread
            try:
                return asyncio.run_coroutine_threadsafe(call(flat), loop).result()
            except _RETRIABLE as e:
                raise Unavailable(f"model {entry.name!r} version {number}: its replica failed ({type(e).__name__}); "
                                  f"retry") from None

        batching = entry.config.batching
        # batches in flight: BATCHES_PER_REPLICA for each replica there may be (one running, the next waiting)
        workers = BATCHES_PER_REPLICA * entry.config.replicas.max
        batcher = Batcher(run, signature, replace(batching, instances=workers), on_batch=observe, check=check)
        for said in (batcher.combiner.alone, batcher.combiner.overridden):
            if said:
                log.warning("model %s version %s: %s", entry.name, number, said)
        await batcher.start()
        return Version(number, signature, target, batching, batcher.infer, batcher.stop)


@serve.ingress()
class Ingress(RPCs):
    """The HTTP app of `compilers serve`, on Ray Serve, over the versions' deployment handles; and, with the grpc
    extra, Triton's gRPC service (`ray_grpc`) from the same ModelService, for Ray Serve's gRPC ingress. The app's
    lifespan starts the service (loads the models) before Ray Serve sends the replica requests of either kind."""

    def __init__(self, repository: str, handles: dict[str, Any]):
        self.limits = Limits()
        self.service = ModelService(Repository(repository), engines=RayEngines(handles))
        self.servicer = Servicer(self.service, self.limits) if Servicer is not None else None

    def __serve_build_asgi_app__(self):
        return create_app(self.service, limits=self.limits)


def build(args: Mapping[str, Any]) -> Any:
    """The Ray Serve application for a repository (`args`: {"repository": path}); the Serve config's
    `import_path` is `compilers.serve.ray:build`. A model whose serving.toml or layout is broken is left out
    of the deployments; the ingress reports it, with why, in the repository index."""
    if "repository" not in args:
        raise ConfigError('the Ray Serve application needs args {"repository": "/path/to/repository"}')
    repo = Repository(Path(args["repository"]).resolve())
    handles = {}
    for name in repo.models():
        try:
            entry = repo.model(name)
        except ConfigError as e:
            log.error("model %s is not deployed: %s", name, e)
            continue
        r = entry.config.replicas
        for number in entry.live:
            options: dict[str, Any] = {
                "name": deployment_name(name, number), "ray_actor_options": {"num_cpus": r.cpus},
                "max_ongoing_requests": BATCHES_PER_REPLICA}
            if r.min == r.max:
                options["num_replicas"] = r.max
            else:
                options["autoscaling_config"] = {"min_replicas": r.min, "max_replicas": r.max,
                                                 "target_ongoing_requests": r.target_ongoing_requests}
            handles[deployment_name(name, number)] = serve.deployment(VersionReplica).options(**options).bind(
                str(repo.path), name, number)
    # the ingress only awaits the versions: it must take many requests at once (Ray's default is 5), or it, not
    # the replicas' batching, would bound how many requests are in flight
    ingress = serve.deployment(Ingress).options(name=INGRESS, ray_actor_options={"num_cpus": 0},
                                                max_ongoing_requests=INGRESS_CONCURRENCY)
    return ingress.bind(str(repo.path), handles)


def _environment(values: Mapping[str, str]) -> None:
    """Settings for the processes of a local Ray instance, before it starts (they inherit this environment);
    a value already set is kept."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


def _ingresses(host: str, port: int, grpc_port: int | None) -> dict[str, Any]:
    """serve.start's options: HTTP on host:port, and with grpc_port Triton's gRPC service on host:grpc_port (0: a
    free one) by Ray Serve's gRPC ingress."""
    options: dict[str, Any] = {"http_options": {"host": host, "port": port}}
    if grpc_port is not None:
        if SERVICER_FUNCTION is None:
            raise ConfigError("gRPC on Ray Serve needs the grpc extra: pip install 'compilers[serve,ray,grpc]'")
        grpc_port = grpc_port or free_port(host)
        options["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
        log.info("gRPC (Open Inference Protocol) on Ray Serve's gRPC ingress, port %s", grpc_port)
    return options


@contextlib.contextmanager
def running(repository: str | Path, host: str = "127.0.0.1", port: int = 0, *, grpc_port: int | None = None,
            num_cpus: int | None = None) -> Iterator[int]:
    """The repository on a new local Ray instance started in this process, serving inside the block (tests,
    notebooks, benchmarks); yields the HTTP port (port 0: a free one). `grpc_port`: Triton's gRPC service on that
    port too. Serve and Ray stop after it."""
    import ray
    port = port or free_port(host)
    options = _ingresses(host, port, grpc_port)
    # no 30 s drain of the ingress on stop for an outer load balancer: there is none but HAProxy
    _environment({**THROUGHPUT, **QUICK_STOP})
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(**options)
        serve.run(build({"repository": str(repository)}), name=INGRESS, route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_on_ray(repository: str, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                 grpc_port: int | None = None) -> None:
    """Run the repository's application on Ray (a new local instance, or the cluster at `address`) until
    interrupted; `grpc_port`: Triton's gRPC service on that port too (0: a free one)."""
    import ray
    options = _ingresses(host, port, grpc_port)
    if address is None:
        _environment(THROUGHPUT)
    ray.init(address=address, ignore_reinit_error=True)
    try:
        serve.start(**options)
        serve.run(build({"repository": repository}), name=INGRESS, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("interrupted: removing the application")
    finally:
        serve.delete(INGRESS)          # replicas finish what they hold (graceful_shutdown_timeout_s)
        if address is None:            # the local Ray instance this started
            serve.shutdown()
            ray.shutdown()
