"""Post-processing that is tensor math, compiled into the graph with the model: validation and the int8 accuracy
loop judge what the user receives. Each step takes the running output and the pre-processing's tensors by name
(the attention mask, for pooling) and says what its result is called when it is the last step."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Step(nn.Module):
    """One post-processing step: forward(y, inputs) -> tensor, or a tuple of tensors named `names`."""

    names: tuple[str, ...] = ("output",)

    def forward(self, y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:   # pragma: no cover - abstract
        raise NotImplementedError


class MeanPool(Step):
    """Mean over the sequence of the positions the mask keeps (sentence-transformers' pooling)."""

    names = ("embedding",)

    def __init__(self, mask: str = "attention_mask"):
        super().__init__()
        self.mask = mask

    def forward(self, y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = inputs[self.mask].unsqueeze(-1).to(y.dtype)
        return (y * keep).sum(1) / keep.sum(1).clamp(min=1e-9)


class CLS(Step):
    """The first position's vector (BERT's [CLS])."""

    names = ("embedding",)

    def forward(self, y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return y[:, 0]


class Normalize(Step):
    """L2-normalize the last dim."""

    names = ("embedding",)

    def forward(self, y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.normalize(y, dim=-1)


class Softmax(Step):
    """Probabilities over the last dim."""

    names = ("probabilities",)

    def forward(self, y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return y.softmax(-1)


class TopK(Step):
    """The k largest values of the last dim and their indices (the indices are what labels name)."""

    names = ("scores", "indices")

    def __init__(self, k: int):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"TopK: k must be a positive integer, not {k!r}")
        self.k = k

    def forward(self, y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if y.shape[-1] < self.k:
            raise ValueError(f"TopK({self.k}) of an output with {y.shape[-1]} values")
        scores, indices = torch.topk(y, self.k, dim=-1)
        return scores, indices
