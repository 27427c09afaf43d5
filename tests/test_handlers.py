"""Custom handlers (issue 20): a model's own Python code beside its versions, run only by a server started with
--handlers and only when the file's sha256 is the one its serving.toml pins; preprocess and postprocess around
the batcher, their failures 400 (InputError) or 500."""
from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from compilers.serve.repository import Repository, publish
from compilers.serve.server import running
from compilers.serve.service import ModelService

HANDLER = '''
import numpy as np
from compilers.errors import InputError

INPUTS = [{"name": "csv", "datatype": "BYTES", "shape": [-1]}]
OUTPUTS = [{"name": "best", "datatype": "INT64", "shape": [-1]}, {"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
seen = {}

def initialize(context):
    seen["model"], seen["version"], seen["inputs"] = context.model, context.version, context.inputs
    (context.model_dir / "initialized").write_text(str(context.version))

def preprocess(inputs, context):
    rows = []
    for line in inputs["csv"]:
        values = line.decode().split(",")
        if len(values) != 6:
            raise InputError(f"a row needs 6 numbers, got {len(values)}")
        if values[0] == "boom":
            raise RuntimeError("the handler broke")
        rows.append([float(v) for v in values])
    return {"input": np.array(rows, dtype=np.float32)}

def postprocess(outputs, context):
    return {"best": outputs["output"].argmax(-1).astype(np.int64), "output": outputs["output"]}
'''


def make_repo(tmp_path, mlp, code: str = HANDLER, digest: str | None = None):
    repo = tmp_path / "repo"
    mlp.save(tmp_path / "art")
    publish(tmp_path / "art", repo / "mlp")
    (repo / "mlp" / "handler.py").write_text(code)
    digest = digest or hashlib.sha256(code.encode()).hexdigest()
    (repo / "mlp" / "serving.toml").write_text(f'[handler]\nfile = "handler.py"\nsha256 = "{digest}"\n'
                                               "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 5\n")
    return repo


def index(server) -> list[dict]:
    return json.load(urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/repository/index", b"{}")))


def test_a_handler_runs_only_when_the_server_allows_it_and_its_digest_matches(tmp_path, mlp):
    repo = make_repo(tmp_path, mlp)
    with running(repo) as server:                               # no --handlers: the model does not load
        assert "runs only when started with --handlers" in index(server)[0]["reason"]
    assert not (repo / "mlp" / "initialized").exists()
    repo = make_repo(tmp_path / "b", mlp, digest="0" * 64)      # another digest: the code is not run
    with running(ModelService(Repository(repo), handlers=True)) as server:
        reason = index(server)[0]["reason"]
    assert "not the " + "0" * 64 in reason and "it was not run" in reason
    assert not (repo / "mlp" / "initialized").exists()


def test_a_handler_preprocesses_and_postprocesses_around_the_batcher(tmp_path, mlp):
    repo = make_repo(tmp_path, mlp)
    rows = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    want = mlp(rows)
    with running(ModelService(Repository(repo), handlers=True)) as server:
        assert (repo / "mlp" / "initialized").read_text() == "1"
        meta = json.load(urllib.request.urlopen(f"{server.url}/v2/models/mlp"))
        assert meta["inputs"] == [{"name": "csv", "datatype": "BYTES", "shape": [-1]}]
        assert [o["name"] for o in meta["outputs"]] == ["best", "output"]
        c = triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
        t = triton.InferInput("csv", [5], "BYTES")
        t.set_data_from_numpy(np.array([",".join(map(repr, map(float, r))) for r in rows], dtype=object))
        answer = c.infer("mlp", [t])
        np.testing.assert_allclose(answer.as_numpy("output"), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(answer.as_numpy("best"), want.argmax(-1))
        # what a handler takes is its own: a body far beyond the tensor model's largest request is read
        long = ",".join(["1." + "0" * 20_000] * 6)
        t = triton.InferInput("csv", [5], "BYTES")
        t.set_data_from_numpy(np.array([long] * 5, dtype=object))
        np.testing.assert_allclose(c.infer("mlp", [t]).as_numpy("output"), mlp(np.ones((5, 6), np.float32)),
                                   rtol=1e-5, atol=1e-6)
        t = triton.InferInput("csv", [1], "BYTES")
        t.set_data_from_numpy(np.array(["1,2,3"], dtype=object))
        with pytest.raises(InferenceServerException, match="a row needs 6 numbers, got 3") as e:
            c.infer("mlp", [t])
        assert e.value.status() == "400"
        t.set_data_from_numpy(np.array(["boom,2,3,4,5,6"], dtype=object))
        with pytest.raises(InferenceServerException) as e:
            c.infer("mlp", [t])
        assert e.value.status() == "500" and "HandlerError" in e.value.message()
        metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    assert 'compilers_preprocess_seconds_count{model="mlp",version="1"}' in metrics


def test_a_handler_that_answers_something_else_is_a_500(tmp_path, mlp):
    code = HANDLER.replace('return {"best": outputs["output"].argmax(-1).astype(np.int64), "output": outputs["output"]}',
                           'return {"output": outputs["output"]}')
    repo = make_repo(tmp_path, mlp, code)
    with running(ModelService(Repository(repo), handlers=True)) as server:
        body = json.dumps({"inputs": [{"name": "csv", "datatype": "BYTES", "shape": [1], "data": ["1,2,3,4,5,6"]}]})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/models/mlp/infer", body.encode()))
    assert e.value.code == 500
