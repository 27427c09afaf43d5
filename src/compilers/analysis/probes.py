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
                return False, f"{spec.name} of row {k} has shape {tuple(part.shape)} in a batch, {tuple(answer[j].shape)} alone"
            differs = relative_difference(part, answer[j])
            if differs > INDEPENDENCE_RTOL * EPS_RATIO.get(spec.dtype, 1.0):
                return False, (f"{spec.name} of row {k} differs by {differs:.2g} (relative) between the row run with "
                               f"{len(rows) - 1} other(s) and run alone")
    return True, f"{len(rows)} rows answered alike together and alone"


#: positions appended by `padding_independence`
PADDING_CHECKED = 5


def padding_independence(model: torch.nn.Module, signature: Signature, flat: Sequence[Any],
                         pad: Mapping[str, float]) -> tuple[bool, str]:
    """Whether eager answers inputs padded along their dynamic dims (other than the batch) as it answers them
    unpadded, and what shows it: `flat` (one batch), then `flat` with PADDING_CHECKED positions of each input's
    `pad` value appended along each such dim of the inputs in `pad`; outputs compared at the unpadded positions.
    Only then may a server pad requests of different lengths into one call (`[batching.pad]`): a model that
    reads the padding (one ignoring its attention mask, a mean over every position) answers a client otherwise
    for the length of other clients' requests."""
    dims = {d for spec in signature.inputs if spec.name in pad for d in spec.shape
            if isinstance(d, str) and d != signature.batch}
    if not dims:
        return True, "nothing is padded"
    padded = []
    for spec, x in zip(signature.inputs, flat):
        for axis, d in enumerate(spec.shape):
            if d in dims:
                if spec.name not in pad:
                    return False, f"input {spec.name!r} has the padded dim {d!r} but no pad value"
                shape = list(x.shape)
                shape[axis] = PADDING_CHECKED
                x = torch.cat([x, torch.full(shape, pad[spec.name], dtype=x.dtype)], dim=axis)
        padded.append(x)
    eager = FlatModule(model, signature).eval()
    try:
        with torch.inference_mode(), unchanged_state(model):
            plain, longer = list(eager(*flat)), list(eager(*padded))
    except CompilerError:
        raise
    except Exception as e:      # eager refuses the longer inputs (more positions than it has embeddings, say)
        return False, f"eager fails on padded inputs ({type(e).__name__}: {str(e)[:160]})"
    for spec, a, b in zip(signature.outputs, longer, plain):
        for axis, d in enumerate(spec.shape):
            if d in dims:
                a = a.narrow(axis, 0, b.shape[axis])
        if a.shape != b.shape:
            return False, f"{spec.name} has shape {tuple(a.shape)} padded, {tuple(b.shape)} unpadded"
        differs = relative_difference(a, b)
        if differs > INDEPENDENCE_RTOL * EPS_RATIO.get(spec.dtype, 1.0):
            return False, (f"{spec.name} differs by {differs:.2g} (relative) with {PADDING_CHECKED} positions of "
                           f"padding appended along {', '.join(sorted(dims))}")
    return True, f"{PADDING_CHECKED} positions of padding along {', '.join(sorted(dims))} changed no output"


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
