"""torchscript-cpu and inductor-cpu: real compiles of small models (reports, artifacts, dynamic shapes, options).

AOTInductor compiles take seconds each on a small CPU, so the inductor tests share one module-scoped build.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import compilers
from compilers.backends.inductor import missing_isa
from compilers.target import load_target
from conftest import assert_same_output, to_numpy, with_batchnorm_statistics

TS, IND = "torchscript-cpu", "inductor-cpu"


class ConvNet(nn.Module):
    """conv + batchnorm + relu: freeze folds the batchnorm, optimize_for_inference makes MKLDNN convolutions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 4)
        with_batchnorm_statistics(self)

    def forward(self, image):
        return self.fc(self.body(image).flatten(1))


class Gate(nn.Module):
    """Data-dependent control flow and a dict output: tracing records one branch, scripting keeps both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.lin(x)
        if bool(h.sum() > 0):
            h = h * scale
        else:
            h = h - scale
        return {"h": h, "n": h.argmax(-1)}


class Heads(nn.Module):
    """Keyword inputs, dynamic batch and sequence, nested outputs (float and int64), and a positional table
    that only covers 16 positions: torch.export narrows `seq` to 16 for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(16, 8) * 0.1)
        self.lin = nn.Linear(8, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x, bias):
        h = torch.relu(self.lin(x + self.pos[: x.shape[1]]))
        return {"logits": self.head(h.mean(1)) + bias, "pair": (h.sum(-1), h.argmax(-1))}


def heads_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, seq, 8, generator=g), "bias": torch.randn(batch, 3, generator=g)}


HEADS_DYN = {"x": {0: "batch", 1: "seq"}, "bias": {0: "batch"}}


@pytest.fixture(scope="module")
def ts_conv():
    model = ConvNet().eval()
    return model, compilers.compile(model, TS, (torch.randn(2, 3, 16, 16),))


@pytest.fixture(scope="module")
def aoti_heads():
    model = Heads().eval()
    return model, compilers.compile(model, IND, heads_inputs(2, 5, 0), dynamic_shapes=HEADS_DYN)


def _rehash(artifact, name: str) -> None:
    """Record an edited file's new sha256 in the manifest (as if the artifact had been saved that way)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))


# -- targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,backend", [(TS, "torchscript"), (IND, "inductor")])
def test_targets_resolve_and_are_available(name, backend):
    t = load_target(name)
    assert (t.backend, t.precision, t.tolerance.noise) == (backend, "fp32", 5)
    assert compilers.unavailable_reason(t) is None
    assert name in [x.name for x in compilers.targets()]


def test_torchscript_descriptor_says_it_is_deprecated():
    assert "deprecated" in load_target(TS).description


def test_unknown_mode_is_refused():
    with pytest.raises(compilers.TargetError, match="trace"):
        compilers.compile(Gate(), load_target(TS).with_(mode="jit"), (torch.randn(2, 6), torch.tensor(2.0)))


def test_inductor_without_cpp_compiler_says_what_to_install():
    from torch._inductor import config
    with config.patch({"cpp.cxx": ("no-such-c++",)}):
        reason = compilers.unavailable_reason(load_target(IND))
        assert "no-such-c++" in reason and "g++" in reason
        with pytest.raises(compilers.BackendUnavailable, match="install"):
            compilers.compile(Heads(), IND, heads_inputs(2, 5, 0))


# -- torchscript -----------------------------------------------------------------------------------
def test_torchscript_report_counts_nodes_and_fusions(ts_conv):
    _, cm = ts_conv
    r = cm.report
    assert r.route == "torchscript-trace" and r.attempts == []
    assert r.nodes_before > r.nodes_after == cm.engine.describe()["nodes"]
    assert r.fused.get("prim::mkldnn_convolution") == 2          # only after optimize_for_inference
    assert any("aten::batch_norm 2" in n for n in r.notes)        # folded by freeze
    assert r.validation.passed
    assert "prim::mkldnn_convolution" in str(r)


def test_torchscript_dynamic_batch_and_roundtrip(ts_conv, tmp_path):
    model, cm = ts_conv
    calls = [torch.randn(b, 3, 16, 16) for b in (1, 5)]
    with torch.no_grad():
        refs = [model(x) for x in calls]
    for x, ref in zip(calls, refs):
        assert_same_output(cm(x), ref)
    assert_same_output(cm(calls[0].numpy()), to_numpy(refs[0]))
    path = cm.save(tmp_path / "conv")
    assert {p.name for p in path.iterdir()} == {"manifest.json", "model.pt"}
    assert json.loads((path / "manifest.json").read_text())["bound"] == {}   # loads in newer torch too
    loaded = compilers.load(path)
    assert loaded.engine.describe() == cm.engine.describe()
    for x, ref in zip(calls, refs):
        assert_same_output(loaded(x), ref)
    # the file is plain TorchScript over the flat inputs: what a libtorch service would load
    shipped = torch.jit.load(str(path / "model.pt"))
    assert_same_output(shipped(calls[1])[0], refs[1])


def test_torchscript_trace_bakes_a_branch_in_and_says_so():
    pos, neg = (torch.ones(2, 6), torch.tensor(2.0)), (-torch.ones(2, 6) * 10, torch.tensor(2.0))
    with pytest.warns(RuntimeWarning, match="disagrees"):
        cm = compilers.compile(Gate().eval(), TS, pos, calibration=[neg], validate="warn",
                               accept_traced_branches=True)   # else ExportError (tests/test_tracing.py)
    assert not cm.report.validation.passed
    assert any("torch.jit.trace warned" in n for n in cm.report.notes)


def test_torchscript_script_mode_keeps_control_flow(tmp_path):
    model = Gate().eval()
    target = load_target(TS).with_(mode="script")
    samples = [(torch.randn(3, 6) + 5, torch.tensor(2.0)), (torch.randn(4, 6) - 5, torch.tensor(3.0))]
    cm = compilers.compile(model, target, samples[0], calibration=samples[1:])
    assert cm.report.route == "torchscript-script" and cm.report.validation.passed
    loaded = compilers.load(cm.save(tmp_path / "gate"))
    for x, scale in samples + [(torch.randn(1, 6), torch.tensor(0.5))]:
        with torch.no_grad():
            ref = model(x, scale)
        assert_same_output(cm(x, scale=scale), ref)
        assert_same_output(loaded(x=x, scale=scale), ref)


def test_torchscript_leaves_torch_threads_alone(ts_conv):
    """torch's intra-op pool is the process's: a compiled model neither sets it nor takes a `threads` option."""
    model, cm = ts_conv
    before = torch.get_num_threads()
    cm(torch.randn(3, 3, 16, 16))
    assert torch.get_num_threads() == before
    with pytest.raises(compilers.TargetError, match="unknown option.*threads"):
        compilers.compile(model, load_target(TS).with_(threads=1), (torch.randn(2, 3, 16, 16),))


def test_torchscript_without_freeze_or_optimization(ts_conv):
    model, _ = ts_conv
    target = load_target(TS).with_(freeze=False, optimize_for_inference=False)
    cm = compilers.compile(model, target, (torch.randn(2, 3, 16, 16),))
    assert cm.report.nodes_after == cm.report.nodes_before and cm.report.fused == {}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_same_output(cm(x), model(x))


# -- inductor --------------------------------------------------------------------------------------
def test_inductor_report(aoti_heads):
    _, cm = aoti_heads
    r = cm.report
    assert r.route == "torch-export" and r.nodes_before > 0
    assert r.seconds["build"] > 0 and "build" in str(r)             # the AOTInductor compile
    assert r.fused["cpp_fused"] >= 1 and r.nodes_after == cm.engine.describe()["nodes"]
    assert any("narrowed" in n and "max=16" in n for n in r.notes)
    assert r.versions["torch"] == torch.__version__ and r.validation.passed


def test_inductor_dynamic_batch_and_seq(aoti_heads):
    model, cm = aoti_heads
    for batch, seq, seed in ((1, 3, 1), (7, 16, 2), (3, 1, 3)):
        inputs = heads_inputs(batch, seq, seed)
        with torch.no_grad():
            ref = model(**inputs)
        assert_same_output(cm(**inputs), ref)
    inputs = heads_inputs(2, 4, 4)
    with torch.no_grad():
        ref = model(**inputs)
    assert_same_output(cm(**{k: v.numpy() for k, v in inputs.items()}), to_numpy(ref))


def test_inductor_refuses_sizes_export_excluded(aoti_heads):
    _, cm = aoti_heads
    with pytest.raises(compilers.InputError, match="1..16"):
        cm(**heads_inputs(2, 17, 5))       # the kernels would read past the positional table


def test_inductor_non_contiguous_input(aoti_heads):
    model, cm = aoti_heads
    x = torch.randn(8, 4, 3).permute(2, 1, 0)          # (3, 4, 8), not contiguous
    bias = torch.randn(3, 3)
    with torch.no_grad():
        ref = model(x, bias)
    assert_same_output(cm(x, bias), ref)


def test_inductor_roundtrip_is_bound_to_torch_and_cpu(aoti_heads, tmp_path):
    model, cm = aoti_heads
    path = cm.save(tmp_path / "heads")
    assert {p.name for p in path.iterdir()} == {"manifest.json", "model.pt2", "aoti.json"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["bound"] == {"torch": torch.__version__}
    loaded = compilers.load(path)
    inputs = heads_inputs(4, 9, 6)
    with torch.no_grad():
        ref = model(**inputs)
    assert_same_output(loaded(**inputs), ref)
    assert loaded.engine.describe() == cm.engine.describe()
    with pytest.raises(compilers.InputError, match="1..16"):
        loaded(**heads_inputs(1, 20, 7))

    meta = json.loads((path / "aoti.json").read_text())
    meta["isa"] += ",avx9000"
    (path / "aoti.json").write_text(json.dumps(meta))
    _rehash(path, "aoti.json")
    with pytest.raises(compilers.ArtifactError, match="avx9000"):
        compilers.load(path)


def test_missing_isa():
    assert missing_isa("x86_64:avx2,fma", "x86_64:avx2,avx512f,fma") == ""
    assert missing_isa("x86_64:avx2,avx512f", "x86_64:avx2") == "avx512f"
    assert "aarch64" in missing_isa("aarch64:neon", "x86_64:avx2")


def test_inductor_refuses_a_dim_export_pins():
    lstm = nn.LSTM(4, 5, batch_first=True).eval()
    with pytest.raises(compilers.ExportError, match="pins dynamic dim"):
        compilers.compile(lstm, IND, (torch.randn(2, 6, 4),), dynamic_shapes={"input": {0: "batch", 1: "seq"}})


def test_artifact_with_an_option_this_version_dropped_still_loads(ts_conv, tmp_path):
    """torchscript-cpu artifacts saved before `threads` was removed carry `threads = 0`; they load with a warning."""
    model, cm = ts_conv
    path = cm.save(tmp_path / "old")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["target"]["options"]["threads"] = 0
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match=r"ignoring option\(s\) \['threads'\]"):
        loaded = compilers.load(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same_output(loaded(x), model(x))
