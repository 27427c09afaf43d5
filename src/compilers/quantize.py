"""INT8, what every int8 backend shares: the calibration data it needs and the samples it takes.

The accuracy loop (sensitivity ranking, keeping the worst layers in float) lands here next; today an int8
engine that misses its accuracy contract is refused by validation like any other.
"""
from __future__ import annotations

from dataclasses import dataclass

from .calibration import Calibration
from .errors import InputError
from .target import Target


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
