"""Issue 11, item 13: Ctrl-C (or SystemExit) stops a compile at once: no fallback route runs after it, nothing
is built into the cache, and no scratch directory is left behind."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import compilers


class WrappedInterrupt(nn.Module):
    """Under torch.export, fails the way torch reports a Ctrl-C that arrives while it traces: its own error
    raised from the KeyboardInterrupt. TorchScript tracing (the next route) would succeed."""

    def __init__(self, stop: BaseException):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.stop = stop

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise RuntimeError("torch.export failed while tracing") from self.stop
        return self.lin(x)


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(3)], ids=["ctrl-c", "exit"])
def test_an_interrupt_wrapped_by_an_exporter_stops_the_compile(tmp_path, stop):
    with pytest.raises(type(stop)):
        compilers.compile(WrappedInterrupt(stop).eval(), "ort-cpu", (torch.randn(2, 4),), cache_dir=tmp_path)
    builds = [p.name for p in tmp_path.iterdir() if p.name != "references"]
    assert builds == []                   # no fallback build was made, so none was cached


def test_an_interrupted_inductor_build_leaves_no_scratch_directory(monkeypatch):
    def interrupted(*args, **kwargs):     # Ctrl-C while AOTInductor compiles (its C++ build takes seconds)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", interrupted)
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("compilers-aoti-*"))
    with pytest.raises(KeyboardInterrupt):
        compilers.compile(nn.Sequential(nn.Linear(4, 2)).eval(), "inductor-cpu", (torch.randn(2, 4),))
    assert set(scratch.glob("compilers-aoti-*")) == before
