"""The Open Inference Protocol (KServe v2, the API of Triton and OpenVINO Model Server) on the wire.

An infer request is a JSON object of named tensors, each with a shape, a datatype and its elements, either in
the JSON (`"data": [...]`, row-major, flat or nested) or, with the binary tensor data extension, as raw bytes
after the JSON: then the `Inference-Header-Content-Length` header gives the JSON's length and each binary
input says its byte count in `parameters.binary_data_size`, in input order. Outputs come back the same way:
as JSON, or binary when the request asks for it per output (`outputs[i].parameters.binary_data`) or for all
(`parameters.binary_data_output`), as `tritonclient` does by default.

JSON data are read strictly (numbers for FP types, integers in range for INT types, true/false for BOOL).
Non-finite floats in JSON outputs are written NaN / Infinity / -Infinity, as Python's json and tritonclient's
rapidjson read them (strict JSON cannot write them); binary outputs carry them exactly.

Bytes in, numpy out and back: no HTTP framework here. Every malformed request is an InputError whose message
says what to fix (the server answers it with 400), found before the request can cost much: a shape has at most
MAX_RANK dims, none larger than the body could carry; JSON made mostly of brackets (more than one list or object
per LIST_BYTES bytes: nested data of single elements, which Python would hold at many times the body's size) must be
sent flat, as the protocol allows; nesting too deep for the parser and integers too long to convert are refused.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..signature import TensorSpec

HEADER_LENGTH = "inference-header-content-length"
MAX_RANK = 32
LIST_BYTES = 16

# Open Inference Protocol datatype <-> numpy. BYTES (strings) and BF16 (no numpy dtype) are not served.
DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64))}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


@functools.lru_cache(maxsize=1024)
def datatype(spec: TensorSpec) -> str:
    """The protocol's datatype name for a signature tensor."""
    try:
        dtype = spec.numpy_dtype
    except TypeError:            # bfloat16: numpy has none
        return str(spec.dtype).removeprefix("torch.").upper().replace("BFLOAT16", "BF16")
    return _NAMES.get(dtype, str(dtype).upper())


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A tensor's entry in model metadata: dynamic dims are -1."""
    return {"name": spec.name, "datatype": datatype(spec), "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: its id, the input arrays by name, and which outputs to return how."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None          # the requested outputs in order; None: all of them
    binary: Mapping[str, bool]               # per requested output: send it as binary data
    binary_default: bool                     # for outputs not named: parameters.binary_data_output


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """An InferRequest from an infer request's body (and its Inference-Header-Content-Length header, if any)."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InputError(f"header Inference-Header-Content-Length is {header_length!r}, not a byte count") from None
        if not 0 < length <= len(body):
            raise InputError(f"header Inference-Header-Content-Length is {length}, but the body holds {len(body)} "
                             f"bytes; it must be the length of the JSON part")
        head, binary = body[:length], memoryview(body)[length:]
    else:
        head, binary = body, memoryview(b"")
    containers = head.count(b"[") + head.count(b"{")
    if containers > max(4096, len(head) // LIST_BYTES):
        raise InputError(f"the request's JSON holds {containers} lists and objects in {len(head)} bytes: send each "
                         "input's data as one flat list in row-major order (the protocol allows it), not nested "
                         "lists of single elements")
    request = parse_json(head, 'send an Open Inference Protocol infer request object: {"inputs": [{"name", '
                               '"shape", "datatype", "data"}]}')
    if not isinstance(request, dict):
        raise InputError("the request must be a JSON object with an \"inputs\" list")
    parameters = _object(request.get("parameters", {}), "parameters")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InputError('the request needs "inputs": a non-empty list of tensors {"name", "shape", "datatype", "data"}')
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(raw_inputs):
        name, array, offset = _decode_input(tensor, i, binary, offset, len(body))
        if name in inputs:
            raise InputError(f"input {name!r} is given twice")
        inputs[name] = array
    if offset != len(binary):
        raise InputError(f"the body holds {len(binary) - offset} bytes of binary data beyond what the inputs' "
                         f"binary_data_size account for")
    outputs, binary_out = None, {}
    if "outputs" in request:
        if not isinstance(request["outputs"], list):
            raise InputError('"outputs" must be a list of {"name", "parameters"}')
        outputs = []
        for j, out in enumerate(request["outputs"]):
            out = _object(out, f"outputs[{j}]")
            name = out.get("name")
            if not isinstance(name, str):
                raise InputError(f'outputs[{j}] needs a "name" (string)')
            if name in outputs:
                raise InputError(f"output {name!r} is requested twice")
            outputs.append(name)
            out_params = _object(out.get("parameters", {}), f"outputs[{j}].parameters")
            if "binary_data" in out_params:
                binary_out[name] = _flag(out_params["binary_data"], f"outputs[{j}].parameters.binary_data")
        outputs = tuple(outputs) or None          # an empty list asks for every output, as in Triton
    request_id = request.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        raise InputError(f'"id" must be a string, not {type(request_id).__name__}')
    return InferRequest(None if request_id is None else str(request_id), inputs, outputs, binary_out,
                        _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output"))


def parse_json(data: bytes, what: str) -> Any:
    """A request body's JSON; InputError (saying `what` to send) for bytes that are not UTF-8 JSON, nesting too
    deep for the parser, or integers too long to convert."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InputError("the request's JSON is nested too deeply; send flat lists") from None
    except (UnicodeDecodeError, ValueError) as e:      # JSONDecodeError, and ints over Python's 4300 digits
        raise InputError(f"the request is not valid JSON ({str(e)[:200]}); {what}") from None


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where} must be true or false, not {json.dumps(value)[:40]}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON object, not {type(value).__name__}")
    return value


def _decode_input(tensor: Any, i: int, binary: memoryview, offset: int, body_size: int) -> tuple[str, np.ndarray, int]:
    tensor = _object(tensor, f"inputs[{i}]")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InputError(f'inputs[{i}] needs a "name" (string)')
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= body_size for d in shape):
        got = f"{len(shape)} dims" if isinstance(shape, list) and len(shape) > MAX_RANK else json.dumps(shape)[:100]
        raise InputError(f"input {name[:100]!r}: shape must be a list of at most {MAX_RANK} non-negative integers, "
                         f"none larger than the request could carry ({body_size} bytes); got {got}")
    kind = tensor.get("datatype")
    dtype = DATATYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None:
        raise InputError(f"input {name!r}: datatype {kind!r} is not served here; use one of {', '.join(DATATYPES)}")
    count = math.prod(shape)
    if count > body_size:
        raise InputError(f"input {name!r}: shape {shape} holds {count} elements, more than the request's "
                         f"{body_size} bytes could carry")
    size = _object(tensor.get("parameters", {}), f"input {name!r} parameters").get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise InputError(f"input {name!r} has both JSON data and binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise InputError(f"input {name!r}: binary_data_size is {size!r}, but shape {shape} of {kind} takes "
                             f"{count * dtype.itemsize} bytes")
        if offset + size > len(binary):
            raise InputError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
        return name, array.astype(dtype), offset + size          # a writable, native-order copy
    if "data" not in tensor:
        raise InputError(f'input {name!r} has no "data" and no binary_data_size parameter')
    array = _json_array(tensor["data"], dtype, f"input {name!r}", kind)
    if array.size != count:
        raise InputError(f"input {name!r}: shape {shape} holds {count} elements, data has {array.size}")
    return name, array.reshape(shape), offset


# which JSON values a datatype takes: numpy's kind of the parsed data (b bool, i/u integer, f float)
_ACCEPTS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_WHAT = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}


def _json_array(data: Any, dtype: np.dtype, where: str, kind: str) -> np.ndarray:
    """JSON data as an array of `dtype`, strictly: no strings, nulls, bools for numbers, fractions for integers,
    or values out of the datatype's range (numpy alone would convert each of them silently)."""
    try:
        parsed = np.array(data)
    except (ValueError, TypeError) as e:                      # ragged nesting
        raise InputError(f"{where}: data is not a regular nested list ({e})") from None
    if not parsed.size:
        return parsed.astype(dtype)
    got = parsed.dtype.kind
    bools = got == "b" or (got in "iuf" and _holds_bool(data))
    if got not in _ACCEPTS[dtype.kind] or (bools and dtype.kind != "b"):
        what = ("true/false" if bools else {"U": "strings", "O": "nulls, objects, or integers beyond 64 bits",
                                              "f": "numbers with fractions"}.get(got, "integers"))
        raise InputError(f"{where}: {kind} data must be {_WHAT[dtype.kind]}; got {what}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InputError(f"{where}: data lie outside {kind}'s range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        array = parsed.astype(dtype)
        if dtype.kind == "f" and np.any(np.isfinite(parsed) & ~np.isfinite(array)):
            raise InputError(f"{where}: data lie outside {kind}'s range (they would become infinite)")
    return array


def _holds_bool(data: Any) -> bool:
    """Whether nested JSON data hold true/false anywhere (numpy turns them into 1 and 0 among numbers)."""
    stack = [data]
    while stack:
        x = stack.pop()
        if type(x) is list:
            stack.extend(x)
        elif x is True or x is False:
            return True
    return False


def encode_response(model: str, version: int, request: InferRequest, outputs: Mapping[str, np.ndarray],
                    specs: Sequence[TensorSpec]) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its headers: the requested outputs (all, in signature order, by default),
    each as JSON data or as binary data after the JSON."""
    names = request.outputs if request.outputs is not None else [s.name for s in specs]
    kinds = {s.name: datatype(s) for s in specs}
    head: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        head["id"] = request.id
    entries, blobs = [], []
    for name in names:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": kinds[name], "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    head["outputs"] = entries
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return b"".join([text, *blobs]), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(text))}


def check_outputs(names: Sequence[str] | None, specs: Sequence[TensorSpec]) -> None:
    """InputError for a requested output the model does not have (checked before running it)."""
    if names is None:
        return
    known = {s.name for s in specs}
    for name in names:
        if name not in known:
            raise InputError(f"unknown output {name!r}; the model returns {', '.join(s.name for s in specs)}")


def flat_inputs(inputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """The named inputs in the model's flat order; InputError for unknown or missing names (shapes and dtypes
    are checked by the signature, with the message Python callers get)."""
    names = [s.name for s in specs]
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the model takes {', '.join(names)}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; expected {', '.join(names)}")
    return [inputs[n] for n in names]
