"""Compare compiled outputs with eager ones, per output leaf, and give the verdict."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .target import Tolerance


@dataclass(frozen=True)
class OutputCheck:
    """Worst-case agreement of one output leaf over every sample checked."""

    name: str
    dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float | None = None
    snr_db: float | None = None
    agreement: float = 1.0           # fraction of equal elements (integer / bool outputs)
    needed_atol: float = 0.0         # smallest atol that passes at the target's rtol
    needed_rtol: float = 0.0         # smallest rtol that passes at the target's atol
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class ValidationReport:
    """The verdict of one validation: a row per output leaf, worst case over `samples` inputs."""

    outputs: tuple[OutputCheck, ...]
    samples: int
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "tolerance": self.tolerance.to_dict(),
                "outputs": [asdict(o) for o in self.outputs]}

    def __str__(self) -> str:
        w = max([12] + [len(o.name) for o in self.outputs])
        head = f"{'output':{w}s} {'dtype':8s} {'max abs':>9s} {'max rel':>9s} {'cosine':>9s} {'SNR dB':>7s} " \
               f"{'agree':>6s} {'need atol':>9s} {'need rtol':>9s}  verdict"
        lines = [head]
        for o in self.outputs:
            cos = f"{o.cosine:.6f}" if o.cosine is not None else "-"
            snr = f"{o.snr_db:.1f}" if o.snr_db is not None else "-"
            lines.append(f"{o.name:{w}s} {o.dtype:8s} {o.max_abs:9.2e} {o.max_rel:9.2e} {cos:>9s} {snr:>7s} "
                         f"{o.agreement:6.3f} {o.needed_atol:9.2e} {o.needed_rtol:9.2e}  "
                         f"{'ok' if o.passed else 'FAIL: ' + o.failure}")
        tol = ", ".join(f"{k}={v}" for k, v in self.tolerance.to_dict().items())
        lines.append(f"{self.samples} sample(s); tolerance {tol}; {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def check_output(name: str, ref: Any, got: Any, tol: Tolerance) -> OutputCheck:
    """Agreement of one output leaf on one sample."""
    r, g = _as_numpy(ref), _as_numpy(got)
    dtype = str(ref.dtype).removeprefix("torch.")
    if r.shape != g.shape:
        return OutputCheck(name, dtype, math.inf, math.inf, failure=f"shape {g.shape}, eager gives {r.shape}")
    if not np.issubdtype(r.dtype, np.floating):
        agreement = float((r == g).mean()) if r.size else 1.0
        failure = None if agreement >= tol.min_int_agreement else \
            f"{agreement:.2%} of elements equal, need {tol.min_int_agreement:.2%}"
        diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
        return OutputCheck(name, dtype, float(diff.max(initial=0)), 0.0, agreement=agreement, failure=failure)

    r64, g64 = r.astype(np.float64), g.astype(np.float64)
    if not np.isfinite(g64).all() and not np.array_equal(np.isfinite(g64), np.isfinite(r64)):
        return OutputCheck(name, dtype, math.inf, math.inf, failure="non-finite values where eager has finite ones")
    finite = np.isfinite(r64) & np.isfinite(g64)
    r64, g64 = r64[finite], g64[finite]
    diff = np.abs(r64 - g64)
    mag = np.abs(r64)
    rel = diff / np.maximum(mag, np.finfo(np.float64).tiny)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float(rel.max(initial=0.0))
    rn, gn = np.linalg.norm(r64), np.linalg.norm(g64)
    cosine = float(np.dot(r64, g64) / (rn * gn)) if rn > 0 and gn > 0 else (1.0 if rn == gn else 0.0)
    noise = float(np.sum(diff ** 2))
    snr = math.inf if noise == 0 else 10 * math.log10(max(float(np.sum(r64 ** 2)), 1e-300) / noise)

    atol = tol.atol if tol.atol is not None else 0.0
    rtol = tol.rtol if tol.rtol is not None else 0.0
    needed_atol = float(diff[diff > rtol * mag].max(initial=0.0))
    needed_rtol = float(rel[diff > atol].max(initial=0.0))
    failure = None
    if tol.atol is not None or tol.rtol is not None:
        bad = (diff > atol) & (diff > rtol * mag)
        if bad.any():
            failure = f"{int(bad.sum())} element(s) exceed atol={atol:g} and rtol={rtol:g}"
    if failure is None and tol.min_cosine is not None and cosine < tol.min_cosine:
        failure = f"cosine {cosine:.6f} < {tol.min_cosine}"
    if failure is None and tol.min_snr_db is not None and snr < tol.min_snr_db:
        failure = f"SNR {snr:.1f} dB < {tol.min_snr_db}"
    return OutputCheck(name, dtype, max_abs, max_rel, cosine, snr if math.isfinite(snr) else None,
                       1.0, needed_atol, needed_rtol, failure)


def _worst(a: OutputCheck, b: OutputCheck) -> OutputCheck:
    def lo(x, y):
        return y if x is None else x if y is None else min(x, y)
    return OutputCheck(a.name, a.dtype, max(a.max_abs, b.max_abs), max(a.max_rel, b.max_rel),
                       lo(a.cosine, b.cosine), lo(a.snr_db, b.snr_db), min(a.agreement, b.agreement),
                       max(a.needed_atol, b.needed_atol), max(a.needed_rtol, b.needed_rtol),
                       a.failure or b.failure)


def compare(names: Sequence[str], references: Sequence[Sequence[Any]], results: Sequence[Sequence[Any]],
            tol: Tolerance) -> ValidationReport:
    """Validate flat outputs of several samples: references[i][j] is eager output leaf j of sample i."""
    rows: list[OutputCheck | None] = [None] * len(names)
    for ref, got in zip(references, results):
        for j, (name, r, g) in enumerate(zip(names, ref, got)):
            row = check_output(name, r, g, tol)
            rows[j] = row if rows[j] is None else _worst(rows[j], row)
    return ValidationReport(tuple(r for r in rows if r is not None), len(references), tol)
