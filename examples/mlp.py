"""A tiny MLP (three 64-wide layers), for timing the call overhead: at batch 1 it runs in microseconds, so
what `compilers` adds per call shows.

    compilers bench examples/mlp.py:factory --batch-sizes 1 --overhead
"""
from __future__ import annotations

import torch
from torch import nn


def factory() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    # batch 4 to compile: a batch-1 example makes torch.export pin the batch dim to 1
    return {"model": model, "example_inputs": (torch.randn(4, 64),)}
