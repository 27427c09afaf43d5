"""One compile call as a value: the model, its example inputs and every option, checked once and carried whole
from `compile` through an auto target's selection to the compile of each candidate."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .cache import Cache, fingerprint
from .errors import InputError
from .validate import Metric


@dataclass(frozen=True)
class Request:
    """What `compile` was asked to do, less the target (see `api.compile` for each field)."""

    model: torch.nn.Module
    example_inputs: Any
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None
    calibration: Any = None
    samples: Any = None
    validate: bool | str = True
    metric: Metric | None = None
    cache: Cache | None = None
    accept_traced_branches: bool = False
    masks: Mapping[str, str] | None = None
    #: what a server pads each input with along its non-batch dynamic dims (a pipeline's pre-processing's): compile
    #: then decides whether padding is harmless (`Report.padding`); None: nothing is padded
    pad: Mapping[str, float] | None = None
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, model: Any, example_inputs: Any, *, cache_dir: str | Path | None = None, **options: Any) -> "Request":
        """The request, checked: InputError for a model that is no Module, a bad `validate`, a metric that is no
        Metric (or one without validation), or a `cache_dir` that is a file."""
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        validate, metric = options.get("validate", True), options.get("metric")
        if validate not in (True, False, "warn"):
            raise InputError(f"validate must be True, False or 'warn', not {validate!r}")
        if metric is not None and (not isinstance(metric, Metric) or not validate):
            raise InputError("metric must be a compilers.Metric(fn, max_drop), and needs validate=True or 'warn'")
        masks = options.get("masks")
        if masks is not None and not (isinstance(masks, Mapping) and all(isinstance(k, str) for k in masks)):
            raise InputError("masks must map input names to \"keep\" or \"pad\", e.g. {'attention_mask': 'keep'}")
        if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise InputError(f"cache_dir {cache_dir} is a file; pass a directory (it is created if missing)")
        return cls(model, example_inputs, cache=None if cache_dir is None else Cache(cache_dir), **options)

    def fingerprint(self) -> str:
        """The model's cache fingerprint (`cache.fingerprint`), computed once per request."""
        if "fingerprint" not in self._memo:
            self._memo["fingerprint"] = fingerprint(self.model)
        return self._memo["fingerprint"]

    def reusable(self) -> "Request":
        """This request with one-shot calibration and sample iterables (a generator, a DataLoader) read into
        lists, for compiling it more than once (every candidate of an auto target)."""
        return replace(self, calibration=_reusable(self.calibration), samples=_reusable(self.samples), _memo=self._memo)


def _reusable(items: Iterable[Any] | None) -> Any:
    """A one-shot iterable as a list; what compile would refuse anyway (a tensor, a dict, a non-iterable) as it
    is, to be refused there."""
    if items is None or isinstance(items, (torch.Tensor, np.ndarray, dict, list, tuple)) or \
            not isinstance(items, Iterable):
        return items
    return list(items)
