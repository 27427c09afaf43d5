"""`compilers serve --grpc-port`: the Open Inference Protocol over gRPC (Triton's GRPCInferenceService) from the
same ModelService as HTTP. Real servers on free loopback ports, queried with the real tritonclient.grpc and
tritonclient.http clients (and the raw gRPC stub for typed contents): the same answers, errors (with gRPC's codes
for HTTP's statuses), metadata and metrics over both; size limits (the server's, and each model's as HTTP applies
it); cancelled RPCs leave no queued work; RPCs at once bounded (--grpc-max-rpcs); a clean stop.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from compilers import cli
from compilers.serve.limits import Limits, request_bytes
from compilers.serve.repository import publish
from compilers.serve.server import running

from test_pipeline_text import SENTENCES, compile_pipeline, encoder

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlp):
    """mlp (max_batch_size 4), slow (the MLP, waiting 3 s for a batch to fill) and enc (a text pipeline)."""
    root = tmp_path_factory.mktemp("grpc")
    mlp.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mlp")
    (root / "repo" / "mlp" / "serving.toml").write_text("[batching]\nmax_batch_size = 4\n")
    publish(root / "artifact", root / "repo" / "slow")
    (root / "repo" / "slow" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 3000\n")
    compile_pipeline(encoder()).save(root / "repo" / "enc" / "1")
    (root / "repo" / "enc" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 5\n")
    return root / "repo"


@pytest.fixture(scope="module")
def server(repo):
    with running(repo, grpc_port=0, limits=Limits(max_body_bytes=MAX_BODY)) as s:
        yield s


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(f"{server.host}:{server.grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_both(clients, model: str, name: str, x: np.ndarray, datatype: str, output: str, **kw):
    """The same request over gRPC and HTTP (binary): both answers."""
    answers = []
    for module, c in zip((tg, th), clients):
        t = module.InferInput(name, list(x.shape), datatype)
        t.set_data_from_numpy(x)
        answers.append(c.infer(model, [t], outputs=[module.InferRequestedOutput(output)], **kw))
    return answers


def errors_of(clients, model: str, name: str, x: np.ndarray, datatype: str, output: str = "output"):
    """The errors the same bad request gets over gRPC and HTTP."""
    got = []
    for module, c in zip((tg, th), clients):
        t = module.InferInput(name, list(x.shape), datatype)
        t.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, [t], outputs=[module.InferRequestedOutput(output)])
        got.append(e.value)
    return got


def requests_total(server, model: str) -> float:
    text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("compilers_inference_requests_total{") and f'model="{model}"' in line)


def test_grpc_and_http_answer_the_same_raw_and_typed(server, clients, stub, mlp):
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    before = requests_total(server, "mlp")
    g, h = infer_both(clients, "mlp", "input", x, "FP32", "output")
    np.testing.assert_array_equal(g.as_numpy("output"), h.as_numpy("output"))
    assert g.as_numpy("output").dtype == np.float32
    np.testing.assert_allclose(g.as_numpy("output"), mlp(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
    response = g.get_response()
    assert response.model_name == "mlp" and response.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("output", "FP32", [3, 3])]
    # typed contents (fp32_contents), answered raw all the same
    request = pb.ModelInferRequest(model_name="mlp", id="typed", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[3, 6], contents=pb.InferTensorContents(fp32_contents=x.ravel()))])
    typed = stub.ModelInfer(request, timeout=30)
    assert typed.id == "typed" and len(typed.raw_output_contents) == 1
    np.testing.assert_array_equal(np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(3, 3),
                                  h.as_numpy("output"))
    # the same metrics: every request counted, whichever transport
    assert requests_total(server, "mlp") == before + 3


def test_a_bytes_pipeline_answers_the_same_over_both(clients, stub):
    texts = np.array([s.encode() for s in SENTENCES[:3]], dtype=object)
    g, h = infer_both(clients, "enc", "text", texts, "BYTES", "embedding")
    assert g.as_numpy("embedding").shape == (3, 32)
    np.testing.assert_allclose(g.as_numpy("embedding"), h.as_numpy("embedding"), rtol=1e-6, atol=1e-7)
    request = pb.ModelInferRequest(model_name="enc", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[3], contents=pb.InferTensorContents(bytes_contents=list(texts)))])
    typed = stub.ModelInfer(request, timeout=30)
    np.testing.assert_allclose(np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(3, 32),
                               h.as_numpy("embedding"), rtol=1e-6, atol=1e-7)


def test_errors_have_http_messages_and_grpc_codes(server, clients, stub):
    x = np.zeros((2, 6), np.float32)
    cases = [(("nope", "input", x, "FP32"), grpc.StatusCode.NOT_FOUND, "404", "no model 'nope'"),
             (("mlp", "input", x.astype(np.float64), "FP64"), grpc.StatusCode.INVALID_ARGUMENT, "400",
              "datatype FP64, expected FP32"),
             (("mlp", "input", np.zeros((5, 6), np.float32), "FP32"), grpc.StatusCode.INVALID_ARGUMENT, "400",
              "max_batch_size"),
             (("mlp", "input", x, "FP32", "logits"), grpc.StatusCode.INVALID_ARGUMENT, "400", "unknown output")]
    for args, code, status, words in cases:
        g, h = errors_of(clients, *args)
        assert g.status() == str(code) and h.status() == status, (args[0], g, h)
        assert words in g.message() and g.message() == h.message(), (g.message(), h.message())
        assert str(server.service.repository.path) not in g.message()
    # malformed requests: raw contents that do not fill the shape, typed contents in another type's field
    bad = [pb.ModelInferRequest(model_name="mlp", raw_input_contents=[b"\0" * 8], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 6])]),
        pb.ModelInferRequest(model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 6], contents=pb.InferTensorContents(int_contents=[1] * 6))])]
    for request, words in zip(bad, ("raw_input_contents[0] hold 8 bytes", "comes in fp32_contents")):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), e.value.details()


def test_health_metadata_and_repository(server, clients, stub):
    g, h = clients
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("mlp") and g.is_model_ready("mlp", "1")
    assert not g.is_model_ready("mlp", "7")
    meta, http_meta = g.get_model_metadata("enc"), h.get_model_metadata("enc")
    assert (meta.name, list(meta.versions), meta.platform) == \
        (http_meta["name"], http_meta["versions"], http_meta["platform"])
    assert [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs] == \
        http_meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [(t["name"], t["shape"]) for t in http_meta["outputs"]]
    assert g.get_server_metadata().name == "compilers"
    with pytest.raises(InferenceServerException) as e:
        g.get_model_metadata("nope")
    assert e.value.status() == str(grpc.StatusCode.NOT_FOUND)
    # the repository extension, through the one service: what gRPC unloads, HTTP sees unloaded
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="slow"), timeout=30)
    assert not h.is_model_ready("slow")
    index = {(m.name, m.state) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models}
    assert ("slow", "UNAVAILABLE") in index and ("mlp", "READY") in index
    g.load_model("slow")
    assert h.is_model_ready("slow") and g.is_server_ready()


def test_a_message_over_the_size_limit_is_refused(server, clients):
    g, _ = clients
    x = np.zeros((MAX_BODY // 24 + 100, 6), np.float32)
    t = tg.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        g.infer("mlp", [t])
    assert e.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert g.is_server_live()


def test_a_request_over_its_models_limit_is_refused_as_http_refuses_it(server, clients):
    """A message within the server's limit but larger than any valid request for its model: refused before its
    tensors are decoded, with the message HTTP gives for that body (its byte count aside)."""
    limit = request_bytes(server.service.version("mlp").signature, 4)
    x = np.zeros((limit // 24 + 100, 6), np.float32)           # raw FP32: 24 bytes a row, under MAX_BODY
    assert x.nbytes < MAX_BODY
    g, h = errors_of(clients, "mlp", "input", x, "FP32")
    assert g.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and h.status() == "400"
    words = f"more than {limit}, the most a request for model 'mlp' can take"
    assert words in g.message(), g.message()
    assert re.sub(r"is \d+ bytes", "", g.message()) == re.sub(r"is \d+ bytes", "", h.message())


def test_a_request_past_its_deadline_leaves_the_queue(server, clients):
    g, _ = clients
    x = np.zeros((1, 6), np.float32)
    t = tg.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        g.infer("slow", [t], client_timeout=0.3)     # the batch waits 3 s to fill
    assert e.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
    batcher = server.service.version("slow").infer.__self__
    deadline = time.monotonic() + 2
    while batcher.queued and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batcher.queued == 0, "the cancelled request is still queued"
    assert g.infer("mlp", [tg.InferInput("input", [1, 6], "FP32").set_data_from_numpy(x)]).as_numpy("output").shape \
        == (1, 3)


def test_the_server_stops_cleanly(repo):
    with running(repo, grpc_port=0) as s:
        port = s.grpc_port
        c = tg.InferenceServerClient(f"{s.host}:{port}")
        assert c.is_server_ready()
    with pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=2)
    c.close()
    with running(repo) as s:            # off unless asked for
        assert s.grpc_port is None
        assert json.load(urllib.request.urlopen(f"{s.url}/v2"))["name"] == "compilers"


def test_grpc_max_rpcs_bounds_the_rpcs_at_once(tmp_path, mlp):
    mlp.save(tmp_path / "artifact")
    publish(tmp_path / "artifact", tmp_path / "repo" / "slow")
    (tmp_path / "repo" / "slow" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\n"
                                                             "max_queue_delay_ms = 3000\n")
    with running(tmp_path / "repo", grpc_port=0, limits=Limits(grpc_max_rpcs=1)) as s:
        c = tg.InferenceServerClient(f"{s.host}:{s.grpc_port}")
        t = tg.InferInput("input", [1, 6], "FP32").set_data_from_numpy(np.zeros((1, 6), np.float32))
        answered = []
        c.async_infer("slow", [t], lambda result, error: answered.append(error), client_timeout=1.5)
        batcher = s.service.version("slow").infer.__self__
        deadline = time.monotonic() + 5
        while not batcher.queued and time.monotonic() < deadline:      # the one RPC allowed is running
            time.sleep(0.01)
        with pytest.raises(InferenceServerException) as e:
            c.is_server_live()
        assert e.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
        while not answered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered and c.is_server_live()            # the first ended (its deadline): room for the next
        c.close()


def test_grpc_flags_are_checked(tmp_path, capsys):
    for flags, words in ((["--grpc-port", "0", "--grpc-max-rpcs", "0"], "--grpc-max-rpcs: must be at least 1"),
                         (["--grpc-max-rpcs", "8"], "--grpc-max-rpcs bounds the gRPC server, which runs only with "
                                                    "--grpc-port"),
                         (["--drain-timeout", "0"], "--drain-timeout: must be positive")):
        assert cli.main(["serve", str(tmp_path), *flags]) == 2
        assert words in capsys.readouterr().err
