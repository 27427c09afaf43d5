"""`compilers tune`: real `compilers serve` child processes measured at each configuration of a small grid; the
table, the choice (the most samples/s within the p99 budget, errors excluded), the written serving.toml (it loads,
holds the chosen values and keeps the rest of the file; a running server takes it at the next load), tune.json
(every configuration's levels, the budget, the machine); a budget none meets writes nothing (exit 2); bad input is
refused before any server starts; no child process outlives a run, an error or Ctrl-C; publish's tip."""
from __future__ import annotations

import contextlib
import io
import json
import tomllib
import urllib.request
from pathlib import Path

import psutil
import pytest

from compilers.cli import main
from compilers.errors import InputError
from compilers.serve.repository import publish, read_config_file
from compilers.serve.server import running
from compilers.serve.batcher import Batching
from compilers.serve.tune import Model, ServerFailed, candidates, render, serving, tuned

ORIGINAL = """# the mlp, served
[versions]
policy = "latest"   # the newest only

[batching]
max_batch_size = 4
queue_size = 100    # kept by tune
preferred_batch_sizes = [2, 4]

[replicas]
min = 1
"""


def children() -> list[psutil.Process]:
    """This process's children, but multiprocessing's resource tracker (started by perf's worker processes, it
    lives as long as this process)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "multiprocessing.resource_tracker" not in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, mlp):
    path = tmp_path_factory.mktemp("tune") / "artifact"
    mlp.save(path)
    return path


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, artifact):
    """One tune run over 3 configurations (2-row requests: max_batch_size 1 fails every one), while a server of
    the same repository runs: (model dir, exit code, stdout, stderr, plot path, the server)."""
    root = tmp_path_factory.mktemp("tuned")
    model = root / "repo" / "mlp"
    publish(artifact, model)
    (model / "serving.toml").write_text(ORIGINAL)
    data = root / "data.json"
    data.write_text(json.dumps({"data": [{"input": [[0.25] * 6, [0.5] * 6]}]}))     # 2 rows each
    png = root / "tune.png"
    with running(root / "repo") as server:
        before = json.loads(urllib.request.urlopen(f"{server.url}/v2/models/mlp/config", timeout=60).read())
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["tune", str(model), "--p99-ms", "1000", "--concurrency", "1,4", "--duration", "1",
                         "--warmup", "0.2", "--input-data", str(data), "--grid", "batching.max_batch_size=1,8",
                         "batching.instances=1", "--plot", str(png)])
        left = children()
        yield model, code, out.getvalue(), err.getvalue(), png, (server, before), left


def test_tune_measures_every_configuration_and_writes_the_fastest_within_budget(tuned_run):
    model, code, out, err, png, server, left = tuned_run
    assert code == 0, err
    assert left == []                                   # every server it started was stopped
    report = json.loads((model / "tune.json").read_text())
    configs = report["configs"]
    assert [c["config"]["batching.max_batch_size"] for c in configs] == [1, 8, 8]
    assert [c["config"]["batching.max_queue_delay_ms"] for c in configs] == [0.0, 0.0, 2.0]
    assert all(c["config"]["engine.threads"] == len(psutil.Process().cpu_affinity()) for c in configs)
    # max_batch_size 1 refuses the 2-row requests: every one fails, so it is recorded as failed, never chosen
    assert configs[0]["levels"] == [] and "max_batch_size 1" in configs[0]["error"]
    for c in configs[1:]:
        assert c["error"] is None and [x["concurrency"] for x in c["levels"]] == [1, 4]
        for x in c["levels"]:
            assert x["errors"] == 0 and x["samples"] == 2 * x["requests"] > 0
            assert x["within_budget"] == (x["latency_ms"]["p99"] <= 1000)
    # the choice, recomputed from the measurements: the most samples/s among error-free levels within budget
    best = max(((x["samples_per_second"], -x["latency_ms"]["p99"], i) for i, c in enumerate(configs)
                for x in c["levels"] if x["within_budget"]), default=None)
    assert best is not None and report["chosen"]["config"] == best[2] + 1
    chosen = configs[best[2]]["config"]
    assert report["chosen"]["serving"] == chosen
    assert report["p99_ms"] == 1000 and report["versions"] == [1] and report["load"]["concurrency"] == [1, 4]
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"] and report["date"] and report["compilers"]
    # the table: a row per level, a failed row for config 1, the choice marked once and stated
    rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 1 + 2 + 2 and "failed" in rows[0]
    assert out.count("<- chosen") == 1 and f"chosen: config {best[2] + 1}" in out
    assert "config 1 failed:" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the written serving.toml loads, holds the chosen values and keeps the other tables, keys and comments
    config = read_config_file(model / "serving.toml")
    assert config.batching.max_batch_size == 8 and config.batching.instances == 1
    assert config.batching.max_queue_delay_ms == chosen["batching.max_queue_delay_ms"]
    assert config.engine == {"threads": chosen["engine.threads"]}
    assert config.batching.queue_size == 100 and config.batching.preferred_batch_sizes == (2, 4)
    assert config.versions.policy == "latest" and config.replicas.min == 1
    text = (model / "serving.toml").read_text()
    assert "# the mlp, served" in text and "# kept by tune" in text and "# the newest only" in text
    assert [p.name for p in model.iterdir() if p.name.startswith(".")] == []      # no temporary file left


def test_a_running_server_takes_the_tuned_serving_toml_at_its_next_load(tuned_run):
    model, code, _, _, _, (server, before), _ = tuned_run
    assert code == 0
    assert before["max_batch_size"] == 4            # serving the original until then
    chosen = json.loads((model / "tune.json").read_text())["chosen"]["serving"]
    request = urllib.request.Request(f"{server.url}/v2/repository/models/mlp/load", data=b"{}", method="POST")
    urllib.request.urlopen(request, timeout=60).read()
    config = json.loads(urllib.request.urlopen(f"{server.url}/v2/models/mlp/config", timeout=60).read())
    assert config["max_batch_size"] == chosen["batching.max_batch_size"] == 8
    assert config["instance_group"][0]["count"] == chosen["batching.instances"]
    delay = config["dynamic_batching"]["max_queue_delay_microseconds"]
    assert delay == round(chosen["batching.max_queue_delay_ms"] * 1000)


def test_a_budget_none_meets_writes_nothing_and_exits_2(tmp_path, artifact, capsys):
    model = tmp_path / "repo" / "mlp"
    publish(artifact, model)
    (model / "serving.toml").write_text(ORIGINAL)
    code = main(["tune", str(model), "--p99-ms", "0.001", "--concurrency", "1", "--duration", "0.5", "--warmup", "0",
                 "--grid", "batching.max_batch_size=4", "batching.max_queue_delay_ms=0", "batching.instances=1"])
    captured = capsys.readouterr()
    assert code == 2
    assert "no configuration kept p99 within 0.001 ms" in captured.err and "the lowest p99 seen" in captured.err
    assert "Nothing was written" in captured.err
    assert (model / "serving.toml").read_text() == ORIGINAL and not (model / "tune.json").exists()
    assert sorted(p.name for p in model.iterdir()) == ["1", "serving.toml"]
    assert children() == []


@pytest.fixture()
def repo(tmp_path, artifact):
    publish(artifact, tmp_path / "repo" / "mlp")
    (tmp_path / "repo" / "empty").mkdir()
    handled = tmp_path / "repo" / "handled"
    publish(artifact, handled)
    (handled / "serving.toml").write_text(f'[handler]\nfile = "handler.py"\nsha256 = "{"0" * 64}"\n')
    return tmp_path / "repo"


@pytest.mark.parametrize("args, said", [
    (["missing", "--p99-ms", "50"], "is not a model directory"),
    (["empty", "--p99-ms", "50"], "has no version to serve"),
    (["mlp", "--p99-ms", "0"], "--p99-ms must be a positive number"),
    (["mlp", "--p99-ms", "nan"], "--p99-ms must be a positive number"),
    (["mlp", "--p99-ms", "50", "--concurrency", "0,4"], "--concurrency takes positive integers"),
    (["mlp", "--p99-ms", "50", "--duration", "0"], "--duration must be positive"),
    (["mlp", "--p99-ms", "50", "--input-data", "nowhere.json"], "--input-data nowhere.json is not a file"),
    (["mlp", "--p99-ms", "50", "--grid", "batching.max_batch_sise=8"], "is not a key to tune; the keys: "
                                                                       "batching.max_batch_size"),
    (["mlp", "--p99-ms", "50", "--grid", "batching.rows_independent=true"], "changes what is computed"),
    (["mlp", "--p99-ms", "50", "--grid", "engine.graph_optimization_level=basic"], "engine.threads, engine.spinning"),
    (["mlp", "--p99-ms", "50", "--grid", "batching.max_batch_size=0"], "must be >= 1"),
    (["mlp", "--p99-ms", "50", "--grid", "batching.max_batch_size=eight"], "'eight' is not int"),
    (["mlp", "--p99-ms", "50", "--grid", "engine.threads=-1"], "must be >= 0"),
    (["mlp", "--p99-ms", "50", "--grid", "engine.spinning=maybe"], "is not true or false"),
    (["mlp", "--p99-ms", "50", "--grid", "batching.instances"], "write KEY=V1,V2"),
    (["handled", "--p99-ms", "50"], "pass --handlers"),
])
def test_bad_input_is_refused_before_any_server_starts(repo, args, said, capsys):
    code = main(["tune", str(repo / args[0]), *args[1:]])
    err = capsys.readouterr().err
    assert code == 2 and said in err, err
    assert "config 1/" not in err and children() == []      # the run's log line before its first server


def test_dry_run_lists_the_default_grid_and_its_time_and_starts_nothing(repo, capsys):
    assert main(["tune", str(repo / "mlp"), "--p99-ms", "50", "--dry-run"]) == 0
    err = capsys.readouterr().err
    cores = len(psutil.Process().cpu_affinity())
    instances = sorted({cores, *(2 ** k for k in range(cores.bit_length()) if 2 ** k <= cores)})
    count = (1 + 3 * 2) * len(instances)      # max_batch_size 1 (once), 8, 16, 32 x delays 0, 2; x instances
    assert f"{count} configurations x 3 levels (concurrency 1,8,32)" in err
    assert "(1 s warm-up + 3 s), plus a server start each: about " in err
    assert "max_batch_size=32 max_queue_delay_ms=2 instances=1" in err and "config 1/" not in err
    assert not (repo / "mlp" / "tune.json").exists() and children() == []


def test_the_server_is_stopped_on_ctrl_c_and_on_a_failed_start(tmp_path, artifact):
    repo = tmp_path / "repo"
    publish(artifact, repo / "mlp")
    with pytest.raises(KeyboardInterrupt):
        with serving(repo, log_file=tmp_path / "log") as url:
            assert urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10).status == 200
            assert len(children()) >= 1
            raise KeyboardInterrupt
    assert children() == []
    (repo / "mlp" / "serving.toml").write_text("[engine]\nthreads = 1\ngraph_optimization_level = \"basic\"\n")
    with pytest.raises(ServerFailed, match="did not load the model: .*cannot change at load"):
        with serving(repo, log_file=tmp_path / "log"):
            pass
    assert children() == []


def test_render_sets_the_keys_and_keeps_the_rest():
    text = render(ORIGINAL, {"batching.max_batch_size": 2, "batching.max_queue_delay_ms": 0.0, "engine.threads": 1})
    data = tomllib.loads(text)
    assert data["batching"] == {"max_batch_size": 2, "queue_size": 100, "preferred_batch_sizes": [2],
                                "max_queue_delay_ms": 0.0}          # 4 could never be reached: dropped
    assert data["engine"] == {"threads": 1} and data["versions"] == {"policy": "latest"}
    assert "# kept by tune" in text and "# the newest only" in text
    assert "preferred_batch_sizes" not in tomllib.loads(render(ORIGINAL, {"batching.max_batch_size": 1}))["batching"]
    assert tomllib.loads(render("", {"batching.instances": 2})) == {"batching": {"instances": 2}}


def test_publish_tips_tune_until_tune_json_measured_the_newest_version(tmp_path, artifact, capsys):
    model = tmp_path / "repo" / "mlp"
    tip = f"tip: compilers tune {model} --p99-ms 50 picks batching and threads by measurement"
    assert main(["publish", str(artifact), str(model)]) == 0
    assert tip in capsys.readouterr().err
    (model / "tune.json").write_text(json.dumps({"versions": [1]}))
    assert tuned(model)
    assert main(["publish", str(artifact), str(model)]) == 0      # version 2: tune.json is older than it
    assert tip in capsys.readouterr().err and not tuned(model)
    (model / "tune.json").write_text(json.dumps({"versions": [2]}))
    assert tuned(model)
    (model / "tune.json").write_text("{")
    assert not tuned(model)


def test_each_instance_is_an_engine_of_its_own_an_openvino_stream_or_a_share_of_the_threads():
    keys = {"batching.max_batch_size": int, "batching.max_queue_delay_ms": float, "batching.instances": int,
            "engine.threads": int}
    fixed = {"batching.max_batch_size": [8], "batching.max_queue_delay_ms": [0.0]}
    onnxruntime = Model(Path("m"), (1,), keys, (), None, True, None, False, Batching(), 2)
    openvino = Model(Path("m"), (1,), {**keys, "engine.streams": int}, (), None, True, None, False, Batching(), 2)
    assert [(c["batching.instances"], c["engine.threads"]) for c in candidates(onnxruntime, fixed)] == [(1, 2), (2, 1)]
    # one OpenVINO stream runs the calls of several threads one at a time: a stream per instance, all cores shared
    ov = candidates(openvino, fixed)
    assert [(c["batching.instances"], c["engine.streams"]) for c in ov] == [(1, 1), (2, 2)]
    assert all("engine.threads" not in c for c in ov)
