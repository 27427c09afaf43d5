"""The Open Inference Protocol (KServe v2): the wire codec on its own (JSON tensors, the binary tensor data
extension, every malformed request an InputError naming the problem), then the HTTP server on a real compiled
model: input mistakes come back as 400 in the protocol's words (datatype, shape), unknown models / versions 404,
size limits (also after gzip) hold, metadata, health and metrics answer, and the server keeps serving."""
from __future__ import annotations

import gzip
import http.client
import json
import re
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import compilers
from compilers.errors import InputError
from compilers.serve.protocol import (InferRequest, check_outputs, datatype, decode_request, encode_response,
                                      flat_inputs, tensor_metadata)
from compilers.serve.repository import publish
from compilers.serve.limits import Limits
from compilers.serve.server import running
from compilers.signature import TensorSpec

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

INFER = "/v2/models/mlp/infer"


# -- helpers -----------------------------------------------------------------------------------------------
def body_of(*inputs: dict, **request) -> bytes:
    return json.dumps({"inputs": list(inputs), **request}).encode()


def json_input(name: str, array: np.ndarray, kind: str, nested: bool = False) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": kind,
            "data": array.tolist() if nested else array.ravel().tolist()}


def binary_request(inputs: list[tuple[str, np.ndarray, str]], json_inputs: tuple[dict, ...] = (),
                   **request) -> tuple[bytes, str]:
    """A binary-extension body (JSON head + raw little-endian tensors) and its header length."""
    entries = [{"name": n, "shape": list(a.shape), "datatype": k,
                "parameters": {"binary_data_size": a.nbytes}} for n, a, k in inputs]
    head = json.dumps({"inputs": [*entries, *json_inputs], **request}).encode()
    tail = b"".join(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for _, a, _ in inputs)
    return head + tail, str(len(head))


def parse_response(body: bytes, headers: dict[str, str]) -> tuple[dict, dict[str, np.ndarray]]:
    """The response's JSON head and its outputs as arrays, decoding JSON data and the binary tail ourselves."""
    length = headers.get("inference-header-content-length")
    head_len = int(length) if length is not None else len(body)
    head = json.loads(body[:head_len])
    offset, arrays = head_len, {}
    for out in head["outputs"]:
        dtype = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "?",
                 "UINT8": "u1"}[out["datatype"]]
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.array(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            arrays[out["name"]] = np.frombuffer(body[offset:offset + size], dtype=dtype).reshape(out["shape"])
            offset += size
    assert offset == len(body), f"{len(body) - offset} bytes after the outputs"
    return head, arrays


def bad(body: bytes, header_length: str | None = None) -> str:
    with pytest.raises(InputError) as e:
        decode_request(body, header_length)
    return str(e.value)


def python_error(call) -> str:
    """The InputError message a Python caller gets."""
    with pytest.raises(InputError) as e:
        call()
    return str(e.value)


# -- the codec: JSON tensors --------------------------------------------------------------------------------
def test_json_tensors_decode_flat_and_nested_data_exactly():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    ids = np.array([[1, -2, 3]], dtype=np.int64)
    mask = np.array([True, False, True])
    req = decode_request(body_of(json_input("x", x, "FP32"), json_input("ids", ids, "INT64", nested=True),
                                 json_input("mask", mask, "BOOL")), None)
    assert list(req.inputs) == ["x", "ids", "mask"]
    for name, want in (("x", x), ("ids", ids), ("mask", mask)):
        got = req.inputs[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    assert req.id is None and req.outputs is None and req.binary == {} and req.binary_default is False


def test_every_served_datatype_decodes_to_its_numpy_dtype():
    for kind, dtype in (("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
                        ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32),
                        ("INT64", np.int64), ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)):
        a = np.array([[0, 1], [1, 0]], dtype=dtype)
        got = decode_request(body_of(json_input("a", a, kind)), None).inputs["a"]
        assert got.dtype == np.dtype(dtype), kind
        np.testing.assert_array_equal(got, a)
        # and the same through the binary extension
        body, length = binary_request([("a", a, kind)])
        got = decode_request(body, length).inputs["a"]
        assert got.dtype == np.dtype(dtype), kind
        np.testing.assert_array_equal(got, a)


def test_scalar_and_empty_tensors():
    req = decode_request(body_of({"name": "s", "shape": [], "datatype": "INT32", "data": [7]},
                                 {"name": "e", "shape": [0, 3], "datatype": "FP32", "data": []}), None)
    assert req.inputs["s"].shape == () and req.inputs["s"] == 7
    assert req.inputs["e"].shape == (0, 3) and req.inputs["e"].dtype == np.float32


def test_request_id_and_requested_outputs():
    x = np.ones((1, 2), np.float32)
    req = decode_request(body_of(json_input("x", x, "FP32"), id="req-42",
                                 outputs=[{"name": "b", "parameters": {"binary_data": True}},
                                          {"name": "a", "parameters": {"binary_data": False}},
                                          {"name": "c"}],
                                 parameters={"binary_data_output": True}), None)
    assert req.id == "req-42"
    assert req.outputs == ("b", "a", "c")
    assert dict(req.binary) == {"b": True, "a": False}
    assert req.binary_default is True
    assert decode_request(body_of(json_input("x", x, "FP32"), id=17), None).id == "17"


# -- the codec: binary tensor data --------------------------------------------------------------------------
def test_binary_inputs_several_and_mixed_with_json():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.integers(-1000, 1000, (4,)).astype(np.int64)
    c = rng.standard_normal((5,)).astype(np.float16)
    j = np.array([[1.5, -2.25]], np.float64)
    body, length = binary_request([("a", a, "FP32"), ("b", b, "INT64"), ("c", c, "FP16")],
                                  json_inputs=(json_input("j", j, "FP64"),), id="mix")
    req = decode_request(body, length)
    assert req.id == "mix" and list(req.inputs) == ["a", "b", "c", "j"]
    for name, want in (("a", a), ("b", b), ("c", c), ("j", j)):
        got = req.inputs[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable and got.dtype.isnative, name


def test_binary_inputs_interleaved_with_json_take_bytes_in_input_order():
    a, b = np.arange(3, dtype=np.int32), np.arange(10, 14, dtype=np.int32)
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [3], "datatype": "INT32", "parameters": {"binary_data_size": 12}},
        {"name": "j", "shape": [2], "datatype": "INT32", "data": [8, 9]},
        {"name": "b", "shape": [4], "datatype": "INT32", "parameters": {"binary_data_size": 16}}]}).encode()
    req = decode_request(head + a.astype("<i4").tobytes() + b.astype("<i4").tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs["a"], a)
    np.testing.assert_array_equal(req.inputs["j"], [8, 9])
    np.testing.assert_array_equal(req.inputs["b"], b)


def test_a_tritonclient_request_body_decodes():
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    ids = np.array([[4, 5]], np.int64)
    i1, i2 = httpclient.InferInput("x", list(x.shape), "FP32"), httpclient.InferInput("ids", [1, 2], "INT64")
    i1.set_data_from_numpy(x, binary_data=True)
    i2.set_data_from_numpy(ids, binary_data=False)
    outs = [httpclient.InferRequestedOutput("y", binary_data=True),
            httpclient.InferRequestedOutput("z", binary_data=False)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([i1, i2], outputs=outs,
                                                                            request_id="tc-1")
    req = decode_request(body, None if json_size is None else str(json_size))
    np.testing.assert_array_equal(req.inputs["x"], x)
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    assert req.id == "tc-1" and req.outputs == ("y", "z") and dict(req.binary) == {"y": True, "z": False}


# -- the codec: responses ----------------------------------------------------------------------------------
SPECS = (TensorSpec("logits", torch.float32, ("batch", 3)), TensorSpec("ids", torch.int64, ("batch",)),
         TensorSpec("flags", torch.bool, (2,)), TensorSpec("half", torch.float16, ("batch", 2)))


def outputs_for_specs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {"logits": rng.standard_normal((2, 3)).astype(np.float32),
            "ids": np.array([2 ** 40 + 3, -7], np.int64),
            "flags": np.array([True, False]),
            "half": rng.standard_normal((2, 2)).astype(np.float16)}


def request(outputs=None, binary=None, binary_default=False, id=None) -> InferRequest:
    return InferRequest(id, {}, outputs, binary or {}, binary_default)


def check_round_trip(content: bytes, headers: dict[str, str], outputs: dict[str, np.ndarray]):
    head, arrays = parse_response(content, headers)
    for name, got in arrays.items():
        want = outputs[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    return head


def test_encode_json_response_round_trips():
    outputs = outputs_for_specs()
    content, headers = encode_response("m", 3, request(id="r1"), outputs, SPECS)
    assert headers == {"content-type": "application/json"}
    head = check_round_trip(content, headers, outputs)
    assert head["model_name"] == "m" and head["model_version"] == "3" and head["id"] == "r1"
    assert [o["name"] for o in head["outputs"]] == ["logits", "ids", "flags", "half"]   # signature order
    assert [o["datatype"] for o in head["outputs"]] == ["FP32", "INT64", "BOOL", "FP16"]
    assert all("parameters" not in o for o in head["outputs"])


def test_encode_binary_response_round_trips():
    outputs = outputs_for_specs()
    content, headers = encode_response("m", 1, request(binary_default=True), outputs, SPECS)
    assert headers["content-type"] == "application/octet-stream"
    head = check_round_trip(content, headers, outputs)
    assert "id" not in head
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [24, 16, 2, 8]
    assert int(headers["inference-header-content-length"]) + sum(sizes) == len(content)


def test_encode_requested_outputs_in_order_mixing_binary_and_json():
    outputs = outputs_for_specs()
    req = request(outputs=("half", "logits", "ids"), binary={"logits": True, "half": False}, binary_default=True)
    content, headers = encode_response("m", 1, req, outputs, SPECS)
    head = check_round_trip(content, headers, outputs)
    assert [o["name"] for o in head["outputs"]] == ["half", "logits", "ids"]
    assert ["data" in o for o in head["outputs"]] == [True, False, False]     # ids: binary_data_output
    # the same response read by the real client
    result = httpclient.InferenceServerClient.parse_response_body(
        content, header_length=int(headers["inference-header-content-length"]))
    for name in ("half", "logits", "ids"):
        np.testing.assert_array_equal(result.as_numpy(name), outputs[name])


def test_datatype_and_tensor_metadata():
    assert [datatype(s) for s in SPECS] == ["FP32", "INT64", "BOOL", "FP16"]
    assert datatype(TensorSpec("b", torch.bfloat16, (2,))) == "BF16"
    assert tensor_metadata(SPECS[0]) == {"name": "logits", "datatype": "FP32", "shape": [-1, 3]}
    assert tensor_metadata(SPECS[2]) == {"name": "flags", "datatype": "BOOL", "shape": [2]}


# -- the codec: malformed requests ------------------------------------------------------------------------
X = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}


def test_not_json_and_not_an_object():
    assert "not valid JSON" in bad(b"{inputs: oops")
    assert "not valid JSON" in bad(b"\xff\xfe\x00")
    assert "not valid JSON" in bad(b"")
    assert "must be a JSON object" in bad(b"[1, 2]")
    assert "must be a JSON object" in bad(b'"inputs"')


def test_no_inputs():
    for body in (b"{}", b'{"inputs": []}', b'{"inputs": {"name": "x"}}', b'{"inputs": null}'):
        assert '"inputs"' in bad(body) and "non-empty list" in bad(body), body


def test_malformed_tensors():
    def one(**change) -> str:
        return bad(body_of({k: v for k, v in {**X, **change}.items() if v is not ...}))

    assert 'inputs[0] needs a "name"' in one(name=...)
    assert 'inputs[0] needs a "name"' in one(name=5)
    assert "inputs[0] must be a JSON object" in bad(body_of(5))
    for shape in ([2, -1], "2", [2.0], [True], None):
        assert "shape must be a list of at most 32 non-negative integers" in one(shape=shape if shape is not None else ...), shape
    msg = one(datatype="STRING", data=["a", "b"])
    assert "datatype 'STRING' is not served" in msg and "FP32" in msg and "BYTES" in msg
    assert "datatype 'float32' is not served" in one(datatype="float32")
    assert "datatype None is not served" in one(datatype=...)
    assert "shape [3] holds 3 elements, data has 2" in one(shape=[3])
    assert "shape [2, 2] holds 4 elements, data has 2" in one(shape=[2, 2])
    assert "FP32 data must be numbers; got strings" in one(data=["a", "b"])
    assert "not a regular nested list" in one(data=[[1.0], [2.0, 3.0]])          # ragged
    assert "outside UINT8's range [0, 255]" in one(datatype="UINT8", data=[300, 1])
    # numpy would convert each of these silently; the protocol's types are strict
    assert "FP32 data must be numbers; got strings" in one(data=["1.5", 2])
    assert "FP32 data must be numbers; got nulls or objects" in one(data=[None, 2])
    assert "FP32 data must be numbers; got true/false" in one(data=[True, 2])
    assert "INT32 data must be integers; got numbers with fractions" in one(datatype="INT32", data=[1.7, 2])
    assert "BOOL data must be true/false; got integers" in one(datatype="BOOL", data=[5, 1])
    assert "outside FP32's range (they would become infinite)" in one(data=[1e300, 1])
    assert "outside INT8's range" in one(datatype="INT8", data=[-129, 1])
    assert "requested twice" in bad(json.dumps({"inputs": [X], "outputs": [{"name": "y"}, {"name": "y"}]}).encode())
    assert 'has no "data" and no binary_data_size' in one(data=...)
    assert "parameters must be a JSON object" in one(parameters=[1])
    assert "given twice" in bad(body_of(X, X))


def test_malformed_request_fields():
    assert "parameters must be a JSON object" in bad(body_of(X, parameters=[]))
    assert '"outputs" must be a list' in bad(body_of(X, outputs={"name": "y"}))
    assert "outputs[0] must be a JSON object" in bad(body_of(X, outputs=["y"]))
    assert 'outputs[1] needs a "name"' in bad(body_of(X, outputs=[{"name": "y"}, {}]))
    assert "outputs[0].parameters must be a JSON object" in bad(body_of(X, outputs=[{"name": "y", "parameters": 1}]))


def test_malformed_binary_data():
    a = np.arange(4, dtype=np.float32)
    body, length = binary_request([("a", a, "FP32")])
    head = body[:int(length)]

    def with_size(size, tail=a.tobytes(), **extra):
        h = json.dumps({"inputs": [{"name": "a", "shape": [4], "datatype": "FP32",
                                    "parameters": {"binary_data_size": size}, **extra}]}).encode()
        return h + tail, str(len(h))

    msg = bad(*with_size(12))
    assert "binary_data_size is 12" in msg and "takes 16 bytes" in msg
    assert "binary_data_size is '16'" in bad(*with_size("16"))
    assert "runs past the end of the body" in bad(*with_size(16, tail=a.tobytes()[:10]))
    assert "runs past the end of the body" in bad(head, length)                    # no binary at all
    assert "3 bytes of binary data beyond" in bad(body + b"abc", length)           # trailing bytes
    assert "both JSON data and binary_data_size" in bad(*with_size(16, data=[1, 2, 3, 4]))
    # a second binary input whose bytes are missing
    two, two_len = binary_request([("a", a, "FP32"), ("b", a, "FP32")])
    assert "input 'b'" in bad(two[:-1], two_len) and "past the end" in bad(two[:-1], two_len)
    # binary bytes with no header: the whole body is parsed as JSON
    assert "not valid JSON" in bad(body, None)


def test_bad_header_length():
    body, length = binary_request([("a", np.zeros(2, np.float32), "FP32")])
    assert "'abc', not a byte count" in bad(body, "abc")
    assert "'', not a byte count" in bad(body, "")
    for wrong in ("0", "-3", str(len(body) + 1)):
        msg = bad(body, wrong)
        assert f"Inference-Header-Content-Length is {int(wrong)}" in msg and f"holds {len(body)} bytes" in msg
    assert "not valid JSON" in bad(body, str(int(length) - 1))    # cuts the JSON short
    assert "not valid JSON" in bad(body, str(int(length) + 1))    # takes a binary byte into the JSON


def test_check_outputs():
    check_outputs(None, SPECS)
    check_outputs(("ids", "logits"), SPECS)
    req = decode_request(body_of(X, outputs=[{"name": "logits"}, {"name": "nope"}]), None)
    with pytest.raises(InputError, match=r"^unknown output 'nope'; the model returns 'logits', 'ids', 'flags', 'half'$"):
        check_outputs(req.outputs, SPECS)


def test_flat_inputs_orders_and_names():
    specs = (TensorSpec("input_ids", torch.int64, ("batch", "seq")),
             TensorSpec("attention_mask", torch.int64, ("batch", "seq")))
    ids, mask = np.ones((1, 3), np.int64), np.zeros((1, 3), np.int64)
    got = flat_inputs({"attention_mask": mask, "input_ids": ids}, specs)
    assert got[0] is ids and got[1] is mask
    with pytest.raises(InputError, match=r"^unknown input 'mask'; the model takes 'input_ids', 'attention_mask'$"):
        flat_inputs({"input_ids": ids, "mask": mask}, specs)
    with pytest.raises(InputError, match=r"^missing input\(s\) 'attention_mask'; expected 'input_ids', 'attention_mask'$"):
        flat_inputs({"input_ids": ids}, specs)


# -- the server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(mlp, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    mlp.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mlp")
    return root / "repo"


@pytest.fixture(scope="module")
def server(repo):
    with running(repo) as s:
        yield s


@pytest.fixture(scope="module")
def small(repo):
    """A server that takes bodies of 1000 bytes at most."""
    with running(repo, limits=Limits(max_body_bytes=1000)) as s:
        yield s


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(f"{server.host}:{server.port}")
    yield c
    c.close()


def call(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                         headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(srv, path: str, body: bytes, headers: dict | None = None, status: int = 400, **kw) -> str:
    got, _, content = call(srv, "POST", path, body, headers, **kw)
    assert got == status, (got, content[:300])
    return json.loads(content)["error"]


def infer_json(srv, x: np.ndarray, path: str = INFER, **request) -> dict[str, np.ndarray]:
    status, headers, content = call(srv, "POST", path, body_of(json_input("input", x, "FP32"), **request))
    assert status == 200, content[:300]
    return parse_response(content, headers)


def sample(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def assert_serves(srv, mlp):
    x = sample(3, seed=9)
    head, arrays = infer_json(srv, x)
    np.testing.assert_allclose(arrays["output"], mlp(x), rtol=1e-6, atol=1e-6)


def test_json_infer_matches_the_compiled_model(server, mlp):
    x = sample()
    head, arrays = infer_json(server, x, id="abc-1")
    assert head["model_name"] == "mlp" and head["model_version"] == "1" and head["id"] == "abc-1"
    assert head["outputs"][0]["datatype"] == "FP32" and head["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_allclose(arrays["output"], mlp(x), rtol=1e-6, atol=1e-6)
    _, by_version = infer_json(server, x, path="/v2/models/mlp/versions/1/infer")
    np.testing.assert_array_equal(by_version["output"], arrays["output"])


def test_binary_infer_over_http(server, mlp):
    x = sample(4, seed=3)
    body, length = binary_request([("input", x, "FP32")], outputs=[{"name": "output",
                                                                    "parameters": {"binary_data": True}}])
    status, headers, content = call(server, "POST", INFER, body, {"Inference-Header-Content-Length": length,
                                                                   "Content-Type": "application/octet-stream"})
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    head, arrays = parse_response(content, headers)
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 4 * 3 * 4
    np.testing.assert_allclose(arrays["output"], mlp(x), rtol=1e-6, atol=1e-6)


def test_tritonclient_infers_binary_and_json(client, mlp):
    x = sample(5, seed=4)
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("mlp", [inp], outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
                              request_id="tc")
        got = result.as_numpy("output")
        assert got.dtype == np.float32 and got.shape == (5, 3)
        np.testing.assert_allclose(got, mlp(x), rtol=1e-6, atol=1e-6)
        assert result.get_response()["id"] == "tc"


@pytest.mark.parametrize("mistake", ["name", "dtype", "shape", "rank"])
def test_input_mistakes_give_400_in_the_protocols_words(server, client, mlp, mistake):
    """A client is told what its request got wrong in the words of the model's metadata (datatype FP32, shape
    [-1, 6]), never a Python caller's (float32, "declare it in dynamic_shapes": a client cannot recompile)."""
    x = sample()
    name, array, kind = "input", x, "FP32"
    if mistake == "name":
        name = "bogus"
        want = "unknown input 'bogus'; the model takes 'input'"
    elif mistake == "dtype":
        array, kind = x.astype(np.float64), "FP64"
        want = "input 'input': datatype FP64, expected FP32"
    elif mistake == "shape":
        array = x[:, :5].copy()
        want = "input 'input': shape [2, 5], expected [-1, 6]"
    else:
        array = x[0].copy()
        want = "input 'input': shape [6], expected [-1, 6]"
    # a Python caller is still told in Python's words
    if mistake != "name":
        assert python_error(lambda: mlp(array)) != want
    # raw JSON
    assert error_of(server, INFER, body_of(json_input(name, array, kind))) == want
    # raw binary
    body, length = binary_request([(name, array, kind)])
    assert error_of(server, INFER, body, {"Inference-Header-Content-Length": length}) == want
    # the real client
    inp = httpclient.InferInput(name, list(array.shape), kind)
    inp.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp])
    assert e.value.status() == "400" and e.value.message() == want


def test_request_errors_give_400(server):
    x = json_input("input", sample(), "FP32")
    assert "not valid JSON" in error_of(server, INFER, b'{"inputs": [')
    assert "must be a JSON object" in error_of(server, INFER, b"[]")
    assert "non-empty list" in error_of(server, INFER, b'{"inputs": []}')
    assert error_of(server, INFER, body_of({"name": "input", "shape": [1], "datatype": "BYTES", "data": ["hi"]})) == \
        "input 'input': datatype BYTES, expected FP32"
    assert error_of(server, INFER, body_of(x, outputs=[{"name": "nope"}])) == \
        "unknown output 'nope'; the model returns 'output'"
    assert "max_batch_size 8" in error_of(server, INFER, body_of(json_input("input", sample(9), "FP32")))
    assert "Inference-Header-Content-Length is 'x'" in error_of(server, INFER, body_of(x),
                                                                {"Inference-Header-Content-Length": "x"})
    assert "Content-Encoding 'br' is not supported" in error_of(server, INFER, body_of(x), {"Content-Encoding": "br"})
    assert "not valid gzip data" in error_of(server, INFER, b"not gzip at all", {"Content-Encoding": "gzip"})
    packed = gzip.compress(body_of(x))
    for broken in (packed[:-8], packed + b"garbage", packed + packed):      # cut off; trailing bytes; two members
        assert "not one complete gzip stream" in error_of(server, INFER, broken, {"Content-Encoding": "gzip"})


def test_unknown_models_and_versions(server, client):
    x = body_of(json_input("input", sample(), "FP32"))
    assert "no model 'nope'" in error_of(server, "/v2/models/nope/infer", x, status=404)
    assert "no version 7" in error_of(server, "/v2/models/mlp/versions/7/infer", x, status=404)
    for version in ("abc", "0", "-1", "1.0"):
        assert f"version {version!r} is not a version number" in error_of(
            server, f"/v2/models/mlp/versions/{version}/infer", x, status=400), version
    for path in ("/v2/models/nope", "/v2/models/mlp/versions/7", "/v2/models/nope/ready"):
        status, _, content = call(server, "GET", path)
        assert status == 404 and "error" in json.loads(content), path
    status, _, content = call(server, "GET", "/v2/models/mlp/versions/abc")
    assert status == 400
    status, _, content = call(server, "GET", "/v2/models/mlp/versions/7/ready")
    assert status == 503 and json.loads(content) == {"name": "mlp", "ready": False}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404"
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7")


def test_wrong_method_gives_405(server):
    assert call(server, "GET", INFER)[0] == 405
    assert call(server, "GET", "/v2/models/mlp/versions/1/infer")[0] == 405
    assert call(server, "POST", "/v2/health/live", b"{}")[0] == 405


def test_body_over_the_limit_gives_400(small, mlp):
    big = body_of(json_input("input", sample(8), "FP32"))
    assert len(big) > 1000
    msg = error_of(small, INFER, big)
    assert f"the request body is {len(big)} bytes, more than 1000, the most this server takes" in msg
    msg = error_of(small, INFER, big, chunked=True)                # no Content-Length: counted while read
    assert "exceeds 1000 bytes" in msg
    assert_serves(small, mlp)


def test_gzip_and_deflate_requests_work(server, small, mlp):
    x = sample(3, seed=5)
    plain = body_of(json_input("input", x, "FP32"))
    for srv in (server, small):
        for encoding, packed in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain)),
                                 ("GZIP", gzip.compress(plain))):
            status, headers, content = call(srv, "POST", INFER, packed, {"Content-Encoding": encoding})
            assert status == 200, (encoding, content[:300])
            np.testing.assert_allclose(parse_response(content, headers)[1]["output"], mlp(x), rtol=1e-6, atol=1e-6)
    # binary tensor data, compressed: the header counts the inflated JSON
    body, length = binary_request([("input", x, "FP32")])
    status, headers, content = call(server, "POST", INFER, gzip.compress(body),
                                    {"Content-Encoding": "gzip", "Inference-Header-Content-Length": length})
    assert status == 200
    np.testing.assert_allclose(parse_response(content, headers)[1]["output"], mlp(x), rtol=1e-6, atol=1e-6)
    # the real client compressing its request
    client = httpclient.InferenceServerClient(f"{server.host}:{server.port}")
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for algorithm in ("gzip", "deflate"):
            result = client.infer("mlp", [inp], request_compression_algorithm=algorithm)
            np.testing.assert_allclose(result.as_numpy("output"), mlp(x), rtol=1e-6, atol=1e-6)
    finally:
        client.close()


def test_gzip_bombs_are_refused_and_the_server_lives(small, server, mlp):
    bomb = gzip.compress(bytes(50 << 20), compresslevel=9)          # 50 MB of zeros
    assert len(bomb) < 100_000
    assert "more than 1000, the most this server takes" in error_of(small, INFER, bomb, {"Content-Encoding": "gzip"})
    assert "exceeds 1000 bytes" in error_of(small, INFER, bomb, {"Content-Encoding": "gzip"}, chunked=True)
    # a small bomb that fits the limit compressed but inflates past it
    little = gzip.compress(b'{"inputs": [' + b" " * 200_000 + b"]}", compresslevel=9)
    assert len(little) < 1000
    assert "inflates past 1000 bytes" in error_of(small, INFER, little, {"Content-Encoding": "gzip"})
    little = zlib.compress(bytes(300_000), 9)
    assert len(little) < 1000
    assert "inflates past 1000 bytes" in error_of(small, INFER, little, {"Content-Encoding": "deflate"})
    # inflated to exactly the limit is still taken (and is then just bad JSON)
    exact = gzip.compress(b" " * 1000)
    assert "not valid JSON" in error_of(small, INFER, exact, {"Content-Encoding": "gzip"})
    # under the default 64 MB limit, the 50 MB bomb inflates past what any request for the model can take
    assert "the most a request for model 'mlp' can take" in error_of(server, INFER, bomb, {"Content-Encoding": "gzip"})
    assert_serves(small, mlp)
    assert_serves(server, mlp)


def test_model_metadata(server, client):
    status, _, content = call(server, "GET", "/v2/models/mlp")
    assert status == 200
    meta = json.loads(content)
    assert meta["name"] == "mlp" and meta["versions"] == ["1"]
    assert meta["platform"].startswith("compilers_")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["batch_dim"] == "batch" and meta["parameters"]["max_batch_size"] == 8
    status, _, content = call(server, "GET", "/v2/models/mlp/versions/1")
    assert status == 200 and json.loads(content) == meta
    via_client = client.get_model_metadata("mlp")
    assert via_client["inputs"] == meta["inputs"] and via_client["outputs"] == meta["outputs"]


def test_server_metadata_and_health(server, client):
    status, _, content = call(server, "GET", "/v2")
    meta = json.loads(content)
    assert status == 200 and meta["name"] == "compilers" and isinstance(meta["version"], str)
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert client.get_server_metadata()["extensions"] == meta["extensions"]
    status, _, content = call(server, "GET", "/v2/health/live")
    assert status == 200 and json.loads(content) == {"live": True}
    status, _, content = call(server, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(content) == {"ready": True}
    status, _, content = call(server, "GET", "/v2/models/mlp/ready")
    assert status == 200 and json.loads(content) == {"name": "mlp", "ready": True}
    assert client.is_server_live() and client.is_server_ready()


def requests_counted(srv, outcome: str) -> float:
    status, _, content = call(srv, "GET", "/metrics")
    assert status == 200
    total = 0.0
    for line in content.decode().splitlines():
        m = re.match(r"compilers_inference_requests_total\{(.*)\} (\S+)$", line)
        if m and 'model="mlp"' in m[1] and f'outcome="{outcome}"' in m[1]:
            assert 'version="1"' in m[1] or 'version=""' in m[1]     # "": refused before reaching a version
            total += float(m[2])
    return total


def test_metrics_count_invalid_requests(server, mlp):
    invalid, ok = requests_counted(server, "invalid"), requests_counted(server, "ok")
    x = sample()
    for body in (body_of(json_input("bogus", x, "FP32")), body_of(json_input("input", x.astype(np.float64), "FP64")),
                 body_of(json_input("input", x[:, :4].copy(), "FP32")),
                 body_of(json_input("input", x, "FP32"), outputs=[{"name": "nope"}]), b"{"):
        error_of(server, INFER, body)
    assert requests_counted(server, "invalid") == invalid + 5
    assert_serves(server, mlp)
    assert requests_counted(server, "ok") == ok + 1
    assert requests_counted(server, "invalid") == invalid + 5


def test_the_server_still_serves_after_every_error(server, small, mlp, client):
    # runs last in the module: everything above threw errors at these servers
    assert server.service.ready and small.service.ready
    assert_serves(server, mlp)
    assert_serves(small, mlp)
    x = sample(8, seed=11)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("mlp", [inp]).as_numpy("output"), mlp(x), rtol=1e-6, atol=1e-6)


# -- hostile requests: refused cheaply with a 400, no path or traceback in any answer -------------------------
def test_costly_shapes_and_json_are_refused_before_they_cost():
    import time
    started = time.perf_counter()
    huge = {"name": "x", "shape": [2 ** 62] * 60000, "datatype": "FP32", "data": [1, 2, 3, 4]}
    assert "at most 32 non-negative integers" in bad(body_of(huge))               # was a slow 500 before
    assert "at most 32" in bad(body_of({**huge, "shape": [1] * 65 + [4]}))
    assert "none larger than the request could carry" in bad(body_of({**huge, "shape": [2 ** 63, 0], "data": []}))
    assert "more than the request" in bad(body_of({**huge, "shape": [60, 60]}))
    assert time.perf_counter() - started < 2
    singles = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[' + b"[0]," * 100_000 + b"[0]]}]}"
    assert "send each input's data as one flat list" in bad(singles)              # many times the body in Python
    deep = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}]}"
    assert "nested too deeply" in bad(deep) or "flat list" in bad(deep)
    long_int = body_of({"name": "x", "shape": [1], "datatype": "INT64", "data": [0]}).replace(b"[0]", b"[" + b"9" * 5000 + b"]")
    assert "not valid JSON" in bad(long_int)


def test_flags_and_ids_have_their_protocol_types():
    x = json_input("x", np.ones((1, 2), np.float32), "FP32")
    assert "binary_data_output must be true or false" in bad(body_of(x, parameters={"binary_data_output": "false"}))
    assert "binary_data must be true or false" in bad(body_of(x, outputs=[{"name": "a", "parameters": {"binary_data": 0}}]))
    assert '"id" must be a string' in bad(body_of(x, id={"a": [1]}))
    assert decode_request(body_of(x, outputs=[]), None).outputs is None       # [] asks for every output


def test_hostile_urls_and_bodies_get_a_400_without_paths(server, repo):
    path = "/v2/models/mlp/versions/{}/infer"
    good = body_of(json_input("input", np.ones((1, 6), np.float32), "FP32"))
    for version in ("%C2%B2", "9" * 5000):                  # '²'.isdigit() is true; 5000 digits overflow int()
        status, _, answer = call(server, "POST", path.format(version), good)
        assert status == 400 and b"not a version number" in answer, answer[:200]
        status, _, answer = call(server, "GET", f"/v2/models/mlp/versions/{version}")
        assert status == 400
    for body in (b'{"parameters": 5}', b'{"parameters": null}'):
        status, _, answer = call(server, "POST", "/v2/repository/models/mlp/load", body)
        assert status == 400 and b"must be a JSON object" in answer
    status, _, answer = call(server, "POST", "/v2/repository/index", b"[" * 5000 + b"]" * 5000)
    assert status == 400 and b"nested too deeply" in answer
    status, _, answer = call(server, "POST", "/v2/repository/models/../load")
    assert status == 404 and str(repo).encode() not in answer and b"REPO" in answer
