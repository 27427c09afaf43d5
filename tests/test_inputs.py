"""Inputs as callers hand them over: read-only numpy arrays (Ray's object store, np.frombuffer, memory maps)
and non-contiguous views run on every available fp32 target and give eager's answer."""
from __future__ import annotations

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
