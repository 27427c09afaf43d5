"""The sampled probes that confirm what the graph analysis proves (they never prove it: a probe sees the
samples it runs): eager's answer to rows run together and each alone (`batch_independence`), and to inputs
padded and unpadded (`padding_independence`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import CompilerError
from ..signature import FlatModule, Signature
from ..state import unchanged_state


#: rows compared at most by `batch_independence`
INDEPENDENCE_ROWS = 4
#: a row's output may differ this much (relative RMS, in fp32; scaled for half precision) between being run with
#: other rows and alone: summation order, never a row's content (a batch mean moves outputs by O(1))
INDEPENDENCE_RTOL = 1e-5


def batch_independence(model: torch.nn.Module, signature: Signature,
                       flats: Sequence[Sequence[Any]]) -> tuple[bool | None, str]:
    """Whether eager answers each row of a batch as it answers that row alone, and what shows it: up to
    INDEPENDENCE_ROWS rows taken from `flats` (the example, then the samples; when they hold only one row, that
    row flipped along its last dim as a second) run together and each alone. None (unknown) for a model without
    a batch dim in every output, or when eager fails on rows alone. A model whose rows mix (`y - y.mean(0)`,
    softmax over the batch) gives False: a server must not run other clients' requests with its own."""
    out_axes = [signature.batch_axis(s) for s in signature.outputs]
    if signature.batch is None or any(a is None for a in out_axes):
        return None, "the outputs have no batch dim"
    rows = _rows(signature, flats)
    if not rows:
        return None, "no sample to take rows from"
    if len(rows) == 1:
        rows.append([_flipped(x) if axis is not None else x
                     for x, axis in zip(rows[0], (signature.batch_axis(s) for s in signature.inputs))])
    axes = [signature.batch_axis(s) for s in signature.inputs]
    batch = [torch.cat([r[i] for r in rows], dim=axis) if axis is not None else rows[0][i]
             for i, axis in enumerate(axes)]
    eager = FlatModule(model, signature).eval()
    try:
        with torch.inference_mode(), unchanged_state(model):
            together = list(eager(*batch))
            alone = [list(eager(*row)) for row in rows]
    except CompilerError:
        raise
    except Exception as e:      # eager refuses rows alone, or rows together: nothing to tell them apart by
        return None, f"eager fails on rows run alone or together ({type(e).__name__}: {str(e)[:160]})"
    for k, (row, answer) in enumerate(zip(rows, alone)):
        for j, (spec, axis) in enumerate(zip(signature.outputs, out_axes)):
            part = together[j].narrow(axis, k, 1)
            if part.shape != answer[j].shape:
                return False, (f"{spec.name} of row {k} has shape {tuple(part.shape)} in a batch, "
                               f"{tuple(answer[j].shape)} alone")
            differs = relative_difference(part, answer[j])
            if differs > INDEPENDENCE_RTOL * EPS_RATIO.get(spec.dtype, 1.0):
                return False, (f"{spec.name} of row {k} differs by {differs:.2g} (relative) between the row run with "
                               f"{len(rows) - 1} other(s) and run alone")
    return True, f"{len(rows)} rows answered alike together and alone"


#: items of the example `padding_independence` runs alone, at most
PADDING_ITEMS = 8
#: positions beyond the longest item of the example that `padding_independence` pads the batch to (and twice it)
PADDING_CHECKED = (1, 5)


def padding_independence(model: torch.nn.Module, signature: Signature, flat: Sequence[Any],
                         pad: Mapping[str, float]) -> tuple[bool, str]:
    """Whether eager answers each item of the example batch `flat` alone and unpadded as it answers it inside the
    batch padded further, and what shows it: each item (up to PADDING_ITEMS) cut to its real length (one past its
    last position where a padded input differs from its `pad` value) and run alone; the batch padded to the
    longest item plus each of PADDING_CHECKED positions, and to twice the longest (within the padded dim's
    range); each item's outputs compared at its real positions. Only then may a server pad requests of
    different lengths into one call: a model that reads its padding (a mean or max over every position, a
    model ignoring its mask) answers a client otherwise for the length of other clients' requests."""
    dims = {d for spec in signature.inputs if spec.name in pad for d in spec.shape
            if isinstance(d, str) and d != signature.batch}
    if not dims:
        return True, "nothing is padded"
    if len(dims) > 1 or signature.batch is None:
        return False, ("padding along several dims is not checked" if len(dims) > 1 else
                       "the inputs have no batch dim to tell the items apart")
    dim = dims.pop()
    where: list[tuple[int, int] | None] = []       # (batch axis, padded axis) of each input that is padded
    for spec in signature.inputs:
        if dim not in spec.shape:
            where.append(None)
            continue
        if spec.name not in pad:
            return False, f"input {spec.name!r} has the padded dim {dim!r} but no pad value"
        if signature.batch_axis(spec) is None:
            return False, f"input {spec.name!r} has the padded dim {dim!r} but no batch dim"
        where.append((signature.batch_axis(spec), spec.shape.index(dim)))
    out_axes = [signature.batch_axis(s) for s in signature.outputs]
    if any(a is None for a in out_axes):
        return False, "an output has no batch dim, so a padded batch cannot be split back into items"
    lengths = _real_lengths(signature, flat, where, pad)
    longest = max(lengths)
    high = signature.dims[dim].max if dim in signature.dims else None
    targets = sorted({n for n in [*(longest + k for k in PADDING_CHECKED), 2 * longest]
                      if high is None or n <= high} | {longest})
    items = [b for b, n in enumerate(lengths) if n > 0][:PADDING_ITEMS]
    eager = FlatModule(model, signature).eval()
    try:
        with torch.inference_mode(), unchanged_state(model):
            alone = [list(eager(*[x if w is None else x.narrow(w[0], b, 1).narrow(w[1], 0, lengths[b])
                                  for x, w in zip(flat, where)])) for b in items]
            padded = {n: list(eager(*[x if w is None else _padded_to(x, w[1], longest, n, pad[spec.name])
                                      for x, w, spec in zip(flat, where, signature.inputs)])) for n in targets}
    except CompilerError:
        raise
    except Exception as e:      # eager refuses an item alone, or the longer inputs (more positions than it embeds)
        return False, f"eager fails on an item alone or padded ({type(e).__name__}: {str(e)[:160]})"
    for n, outputs in padded.items():
        for k, b in enumerate(items):
            for spec, axis, together, own in zip(signature.outputs, out_axes, outputs, alone[k]):
                part = together.narrow(axis, b, 1)
                for d, name in enumerate(spec.shape):
                    if name == dim:
                        part = part.narrow(d, 0, lengths[b])
                if part.shape != own.shape:
                    return False, (f"{spec.name} of item {b} has shape {tuple(part.shape)} in a batch padded to {n}, "
                                   f"{tuple(own.shape)} alone")
                differs = relative_difference(part, own)
                if differs > INDEPENDENCE_RTOL * EPS_RATIO.get(spec.dtype, 1.0):
                    return False, (f"{spec.name} of item {b} ({lengths[b]} long) differs by {differs:.2g} (relative) "
                                   f"between the item alone and in a batch padded to {n} along {dim}")
    return True, (f"{len(items)} item(s) answered alike alone and in batches padded to "
                  f"{', '.join(map(str, targets))} along {dim}")


def _real_lengths(signature: Signature, flat: Sequence[Any], where: list[tuple[int, int] | None],
                  pad: Mapping[str, float]) -> list[int]:
    """Each item's real length: one past its last position where some padded input differs from its pad value."""
    rows = int(signature.dim_sizes(flat)[signature.batch])
    lengths = [0] * rows
    for x, w, spec in zip(flat, where, signature.inputs):
        if w is None:
            continue
        real = (x != pad[spec.name]).movedim((w[0], w[1]), (0, 1)).reshape(rows, x.shape[w[1]], -1).any(-1)
        positions = torch.arange(1, real.shape[1] + 1)
        lengths = [max(n, int((positions * r).max())) for n, r in zip(lengths, real)]
    return lengths


def _padded_to(x: torch.Tensor, axis: int, longest: int, size: int, value: float) -> torch.Tensor:
    """`x` cut to `longest` along `axis`, then padded with `value` to `size`."""
    x = x.narrow(axis, 0, min(longest, x.shape[axis]))
    shape = list(x.shape)
    shape[axis] = size - x.shape[axis]
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=axis)


EPS_RATIO = {torch.float16: 2.0 ** 13, torch.bfloat16: 2.0 ** 16}


def _rows(signature: Signature, flats: Sequence[Sequence[Any]]) -> list[list[torch.Tensor]]:
    """Single-row flat inputs from `flats` that may share a batch with the first: the same sizes of every other
    dynamic dim, and equal inputs without a batch dim."""
    axes = [signature.batch_axis(s) for s in signature.inputs]

    def key(flat: Sequence[Any]) -> tuple:
        sizes = signature.dim_sizes(flat)
        fixed = tuple(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if isinstance(x, torch.Tensor)
                      else repr(x)
                      for x, axis in zip(flat, axes) if axis is None)
        return tuple(sorted((d, n) for d, n in sizes.items() if d != signature.batch)), fixed
    rows: list[list[torch.Tensor]] = []
    first = None
    for flat in flats:
        if not all(isinstance(x, torch.Tensor) for x in flat):
            continue
        if first is None:
            first = key(flat)
        elif key(flat) != first:
            continue
        for r in range(int(signature.dim_sizes(flat)[signature.batch])):
            rows.append([x.narrow(axis, r, 1) if axis is not None else x for x, axis in zip(flat, axes)])
            if len(rows) == INDEPENDENCE_ROWS:
                return rows
    return rows


def _flipped(x: torch.Tensor) -> torch.Tensor:
    """Another row like `x`: its values reversed along the last dim (rolled by one where that changes nothing)."""
    if x.dim() == 0 or x.shape[-1] < 2:
        return x.clone()
    flipped = x.flip(-1)
    return flipped if not torch.equal(flipped, x) else x.roll(1, -1)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over finite elements (inf where NaN/Inf sit elsewhere); 0 for equal integer tensors."""
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        return 0.0 if torch.equal(a, b) else float("inf")
    a, b = a.double(), b.double()
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)) or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    finite = torch.isfinite(b)
    diff, ref = float(torch.linalg.vector_norm((a - b)[finite])), float(torch.linalg.vector_norm(b[finite]))
    return 0.0 if diff == 0 else diff / ref if ref > 0 else float("inf")
