"""Graph edits on a QDQ int8 ONNX model: a QuantizeLinear/DequantizeLinear pair per consumer (`unshare`),
the layers that read quantized activations (`quantized_layers`), and layers put back in float
(`keep_float`, what the accuracy loop asks for)."""
from __future__ import annotations

import collections
import copy
from typing import Any, Sequence

#: the weighted operators: their activation inputs are quantized under every preset, and they are the layers
#: the accuracy loop can keep in float
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def unshare(model: Any) -> Any:
    """`model` with a scale and zero-point initializer of its own for every QuantizeLinear (and the
    DequantizeLinear nodes it feeds): ONNX Runtime merges identical Q nodes, and then cannot fuse the
    operators behind them (see the module docstring)."""
    import onnx
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    for k, q in enumerate([n for n in graph.node if n.op_type == "QuantizeLinear"]):
        for j in (1, 2):
            old = q.input[j] if len(q.input) > j else ""
            if old not in inits:
                continue
            new = f"{old}/q{k}"
            copied = onnx.TensorProto()
            copied.CopyFrom(inits[old])
            copied.name = new
            graph.initializer.append(copied)
            q.input[j] = new
            for dq in consumers[q.output[0]]:
                if dq.op_type == "DequantizeLinear" and len(dq.input) > j and dq.input[j] == old:
                    dq.input[j] = new
    return prune(model)


def quantized_layers(model: Any) -> list[str]:
    """The weighted nodes (by name) that read a quantized activation, in graph order."""
    producers = _producers(model.graph)
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED and n.name
            and any(_pair(producers, i) is not None for i in n.input)]


def keep_float(model: Any, source: Any, layers: Sequence[str]) -> Any:
    """A copy of the QDQ `model` with the nodes named in `layers` in float: their weights and biases are the
    float ones of `source` (the model that was quantized) again, and their activation inputs are no longer
    quantized, back through the unweighted single-input operators in between (a ReLU, a pool, a reshape) to
    the layer before: the whole path from that layer's output is float."""
    out = copy.deepcopy(model)
    graph, wanted = out.graph, set(layers)
    producers = _producers(graph)
    floats = {i.name: i for i in source.graph.initializer}
    originals = {n.name: n for n in source.graph.node}
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    for node in graph.node:
        if node.name in wanted:
            original = originals.get(node.name)
            if original is not None:
                _float_weights(graph, node, original, floats)
            for i in range(len(node.input)):
                _unquantize(node, i, producers, constants)
    return prune(out)


def _float_weights(graph: Any, node: Any, original: Any, floats: dict[str, Any]) -> None:
    """Point `node`'s constant inputs at the float initializers its `original` reads (added to `graph`)."""
    import onnx
    del node.attribute[:]                     # the quantizer folds Gemm's beta into the bias it quantizes
    node.attribute.extend(original.attribute)
    have = {i.name for i in graph.initializer}
    for i, name in enumerate(original.input):
        if name in floats and i < len(node.input):
            kept = f"{name}/float"
            if kept not in have:
                weight = onnx.TensorProto()
                weight.CopyFrom(floats[name])
                weight.name = kept
                graph.initializer.append(weight)
                have.add(kept)
            node.input[i] = kept


def _unquantize(node: Any, i: int, producers: dict[str, Any], constants: set[str]) -> None:
    """Let `node` read its input `i` before quantization, and likewise up through unweighted operators with
    one activation (non-constant) input."""
    pair = _pair(producers, node.input[i])
    if pair is None:
        return
    node.input[i] = pair.input[0]
    before = producers.get(pair.input[0])
    if before is not None and before.op_type not in WEIGHTED:
        activations = [j for j, name in enumerate(before.input) if name and name not in constants]
        if len(activations) == 1:
            _unquantize(before, activations[0], producers, constants)


def _pair(producers: dict[str, Any], tensor: str) -> Any:
    """The QuantizeLinear of the Q -> DQ pair that yields `tensor`, or None (a weight has a DQ only)."""
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    return q if q is not None and q.op_type == "QuantizeLinear" else None


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph: Any) -> dict[str, list]:
    found = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            found[i].append(n)
    return found


def prune(model: Any) -> Any:
    """`model` without the nodes whose outputs nothing reads, and without unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    if any(a.g.node or a.graphs for n in graph.node for a in n.attribute):
        return model                                          # subgraphs read outer names: leave it be
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    kept = [i for i in graph.initializer if i.name in used]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model
