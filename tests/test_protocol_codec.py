"""The Open Inference Protocol codec's JSON and datatypes (issue 19): orjson reads and writes ordinary requests
and responses, Python's json what orjson cannot (NaN / Infinity literals, non-finite outputs, lone surrogates),
integers beyond 64 bits are refused as out of range, floats are written so that a client reading doubles gets
each value back exactly, BF16 travels as Triton sends it (bit patterns / JSON numbers), and a client's datatype
and shape mistakes are told in the protocol's words. Then a real server serving BF16 and FP16 tensors."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import compilers
from compilers.errors import InputError
from compilers.serve import protocol
from compilers.serve.protocol import InferRequest, decode_request, encode_response, flat_inputs
from compilers.serve.repository import publish
from compilers.serve.server import running
from compilers.signature import TensorSpec

httpclient = pytest.importorskip("tritonclient.http")

BF16 = np.dtype(ml_dtypes.bfloat16)


def body_of(*inputs: dict, **request) -> bytes:
    return json.dumps({"inputs": list(inputs), **request}).encode()


def tensor(name: str, kind: str, data: list, shape: list[int] | None = None) -> dict:
    return {"name": name, "shape": [len(data)] if shape is None else shape, "datatype": kind, "data": data}


def refusal(body: bytes, header_length: str | None = None) -> str:
    with pytest.raises(InputError) as e:
        decode_request(body, header_length)
    return str(e.value)


def json_outputs(content: bytes) -> dict[str, list]:
    return {o["name"]: o["data"] for o in json.loads(content)["outputs"]}


# -- JSON: orjson for ordinary requests, Python's json for what orjson refuses ----------------------------------
def test_ordinary_requests_and_responses_do_not_use_pythons_json(monkeypatch):
    assert protocol.orjson is not None, "orjson (the serve extra) is not installed"

    def slow(*args, **kwargs):
        raise AssertionError("Python's json was used for an ordinary request or response")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    body = body_of(tensor("x", "FP32", x.ravel().tolist(), [2, 3]), id="r")
    with monkeypatch.context() as m:
        m.setattr(json, "loads", slow)
        m.setattr(json, "dumps", slow)
        req = decode_request(body, None)
        content, _ = encode_response("m", 1, req, {"y": x}, (TensorSpec("y", torch.float32, ("batch", 3)),))
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert json.loads(content)["outputs"][0]["data"] == x.ravel().tolist()


def test_nan_and_infinity_literals_are_read_as_before():
    """orjson refuses them; Python's json and tritonclient's rapidjson write them, so they are read, and the
    model's own NaN/Inf check names the input as it does for binary data."""
    body = body_of(tensor("x", "FP32", [1.5, float("nan"), float("inf"), float("-inf")]),
                   tensor("b", "BF16", [float("nan"), 2.0]))
    assert b"NaN" in body and b"-Infinity" in body
    req = decode_request(body, None)
    x = req.inputs["x"]
    assert x.dtype == np.float32 and x[0] == 1.5 and np.isnan(x[1]) and x[2] == np.inf and x[3] == -np.inf
    b = req.inputs["b"]
    assert b.dtype == BF16 and np.isnan(b[0]) and b[1] == 2.0


def test_parse_errors_keep_their_words():
    assert "nested too deeply" in refusal(b"[" * 2000 + b"]" * 2000)        # deeper than orjson's 1024
    assert "not valid JSON" in refusal(b'{"inputs": [}')
    assert "not valid JSON" in refusal(b"\xff")
    assert "not valid JSON" in refusal(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": ['
                                       + b"9" * 5000 + b"]}]}")
    # UTF-16 JSON, which Python's json reads and orjson does not
    req = decode_request(json.dumps({"inputs": [tensor("x", "INT32", [1, 2])]}).encode("utf-16"), None)
    np.testing.assert_array_equal(req.inputs["x"], [1, 2])


def test_integers_beyond_64_bits_are_refused_as_out_of_range():
    for kind, data in (("INT64", [2 ** 64, 1]), ("INT64", [-(2 ** 63) - 1, 1]), ("UINT64", [2 ** 64]),
                       ("INT64", [10 ** 30]), ("INT32", [2 ** 70]), ("UINT8", [-(2 ** 65)])):
        info = np.iinfo(protocol.DATATYPES[kind])
        want = f"input 'x': data lie outside {kind}'s range [{info.min}, {info.max}]"
        assert refusal(body_of(tensor("x", kind, data))) == want, (kind, data)
        # the same when Python's json parses the request (it also holds a NaN)
        assert refusal(body_of(tensor("f", "FP32", [float("nan")]), tensor("x", kind, data))) == want, (kind, data)
    # the edges of 64 bits are taken
    edges = body_of(tensor("u", "UINT64", [2 ** 64 - 1, 0]), tensor("i", "INT64", [-(2 ** 63), 2 ** 63 - 1]))
    req = decode_request(edges, None)
    assert req.inputs["u"].tolist() == [2 ** 64 - 1, 0] and req.inputs["i"].tolist() == [-(2 ** 63), 2 ** 63 - 1]
    assert "INT64 data must be integers; got numbers with fractions" in refusal(body_of(tensor("x", "INT64", [1.5, 2])))
    assert "INT64" in refusal(body_of(tensor("x", "INT64", [1e19])))          # a float, whole but too large
    # a float tensor takes any JSON number, written with or without a fraction
    req = decode_request(body_of(tensor("x", "FP64", [2 ** 64, 10 ** 30])), None)
    assert req.inputs["x"].tolist() == [float(2 ** 64), 1e30]
    huge = body_of(tensor("f", "FP32", [float("nan")]), tensor("x", "FP64", [10 ** 400]))   # Python's json parses it
    assert "outside FP64's range" in refusal(huge)


def test_flat_and_nested_float_data_convert_exactly_and_strictly():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(1000) * 10.0 ** rng.integers(-40, 40, 1000)
    for kind, dtype in (("FP16", np.float16), ("BF16", BF16), ("FP32", np.float32), ("FP64", np.float64)):
        with np.errstate(over="ignore"):
            want = values.astype(dtype)
        finite = values[np.isfinite(want)].tolist()
        for nested in (False, True):
            data = np.array(finite[:len(finite) // 2 * 2]).reshape(-1, 2).tolist() if nested else finite
            got = decode_request(body_of(tensor("x", kind, data, list(np.shape(data)))), None).inputs["x"]
            assert got.dtype == dtype, kind
            np.testing.assert_array_equal(got.astype(np.float64).ravel(),
                                          np.array(data, np.float64).astype(dtype).astype(np.float64).ravel())
        if kind != "FP64":
            assert f"outside {kind}'s range" in refusal(body_of(tensor("x", kind, [1e300, 1.0])))
    for data, what in (([1.0, True], "true/false"), ([1.0, "2"], "strings"), ([1.0, None], "nulls or objects"),
                       ([[1.0], [True]], "true/false"), ([1.0, {"a": 1}], "nulls or objects")):
        assert f"BF16 data must be numbers; got {what}" in refusal(body_of(tensor("x", "BF16", data, [2]))), data


# -- JSON outputs: exact values, NaN / Infinity as Python's json writes them ------------------------------------
def every_finite(dtype: np.dtype) -> np.ndarray:
    """Every finite value of a 2-byte float type."""
    values = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    with np.errstate(invalid="ignore"):                      # signalling NaNs
        return values[np.isfinite(values)]


@pytest.mark.parametrize("kind", ["FP16", "BF16", "FP32", "FP64"])
def test_float_outputs_come_back_exactly_to_a_client_that_reads_doubles(kind):
    dtype = protocol.DATATYPES[kind]
    rng = np.random.default_rng(4)
    if dtype.itemsize == 2:
        values = every_finite(dtype)
    else:
        unsigned = np.uint64 if dtype.itemsize == 8 else np.uint32
        bits = rng.integers(0, 1 << (8 * dtype.itemsize), 200_000, dtype=unsigned)
        values = bits.view(dtype)
        values = values[np.isfinite(values)]
        values = np.concatenate([values, np.array([7.038531e-26, 1e-45, 3.4028235e38, 0.1, -0.0], dtype)])
    spec = TensorSpec("y", {"FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32,
                            "FP64": torch.float64}[kind], (len(values),))
    content, _ = encode_response("m", 1, InferRequest(None, {}, None, {}, False), {"y": values}, (spec,))
    got = np.array(json.loads(content)["outputs"][0]["data"], dtype=np.float64).astype(dtype)   # as tritonclient
    np.testing.assert_array_equal(got.view(f"u{dtype.itemsize}"), values.view(f"u{dtype.itemsize}"))


def test_nonfinite_outputs_are_written_as_pythons_json_writes_them():
    specs = (TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.bfloat16, (2,)),
             TensorSpec("c", torch.float32, (2,)), TensorSpec("d", torch.int64, (1,)))
    outputs = {"a": np.array([1.5, np.nan, np.inf, -np.inf], np.float32), "b": np.array([np.inf, 1], BF16),
               "c": np.array([0.25, -2.0], np.float32), "d": np.array([2 ** 62], np.int64)}
    content, _ = encode_response("m", 1, InferRequest(None, {}, None, {}, False), outputs, specs)
    assert b"[1.5,NaN,Infinity,-Infinity]" in content and b"[Infinity,1.0]" in content and b"null" not in content
    data = json_outputs(content)
    assert data["c"] == [0.25, -2.0] and data["d"] == [2 ** 62]
    result = httpclient.InferenceServerClient.parse_response_body(content)
    np.testing.assert_array_equal(result.as_numpy("a"), outputs["a"])
    np.testing.assert_array_equal(result.as_numpy("b").astype(np.float32), outputs["b"].astype(np.float32))


def test_large_outputs_are_written_in_pieces_exactly(monkeypatch):
    """An output of several pieces (the event loop can take the GIL between them), one piece holding NaN: the
    same text as one json.dumps of the whole, each piece written by one call."""
    n = 3 * protocol.PIECE + 5
    values = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    values[protocol.PIECE + 7] = np.nan
    ints = np.arange(n, dtype=np.int64) - n // 2
    specs = (TensorSpec("f", torch.float32, (n,)), TensorSpec("i", torch.int64, (n,)))
    calls = []
    dumps = protocol.orjson.dumps
    monkeypatch.setattr(protocol.orjson, "dumps", lambda *a, **k: calls.append(1) or dumps(*a, **k))
    content, _ = encode_response("m", 1, InferRequest(None, {}, None, {}, False), {"f": values, "i": ints}, specs)
    head = json.loads(content)
    assert json.dumps(head["outputs"][0]["data"]) == json.dumps(values.astype(np.float64).tolist())
    assert head["outputs"][1]["data"] == ints.tolist()
    assert len(calls) == 1 + 3 + 4                   # the head; f's finite pieces (one by Python's json); i's


def test_an_id_orjson_cannot_write_is_written_by_pythons_json():
    body = b'{"id": "\\ud800", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}'
    req = decode_request(body, None)
    assert req.id == "\ud800"
    content, _ = encode_response("m", 1, req, {"y": np.ones(2, np.float32)}, (TensorSpec("y", torch.float32, (2,)),))
    assert json.loads(content)["id"] == "\ud800" and json_outputs(content)["y"] == [1.0, 1.0]


# -- BF16 as Triton sends it -----------------------------------------------------------------------------------
def test_bf16_inputs_decode_from_bit_patterns_and_from_json_numbers():
    values = np.array([[1.0, -2.5, 3.140625], [0.0, -0.0, 65280.0]], BF16)
    raw = values.view(np.uint16).astype("<u2").tobytes()
    head = json.dumps({"inputs": [{"name": "b", "shape": [2, 3], "datatype": "BF16",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    got = decode_request(head + raw, str(len(head))).inputs["b"]
    assert got.dtype == BF16 and got.shape == (2, 3) and got.flags.writeable
    np.testing.assert_array_equal(got.view(np.uint16), values.view(np.uint16))
    # JSON numbers round to the nearest bfloat16
    got = decode_request(body_of(tensor("b", "BF16", [1.0, 1.00390625, 1.01171875, 3.1415926])), None).inputs["b"]
    assert got.tolist() == [1.0, 1.0, 1.015625, 3.140625]
    assert "outside BF16's range" in refusal(body_of(tensor("b", "BF16", [1e39])))
    wrong = head.replace(b"[2, 3]", b"[3, 3]")
    assert "binary_data_size is 12, but shape [3, 3] of BF16 takes 18 bytes" in refusal(wrong + raw, str(len(wrong)))
    # what tritonclient sends
    inp = httpclient.InferInput("b", [2, 3], "BF16")
    inp.set_data_from_numpy(values, binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
    got = decode_request(body, str(json_size)).inputs["b"]
    np.testing.assert_array_equal(got.view(np.uint16), values.view(np.uint16))


def test_bf16_outputs_encode_as_bit_patterns_and_json_numbers():
    values = np.array([[0.5, -1.5], [2.0 ** -130, 3.0e38]], BF16)
    spec = TensorSpec("y", torch.bfloat16, ("batch", 2))
    for binary in (True, False):
        content, headers = encode_response("m", 1, InferRequest(None, {}, None, {}, binary), {"y": values}, (spec,))
        length = headers.get("inference-header-content-length")
        if binary:
            assert content[int(length):] == values.view(np.uint16).astype("<u2").tobytes()
        else:
            assert json_outputs(content)["y"] == values.astype(np.float64).ravel().tolist()
        result = httpclient.InferenceServerClient.parse_response_body(
            content, header_length=None if length is None else int(length))
        got = result.as_numpy("y")
        assert got.dtype == BF16 and got.shape == (2, 2)
        np.testing.assert_array_equal(got.view(np.uint16), values.view(np.uint16))


# -- a client's mistakes in the protocol's words ---------------------------------------------------------------
def test_flat_inputs_checks_datatype_and_shape_as_the_metadata_shows_them():
    specs = (TensorSpec("input", torch.float32, ("batch", 6)), TensorSpec("b", torch.bfloat16, ("batch", 3)))
    x, b = np.zeros((3, 6), np.float32), np.zeros((3, 3), BF16)
    got = flat_inputs({"b": b, "input": x}, specs)
    assert got[0] is x and got[1] is b

    def mistake(**change) -> str:
        with pytest.raises(InputError) as e:
            flat_inputs({"input": x, "b": b, **change}, specs)
        return str(e.value)
    assert mistake(input=x.astype(np.int32)) == "input 'input': datatype INT32, expected FP32"
    assert mistake(input=x.astype(BF16)) == "input 'input': datatype BF16, expected FP32"
    assert mistake(b=b.astype(np.float32)) == "input 'b': datatype FP32, expected BF16"
    assert mistake(input=x[:, :5]) == "input 'input': shape [3, 5], expected [-1, 6]"
    assert mistake(input=x[0]) == "input 'input': shape [6], expected [-1, 6]"
    assert mistake(input=x[None]) == "input 'input': shape [1, 3, 6], expected [-1, 6]"
    assert mistake(bogus=x) == "unknown input 'bogus'; the model takes 'input', 'b'"


# -- a server serving BF16 and FP16 ----------------------------------------------------------------------------
class Mixed(nn.Module):
    """FP32 and BF16 in; BF16 and FP16 out."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x, b):
        y = self.linear(x) + b.float()
        return y.to(torch.bfloat16), y.to(torch.float16)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The compiled Mixed model and a server serving it as model "mixed"."""
    torch.manual_seed(0)
    cm = compilers.compile(Mixed().eval(), "torchscript-cpu", (torch.randn(4, 6), torch.randn(4, 3).to(torch.bfloat16)))
    root = tmp_path_factory.mktemp("bf16")
    cm.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mixed")
    with running(root / "repo") as server:
        yield cm, server


def post(server, body: bytes, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(f"http://{server.host}:{server.port}/v2/models/mixed/infer", body,
                                     headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {}


def test_a_client_sending_bf16_for_fp32_is_told_so(mixed):
    _, server = mixed
    body = body_of(tensor("x", "BF16", [0.0] * 12, [2, 6]), tensor("b", "BF16", [0.0] * 6, [2, 3]))
    status, content, _ = post(server, body)
    assert status == 400 and json.loads(content)["error"] == "input 'x': datatype BF16, expected FP32"
    body = body_of(tensor("x", "FP32", [0.0] * 12, [2, 6]), tensor("b", "FP32", [0.0] * 6, [2, 3]))
    status, content, _ = post(server, body)
    assert status == 400 and json.loads(content)["error"] == "input 'b': datatype FP32, expected BF16"


def test_bf16_and_fp16_tensors_are_served_over_binary_and_json(mixed):
    cm, server = mixed
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    b = rng.standard_normal((3, 3)).astype(BF16)
    out_bf16, out_fp16 = cm(torch.from_numpy(x), torch.from_numpy(b.astype(np.float32)).to(torch.bfloat16))
    want_bf16, want_fp16 = out_bf16.detach().float().numpy(), out_fp16.detach().numpy()
    c = httpclient.InferenceServerClient(f"{server.host}:{server.port}")
    try:
        meta = c.get_model_metadata("mixed")
        assert [t["datatype"] for t in meta["inputs"]] == ["FP32", "BF16"]
        assert [t["datatype"] for t in meta["outputs"]] == ["BF16", "FP16"]
        for binary in (True, False):
            ix, ib = httpclient.InferInput("x", [3, 6], "FP32"), httpclient.InferInput("b", [3, 3], "BF16")
            ix.set_data_from_numpy(x, binary_data=binary)
            ib.set_data_from_numpy(b, binary_data=True)       # tritonclient sends BF16 as binary only
            outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("output.0", "output.1")]
            result = c.infer("mixed", [ix, ib], outputs=outs)
            got_bf16, got_fp16 = result.as_numpy("output.0"), result.as_numpy("output.1")
            assert got_bf16.dtype == BF16 and got_fp16.dtype == np.float16, binary
            np.testing.assert_array_equal(got_bf16.astype(np.float32), want_bf16)
            np.testing.assert_array_equal(got_fp16, want_fp16)
    finally:
        c.close()
    # BF16 input data as JSON numbers, outputs as JSON numbers
    body = body_of(tensor("x", "FP32", x.ravel().tolist(), [3, 6]),
                   tensor("b", "BF16", b.astype(np.float64).ravel().tolist(), [3, 3]))
    status, content, _ = post(server, body)
    assert status == 200, content[:300]
    data = json_outputs(content)
    np.testing.assert_array_equal(np.array(data["output.0"], np.float32).reshape(3, 3), want_bf16)
    np.testing.assert_array_equal(np.array(data["output.1"], np.float16).reshape(3, 3), want_fp16)
