"""Whether the rows of a batch are independent, proven from the exported graph: the batch dim is followed as
torch.export's batch-size symbol through every ATen op, and an op that reduces, scans, sorts, normalizes or
indexes across it, contracts it in a matmul, moves rows against each other, uses the batch size as a value, or
that the rules here do not know, couples the rows (each is named, with the line of the model that made it).

Every value of the graph is one of:
- FREE: the same for every row (parameters, constants, inputs without the batch dim, sizes free of the batch);
- Rows(axis, inner, outer): its dim `axis` has outer*batch*inner entries, and each block of `inner` consecutive
  ones depends on one row of the inputs alone, the rows repeating `outer` times (attention's (batch*heads, seq,
  dim) view: inner = heads; nn.MultiheadAttention's (seq*batch, dim): outer = seq);
- SIZE: a Python int that involves the batch size (`x.shape[0]`), allowed only as a shape;
- COUPLED: it mixes rows (after a coupling op, or from an op without a rule).
A model is batch-independent when every output is Rows along the output's batch axis, block 1.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import sympy
import torch

from ..lower import held_ranges
from ..signature import Signature
from .graph import Exported, user_inputs, user_outputs
from .ops import (LETTERS, SHAPE_OPS, SYMBOLIC, WRAPPERS, GraphWalk, arg_of, aten_op, aten_ops,
                  axis_size, dims_of, is_pointwise, leaves, matmul_labels, node_value, op_name, rank_of, same_size,
                  size_expr, source_line, tensors_of, whole)
from .probes import batch_independence



@dataclass(frozen=True)
class Rows:
    """Rows of the batch along dim `axis` of size outer * batch * inner: entry o * batch * inner + b * inner + i
    depends on row b alone. `made`: a value made from sizes only (zeros(batch, 4)), the same in every row, whose
    split into outer and inner is arbitrary."""

    axis: int
    inner: Any = sympy.Integer(1)
    outer: Any = sympy.Integer(1)
    made: bool = field(default=False, compare=False)

    def at(self, axis: int) -> "Rows":
        return replace(self, axis=axis)


@dataclass(frozen=True)
class Iota(Rows):
    """torch.arange(batch), possibly reshaped: each row's own position in the batch. Only indexing the batch dim
    of a value with it keeps rows apart (`x[torch.arange(batch), ...]`: each row picks itself); any other use makes
    a row's answer depend on where it lands in the batch."""


FREE, SIZE, COUPLED = "free", "size", "coupled"


@dataclass
class Verdict:
    """What the analysis proved: independent (True), coupled (False, with the ops that couple), or unknown
    (None: no graph, or the batch dim did not stay symbolic), and why, in a sentence."""

    independent: bool | None
    why: str
    couplings: list[str] = field(default_factory=list)   # "aten.mean.dim over the batch (model.py:12 `...`)"
    unknown_ops: list[str] = field(default_factory=list)  # ops without a rule that met the batch


def rows_verdict(model: torch.nn.Module, signature: Signature, exported: Exported,
                 flats: Sequence[Sequence[Any]]) -> Verdict:
    """Whether a server may run several clients' rows in one call of this model: proven from the graph
    (`batch_verdict`), then confirmed by eager on rows of `flats` run together and alone (`probes.
    batch_independence`), which can only take the proof back. Not proven (no graph) is not independent."""
    graph = batch_verdict(exported, signature)
    if graph.independent is not True:
        return graph
    probed, why = batch_independence(model, signature, flats)
    if probed is False:
        return Verdict(False, f"eager answers a row otherwise beside other rows ({why}), although the graph "
                              "analysis found no op that mixes rows: the model's code takes another path for a "
                              "batch of one row (a branch on the batch size), or the analysis missed an op "
                              "(please report it)", [why])
    return Verdict(True, graph.why + (f"; confirmed by eager: {why}" if probed else ""))


class _Coupled(Exception):
    """An op couples rows: the message says how."""


def batch_verdict(exported: Exported, signature: Signature) -> Verdict:
    """Follow the batch dim of `signature` through `exported`'s graph (see the module's docstring)."""
    if signature.batch is None or any(signature.batch_axis(o) is None for o in signature.outputs):
        return Verdict(None, "the model has no batch dim" if signature.batch is None else
                       "an output has no batch dim, so batched requests could not be told apart")
    if exported.program is None:
        return Verdict(None, f"torch.export could not export the model ({exported.failure}), so nothing is proven "
                             "about its rows")
    batch = exported.symbols.get(signature.batch)
    if batch is None:
        return Verdict(None, f"torch.export made the batch dim {signature.batch!r} a constant, so nothing is proven "
                             "about its rows")
    walk = _Walk(batch)
    states: dict[Any, Any] = {}
    for node, spec in zip(user_inputs(exported.program), signature.inputs):
        axis = signature.batch_axis(spec)
        states[node] = FREE if axis is None else Rows(axis)
    walk.run(exported.program.graph_module, states)
    for node, spec in zip(user_outputs(exported.program), signature.outputs):
        state = states.get(node, FREE)
        axis = signature.batch_axis(spec)
        if state == COUPLED or axis is None:
            continue
        if state != Rows(axis) and not (isinstance(state, Rows) and state.made and state.axis == axis):
            walk.couple(node, f"output {spec.name} has its rows at {_describe(state)}, not along its batch dim "
                              f"(dim {axis})")
    if walk.couplings:
        return Verdict(False, f"the rows of a batch are coupled: {walk.couplings[0]}"
                              + (f" (and {len(walk.couplings) - 1} more)" if len(walk.couplings) > 1 else ""),
                       walk.couplings, walk.unknown)
    branch = _batch_branch(exported, signature)
    if branch is not None:
        return Verdict(None, f"the model's code takes another path for some batch sizes ({branch}), and the "
                             "graph holds for the others only, so nothing is proven about how a row is answered "
                             "alone and in a batch")
    return Verdict(True, f"proven from the graph: none of its {walk.ops} ops mixes rows of the batch")


def _batch_branch(exported: Exported, signature: Signature) -> str | None:
    """Why the graph holds for part of the declared batch range only (the model's code branches on the batch size),
    or None: torch.export keeps the batch to a narrower range, or checks the sizes in a way that is not solved
    (`lower.held_ranges`). A branch on the batch size being 1 shows only as a runtime check `batch != 1`, as torch's
    own size-oblivious checks do: the eager probe of rows alone against rows together is what sees that one."""
    held = held_ranges(exported.program, signature, exported.examples, only=signature.batch)
    if held is None:
        return "torch.export checks the sizes in a way the analysis does not solve"
    rng = held.get(signature.batch)
    if rng is None:
        return None
    return f"torch.export keeps the batch to {rng.min}..{rng.max if rng.max is not None else ''}"


def _describe(state: Any) -> str:
    if isinstance(state, Rows):
        return f"dim {state.axis}" + (f" in blocks of {state.inner}" if state.inner != 1 else "")
    return "no dim (the same for every row)" if state == FREE else str(state)


class _Walk(GraphWalk):
    """The batch followed through a graph, node by node (`GraphWalk`)."""

    initial = FREE

    def __init__(self, batch: Any):
        super().__init__()
        self.batch = batch
        self.couplings: list[str] = []
        self.unknown: list[str] = []

    def step(self, module: torch.fx.GraphModule, node: Any, states: dict[Any, Any]) -> Any:
        """The state of one call_function node (COUPLED, recorded with its reason, where it mixes rows)."""
        inputs = [self.state(a, states) for a in leaves((node.args, node.kwargs))]
        if COUPLED in inputs:
            return self._out(node, COUPLED)
        val = node_value(node)
        if node.target in SYMBOLIC or (isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)) and
                                        node.target not in _RULES):
            return SIZE if self._has_batch(val) else FREE
        if node.target in WRAPPERS:
            try:
                return self.wrapped(module, node, states)
            except _Coupled as e:
                return self.couple(node, str(e))
        if all(s == FREE for s in inputs) and not self._batch_sized(node):
            return self._out(node, FREE)      # whatever it does, it sees nothing of any row
        if SIZE in inputs and node.target not in SHAPE_OPS:
            return self.couple(node, f"{op_name(node.target)} computes with the batch size as a value")
        rule = _RULES.get(node.target) or (_pointwise if is_pointwise(node.target) else None)
        if any(isinstance(x, Iota) for x in inputs) and rule not in _IOTA_RULES:
            return self.couple(node, f"{op_name(node.target)} computes with the positions of the rows in the batch "
                                     "(torch.arange over the batch size)")
        if rule is None:
            name = op_name(node.target)
            if name not in self.unknown:
                self.unknown.append(name)
            return self.couple(node, f"{name} has no rule in the batch analysis (an op it does not know counts as "
                                     "coupling rows)")
        try:
            state = rule(self, node, states)
        except _Coupled as e:
            return self.couple(node, str(e))
        return self._checked(node, state)

    def couple(self, node: Any, why: str) -> Any:
        where = source_line(node)
        self.couplings.append(f"{why}{where}")
        return self._out(node, COUPLED)

    # -- helpers for the rules ---------------------------------------------------------------------------
    def state(self, value: Any, states: dict[Any, Any]) -> Any:
        if isinstance(value, torch.fx.Node):
            return states.get(value, FREE)
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return SIZE if self._has_batch(value) else FREE
        return FREE

    def _has_batch(self, value: Any) -> bool:
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.batch in value.node.expr.free_symbols
        if isinstance(value, (list, tuple)):
            return any(self._has_batch(v) for v in value)
        return False

    def _batch_sized(self, node: Any) -> bool:
        """Whether a value of the node has a dim whose size involves the batch."""
        return any(self._has_batch(tuple(t.shape)) for t in tensors_of(node_value(node)))

    def _out(self, node: Any, state: Any) -> Any:
        """`state` for every tensor the node gives (a tuple node gives a list of states)."""
        val = node_value(node)
        return [state] * len(val) if isinstance(val, (list, tuple)) else state

    def _checked(self, node: Any, state: Any) -> Any:
        """`state` after checking each Rows against the output's real size: the dim must be batch * inner."""
        vals = node_value(node)
        many = isinstance(vals, (list, tuple))
        for s, v in zip(state if many else [state], vals if many else [vals]):
            if isinstance(s, Rows) and isinstance(v, torch.Tensor):
                if s.axis >= v.dim() or not same_size(axis_size(v, s.axis), s.outer * self.batch * s.inner):
                    return self.couple(node, f"{op_name(node.target)} leaves the rows of the batch out of line")
        return state

    def sizes(self, node_or_val: Any) -> list[Any]:
        val = node_value(node_or_val) if isinstance(node_or_val, torch.fx.Node) else node_or_val
        return [size_expr(s) for s in val.shape]

    def block(self, size: Any, outer: Any = 1) -> Any:
        """inner when `size` is outer * batch * inner with inner a whole number free of the batch, else None."""
        return whole(sympy.cancel(size_expr(size) / (outer * self.batch)), self.batch)

    def creation(self, node: Any) -> Any:
        """The state of a tensor made from sizes alone (zeros, full, expand of a FREE value): the same for every
        row, along the one dim whose size is batch * inner; FREE when no dim involves the batch."""
        shape = self.sizes(node)
        dims = [i for i, s in enumerate(shape) if s.has(self.batch)]
        if not dims:
            return FREE
        inner = self.block(shape[dims[0]]) if len(dims) == 1 else None
        if inner is None:
            raise _Coupled(f"{op_name(node.target)} makes a tensor whose shape holds the batch size more than once")
        return Rows(dims[0], inner, made=True)


# -- rules -----------------------------------------------------------------------------------------------
# A rule takes (walk, node, states) and returns the node's state (a list for a node that gives several
# tensors); it raises _Coupled (or returns None) where the op mixes rows. A node whose inputs are all FREE
# and whose values have no batch-sized dim never reaches a rule.
Rule = Callable[[_Walk, Any, dict], Any]
_RULES: dict[Any, Rule] = {}


def _rule(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            if op is not None:
                _RULES[op] = fn
        return fn
    return register


def _tensor_states(walk: _Walk, node: Any, states: dict) -> list[tuple[Any, Any]]:
    """(state, node) of each tensor argument; SIZE scalars among the arguments couple (the batch size as a value)."""
    found = []
    for a in leaves((node.args, node.kwargs)):
        s = walk.state(a, states)
        if s == SIZE:
            raise _Coupled(f"{op_name(node.target)} computes with the batch size as a value")
        if isinstance(a, torch.fx.Node) and isinstance(node_value(a), torch.Tensor):
            found.append((s, a))
    return found


def _aligned(walk: _Walk, node: Any, states: dict, rank: int | None = None) -> Any:
    """Broadcasting: every Rows argument must land on the same output dim with the same blocks; FREE ones
    broadcast. The output's state (the creation state when only FREE values meet batch-sized sizes)."""
    rank = rank_of(node) if rank is None else rank
    found = None
    for s, a in _tensor_states(walk, node, states):
        if isinstance(s, Rows):
            found = _join(found, s.at(s.axis + rank - rank_of(a)),
                          f"{op_name(node.target)} lines up the rows of one input with another dim of the other")
    return found if found is not None else walk.creation(node)


def _join(found: Rows | None, here: Rows, why: str) -> Rows:
    """The rows two values share when an op lines them up: equal ones, or a value made from sizes (the same in
    every row) against any along the same dim; _Coupled(why) otherwise."""
    if found is None or here == found or (here.made and here.axis == found.axis):
        return found or here
    if found.made and found.axis == here.axis:
        return here
    raise _Coupled(why)


def _pointwise(walk: _Walk, node: Any, states: dict) -> Any:
    return _aligned(walk, node, states)


_rule(*aten_ops("dropout", "feature_dropout", "alpha_dropout", "zeros_like",
                "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "expand_as", "native_dropout",
                "masked_fill_.Scalar", "masked_fill_.Tensor", "add_.Tensor", "mul_.Tensor", "sub_.Tensor",
                "div_.Tensor", "relu_", "copy_", "fill_.Scalar", "clamp_", "clamp_min_", "sigmoid_", "tanh_",
                "hardtanh_", "leaky_relu_", "silu_", "gelu_", "bitwise_and.Tensor", "__and__.Tensor", "__or__.Tensor",
                "bitwise_or.Tensor", "bitwise_not", "logical_and", "logical_or", "logical_not", "where.self",
                "masked_fill.Scalar", "masked_fill.Tensor"))(_pointwise)


@_rule(*aten_ops("zeros", "ones", "empty.memory_format", "full", "new_zeros", "new_ones", "new_empty", "new_full",
                 "empty_strided"))
def _made(walk: _Walk, node: Any, states: dict) -> Any:
    """A tensor made from sizes (which may hold the batch size), filled with a value that must not."""
    value = {aten_op("full"): arg_of(node, 1, "fill_value"),
             aten_op("new_full"): arg_of(node, 2, "fill_value")}.get(node.target)
    if walk.state(value, states) == SIZE:
        raise _Coupled("fills a tensor with the batch size")
    return walk.creation(node)


@_rule(aten_op("arange"), aten_op("arange.start"), aten_op("arange.start_step"))
def _arange(walk: _Walk, node: Any, states: dict) -> Any:
    """torch.arange(batch): the rows' positions (Iota); any other range over the batch size couples."""
    end = node.args[0]
    if node.target is aten_op("arange") and same_size(node_value(end) if isinstance(end, torch.fx.Node)
                                                      else end, walk.batch):
        return Iota(0)
    raise _Coupled("numbers positions along the batch (torch.arange over the batch size): a row's answer depends "
                   "on where it lands in the batch")


@_rule(*aten_ops("to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy", "type_as", "contiguous", "clone",
                 "detach", "alias", "lift_fresh_copy"))
def _unchanged(walk: _Walk, node: Any, states: dict) -> Any:
    """A copy or a conversion of its first argument (the others give a dtype)."""
    return walk.state(node.args[0], states)


@_rule(*aten_ops("view", "reshape", "_unsafe_view", "view_copy", "flatten.using_ints", "unflatten.int", "squeeze",
                 "squeeze.dim", "squeeze.dims", "unsqueeze", "unsqueeze_copy", "squeeze_copy.dim"))
def _view(walk: _Walk, node: Any, states: dict) -> Any:
    """A reshape keeps the flat (row-major) order: the rows stay blocks when some output dim j has everything
    before it equal to what was before the batch, and the batch as its leading factor."""
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    before, out = walk.sizes(node.args[0]), walk.sizes(node)
    ahead = s.outer * sympy.Mul(*before[:s.axis])
    behind = s.inner * sympy.Mul(*before[s.axis + 1:])
    for j, size in enumerate(out):
        outer = whole(ahead / sympy.Mul(*out[:j]), walk.batch)
        inner = None if outer is None else walk.block(size, outer)
        if inner is not None and same_size(inner * sympy.Mul(*out[j + 1:]), behind):
            return replace(s, axis=j, inner=inner, outer=outer)
    raise _Coupled(f"{op_name(node.target)} reshapes the batch dim in a way that no dim keeps its rows apart")


@_rule(aten_op("permute"), aten_op("permute_copy"))
def _permute(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    order = [d % len(node.args[1]) for d in node.args[1]]
    return s.at(order.index(s.axis)) if isinstance(s, Rows) else walk.creation(node)


@_rule(aten_op("transpose.int"), aten_op("swapaxes"), aten_op("t"), aten_op("numpy_T"))
def _transpose(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    rank = rank_of(node)
    a, b = (node.args[1] % rank, node.args[2] % rank) if len(node.args) > 2 else (0, 1) if rank == 2 else \
        (rank - 1, 0)
    if node.target is aten_op("numpy_T"):
        return s.at(rank - 1 - s.axis)
    return s.at(b if s.axis == a else a if s.axis == b else s.axis)


@_rule(aten_op("movedim.int"))
def _movedim(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    rank = rank_of(node)
    src, dst = node.args[1] % rank, node.args[2] % rank
    order = list(range(rank))
    order.insert(dst, order.pop(src))
    return s.at(order.index(s.axis))


@_rule(aten_op("expand"), aten_op("expand_copy"), aten_op("broadcast_to"))
def _expand(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    return s.at(s.axis + rank_of(node) - rank_of(node.args[0]))


def _along(walk: _Walk, node: Any, states: dict, dims: list[int] | None, keepdim: bool, what: str) -> Any:
    """The state after an op over `dims` of its first argument (None: every dim): COUPLED when they hold the
    batch, else Rows with the axis moved past the dims removed (none when keepdim). Its other tensor arguments
    (weights, running statistics) must be the same for every row."""
    s = walk.state(node.args[0], states)
    if any(t != FREE for t, a in _tensor_states(walk, node, states) if a is not node.args[0]):
        raise _Coupled(f"{op_name(node.target)} takes parameters that depend on the batch")
    if not isinstance(s, Rows):
        return walk.creation(node)
    if dims is None or s.axis in dims:
        raise _Coupled(f"{op_name(node.target)} {what} across the rows of the batch")
    removed = 0 if keepdim else sum(1 for d in set(dims) if d < s.axis)
    state = s.at(s.axis - removed)
    val = node_value(node)
    if isinstance(val, (list, tuple)):      # statistics beside the result (batch norm's) hold no batch dim
        return [state if isinstance(v, torch.Tensor) and walk._has_batch(tuple(v.shape)) else FREE for v in val]
    return state


def _reduction(dim_index: int, keep_index: int) -> Rule:
    def rule(walk: _Walk, node: Any, states: dict) -> Any:
        rank = rank_of(node.args[0])
        dims = dims_of(arg_of(node, dim_index, "dim"), rank)
        return _along(walk, node, states, dims, bool(arg_of(node, keep_index, "keepdim", False)), "reduces")
    return rule


_rule(*aten_ops("sum.dim_IntList", "mean.dim", "amax", "amin", "prod.dim_int", "max.dim", "min.dim", "argmax",
                "argmin", "logsumexp", "any.dim", "any.dims", "all.dim", "all.dims", "nansum", "nanmean",
                "median.dim", "nanmedian.dim", "count_nonzero.dim_IntList"))(_reduction(1, 2))
_rule(aten_op("var.dim"), aten_op("std.dim"))(_reduction(1, 3))
_rule(aten_op("norm.ScalarOpt_dim"), aten_op("kthvalue"))(_reduction(2, 3))
_rule(aten_op("mode"))(lambda walk, node, states: _along(walk, node, states, dims_of(arg_of(node, 1, "dim", -1),
                                                                                     rank_of(node.args[0])),
                                                         bool(arg_of(node, 2, "keepdim", False)), "reduces"))
_rule(aten_op("aminmax"))(lambda walk, node, states: _along(walk, node, states, dims_of(node.kwargs.get("dim"),
                                                                                        rank_of(node.args[0])),
                                                            bool(node.kwargs.get("keepdim", False)), "reduces"))
_rule(*aten_ops("var.correction", "std.correction", "var_mean.correction", "std_mean.correction"))(
    lambda walk, node, states: _along(walk, node, states, dims_of(arg_of(node, 1, "dim"), rank_of(node.args[0])),
                                      bool(node.kwargs.get("keepdim", False)), "reduces"))
_rule(aten_op("linalg_vector_norm"))(
    lambda walk, node, states: _along(walk, node, states, dims_of(arg_of(node, 2, "dim"), rank_of(node.args[0])),
                                      bool(arg_of(node, 3, "keepdim", False)), "reduces"))
_rule(*aten_ops("sum", "mean", "max", "min", "prod", "any", "all", "std", "var", "norm.Scalar"))(
    lambda walk, node, states: _along(walk, node, states, None, False, "reduces"))


def _scan(dim_index: int, what: str, default: int | None = None) -> Rule:
    def rule(walk: _Walk, node: Any, states: dict) -> Any:
        dim = arg_of(node, dim_index, "dim", default)
        return _along(walk, node, states, dims_of(dim, rank_of(node.args[0])), True, what)
    return rule


_rule(*aten_ops("softmax.int", "_softmax", "log_softmax.int", "_log_softmax", "_safe_softmax"))(_scan(1, "normalizes"))
_rule(*aten_ops("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"))(_scan(1, "scans"))
_rule(*aten_ops("sort", "argsort", "sort.stable", "argsort.stable"))(_scan(1, "sorts", -1))
_rule(aten_op("topk"))(_scan(2, "ranks", -1))
_rule(aten_op("flip"))(lambda walk, node, states: _along(walk, node, states, dims_of(node.args[1], rank_of(node)), True,
                                                         "reverses"))
_rule(aten_op("roll"))(lambda walk, node, states: _along(walk, node, states,
                                                         dims_of(arg_of(node, 2, "dims"), rank_of(node)),
                                                         True, "rolls"))


@_rule(aten_op("layer_norm"), aten_op("native_layer_norm"), aten_op("rms_norm"))
def _layer_norm(walk: _Walk, node: Any, states: dict) -> Any:
    rank = rank_of(node.args[0])
    return _along(walk, node, states, list(range(rank - len(node.args[1]), rank)), True, "normalizes")


@_rule(aten_op("group_norm"), aten_op("native_group_norm"))
def _group_norm(walk: _Walk, node: Any, states: dict) -> Any:
    return _along(walk, node, states, list(range(1, rank_of(node.args[0]))), True, "normalizes")


@_rule(aten_op("batch_norm"), aten_op("_native_batch_norm_legit_no_training"), aten_op("native_batch_norm"),
       aten_op("instance_norm"))
def _batch_norm(walk: _Walk, node: Any, states: dict) -> Any:
    """Inference batch norm is per channel (dim 1) with running statistics; in training mode, or for instance
    norm, statistics are taken over the batch or per sample."""
    training = {aten_op("batch_norm"): arg_of(node, 5, "training"),
                aten_op("native_batch_norm"): arg_of(node, 5, "training"),
                aten_op("instance_norm"): arg_of(node, 5, "use_input_stats")}.get(node.target, False)
    rank = rank_of(node.args[0])
    if node.target is aten_op("instance_norm"):
        dims = list(range(2, rank)) if training else [1]
    else:
        dims = [d for d in range(rank) if d != 1] if training else [1]
    return _along(walk, node, states, dims, True, "normalizes")


def _only_first(walk: _Walk, node: Any, states: dict, what: str) -> Rows | None:
    """The first argument's Rows when every other tensor argument is FREE (weights)."""
    found = _tensor_states(walk, node, states)
    if any(s != FREE for s, a in found if a is not node.args[0]):
        raise _Coupled(f"{op_name(node.target)} takes {what} that depend on the batch")
    s = walk.state(node.args[0], states)
    return s if isinstance(s, Rows) else None


@_rule(aten_op("linear"))
def _linear(walk: _Walk, node: Any, states: dict) -> Any:
    s = _only_first(walk, node, states, "weights")
    if s is None:
        return walk.creation(node)
    if s.axis == rank_of(node.args[0]) - 1:
        raise _Coupled("a linear layer contracts the batch dim")
    return s


@_rule(*aten_ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding", "convolution",
                 "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "_convolution"))
def _conv(walk: _Walk, node: Any, states: dict) -> Any:
    s = _only_first(walk, node, states, "weights")
    if s is None:
        return walk.creation(node)
    if s.axis != 0 or rank_of(node.args[0]) != rank_of(node.args[1]):
        raise _Coupled("a convolution runs across the batch dim (it is not the leading dim of a batched input)")
    return s


@_rule(*aten_ops("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                 "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                 "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
                 "_adaptive_avg_pool2d", "upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec",
                 "upsample_bilinear2d.vec", "upsample_linear1d.vec", "upsample_bicubic2d.vec",
                 "upsample_trilinear3d.vec", "_upsample_bilinear2d_aa.vec", "_upsample_nearest_exact2d.vec",
                 "pixel_shuffle", "pixel_unshuffle", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                 "replication_pad1d", "replication_pad2d", "replication_pad3d"))
def _spatial(walk: _Walk, node: Any, states: dict) -> Any:
    """Pooling, resampling and padding of the trailing spatial dims, one channel at a time (pixel shuffle moves
    channels into them): the batch must lie before them."""
    s = _only_first(walk, node, states, "sizes")
    if s is None:
        return walk.creation(node)
    name = node.target.__name__
    spatial = int(m.group(1)) if (m := re.search(r"(\d)d", name)) else 2
    first = rank_of(node.args[0]) - spatial - (1 if "pixel" in name else 0)
    if s.axis >= first:
        raise _Coupled(f"{op_name(node.target)} runs across the batch dim")
    val = node_value(node)
    return [s] * len(val) if isinstance(val, (list, tuple)) else s


@_rule(aten_op("embedding"))
def _embedding(walk: _Walk, node: Any, states: dict) -> Any:
    if walk.state(node.args[0], states) != FREE:
        raise _Coupled("an embedding table computed from the batch")
    s = walk.state(node.args[1], states)
    return s if isinstance(s, Rows) else walk.creation(node)


def _contract(walk: _Walk, node: Any, states: dict, labels: Sequence[str], output: str,
              operands: Sequence[Any]) -> Any:
    """An einsum over `operands` (labels per operand, output labels): the batch dim of every Rows operand must
    keep its label in the output, the same label in each."""
    found = None
    for lab, a in zip(labels, operands):
        s = walk.state(a, states)
        if s == SIZE:
            raise _Coupled(f"{op_name(node.target)} computes with the batch size as a value")
        if not isinstance(s, Rows):
            continue
        letter = lab[s.axis]
        if letter not in output:
            raise _Coupled(f"{op_name(node.target)} contracts the batch dim (sums over the rows)")
        found = _join(found, s.at(output.index(letter)),
                      f"{op_name(node.target)} multiplies rows of one operand with another dim of the other")
    return found if found is not None else walk.creation(node)


@_rule(*aten_ops("matmul", "mm", "bmm", "mv", "dot", "vdot", "inner"))
def _matmul(walk: _Walk, node: Any, states: dict) -> Any:
    a, b = node.args[0], node.args[1]
    la, lb, out = matmul_labels(rank_of(a), rank_of(b))
    return _contract(walk, node, states, [la, lb], out, [a, b])


@_rule(aten_op("addmm"), aten_op("baddbmm"), aten_op("addmv"), aten_op("addbmm"))
def _addmm(walk: _Walk, node: Any, states: dict) -> Any:
    bias, a, b = node.args[:3]
    la, lb, out = matmul_labels(rank_of(a), rank_of(b))
    if node.target is aten_op("addbmm"):
        la, lb, out = "bNK", "bKM", "NM"
    product = _contract(walk, node, states, [la, lb], out, [a, b])
    s = walk.state(bias, states)
    if isinstance(s, Rows):
        return _join(product if isinstance(product, Rows) else None, s.at(s.axis + len(out) - rank_of(bias)),
                     f"{op_name(node.target)} adds rows to another dim")
    return product


@_rule(aten_op("einsum"))
def _einsum(walk: _Walk, node: Any, states: dict) -> Any:
    equation, operands = node.args[0].replace(" ", ""), list(node.args[1])
    given, arrow, output = equation.partition("->")
    labels = given.split(",")
    dots = ""
    if "..." in given:
        spare = [c for c in LETTERS.upper() if c not in equation]
        widths = [rank_of(o) - (len(l) - 3) if "..." in l else 0 for o, l in zip(operands, labels)]
        dots = "".join(spare[:max(widths)])
        labels = [l.replace("...", dots[len(dots) - w:]) for l, w in zip(labels, widths)]
    if arrow:
        output = output.replace("...", dots)
    else:
        letters = "".join(labels)
        output = dots + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in dots))
    return _contract(walk, node, states, labels, output, operands)


@_rule(aten_op("scaled_dot_product_attention"))
def _attention(walk: _Walk, node: Any, states: dict) -> Any:
    """Attention over (..., L, E) queries and (..., S, E) keys: rows must lie in the leading dims, with the mask
    (broadcast to (..., L, S)) along the same dim."""
    rank = rank_of(node.args[0])
    found = None
    for a in leaves((node.args, node.kwargs)):
        s = walk.state(a, states)
        if not isinstance(s, Rows):
            continue
        here = s.at(s.axis + rank - rank_of(a))
        if here.axis >= rank - 2:
            raise _Coupled("attention attends across the batch dim")
        found = _join(found, here, "attention lines up the rows of its inputs along different dims")
    return found if found is not None else walk.creation(node)


@_rule(*aten_ops("slice.Tensor", "slice_copy.Tensor", "narrow"))
def _slice(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    dim = arg_of(node, 1, "dim", 0) % rank_of(node.args[0])
    bounds = [arg_of(node, 2, "start"), arg_of(node, 3, "end" if node.target is not aten_op("narrow") else "length")]
    if dim != s.axis:
        if any(walk.state(b, states) == SIZE for b in bounds):
            raise _Coupled("slices a dim by the batch size")
        return s
    if node.target is not aten_op("narrow"):
        start, end, step = (node_value(b) for b in (*bounds, arg_of(node, 4, "step", 1)))
        if start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= 2 ** 62) or
                                                 same_size(end, axis_size(node_value(node.args[0]), dim))):
            return s
    raise _Coupled("slices the batch dim (some rows are dropped or moved)")


@_rule(aten_op("select.int"), aten_op("select_copy.int"))
def _select(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    dim = node.args[1] % rank_of(node.args[0])
    if dim == s.axis:
        raise _Coupled("selects one row of the batch")
    return s.at(s.axis - (dim < s.axis))


@_rule(aten_op("cat"), aten_op("concat"))
def _cat(walk: _Walk, node: Any, states: dict) -> Any:
    dim = arg_of(node, 1, "dim", 0) % rank_of(node)
    found = None
    for t in node.args[0]:
        s = walk.state(t, states)
        if not isinstance(s, Rows):
            raise _Coupled("concatenates a value that is the same for every row with batch-sized ones")
        if s.axis == dim:
            raise _Coupled("concatenates along the batch dim")
        found = _join(found, s, "concatenates values whose rows lie along different dims")
    return found if found is not None else walk.creation(node)


@_rule(aten_op("stack"))
def _stack(walk: _Walk, node: Any, states: dict) -> Any:
    dim = arg_of(node, 1, "dim", 0) % rank_of(node)
    found = None
    for t in node.args[0]:
        s = walk.state(t, states)
        if not isinstance(s, Rows):
            raise _Coupled("stacks a value that is the same for every row with batch-sized ones")
        found = _join(found, s, "stacks values whose rows lie along different dims")
    return found.at(found.axis + (dim <= found.axis)) if found is not None else walk.creation(node)


@_rule(*aten_ops("split.Tensor", "split_with_sizes", "chunk", "unsafe_split.Tensor", "tensor_split.sections",
                 "tensor_split.indices", "unsafe_split_with_sizes", "split_with_sizes_copy", "unbind.int"))
def _split(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    count = len(node_value(node))
    if not isinstance(s, Rows):
        return [walk.creation(node)] * count
    dim = arg_of(node, 2 if node.target is not aten_op("unbind.int") else 1, "dim", 0) % rank_of(node.args[0])
    if dim == s.axis:
        raise _Coupled("splits the batch dim")
    state = s.at(s.axis - (dim < s.axis)) if node.target is aten_op("unbind.int") else s
    return [state] * count


@_rule(operator.getitem)
def _getitem(walk: _Walk, node: Any, states: dict) -> Any:
    s = states.get(node.args[0], FREE)
    return s[node.args[1]] if isinstance(s, list) else s


@_rule(aten_op("constant_pad_nd"), aten_op("pad"))
def _pad(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    pad, rank = list(node.args[1]), rank_of(node.args[0])
    padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    if s.axis in padded:
        raise _Coupled("pads the batch dim")
    return s


@_rule(aten_op("repeat"))
def _repeat(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if not isinstance(s, Rows):
        return walk.creation(node)
    repeats = [node_value(r) for r in node.args[1]]
    axis = s.axis + len(repeats) - rank_of(node.args[0])
    if repeats[axis] != 1:
        raise _Coupled("tiles the batch dim")
    return s.at(axis)


@_rule(aten_op("index_select"))
def _index_select(walk: _Walk, node: Any, states: dict) -> Any:
    s = walk.state(node.args[0], states)
    if walk.state(node.args[2], states) != FREE:
        raise _Coupled("index_select with indices that depend on the batch")
    if not isinstance(s, Rows):
        return walk.creation(node)
    if node.args[1] % rank_of(node.args[0]) == s.axis:
        raise _Coupled("index_select picks rows of the batch")
    return s


@_rule(aten_op("gather"))
def _gather(walk: _Walk, node: Any, states: dict) -> Any:
    src, index = walk.state(node.args[0], states), walk.state(node.args[2], states)
    dim = node.args[1] % rank_of(node.args[0])
    if isinstance(src, Rows) and src.axis == dim or isinstance(index, Rows) and index.axis == dim:
        raise _Coupled("gathers along the batch dim")
    if isinstance(src, Rows) and index != src:
        raise _Coupled("gathers with indices that do not follow the rows")
    return index if isinstance(index, Rows) else walk.creation(node)


@_rule(aten_op("index.Tensor"))
def _index(walk: _Walk, node: Any, states: dict) -> Any:
    """x[..., idx, ...] with indices the same for every row, none of them along the batch dim; or the batch dim
    indexed by the rows' own positions (`x[torch.arange(batch), idx]`), the other indices the same for every row."""
    s = walk.state(node.args[0], states)
    indices = list(node.args[1])
    where = [k for k, i in enumerate(indices) if i is not None]
    given = [walk.state(indices[k], states) for k in where]
    if not isinstance(s, Rows) or s.axis not in where:
        if any(g != FREE for g in given):
            raise _Coupled("indexes with indices that depend on the batch")
        return _located(walk, node, s) if isinstance(s, Rows) else walk.creation(node)
    k = where.index(s.axis)
    own = given[k]
    if not (isinstance(own, Iota) and own.inner == own.outer == s.inner == s.outer == 1) or \
            any(g != FREE for i, g in enumerate(given) if i != k):
        raise _Coupled("indexes the batch dim")
    rank = max(rank_of(indices[i]) for i in where)
    adjacent = where == list(range(where[0], where[0] + len(where)))
    return Rows((where[0] if adjacent else 0) + own.axis + rank - rank_of(indices[s.axis]))


def _located(walk: _Walk, node: Any, s: Rows) -> Rows:
    """The one output dim of size batch * inner: where rows went after an op that keeps them whole."""
    shape = walk.sizes(node)
    dims = [i for i, size in enumerate(shape) if size.has(walk.batch)]
    if len(dims) != 1 or not same_size(shape[dims[0]], s.outer * walk.batch * s.inner):
        raise _Coupled(f"{op_name(node.target)} leaves the rows out of line")
    return s.at(dims[0])


@_rule(aten_op("_local_scalar_dense"), aten_op("item"))
def _item(walk: _Walk, node: Any, states: dict) -> Any:
    raise _Coupled("reads a number out of a batch-sized tensor (.item()), which then depends on every row")


@_rule(*aten_ops("gru.input", "lstm.input", "rnn_tanh.input", "rnn_relu.input"))
def _rnn(walk: _Walk, node: Any, states: dict) -> Any:
    """Recurrent layers run along the sequence, each row alone: input (seq, batch, feature), or (batch, seq,
    feature) with batch_first; the initial states (layers, batch, hidden)."""
    batch_first = node.args[-1]
    axis = 0 if batch_first else 1
    x, hidden = node.args[0], node.args[1]
    for h in leaves(hidden):
        hs = walk.state(h, states)
        if isinstance(hs, Rows) and hs.axis != 1 or hs == SIZE:
            raise _Coupled("a recurrent layer's state has rows along a dim other than the batch")
    if any(walk.state(w, states) != FREE for w in leaves(node.args[2])):
        raise _Coupled("a recurrent layer's weights depend on the batch")
    s = walk.state(x, states)
    if isinstance(s, Rows) and (s.axis != axis or s.inner != 1 or s.outer != 1):
        raise _Coupled("a recurrent layer runs along the batch dim")
    return [Rows(axis) if i == 0 else Rows(1) for i in range(len(node_value(node)))]


#: the rules that know what an Iota is (any other op computing with one couples)
_IOTA_RULES = {_view, _permute, _transpose, _movedim, _expand, _slice, _index, _unchanged}


