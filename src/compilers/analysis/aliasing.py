"""Which outputs of an engine's graph may share memory with an input, with memory the engine holds (weights,
folded constants) or with another output: the only outputs whose memory a call must check (`Engine.may_share`,
`CompiledModel._own_memory`). Every other output is memory an op allocated for that call alone.

Each value's memory is traced back to where it may come from: the caller's inputs or memory the engine holds
(SHARED), or the op that allocated it. An op may return an argument's memory (or a view of it) when:
- its schema annotates the returned tensor with an alias set (`Tensor(a)`: view, reshape, contiguous, to, an
  in-place op, a list's element): the memory of the arguments that carry an annotation;
- it is one of `UNDECLARED`, whose schema says the result is fresh but which return an argument in some cases
  (`type_as` to the same dtype, `dropout` in eval, `einsum("ij->ij")`);
- it returns a container (TorchScript's containers share their elements), lies outside the namespaces whose
  schemas PyTorch keeps (a custom op), or has no schema and is no plumbing of the graph: any argument's.
Any other op allocates what it returns. An output may share when one of its origins is SHARED or is another
output's too (one tensor returned twice, a view of another output).
"""
from __future__ import annotations

import collections
import operator
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

SHARED = "shared"
_NONE: frozenset = frozenset()

#: ops whose schema says every returned tensor is fresh, but that may return an argument's memory (an argument
#: itself or a view of it). Found by calling every aten overload of torch 2.13 whose schema declares no alias on
#: float tensors of three shapes with simple argument values, keeping those whose result shared an argument's
#: memory, plus those reading showed the same for inputs the sweep did not try (`_cast_*` to the tensor's own
#: dtype). Overloads count as one.
UNDECLARED = frozenset({
    "aten::type_as", "aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout",
    "aten::sum_to_size", "aten::atleast_1d", "aten::atleast_2d", "aten::atleast_3d", "aten::einsum",
    "aten::cartesian_prod", "aten::broadcast_tensors", "aten::meshgrid", "aten::conj_physical", "aten::data",
    "aten::dequantize", "aten::to_dense", "aten::lift", "aten::_to_cpu", "aten::_unsafe_view", "aten::set",
    "aten::unsafe_split", "aten::unsafe_chunk", "aten::unsafe_split_with_sizes", "aten::flatten_dense_tensors",
    "aten::unflatten_dense_tensors", "aten::_saturate_weight_to_fp16", "aten::_pack_sequence",
    "aten::_remove_batch_dim", "aten::cumprod_backward", "aten::to_dense_backward", "aten::to_mkldnn_backward",
    "aten::_cast_Byte", "aten::_cast_Char", "aten::_cast_Double", "aten::_cast_Float", "aten::_cast_Int",
    "aten::_cast_Long", "aten::_cast_Short", "aten::_cast_Half",
    "aten::_foobar", "aten::_test_parallel_materialize", "aten::_test_string_default",   # test ops, as found
})
#: namespaces whose ops' schemas are PyTorch's own (and what torch.jit.freeze / optimize_for_inference insert)
TRUSTED = frozenset({"aten", "prim", "prepacked", "mkldnn_prepacked", "quantized"})
#: TorchScript nodes without schema that only pass values along (no memory of their own)
_PLUMBING = frozenset({
    "prim::TupleConstruct", "prim::TupleUnpack", "prim::TupleIndex", "prim::ListConstruct", "prim::ListUnpack",
    "prim::DictConstruct", "prim::unchecked_cast", "prim::unchecked_unwrap_optional",
})
#: TorchScript types that hold no tensor
_NO_TENSOR = frozenset({
    "IntType", "FloatType", "BoolType", "NoneType", "StringType", "DeviceObjType", "NumberType", "ComplexType",
    "LayoutType", "ScalarTypeType", "MemoryFormatType", "SymIntType", "SymFloatType", "SymBoolType",
    "QSchemeType", "EnumType",
})


class _Unknown(Exception):
    """The graph does something the analysis does not follow (a container written in place)."""


def sharing(origins: Sequence[frozenset]) -> frozenset[int]:
    """The outputs (indices into `origins`, each output's origins) that may share memory: with SHARED memory,
    or with another output."""
    count = collections.Counter(o for leaf in origins for o in leaf)
    return frozenset(j for j, leaf in enumerate(origins) if any(o == SHARED or count[o] > 1 for o in leaf))


def returned(schema: Any, args: Sequence[frozenset], fresh: Sequence[Any], holds: Sequence[bool]) -> list[frozenset]:
    """The origins of each value an op returns, from its schema and its arguments' origins (`args`, one per schema
    argument); `fresh[k]`: the origin of memory it allocates for return k; `holds[k]`: whether return k holds
    tensors."""
    everything = frozenset().union(*args)
    name = schema.name
    anything = (name.split("::")[0] not in TRUSTED or name in UNDECLARED or len(args) != len(schema.arguments))
    annotated = frozenset().union(*(a for spec, a in zip(schema.arguments, args) if spec.alias_info is not None))
    out = []
    for ret, mine, hold in zip(schema.returns, fresh, holds):
        if not hold:
            out.append(_NONE)
        elif anything or (ret.alias_info is not None and not annotated):
            out.append(everything | {mine})
        elif ret.alias_info is not None:
            out.append(annotated | {mine})
        elif not _tensor_type(ret.type):         # a container: its elements may be any argument's
            out.append(everything | {mine})
        else:
            out.append(frozenset({mine}))
    return out


def writes_container(schema: Any) -> bool:
    """Whether the op writes into a list or dict it is given (whose elements then change)."""
    return any(a.alias_info is not None and a.alias_info.is_write and not _tensor_type(a.type) and _holds(a.type)
               for a in schema.arguments)


def _tensor_type(t: Any) -> bool:
    """A Tensor, or an Optional[Tensor] (what a schema returns as one tensor)."""
    return t.kind() == "TensorType" or (t.kind() == "OptionalType" and t.getElementType().kind() == "TensorType")


def _holds(t: Any) -> bool:
    """Whether a value of TorchScript type `t` may hold a tensor (an object or Any may)."""
    kind = t.kind()
    if kind in _NO_TENSOR:
        return False
    if kind in ("ListType", "TupleType", "DictType", "OptionalType"):
        return any(_holds(c) for c in t.containedTypes())
    return True


# TorchScript ----------------------------------------------------------------------------------------------------

def script_outputs(graph: Any, count: int) -> frozenset[int] | None:
    """The flat outputs (the tensor leaves of what `graph` returns, `count` of them) that may share memory with an
    input, a constant or attribute of the graph, or another output. None where the graph cannot be followed (its
    output is built at run time, a list or dict written in place)."""
    try:
        origins: dict[int, frozenset] = {}
        inputs = list(graph.inputs())
        for v in inputs:
            origins[v.unique()] = frozenset({SHARED}) if _holds(v.type()) else _NONE
        while _script_block(graph, origins):      # until loops carry nothing new
            pass
        leaves = [leaf for v in graph.outputs() for leaf in _script_leaves(v)]
    except _Unknown:
        return None
    if len(leaves) != count:
        return None
    return sharing([origins.get(v.unique(), frozenset({SHARED})) for v in leaves])


def _script_block(block: Any, origins: dict[int, frozenset]) -> bool:
    """Propagate origins through the nodes of `block` (and their blocks); whether any grew."""
    grew = False

    def of(v: Any) -> frozenset:
        return origins.get(v.unique(), _NONE)

    def add(v: Any, found: frozenset) -> None:
        nonlocal grew
        before = origins.get(v.unique(), _NONE)
        if not found <= before:
            origins[v.unique()] = before | found
            grew = True

    for node in block.nodes():
        kind = node.kind()
        ins = [of(v) for v in node.inputs()]
        outs = list(node.outputs())
        if kind == "prim::If":
            for b in node.blocks():
                grew |= _script_block(b, origins)
            for k, v in enumerate(outs):
                add(v, frozenset().union(*(of(list(b.outputs())[k]) for b in node.blocks())))
            continue
        if kind == "prim::Loop":
            body = next(iter(node.blocks()))
            carried, params, results = list(node.inputs())[2:], list(body.inputs())[1:], list(body.outputs())[1:]
            for init, param, result in zip(carried, params, results):
                add(param, of(init) | of(result))
            grew |= _script_block(body, origins)
            for init, result, v in zip(carried, results, outs):
                add(v, of(init) | of(result))
            continue
        fresh = [("value", v.unique()) for v in outs]
        holds = [_holds(v.type()) for v in outs]
        if kind in ("prim::Constant", "prim::GetAttr"):
            found = [frozenset({SHARED}) if h else _NONE for h in holds]
        elif node.schema() == "(no schema)":
            everything = frozenset().union(*ins)
            found = [(everything if kind in _PLUMBING else everything | {f}) if h else _NONE
                     for f, h in zip(fresh, holds)]
        else:
            schema = _parse(node.schema())
            if writes_container(schema):
                raise _Unknown(kind)
            found = returned(schema, ins, fresh, holds)
        for v, f in zip(outs, found):
            add(v, f)
    return grew


_SCHEMAS: dict[str, Any] = {}


def _parse(text: str) -> Any:
    if text not in _SCHEMAS:
        _SCHEMAS[text] = torch._C.parse_schema(text)
    return _SCHEMAS[text]


def _script_leaves(value: Any) -> list[Any]:
    """The tensors of `value` in the order of their pytree leaves (what FlatModule returns), where the graph
    builds it of tuples and lists; _Unknown otherwise."""
    node = value.node()
    if node.kind() in ("prim::TupleConstruct", "prim::ListConstruct"):
        return [leaf for v in node.inputs() for leaf in _script_leaves(v)]
    if value.type().kind() == "TensorType":
        return [value]
    if not _holds(value.type()):
        return []          # an int or None: FlatModule returns tensors only
    raise _Unknown(f"output built by {node.kind()}")


# torch.export -----------------------------------------------------------------------------------------------------

def program_outputs(program: Any, held_copied: bool) -> frozenset[int] | None:
    """The user outputs of an ExportedProgram that may share memory with a user input, with a parameter, buffer
    or constant (unless `held_copied`: the engine returns copies of those), or with another output. None where an
    output is no node of the graph."""
    from .graph import user_outputs
    user = set(program.graph_signature.user_inputs)
    origins: dict[Any, Any] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            origins[node] = frozenset({SHARED}) if node.name in user or not held_copied else _NONE
        elif node.op == "get_attr":
            origins[node] = _NONE if held_copied else frozenset({SHARED})
        elif node.op == "call_function":
            origins[node] = _fx_returned(node, origins)
    leaves = user_outputs(program)
    if not all(isinstance(n, torch.fx.Node) for n in leaves):
        return None
    return sharing([_union(origins.get(n, frozenset({SHARED}))) for n in leaves])


def _fx_returned(node: Any, origins: dict[Any, Any]) -> Any:
    """A call's origins: one frozenset, or a tuple of them for an op with several returns."""
    target = node.target
    if target is operator.getitem:
        container, index = node.args
        found = origins.get(container, frozenset({SHARED}))
        return found[index] if isinstance(found, tuple) and isinstance(index, int) else _union(found)
    vals = node.meta.get("val")
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        args = [_fx_origins(_argument(node, i, spec), origins) for i, spec in enumerate(schema.arguments)]
        parts = vals if len(schema.returns) > 1 and isinstance(vals, (list, tuple)) else [vals]
        fresh = [("node", node.name, k) for k in range(len(schema.returns))]
        holds = [_fx_holds(v) for v in parts] if len(parts) == len(schema.returns) else [True] * len(schema.returns)
        found = returned(schema, args, fresh, holds)
        return tuple(found) if len(found) > 1 else (found[0] if found else _NONE)
    if not _fx_holds(vals):
        return _NONE
    return _fx_origins((node.args, node.kwargs), origins) | {("node", node.name, 0)}


def _argument(node: Any, i: int, spec: Any) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(spec.name)


def _fx_origins(value: Any, origins: dict[Any, Any]) -> frozenset:
    """The origins of every node in `value` (a node, or lists, tuples and dicts of them)."""
    nodes: list[Any] = []
    torch.fx.node.map_arg(value, nodes.append)
    return frozenset().union(*(_union(origins.get(n, frozenset({SHARED}))) for n in nodes))


def _fx_holds(val: Any) -> bool:
    """Whether a node's value (its meta "val": a fake tensor, a tuple of them, a SymInt) holds a tensor; unknown
    values are taken to."""
    if val is None:
        return True
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(val))


def _union(found: Any) -> frozenset:
    return frozenset().union(*found) if isinstance(found, tuple) else found
