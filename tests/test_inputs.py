"""Inputs as callers hand them over: read-only numpy arrays (Ray's object store, np.frombuffer, memory maps)
and non-contiguous views run on every available fp32 target and give eager's answer."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import compilers

TARGETS = [t.name for t in compilers.targets() if t.precision == "fp32" and compilers.unavailable_reason(t) is None]


@pytest.mark.parametrize("target", TARGETS)
def test_read_only_and_strided_arrays(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    cm = compilers.compile(model, target, (torch.randn(2, 4),))
    x = np.random.default_rng(0).standard_normal((3, 8), dtype=np.float32)
    want = model(torch.from_numpy(x[:, ::2].copy())).detach().numpy()
    frozen = x[:, ::2].copy()
    frozen.flags.writeable = False
    for arr in (frozen, x[:, ::2]):                       # read-only; a strided view
        np.testing.assert_allclose(cm(arr), want, rtol=1e-5, atol=1e-6)


class Two(nn.Module):
    def forward(self, a, b):
        return a * 2 - b


@pytest.mark.parametrize("target", TARGETS)
def test_two_inputs_that_need_converting_keep_their_own_values(target):
    # each input converted (copied) before the call must stay alive until the engine has read it: a copy freed
    # early lets the next copy take its memory, and both inputs then read the same values
    rng = np.random.default_rng(1)
    cm = compilers.compile(Two(), target, (torch.randn(2, 16), torch.randn(2, 16)))
    for _ in range(3):
        a, b = (rng.standard_normal((2, 16), dtype=np.float32) for _ in range(2))
        frozen = []
        for arr in (a, b):
            arr = arr.copy()
            arr.flags.writeable = False
            frozen.append(arr)
        np.testing.assert_allclose(cm(*frozen), a * 2 - b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cm(a.T.copy().T, b.T.copy().T), a * 2 - b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_an_array_on_the_same_memory_in_another_layout_is_read_in_its_own(target):
    # x and x.T start at the same address with the same shape and dtype: an engine that reuses an input binding
    # by address must also compare the layout (OpenVINO binds memory once and reads it at every call)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cm = compilers.compile(model, target, (torch.randn(2, 4),))
    x = np.random.default_rng(2).standard_normal((4, 4), dtype=np.float32)
    for arr in (x, x.T, x, x.T):
        want = model(torch.from_numpy(arr.copy())).detach().numpy()
        np.testing.assert_allclose(cm(arr), want, rtol=1e-5, atol=1e-6)


def test_tensors_without_dense_data_are_input_errors(mlp):
    x = torch.randn(2, 6)
    for bad, match in ((x.to("meta"), "meta device"), (x.to_sparse(), "sparse_coo")):
        with pytest.raises(compilers.InputError, match=match):
            mlp(bad)


def test_a_cache_dir_that_is_a_file_is_refused_before_compiling(tmp_path):
    file = tmp_path / "cache"
    file.write_text("not a directory")
    with pytest.raises(compilers.InputError, match="is a file; pass a directory"):
        compilers.compile(nn.Sequential(nn.Linear(4, 2)).eval(), "ort-cpu", (torch.randn(2, 4),), cache_dir=file)


# -- found by probing the API (2026-12-02) -----------------------------------------------------------------
def test_malformed_dynamic_shapes_are_input_errors():
    x = (torch.randn(4, 6),)
    model = nn.Linear(6, 3)
    for bad, message in [({"input": {0: None}}, "must be a dim name"), ({"input": [0]}, "must be a dict of dim index"),
                         (["input"], "must be a dict of input name"), ({"input": "batch"}, "must be a dict of dim"),
                         ({"input": {True: "b"}}, "must be an integer index")]:
        with pytest.raises(compilers.InputError, match=message):     # were KeyError / AttributeError, or dim 1
            compilers.compile(model, "ort-cpu", x, dynamic_shapes=bad)


def test_an_iterator_of_samples_that_fails_is_an_input_error_naming_the_sample():
    def samples():
        yield (torch.randn(2, 6),)
        raise ValueError("the dataset file is gone")

    with pytest.raises(compilers.InputError, match="validation: the iterator failed making sample 1: ValueError"):
        compilers.compile(nn.Linear(6, 3), "ort-cpu", (torch.randn(4, 6),), samples=samples())


class Clamps(nn.Module):
    def forward(self, x):
        x.clamp_(min=0)                # changes the caller's tensor in eager; an engine never can
        return x * 2


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "torchscript-cpu"])
def test_a_model_that_changes_its_input_in_place_is_refused(target):
    with pytest.raises(compilers.InputError, match=r"changes its input\(s\) 'x' in place"):
        compilers.compile(Clamps(), target, (torch.randn(4, 6),))
    inference = torch.inference_mode()
    with inference:
        frozen = torch.randn(4, 6)          # an inference tensor has no version counter: no false alarm either way
    compilers.compile(nn.Linear(6, 3), target, (frozen,))


def test_a_model_in_train_mode_is_compiled_for_inference_and_says_so():
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)).train()
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d, Dropout layer\(s\) in train mode"):
        cm = compilers.compile(model, "ort-cpu", (torch.randn(4, 6),))
    assert any("compiled for inference (eval mode)" in n for n in cm.report.notes) and model.training


class Rounds(nn.Module):
    def forward(self, x):
        return (x * 2).bfloat16()


def test_a_bfloat16_model_runs_where_it_can_and_is_a_typed_error_where_it_cannot():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3).bfloat16(), torch.randn(2, 4).bfloat16()
    cm = compilers.compile(model, "torchscript-cpu", (x,))          # judged by bf16's own rounding noise
    y = cm(torch.randn(3, 4).bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (3, 3)
    rounds = compilers.compile(Rounds(), "torchscript-cpu", (torch.randn(2, 4),))
    assert rounds(torch.randn(3, 4)).dtype == torch.bfloat16
    y = rounds(np.ones((3, 4), np.float32))          # numpy in, numpy out: ml_dtypes' bfloat16
    assert y.dtype == ml_dtypes.bfloat16 and y.shape == (3, 4) and (y.astype(np.float32) == 2).all()
    np.testing.assert_array_equal(cm(y[:, :4].copy()).astype(np.float32),
                                  cm(torch.from_numpy(y.astype(np.float32)).bfloat16()).float().numpy())
    for target in ("ort-cpu", "openvino-cpu"):                      # raw NotImplemented / TypeError before
        with pytest.raises(compilers.ExportError, match=r"could not build an engine .*takes or gives bfloat16"):
            compilers.compile(model, target, (x,))
