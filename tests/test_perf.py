"""`compilers perf` against a real server on a free loopback port: both concurrency levels measured, bounded in
time and count, with the server's split read from /metrics; a model the server lacks and an unsupported
protocol are refused clearly (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from compilers.cli import main
from compilers.serve.perf import Inputs, parse_shapes, split
from compilers.serve.repository import publish
from compilers.serve.server import running


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlp):
    root = tmp_path_factory.mktemp("perf")
    mlp.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mlp")
    with running(root / "repo") as s:
        yield s


def test_perf_measures_each_level_with_the_server_split(server, tmp_path, capsys):
    out = tmp_path / "perf.json"
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": [0.5] * 12},          # flat: the model's shape at --batch 2
                                         {"input": {"content": [1.0] * 6, "shape": [1, 6]}}]}))
    code = main(["perf", server.url, "--model", "mlp", "--concurrency", "1,4", "--duration", "1", "--warmup", "0.2",
                 "--max-requests", "400", "--batch", "2", "--input-data", str(data), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert [x["concurrency"] for x in result["levels"]] == [1, 4]
    assert result["inputs"]["entries"] == 2
    for level in result["levels"]:
        assert level["errors"] == 0 and level["error_messages"] == []
        assert 0 < level["requests"] <= 400 and level["throughput"] > 0
        assert level["requests"] < level["samples"] < 2 * level["requests"]      # 2 rows, then 1, in turn
        ms = level["latency_ms"]
        assert 0 < ms["p50"] <= ms["p90"] <= ms["p95"] <= ms["p99"]
        server_split = level["server"]
        assert server_split["batch_size"] >= 1 and server_split["engine_calls"] >= 1
        assert server_split["inference_ms"] > 0 and server_split["request_ms"] > 0
        assert server_split["queue_ms"] is not None and server_split["preprocess_ms"] is None   # not a pipeline
        assert level["client_cpu_ms_per_request"] > 0 and level["client_cores"] > 0
        assert level["seconds"] < 1.0 + 30       # the window closes on time (a request's timeout past it at most)
    assert "concurrency" in printed and "server split" in printed and "rows/call" in printed


def test_errors_are_counted_not_retried_and_max_requests_bounds_a_level(server, tmp_path, capsys):
    out, data = tmp_path / "perf.json", tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": [[1.0] * 6]}, {"input": [[1.0] * 5]}]}))   # the 2nd: 5 wide
    code = main(["perf", server.url, "-m", "mlp", "--concurrency", "2", "--duration", "20", "--warmup", "0",
                 "--max-requests", "20", "--input-data", str(data), "--json", str(out)])
    assert code == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert level["requests"] + level["errors"] == 20 and level["seconds"] < 10
    assert level["errors"] >= 8 and len(level["error_messages"]) == 1 and "[400]" in level["error_messages"][0]
    assert "errors, first: [400]" in capsys.readouterr().out


def test_a_level_where_every_request_fails_is_exit_2(server, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": {"content": [1.0] * 5, "shape": [1, 5]}}]}))
    assert main(["perf", server.url, "-m", "mlp", "--concurrency", "1,4", "--duration", "0.3", "--warmup", "0",
                 "--input-data", str(data)]) == 2
    assert "every request failed at concurrency 1" in capsys.readouterr().err


def test_a_model_the_server_lacks_is_exit_2(server, capsys):
    assert main(["perf", server.url, "--model", "nope", "--duration", "0.1", "--concurrency", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not serve model 'nope'" in err and "InputError" in err


def test_grpc_is_refused_for_now(capsys):
    assert main(["perf", "127.0.0.1:1", "--model", "mlp", "--protocol", "grpc"]) == 2
    err = capsys.readouterr().err
    assert "--protocol grpc is not supported yet" in err and "http" in err


def test_an_unreachable_server_is_exit_2(capsys):
    from compilers.serve.server import free_port
    assert main(["perf", f"127.0.0.1:{free_port()}", "--model", "mlp", "--duration", "0.1"]) == 2
    assert "cannot reach a server" in capsys.readouterr().err


def test_synthetic_inputs_follow_the_metadata():
    meta = {"name": "m", "parameters": {"batch_dim": "n"},
            "inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "scale", "datatype": "FP32", "shape": [3]},
                       {"name": "text", "datatype": "BYTES", "shape": [-1]}]}
    inputs = Inputs(meta, batch=4, shapes=parse_shapes(["ids:7"]))
    x = inputs.synthetic()
    assert x["ids"].shape == (4, 7) and x["ids"].dtype == np.int64 and 0 <= x["ids"].min() <= x["ids"].max() < 10
    assert x["scale"].shape == (3,) and x["scale"].dtype == np.float32
    assert x["text"].shape == (4,) and all(isinstance(w, bytes) and w.isascii() for w in x["text"])
    assert inputs.rows(x) == 4
    np.testing.assert_array_equal(Inputs(meta, 4, {"ids": [7]}).synthetic()["ids"], x["ids"])   # a fixed seed
    with pytest.raises(Exception, match="does not fit"):
        Inputs(meta, 1, {"scale": [4]}).shape("scale")


def test_the_split_is_the_mean_of_the_deltas():
    before = {name: (1.0, 10.0) for name in ("compilers_queue_seconds", "compilers_inference_seconds",
                                             "compilers_preprocess_seconds", "compilers_postprocess_seconds",
                                             "compilers_request_seconds", "compilers_batch_size")}
    after = dict(before, compilers_queue_seconds=(1.5, 20.0), compilers_batch_size=(40.0, 20.0))
    got = split(before, after)
    assert got["queue_ms"] == pytest.approx(50.0) and got["batch_size"] == pytest.approx(3.9)
    assert got["inference_ms"] is None and got["engine_calls"] == 10


def test_perf_is_client_side_only():
    code = ("import sys, compilers.serve.perf; print(sorted(m for m in sys.modules if m.split('.')[-1] in "
            "('app', 'service', 'batcher', 'server') and m.startswith('compilers') or m in ('uvicorn', 'starlette')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]"]
