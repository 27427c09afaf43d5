"""`compilers export-triton`: the Triton model repository an artifact becomes.

Every config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient). No Triton server runs here, so
each backend's load-time checks are replayed on the exported files with the library that backend embeds, as its
source does them (onnxruntime_backend src/onnxruntime.cc + onnxruntime_utils.cc CompareDimsSupported; openvino_backend
src/openvino.cc ValidateInputs/ValidateOutputs + openvino_utils.cc doesMatch; pytorch_backend
src/pt/model_instance_state.cc naming conventions), and the model is run the way the backend runs it.
"""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as pb

import compilers
from compilers.errors import ArtifactError, ConfigError, InputError
from compilers.export.triton import export_triton

SERVING = """
[versions]
policy = "all"
[batching]
max_batch_size = 16
max_queue_delay_ms = 0.5
preferred_batch_sizes = [4, 8]
queue_size = 64
instances = 2
[engine]
threads = 2
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


class TwoInputs(nn.Module):
    """Token ids and a mask of one dynamic length; a dict of a per-token and a pooled output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 4)

    def forward(self, input_ids, mask):
        h = self.emb(input_ids) * mask.unsqueeze(-1)
        return {"hidden": self.lin(h), "pooled": h.mean(1)}


TWO_DYN = {"input_ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    made = {}
    for target in ("ort-cpu", "openvino-cpu", "openvino-cpu-bf16", "torchscript-cpu"):
        cm = compilers.compile(mlp(), target, (torch.randn(4, 6),))
        made[target] = (cm.save(out / target), cm)
    torch.manual_seed(0)
    model = TwoInputs().eval()
    example = (torch.randint(0, 10, (2, 5)), torch.ones(2, 5))
    bounded = {"input_ids": {1: compilers.DimRange(min=1, max=64)}, "mask": {1: compilers.DimRange(min=1, max=64)}}
    for target in ("ort-cpu", "openvino-cpu-bf16", "torchscript-cpu"):
        t = compilers.load_target(target)
        if t.backend == "openvino":
            t = t.with_(shapes=bounded)        # an IR with a bounded dim: RESHAPE_IO_LAYERS
        cm = compilers.compile(model, t, example, dynamic_shapes=TWO_DYN)
        made["two-" + target] = (cm.save(out / ("two-" + target)), cm)
    return made


def parse(model_dir: Path) -> pb.ModelConfig:
    text = (model_dir / "config.pbtxt").read_text()
    assert text.startswith("# Triton model configuration")
    return text_format.Parse(text, pb.ModelConfig())


def header(model_dir: Path) -> str:
    """The comment header of config.pbtxt as one line."""
    return " ".join(l[1:].strip() for l in (model_dir / "config.pbtxt").read_text().splitlines() if l.startswith("#"))


def params(config: pb.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def io(config: pb.ModelConfig, kind: str) -> list[tuple[str, str, list[int]]]:
    return [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, kind)]


def same_files(version: Path, artifact: Path, names: list[str]) -> None:
    assert sorted(p.name for p in version.iterdir()) == sorted(names)
    for name in names:
        assert (version / name).read_bytes() == (artifact / name).read_bytes(), name


def leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith("."))


# -- the backends' load-time checks, replayed --------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL"}


def _ort_dims_supported(model: list[int], config: list[int], max_batch: int, exact: bool) -> bool:
    """onnxruntime_utils.cc CompareDimsSupported."""
    if max_batch > 0:
        if not model or model[0] != -1:
            return False
        config = [-1] + config
    return len(model) == len(config) and all(m == c for m, c in zip(model, config) if exact or m != -1)


def onnxruntime_backend(version: Path, config: pb.ModelConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(version / config.default_model_filename), providers=["CPUExecutionProvider"])
    for kind, ports in (("input", session.get_inputs()), ("output", session.get_outputs())):
        found = {p.name: p for p in ports}
        assert len(found) == len(getattr(config, kind))
        for t in getattr(config, kind):
            port = found[t.name]
            assert _ORT_TYPES[port.type] == pb.DataType.Name(t.data_type)
            shape = [d if isinstance(d, int) else -1 for d in port.shape]
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            assert _ort_dims_supported(shape, dims, config.max_batch_size, exact=kind == "output"), (t.name, shape, dims)
    names = [t.name for t in config.output]
    return dict(zip(names, session.run(names, inputs)))


def _ov_matches(dim, c: int) -> bool:
    """openvino_utils.cc doesMatch."""
    if dim.is_static:
        return dim.get_length() == c
    if dim.get_max_length() == -1:
        return True
    return dim.get_min_length() < c < dim.get_max_length()


def openvino_backend(version: Path, config: pb.ModelConfig):
    """The compiled model as openvino.cc builds it: names, dims, N... layout, set_batch, config parameters."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor
    core = ov.Core()
    model = core.read_model(str(version / config.default_model_filename))
    p = params(config)
    mbs = config.max_batch_size
    by_name = {port.get_any_name(): port for port in model.inputs}
    assert len(by_name) == len(config.input)
    ppp = PrePostProcessor(model)
    for t in config.input:
        shape = by_name[t.name].get_partial_shape()
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        if p.get("RESHAPE_IO_LAYERS", "").lower() == "yes":
            for i, d in enumerate(dims, start=1 if mbs else 0):
                shape[i] = ov.Dimension(d) if d > 0 else ov.Dimension()
            ppp.input(t.name).tensor().set_shape(shape)
        else:
            full = ([mbs] if mbs else []) + dims
            assert len(shape) == len(full) and all(
                _ov_matches(shape[i], c) for i, c in enumerate(full) if (not mbs or i) and c != -1), (t.name, shape)
        if mbs:
            ppp.input(t.name).tensor().set_layout(ov.Layout("N..."))
    model = ppp.build()
    if mbs:
        ov.set_batch(model, mbs)
    outputs = {port.get_any_name(): port for port in model.outputs}
    assert len(outputs) == len(config.output)
    for t in config.output:
        shape = outputs[t.name].get_partial_shape()
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        full = ([mbs] if mbs else []) + dims
        assert len(shape) == len(full) and all(_ov_matches(shape[i], c) for i, c in enumerate(full)), (t.name, shape)
    properties = {}
    if "PERFORMANCE_HINT" in p:
        properties["PERFORMANCE_HINT"] = p["PERFORMANCE_HINT"]
    if "INFERENCE_NUM_THREADS" in p:
        properties["INFERENCE_NUM_THREADS"] = int(p["INFERENCE_NUM_THREADS"])
    if "NUM_STREAMS" in p:
        properties["NUM_STREAMS"] = p["NUM_STREAMS"]
    if "HINT_BF16" in p:
        assert p["HINT_BF16"] == "YES"
        properties["INFERENCE_PRECISION_HINT"] = "bf16"
    return core.compile_model(model, "CPU", properties)


def openvino_run(compiled, config: pb.ModelConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One batch of `inputs`, zero-padded to max_batch_size as ENABLE_BATCH_PADDING does, cut back after."""
    mbs = config.max_batch_size
    rows = next(iter(inputs.values())).shape[0]
    if mbs:
        assert rows == mbs or params(config).get("ENABLE_BATCH_PADDING") == "YES"
        inputs = {k: np.concatenate([v, np.zeros((mbs - rows,) + v.shape[1:], v.dtype)]) for k, v in inputs.items()}
    request = compiled.create_infer_request()
    request.infer(inputs)
    out = {}
    for port in compiled.outputs:
        out[port.get_any_name()] = request.get_tensor(port).data[:rows].copy() if mbs else \
            request.get_tensor(port).data.copy()
    return out


def _index(name: str) -> int | None:
    """The `<name>__<index>` convention as model_instance_state.cc reads it: the digits after the first `__`."""
    head, sep, tail = name.partition("__")
    return int(tail) if sep and tail.isdigit() else None


def pytorch_backend(version: Path, config: pb.ModelConfig, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(version / config.default_model_filename))
    args = [a for a in module.forward.schema.arguments if a.name != "self"]
    assert len(args) == len(config.input) and all(a.type.kind() == "TensorType" for a in args)
    order = {t.name: _index(t.name) for t in config.input}
    assert None not in order.values(), "inputs must follow <name>__<index>"
    ordered = [inputs[n] for n, _ in sorted(order.items(), key=lambda kv: kv[1])]
    with torch.inference_mode():                                # INFERENCE_MODE true
        result = module(*ordered)
    result = result if isinstance(result, tuple) else (result,)
    assert all(isinstance(r, torch.Tensor) for r in result)
    return {t.name: result[_index(t.name)] for t in config.output}


# -- the single-input MLP on each backend ----------------------------------------------------------------

def test_ort_config_files_and_run(artifacts, tmp_path):
    artifact, cm = artifacts["ort-cpu"]
    (tmp_path / "repo" / "mlp").mkdir(parents=True)
    (tmp_path / "repo" / "mlp" / "serving.toml").write_text(SERVING)
    version = export_triton(artifact, tmp_path / "repo" / "mlp" / "1")
    config = parse(tmp_path / "repo" / "mlp")
    assert (config.name, config.backend, config.default_model_filename) == ("mlp", "onnxruntime", "model.onnx")
    assert config.max_batch_size == 16
    assert io(config, "input") == [("input", "TYPE_FP32", [6])] and io(config, "output") == [("output", "TYPE_FP32", [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 2)]
    assert params(config) == {"intra_op_thread_count": "2"}      # serving.toml [engine] threads
    assert config.version_policy.HasField("all")
    assert not config.optimization.HasField("graph")            # graph_optimization_level all: the backend's default
    assert "no parameter for session.intra_op.allow_spinning" in header(version.parent)   # what Triton cannot set, said
    same_files(version, artifact, ["model.onnx"])
    x = torch.randn(5, 6)
    got = onnxruntime_backend(version, config, {"input": x.numpy()})
    np.testing.assert_allclose(got["output"], cm(x).numpy(), rtol=1e-5, atol=1e-6)


def ov_capabilities() -> list[str]:
    import openvino as ov
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@pytest.mark.parametrize("target", ["openvino-cpu", "openvino-cpu-bf16"])
def test_openvino_config_precision_and_run(artifacts, tmp_path, target):
    artifact, cm = artifacts[target]
    bf16 = target.endswith("bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        version = export_triton(artifact, tmp_path / "repo" / "mlp" / "3")
    precision = [w for w in caught if "INFERENCE_PRECISION_HINT" in str(w.message)]
    assert len(precision) == (0 if bf16 else 1)          # the f32 hint Triton cannot express is not silent
    config = parse(tmp_path / "repo" / "mlp")
    assert (config.backend, config.default_model_filename, config.max_batch_size) == ("openvino", "model.xml", 8)
    assert io(config, "input") == [("input", "TYPE_FP32", [6])] and io(config, "output") == [("output", "TYPE_FP32", [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0           # the defaults without serving.toml
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
    expected = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_BATCH_PADDING": "YES"}
    if bf16:
        expected["HINT_BF16"] = "YES"
    assert params(config) == expected
    assert ("Note: precision: target" in header(version.parent)) == (not bf16)
    # model.bin is the artifact's; model.xml differs only by the output tensor's name
    assert (version / "model.bin").read_bytes() == (artifact / "model.bin").read_bytes()
    strip = re.compile(rb'\snames="[^"]*"')
    ours, theirs = (version / "model.xml").read_bytes(), (artifact / "model.xml").read_bytes()
    assert ours != theirs and strip.sub(b"", ours) == strip.sub(b"", theirs)
    compiled = openvino_backend(version, config)
    precision_hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if bf16 and "BF16" in ov_capabilities():
        assert "bf16" in precision_hint or "bfloat16" in precision_hint
    elif bf16:          # a CPU without bf16 (no AVX512_BF16 / AMX): the plugin computes f32 whatever it is told
        assert "float32" in precision_hint or "f32" in precision_hint
    else:       # no hint reaches the plugin: its own default applies (bf16 on an AVX512_BF16/AMX CPU, as noted)
        import openvino as ov
        assert precision_hint == str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    x = torch.randn(3, 6)
    got = openvino_run(compiled, config, {"input": x.numpy()})["output"]
    ref = cm(x).numpy()
    cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert got.shape == (3, 3) and cos > 0.999


def test_torchscript_config_names_and_run(artifacts, tmp_path):
    artifact, cm = artifacts["torchscript-cpu"]
    version = export_triton(artifact, tmp_path / "repo" / "mlp" / "2")
    config = parse(tmp_path / "repo" / "mlp")
    assert (config.backend, config.platform, config.default_model_filename) == ("pytorch", "pytorch_libtorch", "model.pt")
    assert io(config, "input") == [("input__0", "TYPE_FP32", [6])]
    assert io(config, "output") == [("output__0", "TYPE_FP32", [3])]
    assert params(config) == {"INFERENCE_MODE": "true"}
    assert "(Signature -> Triton): input -> input__0, output -> output__0." in header(version.parent)
    same_files(version, artifact, ["model.pt"])
    x = torch.randn(5, 6)
    got = pytorch_backend(version, config, {"input__0": x})
    torch.testing.assert_close(got["output__0"], cm(x))


# -- two inputs, a dynamic seq dim, a dict output --------------------------------------------------------

@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu-bf16", "torchscript-cpu"])
def test_two_inputs_with_dynamic_seq(artifacts, tmp_path, target):
    artifact, cm = artifacts["two-" + target]
    serving = tmp_path / "other.toml"
    serving.write_text("[batching]\nmax_batch_size = 4\npreferred_batch_sizes = [2, 4, 8]\n")
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):   # serving.toml is checked as `serve` does
        export_triton(artifact, tmp_path / "repo" / "two" / "1", serving)
    serving.write_text("[batching]\nmax_batch_size = 4\ninstances = 3\n")
    version = export_triton(artifact, tmp_path / "repo" / "two" / "1", serving)
    config = parse(tmp_path / "repo" / "two")
    assert config.max_batch_size == 4 and config.instance_group[0].count == 3
    names = {"input_ids": "input_ids", "mask": "mask", "hidden": "output.hidden", "pooled": "output.pooled"}
    if target == "torchscript-cpu":
        names = {"input_ids": "input_ids__0", "mask": "mask__1", "hidden": "output.hidden__0",
                 "pooled": "output.pooled__1"}
    assert io(config, "input") == [(names["input_ids"], "TYPE_INT64", [-1]), (names["mask"], "TYPE_FP32", [-1])]
    assert io(config, "output") == [(names["hidden"], "TYPE_FP32", [-1, 4]), (names["pooled"], "TYPE_FP32", [8])]
    assert "returns a dict of 2 leaves" in header(version.parent)
    ids, mask = torch.randint(0, 10, (3, 7)), (torch.rand(3, 7) > 0.3).float()
    ref = cm(ids, mask)
    if target == "ort-cpu":
        got = onnxruntime_backend(version, config, {"input_ids": ids.numpy(), "mask": mask.numpy()})
    elif target == "torchscript-cpu":
        got = {k: v.numpy() for k, v in pytorch_backend(version, config, {names["input_ids"]: ids,
                                                                          names["mask"]: mask}).items()}
    else:
        assert params(config)["RESHAPE_IO_LAYERS"] == "YES"         # the IR bounds seq <= 64
        got = openvino_run(openvino_backend(version, config), config, {"input_ids": ids.numpy(), "mask": mask.numpy()})
    for key in ("hidden", "pooled"):
        np.testing.assert_allclose(got[names[key]], ref[key].numpy(), rtol=0.05, atol=0.05)


def test_tensors_without_a_leading_batch_dim(tmp_path):
    """A per-row scalar output ([batch]) is dims [1] with an empty reshape; an output without the batch dim turns
    Triton's batching off, and then dims list every dim."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)

    class Fixed(nn.Module):
        def forward(self, x, table):
            return x * 2, table + 1

    torch.manual_seed(0)
    cm = compilers.compile(Heads().eval(), "ort-cpu", (torch.randn(4, 6),))
    version = export_triton(cm.save(tmp_path / "heads"), tmp_path / "repo" / "heads" / "1")
    config = parse(version.parent)
    assert config.max_batch_size == 8 and list(config.output[0].dims) == [1]
    assert config.output[0].HasField("reshape") and list(config.output[0].reshape.shape) == []
    x = torch.randn(3, 6)
    np.testing.assert_allclose(onnxruntime_backend(version, config, {"x": x.numpy()})["output"],
                               cm(x).numpy(), rtol=1e-5, atol=1e-6)

    cm = compilers.compile(Fixed(), "ort-cpu", (torch.randn(4, 6), torch.randn(3, 2)))
    version = export_triton(cm.save(tmp_path / "fixed"), tmp_path / "repo" / "fixed" / "1")
    config = parse(version.parent)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert io(config, "input") == [("x", "TYPE_FP32", [-1, 6]), ("table", "TYPE_FP32", [3, 2])]
    assert "batch dim 'batch' does not lead table, output.1" in header(version.parent)
    x, table = torch.randn(5, 6), torch.randn(3, 2)
    got = onnxruntime_backend(version, config, {"x": x.numpy(), "table": table.numpy()})
    np.testing.assert_allclose(got["output.1"], (table + 1).numpy(), rtol=1e-6)


def test_compile_options_the_backends_read(tmp_path):
    """graph_optimization_level becomes the onnxruntime backend's optimization level; a scripted TorchScript model
    returning a dict is refused (the PyTorch backend takes a Tensor or a tuple of Tensors back)."""
    target = compilers.load_target("ort-cpu").with_(graph_optimization_level="basic")
    cm = compilers.compile(mlp(), target, (torch.randn(4, 6),))
    version = export_triton(cm.save(tmp_path / "basic"), tmp_path / "repo" / "basic" / "1")
    assert parse(version.parent).optimization.graph.level == -1          # -1: ORT_ENABLE_BASIC
    torch.manual_seed(0)
    scripted = compilers.load_target("torchscript-cpu").with_(mode="script")
    cm = compilers.compile(TwoInputs().eval(), scripted, (torch.randint(0, 10, (2, 5)), torch.ones(2, 5)),
                           dynamic_shapes=TWO_DYN)
    with pytest.raises(ArtifactError, match=r"Dict\[str, Tensor\].*mode = \"trace\""):
        export_triton(cm.save(tmp_path / "scripted"), tmp_path / "repo" / "scripted" / "1")
    assert not (tmp_path / "repo" / "scripted").exists()


# -- refusals, overwrites, failures ---------------------------------------------------------------------

def test_inductor_is_refused(tmp_path):
    target = compilers.load_target("inductor-cpu")
    reason = compilers.unavailable_reason(target)
    if reason:
        pytest.skip(f"inductor-cpu cannot compile here: {reason}")
    artifact = compilers.compile(mlp(), target, (torch.randn(4, 6),)).save(tmp_path / "aoti")
    model_dir = tmp_path / "repo" / "mlp"
    with pytest.raises(ArtifactError, match="AOTInductor") as e:
        export_triton(artifact, model_dir / "1")
    assert "ort-cpu" in str(e.value) and "torchscript-cpu" in str(e.value)
    assert not model_dir.exists()


def test_versions_are_not_overwritten_without_force(artifacts, tmp_path):
    model_dir = tmp_path / "repo" / "mlp"
    ort, _ = artifacts["ort-cpu"]
    ts, _ = artifacts["torchscript-cpu"]
    export_triton(ort, model_dir / "1")
    before = (model_dir / "config.pbtxt").read_bytes()
    with pytest.raises(ArtifactError, match="exists"):
        export_triton(ort, model_dir / "1")
    # another backend as version 2 would change the config version 1 is served with
    with pytest.raises(ArtifactError, match="backend"):
        export_triton(ts, model_dir / "2")
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert (model_dir / "config.pbtxt").read_bytes() == before
    export_triton(ort, model_dir / "2")                 # the same model as version 2 is fine
    export_triton(ts, model_dir / "1", force=True)      # force replaces a version and the config
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.pt"]
    assert parse(model_dir).backend == "pytorch"
    with pytest.raises(InputError, match="positive integer"):
        export_triton(ort, model_dir / "01")
    assert leftovers(model_dir) == []


def test_a_failed_export_leaves_nothing_half_written(artifacts, tmp_path):
    ort, _ = artifacts["ort-cpu"]
    ts, _ = artifacts["torchscript-cpu"]
    model_dir = tmp_path / "repo" / "mlp"
    (model_dir / "config.pbtxt").mkdir(parents=True)         # the config cannot be put in place
    (model_dir / "config.pbtxt" / "x").write_text("")
    with pytest.raises(OSError):
        export_triton(ort, model_dir / "1")
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.pbtxt"]      # no version 1, no staging
    (model_dir / "config.pbtxt" / "x").unlink()
    (model_dir / "config.pbtxt").rmdir()
    export_triton(ort, model_dir / "1")
    (model_dir / "config.pbtxt").unlink()
    (model_dir / "config.pbtxt").mkdir()
    (model_dir / "config.pbtxt" / "x").write_text("")
    with pytest.raises(OSError):
        export_triton(ts, model_dir / "1", force=True)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx"]   # the old version is back
    assert leftovers(model_dir) == []
    # a serving.toml asking the engine for an option fixed at compile time writes nothing either
    (model_dir / "serving.toml").write_text('[engine]\ngraph_optimization_level = "basic"\n')
    with pytest.raises(ConfigError, match="cannot change at load"):
        export_triton(ort, model_dir / "2")
    assert not (model_dir / "2").exists() and leftovers(model_dir) == []


def test_cli_end_to_end(artifacts, tmp_path):
    artifact, _ = artifacts["ort-cpu"]
    serving = tmp_path / "serving.toml"
    serving.write_text(SERVING)
    version = tmp_path / "repo" / "mlp" / "1"
    cmd = [sys.executable, "-m", "compilers.cli", "export-triton", str(artifact), str(version), "--serving", str(serving)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"wrote {version} (model.onnx)" in r.stdout and "config.pbtxt" in r.stdout
    config = parse(version.parent)
    assert config.max_batch_size == 16 and params(config) == {"intra_op_thread_count": "2"}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
