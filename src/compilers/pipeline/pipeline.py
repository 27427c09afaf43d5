"""A model with its pre- and post-processing: `Pipeline` (eager) and `CompiledPipeline` (what compile returns).

    pipe = Pipeline(bert, Text.from_file("tokenizer.json"), post=[MeanPool(), Normalize()])
    pipe(["a sentence"])["embedding"]                                   # eager
    cm = compilers.compile(pipe, "ort-cpu", example_inputs=["a sentence", "another"])
    cm(["a sentence"])["embedding"]                                     # compiled, validated against eager

Pre-processing runs outside the graph as data (`Steps.pre`); post-processing that is tensor math is composed
with the model into one module (`Pipeline.module`), which is what compile lowers, validates and quantizes;
label names (data) are applied last, to both. Both answer with a dict of named outputs.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..signature import Signature, TensorSpec
from .base import BytesSpec, Pre
from .post import Step

#: the kinds of pre-processing an artifact may carry: manifest name -> "module:class" in this package
PRE_KINDS = {"text": "text:Text", "image": "image:Image"}
#: the folder of an artifact that holds the pipeline's files
FOLDER = "pipeline"
MAX_LABELS = 1 << 20


@dataclass(frozen=True)
class Steps:
    """What a pipeline adds around its tensor model, as data: the pre-processing, and label names that the
    output `labels_of` (integer class indices) is mapped through into the output "labels"."""

    pre: Pre
    labels: tuple[str, ...] | None = None
    labels_of: str = "indices"
    #: whether the model answers padded inputs as unpadded ones, proven from its graph and confirmed by eager
    #: (`analysis.padding.padded_verdict`, run by compile): only then may a server pad requests of different
    #: lengths into one call
    padded: bool = False

    def __post_init__(self):
        if self.labels is not None:
            labels = tuple(self.labels)
            if not labels or len(labels) > MAX_LABELS or not all(isinstance(s, str) for s in labels):
                raise ValueError(f"labels must be a non-empty sequence of at most {MAX_LABELS} strings")
            object.__setattr__(self, "labels", labels)

    def arrays(self, items: Any) -> dict[str, np.ndarray]:
        """The pre-processed arrays of a batch of items (a lone str or bytes is a batch of one); InputError for an
        item longer than the pre-processing takes."""
        if isinstance(items, (str, bytes)):
            items = [items]
        if isinstance(items, np.ndarray):
            items = items.reshape(-1).tolist()
        if not isinstance(items, Sequence):
            raise InputError(f"a pipeline takes a list of items (texts, encoded images), not {type(items).__name__}")
        for i, item in enumerate(items):
            if isinstance(item, (str, bytes)) and len(item) > self.pre.max_item_bytes:
                raise InputError(f"item {i} holds {len(item)} bytes, more than this {self.pre.kind} pre-processing "
                                 f"takes ({self.pre.max_item_bytes}); shorten it (a text model reads only its first "
                                 f"max_length tokens)")
        return self.pre(items)

    def tensors(self, items: Any) -> dict[str, torch.Tensor]:
        """`arrays` as torch tensors."""
        return {name: torch.from_numpy(a) for name, a in self.arrays(items).items()}

    def finish(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The outputs with "labels" added (a numpy array of str shaped like `labels_of`) when there are labels."""
        if self.labels is None:
            return outputs
        indices = outputs[self.labels_of]
        idx = indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.labels)):    # never a wrong name: a config bug
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise ValueError(f"output {self.labels_of!r} holds index {bad}, beyond the {len(self.labels)} labels: the "
                             "model has more classes than the pipeline has labels; give one label per class")
        names = np.array(self.labels, dtype=object)
        return {**outputs, "labels": names[idx]}

    @property
    def inputs(self) -> tuple[BytesSpec, ...]:
        """The served inputs: the pre-processing's."""
        return (self.pre.input,)

    def outputs(self, signature: Signature) -> tuple[TensorSpec | BytesSpec, ...]:
        """The served outputs of the tensor model `signature`: its named outputs (the module answers a dict,
        whose leaves the signature calls output.<name>), then "labels" when there are labels."""
        specs = tuple(TensorSpec(_served(s), s.dtype, s.shape) for s in signature.outputs)
        if self.labels is None:
            return specs
        of = next(s for s in specs if s.name == self.labels_of)
        return (*specs, BytesSpec("labels", of.shape))

    def answer(self, signature: Signature, flat: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The served outputs (in `outputs` order) from the tensor model's flat outputs."""
        named = dict(zip(map(_served, signature.outputs), flat))
        return list(self.finish(named).values())

    def to_dict(self) -> dict[str, Any]:
        return {"pre": self.pre.to_dict(), "labels": None if self.labels is None else list(self.labels),
                "labels_of": self.labels_of, "padded": self.padded}

    def save(self, directory: Path) -> None:
        """Write the steps' files into `directory` (the artifact's FOLDER)."""
        directory.mkdir()
        self.pre.save(directory)

    @classmethod
    def load(cls, record: Mapping[str, Any], directory: Path) -> "Steps":
        """The steps saved as `record` (their to_dict) with their files in `directory`; ValueError if malformed."""
        try:
            return cls._load(record, directory)
        except TypeError as e:
            raise ValueError(f"pipeline record: {e}") from None

    @classmethod
    def _load(cls, record: Mapping[str, Any], directory: Path) -> "Steps":
        if not isinstance(record, Mapping) or set(record) - {"pre", "labels", "labels_of", "padded"}:
            raise ValueError(f"pipeline record: expected keys pre, labels, labels_of, padded; got "
                             f"{json.dumps(record)[:200]}")
        pre = record.get("pre")
        kind = pre.get("kind") if isinstance(pre, Mapping) else None
        if kind not in PRE_KINDS:
            raise ValueError(f"pipeline record: pre-processing kind {kind!r} is not one of {', '.join(PRE_KINDS)}")
        module, name = PRE_KINDS[kind].split(":")
        pre_class = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        labels, labels_of, padded = record.get("labels"), record.get("labels_of", "indices"), record.get("padded", False)
        if not isinstance(labels_of, str) or not isinstance(padded, bool):
            raise ValueError("pipeline record: labels_of must be a string and padded true or false")
        return cls(pre_class.load(pre, directory), None if labels is None else tuple(labels), labels_of, padded)


def _served(spec: TensorSpec) -> str:
    """The served name of a tensor model output: the module's dict key (the signature says output.<key>)."""
    return spec.name.removeprefix("output.")


def _first(y: Any, select: str | int | None) -> Any:
    """The model's output the post-processing starts from."""
    if select is not None:
        return y[select]
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, Mapping) or hasattr(y, "to_tuple"):          # a dict, a Hugging Face ModelOutput
        return next(iter(y.values()))
    if isinstance(y, (tuple, list)):
        return y[0]
    return y


class _Composed(nn.Module):
    """The model and its tensor post-processing as one module answering a dict of named outputs. Subclasses
    give forward the pre-processing's tensor names as parameters (what capture and the engines see)."""

    def __init__(self, model: nn.Module, post: Sequence[Step], select: str | int | None,
                 names: Sequence[str] | None, keywords: bool):
        super().__init__()
        self.model = model
        self.post = nn.ModuleList(post)
        self.select = select
        self.keywords = keywords
        self.names = tuple(names) if names is not None else (post[-1].names if post else ("output",))

    def answer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = self.model(**inputs) if self.keywords else self.model(*inputs.values())
        if self.post or self.select is not None:
            y = _first(y, self.select)
        for step in self.post:
            y = step(y, inputs)
        ys = y if isinstance(y, tuple) else (y,)
        if len(ys) != len(self.names):
            raise ValueError(f"the pipeline's output has {len(ys)} tensor(s), named {list(self.names)}; pass names= "
                             "with one name per tensor")
        return dict(zip(self.names, ys))


class _Text(_Composed):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.answer({"input_ids": input_ids, "attention_mask": attention_mask})


class _TextWithTypes(_Composed):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.answer({"input_ids": input_ids, "attention_mask": attention_mask,
                            "token_type_ids": token_type_ids})


class _Image(_Composed):
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.answer({"pixel_values": pixel_values})


#: the composed module for each pre-processing's tensors, and whether the model takes them by keyword
_MODULES = {("input_ids", "attention_mask"): (_Text, True),
            ("input_ids", "attention_mask", "token_type_ids"): (_TextWithTypes, True),
            ("pixel_values",): (_Image, False)}


class Pipeline:
    """A PyTorch model with its pre-processing (`pre`: Text, Image), tensor post-processing compiled into the
    graph (`post`: MeanPool, CLS, Normalize, Softmax, TopK, ...) and label names applied last.

    model: called with the pre-processing's tensors (by keyword for text: input_ids=..., attention_mask=...;
        by position for images); post starts from its output (`select` picks one of several: a key or index;
        default the first, e.g. last_hidden_state or logits).
    names: the final outputs' names (default: the last step's, e.g. "embedding"; "output" with no post).
    labels: names of classes, mapped from the output `labels_of` (TopK's "indices") into "labels".
    Calling it answers a dict of named outputs for a list of items."""

    def __init__(self, model: nn.Module, pre: Pre, post: Sequence[Step] = (), *, labels: Sequence[str] | None = None,
                 labels_of: str = "indices", select: str | int | None = None, names: Sequence[str] | None = None):
        if not isinstance(pre, Pre):
            raise TypeError(f"pre must be a compilers.pipeline pre-processing step (Text, Image), not "
                            f"{type(pre).__name__}")
        made = _MODULES.get(pre.tensor_names)
        if made is None:
            raise ValueError(f"no pipeline module takes the tensors {pre.tensor_names}")
        module_class, keywords = made
        self.module = module_class(model, list(post), select, names, keywords)
        if labels is not None and labels_of not in self.module.names:
            raise ValueError(f"labels name the output {labels_of!r}, which the pipeline does not have "
                             f"(its outputs: {', '.join(self.module.names)}); add TopK or pass labels_of=")
        self.steps = Steps(pre, None if labels is None else tuple(labels), labels_of)

    @property
    def pre(self) -> Pre:
        return self.steps.pre

    def __call__(self, items: Any) -> dict[str, Any]:
        with torch.no_grad():
            return self.steps.finish(self.module(**self.steps.tensors(items)))

    def tensors(self, items: Any) -> dict[str, torch.Tensor]:
        """What the module is called with for these items."""
        return self.steps.tensors(items)


class CompiledPipeline:
    """A compiled pipeline: `cm(items)` answers what the eager pipeline answers. `cm.model` is the compiled
    tensor model (the composed module: model + post-processing), for tensor callers and for serving."""

    def __init__(self, model: Any, steps: Steps):
        self.model = model
        self.steps = steps

    def __call__(self, items: Any) -> dict[str, Any]:
        return self.steps.finish(self.model(**self.steps.tensors(items)))

    @property
    def report(self) -> Any:
        return self.model.report

    @property
    def target(self) -> Any:
        return self.model.target

    @property
    def signature(self) -> Any:
        return self.model.signature

    @property
    def digest(self) -> str | None:
        return self.model.digest

    def save(self, path: Any) -> Path:
        """Write the artifact (the tensor model's files, the pipeline's in FOLDER) atomically; see
        CompiledModel.save."""
        return self.model.save(path, steps=self.steps)

    def __repr__(self) -> str:
        return f"CompiledPipeline({self.steps.pre.kind}, {self.model!r})"
