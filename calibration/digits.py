"""Digits CNN: an int8 calibration recipe on real data (issue 7).

scikit-learn's bundled 8x8 handwritten digits (`load_digits`, 1797 images, no download) are split,
stratified and with a fixed seed, into train (~60%), calibration (~10%) and test (~30%). A small CNN is
trained on the train split in a few seconds; the calibration split feeds `compile(..., calibration=...)`
and the test split, never seen by training or calibration, measures task accuracy (argmax vs the labels).
`tests/test_digits.py` checks that each int8 target stays within a point of the fp32 accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SEED = 0


@dataclass(frozen=True)
class Splits:
    """Images float32 in [0, 1] shaped (N, 1, 8, 8); labels int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split(seed: int = SEED) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    train_x, calib_x, train_y, calib_y = train_test_split(rest_x, rest_y, test_size=1 / 7, stratify=rest_y,
                                                          random_state=seed)
    return Splits(train_x, train_y, calib_x, calib_y, test_x, test_y)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def train(splits: Splits, epochs: int = 15, batch: int = 32, seed: int = SEED,
          model: nn.Module | None = None) -> nn.Module:
    """The trained CNN (or `model` trained further: a fine-tune), in eval mode. One thread while training, so the
    weights do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = cnn() if model is None else model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(splits.train_y), generator=order).split(batch):
                opt.zero_grad()
                nn.functional.cross_entropy(model(splits.train_x[idx]), splits.train_y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of `x` whose argmax of `fn(x)` is the label."""
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean())


def calibration_samples(splits: Splits, batch: int = 8) -> list[tuple[torch.Tensor]]:
    """The calibration split in batches, each a `(tensor,)` tuple shaped like `compile`'s example_inputs."""
    return [(x,) for x in splits.calib_x.split(batch)]
