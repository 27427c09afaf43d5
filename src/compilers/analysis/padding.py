"""Whether padding changes a model's answers, proven from the exported graph (`padding_verdict`), and which inputs
are padding masks by where they flow (`masks_by_flow`).

A server that batches requests of different lengths pads each to the longest of the call, with the pipeline's pad
values (the tokenizer's pad id; 0 in the attention mask). The analysis compares, op by op, two runs of the same
item that differ only in how far it is padded: the padded dim is torch.export's symbol S, followed through every
ATen op, and each value's state says what is known of it in both runs:
- Seq(axes): the same in both runs at the item's real positions (below its length along each of `axes`, the dims
  of size outer * S * inner, whose entry o*S*inner + s*inner + i lies at position s). Each Axis knows what the
  value holds at the positions padded along it, real along its other axes (`fill`): a constant, carried exactly
  from the pad values through the ops (`Const`); at most a large negative bound (`Neg`: a -inf or -1e4 bias after
  arithmetic); unknown (None); or unknown and maybe infinite or NaN (ANY). And whether the value there is the
  position itself (`iota`: torch.arange(S)). An axis-free value may know the one value all its elements hold
  (`value`: a single-element constant of the model);
- LENGTH: a Python int that involves S (x.shape[1]), which may only size tensors;
- Lost(why): not proven the same at the real positions, with the op that lost it and the model's line.
The rows of a batch are proven apart by `analysis.batch`; this analysis follows one item (indices along the batch
dim are taken to pick the item itself).

The mask reaches a reduction over the sequence when the reduction's terms at padded positions are its identity,
by their fill: 0 for sums and contractions (sum, matmul, einsum, linear, a norm), a masking bias (-inf, or a
constant at most NEG_LIMIT, less what arithmetic on it may add) for max, softmax and logsumexp, +inf for min, 1 for
prod, False for any, True for all. Attention reaches its keys through an attn_mask whose fill along them is False
(bool) or a masking bias (additive), or by being causal. A fill gets there only from the pad values: a mask
multiplied in, a masked_fill or where on the mask, an additive bias made of it. Every other op along the sequence
loses the proof: a reduction whose padding holds something else (a mean divides by the padded length), a scan
backwards, a sort, flip, roll, shift, slice or pick of positions by number, a convolution or pooling over
positions, a reshape that merges the sequence so that no dim keeps it, a computation with the padded length, and
every op without a rule (unknown is never proven).

What it cannot see: a value it cannot bound is taken to be finite (unless made from an infinite or NaN fill) and
within +-ASSUMED_BOUND (so 0 * x == 0, and x - 1e4 stays below every real x); where a value padded along two dims
meets a mask along one of them, the corner (padded along both) is not followed on its own. The probe on the example
confirms (`probes.padding_independence`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch

from ..signature import Signature, TensorSpec, mask_problem
from .ops import (SHAPE_OPS, SYMBOLIC, WRAPPERS, GraphWalk, arg_of, aten_op, aten_ops, dims_of,
                  is_pointwise, leaves, matmul_labels, node_value, op_name, rank_of, same_size, size_expr, source_line,
                  tensors_of, whole)
from .graph import Exported, user_inputs, user_outputs
from .probes import padding_independence

#: a value the analysis cannot bound is taken to lie within +-ASSUMED_BOUND
ASSUMED_BOUND = 1e3
#: a constant at most this is a masking bias (-inf, finfo.min, -1e4): a max never picks it, and a softmax weighs
#: it at exp(NEG_LIMIT + ASSUMED_BOUND), which is 0
NEG_LIMIT = -1e4
#: a bias stays a masking bias (`Neg`) while it is at most this: ASSUMED_BOUND below every real value and more
NEG_KEPT = -2 * ASSUMED_BOUND

_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)
_ASSERT = torch.ops.aten._assert_scalar.default
ONE = sympy.Integer(1)


@dataclass(frozen=True)
class Const:
    """Exactly this Python number (bool, int or float) at every padded position."""

    value: Any


@dataclass(frozen=True)
class Neg:
    """At most `bound` (<= NEG_KEPT) at every padded position: a -inf or large negative bias, after arithmetic."""

    bound: float


#: a fill about which nothing is known, not even that it is finite (made from an infinite or NaN fill)
ANY = "any"


def _neg(bound: float) -> Neg | None:
    """Neg(bound) while it still masks (at most NEG_KEPT), else unknown."""
    return Neg(bound) if bound <= NEG_KEPT else None


@dataclass(frozen=True)
class Axis:
    """Dim `dim` holds the sequence (size outer * S * inner); `fill`: what is known at its padded positions."""

    dim: int
    fill: Any = None
    iota: bool = False
    inner: Any = ONE
    outer: Any = ONE

    def at(self, dim: int) -> "Axis":
        return replace(self, dim=dim)

    @property
    def plain(self) -> bool:
        return self.inner == 1 and self.outer == 1


@dataclass(frozen=True)
class Seq:
    """The same at the real positions in both runs; `axes` hold the sequence. `value`: the one value every
    element holds, where known (axis-free constants)."""

    axes: tuple[Axis, ...] = ()
    value: Const | None = None

    def get(self, dim: int) -> Axis | None:
        return next((a for a in self.axes if a.dim == dim), None)


@dataclass(frozen=True)
class Lost:
    """Not proven the same at the real positions: why, with the model's line."""

    why: str


CLEAN = Seq()
LENGTH = "length"


@dataclass
class Verdict:
    """What the analysis proved: padding changes no output at the real positions (True), or not proven (False,
    with the op and line that lost it; None: no graph, or the padded dim did not stay symbolic), and why."""

    proven: bool | None
    why: str
    reached: dict[str, str] = field(default_factory=dict)   # node -> "sum over the sequence at model.py:12 (...)"
    unknown_ops: list[str] = field(default_factory=list)


def padded_verdict(model: torch.nn.Module, signature: Signature, exported: Exported, flat: Sequence[Any],
                   pad: Mapping[str, float]) -> tuple[bool, str]:
    """Whether a server may pad requests of different lengths into one call (`pad`: each input's pad value):
    proven from the graph (`padding_verdict`), then confirmed by eager on each item of the example `flat` alone
    and padded (`probes.padding_independence`), which can only take the proof back. Not proven is not padded."""
    graph = padding_verdict(exported, signature, pad)
    if graph.proven is not True:
        return False, graph.why
    probed, why = padding_independence(model, signature, flat, pad)
    if not probed:
        return False, (f"eager answers an item otherwise padded ({why}), although the graph analysis proved the "
                       "padding harmless: please report this model")
    return True, f"{graph.why}; confirmed by eager: {why}"


def padding_verdict(exported: Exported, signature: Signature, pad: Mapping[str, float]) -> Verdict:
    """Follow the padded dim (the non-batch dynamic dim of the inputs in `pad`) through `exported`'s graph, each
    padded input holding its pad value at padded positions (see the module's docstring)."""
    dims = _padded_dims(signature, pad)
    if not dims:
        return Verdict(True, "nothing is padded")
    if len(dims) > 1:
        return Verdict(None, f"padding along several dims ({', '.join(sorted(dims))}) is not analysed")
    dim = dims.pop()
    if exported.program is None:
        return Verdict(None, f"torch.export could not export the model ({exported.failure}), so nothing is proven "
                             "about its padding")
    length = exported.symbols.get(dim)
    if length is None:
        return Verdict(None, f"torch.export made the padded dim {dim!r} a constant, so nothing is proven about "
                             "its padding")
    states: dict[Any, Any] = {}
    for node, spec in zip(user_inputs(exported.program), signature.inputs):
        axes = []
        for d, name in enumerate(spec.shape):
            if name == dim:
                if spec.name not in pad:
                    return Verdict(False, f"input {spec.name!r} has the padded dim {dim!r} but no pad value")
                axes.append(Axis(d, _cast(pad[spec.name], spec.dtype)))
        states[node] = Seq(tuple(axes))
    walk = _Walk(length)
    walk.run(exported.program.graph_module, _with_constants(exported.program, states))
    for node, spec in zip(user_outputs(exported.program), signature.outputs):
        state = states.get(node, CLEAN)
        if isinstance(state, Lost):
            return Verdict(False, f"{spec.name} is not proven the same padded: {state.why}", walk.reached,
                           walk.unknown)
        if not isinstance(state, Seq):
            return Verdict(False, f"{spec.name} is the padded length itself", walk.reached, walk.unknown)
        named = {d for d, n in enumerate(spec.shape) if n == dim}
        if {a.dim for a in state.axes} != named or not all(a.plain for a in state.axes):
            return Verdict(False, f"{spec.name} holds the sequence at other dims than the signature names {dim!r} "
                                  "(a server cuts each request's answer back along those)", walk.reached, walk.unknown)
    count = len(walk.reached)
    return Verdict(True, f"proven from the graph: the mask reaches {'each of the ' if count > 1 else 'the '}"
                         f"{count} reduction{'s' if count != 1 else ''} over {dim!r} and no op reads the padding "
                         "otherwise" if count else
                         f"proven from the graph: no op of the model reduces over {dim!r} or reads its padding",
                   walk.reached, walk.unknown)


def masks_by_flow(exported: Exported, signature: Signature, flat: Sequence[Any]) -> dict[str, tuple[str, str]]:
    """The padding masks among the inputs by where they flow: input name -> (meaning, where it masks). A
    candidate is an integer or bool input of shape (batch, sequence), both dynamic, holding only 0 and 1 in the
    example `flat`; it is a mask with meaning "keep" (0 marks padding) or "pad" (1 marks padding) when, given
    that value at padded positions, it makes some reduction over the sequence or some attention's keys hold
    their identity there (`padding_verdict`'s "reaches") that the other inputs do not make so alone."""
    program = exported.program
    if program is None:
        return {}
    found: dict[str, tuple[str, str]] = {}
    baselines: dict[str, dict[str, str]] = {}
    nodes = user_inputs(program)
    for spec in mask_candidates(signature, flat):
        dim = spec.shape[1]
        if dim not in exported.symbols:
            continue
        hits = {}
        for meaning, value in (("keep", 0), ("pad", 1)):
            reached = _flow_walk(exported, signature, nodes, dim, spec.name, _cast(value, spec.dtype))
            if reached:
                if dim not in baselines:
                    baselines[dim] = _flow_walk(exported, signature, nodes, dim, None, None)
                new = [where for node, where in reached.items() if node not in baselines[dim]]
                if new:
                    hits[meaning] = new[0]
        if len(hits) == 1:
            found[spec.name] = next(iter(hits.items()))
    return found


def mask_candidates(signature: Signature, flat: Sequence[Any]) -> list[TensorSpec]:
    """The inputs that may be padding masks (`masks_by_flow` decides from the graph): integer or bool, of shape
    (batch, sequence) with both dims dynamic, holding only 0 and 1 in the example `flat`."""
    if signature.batch is None:
        return []
    found = []
    for spec, x in zip(signature.inputs, flat):
        if mask_problem(signature.inputs, {spec.name: "keep"}) is not None or not _binary(x):
            continue
        batch, dim = spec.shape
        if batch == signature.batch and isinstance(dim, str) and dim != batch:
            found.append(spec)
    return found


def _flow_walk(exported: Exported, signature: Signature, nodes: list[Any], dim: str, name: str | None,
               fill: Const | None) -> dict[str, str]:
    """The reductions over `dim` the walk finds reached when input `name` holds `fill` at padded positions and
    every other input is unknown there."""
    states: dict[Any, Any] = {}
    for node, spec in zip(nodes, signature.inputs):
        states[node] = Seq(tuple(Axis(d, fill if spec.name == name else None)
                                 for d, n in enumerate(spec.shape) if n == dim))
    walk = _Walk(exported.symbols[dim])
    walk.run(exported.program.graph_module, _with_constants(exported.program, states))
    return walk.reached


def _padded_dims(signature: Signature, pad: Mapping[str, float]) -> set[str]:
    return {d for spec in signature.inputs if spec.name in pad for d in spec.shape
            if isinstance(d, str) and d != signature.batch}


def _binary(x: Any) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    if x.dtype == torch.bool:
        return True
    return bool(((x == 0) | (x == 1)).all())


def _cast(value: Any, dtype: torch.dtype) -> Const:
    return Const(torch.tensor(value).to(dtype).item())


def _with_constants(program: Any, states: dict[Any, Any]) -> dict[Any, Any]:
    """`states` with the single-element constants, buffers and parameters of the program known by value."""
    sig = program.graph_signature
    names = {**getattr(sig, "inputs_to_lifted_tensor_constants", {}), **sig.inputs_to_buffers,
             **sig.inputs_to_parameters}
    tensors = {**program.state_dict, **getattr(program, "constants", {})}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            t = tensors.get(names[node.name])
            if isinstance(t, torch.Tensor) and t.numel() == 1:
                states[node] = Seq(value=Const(t.reshape(()).item()))
    return states


# -- fills ----------------------------------------------------------------------------------------------------
def _bound(fill: Any) -> float | None:
    """The most a fill can be where it is a masking bias (Neg, or a constant at most NEG_LIMIT); else None."""
    if isinstance(fill, Neg):
        return fill.bound
    if isinstance(fill, Const) and not isinstance(fill.value, bool) and isinstance(fill.value, (int, float)) \
            and fill.value <= NEG_LIMIT:
        return float(fill.value)
    return None


def _is(fill: Any, value: Any) -> bool:
    return isinstance(fill, Const) and fill.value == value


def _finite(fill: Any) -> bool:
    """Known finite, or unknown (None: taken to be finite)."""
    return fill is None or (isinstance(fill, Const) and math.isfinite(float(fill.value)))


def _unknown(*fills: Any) -> Any:
    """What is known of a value computed from these fills by an op the analysis does not follow: nothing (None,
    taken to be finite), or not even that (ANY) where one of them may be infinite or NaN."""
    return None if all(_finite(f) for f in fills) else ANY


def _zero_fills(fills: Sequence[Any]) -> bool:
    """Some fill is exactly zero and every other is finite: their product is zero."""
    return any(_is(f, 0) for f in fills) and all(_finite(f) for f in fills)


def _describe(fill: Any) -> str:
    if isinstance(fill, Const):
        return f"{fill.value!r}"
    if isinstance(fill, Neg):
        return f"at most {fill.bound:g}"
    if fill == ANY:
        return "values that may be infinite or NaN"
    return "values computed from the padding"


def _zero(dtype: torch.dtype) -> Const:
    return Const(False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0)


class _Lose(Exception):
    """An op loses the proof: the message says how."""


# -- the pass -------------------------------------------------------------------------------------------------
class _Walk(GraphWalk):
    """The padded length followed through a graph, node by node (`GraphWalk`)."""

    initial = CLEAN
    in_place_writes = True

    def __init__(self, length: Any):
        super().__init__()
        self.length = length
        self.equal: dict[Any, Any] = {}     # sizes the graph asserts equal to a symbol (Min(64, S) == S)
        self.reached: dict[str, str] = {}
        self.unknown: list[str] = []

    def step(self, module: torch.fx.GraphModule, node: Any, states: dict[Any, Any]) -> Any:
        val = node_value(node)
        if node.target is _ASSERT:
            self.asserted(node.args[0])
        if node.target in SYMBOLIC or (isinstance(val, _SYM) and node.target not in _RULES):
            return LENGTH if self.has_length(val) else CLEAN      # a size: whatever the values it was read from
        inputs = [self.state(a, states) for a in leaves((node.args, node.kwargs))]
        lost = next((s for s in inputs if isinstance(s, Lost)), None)
        if lost is not None:
            return self.out(node, lost)
        if node.target in WRAPPERS:
            try:
                return self.wrapped(module, node, states)
            except _Lose as e:
                return self.lose(node, str(e))
        rule = _RULES.get(node.target) or (_pointwise if is_pointwise(node.target) else None)
        if all(isinstance(s, Seq) and not s.axes for s in inputs) and not self.seq_sized(node):
            if rule is _pointwise and any(s.value is not None for s in inputs):
                return rule(self, node, states)      # a constant of the model, computed on
            return self.out(node, CLEAN)
        if LENGTH in inputs and node.target not in SHAPE_OPS:
            return self.lose(node, f"{op_name(node.target)} computes with the padded length as a value")
        if rule is None:
            name = op_name(node.target)
            if name not in self.unknown:
                self.unknown.append(name)
            return self.lose(node, f"{name} has no rule in the padding analysis (an op it does not know is not "
                                   "proven)")
        try:
            return self.checked(node, rule(self, node, states))
        except _Lose as e:
            return self.lose(node, str(e))

    def asserted(self, condition: Any) -> None:
        """Learn `a == symbol` from a runtime assertion of the graph (position ids sliced from a buffer of 64 are
        Min(64, S) long, and the graph asserts that equals S)."""
        expr = getattr(getattr(node_value(condition), "node", None), "expr", None)
        if isinstance(expr, sympy.Eq):
            for a, b in ((expr.lhs, expr.rhs), (expr.rhs, expr.lhs)):
                if isinstance(b, sympy.Symbol) and not isinstance(a, sympy.Symbol):
                    self.equal[a] = b

    def size(self, value: Any) -> Any:
        """A size as a sympy expression, simplified by what the graph asserts."""
        expr = size_expr(value)
        return expr.xreplace(self.equal) if self.equal else expr

    def lose(self, node: Any, why: str) -> Any:
        return self.out(node, Lost(f"{why}{source_line(node)}"))

    def reach(self, node: Any, what: str) -> None:
        self.reached.setdefault(node.name, f"{what}{source_line(node)}")

    # -- helpers for the rules ---------------------------------------------------------------------------
    def state(self, value: Any, states: dict[Any, Any]) -> Any:
        if isinstance(value, torch.fx.Node):
            return states.get(value, CLEAN)
        if isinstance(value, _SYM):
            return LENGTH if self.has_length(value) else CLEAN
        return CLEAN

    def seq(self, value: Any, states: dict[Any, Any]) -> Seq:
        """The state of a tensor argument (CLEAN for None or a number)."""
        s = self.state(value, states)
        if not isinstance(s, Seq):
            raise _Lose(f"an argument is {'the padded length' if s == LENGTH else s}")
        return s

    def has_length(self, value: Any) -> bool:
        if isinstance(value, _SYM):
            return self.length in value.node.expr.free_symbols
        if isinstance(value, (list, tuple)):
            return any(self.has_length(v) for v in value)
        return False

    def seq_sized(self, node: Any) -> bool:
        return any(self.size(size).has(self.length) for t in tensors_of(node_value(node)) for size in t.shape)

    def out(self, node: Any, state: Any) -> Any:
        val = node_value(node)
        return [state] * len(val) if isinstance(val, (list, tuple)) else state

    def sizes(self, node_or_val: Any) -> list[Any]:
        val = node_value(node_or_val) if isinstance(node_or_val, torch.fx.Node) else node_or_val
        return [self.size(s) for s in val.shape]

    def checked(self, node: Any, state: Any) -> Any:
        """`state` after checking it against the node's sizes: each axis is a dim of size outer * S * inner, and
        every dim whose size involves S is an axis."""
        vals = node_value(node)
        many = isinstance(vals, (list, tuple))
        for s, v in zip(state if many else [state], vals if many else [vals]):
            if not (isinstance(s, Seq) and isinstance(v, torch.Tensor)):
                continue
            shape = self.sizes(v)
            dims = [a.dim for a in s.axes]
            if len(set(dims)) != len(dims) or any(a.dim >= len(shape) or
                                                  not same_size(shape[a.dim], a.outer * self.length * a.inner)
                                                  for a in s.axes) or \
                    any(size.has(self.length) for d, size in enumerate(shape) if d not in dims):
                raise _Lose(f"{op_name(node.target)} leaves the sequence out of line (a dim whose size involves the "
                            "padded length holds no whole sequence)")
        return state

    def made(self, node: Any, fill: Any, like: Seq | None = None) -> Seq:
        """A tensor made from sizes alone, `fill` everywhere (its axes those of `like`, where given)."""
        if like is not None:
            return Seq(tuple(replace(a, fill=fill, iota=False) for a in like.axes))
        axes = []
        for d, size in enumerate(self.sizes(node)):
            if size.has(self.length):
                inner = whole(size / self.length, self.length)
                if inner is None:
                    raise _Lose(f"{op_name(node.target)} makes a tensor sized by the padded length otherwise than "
                                "as a whole sequence")
                axes.append(Axis(d, fill, inner=inner))
        return Seq(tuple(axes), fill if not axes and isinstance(fill, Const) else None)


def _packet(target: Any) -> str:
    """The op's name without its overload and without the trailing _ of an in-place op (mul_ -> mul)."""
    name = getattr(target, "_opname", "")
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


# -- rules ----------------------------------------------------------------------------------------------------
# A rule takes (walk, node, states) and returns the node's state (a list for a node that gives several tensors);
# it raises _Lose where the op may read the padding. A node whose inputs are all CLEAN and whose values have no
# dim sized by the padded length never reaches a rule.
Rule = Callable[[_Walk, Any, dict], Any]
_RULES: dict[Any, Rule] = {}


def _rule(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            if op is not None:
                _RULES[op] = fn
        return fn
    return register


@dataclass(frozen=True)
class _Arg:
    """An argument of a pointwise op, seen at one output dim's padded positions: its fill there, and its dtype
    (None for a Python number)."""

    fill: Any
    dtype: torch.dtype | None


def _pointwise(walk: _Walk, node: Any, states: dict) -> Any:
    """Broadcasting elementwise ops: an axis of any argument is an axis of the output (arguments lined up along
    it the same way); its fill is computed from the arguments' fills there (`_fill`)."""
    if _packet(node.target) in ("dropout", "feature_dropout") and arg_of(node, 2, "train", False):
        raise _Lose("dropout in training mode")
    rank = rank_of(node)
    lined: dict[int, list[Axis]] = {}
    for a in leaves((node.args, node.kwargs)):
        if isinstance(a, torch.fx.Node) and isinstance(node_value(a), torch.Tensor):
            for ax in walk.seq(a, states).axes:
                lined.setdefault(ax.dim + rank - rank_of(a), []).append(ax)
    axes = []
    for dim, found in sorted(lined.items()):
        first = found[0]
        if any(not (same_size(f.inner, first.inner) and same_size(f.outer, first.outer)) for f in found):
            raise _Lose(f"{op_name(node.target)} lines up positions of the sequence with other entries")
        args, kwargs = _fills_at(walk, node, states, dim, rank)
        axes.append(Axis(dim, _fill(node, args, kwargs), _keeps_iota(node, args, found), first.inner, first.outer))
    if axes:
        return Seq(tuple(axes))
    args, kwargs = _fills_at(walk, node, states, None, rank)
    value = _fill(node, args, kwargs)
    return Seq(value=value if isinstance(value, Const) else None)


def _fills_at(walk: _Walk, node: Any, states: dict, dim: int | None, rank: int) -> tuple[list, dict]:
    """The node's arguments with each tensor and number replaced by an _Arg: its fill at the positions padded
    along output dim `dim` (the known value of an axis-free constant; None: unknown)."""
    def one(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            v = node_value(a)
            if not isinstance(v, torch.Tensor):
                return _Arg(None, None)
            s = walk.state(a, states)
            ax = s.get(dim - (rank - v.dim())) if isinstance(s, Seq) and dim is not None else None
            return _Arg(ax.fill if ax is not None else s.value if isinstance(s, Seq) and not s.axes else None,
                        v.dtype)
        if isinstance(a, (bool, int, float)):
            return _Arg(Const(a), None)
        if isinstance(a, (list, tuple)):
            return type(a)(one(x) for x in a)
        return a
    return [one(a) for a in node.args], {k: one(v) for k, v in node.kwargs.items()}


def _fill(node: Any, args: list, kwargs: dict) -> Any:
    """An elementwise op's output at positions where its arguments hold `args`' fills: computed exactly when
    every one is a constant, else by the op's absorbing elements (x * 0, x + -inf, where on a constant
    condition, ...); None when unknown."""
    found = [a for a in leaves((args, kwargs)) if isinstance(a, _Arg)]
    if found and all(isinstance(a.fill, Const) for a in found):
        return _evaluated(node, args, kwargs)
    dtype = node_value(node).dtype
    name = _packet(node.target)
    f = [a.fill if isinstance(a, _Arg) else None for a in args]
    f += [None] * (3 - len(f))
    if name in ("mul", "logical_and", "__and__", "bitwise_and"):
        if _zero_fills(f[:2]):
            return _zero(dtype)
        if name == "mul":
            for x, y in ((f[0], f[1]), (f[1], f[0])):
                if _bound(x) is not None and isinstance(y, Const) and not isinstance(y.value, bool) and y.value > 0:
                    return _neg(_bound(x) * y.value)
    if name in ("logical_or", "__or__", "bitwise_or") and any(isinstance(x, Const) and x.value for x in f[:2]):
        return Const(True if dtype == torch.bool else 1)
    if name in ("add", "sub", "rsub") and _is(_arg_fill(kwargs, args, 2, "alpha"), 1):
        a, b = (f[1], f[0]) if name == "rsub" else (f[0], f[1])      # the result is a + b, or a - b
        return _sum_fill(a, b, minus=name != "add")
    if name == "div" and _bound(f[0]) is not None and isinstance(f[1], Const) and not isinstance(f[1].value, bool) \
            and 0 < f[1].value < math.inf:
        return _neg(_bound(f[0]) / f[1].value)
    if name == "where" and isinstance(f[0], Const):
        return f[1] if f[0].value else f[2]
    if name == "masked_fill" and isinstance(f[1], Const):
        return f[2] if f[1].value else f[0]
    if name in ("where", "masked_fill"):
        # the condition is unknown here: each element is either branch. A masking bias among them makes a row
        # -inf whole only where the condition masks the row's dim too, and then it is known along it (a fill).
        branches = (f[1], f[2]) if name == "where" else (f[0], f[2])
        return _unknown(*(b for b in branches if _bound(b) is None))
    if name in ("exp", "sigmoid") and _bound(f[0]) is not None:
        return _zero(dtype)
    if name in _COPIES and _bound(f[0]) is not None and dtype.is_floating_point:
        return _neg(_bound(f[0]))
    return _unknown(*(a.fill for a in found))


def _sum_fill(a: Any, b: Any, minus: bool = False) -> Any:
    """The fill of a + b (a - b): a masking bias plus anything finite stays one."""
    for x, y in ((a, b), (b, a)) if not minus else ((a, b),):
        if _bound(x) is not None and _finite(y):
            if _is(x, -math.inf):
                return Const(-math.inf)
            return _neg(_bound(x) + (ASSUMED_BOUND if y is None else -y.value if minus else y.value))
    return None


def _arg_fill(kwargs: dict, args: list, index: int, name: str) -> Any:
    a = args[index] if len(args) > index else kwargs.get(name, _Arg(Const(1), None))
    return a.fill if isinstance(a, _Arg) else Const(a)


_COPIES = ("to", "_to_copy", "type_as", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "dropout",
           "feature_dropout")


def _evaluated(node: Any, args: list, kwargs: dict) -> Const | None:
    """The op run on its constant fills (a tensor argument as a 0-dim tensor of its dtype)."""
    def real(a: Any) -> Any:
        if isinstance(a, _Arg):
            return a.fill.value if a.dtype is None else torch.tensor(a.fill.value, dtype=a.dtype)
        if isinstance(a, (list, tuple)):
            return type(a)(real(x) for x in a)
        return a
    try:
        with torch.no_grad():
            out = node.target(*[real(a) for a in args], **{k: real(v) for k, v in kwargs.items()})
    except Exception:       # the op refuses a 0-dim stand-in: the fill stays unknown
        return None
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return Const(out.reshape(()).item())
    return None


def _keeps_iota(node: Any, args: list, found: list[Axis]) -> bool:
    """A copy of the positions (a conversion, + 0) is still the positions."""
    if len(found) != 1 or not found[0].iota or node_value(node).dtype == torch.bool:
        return False
    name = _packet(node.target)
    if name in _COPIES:
        return True
    return name in ("add", "sub") and len(args) > 1 and isinstance(args[1], _Arg) and args[1].dtype is None \
        and _is(args[1].fill, 0)


_rule(*aten_ops("to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy", "type_as", "contiguous", "clone",
                "detach", "alias", "lift_fresh_copy", "dropout", "feature_dropout", "masked_fill.Scalar",
                "masked_fill.Tensor", "masked_fill_.Scalar", "masked_fill_.Tensor", "where.self", "where.ScalarSelf",
                "where.ScalarOther", "where.Scalar", "__and__.Tensor", "__or__.Tensor", "bitwise_and.Tensor",
                "bitwise_or.Tensor", "logical_and", "logical_or", "add_.Tensor", "mul_.Tensor", "sub_.Tensor",
                "div_.Tensor", "relu_", "clamp_", "clamp_min_"))(_pointwise)


@_rule(*aten_ops("zeros", "ones", "full", "new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like",
                 "scalar_tensor", "fill.Scalar", "fill_.Scalar"))
def _made(walk: _Walk, node: Any, states: dict) -> Any:
    """A tensor made from sizes, one value everywhere."""
    name = _packet(node.target)
    value = {"zeros": 0, "new_zeros": 0, "zeros_like": 0, "ones": 1, "new_ones": 1, "ones_like": 1,
             "full": arg_of(node, 1, "fill_value"), "new_full": arg_of(node, 2, "fill_value"),
             "full_like": arg_of(node, 1, "fill_value"), "scalar_tensor": node.args[0],
             "fill": arg_of(node, 1, "value")}[name]
    if not isinstance(value, (bool, int, float)):
        raise _Lose(f"{op_name(node.target)} fills a tensor with a value the analysis does not know")
    fill = _cast(value, node_value(node).dtype)
    like = walk.seq(node.args[0], states) if name.endswith("_like") or name == "fill" else None
    return walk.made(node, fill, like)


@_rule(aten_op("arange"), aten_op("arange.start"), aten_op("arange.start_step"))
def _arange(walk: _Walk, node: Any, states: dict) -> Any:
    """torch.arange(S): the positions themselves."""
    values = [node_value(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
    start, end, step = (0, values[0], 1) if len(values) == 1 else (values[0], values[1], 1) if len(values) == 2 \
        else values[:3]
    if start == 0 and step == 1 and isinstance(end, _SYM) and same_size(walk.size(end), walk.length):
        return Seq((Axis(0, None, iota=True),))
    raise _Lose("numbers positions by the padded length")


@_rule(*aten_ops("view", "reshape", "_unsafe_view", "view_copy", "flatten.using_ints", "unflatten.int", "squeeze",
                 "squeeze.dim", "squeeze.dims", "unsqueeze", "unsqueeze_copy", "squeeze_copy.dim"))
def _view(walk: _Walk, node: Any, states: dict) -> Any:
    """A reshape keeps the flat order: a sequence axis lands on the output dim j whose dims before it hold what
    was before it (times a whole `outer`), with the sequence as its leading factor."""
    s = walk.seq(node.args[0], states)
    before, out = walk.sizes(node.args[0]), walk.sizes(node)
    axes = []
    for ax in s.axes:
        ahead = ax.outer * sympy.Mul(*before[:ax.dim])
        behind = ax.inner * sympy.Mul(*before[ax.dim + 1:])
        for j, size in enumerate(out):
            outer = whole(ahead / sympy.Mul(*out[:j]), walk.length)
            inner = None if outer is None else whole(size / (outer * walk.length), walk.length)
            if inner is not None and same_size(inner * sympy.Mul(*out[j + 1:]), behind):
                axes.append(Axis(j, ax.fill, ax.iota and inner == 1 and outer == 1, inner, outer))
                break
        else:
            raise _Lose(f"{op_name(node.target)} merges the sequence with another dim so that no dim keeps it whole")
    return Seq(tuple(sorted(axes, key=lambda a: a.dim)), s.value)


@_rule(aten_op("permute"), aten_op("permute_copy"))
def _permute(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.seq(node.args[0], states)
    order = [d % len(node.args[1]) for d in node.args[1]]
    return _moved(s, lambda d: order.index(d))


def _moved(s: Seq, where: Callable[[int], int]) -> Seq:
    return Seq(tuple(sorted((a.at(where(a.dim)) for a in s.axes), key=lambda a: a.dim)), s.value)


@_rule(aten_op("transpose.int"), aten_op("swapaxes"), aten_op("t"), aten_op("numpy_T"))
def _transpose(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.seq(node.args[0], states)
    rank = rank_of(node)
    if node.target is aten_op("numpy_T"):
        return _moved(s, lambda d: rank - 1 - d)
    a, b = (node.args[1] % rank, node.args[2] % rank) if len(node.args) > 2 else (0, 1) if rank == 2 else (0, 0)
    return _moved(s, lambda d: b if d == a else a if d == b else d)


@_rule(aten_op("movedim.int"))
def _movedim(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.seq(node.args[0], states)
    rank = rank_of(node)
    order = list(range(rank))
    order.insert(node.args[2] % rank, order.pop(node.args[1] % rank))
    return _moved(s, lambda d: order.index(d))


@_rule(aten_op("expand"), aten_op("expand_copy"), aten_op("broadcast_to"), aten_op("expand_as"))
def _expand(walk: _Walk, node: Any, states: dict) -> Any:
    """Broadcast: axes keep their place from the right; a dim stretched to the sequence repeats one value along
    it (the same in both runs; unknown at padding)."""
    s = walk.seq(node.args[0], states)
    shift = rank_of(node) - rank_of(node.args[0])
    axes = [a.at(a.dim + shift) for a in s.axes]
    taken = {a.dim for a in axes}
    for d, size in enumerate(walk.sizes(node)):
        if d not in taken and size.has(walk.length):
            inner = whole(size / walk.length, walk.length)
            if inner is None:
                raise _Lose(f"{op_name(node.target)} stretches a value over a dim that is no whole sequence")
            axes.append(Axis(d, s.value, inner=inner))
    return Seq(tuple(sorted(axes, key=lambda a: a.dim)), s.value if not axes else None)


@_rule(*aten_ops("slice.Tensor", "slice_copy.Tensor", "narrow"))
def _slice(walk: _Walk, node: Any, states: dict) -> Any:
    """The whole sequence keeps it; a slice of it by position number reads positions a short item lacks (or
    drops real ones). A slice of another value's dim, from a fixed start and the padded length long, becomes a
    sequence axis (position ids from a buffer): the same at every position in both runs."""
    s = walk.seq(node.args[0], states)
    rank = rank_of(node.args[0])
    dim = arg_of(node, 1, "dim", 0) % rank
    narrow = node.target is aten_op("narrow")
    start = node_value(arg_of(node, 2, "start", 0))
    start = 0 if start is None else start
    step = 1 if narrow else node_value(arg_of(node, 4, "step", 1))
    end = node_value(arg_of(node, 3, "length" if narrow else "end"))
    ax = s.get(dim)
    size = walk.sizes(node.args[0])[dim]
    if ax is not None:
        if start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= 2 ** 62 and not narrow) or
                                         same_size(walk.size(end), size)):
            return s
        raise _Lose(f"{op_name(node.target)} slices the sequence by position number (a short item lacks those "
                    "positions, or has real ones it drops)")
    out = walk.sizes(node)[dim]
    if out.has(walk.length):
        if isinstance(start, _SYM) and walk.has_length(start) or step != 1 or not same_size(out, walk.length):
            raise _Lose(f"{op_name(node.target)} slices a dim by the padded length otherwise than from a fixed start")
        return Seq(tuple(sorted(s.axes + (Axis(dim, None),), key=lambda a: a.dim)))
    return s


@_rule(aten_op("select.int"), aten_op("select_copy.int"))
def _select(walk: _Walk, node: Any, states: dict) -> Any:
    """The first position of the sequence is real in every item ([CLS]); any other by number is not."""
    s = walk.seq(node.args[0], states)
    dim = node.args[1] % rank_of(node.args[0])
    ax = s.get(dim)
    if ax is not None and not (ax.plain and node.args[2] == 0):
        raise _Lose("selects a position of the sequence by its number (from the end, or one a short item lacks)")
    return Seq(tuple(a.at(a.dim - (a.dim > dim)) for a in s.axes if a.dim != dim), s.value)


@_rule(aten_op("cat"), aten_op("concat"))
def _cat(walk: _Walk, node: Any, states: dict) -> Any:
    dim = arg_of(node, 1, "dim", 0) % rank_of(node)
    parts = [walk.seq(t, states) for t in node.args[0]]
    if any(p.get(dim) for p in parts):
        raise _Lose("concatenates along the sequence (what follows it moves with the padded length)")
    return _joined(node, parts, lambda a: a.dim)


def _joined(node: Any, parts: list[Seq], where: Callable[[Axis], int]) -> Seq:
    """The axes shared by values put side by side (cat, stack): each part must have them the same way."""
    first = parts[0]
    for p in parts[1:]:
        if [(a.dim, a.inner, a.outer) for a in p.axes] != [(a.dim, a.inner, a.outer) for a in first.axes]:
            raise _Lose(f"{op_name(node.target)} puts values with the sequence at different dims side by side")
    axes = []
    for a in first.axes:
        fills = {p.get(a.dim).fill for p in parts}
        axes.append(Axis(where(a), fills.pop() if len(fills) == 1 else None, inner=a.inner, outer=a.outer))
    return Seq(tuple(axes))


@_rule(aten_op("stack"))
def _stack(walk: _Walk, node: Any, states: dict) -> Any:
    dim = arg_of(node, 1, "dim", 0) % rank_of(node)
    return _joined(node, [walk.seq(t, states) for t in node.args[0]], lambda a: a.dim + (dim <= a.dim))


@_rule(*aten_ops("split.Tensor", "split_with_sizes", "chunk", "unsafe_split.Tensor", "tensor_split.sections",
                 "tensor_split.indices", "unsafe_split_with_sizes", "split_with_sizes_copy", "unbind.int"))
def _split(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.seq(node.args[0], states)
    unbind = node.target is aten_op("unbind.int")
    dim = arg_of(node, 1 if unbind else 2, "dim", 0) % rank_of(node.args[0])
    if s.get(dim) is not None:
        raise _Lose("splits the sequence into parts by position number")
    state = Seq(tuple(a.at(a.dim - (a.dim > dim)) for a in s.axes)) if unbind else s
    return [state] * len(node_value(node))


@_rule(operator.getitem)
def _getitem(walk: _Walk, node: Any, states: dict) -> Any:
    s = states.get(node.args[0], CLEAN)
    return s[node.args[1]] if isinstance(s, list) else s


@_rule(aten_op("constant_pad_nd"), aten_op("pad"))
def _pad(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.seq(node.args[0], states)
    pad, rank = list(node.args[1]), rank_of(node.args[0])
    padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    if any(a.dim in padded for a in s.axes):
        raise _Lose("pads the sequence itself (its real positions move or meet the model's own padding)")
    value = arg_of(node, 2, "value", 0)
    return Seq(tuple(a if _is(a.fill, value) else replace(a, fill=_unknown(a.fill, Const(value)), iota=False)
                     for a in s.axes))


@_rule(aten_op("repeat"))
def _repeat(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.seq(node.args[0], states)
    repeats = [node_value(r) for r in node.args[1]]
    shift = len(repeats) - rank_of(node.args[0])
    if any(repeats[a.dim + shift] != 1 for a in s.axes):
        raise _Lose("tiles the sequence")
    return _moved(s, lambda d: d + shift)


@_rule(aten_op("index_select"))
def _index_select(walk: _Walk, node: Any, states: dict) -> Any:
    s, index = walk.seq(node.args[0], states), walk.seq(node.args[2], states)
    dim = node.args[1] % rank_of(node.args[0])
    ax = s.get(dim)
    if ax is not None:
        if not (ax.plain and index.axes and index.axes[0].iota):
            raise _Lose("index_select picks positions of the sequence by number")
        return s
    axes = tuple(a for a in s.axes) + tuple(Axis(dim, None) for _ in index.axes)
    return Seq(tuple(sorted(axes, key=lambda a: a.dim)))


@_rule(aten_op("gather"))
def _gather(walk: _Walk, node: Any, states: dict) -> Any:
    """out[..., j, ...] = src[..., index[..., j, ...], ...] along `dim`: indices that are the same in both runs
    pick from a src without the sequence there."""
    s, index = walk.seq(node.args[0], states), walk.seq(node.args[2], states)
    dim = node.args[1] % rank_of(node.args[0])
    if s.get(dim) is not None:
        raise _Lose("gathers along the sequence by computed positions")
    if any(not index.get(a.dim) or (index.get(a.dim).inner, index.get(a.dim).outer) != (a.inner, a.outer)
           for a in s.axes):
        raise _Lose("gathers from the sequence with indices that do not follow it")
    return Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in index.axes))


@_rule(aten_op("index.Tensor"))
def _index(walk: _Walk, node: Any, states: dict) -> Any:
    """Advanced indexing: the sequence of the source may be indexed by the positions themselves (an iota along
    the sequence, as Hugging Face's masks do: `mask[batch_idx, kv_idx]`); any other index must be the same in
    both runs, and indexes other dims (the padding of one row is its own: rows are proven apart elsewhere)."""
    s = walk.seq(node.args[0], states)
    indices = list(node.args[1])
    where = [k for k, i in enumerate(indices) if i is not None]
    if any(node_value(indices[k]).dtype == torch.bool for k in where):
        raise _Lose("indexes with a boolean mask (the result's size depends on the values)")
    r = max(rank_of(indices[k]) for k in where)
    adjacent = where == list(range(where[0], where[0] + len(where)))
    first = where[0] if adjacent else 0
    others = [d for d in range(rank_of(node.args[0])) if d not in where]

    def placed(d: int) -> int:      # where a dim of the source that is not indexed lands
        return (d if d < where[0] else d - len(where) + r) if adjacent else r + others.index(d)

    axes: list[Axis] = []
    for k in where:
        index = walk.seq(indices[k], states)
        ax = s.get(k)
        if ax is not None:
            iota = [a for a in index.axes if a.iota]
            if not ax.plain or len(index.axes) != 1 or not iota:
                raise _Lose("indexes the sequence with positions other than its own")
            axes.append(Axis(first + iota[0].dim + r - rank_of(indices[k]), ax.fill))
        else:
            axes.extend(Axis(first + a.dim + r - rank_of(indices[k]), None, inner=a.inner, outer=a.outer)
                        for a in index.axes)
    axes.extend(a.at(placed(a.dim)) for a in s.axes if a.dim not in where)
    if len({a.dim for a in axes}) != len(axes):
        raise _Lose("indexes so that two sequences meet in one dim")
    return Seq(tuple(sorted(axes, key=lambda a: a.dim)))


@_rule(aten_op("embedding"))
def _embedding(walk: _Walk, node: Any, states: dict) -> Any:
    if walk.seq(node.args[0], states).axes:
        raise _Lose("an embedding table computed from the sequence")
    return Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in walk.seq(node.args[1], states).axes))


# -- reductions, normalizations, scans ------------------------------------------------------------------------
def _identity(kind: str, fill: Any) -> bool:
    """Whether padding holding `fill` adds nothing to a reduction of this kind."""
    bound = _bound(fill)
    return {"sum": _is(fill, 0), "max": bound is not None, "min": _is(fill, math.inf), "prod": _is(fill, 1),
            "any": isinstance(fill, Const) and not fill.value, "all": isinstance(fill, Const) and bool(fill.value),
            "lse": bound is not None}.get(kind, False)


_NEEDS = {"sum": "0", "max": f"-inf or at most {NEG_LIMIT:g}", "min": "+inf", "prod": "1", "any": "False",
          "all": "True", "lse": f"-inf or at most {NEG_LIMIT:g}"}


def _reduced(kind: str, fill: Any) -> Any:
    """What a reduction of this kind over other dims gives at positions padded along a kept axis."""
    if kind in ("max", "min", "any", "all", "mean") and (isinstance(fill, (Const, Neg))):
        return fill
    if kind in ("sum", "prod") and (_is(fill, 0) or (kind == "prod" and _is(fill, 1))):
        return fill
    return _unknown(fill)


def _reduce(walk: _Walk, node: Any, states: dict, dims: list[int] | None, keepdim: bool, kind: str) -> Any:
    """A reduction of its first argument over `dims` (None: all): over the sequence only where its padding
    holds the reduction's identity (the mask reaches it)."""
    s = walk.seq(node.args[0], states)
    if any(walk.seq(a, states).axes for a in leaves((node.args[1:], node.kwargs)) if isinstance(a, torch.fx.Node)):
        raise _Lose(f"{op_name(node.target)} takes parameters that hold the sequence")
    rank = rank_of(node.args[0])
    dims = list(range(rank)) if dims is None else dims
    kept = []
    for ax in s.axes:
        if ax.dim in dims:
            what = f"{op_name(node.target)} over the sequence (dim {ax.dim})"
            if kind == "mean":
                raise _Lose(f"{what} counts every position, padding included (a mean divides by the padded length; "
                            "mask it and divide by the mask's sum)")
            if kind not in _NEEDS:
                raise _Lose(f"{what} reads the padding: nothing masks a {kind} over it")
            if not _identity(kind, ax.fill):
                raise _Lose(f"{what} reads the padding: the mask does not reach it (it holds "
                            f"{_describe(ax.fill)} at padded positions, where {_NEEDS[kind]} would add nothing)")
            walk.reach(node, what)
        else:
            removed = 0 if keepdim else sum(1 for d in set(dims) if d < ax.dim)
            kept.append(Axis(ax.dim - removed, _reduced(kind, ax.fill), inner=ax.inner, outer=ax.outer))
    state = Seq(tuple(kept))
    val = node_value(node)
    if isinstance(val, (list, tuple)):      # (values, indices): the indices are no fill
        return [state] + [Seq(tuple(replace(a, fill=_unknown(a.fill)) for a in kept))] * (len(val) - 1)
    return state


def _reduction(kind: str, dim_index: int = 1, keep_index: int = 2) -> Rule:
    def rule(walk: _Walk, node: Any, states: dict) -> Any:
        dims = dims_of(arg_of(node, dim_index, "dim"), rank_of(node.args[0]))
        return _reduce(walk, node, states, dims, bool(arg_of(node, keep_index, "keepdim", False)), kind)
    return rule


_rule(*aten_ops("sum.dim_IntList", "nansum", "count_nonzero.dim_IntList"))(_reduction("sum"))
_rule(*aten_ops("amax", "max.dim", "argmax"))(_reduction("max"))
_rule(*aten_ops("amin", "min.dim", "argmin"))(_reduction("min"))
_rule(aten_op("prod.dim_int"))(_reduction("prod"))
_rule(*aten_ops("any.dim", "any.dims"))(_reduction("any"))
_rule(*aten_ops("all.dim", "all.dims"))(_reduction("all"))
_rule(aten_op("logsumexp"))(_reduction("lse"))
_rule(*aten_ops("mean.dim", "nanmean", "median.dim", "nanmedian.dim"))(_reduction("mean"))
_rule(aten_op("var.dim"), aten_op("std.dim"))(_reduction("mean", 1, 3))
_rule(*aten_ops("var.correction", "std.correction", "var_mean.correction", "std_mean.correction"))(
    lambda walk, node, states: _reduce(walk, node, states, dims_of(arg_of(node, 1, "dim"), rank_of(node.args[0])),
                                       bool(node.kwargs.get("keepdim", False)), "mean"))
_rule(aten_op("linalg_vector_norm"))(
    lambda walk, node, states: _reduce(walk, node, states, dims_of(arg_of(node, 2, "dim"), rank_of(node.args[0])),
                                       bool(arg_of(node, 3, "keepdim", False)), "sum"))
_rule(aten_op("sum"))(lambda walk, node, states: _reduce(walk, node, states, None, False, "sum"))
_rule(aten_op("max"))(lambda walk, node, states: _reduce(walk, node, states, None, False, "max"))
_rule(*aten_ops("min"))(lambda walk, node, states: _reduce(walk, node, states, None, False, "min"))
_rule(*aten_ops("mean", "std", "var"))(lambda walk, node, states: _reduce(walk, node, states, None, False, "mean"))
_rule(*aten_ops("prod", "any", "all"))(
    lambda walk, node, states: _reduce(walk, node, states, None, False, _packet(node.target)))


@_rule(*aten_ops("softmax.int", "_softmax", "log_softmax.int", "_log_softmax", "_safe_softmax"))
def _softmax(walk: _Walk, node: Any, states: dict) -> Any:
    """Softmax over the sequence weighs the padding at nothing only where it holds a masking bias; it then holds
    0 there (log_softmax: unknown). Along another padded dim, a row that is -inf whole gives NaN: ANY."""
    s = walk.seq(node.args[0], states)
    dim = node.args[1] % rank_of(node.args[0])
    ax = s.get(dim)
    if ax is None:
        return Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in s.axes))
    what = f"{op_name(node.target)} over the sequence (dim {dim})"
    if not _identity("lse", ax.fill):
        raise _Lose(f"{what} weighs the padding: the mask does not reach it (it holds {_describe(ax.fill)} at padded "
                    f"positions, where {_NEEDS['lse']} would weigh nothing)")
    walk.reach(node, what)
    logs = "log" in _packet(node.target)
    return Seq(tuple(replace(a, fill=_unknown(a.fill) if a.dim != dim or logs else _zero(node_value(node).dtype),
                             iota=False)
                     for a in s.axes))


@_rule(*aten_ops("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"))
def _scan(walk: _Walk, node: Any, states: dict) -> Any:
    """A scan along the sequence reads only earlier positions: real positions stay real (padding is last)."""
    s = walk.seq(node.args[0], states)
    dim = arg_of(node, 1, "dim") % rank_of(node.args[0])
    ax = s.get(dim)
    if ax is not None and ax.outer != 1:
        raise _Lose(f"{op_name(node.target)} scans a dim where the sequence repeats (later blocks read the padding)")
    state = Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in s.axes))
    return [state] * len(node_value(node)) if isinstance(node_value(node), (list, tuple)) else state


def _reorders(walk: _Walk, node: Any, states: dict, dims: list[int] | None, what: str) -> Any:
    s = walk.seq(node.args[0], states)
    if dims is None or any(a.dim in dims for a in s.axes):
        raise _Lose(f"{op_name(node.target)} {what} the sequence (positions move with the padded length)")
    state = Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in s.axes))
    return [state] * len(node_value(node)) if isinstance(node_value(node), (list, tuple)) else state


_rule(*aten_ops("sort", "argsort", "sort.stable", "argsort.stable"))(
    lambda walk, node, states: _reorders(walk, node, states, dims_of(arg_of(node, 1, "dim", -1), rank_of(node.args[0])),
                                         "sorts"))
_rule(aten_op("topk"))(lambda walk, node, states: _reorders(
    walk, node, states, dims_of(arg_of(node, 2, "dim", -1), rank_of(node.args[0])), "ranks"))
_rule(aten_op("flip"))(lambda walk, node, states: _reorders(walk, node, states, dims_of(node.args[1], rank_of(node)),
                                                            "reverses"))
_rule(aten_op("roll"))(lambda walk, node, states: _reorders(walk, node, states,
                                                            dims_of(arg_of(node, 2, "dims"), rank_of(node)),
                                                            "rolls"))


def _normalized(walk: _Walk, node: Any, states: dict, dims: list[int], what: str) -> Any:
    """A normalization over `dims` (weights must hold no sequence)."""
    s = walk.seq(node.args[0], states)
    if any(walk.seq(a, states).axes for a in leaves((node.args[1:], node.kwargs)) if isinstance(a, torch.fx.Node)):
        raise _Lose(f"{op_name(node.target)} takes parameters that hold the sequence")
    if any(a.dim in dims for a in s.axes):
        raise _Lose(f"{op_name(node.target)} {what} over the sequence, padding included")
    state = Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in s.axes))
    val = node_value(node)
    if isinstance(val, (list, tuple)):      # statistics beside the result keep its leading dims, or hold none
        return [state if isinstance(v, torch.Tensor) and v.dim() == val[0].dim() else CLEAN for v in val]
    return state


@_rule(aten_op("layer_norm"), aten_op("native_layer_norm"), aten_op("rms_norm"))
def _layer_norm(walk: _Walk, node: Any, states: dict) -> Any:
    rank = rank_of(node.args[0])
    return _normalized(walk, node, states, list(range(rank - len(node.args[1]), rank)), "normalizes")


@_rule(aten_op("group_norm"), aten_op("native_group_norm"))
def _group_norm(walk: _Walk, node: Any, states: dict) -> Any:
    return _normalized(walk, node, states, list(range(1, rank_of(node.args[0]))), "normalizes")


@_rule(aten_op("batch_norm"), aten_op("_native_batch_norm_legit_no_training"), aten_op("native_batch_norm"),
       aten_op("instance_norm"))
def _batch_norm(walk: _Walk, node: Any, states: dict) -> Any:
    training = {aten_op("batch_norm"): arg_of(node, 5, "training"),
                aten_op("native_batch_norm"): arg_of(node, 5, "training"),
                aten_op("instance_norm"): True}.get(node.target, False)
    rank = rank_of(node.args[0])
    return _normalized(walk, node, states, [d for d in range(rank) if d != 1] if training else [1], "normalizes")


# -- contractions -------------------------------------------------------------------------------------------
def _contract(walk: _Walk, node: Any, states: dict, labels: Sequence[str], output: str,
              operands: Sequence[Any]) -> Seq:
    """An einsum: a sequence summed over (a label not in the output) needs zeros at its padding in one operand;
    a sequence kept lands where its label does."""
    found: dict[str, list[Axis]] = {}
    for lab, a in zip(labels, operands):
        for ax in walk.seq(a, states).axes:
            found.setdefault(lab[ax.dim], []).append(ax)
    axes = []
    for letter, axs in found.items():
        fills = [a.fill for a in axs]
        if letter not in output:
            what = f"{op_name(node.target)} sums over the sequence"
            if not _zero_fills(fills):
                raise _Lose(f"{what} and reads the padding: the mask does not reach it (no operand holds 0 at padded "
                            f"positions: {', '.join(_describe(f) for f in fills)})")
            walk.reach(node, what)
            continue
        if any(not (same_size(a.inner, axs[0].inner) and same_size(a.outer, axs[0].outer)) for a in axs):
            raise _Lose(f"{op_name(node.target)} lines up positions of the sequence with other entries")
        others = [a.fill for lab, op in zip(labels, operands) for a in walk.seq(op, states).axes
                  if lab[a.dim] != letter]
        axes.append(Axis(output.index(letter), _zero(node_value(node).dtype) if _zero_fills(fills) else
                         _unknown(*fills, *others), inner=axs[0].inner, outer=axs[0].outer))
    return Seq(tuple(sorted(axes, key=lambda a: a.dim)))


@_rule(*aten_ops("matmul", "mm", "bmm", "mv", "dot", "vdot", "inner"))
def _matmul(walk: _Walk, node: Any, states: dict) -> Any:
    a, b = node.args[0], node.args[1]
    la, lb, out = matmul_labels(rank_of(a), rank_of(b))
    return _contract(walk, node, states, [la, lb], out, [a, b])


@_rule(aten_op("addmm"), aten_op("baddbmm"), aten_op("addmv"))
def _addmm(walk: _Walk, node: Any, states: dict) -> Any:
    """bias + a @ b: the product's axes and the bias's (broadcast), the fill that of their sum (an additive
    mask as the bias, as nn.MultiheadAttention adds it)."""
    bias, a, b = node.args[:3]
    la, lb, out = matmul_labels(rank_of(a), rank_of(b))
    product = _contract(walk, node, states, [la, lb], out, [a, b])
    scaled = node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1
    shift = len(out) - rank_of(bias)
    given = {a.dim + shift: a for a in walk.seq(bias, states).axes}
    axes = []
    for dim in sorted(set(given) | {a.dim for a in product.axes}):
        p, q = product.get(dim), given.get(dim)
        if p is not None and q is not None and (p.inner, p.outer) != (q.inner, q.outer):
            raise _Lose(f"{op_name(node.target)} lines up positions of the sequence with other entries")
        line = p or q
        fill = None if scaled else _sum_fill(p.fill if p else None, q.fill if q else None)
        axes.append(Axis(dim, fill, inner=line.inner, outer=line.outer))
    return Seq(tuple(axes))


@_rule(aten_op("einsum"))
def _einsum(walk: _Walk, node: Any, states: dict) -> Any:
    equation, operands = node.args[0].replace(" ", ""), list(node.args[1])
    if "..." in equation:
        raise _Lose("einsum with ... is not analysed for padding")
    given, arrow, output = equation.partition("->")
    labels = given.split(",")
    if not arrow:
        letters = "".join(labels)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return _contract(walk, node, states, labels, output, operands)


@_rule(aten_op("linear"))
def _linear(walk: _Walk, node: Any, states: dict) -> Any:
    x = walk.seq(node.args[0], states)
    if any(walk.seq(a, states).axes for a in node.args[1:] if isinstance(a, torch.fx.Node)):
        raise _Lose("a linear layer's weights hold the sequence")
    last = rank_of(node.args[0]) - 1
    ax = x.get(last)
    if ax is not None:
        if not _is(ax.fill, 0):
            raise _Lose(f"a linear layer sums over the sequence and reads the padding: the mask does not reach it "
                        f"(it holds {_describe(ax.fill)} at padded positions)")
        walk.reach(node, "a linear layer over the sequence")
    return Seq(tuple(replace(a, fill=_unknown(*(b.fill for b in x.axes)), iota=False) for a in x.axes
                     if a.dim != last))


@_rule(aten_op("scaled_dot_product_attention"))
def _attention(walk: _Walk, node: Any, states: dict) -> Any:
    """Attention of (..., L, E) queries over (..., S, E) keys: keys along the sequence must be masked at padding
    by the attn_mask (False, or an additive masking bias, along its last dim), or causal."""
    q, k, v = node.args[:3]
    mask = arg_of(node, 3, "attn_mask")
    causal = bool(arg_of(node, 5, "is_causal", False))
    qs, ks, vs = (walk.seq(t, states) for t in (q, k, v))
    for t, s in ((q, qs), (k, ks), (v, vs)):
        if any(a.dim != rank_of(t) - 2 for a in s.axes):
            raise _Lose("attention over a value that holds the sequence in its batch or feature dims")
    ms = walk.seq(mask, states) if isinstance(mask, torch.fx.Node) else CLEAN
    if any(a.dim < rank_of(mask) - 2 for a in ms.axes):
        raise _Lose("attention's mask holds the sequence in its batch dims")
    query = qs.get(rank_of(q) - 2)
    if ks.axes or vs.axes:
        keys = ms.get(rank_of(mask) - 1) if isinstance(mask, torch.fx.Node) else None
        boolean = isinstance(mask, torch.fx.Node) and node_value(mask).dtype == torch.bool
        masked = keys is not None and (_is(keys.fill, False) if boolean else _identity("lse", keys.fill))
        if not masked and causal and query is not None and ks.axes:
            masked = True       # each real query sees only the keys up to its own position: real ones
        if not masked:
            held = _describe(keys.fill) if keys is not None else "no mask along them"
            raise _Lose(f"attention attends to the padded keys: the mask does not reach them ({held}; a key is left "
                        f"out by False in a bool attn_mask or {_NEEDS['lse']} in an additive one)")
        walk.reach(node, "attention over the sequence's keys")
    if query is None:
        return CLEAN
    rows = ms.get(rank_of(mask) - 2) if isinstance(mask, torch.fx.Node) else None
    all_masked = rows is not None and (_is(rows.fill, False) if node_value(mask).dtype == torch.bool else
                                       _unknown(rows.fill) == ANY)     # rows of padded queries masked whole: NaN
    fill = ANY if all_masked else _unknown(*(a.fill for s in (qs, ks, vs) for a in s.axes))
    return Seq((Axis(query.dim, fill, inner=query.inner, outer=query.outer),))


@_rule(*aten_ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding", "convolution",
                 "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "_convolution",
                 "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                 "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                 "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "_adaptive_avg_pool2d"))
def _spatial(walk: _Walk, node: Any, states: dict) -> Any:
    """Convolutions and pooling run along their trailing dims: the sequence may only be the batch dim."""
    s = walk.seq(node.args[0], states)
    if any(walk.seq(a, states).axes for a in leaves((node.args[1:], node.kwargs)) if isinstance(a, torch.fx.Node)):
        raise _Lose(f"{op_name(node.target)} takes weights that hold the sequence")
    if any(a.dim != 0 for a in s.axes):
        raise _Lose(f"{op_name(node.target)} runs along the sequence (a window at the last real positions reads the "
                    "padding)")
    state = Seq(tuple(replace(a, fill=_unknown(a.fill), iota=False) for a in s.axes))
    return [state] * len(node_value(node)) if isinstance(node_value(node), (list, tuple)) else state


@_rule(*aten_ops("gru.input", "lstm.input", "rnn_tanh.input", "rnn_relu.input"))
def _rnn(walk: _Walk, node: Any, states: dict) -> Any:
    """A recurrent layer forward along the sequence reads earlier positions only: its outputs at real positions
    are real; its final states, and a backward direction, read the padding."""
    batch_first, bidirectional = node.args[-1], node.args[-2]
    time = 1 if batch_first else 0
    x = walk.seq(node.args[0], states)
    if any(walk.seq(h, states).axes for h in leaves((node.args[1], node.args[2]))):
        raise _Lose("a recurrent layer's states or weights hold the sequence")
    if any(a.dim != time for a in x.axes):
        raise _Lose("a recurrent layer runs with the sequence in its batch or feature dim")
    if not x.axes:
        return [CLEAN] * len(node_value(node))
    if bidirectional:
        raise _Lose("a bidirectional recurrent layer reads the padding on its way back")
    last = Lost(f"a recurrent layer's final state is the one after the padding{source_line(node)}")
    return [Seq((Axis(time, None),))] + [last] * (len(node_value(node)) - 1)


