"""The core contract on ort-cpu with tiny models: targets, input checks, validation, artifacts, cache, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import compilers
from compilers.target import load_target

TARGET = "ort-cpu"


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x, scale: float = 2.0, bias=None):
        y = self.lin(x) * scale
        return y if bias is None else y + bias


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export refuses it, tracing bakes one branch in."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * 3


@pytest.fixture(scope="module")
def affine():
    model = Affine().eval()
    return model, compilers.compile(model, TARGET, (torch.randn(3, 8),))


# -- targets ---------------------------------------------------------------------------------
def test_builtin_target_resolves_and_is_available():
    t = load_target(TARGET)
    assert (t.backend, t.precision, t.tolerance.noise, t.tolerance.atol) == ("onnxruntime", "fp32", 5, None)
    assert TARGET in [x.name for x in compilers.targets()]
    assert compilers.unavailable_reason(t) is None


def test_unknown_target_lists_known_names():
    with pytest.raises(compilers.TargetError, match="ort-cpu"):
        compilers.compile(Affine(), "no-such-target", (torch.randn(2, 8),))


def test_user_descriptor_extends_builtin_and_with_overrides(tmp_path, monkeypatch):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "ort-cpu"\nname = "mine"\n[options]\nthreads = 1\n[tolerance]\nnoise = 8\n')
    t = load_target(path)
    assert (t.name, t.backend, t.options["threads"], t.tolerance.noise, t.tolerance.floor) == \
        ("mine", "onnxruntime", 1, 8, 2e-7)
    t2 = t.with_(threads=2, rtol=0.5, precision="fp32")
    assert (t2.options["threads"], t2.tolerance.rtol, t.options["threads"]) == (2, 0.5, 1)
    monkeypatch.setenv("COMPILERS_TARGETS", str(tmp_path))
    assert load_target("mine").name == "mine"


@pytest.mark.parametrize("text, match", [
    ('name = "x"\nbackend = "nope"\n', "unknown backend"),
    ('name = "x"\nbackend = "onnxruntime"\n[tolerance]\natl = 1\n', "unknown tolerance key"),
    ('name = "x"\nbackend = "onnxruntime"\nprecision = "fp64"\n', "precision"),
    ('name = "x"\nbackend = "onnxruntime"\n[options]\nthredz = 1\n', "unknown option"),
    ('name = "x"\nbackend = "onnxruntime"\n[options]\ngraph_optimization_level = "max"\n', "choose one of"),
    ('name = "x"\nbackend = "onnxruntime"\n[options]\nthreads = "x"\n', "threads = 'x' must be an integer"),
    ('name = "x"\nbackend = "onnxruntime"\n[options]\nthreads = -1\n', "threads = -1 must be >= 0"),
    ('name = "x"\nbackend = "onnxruntime"\n[options]\ntransformer_fusions = 1\n', "must be true or false"),
    ('name = "x"\nbackend = "onnxruntime"\n[tolerance]\nnoise = -2\n', "noise = -2 must be a number >= 0"),
    ('name = "x"\nbackend = "onnxruntime"\n[shapes.x]\n0 = {min = 5, max = 2}\n', "empty"),
    ('name = [1\n', "not valid TOML"),
])
def test_bad_descriptor_is_a_target_error(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(compilers.TargetError, match=match):
        compilers.compile(Affine(), path, (torch.randn(2, 8),))


# -- calling conventions and input checks --------------------------------------------------
def test_positional_keyword_and_numpy_calls(affine):
    model, cm = affine
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = model(x)
    for got in (cm(x), cm(x=x)):
        assert isinstance(got, torch.Tensor) and got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
    got = cm(x.numpy())
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda cm: cm(torch.randn(3, 8), torch.randn(3, 8), 1, 2), "positional"),
    (lambda cm: cm(y=torch.randn(3, 8)), "unknown input 'y'"),
    (lambda cm: cm(), "missing input"),
    (lambda cm: cm(torch.randn(3, 8, dtype=torch.float64)), "dtype float64, expected float32"),
    (lambda cm: cm(torch.randn(8)), "rank 1"),
    (lambda cm: cm(torch.randn(3, 7)), "dim 1 is 7, expected 8"),
    (lambda cm: cm(torch.randn(3, 8), scale=3.0), "fixed at its default 2.0"),
    (lambda cm: cm(torch.randn(3, 8), bias=torch.zeros(4)), "fixed at its default None"),
    (lambda cm: cm([1, 2]), "expected a torch.Tensor"),
])
def test_bad_inputs_raise_input_error_naming_the_input(affine, call, match):
    with pytest.raises(compilers.InputError, match=match):
        call(affine[1])


def test_dynamic_range_from_target_is_enforced():
    t = load_target(TARGET).with_(shapes={"x": {0: compilers.DimRange(min=1, opt=4, max=6)}})
    cm = compilers.compile(Affine(), t, (torch.randn(4, 8),))
    assert cm(torch.randn(6, 8)).shape == (6, 4)
    with pytest.raises(compilers.InputError, match=r"dim 0 \('batch'\) is 7, allowed 1..6"):
        cm(torch.randn(7, 8))


def test_constants_in_examples_are_fixed_and_checked():
    model = Affine()
    cm = compilers.compile(model, TARGET, {"x": torch.randn(2, 8), "scale": 0.5})
    x = torch.randn(3, 8)
    torch.testing.assert_close(cm(x, scale=0.5), model(x, scale=0.5), atol=1e-4, rtol=1e-3)
    with pytest.raises(compilers.InputError, match="fixed to 0.5"):
        cm(x, scale=1.0)


def test_equal_dim_names_must_match():
    class Add(nn.Module):
        def forward(self, a, b):
            return a + b
    cm = compilers.compile(Add(), TARGET, (torch.randn(2, 3), torch.randn(2, 3)),
                           dynamic_shapes={"a": {0: "n"}, "b": {0: "n"}})
    with pytest.raises(compilers.InputError, match="dims with one name must be equal"):
        cm(torch.randn(2, 3), torch.randn(4, 3))


def test_bad_compile_arguments():
    with pytest.raises(compilers.InputError, match="nn.Module"):
        compilers.compile(lambda x: x, TARGET, (torch.randn(2),))
    with pytest.raises(compilers.InputError, match="dynamic_shapes names unknown"):
        compilers.compile(Affine(), TARGET, (torch.randn(2, 8),), dynamic_shapes={"y": {0: "b"}})
    with pytest.raises(compilers.InputError, match="do not fit"):
        compilers.compile(Affine(), TARGET, (torch.randn(2, 8), 1.0, None, 5))
    with pytest.raises(compilers.InputError, match="validate must be"):
        compilers.compile(Affine(), TARGET, (torch.randn(2, 8),), validate="yes")


def test_compile_restores_training_mode():
    model = Affine().train()
    compilers.compile(model, TARGET, (torch.randn(2, 8),))
    assert model.training


# -- lowering and validation ---------------------------------------------------------------
def test_export_ladder_falls_back_and_validation_refuses_a_wrong_engine():
    pos, neg = (torch.ones(2, 4),), (-torch.ones(2, 4),)
    with pytest.raises(compilers.ValidationError) as info:
        compilers.compile(Branchy(), TARGET, pos, calibration=[neg], accept_traced_branches=True)
    report = info.value.report
    assert not report.passed and report.outputs[0].failure
    assert "fp32 noise" in str(info.value) and report.reference == "float64 eager"
    advice = str(info.value).splitlines()[-1]      # what to do next: a looser tolerance, warn, another target
    assert advice.startswith("What to do") and "[tolerance]" in advice and 'validate="warn"' in advice \
        and "compilers targets" in advice
    with pytest.warns(RuntimeWarning, match="disagrees"):
        cm = compilers.compile(Branchy(), TARGET, pos, calibration=[neg], validate="warn",
                               accept_traced_branches=True)
    assert cm.report.route == "onnx-torchscript"
    assert cm.report.attempts[0][0] == "onnx-dynamo"
    cm = compilers.compile(Branchy(), TARGET, pos, calibration=[neg], validate=False, accept_traced_branches=True)
    assert cm.report.validation is None


def test_export_error_names_the_unsupported_operator():
    class Zeta(nn.Module):
        def forward(self, x):
            return torch.special.zeta(x, torch.full_like(x, 2.0))
    with pytest.raises(compilers.ExportError, match="aten::special_zeta"):
        compilers.compile(Zeta(), TARGET, (torch.rand(3, 3) + 1,))


def test_report_reads_well_and_is_json(affine):
    _, cm = affine
    text = str(cm.report)
    for word in ("ort-cpu", "onnx-dynamo", "nodes", "validation", "PASSED"):
        assert word in text
    d = json.loads(json.dumps(cm.report.to_dict()))
    assert d["route"] == "onnx-dynamo" and d["validation"]["passed"] and d["opset"] >= 17
    assert set(d["seconds"]) >= {"capture", "lower", "optimize", "build", "validate", "total"}


def test_validate_function(affine):
    model, cm = affine
    result = compilers.validate(cm, model, [(torch.randn(2, 8),), (torch.randn(7, 8),)])
    assert result.passed and result.samples == 2
    result = compilers.validate(cm, _shifted(model), [(torch.randn(2, 8),)])
    row = result.outputs[0]
    assert not result.passed and row.rule == "noise" and row.error > row.allowed


def _shifted(model: Affine) -> Affine:
    other = Affine()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.lin.bias += 1.0
    return other.eval()


# -- artifacts -----------------------------------------------------------------------------
def test_save_load_roundtrip_and_manifest(affine, tmp_path):
    model, cm = affine
    out = cm.save(tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "model.onnx" in manifest["files"]
    assert manifest["bound"]["onnxruntime"] and manifest["versions"]["torch"]
    assert not any(p.suffix in (".pkl", ".pickle", ".pt") for p in out.iterdir())
    loaded = compilers.load(out)
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-3)
    assert loaded.report.route == cm.report.route
    cm.save(out)  # overwriting an artifact is allowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_load_rejects_damaged_or_foreign_artifacts(affine, tmp_path):
    _, cm = affine
    out = cm.save(tmp_path / "art")
    with open(out / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(compilers.ArtifactError, match="sha256"):
        compilers.load(out)
    out = cm.save(tmp_path / "art2")
    (out / "model.onnx").unlink()
    with pytest.raises(compilers.ArtifactError, match="missing"):
        compilers.load(out)
    out = cm.save(tmp_path / "art3")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bound"]["onnxruntime"] = "0.0.1"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(compilers.ArtifactError, match="built with onnxruntime 0.0.1"):
        compilers.load(out)
    x = torch.randn(3, *cm.signature.inputs[0].shape[1:])
    torch.testing.assert_close(compilers.load(out, check_versions=False)(x), cm(x))
    with pytest.raises(compilers.ArtifactError, match="manifest.json is missing"):
        compilers.load(tmp_path)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "keep.txt").write_text("mine")
    with pytest.raises(compilers.ArtifactError, match="not a compilers artifact"):
        cm.save(tmp_path / "stuff")


def test_interrupted_save_leaves_nothing(affine, tmp_path, monkeypatch):
    _, cm = affine

    def crash(directory):
        (directory / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cm.engine, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        cm.save(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_cache_reuses_builds_and_notices_new_weights(tmp_path):
    model = Affine()
    x = (torch.randn(2, 8),)
    first = compilers.compile(model, TARGET, x, cache_dir=tmp_path)
    second = compilers.compile(model, TARGET, x, cache_dir=tmp_path)
    assert (first.report.cache, second.report.cache) == ("miss", "hit")
    assert second.report.validation.passed
    with torch.no_grad():
        model.lin.weight += 1
    third = compilers.compile(model, TARGET, x, cache_dir=tmp_path)
    assert third.report.cache == "miss"
    torch.testing.assert_close(third(x[0]), model(x[0]), atol=1e-4, rtol=1e-3)
    kept_beside = ("references", "example-outputs")
    builds = [p for p in tmp_path.iterdir() if not p.name.startswith(".") and p.name not in kept_beside]
    assert len(builds) == 2


def test_cache_keeps_eager_reference_for_the_next_target(tmp_path):
    """A second target compiled from the same model and samples reads eager's outputs from the cache;
    other samples, or new weights, make a new reference; a damaged one is remade."""
    model = Affine()
    x, samples = (torch.randn(2, 8),), [(torch.randn(3, 8),)]
    first = compilers.compile(model, TARGET, x, samples=samples, cache_dir=tmp_path)
    assert first.report.validation.reference == "float64 eager"
    other = load_target(TARGET).with_(name="ort-cpu-again", threads=1)
    second = compilers.compile(model, other, x, samples=samples, cache_dir=tmp_path)
    assert second.report.cache == "miss" and second.report.validation.reference == "float64 eager, read from the cache"
    fresh = compilers.compile(model, other.with_(threads=2), x, samples=[(torch.randn(3, 8),)], cache_dir=tmp_path)
    assert fresh.report.validation.reference == "float64 eager"
    refs = sorted((tmp_path / "references").iterdir())
    assert len(refs) == 2
    for path in refs:
        path.write_bytes(b"damaged")
    again = compilers.compile(model, other.with_(threads=3), x, samples=samples, cache_dir=tmp_path)
    assert again.report.validation.reference == "float64 eager" and again.report.validation.passed


# -- CLI -----------------------------------------------------------------------------------
FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    return model, (torch.randn(4, 6),)

def other():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)), (torch.randn(4, 6),)
'''


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "compilers.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_compile_report_validate_targets(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    r = _cli("compile", "factory.py:make", "--target", TARGET, "--out", "art", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and "can take a while" in r.stderr
    r = _cli("report", "art", cwd=tmp_path)
    assert r.returncode == 0 and "onnx-dynamo" in r.stdout and "model.onnx" in r.stdout
    r = _cli("validate", "art", "factory.py:make", cwd=tmp_path)
    assert r.returncode == 0 and "PASSED" in r.stdout
    r = _cli("validate", "art", "factory.py:other", cwd=tmp_path)
    assert r.returncode == 1 and "FAIL" in r.stdout
    r = _cli("targets", cwd=tmp_path)
    assert r.returncode == 0 and TARGET in r.stdout
    r = _cli("compile", "factory.py:nope", "--target", TARGET, "--out", "x", cwd=tmp_path)
    assert r.returncode == 2 and "no function 'nope'" in r.stderr
    r = _cli("compile", "factory.py:make", "--target", "bogus", "--out", "x", cwd=tmp_path)
    assert r.returncode == 2 and "unknown target" in r.stderr


def test_onnxruntime_gpu_clash_is_reported_with_the_fix(tmp_path, monkeypatch):
    from compilers.backends.onnxruntime import install_clash
    assert install_clash() is None
    info = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"   # what `pip install onnxruntime-gpu` leaves beside onnxruntime
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = install_clash()
    assert "onnxruntime-gpu==1.31.1" in message and "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    with pytest.warns(RuntimeWarning, match="CUDA provider may silently disappear"):
        assert compilers.unavailable_reason(load_target(TARGET)) is None


class Pair:
    """A user container registered with pytree without key-path support."""

    def __init__(self, a, b):
        self.a, self.b = a, b


torch.utils._pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None), lambda xs, _: Pair(*xs),
                                         serialized_type_name="test_core.Pair")


def test_custom_pytree_output_without_key_paths():
    class MakesPair(nn.Module):
        def forward(self, x):
            return Pair(x * 2, x + 1)

    cm = compilers.compile(MakesPair(), TARGET, (torch.randn(2, 3),))
    x = torch.randn(4, 3)
    y = cm(x)
    assert type(y) is Pair and cm.signature.output_names == ["output.0", "output.1"]
    torch.testing.assert_close(y.a, x * 2)
    torch.testing.assert_close(y.b, x + 1)


def test_a_size_baked_in_by_the_export_is_caught():
    class Baked(nn.Module):
        def forward(self, x):
            return x.reshape(int(x.shape[0]), -1) * 2   # int() pins the batch size while exporting

    with pytest.raises(compilers.ValidationError) as info:
        compilers.compile(Baked(), TARGET, (torch.randn(3, 2, 2),))
    message = str(info.value)
    assert "onnx-dynamo failed" in message and "fixed dynamic dim 0 ('batch')" in message
    assert "shape (3, 8), eager gives (6, 4)" in message   # the grown sample exposes the torchscript export


def test_import_needs_only_torch_onnx_numpy_and_missing_backends_say_how_to_install():
    blocked = ("onnxruntime", "openvino", "onnxscript", "nncf", "transformers")
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None          # as if not installed
import torch, compilers
rows = {{t.name: compilers.unavailable_reason(t) for t in compilers.targets()}}
print(rows["ort-cpu"]); print(rows["openvino-cpu"])
try:
    compilers.compile(torch.nn.Linear(2, 2), "ort-cpu", (torch.randn(1, 2),))
except compilers.BackendUnavailable as e:
    print("BackendUnavailable:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "onnxruntime is not installed: pip install 'compilers[cpu]'" in lines[0]
    assert "openvino is not installed: pip install 'compilers[cpu]'" in lines[1]
    assert lines[2].startswith("BackendUnavailable: target 'ort-cpu' cannot run here")


@pytest.mark.parametrize("overrides, match", [
    ({"device": "cuda"}, "device 'cuda' is not supported by the onnxruntime backend yet \\(cpu only\\)"),
    ({"precision": "bf16"}, "precision bf16 is not supported by the onnxruntime backend yet \\(fp32, int8 only\\)"),
])
def test_unsupported_device_or_precision_is_backend_unavailable(overrides, match):
    with pytest.raises(compilers.BackendUnavailable, match=match):
        compilers.compile(Affine(), load_target(TARGET).with_(**overrides), (torch.randn(2, 8),))


# -- validation rule, samples and calibration ----------------------------------------------------------
class PinsFloat32(nn.Module):
    """Casts its input to float32 itself, so a float64 copy of it cannot run (its weights are float64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x.float())


def test_model_without_float64_is_judged_by_the_scaled_rule():
    cm = compilers.compile(PinsFloat32(), TARGET, (torch.randn(3, 8),))
    v = cm.report.validation
    assert v.passed and v.outputs[0].rule == "scaled" and "does not run in float64" in v.reference
    broken = PinsFloat32()
    with torch.no_grad():
        broken.lin.bias += 1e-3
    assert not compilers.validate(cm, broken, [(torch.randn(5, 8),)]).passed


def test_model_computing_otherwise_in_float64_falls_back_to_the_scaled_rule():
    class DtypeBranch(PinsFloat32):
        def forward(self, x):
            y = self.lin(x)
            return y * 1.5 if x.dtype == torch.float64 else y

    cm = compilers.compile(DtypeBranch(), TARGET, (torch.randn(3, 8),))
    assert cm.report.validation.passed and cm.report.validation.outputs[0].rule == "scaled"


def test_lossy_tolerance_without_noise_rule(tmp_path):
    path = tmp_path / "loose.toml"
    path.write_text('extends = "ort-cpu"\nname = "loose"\n[tolerance]\nnoise = false\natol = 1e-3\nrtol = 1e-2\n')
    t = load_target(path)
    assert (t.tolerance.noise, t.tolerance.atol) == (None, 1e-3)
    cm = compilers.compile(Affine(), t, (torch.randn(2, 8),))
    assert cm.report.validation.outputs[0].rule == "lossy" and cm.report.validation.reference.startswith("no float64")
    with pytest.raises(compilers.TargetError, match="needs min_cosine"):
        load_target(TARGET).with_(noise=None)


def test_cosine_contract_is_judged_per_batch_item():
    """One request of 64 answered badly hardly moves the whole batch's cosine; its own cosine fails."""
    from compilers.validate import check_output
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 32, generator=g)
    got = ref.clone()
    got[5] += 0.6 * torch.randn(32, generator=g)
    tol = load_target(TARGET).with_(noise=None, min_cosine=0.99).tolerance
    whole, per_item = check_output("y", ref, got, tol), check_output("y", ref, got, tol, batch_axis=0)
    assert whole.passed and whole.cosine > 0.99
    assert not per_item.passed and per_item.cosine < 0.9 and "worst batch item" in per_item.failure
    assert check_output("y", ref, ref.clone(), tol, batch_axis=0).passed


def test_samples_and_calibration_are_separate_inputs():
    model = Affine()
    calib = [(torch.randn(4, 8),) for _ in range(3)]
    cm = compilers.compile(model, TARGET, (torch.randn(2, 8),), calibration=calib, samples=[(torch.randn(6, 8),)])
    assert cm.report.validation.samples == 3      # example, grown example, one sample: calibration not used
    cm = compilers.compile(model, TARGET, (torch.randn(2, 8),), calibration=calib)
    assert cm.report.validation.samples == 5      # without samples, the calibration data validates too


def test_calibration_from_a_dataloader_and_bad_samples_named():
    from torch.utils.data import DataLoader, TensorDataset
    model = Affine()
    loader = DataLoader(TensorDataset(torch.randn(12, 8)), batch_size=4)   # yields [x] lists
    cm = compilers.compile(model, TARGET, (torch.randn(2, 8),), calibration=loader)
    assert cm.report.validation.samples == 5
    with pytest.raises(compilers.InputError, match=r"calibration sample 1: .*dim 1 is 5.*x: float32\(batch, 8\)"):
        compilers.compile(model, TARGET, (torch.randn(2, 8),), calibration=[(torch.randn(2, 8),), (torch.randn(2, 5),)])
    with pytest.raises(compilers.InputError, match="must be an iterable"):
        compilers.compile(model, TARGET, (torch.randn(2, 8),), samples=torch.randn(2, 8))


def test_sample_that_breaks_eager_is_an_input_error():
    class NoOnes(nn.Module):
        def forward(self, x):
            if x.shape[0] == 1:
                raise ValueError("batch of one")
            return x * 2
    with pytest.raises(compilers.InputError, match="validation sample 1 makes the eager model fail.*batch of one"):
        compilers.compile(NoOnes(), "torchscript-cpu", (torch.randn(2, 3),), samples=[(torch.randn(1, 3),)])


class Picky(nn.Module):
    """Doubles its input, counting its calls; refuses a batch of one."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(3, 3), 0

    def forward(self, x):
        self.calls += 1
        if x.shape[0] == 1:
            raise ValueError("batch of one")
        return self.lin(x)


def test_calibration_runs_in_eager_first_and_once_per_cache(tmp_path):
    torch.manual_seed(0)                     # the weights, and the examples below
    g = torch.Generator().manual_seed(0)
    good = [(torch.randn(2, 3, generator=g),) for _ in range(12)]
    with pytest.raises(compilers.InputError, match="calibration sample 12 makes the eager model fail.*batch of one"):
        compilers.compile(Picky(), "ort-cpu-int8", (torch.randn(2, 3),), calibration=good + [(torch.randn(1, 3),)],
                          samples=[(torch.randn(2, 3),)])
    model, samples = Picky(), [(torch.randn(4, 3, generator=g),)]
    compilers.compile(model, "ort-cpu-int8", (torch.randn(2, 3),), calibration=good, samples=samples, cache_dir=tmp_path)
    first, model.calls = model.calls, 0
    again = compilers.compile(model, "ort-cpu-int8", (torch.randn(2, 3),), calibration=good, samples=samples,
                              cache_dir=tmp_path)
    assert first >= len(good) and model.calls < len(good)    # the second compile does not run eager over the data
    assert again.report.cache == "hit" and again.report.validation.passed


def test_calibration_digest_is_part_of_the_cache_key(tmp_path):
    from compilers.cache import Cache, fingerprint
    from compilers.calibration import digest
    model = Affine()
    cm = compilers.compile(model, TARGET, (torch.randn(2, 8),))
    args = (fingerprint(model), cm.signature, cm.target, {"torch": "x"})
    a, b = digest([[torch.zeros(2, 8)]]), digest([[torch.ones(2, 8)]])
    assert a != b and digest([[torch.zeros(2, 8)]]) == a
    cache = Cache(tmp_path)
    assert len({cache.build_path(*args), cache.build_path(*args, a), cache.build_path(*args, b)}) == 3


def test_engine_failure_on_a_sample_is_a_failed_verdict():
    class OneRow(nn.Module):
        def forward(self, x):
            return x + torch.ones(1, 4)

    class TwoRows(nn.Module):   # a mutant that only broadcasts for the example's batch of two
        def forward(self, x):
            return x + torch.ones(2, 4)

    cm = compilers.compile(TwoRows(), TARGET, (torch.randn(2, 4),), validate=False)
    result = compilers.validate(cm, OneRow(), [(torch.randn(2, 4),), (torch.randn(3, 4),)])
    assert not result.passed and result.outputs[0].passed
    assert len(result.errors) == 1 and result.errors[0].startswith("the compiled model fails on the sample 2 (batch=3)")
    assert "error:" in str(result)


def test_engine_that_is_not_thread_safe_gets_its_calls_serialized(affine):
    """An engine declaring thread_safe = False is called under a lock: threads still get their own answers."""
    from concurrent.futures import ThreadPoolExecutor
    model, cm = affine
    engine = cm.engine
    engine.thread_safe = False          # as a backend without a thread-safe runtime would declare
    try:
        serial = compilers.CompiledModel(engine, cm.signature, cm.target, cm.report)
        assert serial._run is not engine.run
        xs = [torch.randn(1 + i % 4, 8) for i in range(16)]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(serial, xs))
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-3)
    finally:
        del engine.thread_safe


def _stderr_of(code: str, tty: bool) -> str:
    """What a child process running `code` writes to its stderr, a terminal when `tty`."""
    import os
    import pty
    if not tty:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:          # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert child.wait(timeout=120) == 0
    return out.decode(errors="replace")


def test_long_loops_show_progress_on_a_terminal_only():
    code = ("import torch, compilers\n"
            "compilers.compile(torch.nn.Linear(4, 2), 'ort-cpu', (torch.randn(2, 4),), samples=[(torch.randn(2, 4),)] * 12)")
    shown = _stderr_of(code, tty=True)
    assert "eager reference" in shown and "12/12" in shown and "float64 reference" in shown and "14/14" in shown
    assert "reference" not in _stderr_of(code, tty=False)
    int8 = ("import torch, compilers\n"     # progress only: a 2-wide int8 output's accuracy is not the point here
            "compilers.compile(torch.nn.Linear(4, 2), 'ort-cpu-int8', (torch.randn(2, 4),), "
            "calibration=[(torch.randn(2, 4),)] * 10, validate=False)")
    shown = _stderr_of(int8, tty=True)
    assert "int8 calibration" in shown and "10/10" in shown
