"""INT8, what every int8 backend shares: the calibration data it takes, and the accuracy loop.

The loop: when the quantized model misses the target's accuracy contract on the validation samples,
measure how much keeping each quantized layer alone in float would help (its sensitivity: the growth of
the contract margin on those samples), then keep the most sensitive layers in float, most sensitive first,
until the contract holds or `max_float_layers` is reached. Sensitivity is measured on the validation
samples, not on the calibration data: int8 error shows where the contract is judged (MiniLM calibrated
on single sentences loses accuracy on padded batches, and only those rank its layers usefully). A backend takes part by listing its quantized layers and by rebuilding
with a set of them in float (`Backend.quantized_layers`, `keep_float`, and `probe_float`, a quick
approximation for ranking).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .calibration import Calibration
from .errors import InputError
from .reference import eager_outputs
from .signature import Signature
from .target import Target
from .validate import ValidationReport, margin


@dataclass(frozen=True)
class CalibrationPlan:
    """The calibration samples an int8 build uses, and what the report should say about them."""

    samples: tuple[list, ...]
    notes: tuple[str, ...]


def plan_calibration(target: Target, calibration: Calibration | None) -> CalibrationPlan:
    """The first `quantization.samples` calibration samples; InputError when an int8 target gets none."""
    scheme = target.quantization
    if calibration is None or not len(calibration):
        raise InputError(f"target {target.name!r} quantizes to int8 and needs calibration data: "
                         f"compile(..., calibration=samples) with up to {scheme.samples} representative inputs "
                         "shaped like example_inputs (a list, or a DataLoader yielding them)")
    used = calibration.samples[:scheme.samples]
    notes = [f"calibrated on {len(used)} sample(s)"]
    if len(used) < scheme.samples:
        notes.append(f"the scheme asks for {scheme.samples} calibration samples, {len(used)} given: ranges may "
                     "miss values production inputs reach; give more representative samples")
    return CalibrationPlan(used, tuple(notes))


def check_in_eager(model: torch.nn.Module, signature: Signature, plan: CalibrationPlan) -> None:
    """Run eager on every calibration sample first: one it fails on is an InputError naming it, before a
    backend's calibration stumbles over it."""
    eager_outputs(model, signature, [(f"sample {i}", flat) for i, flat in enumerate(plan.samples)], "calibration",
                  "calibration samples in eager")


@dataclass
class LoopReport:
    """What the accuracy loop did: layers quantized, those kept in float (with their sensitivity: how much
    the contract margin grows when that layer alone stays float), the contract margin before and after
    (worst cosine minus min_cosine, or agreement minus min_int_agreement), and its time."""

    layers: int
    kept_float: list[tuple[str, float]] = field(default_factory=list)
    margin_before: float = 0.0
    margin_after: float = 0.0
    passed: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        kept = ", ".join(f"{name} (+{s:.4f})" for name, s in self.kept_float) or "none"
        return (f"{self.layers} layers quantized; kept in float: {kept}; contract margin {self.margin_before:+.4f} -> "
                f"{self.margin_after:+.4f} ({'met' if self.passed else 'missed'}); {self.seconds:.1f}s")


def accuracy_loop(build: Callable[[tuple[str, ...]], Any], probe: Callable[[str], Any], layers: Sequence[str],
                  judge: Callable[[Any], ValidationReport],
                  max_float: int) -> tuple[Any, LoopReport | None, ValidationReport]:
    """The compiled model `build(())`, or, when `judge` refuses it, `build(kept)` with the most sensitive
    layers in float, as few as `judge` accepts (at most `max_float`; the last one tried when none is
    accepted); with `judge`'s verdict on it. `probe(layer)` is a quick build with that layer in float, to
    rank layers. The LoopReport is None when the first build passed."""
    t0 = time.perf_counter()
    first = build(())
    result = judge(first)
    if result.passed or not layers:
        return first, None, result
    base = margin(result)
    report = LoopReport(len(layers), margin_before=base)
    sensitivity = {layer: margin(judge(probe(layer))) - base for layer in layers}
    cm, kept = first, []
    for layer in sorted(layers, key=lambda name: -sensitivity[name])[:max_float]:
        if sensitivity[layer] <= 0:      # keeping it in float does not help: neither will the rest
            break
        kept.append(layer)
        cm = build(tuple(kept))
        result = judge(cm)
        if result.passed:
            break
    report.kept_float = [(layer, sensitivity[layer]) for layer in kept]
    report.margin_after, report.passed = margin(result), result.passed
    report.seconds = time.perf_counter() - t0
    return cm, report, result
