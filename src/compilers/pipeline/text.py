"""Text in: a Hugging Face `tokenizers` tokenizer, carried in the artifact as its `tokenizer.json`.

Each batch is truncated to `max_length` tokens and padded (on the right, with the tokenizer's pad token) to its
own longest item, not to a fixed length: a server pads requests it batches together the same way.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .base import BytesSpec, Pre

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_LENGTH = 512
MAX_TOKENS = 1 << 16     # a max_length beyond this is a mistake (models take a few thousand positions at most)


@dataclass(frozen=True, eq=False)
class Text(Pre):
    """Tokenize texts into input_ids and attention_mask (and token_type_ids when `type_ids`), int64.

    tokenizer: the tokenizer's JSON (`tokenizers.Tokenizer.to_str()`); build one with `from_file`,
    `from_tokenizer` or `from_pretrained` (a `transformers` tokenizer)."""

    tokenizer: str = field(repr=False)
    max_length: int | None = None         # None: the tokenizer's own truncation length, else 512
    type_ids: bool = False
    input_name: str = "text"
    kind: ClassVar[str] = "text"

    def __post_init__(self):
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_str(self.tokenizer)
        except Exception as e:      # tokenizers raises its own Exception subclass for malformed JSON
            raise ValueError(f"Text: not a tokenizers tokenizer.json ({str(e)[:200]})") from None
        if self.max_length is None:
            object.__setattr__(self, "max_length", (tok.truncation or {}).get("max_length") or DEFAULT_LENGTH)
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or \
                not 2 <= self.max_length <= MAX_TOKENS:
            raise ValueError(f"Text: max_length must be an integer in [2, {MAX_TOKENS}], not {self.max_length!r}")
        if not isinstance(self.input_name, str) or not self.input_name:
            raise ValueError("Text: input_name must be a non-empty string")
        padding = tok.padding or {}
        pad_token = padding.get("pad_token") or next((t for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None),
                                                     None)
        if pad_token is None:
            raise ValueError("Text: the tokenizer has no padding token (no padding settings, no [PAD] or <pad>); "
                             "set one on it (tokenizer.enable_padding(pad_token=..., pad_id=...)) before building Text")
        pad_id = padding.get("pad_id", tok.token_to_id(pad_token))
        tok.enable_truncation(self.max_length)
        tok.enable_padding(direction="right", pad_id=pad_id, pad_type_id=padding.get("pad_type_id", 0),
                           pad_token=pad_token, length=None, pad_to_multiple_of=None)
        object.__setattr__(self, "_tok", tok)
        object.__setattr__(self, "_pads", (int(pad_id), int(padding.get("pad_type_id", 0))))

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **settings: Any) -> "Text":
        """From a tokenizer.json file."""
        return cls(Path(path).read_text(encoding="utf-8"), **settings)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **settings: Any) -> "Text":
        """From a `tokenizers.Tokenizer`, or a `transformers` fast tokenizer (its backend tokenizer; max_length
        defaults to its model_max_length when that is a real limit)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            limit = getattr(tokenizer, "model_max_length", None)
            if isinstance(limit, int) and 2 <= limit <= MAX_TOKENS:
                settings.setdefault("max_length", limit)
            settings.setdefault("type_ids", "token_type_ids" in getattr(tokenizer, "model_input_names", ()))
            tokenizer = backend
        if not hasattr(tokenizer, "to_str"):
            raise TypeError(f"Text.from_tokenizer takes a tokenizers.Tokenizer or a transformers fast tokenizer, "
                            f"not {type(tokenizer).__name__} (a slow tokenizer has no tokenizer.json)")
        return cls(tokenizer.to_str(), **settings)

    # -- Pre -----------------------------------------------------------------------------------------
    @property
    def input(self) -> BytesSpec:
        return BytesSpec(self.input_name, ("batch",))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask") + (("token_type_ids",) if self.type_ids else ())

    @property
    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "seq"} for name in self.tensor_names}

    @property
    def pad(self) -> dict[str, float]:
        pad_id, pad_type_id = self._pads         # what the tokenizer pads with
        return {"input_ids": pad_id, "attention_mask": 0, **({"token_type_ids": pad_type_id} if self.type_ids else {})}

    def __call__(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        texts = [_text(item, i) for i, item in enumerate(items)]
        if not texts:
            raise InputError("no texts: send at least one")
        # one text (a served request's usual): encode, not encode_batch, whose thread pool would contend with the
        # engine's threads for the cores
        encodings = [self._tok.encode(texts[0])] if len(texts) == 1 else self._tok.encode_batch(texts)
        out = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
               "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}
        if self.type_ids:
            out["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length, "type_ids": self.type_ids,
                "input_name": self.input_name}

    def save(self, directory: Path) -> None:
        (directory / TOKENIZER_FILE).write_text(self.tokenizer, encoding="utf-8")

    @classmethod
    def load(cls, settings: Mapping[str, Any], directory: Path) -> "Text":
        unknown = set(settings) - {"kind", "max_length", "type_ids", "input_name"}
        if unknown:
            raise ValueError(f"text settings: unknown key(s) {sorted(unknown)}")
        text = (directory / TOKENIZER_FILE).read_text(encoding="utf-8")
        json.loads(text)    # ValueError for a file that is not JSON, before the tokenizer library reads it
        return cls(text, **{k: v for k, v in settings.items() if k != "kind"})


def _text(item: Any, i: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"text {i} is not UTF-8 ({e.reason} at byte {e.start}); send UTF-8 text") from None
    raise InputError(f"text {i} is a {type(item).__name__}; send strings (or UTF-8 bytes)")
