"""compilers.benchmark and `compilers bench`: interleaved per-call timing, percentiles, batch sweeps, the raw
backend call the overhead is measured against, noise flagged, JSON and a PNG; pipelines timed whole and stage by
stage (pre-processing, inference, post-processing)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import compilers
from compilers import cli
from compilers.bench import NOISY, SPLIT_TITLE, STAGES, Benchmark, synthetic_inputs

FAST = dict(warmup=0.01, min_time=0.05, blocks=5)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture(scope="module")
def compiled():
    model = mlp()
    x = torch.randn(4, 16)
    return model, x, {t: compilers.compile(model, t, (x,)) for t in ("ort-cpu", "openvino-cpu", "torchscript-cpu")}


def test_every_model_and_batch_size_gets_a_latency_distribution(compiled):
    model, x, cms = compiled
    result = compilers.benchmark(cms, (x,), baseline=model, batch_sizes=[1, 8], **FAST)
    assert result.names == ["eager", "ort-cpu", "openvino-cpu", "torchscript-cpu"]
    assert result.batch_sizes == [1, 8]
    for t in result.timings:
        assert t.error is None
        assert t.calls >= 5
        assert 0 < t.min_ms <= t.p50_ms <= t.p90_ms <= t.p99_ms <= t.max_ms
        assert t.throughput == pytest.approx(t.batch / t.mean_ms * 1e3)
    assert result.speedup("eager", 8) == 1.0
    assert result.speedup("ort-cpu", 8) == result.get("eager", 8).p50_ms / result.get("ort-cpu", 8).p50_ms
    assert result.fastest(batch=8) in cms
    text = str(result)
    assert "p50 ms" in text and "vs eager" in text and "interleaved" in text


def test_batch_sizes_resize_the_inputs_by_repeating_samples():
    seen = []

    def model(x, scale):
        seen.append((tuple(x.shape), tuple(scale.shape)))
        return x * scale

    x, scale = torch.randn(2, 3), torch.ones(3)   # scale has no batch dim: left alone
    compilers.benchmark({"fn": model}, (x, scale), batch_sizes=[5], **FAST)
    assert set(seen) == {((5, 3), (3,))}


def test_batch_sizes_follow_the_signature_batch_dim(compiled):
    model, x, cms = compiled
    result = compilers.benchmark(cms["ort-cpu"], (x,), batch_sizes=[3], **FAST)
    assert result.names == ["ort-cpu"] and result.get("ort-cpu", 3).error is None
    assert result.baseline is None and math.isnan(result.speedup("ort-cpu", 3))


def test_raw_backend_calls_give_the_same_outputs_and_measure_the_overhead(compiled):
    model, x, cms = compiled
    for name, cm in cms.items():
        raw = cm.raw_call(x)()
        out = raw[0] if isinstance(raw, (list, tuple)) else raw
        torch.testing.assert_close(torch.as_tensor(out), cm(x), msg=name)
    result = compilers.benchmark(cms, (x,), raw=True, **FAST)
    for name in cms:
        assert result.get(name + " raw").error is None
        assert not math.isnan(result.overhead_us(name))
    assert "overhead us" in str(result)


def test_a_model_that_fails_at_one_batch_size_is_reported_and_the_others_are_timed():
    model = mlp()
    static = compilers.compile(model, "ort-cpu", (torch.randn(4, 16),), dynamic_shapes={"input": {}})
    calls = {"static": static, "eager": model}
    result = compilers.benchmark(calls, (torch.randn(4, 16),), batch_sizes=[4, 2], **FAST)
    assert result.get("static", 4).error is None
    assert "expected 4" in result.get("static", 2).error or "InputError" in result.get("static", 2).error
    assert result.get("eager", 2).error is None
    assert "static failed at batch 2" in str(result)


def test_a_run_whose_blocks_disagree_is_flagged_noisy():
    state = {"calls": 0}

    def unsteady(x):
        state["calls"] += 1
        time.sleep(0.004 if (state["calls"] // 10) % 2 else 0.001)   # slow and fast phases
        return x

    def steady(x):
        return x + 1

    result = compilers.benchmark({"unsteady": unsteady, "steady": steady}, (torch.zeros(1),),
                                 warmup=0, min_time=0.1, blocks=8)
    assert result.get("unsteady").noisy and result.get("unsteady").spread > NOISY
    assert "too noisy to trust" in str(result)


def test_results_round_trip_through_json(compiled):
    model, x, cms = compiled
    result = compilers.benchmark({"ort-cpu": cms["ort-cpu"]}, (x,), baseline=model, **FAST)
    again = Benchmark.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.timings == result.timings and again.baseline == "eager" and again.batch_sizes == result.batch_sizes


def test_bad_arguments_are_input_errors(compiled):
    model, x, cms = compiled
    with pytest.raises(compilers.InputError, match="batch_sizes"):
        compilers.benchmark(model, (x,), batch_sizes=[0])
    with pytest.raises(compilers.InputError, match="mapping"):
        compilers.benchmark("ort-cpu", (x,))
    with pytest.raises(compilers.InputError, match="no dynamic dim 'seq'"):
        compilers.benchmark(cms["ort-cpu"], (x,), sizes={"seq": 3}, **FAST)


def test_synthetic_inputs_fit_the_signature(compiled):
    _, x, cms = compiled
    args, kwargs = synthetic_inputs(cms["ort-cpu"].signature)
    assert cms["ort-cpu"](*args, **kwargs).shape[1] == 8


FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), (torch.randn(4, 16),)
'''


def test_cli_bench_writes_a_table_json_and_png(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = cli.main(["bench", f"{factory}:make", "-t", "ort-cpu", "-t", "no-such-target", "--batch-sizes", "1,4",
                     "--min-time", "0.05", "--overhead", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ort-cpu raw" in printed and "no-such-target failed" in printed
    data = json.loads(out_json.read_text())
    assert data["batch_sizes"] == [1, 4] and data["baseline"] == "eager"
    assert {t["name"] for t in data["timings"]} == {"eager", "ort-cpu", "ort-cpu raw", "no-such-target"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 20_000

    artifact = tmp_path / "artifact"
    model, example = _made(factory)
    compilers.compile(model, "ort-cpu", example).save(artifact)
    assert cli.main(["bench", str(artifact), "--batch-sizes", "2", "--min-time", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "ort-cpu" in printed and "failed" not in printed
    assert cli.main(["bench", str(artifact), "--batch-sizes", "x"]) == 2
    assert cli.main(["bench", str(artifact), "--plot", str(tmp_path / "chart.jpeg")]) == 2
    assert "write a .png, .svg or .pdf file" in capsys.readouterr().err and not (tmp_path / "chart.jpeg").exists()


def _made(factory):
    sys.path.insert(0, str(factory.parent))
    try:
        return __import__(factory.stem).make()
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def compiled_pipeline():
    import test_pipeline_text as text
    pipe = text.encoder()
    return pipe, compilers.compile(pipe, "ort-cpu", text.SENTENCES[:4]), text.SENTENCES


def test_a_pipeline_is_timed_whole_and_stage_by_stage(compiled_pipeline, tmp_path, capsys):
    pipe, cm, sentences = compiled_pipeline
    result = compilers.benchmark(cm, sentences[:3], baseline=pipe, batch_sizes=[1, 5], **FAST)
    assert result.names == ["eager", "ort-cpu"] and result.pipelines == ["ort-cpu"]
    assert [t.name for t in result.stages] == [f"ort-cpu {s}" for s in STAGES] * 2
    assert all(t.error is None and t.p50_ms > 0 for t in result.timings + result.stages)
    split = result.split("ort-cpu", 5)
    assert split["total"] == result.get("ort-cpu", 5).p50_ms >= split["inference"] > 0
    assert SPLIT_TITLE in str(result) and "inference ms" in str(result)
    again = Benchmark.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.stages == result.stages and again.split("ort-cpu", 5) == split
    with pytest.raises(compilers.InputError, match="raw= are for tensor models"):
        compilers.benchmark(cm, sentences, raw=True, **FAST)
    with pytest.raises(compilers.InputError, match="list of items"):
        compilers.benchmark(cm, [], **FAST)
    # a saved pipeline's items cannot be made up: `compilers bench ARTIFACT` times its tensor model
    cm.save(tmp_path / "enc")
    assert cli.main(["bench", str(tmp_path / "enc"), "--batch-sizes", "2", "--min-time", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "its tensor model on synthetic inputs" in printed and "failed" not in printed


PIPELINE_FACTORY = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_pipeline_text as t

def pipeline():
    return {{"model": t.encoder(), "example_inputs": t.SENTENCES[:4]}}
"""


def test_cli_bench_of_a_pipeline_factory_prints_and_writes_the_split(tmp_path, monkeypatch, capsys):
    (tmp_path / "factory.py").write_text(PIPELINE_FACTORY)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "factory.py:pipeline", "-t", "ort-cpu", "--batch-sizes", "1,4", "--min-time", "0.2",
                     "--json", "bench.json"]) == 0
    printed = capsys.readouterr().out
    assert SPLIT_TITLE in printed and "Pipeline from factory.py:pipeline" in printed
    split_rows = [line for line in printed.splitlines() if "ort-cpu" in line and "%)" in line]
    assert len(split_rows) == 2, printed
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["batch_sizes"] == [1, 4] and {t["name"] for t in data["timings"]} == {"eager", "ort-cpu"}
    assert [(s["model"], s["batch"]) for s in data["split"]] == [("ort-cpu", 1), ("ort-cpu", 4)]
    for s in data["split"]:
        assert all(s[f"{stage}_ms"] > 0 for stage in (*STAGES, "total")), s
        assert s["total_ms"] >= s["inference_ms"] and 0 < s["inference_share"] <= 1, s
    assert {t["name"] for t in data["stages"]} == {f"ort-cpu {s}" for s in STAGES}
