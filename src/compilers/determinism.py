"""Whether eager repeats itself: the same inputs must give the same outputs, up to the last bits a reduction
order may change. A model that draws random numbers (torch.rand/randn in forward, dropout left on) or keeps
state between calls is refused: a compiled engine computes one fixed function of its inputs, and judging it
against outputs that change from call to call judges nothing (the noise estimate would grow to fit them).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError
from .state import unchanged_state

#: relative and absolute (times the output's largest magnitude) differences two eager calls may show: what a
#: reduction summed in another order (another thread split, GPU atomics) changes; for half precision, two steps of
#: the dtype (relative) and one (absolute) instead
RTOL, ATOL = 1e-5, 1e-6
#: differing outputs named in the refusal
NAMED = 4


def same_outputs(first: Sequence[Any], second: Sequence[Any]) -> bool:
    """Two eager calls' flat outputs agree: tensors up to RTOL/ATOL (NaN where NaN is), other leaves equal."""
    return len(first) == len(second) and all(_difference(a, b) is None for a, b in zip(first, second))


def check_repeatable(model: torch.nn.Module, run: Callable[[], Sequence[Any]], first: Sequence[Any],
                     names: Sequence[str]) -> None:
    """InputError unless `run()` (eager called again on the inputs that gave the flat outputs `first`, named
    `names`) gives `first` again; the refusal names the outputs that differ, the random operations forward ran
    (from a third call, made only then) and what to do."""
    with torch.inference_mode(), unchanged_state(model):
        second = list(run())
    if same_outputs(first, second):
        return
    if len(first) != len(second):
        differing = [f"{len(first)} output leaves, then {len(second)}"]
    else:
        differing = [f"{name}: {why}" for name, a, b in zip(names, first, second)
                     if (why := _difference(a, b)) is not None]
    more = f" and {len(differing) - NAMED} more" if len(differing) > NAMED else ""
    draws = _RandomDraws()
    try:
        with torch.inference_mode(), unchanged_state(model), draws:
            run()
    except Exception:           # the diagnosis is best effort; the refusal stands
        pass
    raise InputError(
        f"{type(model).__name__} gives different outputs for the same inputs on two eager calls "
        f"({'; '.join(differing[:NAMED])}{more}), so there is no single answer to validate a compiled model "
        f"against, and a compiled engine always answers the same. {_cause(type(model).__name__, draws.ops)}")


def _cause(model: str, ops: Counter) -> str:
    """The likely cause of outputs that vary, and the way out."""
    if not ops:
        return (f"No operation drew random numbers on a third call, so {model}.forward keeps something between "
                "calls (a Python attribute or cache it updates) or runs a nondeterministic kernel: make forward a "
                "function of its inputs and weights alone.")
    ran = ", ".join(f"{op} x{n}" for op, n in ops.most_common())
    return (f"{model}.forward draws random numbers ({ran}): torch.rand/randn/randint/bernoulli/multinomial/normal_ in "
            "forward, or dropout kept in train mode (F.dropout(x, p, training=True), or a submodule set back to "
            "train mode inside forward; compile itself puts the model in eval mode). What to do: remove the "
            "randomness for inference (dropout: F.dropout(x, p, training=self.training)); or draw the random values "
            "outside the model and pass them in as an input; noise that may be the same on every call can be drawn "
            "once in __init__ and kept as a buffer. A torch.Generator seeded inside forward makes eager repeat "
            "itself, but no lowering here carries a generator into the engine.")


def _difference(a: Any, b: Any) -> str | None:
    """How two eager outputs for the same leaf differ, or None where they agree (see `same_outputs`)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return f"{type(a).__name__}, then {type(b).__name__}"
        return None if a == b or (a != a and b != b) else f"{a!r}, then {b!r}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype} {tuple(a.shape)}, then {b.dtype} {tuple(b.shape)}"
    if not a.dtype.is_floating_point:
        if torch.equal(a, b):
            return None
        return f"{int((a != b).sum())} of {a.numel()} elements differ"
    eps = torch.finfo(a.dtype).eps
    a, b = a.double(), b.double()
    scale = float(b.nan_to_num(0, 0, 0).abs().max()) if b.numel() else 0.0
    if torch.allclose(a, b, rtol=max(RTOL, 2 * eps), atol=max(ATOL, eps) * scale, equal_nan=True):
        return None
    diff = (a - b).abs().nan_to_num(float("inf"), float("inf"), float("inf"))
    same_nan = torch.isnan(a) & torch.isnan(b)
    diff[same_nan | (a == b)] = 0
    return f"max difference {float(diff.max()):.3g} (largest value {scale:.3g}), {int((diff > 0).sum())} of " \
           f"{a.numel()} elements differ"


class _RandomDraws(TorchDispatchMode):
    """Counts the operations run that draw random numbers (those tagged nondeterministic_seeded), leaving out
    one whose `train`/`training` argument is False (dropout and rrelu in eval mode draw nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and not _switched_off(func, args, kwargs):
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)


def _switched_off(func: Any, args: tuple, kwargs: dict) -> bool:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name in ("train", "training"):
            value = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
            return value is False
    return False
