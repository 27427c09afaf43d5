"""What the compiled model is judged against: eager outputs on the validation samples, computed once.

`Reference` holds, per sample, the eager model's outputs in its own precision and, where the model can
run in float64, the outputs of a float64 twin of it. The float64 outputs are the closest thing to the
exact answer: eager fp32's own distance from them measures how much rounding noise fp32 arithmetic
produces on each output, and a compiled model is judged against that noise (see `validate.py`).
Beside them, per sample, eager fp32 once more with every operation's rounding perturbed as another correct
implementation may round it (`roundoff.perturbed`): how far fp32 arithmetic in any summation order may land,
which the validator allows beside eager's own noise. Padding masks (`Signature.masks`) are honoured here too.
Compile builds one Reference and reuses it for every validation (and an accuracy loop may rebuild the
engine many times against it).

After the samples come the NaN/Inf probes: per float input, the first sample with a few elements of that
input set to NaN, +Inf and -Inf. They are judged only on where non-finite values appear in each float
output (the contract: NaN and +/-Inf propagate as eager propagates them; see `validate.compare`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import CompilerError, InputError
from .progress import track
from .roundoff import perturbed
from .capture import EagerRun
from .determinism import check_repeatable
from .signature import FlatModule, Signature
from .state import unchanged_state

#: a float64 twin is made only for models whose float64 weights fit in this many bytes
MAX_FLOAT64_BYTES = 4 << 30


@dataclass(frozen=True)
class Reference:
    """Eager outputs for flat validation samples; `exact[i]` is None where no float64 run was made."""

    labels: tuple[str, ...]          # what each sample is: "example", "grown example", "sample 2", ...
    samples: tuple[list[Any], ...]
    outputs: tuple[list[torch.Tensor], ...]
    exact: tuple[list[torch.Tensor] | None, ...]
    note: str                        # how the exact outputs were made, or why there are none
    #: per sample, eager fp32 with each operation's rounding varied as another correct implementation may round
    #: (`roundoff.perturbed`); None where it could not run
    perturbed: tuple[list[torch.Tensor] | None, ...] = ()
    metric: tuple[Any, float] | None = None   # a task metric (validate.Metric) and eager's score on it
    probes: int = 0                  # the last `probes` samples are NaN/Inf probes (non-finite pattern only)
    probe_notes: tuple[str, ...] = ()   # probes left out, and why


def compute_reference(model: torch.nn.Module, signature: Signature, runs: Sequence[tuple[str, EagerRun]] = (),
                      samples: Sequence[tuple[str, Sequence[Any]]] = (), *, float64: bool = True) -> Reference:
    """The Reference over eager `runs` already made and fresh flat `samples` (each with its label): eager
    outputs, plus the float64 twin's where `float64` is set and the model runs in float64.
    InputError if eager fails on a sample. The first input must be one eager was seen to answer twice alike
    (`determinism.check_repeatable`)."""
    labels = [label for label, _ in runs] + [label for label, _ in samples]
    inputs = [run.inputs for _, run in runs] + [list(flat) for _, flat in samples]
    outputs = [list(run.outputs) for _, run in runs]
    outputs += eager_outputs(model, signature, samples, "validation", "eager reference")
    exact, note = _float64_outputs(model, signature, inputs) if float64 else (None, "no float64 reference asked for")
    exact = list(exact) if exact is not None else [None] * len(inputs)
    # Callers first check that eager repeats itself on the first input (capture, `repeatable_run`), and the order
    # matters: a random model's randomness would show here as the perturbed run's distance from float64, and the
    # allowance, twice that distance, would grow to fit any compiled output (and the float64 twin draws other
    # random numbers, so eager's own noise would swell too).
    varied = _perturbed_outputs(model, signature, inputs)
    probes, probe_notes = nonfinite_probes(model, signature, inputs[0]) if inputs else ([], [])
    for label, flat, out in probes:
        labels.append(label)
        inputs.append(flat)
        outputs.append(out)
        exact.append(None)
    return Reference(tuple(labels), tuple(inputs), tuple(outputs), tuple(exact), note, tuple(varied),
                     probes=len(probes), probe_notes=tuple(probe_notes))


#: the non-finite values a probe plants in a float input, and where (as a fraction of its flat size)
PROBE_VALUES = ((0.5, math.inf), (1.0, -math.inf), (0.0, math.nan))   # NaN wins where they meet


def probe_label(name: str) -> str:
    return f"NaN/Inf probe of {name}"


def nonfinite_probes(model: torch.nn.Module, signature: Signature, flat: Sequence[Any]
                     ) -> tuple[list[tuple[str, list[Any], list[torch.Tensor]]], list[str]]:
    """Per float input of `flat`: (label, the inputs with NaN, +Inf and -Inf planted in that input at its
    first, middle and last element, eager's outputs on them), and why any probe was left out."""
    probes, notes = [], []
    eager = FlatModule(model, signature).eval()
    for i, x in enumerate(flat):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
            continue
        name = signature.inputs[i].name if i < len(signature.inputs) else f"input {i}"
        probed = x.detach().clone()
        view = probed.view(-1)
        # at real positions only where a padding mask covers the input (what sits at padding is not the input)
        judged = signature.judged(signature.inputs[i], flat, x) if i < len(signature.inputs) else None
        places = np.flatnonzero(judged) if judged is not None else None
        if places is not None and not places.size:
            continue
        for where, value in PROBE_VALUES:
            if places is None:
                view[round(where * (view.numel() - 1))] = value
            else:
                view[int(places[round(where * (places.size - 1))])] = value
        inputs = list(flat)
        inputs[i] = probed
        try:
            with torch.inference_mode(), unchanged_state(model):
                out = list(eager(*inputs))
        except CompilerError:
            raise
        except Exception as e:   # eager itself refuses non-finite inputs: nothing to compare with
            notes.append(f"{probe_label(name)}: eager fails on it ({type(e).__name__}: {str(e)[:160]})")
            continue
        probes.append((probe_label(name), inputs, out))
    return probes, notes


def repeatable_run(model: torch.nn.Module, signature: Signature, label: str, flat: Sequence[Any]) -> EagerRun:
    """Eager on the validation sample `flat`, called twice: the run, or InputError where the two calls differ
    (`determinism.check_repeatable`). Made before `compute_reference`, whose noise estimate would absorb a random
    model's randomness."""
    run = EagerRun(list(flat), eager_outputs(model, signature, [(label, flat)], "validation", "eager")[0])
    eager = FlatModule(model, signature).eval()
    check_repeatable(model, lambda: eager(*run.inputs), run.outputs, [s.name for s in signature.outputs])
    return run


def eager_outputs(model: torch.nn.Module, signature: Signature, samples: Sequence[tuple[str, Sequence[Any]]],
                  what: str, progress: str) -> list[list[torch.Tensor]]:
    """Eager's flat outputs on the labelled flat `samples` of the `what` set (a `progress` bar on a terminal);
    InputError naming the first sample eager fails on."""
    eager = FlatModule(model, signature).eval()
    outputs = []
    with torch.inference_mode(), unchanged_state(model):
        for label, flat in track(samples, len(samples), progress):
            try:
                outputs.append(list(eager(*flat)))
            except CompilerError:
                raise
            except Exception as e:
                raise InputError(f"{what} {label} makes the eager model fail ({type(e).__name__}: "
                                 f"{str(e)[:300]}); give samples the model accepts") from None
    return outputs


def _perturbed_outputs(model: torch.nn.Module, signature: Signature,
                       samples: Sequence[Sequence[Any]]) -> list[list[torch.Tensor] | None]:
    """Per sample, eager's outputs under `roundoff.perturbed` (None for a sample it fails on)."""
    eager = FlatModule(model, signature).eval()
    varied: list[list[torch.Tensor] | None] = []
    with torch.inference_mode(), unchanged_state(model):
        for flat in track(samples, len(samples), "rounding noise"):
            try:
                varied.append(list(perturbed(lambda: eager(*flat))))
            except CompilerError:
                raise
            except Exception:   # an operation the mode cannot run: that sample keeps eager's noise alone
                varied.append(None)
    return varied


def _float64_outputs(model: torch.nn.Module, signature: Signature,
                     samples: Sequence[Sequence[Any]]) -> tuple[list[list[torch.Tensor]] | None, str]:
    """The outputs of a float64 copy of `model` on float64 copies of the samples, or None and why not."""
    state = list(model.parameters()) + list(model.buffers())
    if not any(t.is_floating_point() for t in state) and not any(
            isinstance(x, torch.Tensor) and x.is_floating_point() for flat in samples for x in flat):
        return None, "no float weights or inputs: nothing for float64 to refine"
    size = sum(t.numel() for t in state if t.is_floating_point()) * 8
    if size > MAX_FLOAT64_BYTES:
        return None, f"a float64 copy of the model would take {size / 2**30:.1f} GiB (limit {MAX_FLOAT64_BYTES / 2**30:.0f} GiB)"
    try:
        twin = FlatModule(copy.deepcopy(model).double(), signature).eval()
        with torch.inference_mode():
            return [list(twin(*[_float64(x) for x in flat]))
                    for flat in track(samples, len(samples), "float64 reference")], "float64 eager"
    except Exception as e:   # a model that pins dtypes (x.float(), fp32-only ops) cannot run in float64
        return None, f"the model does not run in float64 ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


def _float64(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
