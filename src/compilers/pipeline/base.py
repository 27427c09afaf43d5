"""What every pre-processing step is: data carried in an artifact that turns a batch of items (texts, encoded
images) into the model's named input arrays, and the served tensor those items arrive in."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class BytesSpec:
    """A served tensor of strings or encoded bytes (the protocol's BYTES datatype): its name and shape (a str
    names a dynamic dim, shown as -1). Arrays of it are numpy object arrays of `bytes`."""

    name: str
    shape: tuple[int | str, ...]
    datatype: ClassVar[str] = "BYTES"


class Pre(abc.ABC):
    """Pre-processing as data: settings (`to_dict`) plus files (`save`), read back by `load`; no code of the
    user's runs to apply it. `__call__` turns a batch of items into the arrays the model takes, by name."""

    #: the manifest's name for this kind of step ("text", "image")
    kind: ClassVar[str]
    #: an item longer than this is refused (InputError) before it is processed, by eager and compiled alike
    max_item_bytes: ClassVar[int] = 1 << 20

    @property
    @abc.abstractmethod
    def input(self) -> BytesSpec:
        """The served input the items arrive in (a 1-D BYTES tensor: one element per item)."""

    @property
    @abc.abstractmethod
    def tensor_names(self) -> tuple[str, ...]:
        """The arrays `__call__` returns, in the order the composed model takes them."""

    @property
    @abc.abstractmethod
    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """compile's dynamic_shapes for those arrays: dim 0 is "batch"; others as the step makes them vary."""

    @property
    def pad(self) -> dict[str, float]:
        """Arrays a server may pad along their non-batch dynamic dims to batch requests together: name -> the
        value padded with (what this step itself pads with). {}: nothing varies but the batch."""
        return {}

    @abc.abstractmethod
    def __call__(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """The model's input arrays for a batch of items (InputError for an item it cannot take)."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The step's settings, JSON-able, without its files."""

    def save(self, directory: Path) -> None:
        """Write the step's files (a tokenizer, say) into `directory`, which exists and is empty."""

    @classmethod
    @abc.abstractmethod
    def load(cls, settings: Mapping[str, Any], directory: Path) -> "Pre":
        """The step saved as `settings` (its `to_dict`) and the files in `directory` (ValueError if malformed)."""
