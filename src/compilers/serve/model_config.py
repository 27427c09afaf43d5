"""Triton's model configuration extension: a served version described as Triton's `ModelConfig` (the fields of a
config.pbtxt, as JSON), for `GET /v2/models/{m}[/versions/{v}]/config` and gRPC ModelConfig (the same dict, parsed
into tritonclient's `model_config_pb2.ModelConfig`, so the two transports cannot differ).

What it says, from what the server serves (the tensors clients send and get: a pipeline's texts or images, a
handler's declared tensors):
- `max_batch_size`: serving.toml's `[batching] max_batch_size` (at most the batch dim's compiled bound) when the
  Signature's batch dim leads every served input and output; then `dims` leave it out, as Triton's do, and a
  tensor that is only the batch dim has `dims` [] (its requests are shaped [rows]). Otherwise 0, and `dims` list
  every dim. Dynamic dims are -1.
- `data_type` in Triton's spelling (TYPE_FP32; BYTES is TYPE_STRING).
- `backend`: the artifact's backend, which runs it in this server; `platform` as the model metadata says it.
- `dynamic_batching` (when requests may share engine calls: max_batch_size above 1), `instance_group` (the
  `instances` engine calls at once, on the target's device), `version_policy` (serving.toml `[versions]`).

The Triton spellings (datatypes, dims, the dynamic batcher's and the version policy's fields) are made here and
used by the Triton export too (`export/triton/model.py`), so what `compilers serve` reports and what
`compilers export-triton` writes agree.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .batcher import Batching
from .protocol import Spec, datatype
from .repository import Versions

if TYPE_CHECKING:
    from .service import Version


def config_datatype(spec: Spec) -> str:
    """A tensor's `data_type` in a Triton model config: TYPE_ and its protocol datatype (BYTES: TYPE_STRING)."""
    name = datatype(spec)
    return "TYPE_STRING" if name == "BYTES" else "TYPE_" + name


def config_dims(shape: Sequence[int | str], batched: bool) -> list[int]:
    """A tensor's `dims` in a Triton model config: without its leading batch dim when the model batches (Triton's
    max_batch_size > 0); dynamic dims -1."""
    return [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]


def dynamic_batching(batching: Batching, max_batch_size: int) -> dict[str, Any]:
    """Triton's `dynamic_batching` for a model's [batching] table."""
    return {"max_queue_delay_microseconds": round(batching.max_queue_delay_ms * 1000),
            "preferred_batch_size": [n for n in batching.preferred_batch_sizes if n <= max_batch_size],
            "default_queue_policy": {"max_queue_size": batching.queue_size}}


def version_policy(versions: Versions) -> dict[str, Any]:
    """Triton's `version_policy` for a model's [versions] table."""
    if versions.policy == "latest":
        return {"latest": {"num_versions": versions.latest}}
    if versions.policy == "all":
        return {"all": {}}
    return {"specific": {"versions": list(versions.specific)}}


def platform(version: Version) -> str:
    """What the model metadata and the config name as the platform: this server running the artifact's backend."""
    return f"compilers_{version.target.backend}"


def triton_config(name: str, version: Version, versions: Versions) -> dict[str, Any]:
    """The served version's Triton model config (see the module doc), as Triton's JSON."""
    sig = version.signature
    served = (*version.inputs, *version.outputs)
    leads = sig.batch is not None and all(s.shape and s.shape[0] == sig.batch for s in served)
    bound = sig.dims[sig.batch].max if leads else None
    max_batch = 0 if not leads else min(version.batching.max_batch_size, bound or version.batching.max_batch_size)
    tensors = lambda specs: [{"name": s.name, "data_type": config_datatype(s),      # noqa: E731
                              "dims": config_dims(s.shape, max_batch > 0)} for s in specs]
    config: dict[str, Any] = {
        "name": name, "platform": platform(version), "backend": version.target.backend,
        "version_policy": version_policy(versions), "max_batch_size": max_batch,
        "input": tensors(version.inputs), "output": tensors(version.outputs),
        "instance_group": [{"count": version.batching.instances,
                            "kind": "KIND_CPU" if version.target.device == "cpu" else "KIND_GPU"}],
        "parameters": {"target": {"string_value": version.target.name}},
    }
    if max_batch > 1:
        config["dynamic_batching"] = dynamic_batching(version.batching, max_batch)
    return config
