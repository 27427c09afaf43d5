"""openvino artifacts on Triton's OpenVINO backend: `model.xml` + `model.bin`, the runtime options and the
precision as that backend's parameters.

OpenVINO IRs saved by this package name their inputs but not their outputs, and the Triton OpenVINO backend
addresses every output by its tensor name; the exported model.xml therefore gives each Result's input tensor the
Signature's output name (only the `names` attributes of those ports change; the weights file is copied as is).
"""
from __future__ import annotations

import re
from pathlib import Path
from xml.sax.saxutils import escape

from ...errors import ArtifactError, BackendUnavailable
from ...signature import Signature
from .base import ALL_TYPES, Export, TritonBackend


def _configure(export: Export) -> None:
    # openvino_backend README "Parameters" and src/openvino.cc (ModelState::ParseParameterHelper)
    settings, target, notes, caveats = export.settings, export.target, export.notes, export.caveats
    export.param("PERFORMANCE_HINT", settings.performance_hint)
    if settings.threads:
        export.param("INFERENCE_NUM_THREADS", settings.threads)
    if settings.streams:
        export.param("NUM_STREAMS", settings.streams)
    if settings.cache_dir:
        notes.append(f"cache_dir {settings.cache_dir!r}: the Triton OpenVINO backend has no CACHE_DIR parameter")
    if target.precision == "bf16":
        export.param("HINT_BF16", "YES")     # INFERENCE_PRECISION_HINT bf16, as the artifact was validated
    else:
        caveats.append(
            f"precision: target {target.name!r} ({target.precision}) runs with INFERENCE_PRECISION_HINT f32, which "
            "config.pbtxt cannot express: the Triton OpenVINO backend's only precision parameter is HINT_BF16 (YES = "
            "bf16) and it passes no other INFERENCE_PRECISION_HINT. On a CPU with AVX512_BF16 or AMX the CPU plugin's "
            "default is bf16, so there this model would run in bf16, not as validated. Serve it on a CPU without "
            "bf16, or export an openvino-cpu-bf16 artifact (validated in bf16) for such hosts")
        notes.extend(caveats)
    if export.max_batch > 1:
        # the backend reshapes the IR to a static max_batch_size (ov::set_batch) and refuses smaller batches
        # unless told to pad them
        export.param("ENABLE_BATCH_PADDING", "YES")
        notes.append(f"ENABLE_BATCH_PADDING YES: the Triton OpenVINO backend compiles the IR for exactly "
                     f"max_batch_size ({export.max_batch}) rows and refuses smaller batches otherwise; padded rows are "
                     "zeros, computed and dropped")
    xml = _name_ir_outputs(export.path / "model.xml", export.path / "model.bin", export.signature)
    if xml is not None:
        export.files["model.xml"] = xml
        notes.append("model.xml: the Result inputs are named after the Signature's outputs (the Triton OpenVINO "
                     "backend finds outputs by tensor name); model.bin is the artifact's own")
    bounded = _bounded(export.signature, export.max_batch)
    if bounded:
        export.param("RESHAPE_IO_LAYERS", "YES")
        notes.append(f"RESHAPE_IO_LAYERS YES: the IR bounds dynamic dim(s) {', '.join(bounded)}, and the Triton "
                     "OpenVINO backend matches a -1 dim only to an unbounded one; reshaping the inputs to the "
                     "config's dims lifts the bound, so Triton also passes sizes beyond it, which the artifact "
                     "was not validated for")


def _bounded(signature: Signature, max_batch: int) -> list[str]:
    """The dims the config writes as -1 that have an upper bound in the IR, as `name <= max` (the Triton OpenVINO
    backend's dims check, `doesMatch` in its openvino_utils.cc, accepts -1 only for an unbounded dim)."""
    skip = signature.batch if max_batch > 0 else None   # the backend sets the batch itself (ov::set_batch)
    return [f"{d} <= {r.max}" for d, r in signature.dims.items() if d != skip and r.max is not None]


# -- output names ---------------------------------------------------------------------------------------

def _name_ir_outputs(xml_file: Path, bin_file: Path, signature: Signature) -> bytes | None:
    """model.xml with each output tensor named after its Signature output; None when it already is."""
    try:
        import numpy as np
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable(f"exporting an OpenVINO artifact reads its IR with openvino ({e}): "
                                 "pip install 'compilers[cpu]'") from None
    core = ov.Core()
    model = core.read_model(str(xml_file), str(bin_file))
    wanted = [s.name for s in signature.outputs]
    if len(model.outputs) != len(wanted):
        raise ArtifactError(f"{xml_file}: the IR has {len(model.outputs)} outputs, the Signature {len(wanted)}; "
                            "recompile the artifact")
    if all(set(port.get_names()) == {n} for port, n in zip(model.outputs, wanted)):
        return None
    bad = [n for n in wanted if "," in n or "\\" in n]
    if bad:
        raise ArtifactError(f"{xml_file}: output name(s) {bad} cannot be IR tensor names (',' separates them)")
    data = xml_file.read_bytes()
    layers, ports, edges = _ir_layout(data)
    by_name = {layer["name"]: lid for lid, layer in layers.items() if layer["type"] == "Result"}
    sources: dict[tuple[str, str], str] = {}
    for result, name in zip(model.get_results(), wanted):
        lid = by_name.get(result.get_friendly_name())
        source = edges.get(lid)
        if source is None or source not in ports:
            raise ArtifactError(f"{xml_file}: cannot find the tensor feeding Result "
                                f"{result.get_friendly_name()!r}; export-triton cannot name output {name!r}")
        if layers[source[0]]["type"] == "Parameter":
            raise ArtifactError(f"{xml_file}: output {name!r} is an input passed through unchanged; its tensor "
                                "already carries the input's name, and Triton's OpenVINO backend would see the output "
                                "under that name. Return a copy (x.clone()) and recompile")
        if source in sources:
            raise ArtifactError(f"{xml_file}: outputs {sources[source]!r} and {name!r} are one tensor, which can "
                                "carry one name for Triton; return a copy of one of them and recompile")
        sources[source] = name
    patched = data
    for source in sorted(sources, key=lambda s: ports[s], reverse=True):
        start = ports[source]
        end = _tag_end(patched, start)
        tag = re.sub(rb'\snames="[^"]*"', b"", patched[start:end])
        close = len(tag) - (2 if tag.endswith(b"/>") else 1)
        name = escape(sources[source], {'"': "&quot;"}).encode()
        tag = tag[:close] + b' names="' + name + b'"' + tag[close:]
        patched = patched[:start] + tag + patched[end:]
    check = core.read_model(patched.decode("utf-8"), ov.Tensor(np.fromfile(bin_file, dtype=np.uint8)))
    got = [sorted(port.get_names()) for port in check.outputs]
    if got != [[n] for n in wanted] or len(check.get_ops()) != len(model.get_ops()):
        raise ArtifactError(f"{xml_file}: naming the IR outputs {wanted} gave {got}; export-triton cannot name "
                            "this IR's outputs")
    return patched


def _ir_layout(data: bytes) -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], int], dict[str, tuple[str, str]]]:
    """The top-level layers of an IR (id -> name, type), the byte offset of each layer's output port tag
    ((layer, port) -> offset), and the edge into each layer's first input (layer -> (layer, port))."""
    import xml.parsers.expat
    parser = xml.parsers.expat.ParserCreate()
    stack: list[str] = []
    layers: dict[str, dict[str, str]] = {}
    ports: dict[tuple[str, str], int] = {}
    edges: dict[str, tuple[str, str]] = {}
    current: list[str | None] = [None]

    def start(tag: str, attrs: dict[str, str]) -> None:
        stack.append(tag)
        path = "/".join(stack)
        if path == "net/layers/layer":
            current[0] = attrs["id"]
            layers[attrs["id"]] = {"name": attrs.get("name", ""), "type": attrs.get("type", "")}
        elif path == "net/layers/layer/output/port":
            ports[(current[0], attrs["id"])] = parser.CurrentByteIndex
        elif path == "net/edges/edge" and attrs.get("to-port") == "0":
            edges[attrs["to-layer"]] = (attrs["from-layer"], attrs["from-port"])

    def end(tag: str) -> None:
        stack.pop()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.Parse(data, True)
    return layers, ports, edges


def _tag_end(data: bytes, start: int) -> int:
    """The offset just past the start tag that begins at `start` (a '>' outside quoted attribute values)."""
    quote = None
    for i in range(start, len(data)):
        c = data[i:i + 1]
        if quote:
            if c == quote:
                quote = None
        elif c in (b'"', b"'"):
            quote = c
        elif c == b">":
            return i + 1
    raise ArtifactError("model.xml ends inside a tag")


# the tensor types of the OpenVINO backend's data type table
TRITON = TritonBackend("openvino", files=("model.xml", "model.bin"), types=ALL_TYPES - {"TYPE_FP64", "TYPE_BF16"},
                       configure=_configure)
