"""Integer arithmetic that OpenVINO's CPU plugin computes narrower than eager, and the per-call check that refuses
the inputs it would compute wrong.

What the plugin does with integers (OpenVINO 2026.4; `tests/test_openvino.py` pins each class on its ops):
- it runs every int64 tensor as int32: inputs and outputs are converted, constants saturate, results wrap;
- `WRAPS` ops compute in int32: exact while their operands and result lie in int32 (past it int32 wraps, as
  eager's int32 does; eager's int64 does not); Clamp's bounds are float32s, though;
- `IN_F32` ops (comparisons, division, every reduction but ReduceProd, MatMul, Power, ...) compute in float32:
  exact only while every operand, partial result and result lies within +-2**24, on int32 tensors too;
- Divide with floor semantics (torch's `//`) truncates: exact only where its operands cannot have opposite signs;
- `MOVES` ops move values without arithmetic: exact for any int32 value.

Which values are checked: the integer tensors computed from the values of the model's inputs. Shape computations
(ShapeOf and what derives from it and from constants only) are not: sizes lie far inside int32. An input that only
indexes (an embedding's input_ids) has no arithmetic, so it keeps only the int32 check of its values.

`plan(model, signature)` walks the graph once, at build and at load, and keeps the integer operations on input
values as steps; `IntegerPlan.check(inputs)` computes each step's interval from the call's min and max of every
integer input and from the call's sizes, and refuses a call for which a step could leave the range where the
plugin computes it exactly. A model without such arithmetic gets no steps and pays only the int32 check.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import InputError
from ...signature import Signature

INF = float("inf")
INT32 = (-2 ** 31, 2 ** 31 - 1)
F32_EXACT = (-2 ** 24, 2 ** 24)       # the integers float32 holds, all of them
COMPUTED = ("i64", "i32")             # the integer types the plugin computes, both as int32
BIGGEST_DIM = 2 ** 31 - 1             # the size of a dim of unknown rank (no tensor is larger)
SHAPES_KEPT = 256                     # input shapes whose inferred sizes `CallShapes` keeps

Interval = tuple    # (lowest, highest): ints, or +-INF where nothing bounds it
Ins = Sequence["Interval | None"]
Rule = Callable[[Ins, Sequence[int]], "tuple[list[Interval | None], Interval]"]

#: op type -> its value ports (those whose values it computes with or passes on; the other integer inputs are
#: indices, sizes and axes); None: every input
WRAPS = {"Add": None, "Subtract": None, "Multiply": None, "Maximum": None, "Minimum": None,
         "SquaredDifference": None, "Negative": None, "Abs": None, "BitwiseAnd": None, "BitwiseOr": None,
         "BitwiseXor": None, "BitwiseNot": None, "CumSum": (0,), "ReduceProd": (0,), "Clamp": (0,)}
IN_F32 = {"Divide": None, "FloorMod": None, "Mod": None, "Power": None, "Equal": None, "NotEqual": None,
          "Less": None, "LessEqual": None, "Greater": None, "GreaterEqual": None,
          "ReduceSum": (0,), "ReduceMean": (0,), "ReduceMax": (0,), "ReduceMin": (0,), "ReduceL1": (0,),
          "ReduceL2": (0,), "MatMul": None, "Floor": None, "Ceiling": None, "Round": None, "Sign": None,
          "Sqrt": None, "Range": None, "Pad": (0, 3)}
MOVES = {"Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Transpose": (0,), "Broadcast": (0,), "Tile": (0,),
         "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Slice": (0,), "StridedSlice": (0,),
         "Split": (0,), "VariadicSplit": (0,), "Roll": (0,), "Reverse": (0,), "ReverseSequence": (0,),
         "DepthToSpace": (0,), "SpaceToDepth": (0,), "Concat": None, "Select": (1, 2), "ScatterUpdate": (0, 2),
         "ScatterElementsUpdate": (0, 2), "ScatterNDUpdate": (0, 2), "Convert": (0,), "TopK": (0,),
         "OneHot": (2, 3), "Result": (0,)}
#: ops whose integer inputs are all indices, sizes or axes
INDEXING = {"ShapeOf": (), "NonZero": (), "Interpolate": (), "EmbeddingBagOffsetsSum": (),
            "EmbeddingBagPackedSum": (), "EmbeddingSegmentsSum": (), "LSTMSequence": (), "GRUSequence": (),
            "RNNSequence": ()}
VALUE_PORTS: dict[str, tuple[int, ...] | None] = {**WRAPS, **IN_F32, **MOVES, **INDEXING}


def _hull(*xs: Interval | None) -> Interval:
    low = high = None
    for x in xs:
        if x is not None:
            low = x[0] if low is None or x[0] < low else low
            high = x[1] if high is None or x[1] > high else high
    return (0, 0) if low is None else (low, high)


def _product(a: float, b: float) -> float:
    return 0 if a == 0 or b == 0 else a * b       # 0 * INF is 0: a zero factor is exact whatever the other


def _mul(a: Interval, b: Interval) -> Interval:
    corners = [_product(x, y) for x in a for y in b]
    return min(corners), max(corners)


def _sums(n: float, x: Interval) -> Interval:
    """The values of sums of up to `n` terms of `x`, partial sums and the empty sum included."""
    return min(x[0], _product(n, x[0]), 0), max(x[1], _product(n, x[1]), 0)


def _magnitude(x: Interval) -> float:
    return max(-x[0], x[1])


def _power_of(m: float, n: float) -> float:
    """m ** n for m >= 0, n >= 0; past 2**64 (far past any limit) only 2**64, not a number of n bits."""
    if m <= 1 or n == 0:
        return 1 if n == 0 or m == 1 else m
    return INF if INF in (m, n) else m ** n if n * math.log2(m) <= 64 else 2 ** 64


def _is_unbounded(x: Interval | None) -> bool:
    return x is not None and (x[0] == -INF or x[1] == INF)


# -- rules: an op's output intervals (one per output port) and the interval of every value it computes ----------
def _arithmetic(kind: str, node: Any) -> Rule:
    combine: Callable[[Interval, Interval], Interval] = {
        "Add": lambda a, b: (a[0] + b[0], a[1] + b[1]),
        "Subtract": lambda a, b: (a[0] - b[1], a[1] - b[0]),
        "Multiply": _mul,
        "SquaredDifference": lambda a, b: _square((a[0] - b[1], a[1] - b[0])),
        "Maximum": lambda a, b: (max(a[0], b[0]), max(a[1], b[1])),
        "Minimum": lambda a, b: (min(a[0], b[0]), min(a[1], b[1])),
    }[kind]
    if kind in ("Maximum", "Minimum"):    # an operand the plugin saturated (a constant past int32) changes nothing
        def extreme(ins, dims):           # unless the result is that operand: the result decides
            out = combine(ins[0], ins[1])
            return [out], out
        return extreme
    return lambda ins, dims: _computing(combine(ins[0], ins[1]), ins)


def _square(d: Interval) -> Interval:
    low = 0 if d[0] <= 0 <= d[1] else min(_product(d[0], d[0]), _product(d[1], d[1]))
    return low, max(_product(d[0], d[0]), _product(d[1], d[1]))


def _computing(out: Interval, ins: Ins, *between: Interval) -> tuple[list[Interval], Interval]:
    return [out], _hull(out, *ins, *between)


def _unary(kind: str, node: Any) -> Rule:
    def rule(ins, dims):
        a = ins[0]
        if kind == "Negative":
            return _computing((-a[1], -a[0]), ins)
        if kind == "Abs":
            return _computing((0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1])), _magnitude(a)), ins)
        if kind == "BitwiseNot":
            return _computing((-a[1] - 1, -a[0] - 1), ins)
        if kind == "Sign":
            return _computing((-1 if a[0] < 0 else min(a[0], 1), 1 if a[1] > 0 else max(a[1], -1)), ins)
        if kind == "Sqrt":        # rounded or not
            return _computing((0, math.isqrt(int(a[1])) + 1 if 0 <= a[1] < INF else a[1]), ins)
        return _computing(a, ins)     # Floor, Ceiling, Round of an integer: itself
    return rule


def _bitwise(kind: str, node: Any) -> Rule:
    def rule(ins, dims):
        m = max(_magnitude(ins[0]), _magnitude(ins[1]))
        bits = 2 ** math.ceil(math.log2(m + 1)) if m < INF else INF   # both operands fit in bits, sign included
        return _computing((-bits, bits - 1), ins)
    return rule


def _divide(kind: str, node: Any) -> Rule:
    floor = kind == "Divide" and bool(node.get_attributes().get("m_pythondiv", False))

    def rule(ins, dims):
        a, b = ins
        if kind == "Divide":
            out = (-_magnitude(a), _magnitude(a))
            if floor and not ((a[0] >= 0 and b[0] >= 0) or (a[1] <= 0 and b[1] <= 0)):
                return [out], (-INF, INF)       # it truncates: wrong wherever the operands' signs differ
            return _computing(out, ins)
        r = max(_magnitude(b) - 1, 0)
        if kind == "FloorMod":                  # a - b * floor(a / b) passes through |a| + |b|
            return _computing((-r, r), ins, (-_magnitude(a) - _magnitude(b), _magnitude(a) + _magnitude(b)))
        return _computing((-r, r), ins)
    return rule


def _power(kind: str, node: Any) -> Rule:
    def rule(ins, dims):
        a, e = ins
        if e[0] < 0:
            return _computing((-INF, INF), ins)      # x ** -1 on integers
        top = max(_power_of(_magnitude(a), e[1]), _magnitude(a))
        return _computing((-top, top), ins)
    return rule


def _compare(kind: str, node: Any) -> Rule:
    return lambda ins, dims: ([None], _hull(*ins))


def _clamp(kind: str, node: Any) -> Rule:
    attrs = node.get_attributes()
    low, high = (math.ceil(attrs["min"]) if math.isfinite(attrs["min"]) else attrs["min"],
                 math.floor(attrs["max"]) if math.isfinite(attrs["max"]) else attrs["max"])
    rounded = {b for b in (low, high) if abs(b) < INF and float(np.float32(b)) != b}   # the plugin clamps to float32(b)

    def rule(ins, dims):
        a = ins[0]
        out = (min(max(a[0], low), high), max(min(a[1], high), low))
        if (low in rounded and a[0] <= low) or (high in rounded and a[1] >= high):
            return [out], (-INF, INF)        # a value it clamps comes out at the rounded bound
        return [out], out
    return rule


def _reduce(kind: str, node: Any) -> Rule:
    def rule(ins, dims):
        a, n = ins[0], math.prod(dims)
        if kind in ("ReduceMax", "ReduceMin"):
            return [a], a
        if kind == "ReduceMean":
            return [a], _hull(a, _sums(n, a))
        if kind == "ReduceSum":
            return [_sums(n, a)], _hull(a, _sums(n, a))
        if kind == "ReduceL1":
            return [_sums(n, (0, _magnitude(a)))], _hull(a, _sums(n, (0, _magnitude(a))))
        if kind == "ReduceL2":
            squares = _sums(n, (0, _product(_magnitude(a), _magnitude(a))))
            return [(0, math.isqrt(squares[1]) + 1 if squares[1] < INF else INF)], _hull(a, squares)
        top = max(_power_of(_magnitude(a), n), 1)        # ReduceProd
        return _computing((-top, top), ins)
    return rule


def _cumsum(kind: str, node: Any) -> Rule:
    return lambda ins, dims: _computing(_sums(dims[0], ins[0]), ins)


def _matmul(kind: str, node: Any) -> Rule:
    return lambda ins, dims: _computing(_sums(dims[0], _mul(ins[0], ins[1])), ins)


def _range(kind: str, node: Any) -> Rule:
    return lambda ins, dims: _computing(_hull(ins[0], ins[1]), ins)


def _pad(kind: str, node: Any) -> Rule:
    # moves the data, and the value it pads with goes through float32
    return lambda ins, dims: ([_hull(*ins)], ins[1] if len(ins) > 1 and ins[1] is not None else (0, 0))


def _move(kind: str, node: Any) -> Rule:
    outputs = node.get_output_size()
    if kind == "TopK":       # values, and positions along the axis
        return lambda ins, dims: ([ins[0], (0, max(dims[0] - 1, 0))], _hull(*ins))
    return lambda ins, dims: ([_hull(*ins)] * outputs, _hull(*ins))


def _positions(kind: str, node: Any) -> Rule:
    """ShapeOf's sizes, NonZero's coordinates: at most the largest size (a coordinate: less)."""
    less = 1 if kind == "NonZero" else 0
    return lambda ins, dims: ([(0, max(max(dims, default=1) - less, 0))], (0, 0))


RULES: dict[str, Callable[[str, Any], Rule]] = {
    **{k: _arithmetic for k in ("Add", "Subtract", "Multiply", "Maximum", "Minimum", "SquaredDifference")},
    **{k: _unary for k in ("Negative", "Abs", "BitwiseNot", "Sign", "Sqrt", "Floor", "Ceiling", "Round")},
    **{k: _bitwise for k in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")},
    **{k: _divide for k in ("Divide", "FloorMod", "Mod")},
    **{k: _compare for k in ("Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual")},
    **{k: _reduce for k in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
                            "ReduceProd")},
    "Power": _power, "Clamp": _clamp, "CumSum": _cumsum, "MatMul": _matmul, "Range": _range, "Pad": _pad,
    "ShapeOf": _positions, "NonZero": _positions,
    **{k: _move for k in MOVES},
}


# -- the plan ---------------------------------------------------------------------------------------------------
Dim = int | str | tuple   # a size: known, a signature dim's name, or ("?", k): the k-th size `CallShapes` infers


@dataclass(frozen=True)
class Step:
    """One integer operation: the slots (intervals) it reads, one per value port (None: not an integer), the
    slots it writes, one per output port (None: not an integer), the sizes its rule needs, the range its values
    must keep (None: not checked, it is computed only for a later step) and why."""

    kind: str
    name: str
    reads: tuple[int | None, ...]
    writes: tuple[int | None, ...]
    dims: tuple[Dim, ...]
    rule: Rule
    limit: Interval | None
    why: str
    inputs: frozenset[int]        # the flat inputs its values derive from


@dataclass(frozen=True)
class IntegerPlan:
    """What `check` needs at call time: the integer inputs, the fixed intervals, the steps and the sizes."""

    names: tuple[str, ...]                      # every flat input's name
    inputs: tuple[tuple[int, int, bool], ...]   # (flat index, slot, whether int64, which the plugin holds in int32)
    fixed: tuple[Interval | None, ...]          # per slot: its interval when no call changes it
    steps: tuple[Step, ...]
    sizes: Mapping[str, tuple[int, int]]        # dim name -> (flat input, axis) that carries it
    unbounded: Mapping[int, str]                # slot -> where a value nothing bounds comes from
    inferred: "CallShapes | None" = None        # the sizes only a call's shapes settle

    def check(self, inputs: Sequence[np.ndarray]) -> None:
        """InputError naming the inputs when the plugin could compute an integer of this call otherwise than
        eager: an int64 input outside int32, or a step whose values leave the range it computes exactly."""
        values = list(self.fixed)
        for i, slot, wide in self.inputs:
            x = inputs[i]
            if not x.size:
                values[slot] = (0, 0)
                continue
            low, high = int(x.min()), int(x.max())
            if wide and (low < INT32[0] or high > INT32[1]):
                bad = low if low < INT32[0] else high
                raise InputError(f"input {self.names[i]!r} holds {bad}, outside int32: OpenVINO's CPU plugin "
                                 "computes int64 in int32 and would give a wrong answer; use ort-cpu or "
                                 "torchscript-cpu for values that need 64 bits")
            values[slot] = (low, high)
        if not self.steps:
            return
        sizes: dict[Dim, int] = {d: int(inputs[i].shape[axis]) for d, (i, axis) in self.sizes.items()}
        if self.inferred is not None:
            sizes.update(self.inferred.sizes(inputs))
        for step in self.steps:
            reach = self._step(step, values, sizes)
            if step.limit is not None and (reach[0] < step.limit[0] or reach[1] > step.limit[1]):
                raise InputError(self._refusal(step, reach, values, sizes))

    @staticmethod
    def _step(step: Step, values: list, sizes: Mapping[str, int]) -> Interval:
        """Compute `step` into `values`; the interval of the values it computes."""
        outs, reach = step.rule([None if s is None else values[s] for s in step.reads],
                                [d if isinstance(d, int) else sizes[d] for d in step.dims] if step.dims else ())
        for slot, out in zip(step.writes, outs):
            if slot is not None:
                values[slot] = out
        return reach

    def _refusal(self, step: Step, reach: Interval, values: list, sizes: Mapping[str, int]) -> str:
        given = ", ".join(f"{self.names[i]!r} in [{values[s][0]}, {values[s][1]}]"
                          for i, s, _ in self.inputs if i in step.inputs) or "of these sizes"
        named = [f"{d}={n}" for d, n in sizes.items() if isinstance(d, str)]
        where = f" (sizes {', '.join(named)})" if named else ""
        what = f"values in [{reach[0]}, {reach[1]}]" if not _is_unbounded(reach) else "what it cannot compute exactly"
        return (f"inputs {given}{where} make {step.kind} {step.name!r} compute {what}, and OpenVINO's CPU plugin "
                f"{step.why}: refused rather than answered otherwise than eager. Give inputs it computes exactly, or "
                "compile for ort-cpu or torchscript-cpu, which compute integers as eager does")

    def problem(self) -> str | None:
        """Why calls could not be computed exactly whatever their inputs, found at build: a value nothing bounds
        (one converted from float, the output of an op this plan does not know) that makes a step compute values
        nothing bounds, or a step that leaves its range already on inputs of zeros (a constant past int32, say).
        None if there is none."""
        for low, high, size in ((0, 1, 2), (0, 0, 1)):
            values = list(self.fixed)
            for _, slot, _ in self.inputs:
                values[slot] = (low, high)
            for step in self.steps:
                reach = self._step(step, values, _Every(size))
                if step.limit is None:
                    continue
                sources = [s for s in step.reads if s is not None and _is_unbounded(values[s])]
                if high and sources and _is_unbounded(reach):
                    source = next((self.unbounded[s] for s in sources if s in self.unbounded), "a value nothing bounds")
                    return (f"{step.kind} {step.name!r} computes with {source}, so no range of the inputs keeps it "
                            f"exact, and OpenVINO's CPU plugin {step.why}")
                if high and BIGGEST_DIM in step.dims and (reach[0] < step.limit[0] or reach[1] > step.limit[1]):
                    return (f"{step.kind} {step.name!r} computes over a dim whose size this check can neither bound "
                            f"nor read from the call, and OpenVINO's CPU plugin {step.why}; bounding the dims it "
                            "depends on (a target's `shapes` ranges) may let it compile")
                if not high and not _is_unbounded(reach) and (reach[0] < step.limit[0] or reach[1] > step.limit[1]):
                    return (f"{step.kind} {step.name!r} computes values in [{reach[0]}, {reach[1]}] even on inputs of "
                            f"zeros, and OpenVINO's CPU plugin {step.why}")
        return None

    def describe(self) -> str:
        """One line for the report; empty when calls need no more than the int32 check of the inputs."""
        kinds = sorted({s.kind for s in self.steps if s.limit is not None})
        if not kinds:
            return ""
        return (f"integer arithmetic on the inputs ({', '.join(kinds)}) is checked on every call: OpenVINO's CPU "
                "plugin computes int64 in int32 and some integer ops in float32, so inputs that would take it past "
                "the range it computes exactly are refused (InputError)")


def plan(model: Any, signature: Signature) -> IntegerPlan:
    """The checks a call of this OpenVINO model needs (see the module's docstring)."""
    walk = _Walk(model, signature)
    if not any(s.dims for s in walk.steps):
        return walk.plan()
    # the sizes the steps read: the signature's dim names as symbols on a private copy's inputs, which shape
    # inference carries through the graph; what it cannot carry, the copy infers from each call's shapes
    import openvino as ov
    copy = model.clone()
    symbols = {d: ov.Symbol() for d in signature.dims}
    for param, spec in zip(copy.get_parameters(), signature.inputs):
        shape = param.get_partial_shape()
        for dim, size in zip(shape, spec.shape):
            if isinstance(size, str):
                dim.set_symbol(symbols[size])
        param.set_partial_shape(shape)
    try:
        copy.validate_nodes_and_infer_types()
    except Exception:     # a graph whose shapes cannot be inferred again: every size from the call's shapes
        copy, symbols = model.clone(), {}
    walk = _Walk(copy, signature, symbols)
    return walk.plan(CallShapes(copy, walk.unnamed) if walk.unnamed else None)


class CallShapes:
    """The sizes of dims that neither a signature dim's name nor a bound gives (a reshape to -1, a concat of two
    dims): shape inference on a private copy of the model, once per distinct set of input shapes."""

    def __init__(self, model: Any, wanted: Sequence[tuple[Any, int]]):
        self.model, self.wanted = model, list(wanted)   # (op, axis of its first input)
        self.known: dict[tuple, dict[Dim, int]] = {}
        self.lock = threading.Lock()

    def sizes(self, inputs: Sequence[np.ndarray]) -> dict[Dim, int]:
        key = tuple(x.shape for x in inputs)
        found = self.known.get(key)
        if found is None:
            import openvino as ov
            with self.lock:
                self.model.reshape({i: ov.PartialShape(list(shape)) for i, shape in enumerate(key)})
                found = {("?", k): _bound(op.get_input_partial_shape(0)[axis]) for k, (op, axis) in
                         enumerate(self.wanted)}
            if len(self.known) >= SHAPES_KEPT:
                self.known.clear()
            self.known[key] = found
        return found


class _Every(dict):
    """Every size is `size` (the probes of `IntegerPlan.problem`)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __missing__(self, key: Any) -> int:
        return self.size


def _bound(dim: Any) -> int:
    if dim.is_static:
        return dim.get_length()
    return dim.get_max_length() if dim.get_max_length() >= 0 else BIGGEST_DIM


class _Walk:
    """One pass over the graph in order: which ops compute from input values, a slot per integer tensor a step
    reads or writes, and the steps."""

    def __init__(self, model: Any, signature: Signature, symbols: Mapping[str, Any] | None = None):
        self.signature = signature
        self.symbols = symbols or {}
        self.slots: dict[tuple[str, int], int] = {}
        self.fixed: list[Interval | None] = []
        self.unbounded: dict[int, str] = {}
        self.within: set[int] = set()        # slots whose values lie in int32 by construction (no check needed)
        self.data: set[str] = set()          # ops computing from input values
        self.inputs: list[tuple[int, int, bool]] = []
        self.lineage: dict[int, frozenset[int]] = {}
        self.candidates: list[Step] = []
        self.checked: set[str] = set()
        self.unnamed: list[tuple[Any, int]] = []     # (op, axis of its first input) whose size a call must infer
        self.flat = {p.get_name(): i for i, p in enumerate(model.get_parameters())}
        for op in model.get_ordered_ops():
            self._visit(op)
        self.steps = self._needed()

    def _visit(self, op: Any) -> None:
        kind = op.get_type_name()
        sources = [op.input_value(i) for i in range(op.get_input_size())]
        is_data = kind == "Parameter" or (kind != "ShapeOf" and any(s.get_node().get_name() in self.data
                                                                    for s in sources))
        if is_data:
            self.data.add(op.get_name())
        if kind == "Parameter":
            element = op.get_output_element_type(0).get_type_name()
            if element in COMPUTED:
                i, slot = self.flat[op.get_name()], self._new_slot(op, 0, None)
                self.lineage[slot] = frozenset({i})
                self.within.add(slot)
                self.inputs.append((i, slot, element == "i64"))
            return
        if kind == "Constant":
            return        # a slot is made when a step reads it
        ints = {p for p, s in enumerate(sources) if s.get_element_type().get_type_name() in COMPUTED}
        outs = [p for p in range(op.get_output_size()) if op.get_output_element_type(p).get_type_name() in COMPUTED]
        if kind == "Convert" and outs and not ints:      # from bool, a narrower integer, or float: a fixed range
            source = sources[0].get_element_type()
            slot = self._new_slot(op, 0, _type_range(source), f"the conversion {op.get_name()!r} from "
                                  f"{source.get_type_name()}, whose values this check cannot bound")
            # a float past int32 saturates in the conversion itself, which no input range shows (not checked);
            # arithmetic on such values is refused at build (`IntegerPlan.problem`)
            self.within.add(slot)
            return
        ports = VALUE_PORTS.get(kind, "unknown")
        if ports == "unknown" or not _covered(kind, op):
            self._unknown(kind, op, sources, ints, outs)
            return
        ports = range(len(sources)) if ports is None else [p for p in ports if p < len(sources)]
        if not (ints & set(ports)) and not outs:
            return        # its integers are indices, sizes or axes only
        reads = tuple(self._slot(sources[p]) if p in ints else None for p in ports)
        writes = tuple(self._new_slot(op, p, None) if p in outs else None for p in range(op.get_output_size()))
        lineage = frozenset().union(*(self.lineage.get(s, frozenset()) for s in reads if s is not None))
        limit, why = _limit(kind, op, {sources[p].get_element_type().get_type_name() for p in ports if p in ints},
                            {op.get_output_element_type(p).get_type_name() for p in outs})
        moves_within = kind in MOVES and all(s in self.within for s in reads if s is not None)
        if limit == INT32 and moves_within:
            limit = None       # moves values already known to lie in int32
        for port, slot in enumerate(writes):
            if slot is not None:
                self.lineage[slot] = lineage
                if (is_data and limit is not None) or moves_within or \
                        op.get_output_element_type(port).get_type_name() == "i32":
                    self.within.add(slot)
        step = Step(kind, op.get_name(), reads, writes, tuple(self._dims(kind, op)), RULES[kind](kind, op), limit,
                    why, lineage)
        self.candidates.append(step)
        if is_data and limit is not None:
            self.checked.add(step.name)

    def _unknown(self, kind: str, op: Any, sources: list, ints: set[int], outs: list[int]) -> None:
        """An op this check has no rule for: its integer outputs are unbounded, and its integer operands computed
        from input values must be float32s (it may compute in float32); constants and sizes are its axes or sizes."""
        for p in outs:
            self._new_slot(op, p, (-INF, INF), f"the output of {kind} {op.get_name()!r}, an operation this check "
                                               "does not know")
        reads = tuple(self._slot(sources[p]) for p in sorted(ints) if sources[p].get_node().get_name() in self.data)
        if reads:
            lineage = frozenset().union(*(self.lineage.get(s, frozenset()) for s in reads))
            self.candidates.append(Step(kind, op.get_name(), reads, (), (), lambda ins, dims: ([], _hull(*ins)),
                                        F32_EXACT, f"may compute {kind}, which this check does not know, in float32 "
                                                   "(exact within +-2**24)", lineage))
            self.checked.add(op.get_name())

    def _new_slot(self, op: Any, port: int, fixed: Interval | None, source: str = "") -> int:
        slot = len(self.fixed)
        self.slots[(op.get_name(), port)] = slot
        self.fixed.append(fixed)
        if _is_unbounded(fixed):
            self.unbounded[slot] = source
        elif fixed is not None and INT32[0] <= fixed[0] and fixed[1] <= INT32[1]:
            self.within.add(slot)
        return slot

    def _slot(self, source: Any) -> int:
        node, port = source.get_node(), source.get_index()
        if (node.get_name(), port) in self.slots:
            return self.slots[(node.get_name(), port)]
        if node.get_type_name() == "Constant":
            data = node.get_data()
            return self._new_slot(node, port, (int(data.min()), int(data.max())) if data.size else (0, 0))
        return self._new_slot(node, port, (-INF, INF), f"the output of {node.get_type_name()} {node.get_name()!r}")

    def _dims(self, kind: str, op: Any) -> list[Dim]:
        """The sizes its rule reads: the count a reduction sums, the axis TopK indexes, the sizes of ShapeOf."""
        shape = op.get_input_partial_shape(0) if op.get_input_size() else None
        if kind in ("ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceProd"):
            if shape.rank.is_dynamic:
                return [BIGGEST_DIM]
            axes = _constant(op.input_value(1))
            axes = range(len(shape)) if axes is None else {int(a) % len(shape) for a in np.atleast_1d(axes)}
            return [self._size(op, a) for a in axes]
        if kind == "CumSum":
            axis = _constant(op.input_value(1)) if op.get_input_size() > 1 else np.array(0)
            return [self._size_at(op, None if axis is None else int(axis))]
        if kind == "MatMul":
            transposed = op.get_attributes()["transpose_a"]
            axis = None if shape.rank.is_dynamic else 0 if len(shape) == 1 else -2 if transposed else -1
            return [self._size_at(op, axis)]
        if kind == "TopK":
            return [self._size_at(op, int(op.get_attributes()["axis"]))]
        if kind in ("ShapeOf", "NonZero"):
            return [BIGGEST_DIM] if shape.rank.is_dynamic else [self._size(op, a) for a in range(len(shape))]
        return []

    def _size_at(self, op: Any, axis: int | None) -> Dim:
        shape = op.get_input_partial_shape(0)
        if axis is None or shape.rank.is_dynamic:
            return BIGGEST_DIM
        return self._size(op, axis % len(shape))

    def _size(self, op: Any, axis: int) -> Dim:
        """The size of an axis of an op's first input: known, a signature dim's name (its symbol), its upper bound,
        or one the call's shapes give (`CallShapes`)."""
        dim = op.get_input_partial_shape(0)[axis]
        if dim.is_static:
            return dim.get_length()
        if dim.has_symbol():
            name = next((n for n, symbol in self.symbols.items() if dim.get_symbol() == symbol), None)
            if name is not None:
                return name
        if dim.get_max_length() >= 0:
            return dim.get_max_length()
        self.unnamed.append((op, axis))
        return ("?", len(self.unnamed) - 1)

    def _needed(self) -> list[Step]:
        """The checked steps, and the steps computing what they read (their own values unchecked)."""
        writer = {slot: s for s in self.candidates for slot in s.writes if slot is not None}
        needed, todo = set(), [s for s in self.candidates if s.name in self.checked]
        while todo:
            step = todo.pop()
            if step.name not in needed:
                needed.add(step.name)
                todo.extend(writer[s] for s in step.reads if s in writer)
        return [s if s.name in self.checked else _unchecked(s) for s in self.candidates if s.name in needed]

    def plan(self, inferred: CallShapes | None = None) -> IntegerPlan:
        carriers: dict[str, tuple[int, int]] = {}
        for i, spec in enumerate(self.signature.inputs):
            for axis, size in enumerate(spec.shape):
                if isinstance(size, str):
                    carriers.setdefault(size, (i, axis))
        used = {d for s in self.steps for d in s.dims if isinstance(d, str)}
        read = {slot for s in self.steps for slot in s.reads}
        inputs = tuple(i for i in self.inputs if i[2] or i[1] in read)   # int64 (the int32 check) or computed with
        return IntegerPlan(tuple(self.signature.input_names), inputs, tuple(self.fixed), tuple(self.steps),
                           {d: carriers[d] for d in sorted(used)}, dict(self.unbounded), inferred)


def _unchecked(step: Step) -> Step:
    return Step(step.kind, step.name, step.reads, step.writes, step.dims, step.rule, None, step.why, step.inputs)


def _limit(kind: str, op: Any, operands: set[str], outputs: set[str]) -> tuple[Interval | None, str]:
    """The range a step's values must keep, and why; None where the plugin computes what eager computes."""
    if kind in IN_F32 and not (kind == "Pad" and op.get_attributes().get("pad_mode") != "constant"):
        if kind == "Divide" and op.get_attributes().get("m_pythondiv", False):
            return F32_EXACT, ("computes integer floor division (torch's //) in float32, exact within +-2**24, "
                               "and truncates where the operands' signs differ")
        return F32_EXACT, f"computes {kind} on integers in float32 (exact within +-2**24)"
    if "i64" in operands | outputs:
        return INT32, "computes int64 in int32 (exact within [-2**31, 2**31 - 1])"
    return None, ""        # int32 in int32: it wraps where eager's int32 wraps


def _covered(kind: str, op: Any) -> bool:
    """Whether the rule covers this instance: a scatter that adds or multiplies computes, it does not move."""
    return op.get_attributes().get("reduction", "none") == "none" if kind.startswith("Scatter") else True


def _type_range(element_type: Any) -> Interval:
    """The values a Convert to an integer starts from: a bool's, a narrower integer's, a float's (any)."""
    if element_type.get_type_name() == "boolean":
        return 0, 1
    if element_type.is_integral_number():
        info = np.iinfo(element_type.to_dtype())
        return int(info.min), int(info.max)
    return -INF, INF


def _constant(source: Any) -> np.ndarray | None:
    node = source.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None
