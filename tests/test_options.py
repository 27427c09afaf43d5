"""Issue 11, item 14: every malformed descriptor or option is a TargetError when the target resolves or the
inputs are captured, before any lowering; never a raw Python error, a silent default or a hang."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compilers
from compilers.backends import get_backend
from compilers.errors import TargetError

HEAD = 'name = "x"\nbackend = "{backend}"\ndevice = "cpu"\nprecision = "fp32"\n'


def resolve(tmp_path, text: str, backend: str = "onnxruntime"):
    path = tmp_path / "d.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    target = compilers.load_target(path)
    get_backend(target.backend).settings(target)
    return target


@pytest.mark.parametrize("backend, table, match", [
    ("onnxruntime", "[options]\nthreads = 1000000\n", "must be <= 1024"),
    ("onnxruntime", "[options]\nthreads = -1\n", "must be >= 0"),
    ("onnxruntime", '[options]\nthreads = "x"\n', "must be an integer"),
    ("onnxruntime", "[options]\nthreads = 1.5\n", "must be an integer"),
    ("onnxruntime", '[options]\ntransformer_fusions = "no"\n', "must be true or false"),
    ("openvino", '[options]\nstreams = "x"\n', "must be an integer"),
    ("openvino", "[options]\nthreads = 5000\n", "must be <= 1024"),
    ("onnxruntime", '[tolerance]\natol = "x"\n', "atol"),
    ("onnxruntime", "options = 3\n", "options must be a table"),
    ("onnxruntime", "tolerance = [1]\n", "tolerance must be a table"),
])
def test_bad_options_are_target_errors(tmp_path, backend, table, match):
    with pytest.raises(TargetError, match=match):
        resolve(tmp_path, HEAD.format(backend=backend) + table)


def test_a_descriptor_that_is_not_utf8_is_a_target_error(tmp_path):
    with pytest.raises(TargetError, match="not UTF-8"):
        resolve(tmp_path, HEAD.format(backend="onnxruntime").encode() + b'description = "caf\xe9"\n')


def test_a_shape_range_on_a_static_dim_is_a_target_error_before_lowering(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text(HEAD.format(backend="onnxruntime") + "[shapes.input]\n1 = {min = 1, max = 8}\n")
    with pytest.raises(TargetError, match=r"\[shapes.input\] gives dim\(s\) \[1\] a range, but they are static"):
        compilers.compile(nn.Sequential(nn.Linear(4, 2)).eval(), compilers.load_target(path), (torch.randn(2, 4),))
