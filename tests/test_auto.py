"""Auto targets: every candidate compiled and validated, the valid ones timed, the fastest returned; a
candidate that fails is recorded with why and never chosen; the choice is kept in the artifact and in
cache_dir. Real backends on a small seeded MLP (batch 4: torch.export pins a batch of 1)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import compilers
from compilers import cli
from compilers.report import Report
from compilers.select import CACHED_NOTE, choose
from compilers.target import Auto, builtin_autos, builtin_targets, load_descriptor, load_target

FP32 = ["ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu"]
VERDICTS = {"chosen", "valid", "failed validation", "failed", "unavailable", "skipped"}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.f(x)


def example() -> tuple[torch.Tensor]:
    return (torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),)


def write_auto(path, candidates, **keys) -> str:
    """An auto descriptor at `path` (bench_seconds 0.1 unless given), returned as a str path."""
    keys = {"objective": "latency", "bench_seconds": 0.1, **keys}
    lines = [f'name = "{path.stem}"', "[auto]", "candidates = " + json.dumps(candidates)]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def impossible(tmp_path):
    """Two candidates whose contracts no compiled model meets: ort-cpu with no allowance over float64 (ort is
    the fastest here, so a selection that timed it would pick it), and bf16 with a cosine bound of 1 (which
    rounding never meets, whether the CPU computes bf16 or, without bf16, f32)."""
    (tmp_path / "ort-exact.toml").write_text(
        'extends = "ort-cpu"\nname = "ort-exact"\n[tolerance]\nnoise = 0\nperturbed = 0\nfloor = 0\n')
    (tmp_path / "bf16-strict.toml").write_text(
        'extends = "openvino-cpu-bf16"\nname = "bf16-strict"\n[tolerance]\nmin_cosine = 1.0\n')
    return tmp_path


@pytest.fixture(scope="module")
def auto_cpu(tmp_path_factory):
    """auto-cpu (its four fp32 candidates, timed 0.1 s each to keep the test short), with a cache_dir."""
    cache = tmp_path_factory.mktemp("cache")
    auto = dataclasses.replace(load_descriptor("auto-cpu"), bench_seconds=0.1)
    model = MLP().eval()
    return model, auto, cache, compilers.compile(model, auto, example(), cache_dir=cache)


# -- descriptors -----------------------------------------------------------------------------------
def test_builtin_auto_descriptors():
    autos = {a.name: a for a in builtin_autos()}
    assert list(autos["auto-cpu"].candidates) == FP32
    assert all(t.precision == "fp32" for t in autos["auto-cpu"].targets)
    lossy = autos["auto-cpu-lossy"]
    assert set(lossy.candidates) == set(FP32) | {"openvino-cpu-bf16", "ort-cpu-int8", "openvino-cpu-int8"}
    assert (lossy.objective, lossy.batch_size, lossy.compile_budget_s) == ("latency", 0, 0)
    assert not {"auto-cpu", "auto-cpu-lossy"} & {t.name for t in builtin_targets()}
    assert not {"auto-cpu", "auto-cpu-lossy"} & {t.name for t in compilers.targets()}
    with pytest.raises(compilers.TargetError, match="auto-cpu is an auto target: pass it to compilers.compile"):
        load_target("auto-cpu")


@pytest.mark.parametrize("body, match", [
    ('[auto]\ncandidates = ["ort-cpu", "no-such-target"]\n', "candidate 'no-such-target': unknown target"),
    ('[auto]\ncandidates = ["ort-cpu"]\nobjective = "fastest"\n', "objective = 'fastest'; choose one of"),
    ('[auto]\ncandidates = ["ort-cpu"]\nbench_seconds = 0\n', "bench_seconds = 0.0 must be >= 0.01"),
    ('[auto]\ncandidates = ["ort-cpu"]\nbatch = 8\n', r"unknown key\(s\) \['batch'\]"),
    ('[auto]\ncandidates = []\n', "needs a list of candidate targets"),
    ('[auto]\ncandidates = ["ort-cpu", "ort-cpu"]\n', "more than once"),
    ('[auto]\ncandidates = ["auto-cpu"]\n', "is itself an auto target"),
    ('[auto]\ncandidates = ["ort-cpu"]\n[auto.sizes]\nseq = 0\n', "sizes must map dynamic dim names to sizes >= 1"),
    ('backend = "onnxruntime"\n[auto]\ncandidates = ["ort-cpu"]\n', "has no 'backend'"),
])
def test_bad_auto_descriptor_is_a_target_error_at_load(tmp_path, body, match):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n' + body)
    with pytest.raises(compilers.TargetError, match=match):
        load_descriptor(path)
    with pytest.raises(compilers.TargetError, match=match):
        compilers.compile(MLP(), path, example())


def test_user_auto_descriptor_resolves_relative_paths_and_extends(tmp_path, monkeypatch):
    sub = tmp_path / "autos"
    sub.mkdir()
    (sub / "fast.toml").write_text('extends = "ort-cpu"\nname = "ort-1-thread"\n[options]\nthreads = 1\n')
    auto = load_descriptor(write_auto(sub / "mine.toml", ["fast.toml", "torchscript-cpu"], objective="throughput",
                                      batch_size=8, compile_budget_s=60))
    assert isinstance(auto, Auto)
    assert [t.name for t in auto.targets] == ["ort-1-thread", "torchscript-cpu"]
    assert auto.targets[0].options["threads"] == 1
    assert (auto.objective, auto.batch_size, auto.compile_budget_s, auto.bench_seconds) == ("throughput", 8, 60.0, 0.1)
    monkeypatch.chdir(tmp_path)        # the descriptor named by a relative path: its candidates resolve once
    relative = load_descriptor("autos/mine.toml").targets
    assert [(t.name, dict(t.options)) for t in relative] == [(t.name, dict(t.options)) for t in auto.targets]
    monkeypatch.setenv("COMPILERS_TARGETS", str(sub))
    (tmp_path / "more.toml").write_text('extends = "mine"\nname = "more"\n[auto]\nobjective = "latency"\n'
                                        '[auto.sizes]\nbatch = 2\n')
    more = load_descriptor(tmp_path / "more.toml")    # fast.toml still found beside mine.toml, which names it
    assert (more.objective, more.batch_size, dict(more.sizes)) == ("latency", 8, {"batch": 2})
    assert [t.name for t in more.targets] == ["ort-1-thread", "torchscript-cpu"]
    d = more.to_dict()
    assert d["auto"]["sizes"] == {"batch": 2}
    assert [t["name"] for t in d["targets"]] == ["ort-1-thread", "torchscript-cpu"]
    assert Auto.from_dict({k: v for k, v in d.items() if k != "targets"}).targets == more.targets


# -- choosing ----------------------------------------------------------------------------------------
def test_auto_cpu_returns_the_fastest_valid_candidate(auto_cpu, tmp_path):
    model, auto, _, cm = auto_cpu
    rows = cm.report.candidates
    assert [r["target"] for r in rows] == FP32 and {r["verdict"] for r in rows} <= VERDICTS
    chosen = [r for r in rows if r["verdict"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["target"] == cm.target.name == cm.report.target
    timed = [r for r in rows if r["verdict"] in ("chosen", "valid")]
    assert len(timed) >= 2, rows      # every fp32 candidate runs this MLP
    assert chosen[0]["p50_ms"] == min(r["p50_ms"] for r in timed)
    assert all(r["compile_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["throughput"] > 0 for r in timed)
    assert cm.report.auto["name"] == "auto-cpu" and cm.report.auto["objective"] == "latency"
    assert cm.report.auto["shapes"] == {"batch": 4}
    assert cm.report.validation.passed
    x = torch.randn(3, 16)
    torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-4)

    loaded = compilers.load(cm.save(tmp_path / "art"))
    assert loaded.report.candidates == rows and loaded.report.auto == cm.report.auto
    shown = str(loaded.report)
    assert "auto-cpu: latency, timed at batch=4" in shown
    for r in rows:
        assert r["target"] in shown
    assert "verdict" in shown and "p50 ms" in shown and "samples/s" in shown


def test_cli_report_prints_the_candidates(auto_cpu, tmp_path, capsys):
    _, _, _, cm = auto_cpu
    cm.save(tmp_path / "art")
    assert cli.main(["report", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and all(name in out for name in FP32)


def test_second_compile_reads_the_choice_from_the_cache(auto_cpu):
    model, auto, cache, first = auto_cpu
    assert len(list((cache / "auto").glob("auto-cpu-*.json"))) == 1
    again = compilers.compile(model, auto, example(), cache_dir=cache)
    assert CACHED_NOTE in again.report.notes and CACHED_NOTE not in first.report.notes
    assert again.target.name == first.target.name
    assert again.report.candidates == first.report.candidates    # the stored timings: nothing was timed again
    assert again.report.cache == "hit"                           # and the chosen build came from compile's cache
    x = torch.randn(5, 16)
    torch.testing.assert_close(again(x), first(x))


def test_cache_key_follows_weights_example_and_descriptor(auto_cpu):
    from compilers.cache import Cache, fingerprint
    from compilers.select import _example_key
    model, auto, cache, _ = auto_cpu
    key = lambda m, a, x: Cache(cache).choice_path(fingerprint(m), a, _example_key(x, None), {}, {})
    base = key(model, auto, example())
    other = MLP()
    with torch.no_grad():
        other.f[0].bias.add_(1)
    assert key(other, auto, example()) != base
    assert key(model, auto, (torch.randn(8, 16),)) != base
    assert key(model, dataclasses.replace(auto, objective="throughput"), example()) != base
    assert key(model, auto, example()) == base


def test_failing_candidates_are_recorded_and_never_chosen(impossible):
    path = write_auto(impossible / "mine.toml", ["ort-exact.toml", "bf16-strict.toml", "torchscript-cpu"])
    cm = compilers.compile(MLP().eval(), path, example())
    rows = {r["target"]: r for r in cm.report.candidates}
    assert cm.target.name == "torchscript-cpu" and rows["torchscript-cpu"]["verdict"] == "chosen"
    assert rows["torchscript-cpu"]["reason"] == "only valid candidate" and rows["torchscript-cpu"]["p50_ms"] > 0
    for name, why in [("ort-exact", "error"), ("bf16-strict", "cosine")]:
        assert rows[name]["verdict"] == "failed validation", rows[name]
        assert why in rows[name]["reason"] and rows[name]["p50_ms"] is None
        assert rows[name]["compile_s"] > 0


def test_only_failing_candidates_raise_with_every_verdict(impossible):
    path = write_auto(impossible / "mine.toml", ["ort-exact.toml", "bf16-strict.toml", "ort-cpu-int8"])
    with pytest.raises(compilers.ValidationError) as e:
        compilers.compile(MLP().eval(), path, example())
    text = str(e.value)
    assert "no candidate is valid" in text
    assert text.count("failed validation") == 2 and "cosine" in text
    assert "ort-cpu-int8" in text and "skipped" in text


def test_int8_without_calibration_is_skipped_and_budget_skips_the_rest(tmp_path):
    path = write_auto(tmp_path / "mine.toml", ["ort-cpu-int8", "torchscript-cpu", "ort-cpu"], compile_budget_s=0.001)
    cm = compilers.compile(MLP().eval(), path, example())
    rows = {r["target"]: r for r in cm.report.candidates}
    assert rows["ort-cpu-int8"]["verdict"] == "skipped" and "calibration" in rows["ort-cpu-int8"]["reason"]
    assert rows["torchscript-cpu"]["verdict"] == "chosen"     # the first compile spends the budget
    assert rows["ort-cpu"] == {**rows["ort-cpu"], "verdict": "skipped", "reason": "compile budget of 0.001 s spent",
                               "compile_s": None}


def test_unavailable_and_crashing_candidates_are_recorded():
    unavailable = load_target("ort-cpu").with_(name="ort-bf16", precision="bf16")
    auto = Auto("mine", candidates=(unavailable, "ort-cpu", "torchscript-cpu"), objective="throughput",
                bench_seconds=0.1)
    model = MLP().eval()

    def build(target):      # a backend that crashes with an error of its own, not a CompilerError
        if target.name == "ort-cpu":
            raise RuntimeError("engine exploded\nsecond line")
        return compilers.compile(model, target, example())
    selection = choose(auto, build, example(), calibration_given=False)
    rows = {r.target: r for r in selection.candidates}
    assert rows["ort-bf16"].verdict == "unavailable" and "precision bf16" in rows["ort-bf16"].reason
    assert (rows["ort-cpu"].verdict, rows["ort-cpu"].reason) == ("failed", "RuntimeError: engine exploded")
    assert selection.chosen.target.name == "torchscript-cpu" and rows["torchscript-cpu"].verdict == "chosen"


def test_auto_needs_validation_and_timed_dims_the_model_has(tmp_path):
    with pytest.raises(compilers.InputError, match="validates every candidate"):
        compilers.compile(MLP(), "auto-cpu", example(), validate=False)
    path = write_auto(tmp_path / "mine.toml", ["torchscript-cpu", "ort-cpu"])
    with open(path, "a") as f:
        f.write("[auto.sizes]\nseq = 128\n")
    with pytest.raises(compilers.InputError, match="no dynamic dim 'seq'"):
        compilers.compile(MLP().eval(), path, example())


def test_batch_size_and_objective_of_the_descriptor_are_used(tmp_path):
    path = write_auto(tmp_path / "mine.toml", ["torchscript-cpu", "openvino-cpu"], objective="throughput", batch_size=8)
    cm = compilers.compile(MLP().eval(), path, example())
    rows = [r for r in cm.report.candidates if r["verdict"] in ("chosen", "valid")]
    assert cm.report.auto["shapes"] == {"batch": 8} and cm.report.auto["objective"] == "throughput"
    chosen = next(r for r in rows if r["verdict"] == "chosen")
    assert chosen["throughput"] == max(r["throughput"] for r in rows)


def test_report_without_auto_fields_still_loads():
    old = Report("ort-cpu", "onnxruntime", "fp32").to_dict()
    del old["candidates"], old["auto"]
    report = Report.from_dict(old)
    assert report.candidates is None and report.auto is None and "auto" not in str(report)


def test_cli_targets_lists_auto_targets(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "auto-cpu " in out and "auto-cpu-lossy" in out
    assert "ort-cpu, openvino-cpu, torchscript-cpu, inductor-cpu" in out
    assert cli.main(["targets", "--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed["auto-cpu"]["auto"] and listed["auto-cpu"]["candidates"] == FP32 and listed["ort-cpu"]["available"]
