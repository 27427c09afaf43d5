"""The Open Inference Protocol (KServe v2, the API of Triton and OpenVINO Model Server) on the wire.

An infer request is a JSON object of named tensors, each with a shape, a datatype and its elements, either in
the JSON (`"data": [...]`, row-major, flat or nested) or, with the binary tensor data extension, as raw bytes
after the JSON: then the `Inference-Header-Content-Length` header gives the JSON's length and each binary
input says its byte count in `parameters.binary_data_size`, in input order. Outputs come back the same way:
as JSON, or binary when the request asks for it per output (`outputs[i].parameters.binary_data`) or for all
(`parameters.binary_data_output`), as `tritonclient` does by default.

JSON data are read strictly (numbers for FP types, integers in range for INT types, true/false for BOOL).
Non-finite floats in JSON outputs are written NaN / Infinity / -Infinity, as Python's json and tritonclient's
rapidjson read them (strict JSON cannot write them); binary outputs carry them exactly. BF16 travels as Triton
sends it: binary as the 2-byte bfloat16 bit pattern, JSON as numbers; in numpy it is `ml_dtypes.bfloat16`.

BYTES (texts, encoded images) is a tensor of byte strings; in numpy an object array of `bytes`. In JSON its data
are strings (as tritonclient sends them), each taken as its UTF-8 bytes; binary, as Triton serializes it: each
element's length as a 4-byte little-endian unsigned integer, then its bytes, element after element. A served BYTES
tensor is described by a spec with a `datatype` attribute ("BYTES": `pipeline.base.BytesSpec`) where a numeric one
is a `signature.TensorSpec`. An output array of objects (`bytes` or `str`) or of numpy's str / bytes (kinds U, S) is
sent as BYTES: binary exactly (str as UTF-8), JSON as strings, bytes that are not UTF-8 with U+FFFD for each bad
byte sequence (JSON cannot carry them; ask for the output as binary data to get them exactly).

JSON is read and written by orjson (the serve extra), several times faster than Python's json; Python's parser
reads what orjson refuses (NaN / Infinity literals, which Python's json and rapidjson write; UTF-16; lone
surrogates) and words every parse error, and Python's writer writes the float data that hold NaN or Inf.
Floats are written as the float64 of their value (what `json.dumps(array.tolist())` writes), so a client that
reads doubles and casts them back (tritonclient) gets every FP16 / BF16 / FP32 value exactly.

Bytes in, numpy out and back: no HTTP framework here. Every malformed request is an InputError whose message
says what to fix (the server answers it with 400), found before the request can cost much: a shape has at most
MAX_RANK dims, none larger than the body could carry; JSON made mostly of brackets (more than one list or object
per LIST_BYTES bytes: nested data of single elements, which Python would hold at many times the body's size) must be
sent flat, as the protocol allows (brackets inside strings, as texts hold them, are not counted); nesting too
deep for the parser and integers too long to convert are refused. A BYTES element takes at least 4 bytes of binary
data (its length), so its count is bounded by binary_data_size, and its elements must fill that size exactly.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import ml_dtypes
import numpy as np

from ..errors import InputError
from ..signature import TensorSpec

if TYPE_CHECKING:
    from ..pipeline.base import BytesSpec

Spec = Union[TensorSpec, "BytesSpec"]     # a served tensor: numeric (TensorSpec) or BYTES (a spec with .datatype)

try:
    import orjson
except ImportError:        # pragma: no cover - the serve extra brings it; without it Python's json serves, slower
    orjson = None

HEADER_LENGTH = "inference-header-content-length"
MAX_RANK = 32
LIST_BYTES = 16

BF16 = np.dtype(ml_dtypes.bfloat16)

# Open Inference Protocol datatype <-> numpy, for the fixed-size datatypes; and BYTES, byte strings (object arrays)
BYTES = "BYTES"
DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("FP16", np.float16), ("BF16", BF16), ("FP32", np.float32), ("FP64", np.float64))}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# what each datatype holds: b bool, i signed / u unsigned integers, f floats (numpy calls bfloat16's kind V)
_KINDS = {name: "f" if dtype == BF16 else dtype.kind for name, dtype in DATATYPES.items()}
_STRING_KINDS = "OSU"     # numpy kinds served as BYTES: objects (bytes / str), numpy bytes, numpy str
_LENGTH = struct.Struct("<I")      # a BYTES element's length prefix on the wire


def array_datatype(array: np.ndarray) -> str:
    """The protocol's datatype name for an array: BYTES for objects, str or bytes; else its numpy dtype's."""
    if array.dtype.kind in _STRING_KINDS:
        return BYTES
    return _NAMES.get(array.dtype, str(array.dtype).upper())


@functools.lru_cache(maxsize=1024)
def datatype(spec: Spec) -> str:
    """The protocol's datatype name for a served tensor: a spec's own `datatype` (BytesSpec's BYTES), or that
    of a signature tensor's dtype."""
    named = getattr(spec, "datatype", None)
    if isinstance(named, str):
        return named
    try:
        dtype = spec.numpy_dtype
    except TypeError:            # a torch dtype numpy has none of (float8, ...): not served, named as torch does
        return str(spec.dtype).removeprefix("torch.").upper()
    return _NAMES.get(dtype, str(dtype).upper())


def tensor_metadata(spec: Spec) -> dict[str, Any]:
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
    containers, most = head.count(b"[") + head.count(b"{"), max(4096, len(head) // LIST_BYTES)
    if containers > most and b"\x00" not in head:       # UTF-8 JSON (UTF-16/32 hold NULs): texts may hold brackets
        containers = _containers(head)
    if containers > most:
        raise InputError(f"the request's JSON holds {containers} lists and objects in {len(head)} bytes: send each "
                         "input's data as one flat list in row-major order (the protocol allows it), not nested "
                         "lists of single elements")
    try:
        return _request(parse_json(head, _REQUEST), binary, len(body))
    except _Inexact:       # integer data holding floats orjson may have made of integers beyond 64 bits
        return _request(_parse_exactly(head, _REQUEST), binary, len(body))


_REQUEST = 'send an Open Inference Protocol infer request object: {"inputs": [{"name", "shape", "datatype", "data"}]}'
_STRINGS = re.compile(rb'"[^"]*"')


def _containers(head: bytes) -> int:
    """The lists and objects of UTF-8 JSON: its brackets outside strings, as a JSON parser reads them (after
    dropping escaped backslashes and quotes, quotes pair up), in a few linear passes in C."""
    bare = _STRINGS.sub(b"", head.replace(b"\\\\", b"").replace(b'\\"', b""))
    return bare.count(b"[") + bare.count(b"{")


def _request(request: Any, binary: memoryview, body_size: int) -> InferRequest:
    """The InferRequest of a parsed request head and its binary tail."""
    if not isinstance(request, dict):
        raise InputError("the request must be a JSON object with an \"inputs\" list")
    parameters = _object(request.get("parameters", {}), "parameters")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InputError('the request needs "inputs": a non-empty list of tensors {"name", "shape", "datatype", "data"}')
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(raw_inputs):
        name, array, offset = _decode_input(tensor, i, binary, offset, body_size)
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
    deep for the parser, or integers too long to convert. orjson parses; what it refuses, Python's json parses
    or words the error of (orjson reads integers beyond 64 bits as floats: `_parse_exactly` keeps them)."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass          # NaN / Infinity literals, nesting over 1024, UTF-16/32, lone surrogates, or not JSON
    return _parse_exactly(data, what)


def _parse_exactly(data: bytes, what: str) -> Any:
    """`data` parsed by Python's json: integers of any length stay exact, NaN / Infinity literals are read."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InputError("the request's JSON is nested too deeply; send flat lists") from None
    except (UnicodeDecodeError, ValueError) as e:      # JSONDecodeError, and ints over Python's 4300 digits
        raise InputError(f"the request is not valid JSON ({str(e)[:200]}); {what}") from None


class _Inexact(InputError):
    """Integer data holding integral floats beyond 64 bits: numbers written with an exponent (1e19), or integers
    beyond 64 bits that orjson read as floats. `decode_request` parses again with Python's json to tell which."""


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
    shape, kind = tensor.get("shape"), tensor.get("datatype")
    dtype, count = check_tensor(name, shape, kind, body_size)
    size = _object(tensor.get("parameters", {}), f"input {name!r} parameters").get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise InputError(f"input {name!r} has both JSON data and binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool):
            raise InputError(f"input {name!r}: binary_data_size is {size!r}, not a byte count")
        if dtype is None:
            if size < 4 * count:
                raise InputError(f"input {name!r}: binary_data_size is {size}, but shape {shape} of BYTES takes at "
                                 f"least {4 * count} bytes (a 4-byte length before each element)")
        elif size != count * dtype.itemsize:
            raise InputError(f"input {name!r}: binary_data_size is {size!r}, but shape {shape} of {kind} takes "
                             f"{count * dtype.itemsize} bytes")
        if offset + size > len(binary):
            raise InputError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
        raw = binary[offset:offset + size]
        array = _from_wire(raw, dtype) if dtype is not None else _bytes_from_wire(raw, count, name, shape)
        return name, array.reshape(shape), offset + size
    if "data" not in tensor:
        raise InputError(f'input {name!r} has no "data" and no binary_data_size parameter')
    if dtype is None:
        array = _json_strings(tensor["data"], f"input {name!r}")
    else:
        array = _json_array(tensor["data"], dtype, f"input {name!r}", kind)
    if array.size != count:
        raise InputError(f"input {name!r}: shape {shape} holds {count} elements, data has {array.size}")
    return name, array.reshape(shape), offset


def check_tensor(name: str, shape: Any, kind: Any, body_size: int) -> tuple[np.dtype | None, int]:
    """An input tensor's numpy dtype (None for BYTES) and element count, from its declared shape and datatype;
    InputError for a shape that is not at most MAX_RANK non-negative integers none larger than the request's
    `body_size` bytes, a datatype not served, or more elements than the request could carry."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= body_size for d in shape):
        got = f"{len(shape)} dims" if isinstance(shape, list) and len(shape) > MAX_RANK else json.dumps(shape)[:100]
        raise InputError(f"input {name[:100]!r}: shape must be a list of at most {MAX_RANK} non-negative integers, "
                         f"none larger than the request could carry ({body_size} bytes); got {got}")
    dtype = DATATYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None and kind != BYTES:
        raise InputError(f"input {name!r}: datatype {kind!r} is not served here; use one of "
                         f"{', '.join([*DATATYPES, BYTES])}")
    count = math.prod(shape)
    if count > body_size:
        raise InputError(f"input {name!r}: shape {shape} holds {count} elements, more than the request's "
                         f"{body_size} bytes could carry")
    return dtype, count


def tensor_from_wire(raw: bytes | memoryview, name: str, shape: list[int], kind: str, body_size: int,
                     where: str = "its raw contents") -> np.ndarray:
    """An input tensor from its bytes as the binary extension (and gRPC's raw_input_contents) carry them:
    little-endian, row-major (BF16: bit patterns); BYTES each element's 4-byte length, then its bytes.
    InputError for a shape / datatype `check_tensor` refuses, or bytes that do not fill the shape exactly."""
    dtype, count = check_tensor(name, shape, kind, body_size)
    if dtype is None:
        if len(raw) < 4 * count:
            raise InputError(f"input {name!r}: {where} hold {len(raw)} bytes, but shape {shape} of BYTES takes at "
                             f"least {4 * count} bytes (a 4-byte length before each element)")
        return _bytes_from_wire(raw, count, name, shape).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise InputError(f"input {name!r}: {where} hold {len(raw)} bytes, but shape {shape} of {kind} takes "
                         f"{count * dtype.itemsize} bytes")
    return _from_wire(raw, dtype).reshape(shape)


def tensor_from_values(values: Sequence[Any], name: str, shape: list[int], kind: str, body_size: int,
                       where: str = "contents") -> np.ndarray:
    """An input tensor from a flat sequence of its elements (gRPC's typed contents: Python numbers, bools or
    bytes), read as strictly as JSON data: integers in range for INT types, bools for BOOL, bytes for BYTES."""
    dtype, count = check_tensor(name, shape, kind, body_size)
    values = list(values)
    if dtype is None:
        if any(type(x) is not bytes for x in values):
            raise InputError(f"input {name!r}: BYTES {where} must be bytes")
        array = _objects(values)
    else:
        array = _json_array(values, dtype, f"input {name!r}", kind)
    if array.size != count:
        raise InputError(f"input {name!r}: shape {shape} holds {count} elements, {where} has {array.size}")
    return array.reshape(shape)


def output_to_wire(array: np.ndarray, kind: str, name: str) -> tuple[str, bytes]:
    """An output's datatype and bytes as the binary extension (and gRPC's raw_output_contents) carry them:
    BYTES (for a BYTES spec's `kind`, or an array of objects, str or bytes) length-prefixed, numbers little-endian
    row-major (BF16: bit patterns)."""
    if kind == BYTES or array.dtype.kind in _STRING_KINDS:
        return BYTES, _bytes_to_wire(array, name)
    return kind, _to_wire(array)


def _from_wire(raw: memoryview, dtype: np.dtype) -> np.ndarray:
    """Little-endian tensor bytes as a writable, native-order array of `dtype` (BF16: bfloat16 bit patterns)."""
    if dtype == BF16:
        return np.frombuffer(raw, "<u2").astype(np.uint16).view(BF16)
    return np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)


def _bytes_from_wire(raw: memoryview, count: int, name: str, shape: list[int]) -> np.ndarray:
    """BYTES binary data (each element a 4-byte little-endian length, then its bytes) as a flat object array of
    `count` bytes; InputError unless the elements fill `raw` exactly. `count` is at most len(raw) / 4."""
    data, items, offset, unpack = bytes(raw), [], 0, _LENGTH.unpack_from
    append = items.append
    try:
        for _ in range(count):          # unchecked: a slice past the end or a prefix beyond it shows at the end
            size, = unpack(data, offset)
            offset += 4
            append(data[offset:offset + size])
            offset += size
    except struct.error:                # a length prefix past the end
        offset = -1
    if offset != len(data):
        _bytes_error(data, count, name, shape)
    return _objects(items)


def _bytes_error(data: bytes, count: int, name: str, shape: list[int]) -> None:
    """Raise the InputError that says where BYTES binary data do not hold `count` elements exactly."""
    offset = 0
    for i in range(count):
        if offset + 4 > len(data):
            raise InputError(f"input {name!r}: its {len(data)} bytes of binary data hold {i} BYTES elements, but "
                             f"shape {shape} takes {count} (each a 4-byte little-endian length, then its bytes)")
        size, = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + size > len(data):
            raise InputError(f"input {name!r}: BYTES element {i} has length {size}, but only {len(data) - offset} "
                             f"of the input's {len(data)} bytes of binary data remain (each element is a 4-byte "
                             "little-endian length, then its bytes)")
        offset += size
    raise InputError(f"input {name!r}: shape {shape} takes {count} BYTES elements, which fill {offset} of the "
                     f"input's {len(data)} bytes of binary data (binary_data_size); the other "
                     f"{len(data) - offset} bytes are no element")


def _objects(items: list) -> np.ndarray:
    """A flat object array of the items (numpy takes none of them for a sequence to descend into)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _json_strings(data: Any, where: str) -> np.ndarray:
    """BYTES JSON data (strings, a flat or regular nested list, row-major) as a flat object array of their UTF-8
    bytes; InputError for anything but strings."""
    if type(data) is not list:
        data = [data]
    types = set(map(type, data))
    nested = list in types
    if nested:
        types = _leaf_types(data)
    wrong = types - {str}
    if wrong:
        what = next((words for t, words in _WRONG if t in wrong), "nulls or objects")
        raise InputError(f"{where}: BYTES data must be strings; got {what}")
    if nested:
        try:
            data = np.array(data, dtype=object).reshape(-1).tolist()
        except ValueError as e:
            raise InputError(f"{where}: data is not a regular nested list ({e})") from None
        if any(type(x) is not str for x in data):                   # lists numpy kept whole: ragged nesting
            raise InputError(f"{where}: data is not a regular nested list")
    try:
        return _objects([x.encode() for x in data])
    except UnicodeEncodeError:
        raise InputError(f"{where}: BYTES data hold a string that is not Unicode text (a lone surrogate such as "
                         "\\ud800); send such bytes as binary data") from None


def _to_wire(array: np.ndarray) -> bytes:
    """An array's bytes as the binary extension carries them: little-endian, row-major (BF16: bit patterns)."""
    if array.dtype == BF16:
        array = array.view(np.uint16)
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


# the Python types (as JSON parses) each kind of datatype takes, and what it takes in words
_TAKES = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}
_WHAT = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}
_WRONG = ((bool, "true/false"), (str, "strings"), (float, "numbers with fractions"), (int, "integers"))


def _json_array(data: Any, dtype: np.dtype, where: str, kind: str) -> np.ndarray:
    """JSON data as an array of `dtype`, strictly: no strings, nulls, bools for numbers, fractions for integers,
    or values out of the datatype's range (numpy alone would convert each of them silently). A flat list (what
    clients send) is checked by the set of its elements' types and converted in one numpy call, straight into
    `dtype`; nested lists are walked."""
    category = _KINDS[kind]
    types = set(map(type, data)) if type(data) is list else {type(data)}
    if list in types:
        types = _leaf_types(data)
    wrong = types - _TAKES[category]
    if wrong:
        if category in "iu" and wrong == {float}:
            _check_integral(data, dtype, where, kind)
        what = next((words for t, words in _WRONG if t in wrong), "nulls or objects")
        raise InputError(f"{where}: {kind} data must be {_WHAT[category]}; got {what}")
    try:
        if category == "f":
            return _float_array(data, dtype, where, kind)
        if category == "b":
            return np.array(data, dtype=np.bool_)
        return _int_array(data, dtype, where, kind)
    except InputError:
        raise
    except (ValueError, TypeError) as e:                      # ragged nesting
        raise InputError(f"{where}: data is not a regular nested list ({e})") from None


def _int_array(data: Any, dtype: np.dtype, where: str, kind: str) -> np.ndarray:
    """Integers as an array of integer `dtype`; InputError for values outside its range."""
    info = np.iinfo(dtype)
    try:
        parsed = np.array(data, dtype=np.int64)
    except OverflowError:                   # a value beyond int64: all of them must then fit uint64
        values = np.array(data, dtype=object)
        if values.min() < 0 or values.max() > np.iinfo(np.uint64).max:
            parsed = None
        else:
            parsed = np.array(data, dtype=np.uint64)
    if parsed is None or parsed.size and (int(parsed.min()) < info.min or int(parsed.max()) > info.max):
        raise InputError(f"{where}: data lie outside {kind}'s range [{info.min}, {info.max}]")
    return parsed.astype(dtype)


def _float_array(data: Any, dtype: np.dtype, where: str, kind: str) -> np.ndarray:
    """Numbers as an array of float `dtype`; InputError for finite numbers that would become infinite."""
    direct = dtype != BF16          # numpy rounds Python floats to its own float types in one step
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            array = np.array(data, dtype=dtype if direct else np.float64)
            if not direct:
                array = array.astype(dtype)
        except OverflowError:                                 # an integer beyond float64
            array = None
        if array is None or not np.isfinite(array).all():
            try:
                wide = np.array(data, dtype=np.float64)
            except OverflowError:
                wide = np.array([0.0])
            if array is None or np.any(np.isfinite(wide) & ~np.isfinite(array)):
                raise InputError(f"{where}: data lie outside {kind}'s range (they would become infinite)")
    return array


def _check_integral(data: Any, dtype: np.dtype, where: str, kind: str) -> None:
    """Raise _Inexact if integer data hold floats that are whole numbers beyond 64 bits (1e19, or what orjson
    made of 10000000000000000000); return for other floats (fractions), which are simply refused."""
    try:
        floats = np.array(data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return
    big = np.isfinite(floats) & (np.abs(floats) >= 2.0 ** 63)
    if np.any(big) and np.all(floats[big] == np.round(floats[big])):
        info = np.iinfo(dtype)
        raise _Inexact(f"{where}: data lie outside {kind}'s range [{info.min}, {info.max}], or are not integers")


def _leaf_types(data: Any) -> set[type]:
    """The types of the values in nested JSON lists."""
    types, stack = set(), [data]
    while stack:
        x = stack.pop()
        if type(x) is list:
            stack.extend(x)
        else:
            types.add(type(x))
    return types


def encode_response(model: str, version: int, request: InferRequest, outputs: Mapping[str, np.ndarray],
                    specs: Sequence[Spec]) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its headers: the requested outputs (all, in signature order, by default),
    each as JSON data or as binary data after the JSON. An output of a BYTES spec, or an array of objects, str or
    bytes, is sent as BYTES."""
    names = request.outputs if request.outputs is not None else [s.name for s in specs]
    kinds = {s.name: datatype(s) for s in specs}
    head: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        head["id"] = request.id
    entries, blobs = [], []
    for name in names:
        array = outputs[name]
        strings = kinds[name] == BYTES or array.dtype.kind in _STRING_KINDS
        entry: dict[str, Any] = {"name": name, "datatype": BYTES if strings else kinds[name],
                                 "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            _, blob = output_to_wire(array, kinds[name], name)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_strings_of(array, name) if strings else _json_data(array)
        entries.append(entry)
    head["outputs"] = entries
    text = _dumps(head)
    if not blobs:
        return text, {"content-type": "application/json"}
    return b"".join([text, *blobs]), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(text))}


def _elements(array: np.ndarray, name: str) -> list[bytes | str]:
    """A BYTES output's elements, row-major: bytes or str (numpy's own str and bytes scalars included)."""
    items = array.reshape(-1).tolist()
    if not all(isinstance(x, (bytes, str)) for x in items):
        bad = next(x for x in items if not isinstance(x, (bytes, str)))
        raise TypeError(f"output {name!r} is sent as BYTES, but holds a {type(bad).__name__}, not bytes or str")
    return items


def _bytes_to_wire(array: np.ndarray, name: str) -> bytes:
    """A BYTES output as the binary extension carries it: each element's length (4 bytes, little-endian), then
    its bytes (str as UTF-8; a lone surrogate, which UTF-8 cannot carry, as '?')."""
    items = [x if isinstance(x, bytes) else x.encode("utf-8", "replace") for x in _elements(array, name)]
    return b"".join(itertools.chain.from_iterable(zip(map(_LENGTH.pack, map(len, items)), items)))


def _json_strings_of(array: np.ndarray, name: str) -> list[str]:
    """A BYTES output's JSON data: a flat list of strings (bytes decoded from UTF-8, U+FFFD for what is not)."""
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in _elements(array, name)]


PIECE = 1 << 14     # elements of an output written per call: between pieces the event loop can take the GIL


class _Data:
    """A large output's JSON data, or one holding NaN / Inf, written in pieces by `_write`."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _json_data(array: np.ndarray) -> np.ndarray | _Data:
    """An output's JSON data: a flat, native, C-ordered array (floats as float64, the exact value of any FP16,
    BF16 or FP32: the text `json.dumps(array.tolist())` writes); _Data when it is large or not all finite."""
    flat = array.reshape(-1)
    if flat.dtype.kind == "f" or flat.dtype == BF16:
        with np.errstate(invalid="ignore"):          # signalling NaNs
            flat = flat.astype(np.float64)
    else:
        flat = np.ascontiguousarray(flat, flat.dtype.newbyteorder("="))
    small = flat.size <= PIECE and (flat.dtype.kind != "f" or np.isfinite(flat).all())
    return flat if small and orjson is not None else _Data(flat)


def _write(flat: np.ndarray) -> bytes:
    """A flat array as a JSON list, PIECE elements per call (no call holds the GIL for long): by orjson, but
    pieces holding NaN / Inf by Python's json (NaN, Infinity, -Infinity, where orjson would write null)."""
    parts = []
    for i in range(0, flat.size, PIECE):
        piece = flat[i:i + PIECE]
        if orjson is not None and (piece.dtype.kind != "f" or np.isfinite(piece).all()):
            parts.append(orjson.dumps(piece, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1])
        else:
            parts.append(json.dumps(piece.tolist(), separators=(",", ":"))[1:-1].encode())
    return b"[" + b",".join(parts) + b"]"


def _dumps(head: dict[str, Any]) -> bytes:
    """A response head (its data from `_json_data`) as compact JSON: by orjson, but for strings orjson cannot
    write (lone surrogates from an id), which Python's json writes."""
    if orjson is not None:
        try:
            return orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY, default=_fragment)
        except TypeError:                    # orjson.JSONEncodeError
            pass
    return json.dumps(head, separators=(",", ":"), default=_plain).encode()


def _fragment(value: Any) -> Any:
    if isinstance(value, _Data):
        return orjson.Fragment(_write(value.array))
    raise TypeError(f"{type(value).__name__} is not JSON")


def _plain(value: Any) -> Any:
    if isinstance(value, _Data):
        return value.array.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def check_outputs(names: Sequence[str] | None, specs: Sequence[Spec]) -> None:
    """InputError for a requested output the model does not have (checked before running it)."""
    if names is None:
        return
    known = {s.name for s in specs}
    for name in names:
        if name not in known:
            raise InputError(f"unknown output {name!r}; the model returns {_names(specs)}")


def flat_inputs(inputs: Mapping[str, np.ndarray], specs: Sequence[Spec]) -> list[np.ndarray]:
    """The named inputs in the model's flat order, checked in the protocol's words: InputError for unknown or
    missing names, another datatype (BYTES included: a BYTES input must arrive as BYTES, a numeric one not), rank
    or fixed size than the model's metadata shows. (Dynamic dims' ranges, index ranges and NaN/Inf are checked by
    the model's own checks, after this.)"""
    names = [s.name for s in specs]
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the model takes {_names(specs)}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; expected {_names(specs)}")
    for spec in specs:
        array, meta = inputs[spec.name], tensor_metadata(spec)
        got = array_datatype(array)
        if got != meta["datatype"]:
            raise InputError(f"input {spec.name!r}: datatype {got}, expected {meta['datatype']}")
        if array.ndim != len(meta["shape"]) or any(want not in (-1, n) for want, n in zip(meta["shape"], array.shape)):
            raise InputError(f"input {spec.name!r}: shape {list(array.shape)}, expected {meta['shape']}")
    return [inputs[n] for n in names]


def _names(specs: Sequence[Spec]) -> str:
    return ", ".join(repr(s.name) for s in specs)
