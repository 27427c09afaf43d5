"""Padding proven harmless from the exported graph (issue 32, item 2): the sequence dim followed through every
ATen op; a reduction over it is reached by the mask only where its padded positions hold the reduction's
identity (0 for a sum, a -inf / large negative bias for max and softmax, attention's keys masked). Masks are
recognised by where they flow, whatever their name. Small models, exported for real; no engine is built."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compilers.analysis.graph import Exported, export
from compilers.analysis.padding import masks_by_flow, padding_verdict
from compilers.analysis.probes import padding_independence
from compilers.capture import capture

D = 16


def _inputs(mask_name: str = "keep", meaning: str = "keep") -> dict[str, torch.Tensor]:
    x = torch.randn(3, 10, D, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 8:], pad[2, 6:] = True, True
    return {"x": x, mask_name: pad if meaning == "pad" else (~pad).long()}


def _analysed(model: nn.Module, inputs: dict[str, torch.Tensor]):
    model.eval()
    cap = capture(model, inputs, {name: {0: "batch", 1: "seq"} for name in inputs}, {})
    exported = export(model, cap.signature, cap.runs[0].inputs)
    assert exported.program is not None, exported.failure
    return cap, exported


def _verdict(model: nn.Module, mask: str = "keep", meaning: str = "keep"):
    cap, exported = _analysed(model, _inputs(mask, meaning))
    return padding_verdict(exported, cap.signature, {"x": 0.0, mask: 0 if meaning == "keep" else 1})


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=True)

    def forward(self, x, pad_mask):
        return self.enc(x, src_key_padding_mask=pad_mask)


class Attention(nn.Module):
    """Attention written out: scores, the mask as -inf, softmax over the keys, then mean pooling over the mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(D, D)

    def forward(self, x, keep):
        scores = (self.q(x) @ x.transpose(1, 2)).masked_fill(keep[:, None, :] == 0, float("-inf"))
        y = scores.softmax(-1) @ x
        w = keep[..., None].to(y.dtype)
        return (y * w).sum(1) / w.sum(1)


class OldBias(nn.Module):
    """The older Hugging Face recipe: (1 - mask) * -10000 added to the scores."""

    def forward(self, x, keep):
        scores = x @ x.transpose(1, 2) + (1.0 - keep[:, None, :].float()) * -10000.0
        return scores.softmax(-1) @ x


class MaskedMax(nn.Module):
    def forward(self, x, keep):
        return x.masked_fill(keep[..., None] == 0, -1e9).amax(1)


class MaxNoMask(nn.Module):
    def forward(self, x, keep):
        return x.amax(1)


class MeanOfMasked(nn.Module):
    """Masked, but divided by the padded length."""

    def forward(self, x, keep):
        return (x * keep[..., None]).mean(1)


class SquareMask(nn.Module):
    """Queries and keys both masked with -inf: a padded query's row is -inf whole, its softmax NaN, and NaN * 0 is
    NaN in the pooled sum (the answer padded is NaN)."""

    def forward(self, x, keep):
        both = (keep[:, :, None] * keep[:, None, :]) == 0
        y = (x @ x.transpose(1, 2)).masked_fill(both, float("-inf")).softmax(-1) @ x
        return (y * keep[..., None].to(y.dtype)).sum(1)


class SoftmaxNoMask(nn.Module):
    def forward(self, x, keep):
        return (x @ x.transpose(1, 2)).softmax(-1) @ x * keep[..., None]


class Reversed(nn.Module):
    def forward(self, x, keep):
        return x.flip(1) * keep[..., None]


class LastToken(nn.Module):
    def forward(self, x, keep):
        return x[:, -1]


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(D, D, 3, padding=1)

    def forward(self, x, keep):
        return self.conv(x.transpose(1, 2)).transpose(1, 2) * keep[..., None]


class ForwardLSTM(nn.Module):
    def __init__(self, bidirectional: bool = False, final: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(D, 8, batch_first=True, bidirectional=bidirectional)
        self.final = final

    def forward(self, x, keep):
        out, (h, _) = self.lstm(x)
        return h[-1] if self.final else out * keep[..., None]


class Causal(nn.Module):
    def forward(self, x, keep):
        q = x[:, None]
        return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)[:, 0]


@pytest.mark.parametrize("model, mask, meaning, reached", [
    (Encoder(), "pad_mask", "pad", 2),           # nn.MultiheadAttention's key_padding_mask, fast path off
    (Attention(), "keep", "keep", 4),           # softmax over -inf, its product with x, sums over the mask
    (OldBias(), "keep", "keep", 2),             # an additive -10000 bias reaches softmax too
    (MaskedMax(), "keep", "keep", 1),           # max over positions filled with -1e9
    (Causal(), "keep", "keep", 1),              # a causal query never sees a later (padded) key
    (ForwardLSTM(), "keep", "keep", 0),         # a forward scan reads earlier positions only
])
def test_reductions_the_mask_reaches_are_proven(model, mask, meaning, reached):
    verdict = _verdict(model, mask, meaning)
    assert verdict.proven is True, verdict.why
    assert len(verdict.reached) == reached, verdict.reached


@pytest.mark.parametrize("model, lost", [
    (MaxNoMask(), "aten.amax.default over the sequence (dim 1) reads the padding: the mask does not reach it"),
    (MeanOfMasked(), "aten.mean.dim over the sequence (dim 1) counts every position"),
    (SoftmaxNoMask(), "softmax.int over the sequence (dim 2) weighs the padding"),
    (SquareMask(), "sum.dim_IntList over the sequence (dim 1) reads the padding: the mask does not reach it (it "
                   "holds values that may be infinite or NaN"),
    (Reversed(), "flip.default reverses the sequence"),
    (LastToken(), "selects a position of the sequence by its number"),
    (Conv(), "runs along the sequence"),
    (ForwardLSTM(bidirectional=True), "bidirectional recurrent layer reads the padding"),
    (ForwardLSTM(final=True), "final state is the one after the padding"),
])
def test_what_reads_the_padding_is_not_proven_and_named_with_its_line(model, lost):
    verdict = _verdict(model)
    assert verdict.proven is False and lost in verdict.why, verdict.why
    assert "test_padding_analysis.py:" in verdict.why, "the model's own line is named"


def test_without_a_graph_nothing_is_proven():
    cap, _ = _analysed(MaskedMax(), _inputs())
    verdict = padding_verdict(Exported(None, (), {}, "RuntimeError: no"), cap.signature, {"x": 0.0, "keep": 0})
    assert verdict.proven is None and "could not export" in verdict.why


@pytest.mark.parametrize("model, mask, meaning", [(Encoder(), "pad_mask", "pad"), (Attention(), "keep", "keep"),
                                                  (OldBias(), "keep", "keep"), (MaskedMax(), "keep", "keep")])
def test_masks_are_recognised_by_where_they_flow_whatever_their_name(model, mask, meaning):
    """Neither `pad_mask` nor `keep` is a name `detect_masks` knows; and the meaning comes from the flow."""
    cap, exported = _analysed(model, _inputs(mask, meaning))
    assert cap.signature.masks == {}
    found = masks_by_flow(exported, cap.signature, cap.runs[0].inputs)
    assert {name: m for name, (m, _) in found.items()} == {mask: meaning}, found


def test_a_rank_two_input_that_masks_nothing_is_no_mask():
    """Token ids, or a 0/1 input that only selects features, reach no reduction over the sequence."""
    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(4, D)

        def forward(self, x, keep):
            return x + self.embed(keep)
    cap, exported = _analysed(Ids(), _inputs())
    assert masks_by_flow(exported, cap.signature, cap.runs[0].inputs) == {}


def test_the_probe_compares_each_item_alone_with_it_padded():
    """A max over every position: the longest item's answer moves once padding outgrows it, and a short item's
    answer alone differs from the one inside a padded batch. The batch [long, short] padded 5 further changes
    neither the short item (already padded) nor, by chance, the long one; alone, the short one differs."""
    model = MaxNoMask()
    x = torch.zeros(2, 6, 1)
    x[0, :, 0] = torch.tensor([3.0, 1.0, 2.0, 1.0, 2.0, 1.0])
    x[1, :2, 0] = torch.tensor([-1.0, -2.0])
    keep = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])
    inputs = {"x": x, "keep": keep}
    cap = capture(model, inputs, {name: {0: "batch", 1: "seq"} for name in inputs}, {})
    ok, why = padding_independence(model, cap.signature, cap.runs[0].inputs, {"x": 0.0, "keep": 0})
    assert not ok and "item 1 (2 long)" in why, why
    masked = MaskedMax()
    assert padding_independence(masked, cap.signature, cap.runs[0].inputs, {"x": 0.0, "keep": 0})[0]
