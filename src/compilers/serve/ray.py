"""The model repository on Ray Serve: the same Open Inference Protocol app as `compilers serve` (app.py over
a ModelService), with the versions running in Ray Serve replicas instead of the server's process.

- One deployment per live model version, `<model>-v<version>`. Each replica loads the artifact itself from the
  repository path (a volume every node mounts on a cluster; no engine is pickled), with serving.toml's
  `[engine]` options, and batches with Ray Serve's own `@serve.batch`: `max_batch_size` and
  `max_queue_delay_ms` from `[batching]`. Inside a batch, requests share engine calls exactly as in
  `compilers serve` (the same Combiner: compatible shapes, declared padding, at most max_batch_size rows).
- Replicas per version from `[replicas]`: a fixed count, or Ray Serve's autoscaling between min and max on
  `target_ongoing_requests`.
- One ingress deployment, `compilers`, runs the HTTP app. Its ModelService reaches the versions through
  deployment handles (`RayEngines`), so routing, the traffic split, errors and /metrics are the ones
  `compilers serve` has. The batch sizes the replicas ran come back with the answers and land in the
  ingress's `compilers_batch_size` histogram. A replica that dies mid-request is answered 503 (retry).

On Ray the versions are the application's: the repository's load re-reads serving.toml (traffic, which
deployed versions are live) but a version without a deployment needs a redeploy (`compilers serve --ray`
again, or the RayService's serveConfigV2). Needs the `ray` extra.

    compilers serve REPO --ray [--address ray://head:10001]
    # or in a Serve config (KubeRay): import_path compilers.serve.ray:build, args {repository: /models}
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from ray import serve
from ray.exceptions import RayActorError

from ..artifact import manifest_records, read_manifest
from ..errors import ConfigError, InputError
from ..pipeline import CompiledPipeline
from ..runtime import CALL_OPTIONS, check_finite, nonfinite_refused
from .app import create_app
from .batcher import BatchStats, Combiner
from .repository import ModelEntry, Repository
from .server import free_port
from .service import ModelService, Unavailable, Version

log = logging.getLogger("compilers")

INGRESS = "compilers"
INGRESS_CONCURRENCY = 2048
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
    """A Ray Serve replica of one model version: loads the artifact and answers batches of requests."""

    def __init__(self, repository: str, model: str, version: int):
        repo = Repository(repository)
        entry = repo.model(model)
        loaded = repo.load_version(model, version, options=entry.config.engine)
        # a pipeline's tensor model: RayEngines.open refuses pipelines (the ingress does not pre-process yet)
        self.model = loaded.model if isinstance(loaded, CompiledPipeline) else loaded
        self.combiner = Combiner(self.model.signature, entry.config.batching, self.model.check_inputs)
        if self.combiner.alone:
            log.warning("model %s version %s: %s", model, version, self.combiner.alone)
        self.infer.set_max_batch_size(entry.config.batching.max_batch_size)
        self.infer.set_batch_wait_timeout_s(entry.config.batching.max_queue_delay_ms / 1e3)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, flat: list[np.ndarray]) -> tuple[list[np.ndarray], dict | None]:
        result = await self.infer(flat)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch
    async def infer(self, requests: list[list[np.ndarray]]) -> list[Any]:
        """Requests (flat inputs) -> (outputs, stats of the engine call for the first request of each call,
        else None), or the request's own error."""
        results: list[Any] = [None] * len(requests)
        admitted = {}
        for i, flat in enumerate(requests):
            try:
                admitted[i] = self.combiner.admit(flat)
            except InputError as e:
                results[i] = e
        order = sorted(admitted)
        for call in self.combiner.groups([(admitted[i][2], admitted[i][1]) for i in order]):
            members = [order[k] for k in call]
            group = [(admitted[i][0], admitted[i][1], admitted[i][3]) for i in members]
            started = time.perf_counter()
            try:
                outputs = await asyncio.to_thread(self.combiner.call, self.model.run_flat, group)
            except Exception as e:        # the engine failed: each request of the call gets the error
                for i in members:
                    results[i] = e
                continue
            stats = {"rows": sum(rows for _, rows, _ in group), "requests": len(group),
                     "infer_seconds": time.perf_counter() - started, "replica": self.replica}
            for n, i in enumerate(members):
                results[i] = (outputs[n], stats if n == 0 else None)
        return results


class RayEngines:
    """ModelService's engines seam on Ray Serve: a version is its deployment's handle."""

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

        def check(flat: list[np.ndarray]) -> None:
            signature.check(flat)
            check_finite(flat, refused, signature, target)
        combiner = Combiner(signature, entry.config.batching, check)

        async def infer(flat: list[np.ndarray]) -> list[np.ndarray]:
            combiner.admit(flat)                      # a bad request is refused here (400), not in a replica
            try:
                outputs, stats = await handle.remote(flat)
            except _RETRIABLE as e:
                raise Unavailable(f"model {entry.name!r} version {number}: its replica failed ({type(e).__name__}); "
                                  f"retry") from None
            if stats is not None:
                observe(BatchStats(stats["rows"], stats["requests"], (), stats["infer_seconds"]))
            return outputs

        async def stop() -> None:                     # Ray Serve owns the replicas' life cycle
            return None

        return Version(number, signature, target, entry.config.batching, infer, stop)


@serve.ingress()
class Ingress:
    """The HTTP app of `compilers serve`, on Ray Serve, over the versions' deployment handles."""

    def __init__(self, repository: str, handles: dict[str, Any]):
        self.repository = repository
        self.handles = handles

    def __serve_build_asgi_app__(self):
        return create_app(ModelService(Repository(self.repository), engines=RayEngines(self.handles)))


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
        r, batching = entry.config.replicas, entry.config.batching
        for number in entry.live:
            options: dict[str, Any] = {
                "name": deployment_name(name, number), "ray_actor_options": {"num_cpus": r.cpus},
                "max_ongoing_requests": max(4 * batching.max_batch_size, 16),
                "max_queued_requests": batching.queue_size}
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


@contextlib.contextmanager
def running(repository: str | Path, host: str = "127.0.0.1", port: int = 0, *,
            num_cpus: int | None = None) -> Iterator[int]:
    """The repository on a new local Ray instance started in this process, serving inside the block (tests,
    notebooks, benchmarks); yields the HTTP port (port 0: a free one). Serve and Ray stop after it."""
    import ray
    port = port or free_port(host)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build({"repository": str(repository)}), name=INGRESS, route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_on_ray(repository: str, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """Run the repository's application on Ray (a new local instance, or the cluster at `address`) until
    interrupted."""
    import ray
    ray.init(address=address, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build({"repository": repository}), name=INGRESS, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("interrupted: removing the application")
    finally:
        serve.delete(INGRESS)          # replicas finish what they hold (graceful_shutdown_timeout_s)
        if address is None:            # the local Ray instance this started
            serve.shutdown()
            ray.shutdown()
