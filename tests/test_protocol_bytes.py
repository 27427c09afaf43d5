"""The Open Inference Protocol's BYTES datatype (issue 20: text and images in, answers out), through the real
client's codec: tritonclient builds the request bodies (JSON strings, or Triton's 4-byte-length-prefixed binary
serialization) and reads the responses. BYTES inputs decode to object arrays of the same bytes either way, BYTES
outputs come back as exactly the strings sent, malformed BYTES data are InputErrors that say what to fix, and a
BytesSpec shows in metadata and is checked by flat_inputs like any served tensor."""
from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch

from compilers.errors import InputError
from compilers.pipeline.base import BytesSpec
from compilers.serve import protocol
from compilers.serve.protocol import (InferRequest, check_outputs, datatype, decode_request, encode_response,
                                      flat_inputs, tensor_metadata)
from compilers.signature import TensorSpec

httpclient = pytest.importorskip("tritonclient.http")

WORDS = ["naïve café 東京", "", "plain ascii", "emoji 🙂 and tabs\t\n", "[brackets] {and} \"quotes\" \\"]


def client_body(*inputs, outputs=None, request_id="") -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient sends for these InferInputs."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(list(inputs), outputs=outputs,
                                                                            request_id=request_id)
    return body, None if json_size is None else str(json_size)


def bytes_input(name: str, values, binary: bool):
    array = np.array(values, dtype=object)
    inp = httpclient.InferInput(name, list(array.shape), "BYTES")
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def refusal(body: bytes, header_length: str | None = None) -> str:
    with pytest.raises(InputError) as e:
        decode_request(body, header_length)
    return str(e.value)


def binary_body(name: str, shape: list[int], blob: bytes, size: int | None = None) -> tuple[bytes, str]:
    head = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob) if size is None else size}}]}).encode()
    return head + blob, str(len(head))


def serialized(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def client_result(content: bytes, headers: dict[str, str]):
    length = headers.get("inference-header-content-length")
    return httpclient.InferResult.from_response_body(content, verbose=False,
                                                     header_length=None if length is None else int(length))


# -- decoding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_inputs_decode_to_their_utf8_bytes(binary):
    body, length = client_body(bytes_input("text", WORDS, binary),
                               bytes_input("grid", [["a", "bb"], ["", "東"]], binary))
    req = decode_request(body, length)
    text, grid = req.inputs["text"], req.inputs["grid"]
    assert text.dtype == object and text.shape == (len(WORDS),)
    assert text.tolist() == [w.encode("utf-8") for w in WORDS]
    assert all(type(x) is bytes for x in text.ravel())
    assert grid.dtype == object and grid.shape == (2, 2)
    assert grid.tolist() == [[b"a", b"bb"], [b"", "東".encode()]]


def test_json_and_binary_bytes_decode_the_same():
    got = [decode_request(*client_body(bytes_input("text", WORDS, binary))).inputs["text"] for binary in (False, True)]
    assert got[0].tolist() == got[1].tolist() and got[0].shape == got[1].shape


@pytest.mark.parametrize("binary", [(False, False), (True, True), (True, False), (False, True)],
                         ids=["json", "binary", "bytes-binary", "ints-binary"])
def test_a_mixed_request_of_bytes_and_int64(binary):
    bytes_binary, ints_binary = binary
    ids = np.array([[3, -4, 2 ** 40]], np.int64)
    i2 = httpclient.InferInput("ids", list(ids.shape), "INT64")
    i2.set_data_from_numpy(ids, binary_data=ints_binary)
    outs = [httpclient.InferRequestedOutput("answer", binary_data=False)]
    body, length = client_body(bytes_input("text", WORDS[:3], bytes_binary), i2, outputs=outs, request_id="mix")
    req = decode_request(body, length)
    assert list(req.inputs) == ["text", "ids"] and req.id == "mix" and req.outputs == ("answer",)
    assert req.inputs["text"].tolist() == [w.encode() for w in WORDS[:3]]
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    assert req.inputs["ids"].dtype == np.int64


def test_empty_scalar_and_nested_bytes_tensors():
    # no elements: tritonclient sends binary_data_size 0 (binary) or an empty list (JSON)
    for binary in (False, True):
        req = decode_request(*client_body(bytes_input("e", np.empty((0, 2), dtype=object), binary)))
        assert req.inputs["e"].shape == (0, 2) and req.inputs["e"].dtype == object
    # one element, shape []
    body = json.dumps({"inputs": [{"name": "s", "shape": [], "datatype": "BYTES", "data": ["one"]}]}).encode()
    got = decode_request(body, None).inputs["s"]
    assert got.shape == () and got.dtype == object and got.item() == b"one"
    # nested JSON data, row-major, as the protocol allows
    body = json.dumps({"inputs": [{"name": "n", "shape": [2, 3], "datatype": "BYTES",
                                   "data": [["a", "b", "c"], ["d", "é", ""]]}]}).encode()
    assert decode_request(body, None).inputs["n"].tolist() == [[b"a", b"b", b"c"], [b"d", "é".encode(), b""]]


def test_texts_full_of_brackets_are_not_taken_for_nested_lists():
    """The guard against JSON of many tiny lists counts brackets; those inside strings (code, JSON as text) are
    text, not lists, so a large request of such texts decodes, while the lists themselves are still counted."""
    texts = ['[[{"a": [1, [2]]}]] \\ "q" [[[' * 40] * 200               # ~100 KB of JSON, a third of it brackets
    body, length = client_body(bytes_input("text", texts, False))
    assert body.count(b"[") + body.count(b"{") > len(body) // protocol.LIST_BYTES > 4096
    assert decode_request(body, length).inputs["text"].tolist() == [t.encode() for t in texts]
    singles = (b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"BYTES","data":["x",' + b'["x"],' * 100_000
               + b'["x"]]}]}')
    assert "send each input's data as one flat list" in refusal(singles)


def test_brackets_outside_strings_are_counted_as_a_json_parser_reads_them():
    rng = random.Random(0)
    alphabet = ['[', ']', '{', '}', '"', '\\', 'a', ',', ':', 'é', '\\"', '\\\\']

    def containers(x) -> int:
        if isinstance(x, list):
            return 1 + sum(map(containers, x))
        if isinstance(x, dict):
            return 1 + sum(map(containers, x.values()))
        return 0

    for _ in range(300):
        def value(depth: int):
            pick = rng.random()
            if depth > 3 or pick < 0.4:
                return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
            if pick < 0.7:
                return [value(depth + 1) for _ in range(rng.randrange(4))]
            return {value(9): value(depth + 1) for _ in range(rng.randrange(3))}
        doc = value(0)
        for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False)):
            assert protocol._containers(text.encode()) == containers(doc), text


# -- malformed BYTES --------------------------------------------------------------------------------------------
def test_a_length_prefix_running_past_the_data_is_refused():
    blob = serialized(b"abc", b"defg")
    broken = blob[:7] + struct.pack("<I", 100) + blob[11:]                      # element 1 says 100 bytes
    msg = refusal(*binary_body("t", [2], broken))
    assert msg == ("input 't': BYTES element 1 has length 100, but only 4 of the input's 15 bytes of binary data "
                   "remain (each element is a 4-byte little-endian length, then its bytes)")
    # a prefix beyond 32 bits' worth of body
    msg = refusal(*binary_body("t", [1], struct.pack("<I", 2 ** 32 - 1) + b"xyz"))
    assert "BYTES element 0 has length 4294967295, but only 3 of the input's 7 bytes" in msg


def test_fewer_or_more_elements_than_the_shape_are_refused():
    blob = serialized(b"abcd", b"efgh")                                         # two elements, 16 bytes
    msg = refusal(*binary_body("t", [3], blob))
    assert msg == ("input 't': its 16 bytes of binary data hold 2 BYTES elements, but shape [3] takes 3 (each a "
                   "4-byte little-endian length, then its bytes)")
    msg = refusal(*binary_body("t", [1], blob))
    assert msg == ("input 't': shape [1] takes 1 BYTES elements, which fill 8 of the input's 16 bytes of binary "
                   "data (binary_data_size); the other 8 bytes are no element")
    # too few bytes for the shape's length prefixes alone: refused before a byte is read
    msg = refusal(*binary_body("t", [3], serialized(b"", b"")))
    assert msg == ("input 't': binary_data_size is 8, but shape [3] of BYTES takes at least 12 bytes (a 4-byte "
                   "length before each element)")
    assert "binary_data_size is '8', not a byte count" in refusal(*binary_body("t", [2], serialized(b"", b""), "8"))
    assert "runs past the end of the body" in refusal(*binary_body("t", [2], serialized(b"", b"")[:6], 8))
    # JSON: the element count must match the shape
    body = json.dumps({"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}]}).encode()
    assert refusal(body) == "input 't': shape [3] holds 3 elements, data has 2"
    # a client's real body with its shape changed
    inp = bytes_input("t", ["alpha", "beta"], True)
    inp.set_shape([3])
    body, length = client_body(inp)
    assert "hold 2 BYTES elements, but shape [3] takes 3" in refusal(body, length)


def test_json_bytes_data_must_be_strings():
    def one(data, shape=None) -> str:
        return refusal(json.dumps({"inputs": [{"name": "t", "shape": [len(data)] if shape is None else shape,
                                               "datatype": "BYTES", "data": data}]}).encode())
    assert one([1, 2]) == "input 't': BYTES data must be strings; got integers"
    assert one(["a", 2.5]) == "input 't': BYTES data must be strings; got numbers with fractions"
    assert one(["a", True]) == "input 't': BYTES data must be strings; got true/false"
    assert one(["a", None]) == "input 't': BYTES data must be strings; got nulls or objects"
    assert one(["a", {"b": "c"}]) == "input 't': BYTES data must be strings; got nulls or objects"
    assert one([["a"], [1]], [2, 1]) == "input 't': BYTES data must be strings; got integers"
    assert "not a regular nested list" in one([["a"], ["b", "c"]], [3])                 # ragged
    assert "not a regular nested list" in one([["a", "b"], "c"], [3])
    # a lone surrogate (Python's json writes one) is no UTF-8 text
    assert "not Unicode text" in one(["\ud800"])


def test_costly_bytes_shapes_are_refused_before_they_cost():
    big = json.dumps({"inputs": [{"name": "t", "shape": [100, 100], "datatype": "BYTES",
                                  "parameters": {"binary_data_size": 16}}]}).encode()
    assert "more than the request" in refusal(big + b"\0" * 16, str(len(big)))
    fits = json.dumps({"inputs": [{"name": "t", "shape": [50], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    assert "takes at least 200 bytes" in refusal(fits + b"\0" * 200, str(len(fits)))
    unknown = json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "STRING", "data": ["a"]}]}).encode()
    assert "datatype 'STRING' is not served here" in refusal(unknown) and "FP64, BYTES" in refusal(unknown)


# -- encoding -------------------------------------------------------------------------------------------------
ANSWER = BytesSpec("answer", ("batch",))
SCORE = TensorSpec("score", torch.float32, ("batch",))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("form", ["bytes", "str", "numpy-str", "numpy-bytes"])
def test_bytes_outputs_come_back_to_the_client_exactly(binary, form):
    words = WORDS if form != "numpy-bytes" else [w for w in WORDS if w]      # numpy's bytes drop trailing NULs
    values = {"bytes": lambda: np.array([w.encode() for w in words] + [b""], dtype=object)[:len(words)],
              "str": lambda: np.array(words, dtype=object),
              "numpy-str": lambda: np.array(words),
              "numpy-bytes": lambda: np.array([w.encode() for w in words])}[form]()
    score = np.arange(len(words), dtype=np.float32) / 3
    content, headers = encode_response("m", 1, InferRequest("r", {}, None, {}, binary),
                                       {"answer": values, "score": score}, (ANSWER, SCORE))
    result = client_result(content, headers)
    got = result.as_numpy("answer")
    assert got.shape == (len(words),) and result.get_output("answer")["datatype"] == "BYTES"
    if binary:               # the client deserializes bytes
        assert got.tolist() == [w.encode() for w in words]
    else:                    # the client keeps JSON's strings
        assert got.tolist() == words
    np.testing.assert_array_equal(result.as_numpy("score"), score)


def test_bytes_outputs_of_any_shape_and_mixed_binary_and_json():
    grid = np.array([["a", "東京"], ["", "z"]], dtype=object)
    specs = (BytesSpec("grid", (2, 2)), BytesSpec("none", ("batch", 3)), SCORE)
    outputs = {"grid": grid, "none": np.empty((0, 3), dtype=object), "score": np.ones(2, np.float32)}
    req = InferRequest(None, {}, ("none", "grid", "score"), {"grid": False}, True)
    content, headers = encode_response("m", 1, req, outputs, specs)
    result = client_result(content, headers)
    assert result.as_numpy("grid").tolist() == [["a", "東京"], ["", "z"]]           # JSON: strings
    assert result.as_numpy("none").shape == (0, 3)
    assert result.get_output("none")["parameters"] == {"binary_data_size": 0}
    head = json.loads(content[:int(headers["inference-header-content-length"])])
    assert [(o["name"], o["datatype"], o["shape"]) for o in head["outputs"]] == \
        [("none", "BYTES", [0, 3]), ("grid", "BYTES", [2, 2]), ("score", "FP32", [2])]


def test_bytes_outputs_on_the_wire():
    values = np.array([b"ab", b"", "é"], dtype=object)
    content, headers = encode_response("m", 1, InferRequest(None, {}, None, {}, True), {"answer": values}, (ANSWER,))
    length = int(headers["inference-header-content-length"])
    assert content[length:] == serialized(b"ab", b"", "é".encode())
    assert json.loads(content[:length])["outputs"][0]["parameters"] == {"binary_data_size": 4 + 2 + 4 + 4 + 2}
    content, headers = encode_response("m", 1, InferRequest(None, {}, None, {}, False), {"answer": values}, (ANSWER,))
    assert headers == {"content-type": "application/json"}
    assert json.loads(content)["outputs"][0]["data"] == ["ab", "", "é"]


def test_bytes_that_are_not_utf8_are_exact_in_binary_and_replaced_in_json():
    raw = b"\xff\xfe png \x00 bytes \x89PNG"
    values = np.array([raw, b"ok"], dtype=object)
    binary, headers = encode_response("m", 1, InferRequest(None, {}, None, {}, True), {"answer": values}, (ANSWER,))
    assert client_result(binary, headers).as_numpy("answer").tolist() == [raw, b"ok"]
    text, headers = encode_response("m", 1, InferRequest(None, {}, None, {}, False), {"answer": values}, (ANSWER,))
    assert client_result(text, headers).as_numpy("answer").tolist() == [raw.decode("utf-8", "replace"), "ok"]


def test_an_object_array_is_sent_as_bytes_whatever_the_spec_and_only_strings_are():
    spec = TensorSpec("answer", torch.float32, ("batch",))            # a model whose signature says otherwise
    content, _ = encode_response("m", 1, InferRequest(None, {}, None, {}, False),
                                 {"answer": np.array(["x"], dtype=object)}, (spec,))
    assert json.loads(content)["outputs"][0]["datatype"] == "BYTES"
    with pytest.raises(TypeError, match="output 'answer' is sent as BYTES, but holds a int, not bytes or str"):
        encode_response("m", 1, InferRequest(None, {}, None, {}, False),
                        {"answer": np.array([b"x", 3], dtype=object)}, (ANSWER,))


# -- specs: metadata and checks ---------------------------------------------------------------------------------
def test_bytes_spec_metadata():
    assert datatype(BytesSpec("text", ("batch",))) == "BYTES"
    assert tensor_metadata(BytesSpec("text", ("batch",))) == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert tensor_metadata(BytesSpec("pair", ("batch", 2))) == {"name": "pair", "datatype": "BYTES", "shape": [-1, 2]}
    assert tensor_metadata(SCORE) == {"name": "score", "datatype": "FP32", "shape": [-1]}      # as before


def test_flat_inputs_checks_bytes_in_the_protocols_words():
    specs = (BytesSpec("text", ("batch",)), TensorSpec("x", torch.float32, ("batch", 2)))
    req = decode_request(*client_body(bytes_input("text", ["a", "b"], True), _fp32("x", np.ones((2, 2), np.float32))))
    got = flat_inputs(req.inputs, specs)
    assert got[0] is req.inputs["text"] and got[1] is req.inputs["x"]
    text, x = req.inputs["text"], req.inputs["x"]
    cases = {"input 'text': datatype FP32, expected BYTES": {"text": np.ones(2, np.float32), "x": x},
             "input 'x': datatype BYTES, expected FP32": {"text": text, "x": np.array([[b"1", b"2"]], dtype=object)},
             "input 'text': shape [1, 2], expected [-1]": {"text": text.reshape(1, 2), "x": x}}
    for want, inputs in cases.items():
        with pytest.raises(InputError) as e:
            flat_inputs(inputs, specs)
        assert str(e.value) == want
    check_outputs(("text",), specs)
    with pytest.raises(InputError, match=r"^unknown output 'nope'; the model returns 'text', 'x'$"):
        check_outputs(("nope",), specs)


def _fp32(name: str, array: np.ndarray):
    inp = httpclient.InferInput(name, list(array.shape), "FP32")
    inp.set_data_from_numpy(array, binary_data=True)
    return inp
