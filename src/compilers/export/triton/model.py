"""The backend-independent part of a Triton export: the config (names, dims, max_batch_size, batching, instances,
version policy, the comment header), the serving config it comes from, and the staged write into the model
directory. What differs per backend comes from the backend's `TritonBackend` in `BACKENDS`."""
from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...artifact import manifest_records, verify
from ...backends import get_backend
from ...errors import ArtifactError, BackendUnavailable, ConfigError, InputError, TargetError
from ...files import remove, staging_dir, swapped_in
from ...serve.model_config import config_datatype, config_dims, dynamic_batching, version_policy
from ...serve.repository import CONFIG, ServingConfig, read_config, read_config_file, version_number
from ...settings import parse, runtime_options
from ...signature import Signature, TensorSpec
from ...target import Target
from . import inductor, onnxruntime, openvino, torchscript
from .base import Export, TritonBackend

CONFIG_FILE = "config.pbtxt"

# artifact backend -> how its artifacts become a Triton model: a new backend is a module here and a line below
BACKENDS: dict[str, TritonBackend] = {
    "onnxruntime": onnxruntime.TRITON,
    "openvino": openvino.TRITON,
    "torchscript": torchscript.TRITON,
    "inductor": inductor.TRITON,
}


@dataclass(frozen=True)
class TritonModel:
    """What an export writes: the config (a `ModelConfig` message and its text) and the version directory's
    files (name -> source file, or the bytes to write where the file had to change)."""

    name: str
    backend: str
    config: Any                       # tritonclient.grpc.model_config_pb2.ModelConfig
    text: str                         # config.pbtxt: comment header + text_format of `config`
    files: Mapping[str, Path | bytes]
    notes: tuple[str, ...]            # in the header: settings Triton expresses differently or not at all
    caveats: tuple[str, ...]          # notes that change what the model computes (also warned)


def model_config_pb2() -> Any:
    """Triton's ModelConfig protobuf module (shipped in tritonclient)."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except ImportError as e:
        raise BackendUnavailable(f"export-triton builds config.pbtxt with Triton's ModelConfig protobuf from "
                                 f"tritonclient ({e}); pip install 'tritonclient[grpc]'") from None
    return pb


def triton_model(artifact: str | os.PathLike, name: str, serving: ServingConfig | None = None, *,
                 serving_source: str = "defaults (no serving.toml)", version: int | None = None) -> TritonModel:
    """The Triton config and files for the artifact at `artifact`, served as model `name`; writes nothing.

    ArtifactError for an artifact Triton cannot run (AOTInductor, tensors Triton cannot describe, names a
    backend would not find); ConfigError for serving.toml [engine] options the backend cannot change at load."""
    path = Path(artifact)
    manifest = verify(path)
    target, signature, _ = manifest_records(path, manifest)
    backend = BACKENDS.get(target.backend)
    if backend is not None and backend.refusal is not None:
        raise ArtifactError(backend.refusal(path, target, manifest))
    if backend is None:
        served = sorted(b for b, triton in BACKENDS.items() if triton.refusal is None)
        raise ArtifactError(f"{path}: backend {target.backend!r} has no Triton backend; export-triton takes "
                            f"artifacts of {', '.join(served)}")
    serving = serving or ServingConfig()
    pb = model_config_pb2()
    notes: list[str] = []
    caveats: list[str] = []
    if "pipeline" in manifest:
        pre = manifest["pipeline"].get("pre", {}) if isinstance(manifest["pipeline"], dict) else {}
        caveats.append(f"the artifact is a pipeline ({pre.get('kind', '?')} in), but Triton runs only its tensor model "
                       f"({', '.join(s.name for s in signature.inputs)} in; the post-processing compiled into the graph "
                       "included): its pre-processing and labels are not exported; pre-process in the client, or "
                       "serve the pipeline with `compilers serve`")
    settings = _settings(target, serving, serving_source)

    config = pb.ModelConfig(name=name, backend=backend.name, default_model_filename=backend.files[0])
    if backend.platform:
        config.platform = backend.platform
    max_batch = _max_batch_size(signature, serving, notes)
    config.max_batch_size = max_batch
    names = _names(signature, backend)
    for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            io = getattr(config, kind).add(name=names[spec.name], data_type=_data_type(pb, spec, backend, path))
            dims = _dims(spec, max_batch, path)
            if dims:
                io.dims.extend(dims)
            else:      # batch-only tensor: the API shape is [batch, 1] (Triton's documented `reshape` use)
                io.dims.append(1)
                io.reshape.SetInParent()
    from google.protobuf import json_format, text_format
    if max_batch > 1:
        json_format.ParseDict(dynamic_batching(serving.batching, max_batch), config.dynamic_batching)
        if serving.batching.pad:
            notes.append(f"[batching.pad] ({', '.join(serving.batching.pad)}) has no Triton equivalent: the dynamic "
                         "batcher joins only requests whose dims match apart from the batch dim")
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=serving.batching.instances)
    json_format.ParseDict(version_policy(serving.versions), config.version_policy)
    if serving.traffic:
        notes.append("[traffic] (a canary split) has no Triton equivalent: a request without a version goes to the "
                     "newest live version")

    export = Export(path, target, signature, settings, config, max_batch, {f: path / f for f in backend.files},
                    notes, caveats)
    backend.configure(export)

    header = _header(name, path, target, manifest, signature, config, serving_source, version, notes)
    text = header + text_format.MessageToString(config)
    if text_format.Parse(text, pb.ModelConfig()) != config:      # the header must stay comments only
        raise AssertionError("config.pbtxt does not parse back to the config it was written from")
    return TritonModel(name, backend.name, config, text, export.files, tuple(notes), tuple(caveats))


def export_triton(artifact: str | os.PathLike, version_dir: str | os.PathLike,
                  serving: str | os.PathLike | ServingConfig | None = None, *, force: bool = False) -> Path:
    """Write the artifact at `artifact` as version `version_dir` (`REPO/<model>/<version>`, a positive integer) of
    a Triton model, with `REPO/<model>/config.pbtxt`, and return `version_dir`.

    `serving`: a serving.toml path (or a ServingConfig); by default `REPO/<model>/serving.toml` when present, else
    the defaults. The version and the config are staged in a hidden directory inside the model directory and
    renamed into place: a failed export leaves the model directory as it was. An existing version, or a
    config.pbtxt that other versions use and this artifact would change, is replaced only with `force`."""
    version_dir = Path(version_dir)
    version = version_number(version_dir.name)
    if version is None:
        raise InputError(f"{version_dir}: the last part must be a version number, a positive integer without "
                         f"leading zeros, as Triton reads REPO/<model>/<version> (e.g. repo/mlp/1)")
    model_dir = version_dir.parent
    name = model_dir.resolve().name
    config, source = _serving_config(serving, model_dir)
    model = triton_model(artifact, name, config, serving_source=source, version=version)
    if (version_dir.exists() or version_dir.is_symlink()) and not force:
        raise ArtifactError(f"{version_dir} exists; pass force=True (--force) to replace that version, or export "
                            f"to another version number")
    if not force:
        _check_other_versions(model_dir, version, model)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(model_dir, ".triton-export-")
    try:
        staged = staging / "version"
        staged.mkdir()
        for file, source_file in model.files.items():
            if isinstance(source_file, bytes):
                (staged / file).write_bytes(source_file)
            else:
                shutil.copyfile(source_file, staged / file)
        (staging / CONFIG_FILE).write_text(model.text)
        with swapped_in(staged, version_dir):      # the old version comes back if the config cannot follow
            os.replace(staging / CONFIG_FILE, model_dir / CONFIG_FILE)
    finally:
        remove(staging)
    for caveat in model.caveats:
        warnings.warn(caveat, RuntimeWarning, stacklevel=2)
    return version_dir


# -- config ---------------------------------------------------------------------------------------------

def _data_type(pb: Any, spec: TensorSpec, backend: TritonBackend, path: Path) -> int:
    name = config_datatype(spec)
    if name not in backend.types:
        raise ArtifactError(f"{path}: tensor {spec.name!r} is {str(spec.dtype).removeprefix('torch.')}, which the "
                            f"Triton {backend.name} backend does not take ({', '.join(sorted(backend.types))}); "
                            "cast it in the model, or compile for another backend")
    return pb.DataType.Value(name)


def _dims(spec: TensorSpec, max_batch: int, path: Path) -> list[int]:
    if not spec.shape:
        raise ArtifactError(f"{path}: tensor {spec.name!r} is a scalar (shape ()), and Triton has no scalar tensors "
                            f"in a model without batching; return it as shape (1,) (x.reshape(1))")
    if 0 in spec.shape:
        raise ArtifactError(f"{path}: tensor {spec.name!r} has shape {tuple(spec.shape)}; Triton dims must be >= 1 "
                            "or -1 (variable), never 0")
    return config_dims(spec.shape, max_batch > 0)


def _max_batch_size(signature: Signature, serving: ServingConfig, notes: list[str]) -> int:
    """serving.toml's max_batch_size when the batch dim leads every tensor, else 0 (Triton batches only a leading
    dim that every input and output has)."""
    batch = signature.batch
    specs = signature.inputs + signature.outputs
    if batch is None:
        notes.append("max_batch_size 0: the Signature has no batch dim, so Triton does not batch requests")
        return 0
    lacking = [s.name for s in specs if not s.shape or s.shape[0] != batch]
    if lacking:
        notes.append(f"max_batch_size 0: Triton batches only along a first dim that every input and output has, and "
                     f"batch dim {batch!r} does not lead {', '.join(lacking)}; dims list every dim")
        return 0
    wanted = serving.batching.max_batch_size
    bound = signature.dims[batch].max
    if bound is not None and wanted > bound:
        notes.append(f"max_batch_size {bound}: serving.toml asks {wanted}, but the artifact was compiled for "
                     f"{batch} <= {bound}")
        return bound
    return wanted


def _names(signature: Signature, backend: TritonBackend) -> dict[str, str]:
    """Signature tensor name -> Triton tensor name: the backend's `tensor_name` of each input's and each output's
    position, or else the Signature's name."""
    return {spec.name: backend.tensor_name(spec.name, i) if backend.tensor_name else spec.name
            for group in (signature.inputs, signature.outputs) for i, spec in enumerate(group)}


def _check_other_versions(model_dir: Path, version: int, model: TritonModel) -> None:
    """ArtifactError if config.pbtxt serves other versions and this export would change what they are served as."""
    file = model_dir / CONFIG_FILE
    others = [p.name for p in model_dir.iterdir() if version_number(p.name) not in (None, version)] \
        if model_dir.is_dir() else []
    if not file.is_file() or not others:
        return
    from google.protobuf import text_format
    pb = model_config_pb2()
    try:
        current = text_format.Parse(file.read_text(), pb.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{file} does not parse as a Triton ModelConfig ({e}); fix or remove it, or pass "
                            "force=True (--force) to replace it") from None
    keys = ("backend", "platform", "max_batch_size", "input", "output")
    changed = [k for k in keys if getattr(current, k) != getattr(model.config, k)]
    if changed:
        raise ArtifactError(f"{file} serves version(s) {', '.join(sorted(others, key=int))} with other "
                            f"{', '.join(changed)} than version {version} needs (Triton reads one config for every "
                            "version of a model); export it as another model, or pass force=True (--force) to "
                            "replace the config anyway")


def _settings(target: Target, serving: ServingConfig, source: str) -> Any:
    """The artifact's backend settings as a server would load them: the target's options, the backend's serving
    defaults, then serving.toml [engine] (runtime options only, as `Repository.load_version` allows)."""
    backend = get_backend(target.backend)
    allowed = runtime_options(backend.Settings)
    fixed = sorted(set(serving.engine) - set(allowed))
    if fixed:
        raise ConfigError(f"{source} [engine]: option(s) {fixed} cannot change at load: they shaped the compiled "
                          f"engine. Runtime options of {target.backend}: {', '.join(allowed) or 'none'}")
    known = {f.name for f in dataclasses.fields(backend.Settings)}
    options = {**target.options, **backend.serving_options, **serving.engine}
    try:
        return parse(backend.Settings, {k: v for k, v in options.items() if k in known},
                     f"{source} [engine]", error=ConfigError)
    except TargetError as e:
        raise ConfigError(str(e)) from None


# -- serving config and header ---------------------------------------------------------------------------

def _serving_config(serving: str | os.PathLike | ServingConfig | None, model_dir: Path) -> tuple[ServingConfig, str]:
    if isinstance(serving, ServingConfig):
        return serving, "the ServingConfig given"
    if serving is None:
        file = model_dir / CONFIG
        return read_config(model_dir), (str(file) if file.is_file() else "defaults (no serving.toml)")
    file = Path(serving)
    if file.is_dir():
        file = file / CONFIG
    if not file.is_file():
        raise ConfigError(f"serving config {file} does not exist")
    return read_config_file(file), str(file)


def _header(name: str, path: Path, target: Target, manifest: Mapping[str, Any], signature: Signature, config: Any,
            source: str, version: int | None, notes: list[str]) -> str:
    built = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    lines = [f"Triton model configuration for model {name!r}, written by `compilers export-triton`.",
             f"From artifact {path}{f' (version {version})' if version else ''}: target {target.name!r}, backend "
             f"{target.backend}, precision {target.precision}; built with {built or 'unknown versions'}.",
             "Triton reads this one config for every version of the model.",
             f"Batching, instances and versions from: {source}."]
    if not signature.output.is_single_tensor:
        lines.append(f"The model returns {_structure(signature)}; Triton serves its tensor leaves as flat outputs.")
    renamed = [(s.name, t.name) for s, t in zip(signature.inputs + signature.outputs,
                                                 list(config.input) + list(config.output)) if s.name != t.name]
    if renamed:
        lines.append("Tensor names (Signature -> Triton): " + ", ".join(f"{a} -> {b}" for a, b in renamed) + ".")
    lines += [f"Note: {n}." for n in notes]
    out = []
    for line in lines:
        out += _wrap(line)
    return "".join(f"# {line}\n" for line in out) + "\n"


def _structure(signature: Signature) -> str:
    spec = signature.output.spec
    kind = getattr(spec, "type", None)
    kind = kind.__name__ if isinstance(kind, type) else "a tree"
    return f"a {kind} of {len(signature.output.leaves)} leaves ({', '.join(signature.output_names)})"


def _wrap(line: str, width: int = 110) -> list[str]:
    words, out, cur = line.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = "  " + w
        else:
            cur = f"{cur} {w}" if cur else w
    return out + [cur]
