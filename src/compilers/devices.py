"""Models and inputs on an accelerator: every target runs on the CPU, so a model whose weights live on a GPU
compiles from a CPU copy (the user's model stays where it is, untouched), its example and validation inputs
moved with it. The compiled model takes inputs on any device and answers on theirs (runtime.run_flat)."""
from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from typing import Any, Iterable

import torch
from torch.utils import _pytree as pytree

from .errors import InputError
from .validate import Metric


def devices_of(model: torch.nn.Module, *inputs: Any) -> list[str]:
    """The devices other than the CPU that the model's parameters and buffers, or the inputs' tensors, are on."""
    tensors = itertools.chain(model.parameters(), model.buffers(),
                              (x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)))
    return sorted({str(t.device) for t in tensors if t.device.type != "cpu"})


def to_device(tree: Any, device: torch.device | str) -> Any:
    """A tree of inputs (tuples, lists, dicts) with every tensor moved to `device`, the rest as it is."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def on_cpu(model: torch.nn.Module, example_inputs: Any, calibration: Iterable[Any] | None,
           samples: Iterable[Any] | None, metric: Metric | None) -> tuple[torch.nn.Module, Any, Any, Any, Metric | None,
                                                                          list[str]]:
    """(model, example_inputs, calibration, samples, metric, devices): a CPU copy of a model with weights
    elsewhere, the inputs on the CPU (calibration and samples read into lists), and the metric scoring the user's
    own model where it is asked for eager's score; `devices` the devices they were on ([]: all on the CPU
    already, everything returned as given)."""
    devices = devices_of(model, example_inputs) if isinstance(model, torch.nn.Module) else []
    if not devices:
        return model, example_inputs, calibration, samples, metric, []
    if "meta" in {d.split(":")[0] for d in devices}:
        raise InputError("the model (or an example input) is on the meta device: it has no values to compile or "
                         "validate. Load its weights first (e.g. model.to_empty(device='cpu') and then "
                         "load_state_dict, or from_pretrained without device_map='meta')")
    # one CPU copy of each tensor, the originals never duplicated on their device (tied weights stay tied)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach().cpu(), requires_grad=p.requires_grad))
    for b in model.buffers():
        memo.setdefault(id(b), b.detach().cpu())
    cpu_model = copy.deepcopy(model, memo)
    if isinstance(metric, Metric):
        score = metric.fn
        metric = replace(metric, fn=lambda m: score(model if m is cpu_model else m))
    listed = lambda items: items if items is None or isinstance(items, (torch.Tensor, dict)) \
        else [to_device(s, "cpu") for s in items]   # noqa: E731  (a tensor or dict: refused by name later)
    return cpu_model, to_device(example_inputs, "cpu"), listed(calibration), listed(samples), metric, devices
