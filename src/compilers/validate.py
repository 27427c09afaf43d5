"""The verdict: compiled outputs against the Reference, per output leaf, worst case over the samples.

fp32 targets are judged against the rounding noise of fp32 itself (the "noise" rule). The Reference holds
the eager model's outputs in fp32 and in float64; eager fp32's distance from float64 is the noise that
fp32 arithmetic produces on that output for that model (deep networks produce more). A compiled output
passes when its own distance from float64 stays within `noise` times that, plus a small `floor`:

    ||compiled - exact|| / ||exact||   <=   noise * ||eager - exact|| / ||exact||   +  floor   (RMS)
    max|compiled - exact| / max|exact| <= 2 noise * max|eager - exact| / max|exact| +  floor   (worst element)

(the worst element gets twice the factor: a maximum over few elements is itself a noisy statistic).

Eager's own distance is the rounding of one implementation, PyTorch's, whose long reductions sum pairwise and
are unusually exact on shallow networks; an engine that folds BatchNorm, sums a long mean in another order or
fuses kernels is as correct and may land several times further. So the bound is the larger of the above and
`perturbed` times the distance from float64 of eager run with every operation's rounding varied as another
correct implementation may round it (`roundoff.py`: each result perturbed by its dtype's roundoff times the
square root of the terms it sums). The tolerance's `perturbed` is 2: the perturbation already models any
summation order, so a small factor, and a layer in fp16 is still caught.

    allowed = max(noise * eager noise, perturbed * perturbed noise) + floor     (likewise for the worst element)

Where the model cannot run in float64, or its float64 twin strays further from eager fp32 than rounding
can explain (`MAX_FP32_NOISE`), the "scaled" rule takes fp32 eager as the reference and an assumed noise
of `SCALED_NOISE` (the fp32 noise measured on ResNet-50). Lossy precisions (bf16, int8) are judged
by cosine similarity / SNR per output instead, the cosine taken per batch item where the output has a
batch dim (each item is somebody's request: the worst one must keep the contract); explicit `atol`/`rtol` add an element-wise check against
fp32 eager (an element fails when it exceeds both). Integer and bool outputs must match exactly (or on
`min_int_agreement` of their elements). Non-finite values must sit where eager has them.

The contract for non-finite values: NaN, +Inf and -Inf propagate as eager propagates them. Validation
samples are finite, so `compare` also judges the Reference's NaN/Inf probes (per float input, the first
sample with NaN, +Inf and -Inf planted in it): on each, every float output must hold NaN, +Inf and -Inf at
exactly eager's positions (values elsewhere are not judged). A target whose backend is known to break
this (OpenVINO's CPU plugin maps relu(NaN) to 0, max/clamp drop NaN) says so with `[tolerance]
nonfinite = "report"`: its differences are rows of the report marked "known deviation" instead of failures.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .records import from_json
from .reference import Reference
from .signature import Signature
from .target import Tolerance

#: relative RMS and relative max noise assumed for fp32 when no float64 reference exists (scaled rule)
SCALED_NOISE = (1e-6, 2e-6)
#: eager fp32 this far from its float64 twin is not rounding noise: the model computes something else in
#: float64 (code that branches on the dtype), and the output is judged by the scaled rule instead
MAX_FP32_NOISE = 1e-4
#: a half-precision output's rounding step relative to fp32's (machine epsilon ratio): its noise scales by it
_EPS_RATIO = {"float16": 2.0 ** -10 / 2.0 ** -23, "bfloat16": 2.0 ** -7 / 2.0 ** -23}


@dataclass(frozen=True)
class OutputCheck:
    """Worst-case agreement of one output leaf over every sample checked: what was measured and allowed."""

    name: str
    dtype: str
    rule: str = "exact"              # noise | scaled | lossy | exact (integers, bools)
    error: float = 0.0               # ||compiled - reference|| / ||reference|| (float64 reference where made)
    noise: float | None = None       # eager fp32's own relative RMS error against float64
    order_noise: float | None = None  # the perturbed-rounding run's relative RMS error (roundoff.py)
    allowed: float | None = None     # the bound `error` had to meet
    max_error: float = 0.0           # max|compiled - reference| / max|reference|
    max_allowed: float | None = None
    max_abs: float = 0.0             # max|compiled - eager|, for orientation
    cosine: float | None = None      # worst batch item's cosine to eager (the whole output's without a batch dim)
    snr_db: float | None = None
    agreement: float = 1.0           # fraction of equal elements (integer / bool outputs)
    failure: str | None = None
    judged: str | None = None        # the padding mask whose real positions alone were judged (None: all)

    @property
    def passed(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class Metric:
    """A task metric the compiled model must keep, beside the target's tolerance: `fn(model)` scores
    anything called like the model (higher is better; e.g. accuracy on labelled data) and is run on eager
    once and on each compiled candidate, which passes when it scores at most `max_drop` below eager."""

    fn: Callable[[Any], float]
    max_drop: float = 0.01
    name: str = "metric"


@dataclass(frozen=True)
class MetricCheck:
    """A Metric's scores: eager's, the compiled model's, and the drop allowed."""

    name: str
    eager: float
    compiled: float
    max_drop: float

    @property
    def margin(self) -> float:
        return self.compiled - (self.eager - self.max_drop)

    @property
    def passed(self) -> bool:
        return self.margin >= 0

    def __str__(self) -> str:
        return (f"{self.name}: {self.compiled:.4f} compiled, {self.eager:.4f} eager, drop allowed {self.max_drop:g}: "
                f"{'ok' if self.passed else 'FAIL'}")


@dataclass(frozen=True)
class NonFiniteCheck:
    """Where one float output puts NaN/+Inf/-Inf elsewhere than eager on one NaN/Inf probe."""

    name: str                        # the output
    probe: str                       # which probe ("NaN/Inf probe of x")
    difference: str                  # what differs, e.g. "eager NaN -> finite (0) at 3 element(s)"
    known: bool = False              # a known deviation of the target ([tolerance] nonfinite = "report")

    @property
    def passed(self) -> bool:
        return self.known

    def __str__(self) -> str:
        verdict = "known deviation of this target, reported, not failed ([tolerance] nonfinite = \"report\")" \
            if self.known else ("FAIL: NaN/Inf do not propagate as in eager (where the backend cannot keep them, "
                                "[tolerance] nonfinite = \"report\" records this as a known deviation)")
        return f"{self.name}: {self.probe}: {self.difference}: {verdict}"


@dataclass(frozen=True)
class ValidationReport:
    """The verdict of one validation: a row per output leaf, worst case over `samples` inputs."""

    outputs: tuple[OutputCheck, ...]
    samples: int
    tolerance: Tolerance
    reference: str = ""              # how the exact reference was made, or why there was none
    errors: tuple[str, ...] = ()     # samples on which the compiled model raised instead of answering
    skipped: tuple[str, ...] = ()    # samples left out, and why
    metric: MetricCheck | None = None
    probes: int = 0                  # NaN/Inf probes judged (see the module's docstring)
    nonfinite: tuple[NonFiniteCheck, ...] = ()   # where a probe's non-finite values differ from eager's

    @property
    def passed(self) -> bool:
        return not self.errors and all(o.passed for o in self.outputs) and (self.metric is None or self.metric.passed) \
            and all(c.passed for c in self.nonfinite)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "tolerance": self.tolerance.to_dict(),
                "reference": self.reference, "errors": list(self.errors), "skipped": list(self.skipped),
                "outputs": [asdict(o) for o in self.outputs], "metric": asdict(self.metric) if self.metric else None,
                "probes": self.probes, "nonfinite": [asdict(c) for c in self.nonfinite]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ValidationReport":
        """The verdict saved by `to_dict`, every field checked (ValueError naming the one that is malformed)."""
        return from_json(cls, d, "validation")

    def __str__(self) -> str:
        w = max([12] + [len(o.name) for o in self.outputs])
        lines = [f"{'output':{w}s} {'dtype':8s} {'rule':6s} {'rel err':>9s} {'noise':>9s} {'perturbed':>9s} "
                 f"{'allowed':>9s} {'max err':>9s} {'allowed':>9s} {'max abs':>9s} {'cosine':>9s}  verdict"]
        for o in self.outputs:
            lines.append(f"{o.name:{w}s} {o.dtype:8s} {o.rule:6s} {o.error:9.2e} {_e(o.noise)} {_e(o.order_noise)} "
                         f"{_e(o.allowed)} {o.max_error:9.2e} {_e(o.max_allowed)} {o.max_abs:9.2e} "
                         f"{_f(o.cosine) if o.rule != 'exact' else f'{o.agreement:9.3f}'}  "
                         f"{'ok' if o.passed else 'FAIL: ' + o.failure}")
        lines.extend(f"{o.name}: judged at the positions {o.judged!r} marks real (padding ignored: nobody reads "
                     "it)" for o in self.outputs if o.judged)
        lines.extend(f"non-finite: {c}" for c in self.nonfinite)
        lines.extend(f"error: {e}" for e in self.errors)
        lines.extend(f"skipped: {e}" for e in self.skipped)
        if self.metric is not None:
            lines.append(str(self.metric))
        tol = ", ".join(f"{k}={v}" for k, v in self.tolerance.to_dict().items())
        known = sum(c.known for c in self.nonfinite)
        probes = "" if not self.probes else (
            f"; {self.probes} NaN/Inf probe(s): " + ("NaN/Inf propagate as in eager" if not self.nonfinite else
                                                    f"{len(self.nonfinite)} output(s) differ"
                                                    + (f", {known} a known deviation" if known else "")))
        lines.append(f"{self.samples} sample(s){probes}; reference: {self.reference or 'eager'}; tolerance {tol}; "
                     f"{'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _e(x: float | None) -> str:
    return f"{x:9.2e}" if x is not None else f"{'-':>9s}"


def _f(x: float | None) -> str:
    return f"{x:9.6f}" if x is not None else f"{'-':>9s}"


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _relative(diff: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(||diff|| / ||ref||, max|diff| / max|ref|); 0 for no difference, inf against an all-zero reference."""
    def ratio(num: float, den: float) -> float:
        return 0.0 if num == 0 else (num / den if den > 0 else math.inf)
    return (ratio(float(np.linalg.norm(diff)), float(np.linalg.norm(ref))),
            ratio(float(np.abs(diff).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))))


def _cosine(r: np.ndarray, g: np.ndarray) -> float:
    rn, gn = np.linalg.norm(r), np.linalg.norm(g)
    return float(np.dot(r, g) / (rn * gn)) if rn > 0 and gn > 0 else (1.0 if rn == gn else 0.0)


def _worst_item_cosine(r: np.ndarray, g: np.ndarray, batch_axis: int | None) -> float:
    """The lowest cosine over the items along `batch_axis` (the whole array's without one); non-finite
    elements, which must sit at the same places in both, left out."""
    finite = np.isfinite(r)
    r, g = np.where(finite, r, 0.0), np.where(finite, g, 0.0)
    if batch_axis is None or r.ndim == 0 or r.shape[batch_axis] == 0:
        return _cosine(r.ravel(), g.ravel())
    items = zip(np.moveaxis(r, batch_axis, 0), np.moveaxis(g, batch_axis, 0))
    return min(_cosine(a.ravel(), b.ravel()) for a, b in items)


def _at(judged: np.ndarray, a: np.ndarray) -> np.ndarray:
    """`a` with the positions not judged set to zero: they add nothing to a norm, a dot product or a difference."""
    return np.where(judged, a, np.zeros((), a.dtype))


def check_output(name: str, ref: Any, got: Any, tol: Tolerance, exact: Any = None,
                 batch_axis: int | None = None, varied: Any = None, judged: np.ndarray | None = None) -> OutputCheck:
    """Agreement of one output leaf on one sample: `ref` is eager's output, `exact` the float64 one (or None),
    `varied` eager's under perturbed rounding (or None); the cosine is the worst over the items along `batch_axis`.
    Only the `judged` positions count (a bool array of the output's shape; None: all of them)."""
    r, g = _as_numpy(ref), _as_numpy(got)
    dtype = str(ref.dtype).removeprefix("torch.")
    if r.shape != g.shape:
        return OutputCheck(name, dtype, failure=f"shape {g.shape}, eager gives {r.shape}", error=math.inf,
                           max_error=math.inf, max_abs=math.inf)
    if judged is not None:
        r, g = _at(judged, r), _at(judged, g)
        exact = None if exact is None else _at(judged, _as_numpy(exact))
        varied = None if varied is None else _at(judged, _as_numpy(varied))
    if not np.issubdtype(r.dtype, np.floating):
        equal = (r == g) if judged is None else (r == g)[judged]
        agreement = float(equal.mean()) if equal.size else 1.0
        failure = None if agreement >= tol.min_int_agreement else \
            f"{agreement:.2%} of elements equal, need {tol.min_int_agreement:.2%}"
        diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
        return OutputCheck(name, dtype, max_abs=float(diff.max(initial=0)), agreement=agreement, failure=failure)

    r64, g64 = r.astype(np.float64), g.astype(np.float64)
    if not np.array_equal(np.isfinite(g64), np.isfinite(r64)) or not np.array_equal(np.isnan(g64), np.isnan(r64)):
        return OutputCheck(name, dtype, failure="non-finite values where eager has finite ones, or the reverse",
                           error=math.inf, max_error=math.inf, max_abs=math.inf)
    cosine = _worst_item_cosine(r64, g64, batch_axis)
    finite = np.isfinite(r64)
    r64, g64 = r64[finite], g64[finite]
    x64 = _as_numpy(exact).astype(np.float64)[finite] if exact is not None else None
    diff = g64 - r64
    max_abs = float(np.abs(diff).max(initial=0.0))
    noise_power = float(np.sum(diff ** 2))
    snr = math.inf if noise_power == 0 else 10 * math.log10(max(float(np.sum(r64 ** 2)), 1e-300) / noise_power)
    row = dict(name=name, dtype=dtype, max_abs=max_abs, cosine=cosine, snr_db=snr if math.isfinite(snr) else None)

    failures = []
    if tol.noise is not None:
        fields, failure = _noise_rule(tol, dtype, r.shape, r64, g64, x64, diff, varied, finite)
        row.update(fields)
        if failure:
            failures.append(failure)
    else:
        error, max_error = _relative(diff, r64)
        row.update(rule="lossy", error=error, max_error=max_error)
    if tol.atol is not None or tol.rtol is not None:
        atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
        bad = (np.abs(diff) > atol) & (np.abs(diff) > rtol * np.abs(r64))
        if bad.any():
            failures.append(f"{int(bad.sum())} element(s) exceed atol={atol:g} and rtol={rtol:g}")
    if tol.min_cosine is not None and cosine < tol.min_cosine:
        failures.append(f"cosine {cosine:.6f} < {tol.min_cosine}"
                        + (" (worst batch item)" if batch_axis is not None and r.ndim else ""))
    if tol.min_snr_db is not None and snr < tol.min_snr_db:
        failures.append(f"SNR {snr:.1f} dB < {tol.min_snr_db}")
    return OutputCheck(**row, failure="; ".join(failures) or None)


def _noise_rule(tol: Tolerance, dtype: str, shape: tuple, r64: np.ndarray, g64: np.ndarray, x64: np.ndarray | None,
                diff: np.ndarray, varied: Any, finite: np.ndarray) -> tuple[dict[str, Any], str | None]:
    """The fp32 rule (README "Validation") on one output's finite elements: the compiled error against float64
    within `noise`x eager's own (or `perturbed`x eager's under perturbed rounding) + `floor`; the scaled rule
    where eager's own noise is too large to measure by. The OutputCheck fields it sets, and the failure or None."""
    # half-precision outputs (a model computing in fp16/bf16 itself) carry their own dtype's rounding noise
    scale = _EPS_RATIO.get(dtype, 1.0)
    noise, max_noise = _relative(r64 - x64, x64) if x64 is not None else (math.inf, math.inf)
    if noise <= min(MAX_FP32_NOISE * scale, 0.05):   # the noise rule: vs float64, against eager's own distance
        error, max_error = _relative(g64 - x64, x64)
        rule = "noise"
    else:                 # the scaled rule: compiled vs eager, against an assumed rounding noise of the dtype
        error, max_error = _relative(diff, r64)
        noise, max_noise = SCALED_NOISE[0] * scale, SCALED_NOISE[1] * scale
        rule = "scaled"
    allowed, max_allowed = tol.noise * noise, 2 * tol.noise * max_noise
    failure = None   # or what went over
    order_noise = None
    if varied is not None and _as_numpy(varied).shape == shape:
        v64 = _as_numpy(varied).astype(np.float64)[finite]
        base = x64 if rule == "noise" else r64
        if np.isfinite(v64).all():
            order_noise, order_max = _relative(v64 - base, base)
            allowed = max(allowed, tol.perturbed * order_noise)
            max_allowed = max(max_allowed, 2 * tol.perturbed * order_max)
    allowed, max_allowed = allowed + tol.floor, max_allowed + tol.floor
    if error > allowed:
        kind = "fp32" if scale == 1.0 else dtype
        order = "" if order_noise is None else f", or {tol.perturbed:g}x perturbed-rounding noise {order_noise:.1e},"
        failure = (f"error {error:.2e} > {allowed:.2e} allowed ({tol.noise:g}x {kind} noise {noise:.1e}"
                   f"{order} + {tol.floor:g})")
    elif max_error > max_allowed:
        failure = f"worst element error {max_error:.2e} > {max_allowed:.2e} allowed"
    return dict(rule=rule, error=error, noise=noise if rule == "noise" else None, order_noise=order_noise,
                allowed=allowed, max_error=max_error, max_allowed=max_allowed), failure


def _worst(a: OutputCheck, b: OutputCheck) -> OutputCheck:
    """Two samples' rows as one: each measured/allowed pair is taken from the sample nearer its bound."""
    def lo(x, y):
        return y if x is None else x if y is None else min(x, y)

    def nearer(error: str, allowed: str) -> OutputCheck:
        def share(o: OutputCheck) -> float:
            bound = getattr(o, allowed)
            return getattr(o, error) / bound if bound else getattr(o, error)
        return a if share(a) >= share(b) else b
    rms, worst = nearer("error", "allowed"), nearer("max_error", "max_allowed")
    return OutputCheck(a.name, a.dtype, a.rule if a.rule == b.rule else f"{a.rule}/{b.rule}",
                       rms.error, rms.noise, rms.order_noise, rms.allowed, worst.max_error, worst.max_allowed,
                       max(a.max_abs, b.max_abs), lo(a.cosine, b.cosine), lo(a.snr_db, b.snr_db),
                       min(a.agreement, b.agreement), a.failure or b.failure)


def compare(signature: Signature, reference: Reference, results: Sequence[Sequence[Any] | None], tol: Tolerance,
            errors: Sequence[str] = (), skipped: Sequence[str] = ()) -> ValidationReport:
    """The verdict on flat compiled outputs `results[i]` for `reference.samples[i]` (None: sample skipped), per
    output of `signature`: the cosine per item along its batch dim, at the positions its padding mask marks
    real (`Signature.judged`)."""
    names, specs = signature.output_names, signature.outputs
    axes = [signature.batch_axis(spec) for spec in specs]
    masked = [signature.mask_axes(spec) for spec in specs]
    rows: list[OutputCheck | None] = [None] * len(names)
    checked = 0
    n = len(reference.outputs) - reference.probes
    varied = list(reference.perturbed[:n]) + [None] * (n - len(reference.perturbed[:n]))
    for flat, ref, exact, vary, got in zip(reference.samples[:n], reference.outputs[:n], reference.exact[:n], varied,
                                           results[:n]):
        if got is None:
            continue
        checked += 1
        for j, name in enumerate(names):
            judged = signature.judged(specs[j], flat, ref[j]) if masked[j] else None
            row = check_output(name, ref[j], got[j], tol, exact[j] if exact is not None else None, axes[j],
                               vary[j] if vary is not None else None, judged)
            rows[j] = row if rows[j] is None else _worst(rows[j], row)
    rows = [r if r is None or masked[j] is None else replace(r, judged=masked[j][0]) for j, r in enumerate(rows)]
    nonfinite, probes = [], 0
    for label, flat, ref, got in zip(reference.labels[n:], reference.samples[n:], reference.outputs[n:], results[n:]):
        if got is None:   # the compiled model raised on the probe: that is among `errors`
            continue
        probes += 1
        for j, name in enumerate(names):
            judged = signature.judged(specs[j], flat, ref[j]) if masked[j] else None
            difference = nonfinite_difference(ref[j], got[j], judged)
            if difference is not None:
                nonfinite.append(NonFiniteCheck(name, label, difference, known=tol.nonfinite == "report"))
    return ValidationReport(tuple(r for r in rows if r is not None), checked, tol, reference.note, tuple(errors),
                            tuple(skipped) + tuple(reference.probe_notes), probes=probes, nonfinite=tuple(nonfinite))


_CLASSES = ("finite", "NaN", "+Inf", "-Inf")


def nonfinite_difference(ref: Any, got: Any, judged: np.ndarray | None = None) -> str | None:
    """How a float output's NaN/+Inf/-Inf positions differ from eager's `ref` (None: they agree, or the
    output is not float, or its shape differs, which the samples judge), at the `judged` positions (all: None)."""
    r, g = _as_numpy(ref), _as_numpy(got)
    if not np.issubdtype(r.dtype, np.floating) or r.shape != g.shape:
        return None
    if judged is not None:
        r, g = _at(judged, r), _at(judged, g)
    g = g.astype(r.dtype, copy=False) if np.issubdtype(g.dtype, np.floating) else g.astype(np.float64)

    def classes(a: np.ndarray) -> np.ndarray:
        return np.select([np.isnan(a), np.isposinf(a), np.isneginf(a)], [1, 2, 3], 0)
    rc, gc = classes(r), classes(g)
    differ = rc != gc
    if not differ.any():
        return None
    parts = []
    for a in range(4):
        for b in range(4):
            where = differ & (rc == a) & (gc == b)
            if where.any():
                example = f" ({g[where].flat[0]:g})" if b == 0 else ""
                parts.append(f"eager {_CLASSES[a]} -> {_CLASSES[b]}{example} at {int(where.sum())} element(s)")
    return "; ".join(parts)


def margin(result: ValidationReport) -> float:
    """How far the worst output lies inside (> 0) or outside (< 0) a lossy contract: cosine above
    `min_cosine`, integer agreement above `min_int_agreement`, SNR above `min_snr_db` (per 100 dB), and
    the task metric above eager's score less its allowed drop."""
    tol, worst = result.tolerance, math.inf
    if result.errors:
        return -math.inf
    if result.metric is not None:
        worst = result.metric.margin
    for o in result.outputs:
        if o.rule == "exact":
            worst = min(worst, o.agreement - tol.min_int_agreement)
            continue
        if tol.min_cosine is not None:
            worst = min(worst, (o.cosine if o.cosine is not None else -1.0) - tol.min_cosine)
        if tol.min_snr_db is not None:
            worst = min(worst, ((o.snr_db if o.snr_db is not None else math.inf) - tol.min_snr_db) / 100)
    return worst
