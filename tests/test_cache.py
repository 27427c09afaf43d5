"""The build cache never returns a stale model (issue 18, item 1): builds and eager references are keyed on
everything in the model that can change what it computes, a cached reference that disagrees with this
compile's own eager run is made again, and a cached build that fails validation is rebuilt (and says so),
never served and never raised on every later compile."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import compilers
from compilers.cache import fingerprint

TARGET = "ort-cpu"


class Scaled(nn.Module):
    """The issue's repro: a Python attribute (not a weight) that changes what forward computes."""

    def __init__(self, k):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(16, 4)
        self.k = k

    def forward(self, x):
        return self.l(x) * self.k


class TensorAttribute(Scaled):
    """A plain tensor attribute: neither a parameter nor a buffer, so not in state_dict."""

    def __init__(self):
        super().__init__(1.0)
        self.shift = torch.zeros(4)

    def forward(self, x):
        return self.l(x) + self.shift


SETTINGS = types.SimpleNamespace(scale=2.0)     # an object global: what no fingerprint can follow


class ReadsAGlobalObject(Scaled):
    def __init__(self):
        super().__init__(1.0)

    def forward(self, x):
        return self.l(x) * SETTINGS.scale


EXAMPLE = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
SAMPLES = [(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)),)]


def _compile(model, cache, **kwargs):
    return compilers.compile(model, TARGET, (EXAMPLE,), cache_dir=cache, **kwargs)


@pytest.mark.parametrize("change", ["attribute", "tensor attribute", "hook", "class attribute"])
def test_a_change_that_is_no_weight_misses_the_cache(tmp_path, change):
    model = TensorAttribute() if change == "tensor attribute" else Scaled(2.0)
    model.eval()
    first = _compile(model, tmp_path)
    assert first.report.cache == "miss"
    assert _compile(model, tmp_path).report.cache == "hit"
    if change == "attribute":
        model.k = 3.0
    elif change == "tensor attribute":
        model.shift = torch.ones(4)
    elif change == "hook":
        model.l.register_forward_hook(lambda module, args, out: out * 3)
    else:
        type(model).k = 5.0       # shadowed by the instance's own k: the key may change, the result must not
    x = torch.randn(4, 16)
    cm = _compile(model, tmp_path)
    torch.testing.assert_close(cm(x), model(x))
    if change != "class attribute":
        assert cm.report.cache == "miss"
        assert (cm(x) - first(x)).abs().max() > 0.1


def test_the_fingerprint_is_the_same_in_another_process_and_follows_values(tmp_path):
    import subprocess
    import sys
    code = ("import torch, sys; sys.path.insert(0, %r); from test_cache import Scaled; "
            "from compilers.cache import fingerprint; m = Scaled(2.0); "
            "m.l.register_forward_hook(lambda *a: None); print(fingerprint(m))") % str(__file__.rsplit("/", 1)[0])
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
              for _ in range(2)}
    assert len(prints) == 1
    assert fingerprint(Scaled(2.0)) != fingerprint(Scaled(3.0)) and fingerprint(Scaled(2.0)) == fingerprint(Scaled(2.0))


def test_a_change_the_fingerprint_cannot_see_is_caught_by_eager_and_the_entry_rebuilt(tmp_path, caplog):
    """A global object's attribute is no part of the fingerprint: the cached reference disagrees with this
    compile's own eager run of the example, so it is made again; the cached build then fails validation, is
    removed and rebuilt (the report and the log say so), and the next compile hits the new build."""
    model = ReadsAGlobalObject().eval()
    x = torch.randn(4, 16)
    try:
        key = fingerprint(model)
        _compile(model, tmp_path, samples=SAMPLES)
        SETTINGS.scale = 3.0
        assert fingerprint(model) == key
        cm = _compile(model, tmp_path, samples=SAMPLES)
        torch.testing.assert_close(cm(x), model(x))
        assert cm.report.cache == "miss" and "read from the cache" not in cm.report.validation.reference
        assert any("cached build" in n and "disagreed with eager" in n and "removed" in n for n in cm.report.notes)
        assert any("disagrees with eager on the example" in r.message for r in caplog.records)
        again = _compile(model, tmp_path, samples=SAMPLES)
        assert again.report.cache == "hit" and again.report.validation.passed
        torch.testing.assert_close(again(x), model(x))
    finally:
        SETTINGS.scale = 2.0


def test_a_cached_build_that_fails_validation_is_never_raised_again(tmp_path):
    """Before, a cache entry that failed validation was raised on every later compile, with advice to loosen
    the tolerance; now the cached build is removed and rebuilt."""
    model = ReadsAGlobalObject().eval()
    try:
        _compile(model, tmp_path)
        SETTINGS.scale = 3.0
        for _ in range(2):
            cm = _compile(model, tmp_path)
            assert cm.report.validation.passed
    finally:
        SETTINGS.scale = 2.0
