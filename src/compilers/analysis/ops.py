"""What the graph analyses share (`batch.py`, `padding.py`): reading an exported graph's nodes, their values and
sizes, the model's line that made a node, and the ATen ops they treat alike."""
from __future__ import annotations

import operator
import re
from typing import Any

import sympy
import torch

aten = torch.ops.aten


def node_value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def tensors_of(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in tensors_of(v)]
    return []


def leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in leaves(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    return [value]


def size_expr(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return size if isinstance(size, sympy.Basic) else sympy.Integer(int(size))


def axis_size(t: torch.Tensor, axis: int) -> Any:
    return size_expr(t.shape[axis])


def whole(q: Any, batch: Any) -> Any:
    """`q` when it is a product of sizes (no fraction, no batch), else None."""
    q = sympy.cancel(q)
    numerator, denominator = sympy.fraction(q)
    return q if denominator == 1 and q != 0 and not q.has(batch) else None


def same_size(a: Any, b: Any) -> bool:
    return sympy.expand(size_expr(a) - size_expr(b)) == 0


def op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return str(target) if isinstance(target, torch._ops.OpOverload) else name


def source_line(node: Any) -> str:
    """` at file.py:12 (`code`)`: the model's own line that made the node, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    sites = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    user = [s for s in sites if "/torch/" not in s[0] and "/compilers/" not in s[0]]
    shown = [site for site in (user[-1:] + sites[-1:]) if site][:2]
    if len(shown) == 2 and shown[0] == shown[1]:
        shown = shown[:1]
    return "".join(f" {'at' if i == 0 else 'via'} {file.rsplit('/', 1)[-1]}:{line} (`{code.strip()[:80]}`)"
                   for i, (file, line, code) in enumerate(shown))


def is_pointwise(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def arg_of(node: Any, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def dims_of(value: Any, rank: int) -> list[int] | None:
    """Dims as non-negative ints; None for 'all dims' (None or [])."""
    if value is None or value == []:
        return None
    dims = [value] if isinstance(value, int) else list(value)
    return [d % rank if rank else 0 for d in dims]


def rank_of(node: Any) -> int:
    return node_value(node).dim()


def aten_op(name: str) -> Any:
    """aten.<name> (`overload.name`), None where this torch has no such op."""
    packet, _, overload = name.partition(".")
    try:
        return getattr(getattr(aten, packet), overload or "default")
    except AttributeError:
        return None


def aten_ops(*names: str) -> list[Any]:
    return [aten_op(n) for n in names]



LETTERS = "abcdefghijklmnopqrstuvwxyz"
LEAD = "abcdefghij"


def matmul_labels(ra: int, rb: int) -> tuple[str, str, str]:
    """einsum labels of torch.matmul for operand ranks ra, rb (batch dims broadcast from the right)."""
    if ra == 1 and rb == 1:
        return "K", "K", ""
    batch = max(ra, rb, 2) - 2
    lead = LEAD[:batch]
    a = lead[batch - max(ra - 2, 0):] + ("NK" if ra > 1 else "K")
    b = lead[batch - max(rb - 2, 0):] + ("KM" if rb > 1 else "K")
    out = lead + ("N" if ra > 1 else "") + ("M" if rb > 1 else "")
    return a, b, out


#: nodes that are sizes or checks: their state is decided by their value (SIZE when it involves the batch)
SYMBOLIC = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten._assert_scalar.default,
             aten.sym_constrain_range_for_size.default, aten._assert_tensor_metadata.default,
             aten.sym_constrain_range.default, aten._assert_async.msg, torch.sym_not, torch.sym_max, torch.sym_min,
             torch.sym_float, torch.sym_int, *[getattr(operator, n) for n in (
                 "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge",
                 "and_", "or_")]}
SYMBOLIC = {op for op in SYMBOLIC if op is not None}
#: ops that may take the batch size as a size (their output's shape then says where the rows are); any other op
#: that takes it computes with it
SHAPE_OPS = {op for op in aten_ops("view", "reshape", "_unsafe_view", "view_copy", "unflatten.int", "expand",
                                   "expand_copy", "broadcast_to", "zeros", "ones", "empty.memory_format", "full",
                                   "new_zeros", "new_ones", "new_empty", "new_full", "empty_strided", "slice.Tensor",
                                   "slice_copy.Tensor", "narrow", "arange") if op is not None}


#: higher-order ops that run a subgraph once on their operands (no_grad and autocast regions)
WRAP_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
WRAP_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
WRAPPERS = tuple(op for op in (WRAP_GRAD, WRAP_AUTOCAST) if op is not None)


class GraphWalk:
    """One pass over a graph (and, through `run` again, the graphs of its higher-order ops), node by node: each
    call's state from its arguments' (`step`), placeholders and attributes starting at `initial`. An in-place op's
    state becomes its first argument's too, when `in_place_writes` is set."""

    initial: Any = None
    in_place_writes = False

    def __init__(self):
        self.ops = 0

    def run(self, module: torch.fx.GraphModule, states: dict[Any, Any]) -> list[Any]:
        """States of `module`'s output values, given those of its placeholders in `states` (`initial` if absent)."""
        result: list[Any] = []
        for node in module.graph.nodes:
            if node.op == "placeholder":
                states.setdefault(node, self.initial)
            elif node.op == "get_attr":
                states[node] = self.initial
            elif node.op == "call_function":
                self.ops += 1
                states[node] = self.step(module, node, states)
                if self.in_place_writes and is_in_place(node.target) and isinstance(node.args[0], torch.fx.Node):
                    states[node.args[0]] = states[node]
            elif node.op == "output":
                result = [self.state(a, states) for a in leaves(node.args[0])]
        return result

    def wrapped(self, module: torch.fx.GraphModule, node: Any, states: dict[Any, Any]) -> Any:
        """The state of a higher-order op that runs a subgraph once on its operands (`WRAPPERS`: no_grad or
        autocast regions): the subgraph walked on its operands' states."""
        sub_node, operands = (node.args[4], node.args[5:]) if node.target is WRAP_AUTOCAST else \
            (node.args[1], node.args[2:])
        sub = getattr(module, sub_node.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        out = self.run(sub, {p: self.state(o, states) for p, o in zip(placeholders, operands)})
        return out if isinstance(node_value(node), (list, tuple)) else out[0]

    def step(self, module: torch.fx.GraphModule, node: Any, states: dict[Any, Any]) -> Any:
        raise NotImplementedError

    def state(self, value: Any, states: dict[Any, Any]) -> Any:
        raise NotImplementedError


def is_in_place(target: Any) -> bool:
    """Whether an ATen op writes into its first argument (`add_`, `masked_fill_`)."""
    name = getattr(target, "_opname", "")
    return isinstance(target, torch._ops.OpOverload) and name.endswith("_") and not name.endswith("__")
