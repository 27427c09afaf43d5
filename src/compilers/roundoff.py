"""What floating-point arithmetic allows: eager run again with every operation's result perturbed by the
rounding error that another, equally correct implementation of it may make (Monte Carlo arithmetic).

Eager fp32's distance from a float64 run measures the rounding of one implementation: PyTorch's kernels,
whose long reductions sum pairwise and are unusually exact. A compiled engine that folds BatchNorm into its
convolutions, sums a 4096-element mean in another order or uses another GEMM blocking is just as correct and
may land several times further from float64 (a frozen TorchScript conv stack pooled over 64x64 maps: 13x).
`perturbed` runs the model under a dispatch mode that multiplies each floating-point result of every
operation by (1 + u * eps * sqrt(k)), u uniform in [-1, 1], eps the dtype's unit roundoff and k the number of
terms the operation sums into each element (its reduction length: the inner dim of a matmul, a conv's input
channels x kernel, the reduced elements of a mean; 1 for elementwise ops). sqrt(k) * eps is the probabilistic
rounding error bound of a k-term sum in any order (Higham & Mary, SIAM J. Sci. Comput. 2019), so the
perturbed run is a stand-in for "some other correct fp32 implementation of every operation". Its distance from
float64 is what the validator allows beside eager's own noise (`validate.py`).

Draws come from a generator with a fixed seed: the same model and samples give the same allowance.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

#: unit roundoff of each dtype perturbed (float64 is left alone: a model computing in it asked for it)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
SEED = 0

_aten = torch.ops.aten


def _matmul_k(args: tuple) -> int:
    return args[0].shape[-1]


def _addmm_k(args: tuple) -> int:
    return args[1].shape[-1]


def _conv_k(args: tuple) -> int:
    return math.prod(args[1].shape[1:])      # input channels per group x kernel elements


def _softmax_k(args: tuple) -> int:
    return args[0].shape[args[1]] if args[0].dim() else 1


def _norm_k(args: tuple) -> int:
    return math.prod(args[1])                # native_layer_norm's normalized_shape


#: reduction length of the operations whose output is not smaller than their input by exactly that much
_REDUCTION: dict[Any, Callable[[tuple], int]] = {
    _aten.mm: _matmul_k, _aten.bmm: _matmul_k, _aten.addmm: _addmm_k, _aten.baddbmm: _addmm_k,
    _aten.convolution: _conv_k, _aten._convolution: _conv_k,
    _aten._softmax: _softmax_k, _aten._log_softmax: _softmax_k, _aten.native_layer_norm: _norm_k,
}


def reduction_length(func: Any, args: tuple, out: Any) -> int:
    """How many terms `func` sums into each element of its output: from the table above, else the ratio of its
    largest floating-point input to its output (a mean over 4096 pixels: 4096; elementwise: 1)."""
    known = _REDUCTION.get(func.overloadpacket)
    if known is not None:
        try:
            return max(1, int(known(args)))
        except (IndexError, TypeError, AttributeError):
            pass
    sizes = [t.numel() for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    outs = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not sizes or not outs or not outs[0]:
        return 1
    return max(1, max(sizes) // outs[0])


class Perturbed(TorchDispatchMode):
    """The dispatch mode of `perturbed`: every new floating-point result scaled by (1 + u eps sqrt(k))."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out                       # in-place ops and views: their tensors were perturbed where made
        scale = math.sqrt(reduction_length(func, args, out))

        def perturb(t: Any) -> Any:
            eps = UNIT_ROUNDOFF.get(t.dtype) if isinstance(t, torch.Tensor) else None
            if eps is None or t.is_nested or t.device.type != "cpu" or not t.numel():
                return t
            if t.dtype == torch.float32:    # t + t * delta in float32: delta's rounding is 2**-24 of delta itself
                u = torch.rand(t.shape, generator=self.generator, dtype=torch.float32)
                return t.addcmul(t, u.sub_(0.5).mul_(2 * eps * scale))
            u = torch.rand(t.shape, generator=self.generator, dtype=torch.float64).mul_(2).sub_(1)
            return t.double().mul_(u.mul_(eps * scale).add_(1)).to(t.dtype)
        return tree_map(perturb, out)


def perturbed(run: Callable[[], Any]) -> Any:
    """`run()` (an eager call) with every operation's rounding varied as another implementation may round."""
    with Perturbed(torch.Generator().manual_seed(SEED)):
        return run()
