"""Padded positions are not judged (issue 18, item 9): an output that shares the (batch, sequence) dims of a
padding mask input is validated at the positions the mask marks real, by every rule.

Before: a standard nn.TransformerEncoder called with src_key_padding_mask was refused on all four fp32 targets
(cosine 0.75): in eval mode PyTorch's fast path returns zeros at padded positions, the compiled graphs compute
values there that nobody reads.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import compilers
from compilers.signature import TensorSpec, detect_masks
from compilers.target import Tolerance
from compilers.validate import check_output

FP32_TARGETS = ["ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu"]
DYNAMIC = {"x": {0: "batch", 1: "seq"}, "src_key_padding_mask": {0: "batch", 1: "seq"}}


class Encoder(nn.Module):
    """nn.TransformerEncoder, 2 layers, d_model 64, batch-first, called with a key padding mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=True)

    def forward(self, x, src_key_padding_mask):
        return self.enc(x, src_key_padding_mask=src_key_padding_mask)


def padded(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Features and a bool key padding mask whose rows after the first are right-padded (True = padding)."""
    x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(1, batch):
        mask[row, seq - 2 * row:] = True
    return {"x": x, "src_key_padding_mask": mask}


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return Encoder().eval()


def test_eager_leaves_zeros_at_padding(encoder) -> None:
    """Why judging every position cannot work: eager's fast path answers 0 at padding, a graph computes values."""
    x = padded(3, 10, 0)
    with torch.inference_mode():
        out = encoder(**x)
    assert torch.all(out[x["src_key_padding_mask"]] == 0) and torch.all(out[~x["src_key_padding_mask"]] != 0)


@pytest.mark.parametrize("target", FP32_TARGETS)
def test_transformer_encoder_with_padding_compiles(encoder, target: str, tmp_path) -> None:
    cm = compilers.compile(encoder, target, padded(3, 10, 0), dynamic_shapes=DYNAMIC,
                           samples=[padded(4, 12, 1), padded(2, 9, 2)])
    assert cm.signature.masks == {"src_key_padding_mask": "pad"}
    validation = cm.report.validation
    assert validation.passed and validation.outputs[0].judged == "src_key_padding_mask", str(validation)
    assert "judged at the positions 'src_key_padding_mask' marks real" in str(validation)
    x = padded(4, 7, 3)
    real = ~x["src_key_padding_mask"]
    loaded = compilers.load(cm.save(tmp_path / "enc"))
    assert loaded.signature.masks == cm.signature.masks
    with torch.inference_mode():
        want = encoder(**x)[real]
    for compiled in (cm, loaded):
        torch.testing.assert_close(compiled(**x)[real], want, rtol=1e-4, atol=1e-5)


def test_without_the_mask_every_position_is_judged_and_the_encoder_refused(encoder) -> None:
    """masks={} turns the judging off: the same compile is refused by the values at padding, and the refusal says
    how to declare the mask beside the failing output (issue 32, item 2)."""
    with pytest.raises(compilers.ValidationError, match="cosine|error") as refused:
        compilers.compile(encoder, "ort-cpu", padded(3, 10, 0), dynamic_shapes=DYNAMIC,
                          samples=[padded(4, 12, 1)], masks={})
    assert "If input 'src_key_padding_mask' marks padding" in str(refused.value)
    assert """masks={'src_key_padding_mask': "pad"}""" in str(refused.value)


class NamedOtherwise(nn.Module):
    """The same encoder with its mask under a name no rule of `detect_masks` knows."""

    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc

    def forward(self, x, pad_mask):
        return self.enc(x, src_key_padding_mask=pad_mask)


def test_a_mask_under_another_name_is_recognised_by_where_it_flows(encoder) -> None:
    """Issue 32, item 2: a bool `pad_mask` feeding src_key_padding_mask was refused with cosine 0.75 (masks were
    found by name only). It flows into attention's keys as nn.MultiheadAttention's key padding mask (True masks),
    so it is a "pad" mask, its real positions judged, and the report says why."""
    def renamed(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": inputs["x"], "pad_mask": inputs["src_key_padding_mask"]}
    model = NamedOtherwise(encoder.enc).eval()
    dynamic = {"x": {0: "batch", 1: "seq"}, "pad_mask": {0: "batch", 1: "seq"}}
    cm = compilers.compile(model, "ort-cpu", renamed(padded(3, 10, 0)), dynamic_shapes=dynamic,
                           samples=[renamed(padded(4, 12, 1)), renamed(padded(2, 9, 2))])
    assert cm.signature.masks == {"pad_mask": "pad"}
    assert cm.report.validation.passed and cm.report.validation.outputs[0].judged == "pad_mask"
    assert any("input 'pad_mask' is taken for a padding mask ('pad'" in n and "attention" in n
               for n in cm.report.notes), cm.report.notes


def test_a_wrong_answer_at_real_positions_is_still_caught(encoder) -> None:
    """An encoder that ignores its mask differs at real positions, and is refused against the real one."""
    class Unmasked(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x, src_key_padding_mask):
            return self.enc(x, src_key_padding_mask=torch.zeros_like(src_key_padding_mask))

    cm = compilers.compile(Unmasked(encoder.enc), "ort-cpu", padded(3, 10, 0), dynamic_shapes=DYNAMIC, validate=False)
    result = compilers.validate(cm, encoder, [padded(3, 10, 0), padded(4, 12, 1)])
    assert not result.passed and result.outputs[0].judged == "src_key_padding_mask", str(result)


def test_masks_detected_by_name_dtype_and_rank() -> None:
    specs = [TensorSpec("input_ids", torch.int64, ("batch", "seq")),
             TensorSpec("attention_mask", torch.int64, ("batch", "seq")),
             TensorSpec("src_key_padding_mask", torch.bool, ("batch", "seq")),
             TensorSpec("float_mask.attention_mask", torch.float32, ("batch", "seq")),   # additive: not taken
             TensorSpec("inputs.attention_mask", torch.int64, ("batch", "seq", 4))]      # rank 3: not taken
    assert detect_masks(specs) == {"attention_mask": "keep", "src_key_padding_mask": "pad"}


def test_declared_masks_are_checked(encoder) -> None:
    for masks, message in [({"nope": "pad"}, "'nope' is no input"), ({"x": "pad"}, "integer or bool input"),
                           ({"src_key_padding_mask": "ignore"}, "neither \"keep\"")]:
        with pytest.raises(compilers.InputError, match=message):
            compilers.compile(encoder, "ort-cpu", padded(2, 6, 0), dynamic_shapes=DYNAMIC, masks=masks)


def test_judged_positions_in_every_rule() -> None:
    """A difference at a position that is not judged counts for nothing in the fp32 rule, the cosine and the
    integer agreement; the same difference at a judged position fails."""
    ref = np.ones((2, 4, 3), dtype=np.float32)
    judged = np.broadcast_to(np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)[:, :, None], ref.shape)
    off_padding, off_real = ref.copy(), ref.copy()
    off_padding[1, 3] = 5.0
    off_real[1, 1] = 5.0
    fp32, lossy = Tolerance(), Tolerance(noise=None, min_cosine=0.999)
    for tol in (fp32, lossy):
        assert check_output("y", torch.tensor(ref), torch.tensor(off_padding), tol, ref.astype(np.float64),
                            batch_axis=0, judged=judged).passed
        assert not check_output("y", torch.tensor(ref), torch.tensor(off_real), tol, ref.astype(np.float64),
                                batch_axis=0, judged=judged).passed
    ints = torch.ones(2, 4, 3, dtype=torch.int64)
    wrong = ints.clone()
    wrong[1, 3] = 7
    assert check_output("ids", ints, wrong, fp32, judged=judged).agreement == 1.0
    assert not check_output("ids", ints, wrong, fp32).passed


def test_which_outputs_a_mask_covers() -> None:
    """Dynamic dims match by name, anywhere; a static sequence length only as the leading dims of per-token
    features, never an output that merely has as many classes as the sequence has tokens."""
    from compilers.signature import Signature
    def covers(mask_shape, out_shape):
        sig = Signature((), (), {}, {}, (TensorSpec("attention_mask", torch.int64, mask_shape),),
                        {}, (TensorSpec("y", torch.float32, out_shape),), None, masks={"attention_mask": "keep"})
        return sig.mask_axes(sig.outputs[0])
    assert covers(("batch", "seq"), ("seq", "batch", 8)) == ("attention_mask", 1, 0)
    assert covers(("batch", "seq"), ("batch", 8)) is None
    assert covers(("batch", 128), ("batch", 128, 384)) == ("attention_mask", 0, 1)
    assert covers(("batch", 128), ("batch", 128)) is None          # logits over 128 classes
    assert covers((2, 8), (8, 2, 4)) is None
