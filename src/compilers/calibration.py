"""Sample sets given to compile: calibration data and validation samples.

Each item is shaped like `example_inputs` (a tuple of positional arguments, a dict of keyword arguments,
or one tensor); a `torch.utils.data.DataLoader` yielding such items works too (its default collate turns
a tuple into a list, which is read back as the tuple it was). Items are flattened and checked against the
Signature once, here, so a wrong sample is an InputError naming it before any backend sees it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .errors import InputError
from .signature import Signature, as_call


@dataclass(frozen=True)
class Calibration:
    """Calibration data as flat engine inputs, and their digest (part of the build's cache key)."""

    samples: tuple[list[Any], ...]
    digest: str

    def __len__(self) -> int:
        return len(self.samples)


def flat_samples(signature: Signature, items: Iterable[Any], like: Any, what: str) -> list[list[Any]]:
    """Each item of `items` as the flat inputs the engine takes; InputError naming the first bad one."""
    if isinstance(items, (torch.Tensor, np.ndarray, dict)) or not isinstance(items, Iterable):
        raise InputError(f"{what} must be an iterable of inputs shaped like example_inputs (a list of them, or "
                         f"a DataLoader yielding them), not {type(items).__name__}")
    out = []
    for i, item in enumerate(guarded(items, what)):
        if isinstance(like, tuple) and isinstance(item, list):
            item = tuple(item)     # DataLoader's default collate yields a tuple dataset's items as lists
        try:
            out.append(signature.flatten(*as_call(item)))
        except InputError as e:
            raise InputError(f"{what} sample {i}: {e}. Each sample must be shaped like example_inputs: "
                             f"{signature.describe_inputs()}") from None
    return out


def guarded(items: Iterable[Any], what: str) -> Iterable[Any]:
    """`items`, with an error the user's iterator (a generator, a DataLoader) raises turned into an InputError
    that says which sample it was making."""
    iterator, i = iter(items), 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            raise InputError(f"{what}: the iterator failed making sample {i}: {type(e).__name__}: {e}") from e
        yield item
        i += 1


def calibration_set(signature: Signature, items: Iterable[Any], like: Any) -> Calibration:
    samples = flat_samples(signature, items, like, "calibration")
    return Calibration(tuple(samples), digest(samples))


def digest(samples: Sequence[Sequence[Any]]) -> str:
    """sha256 over every sample's arrays: dtype, shape and bytes."""
    h = hashlib.sha256()
    for flat in samples:
        for x in flat:
            update_with_array(h, x)
    return h.hexdigest()


def update_with_array(h: Any, x: Any) -> None:
    """Feed a tensor's or array's dtype, shape and bytes to the hash `h` (any dtype, bfloat16 included)."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
