"""Export a saved artifact to a Triton Inference Server model repository.

`export_triton(artifact, "REPO/<model>/<version>")` writes `REPO/<model>/<version>/` with the backend's model
file(s) and `REPO/<model>/config.pbtxt` for the Triton backend that runs them:

| artifact backend | Triton backend | version directory |
|---|---|---|
| onnxruntime | `onnxruntime` | `model.onnx` (byte-identical) |
| openvino | `openvino` | `model.xml` + `model.bin` (the .bin byte-identical; see below for the .xml) |
| torchscript | `pytorch` (platform `pytorch_libtorch`) | `model.pt` (byte-identical) |

AOTInductor `.pt2` artifacts are refused (see `_refuse_inductor`). The config is built as Triton's own
`ModelConfig` protobuf message (from `tritonclient`) and written with `text_format`, so it always parses; a
`#` comment header says where each setting came from and what Triton cannot express.

What the config holds, and from where:
- `max_batch_size`: serving.toml `[batching] max_batch_size` when the Signature's batch dim leads every input and
  output (then `dims` leave it out); otherwise 0 and `dims` list every dim. Dynamic dims are -1.
- `dynamic_batching` (when max_batch_size > 1): `max_queue_delay_ms`, `preferred_batch_sizes`, and `queue_size` as
  the queue policy's `max_queue_size`. `instance_group`: `instances` CPU instances. `version_policy`: `[versions]`.
- Backend settings: the artifact's runtime options under serving.toml `[engine]`, in the parameters each Triton
  backend reads (names checked against the backends' sources: onnxruntime_backend `src/onnxruntime.cc`,
  openvino_backend `src/openvino.cc`, pytorch_backend `src/pt/model_instance_state.cc`).

Outputs are the Signature's flat tensors, named as `compilers serve` names them (`output`, `output.0`,
`output.hidden`): Triton has no output trees, so a model returning a tuple or dict is served as its tensor leaves
(constant leaves are dropped) and the header records the structure. TorchScript tensors are named
`<name>__<index>`, the PyTorch backend's positional convention; the header maps them to the Signature's names.

OpenVINO IRs saved by this package name their inputs but not their outputs, and the Triton OpenVINO backend
addresses every output by its tensor name; the exported model.xml therefore gives each Result's input tensor the
Signature's output name (only the `names` attributes of those ports change; the weights file is copied as is).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import escape

from ..artifact import manifest_records, verify
from ..backends import get_backend
from ..errors import ArtifactError, BackendUnavailable, ConfigError, InputError, TargetError
from ..files import remove, staging_dir, swapped_in
from ..settings import parse, runtime_options
from ..signature import Signature, TensorSpec
from ..target import Target
from .protocol import datatype
from .repository import CONFIG, ServingConfig, read_config, read_config_file, version_number

CONFIG_FILE = "config.pbtxt"

# artifact backend -> (Triton backend, Triton platform or "", the files of a version directory)
BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "onnxruntime": ("onnxruntime", "", ("model.onnx",)),
    "openvino": ("openvino", "", ("model.xml", "model.bin")),
    "torchscript": ("pytorch", "pytorch_libtorch", ("model.pt",)),
}

# The tensor types each Triton backend converts (its sources' data type tables).
_ALL = {"TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16",
        "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_BF16"}
_TYPES = {
    "onnxruntime": _ALL,
    "openvino": _ALL - {"TYPE_FP64", "TYPE_BF16"},
    "pytorch": _ALL - {"TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_BF16"},
}
# artifact graph_optimization_level -> the onnxruntime backend's `optimization { graph { level } }`
# (-1 basic, 1 extended, 2 disabled; unset: ORT_ENABLE_ALL)
_ORT_LEVELS = {"basic": -1, "extended": 1, "disable": 2}


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
    if target.backend == "inductor":
        _refuse_inductor(path, target, manifest)
    if target.backend not in BACKENDS:
        raise ArtifactError(f"{path}: backend {target.backend!r} has no Triton backend; export-triton takes "
                            f"artifacts of {', '.join(sorted(BACKENDS))}")
    serving = serving or ServingConfig()
    pb = model_config_pb2()
    triton_backend, platform, files = BACKENDS[target.backend]
    notes: list[str] = []
    caveats: list[str] = []
    settings = _settings(target, serving, serving_source)

    config = pb.ModelConfig(name=name, backend=triton_backend, default_model_filename=files[0])
    if platform:
        config.platform = platform
    max_batch = _max_batch_size(signature, serving, notes)
    config.max_batch_size = max_batch
    names = _names(signature, triton_backend)
    for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            io = getattr(config, kind).add(name=names[spec.name], data_type=_data_type(pb, spec, triton_backend, path))
            dims = _dims(spec, max_batch, path)
            if dims:
                io.dims.extend(dims)
            else:      # batch-only tensor: the API shape is [batch, 1] (Triton's documented `reshape` use)
                io.dims.append(1)
                io.reshape.SetInParent()
    if max_batch > 1:
        b = serving.batching
        config.dynamic_batching.max_queue_delay_microseconds = round(b.max_queue_delay_ms * 1000)
        config.dynamic_batching.preferred_batch_size.extend(n for n in b.preferred_batch_sizes if n <= max_batch)
        config.dynamic_batching.default_queue_policy.max_queue_size = b.queue_size
        if b.pad:
            notes.append(f"[batching.pad] ({', '.join(b.pad)}) has no Triton equivalent: the dynamic batcher joins "
                         "only requests whose dims match apart from the batch dim")
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=serving.batching.instances)
    _version_policy(config, serving)
    if serving.traffic:
        notes.append("[traffic] (a canary split) has no Triton equivalent: a request without a version goes to the "
                     "newest live version")

    version_files: dict[str, Path | bytes] = {f: path / f for f in files}
    if target.backend == "onnxruntime":
        _onnxruntime(pb, config, settings, notes)
        _check_onnx(path / files[0], config, max_batch)
    elif target.backend == "openvino":
        _openvino(pb, config, target, settings, signature, max_batch, notes, caveats)
        xml = _name_ir_outputs(path / "model.xml", path / "model.bin", signature)
        if xml is not None:
            version_files["model.xml"] = xml
            notes.append("model.xml: the Result inputs are named after the Signature's outputs (the Triton OpenVINO "
                         "backend finds outputs by tensor name); model.bin is the artifact's own")
        bounded = _bounded(signature, max_batch)
        if bounded:
            _param(pb, config, "RESHAPE_IO_LAYERS", "YES")
            notes.append(f"RESHAPE_IO_LAYERS YES: the IR bounds dynamic dim(s) {', '.join(bounded)}, and the Triton "
                         "OpenVINO backend matches a -1 dim only to an unbounded one; reshaping the inputs to the "
                         "config's dims lifts the bound, so Triton also passes sizes beyond it, which the artifact "
                         "was not validated for")
    else:
        _pytorch(pb, config)
        _check_torchscript(path / files[0], signature, target)

    header = _header(name, path, target, manifest, signature, config, serving_source, version, notes)
    from google.protobuf import text_format
    text = header + text_format.MessageToString(config)
    if text_format.Parse(text, pb.ModelConfig()) != config:      # the header must stay comments only
        raise AssertionError("config.pbtxt does not parse back to the config it was written from")
    return TritonModel(name, triton_backend, config, text, version_files, tuple(notes), tuple(caveats))


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


# -- refusals and checks -------------------------------------------------------------------------------

def _refuse_inductor(path: Path, target: Target, manifest: Mapping[str, Any]) -> None:
    torch_version = manifest.get("bound", {}).get("torch", "this torch")
    raise ArtifactError(
        f"{path} is an AOTInductor package (target {target.name!r}, model.pt2), which Triton cannot serve as built: "
        f"the package holds a shared library compiled for this CPU (-march=native) and bound to torch "
        f"{torch_version}, while Triton's PyTorch backend runs NGC's own libtorch build, and that backend's "
        "`torch_aoti` platform (Triton 26.03+) is still in development, without batch sizes above 1. Compile for "
        "ort-cpu (Triton onnxruntime), openvino-cpu or openvino-cpu-bf16 (Triton openvino) or torchscript-cpu "
        "(Triton pytorch) and export that artifact instead")


def _data_type(pb: Any, spec: TensorSpec, backend: str, path: Path) -> int:
    name = "TYPE_" + datatype(spec)
    if name not in _TYPES[backend]:
        raise ArtifactError(f"{path}: tensor {spec.name!r} is {str(spec.dtype).removeprefix('torch.')}, which the "
                            f"Triton {backend} backend does not take ({', '.join(sorted(_TYPES[backend]))}); "
                            "cast it in the model, or compile for another backend")
    return pb.DataType.Value(name)


def _dims(spec: TensorSpec, max_batch: int, path: Path) -> list[int]:
    if not spec.shape:
        raise ArtifactError(f"{path}: tensor {spec.name!r} is a scalar (shape ()), and Triton has no scalar tensors "
                            f"in a model without batching; return it as shape (1,) (x.reshape(1))")
    if 0 in spec.shape:
        raise ArtifactError(f"{path}: tensor {spec.name!r} has shape {tuple(spec.shape)}; Triton dims must be >= 1 "
                            "or -1 (variable), never 0")
    shape = spec.shape[1:] if max_batch > 0 else spec.shape
    return [d if isinstance(d, int) else -1 for d in shape]


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


def _names(signature: Signature, backend: str) -> dict[str, str]:
    """Signature tensor name -> Triton tensor name. The PyTorch backend finds TorchScript tensors by position:
    `<name>__<index>`, the part after the first `__` being the index (so the name keeps no `__` of its own)."""
    specs = signature.inputs + signature.outputs
    if backend != "pytorch":
        return {s.name: s.name for s in specs}
    names = {}
    for group in (signature.inputs, signature.outputs):
        for i, spec in enumerate(group):
            base = re.sub("_{2,}", "_", spec.name).rstrip("_") or "tensor"
            names[spec.name] = f"{base}__{i}"
    return names


def _bounded(signature: Signature, max_batch: int) -> list[str]:
    """The dims the config writes as -1 that have an upper bound in the IR, as `name <= max` (the Triton OpenVINO
    backend's dims check, `doesMatch` in its openvino_utils.cc, accepts -1 only for an unbounded dim)."""
    skip = signature.batch if max_batch > 0 else None   # the backend sets the batch itself (ov::set_batch)
    return [f"{d} <= {r.max}" for d, r in signature.dims.items() if d != skip and r.max is not None]


def _check_onnx(file: Path, config: Any, max_batch: int) -> None:
    """What the Triton onnxruntime backend checks at load (`CompareDimsSupported` in its onnxruntime_utils.cc): names
    found in the graph; inputs' dims equal where the model's dim is fixed; outputs' dims equal exactly (-1 for a
    symbolic dim); with batching, a symbolic first dim everywhere."""
    try:
        import onnx
    except ImportError:
        return                                    # onnxruntime without the onnx package: the Signature decides
    model = onnx.load(str(file), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    graph = {"input": {v.name: v for v in model.graph.input if v.name not in weights},
             "output": {v.name: v for v in model.graph.output}}
    for kind in ("input", "output"):
        for io in getattr(config, kind):
            value = graph[kind].get(io.name)
            if value is None:
                raise ArtifactError(f"{file}: the ONNX graph has no {kind} {io.name!r} ({', '.join(graph[kind])}); "
                                    "Triton finds tensors by name. Recompile the artifact")
            model_dims = [d.dim_value if d.HasField("dim_value") else -1
                          for d in value.type.tensor_type.shape.dim]
            dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
            full = ([-1] + dims) if max_batch > 0 else dims
            ok = len(model_dims) == len(full) and (max_batch == 0 or model_dims[0] == -1) and all(
                m == c for m, c in zip(model_dims, full) if kind == "output" or m != -1)
            if not ok:
                raise ArtifactError(f"{file}: {kind} {io.name!r} has shape {model_dims} in the ONNX graph, but the "
                                    f"Signature gives {full}; Triton's onnxruntime backend would refuse to load it. "
                                    "Recompile the artifact")


def _check_torchscript(file: Path, signature: Signature, target: Target) -> None:
    """What the Triton PyTorch backend needs of `forward`: one Tensor argument per config input, and a Tensor or a
    tuple of Tensors back (its model_instance_state.cc)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = torch.jit.load(str(file), map_location="cpu").forward.schema
    args = [a for a in schema.arguments if a.name != "self"]
    returns = [r.type for r in schema.returns]
    tensor = torch._C.TensorType.get()
    outs = returns[0].elements() if len(returns) == 1 and isinstance(returns[0], torch._C.TupleType) else returns
    if len(args) != len(signature.inputs) or any(a.type.kind() != "TensorType" for a in args) or \
            len(outs) != len(signature.outputs) or any(not t.isSubtypeOf(tensor) for t in outs):
        mode = target.options.get("mode", "trace")
        raise ArtifactError(f"{file}: forward({', '.join(f'{a.name}: {a.type}' for a in args)})"
                            f" -> {', '.join(map(str, returns))} does not map onto the Signature's "
                            f"{len(signature.inputs)} tensor input(s) and {len(signature.outputs)} tensor output(s); "
                            f"Triton's PyTorch backend passes one Tensor per input and takes a Tensor or a tuple of "
                            f"Tensors back. " + ("Compile with mode = \"trace\" (the default), whose model.pt takes "
                                                 "and returns flat tensors" if mode != "trace" else "Recompile it"))


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


# -- backend settings ----------------------------------------------------------------------------------

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


def _param(pb: Any, config: Any, key: str, value: Any) -> None:
    config.parameters[key].string_value = str(value)


def _onnxruntime(pb: Any, config: Any, settings: Any, notes: list[str]) -> None:
    # onnxruntime_backend README "Model Config Options" and src/onnxruntime.cc (ModelState::ModelState)
    _param(pb, config, "intra_op_thread_count", settings.threads)
    level = _ORT_LEVELS.get(settings.graph_optimization_level)
    if level is not None:
        config.optimization.graph.level = level
    if not settings.spinning:
        notes.append("intra-op thread spinning: `compilers serve` turns it off (spinning = false), but the Triton "
                     "onnxruntime backend has no parameter for session.intra_op.allow_spinning, so ORT's default "
                     "(spinning on) applies")


def _openvino(pb: Any, config: Any, target: Target, settings: Any, signature: Signature, max_batch: int,
              notes: list[str], caveats: list[str]) -> None:
    # openvino_backend README "Parameters" and src/openvino.cc (ModelState::ParseParameterHelper)
    _param(pb, config, "PERFORMANCE_HINT", settings.performance_hint)
    if settings.threads:
        _param(pb, config, "INFERENCE_NUM_THREADS", settings.threads)
    if settings.streams:
        _param(pb, config, "NUM_STREAMS", settings.streams)
    if settings.cache_dir:
        notes.append(f"cache_dir {settings.cache_dir!r}: the Triton OpenVINO backend has no CACHE_DIR parameter")
    if target.precision == "bf16":
        _param(pb, config, "HINT_BF16", "YES")     # INFERENCE_PRECISION_HINT bf16, as the artifact was validated
    else:
        caveats.append(
            f"precision: target {target.name!r} ({target.precision}) runs with INFERENCE_PRECISION_HINT f32, which "
            "config.pbtxt cannot express: the Triton OpenVINO backend's only precision parameter is HINT_BF16 (YES = "
            "bf16) and it passes no other INFERENCE_PRECISION_HINT. On a CPU with AVX512_BF16 or AMX the CPU plugin's "
            "default is bf16, so there this model would run in bf16, not as validated. Serve it on a CPU without "
            "bf16, or export an openvino-cpu-bf16 artifact (validated in bf16) for such hosts")
        notes.extend(caveats)
    if max_batch > 1:
        # the backend reshapes the IR to a static max_batch_size (ov::set_batch) and refuses smaller batches
        # unless told to pad them
        _param(pb, config, "ENABLE_BATCH_PADDING", "YES")
        notes.append(f"ENABLE_BATCH_PADDING YES: the Triton OpenVINO backend compiles the IR for exactly "
                     f"max_batch_size ({max_batch}) rows and refuses smaller batches otherwise; padded rows are "
                     "zeros, computed and dropped")


def _pytorch(pb: Any, config: Any) -> None:
    # pytorch_backend README "Parameters": INFERENCE_MODE (torch.inference_mode: Triton serializes the outputs,
    # so unlike a CompiledModel's, nobody can update them in place)
    _param(pb, config, "INFERENCE_MODE", "true")


def _version_policy(config: Any, serving: ServingConfig) -> None:
    v = serving.versions
    if v.policy == "latest":
        config.version_policy.latest.num_versions = v.latest
    elif v.policy == "all":
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.specific.versions.extend(v.specific)


# -- OpenVINO output names -------------------------------------------------------------------------------

def _name_ir_outputs(xml_file: Path, bin_file: Path, signature: Signature) -> bytes | None:
    """model.xml with each output tensor named after its Signature output; None when it already is."""
    try:
        import numpy as np
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable(f"exporting an OpenVINO artifact reads its IR with openvino ({e}): "
                                 "pip install 'compilers[cpu]'") from None
    core = ov.Core()
    model = core.read_model(str(xml_file), str(bin_file))
    wanted = [s.name for s in signature.outputs]
    if len(model.outputs) != len(wanted):
        raise ArtifactError(f"{xml_file}: the IR has {len(model.outputs)} outputs, the Signature {len(wanted)}; "
                            "recompile the artifact")
    if all(set(port.get_names()) == {n} for port, n in zip(model.outputs, wanted)):
        return None
    bad = [n for n in wanted if "," in n or "\\" in n]
    if bad:
        raise ArtifactError(f"{xml_file}: output name(s) {bad} cannot be IR tensor names (',' separates them)")
    data = xml_file.read_bytes()
    layers, ports, edges = _ir_layout(data)
    by_name = {layer["name"]: lid for lid, layer in layers.items() if layer["type"] == "Result"}
    sources: dict[tuple[str, str], str] = {}
    for result, name in zip(model.get_results(), wanted):
        lid = by_name.get(result.get_friendly_name())
        source = edges.get(lid)
        if source is None or source not in ports:
            raise ArtifactError(f"{xml_file}: cannot find the tensor feeding Result "
                                f"{result.get_friendly_name()!r}; export-triton cannot name output {name!r}")
        if layers[source[0]]["type"] == "Parameter":
            raise ArtifactError(f"{xml_file}: output {name!r} is an input passed through unchanged; its tensor "
                                "already carries the input's name, and Triton's OpenVINO backend would see the output "
                                "under that name. Return a copy (x.clone()) and recompile")
        if source in sources:
            raise ArtifactError(f"{xml_file}: outputs {sources[source]!r} and {name!r} are one tensor, which can "
                                "carry one name for Triton; return a copy of one of them and recompile")
        sources[source] = name
    patched = data
    for source in sorted(sources, key=lambda s: ports[s], reverse=True):
        start = ports[source]
        end = _tag_end(patched, start)
        tag = re.sub(rb'\snames="[^"]*"', b"", patched[start:end])
        close = len(tag) - (2 if tag.endswith(b"/>") else 1)
        name = escape(sources[source], {'"': "&quot;"}).encode()
        tag = tag[:close] + b' names="' + name + b'"' + tag[close:]
        patched = patched[:start] + tag + patched[end:]
    check = core.read_model(patched.decode("utf-8"), ov.Tensor(np.fromfile(bin_file, dtype=np.uint8)))
    got = [sorted(port.get_names()) for port in check.outputs]
    if got != [[n] for n in wanted] or len(check.get_ops()) != len(model.get_ops()):
        raise ArtifactError(f"{xml_file}: naming the IR outputs {wanted} gave {got}; export-triton cannot name "
                            "this IR's outputs")
    return patched


def _ir_layout(data: bytes) -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], int], dict[str, tuple[str, str]]]:
    """The top-level layers of an IR (id -> name, type), the byte offset of each layer's output port tag
    ((layer, port) -> offset), and the edge into each layer's first input (layer -> (layer, port))."""
    import xml.parsers.expat
    parser = xml.parsers.expat.ParserCreate()
    stack: list[str] = []
    layers: dict[str, dict[str, str]] = {}
    ports: dict[tuple[str, str], int] = {}
    edges: dict[str, tuple[str, str]] = {}
    current: list[str | None] = [None]

    def start(tag: str, attrs: dict[str, str]) -> None:
        stack.append(tag)
        path = "/".join(stack)
        if path == "net/layers/layer":
            current[0] = attrs["id"]
            layers[attrs["id"]] = {"name": attrs.get("name", ""), "type": attrs.get("type", "")}
        elif path == "net/layers/layer/output/port":
            ports[(current[0], attrs["id"])] = parser.CurrentByteIndex
        elif path == "net/edges/edge" and attrs.get("to-port") == "0":
            edges[attrs["to-layer"]] = (attrs["from-layer"], attrs["from-port"])

    def end(tag: str) -> None:
        stack.pop()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.Parse(data, True)
    return layers, ports, edges


def _tag_end(data: bytes, start: int) -> int:
    """The offset just past the start tag that begins at `start` (a '>' outside quoted attribute values)."""
    quote = None
    for i in range(start, len(data)):
        c = data[i:i + 1]
        if quote:
            if c == quote:
                quote = None
        elif c in (b'"', b"'"):
            quote = c
        elif c == b">":
            return i + 1
    raise ArtifactError("model.xml ends inside a tag")


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
