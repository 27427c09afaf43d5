"""What compile leaves as it found it: each submodule's train/eval mode, and every parameter and buffer (a
model that writes into its own state in forward is stopped before the write, and refused)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CompilerError, InputError


def train_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Each module's own train/eval flag, for `restore_modes` (`model.train(flag)` would set them all alike)."""
    return [(m, m.training) for m in model.modules()]


_MODE_DEPENDENT = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
                   torch.nn.modules.instancenorm._InstanceNorm, torch.nn.RReLU)


def train_mode_note(modes: Sequence[tuple[torch.nn.Module, bool]]) -> str | None:
    """What a model left in train mode gets compiled as (eval), said in the report and as a warning: its
    BatchNorm / Dropout layers in training would act otherwise in eager."""
    training = sorted({type(m).__name__ for m, flag in modes if flag and isinstance(m, _MODE_DEPENDENT)})
    if not training:
        return None
    note = (f"compiled for inference (eval mode): the model has {', '.join(training)} layer(s) in train mode, "
            "which eager would run with batch statistics / dropout; call model.eval() to compare like with like")
    warnings.warn(note, RuntimeWarning, stacklevel=3)
    return note


def restore_modes(modes: Sequence[tuple[torch.nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


class _StateWrite(CompilerError):
    """Raised inside the model's forward by _StateGuard (not a TypeError, which `x += 1` would turn into an
    out-of-place retry); `unchanged_state` gives it to the caller as an InputError."""


_REFUSAL = ("a compiled engine keeps no state between calls, so it would compute with that state frozen as it is "
            "now while eager's changes with every call. Keep such state outside the model (take it as an input and "
            "return the new value) or compute it out of place. The model was not changed")


class _StateGuard(TorchDispatchMode):
    """Refuses any operation that would write into the model's parameters or buffers (an in-place update, a
    copy into them, an `out=` into them), before it writes: compile runs the model, and must leave it as it
    found it; and a compiled engine, which keeps no state between calls, cannot do what such a model does."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model_name = type(model).__name__
        self.names: dict[int, str] = {}
        for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                            ("buffer", model.named_buffers(remove_duplicate=False))):
            for name, t in named:
                if t is not None and t.numel() and not t.is_meta:
                    self.names.setdefault(t.untyped_storage().data_ptr(), f"{kind} {name!r}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None or not arg.alias_info.is_write:
                    continue
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    name = self._state(t)
                    if name is not None:
                        raise _StateWrite(f"{self.model_name}.forward changes its own {name} in place ({func}): "
                                          f"{_REFUSAL}: this write was stopped before it happened")
        return func(*args, **kwargs)

    def _state(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor) or not self.names or t.is_meta:
            return None
        try:
            return self.names.get(t.untyped_storage().data_ptr())
        except RuntimeError:          # a tensor without storage (a functional or fake tensor)
            return None


@contextlib.contextmanager
def unchanged_state(model: torch.nn.Module) -> Iterator[None]:
    """Run eager inside, leaving `model`'s parameters and buffers as they are: a write into one is stopped
    before it happens, one replaced by another tensor (`self.step = self.step + 1`) is put back; either is an
    InputError saying why such a model cannot be compiled."""
    held = [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items()]
    try:
        with _StateGuard(model):
            yield
    except _StateWrite as e:
        raise InputError(str(e)) from None
    finally:
        replaced = [(m, kind, name, t) for m, kind, name, t in held if getattr(m, kind).get(name) is not t]
        for m, kind, name, t in replaced:
            getattr(m, kind)[name] = t
    if replaced:
        m, kind, name, _ = replaced[0]
        where = next((f"{prefix}.{name}" if prefix else name for prefix, sub in model.named_modules() if sub is m), name)
        raise InputError(f"{type(model).__name__}.forward replaces its own {kind.strip('_')[:-1]} {where!r} "
                         f"(self.{name} = ...): {_REFUSAL}: it was put back")

