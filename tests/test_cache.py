"""The build cache never returns a stale model (issue 18, item 1): builds and eager references are keyed on
everything in the model that can change what it computes, a cached reference that disagrees with this
compile's own eager run is made again, and a cached build that fails validation is rebuilt (and says so),
never served and never raised on every later compile."""
from __future__ import annotations

import logging
import os
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


SCALE_VARIABLE = "COMPILERS_TEST_CACHE_SCALE"


class ReadsTheEnvironment(Scaled):
    """Reads state no fingerprint can follow: an environment variable, through the `os` module."""

    def __init__(self):
        super().__init__(1.0)

    def forward(self, x):
        return self.l(x) * float(os.environ.get(SCALE_VARIABLE, "2"))


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
    """An environment variable is no part of the fingerprint: the cached reference disagrees with this
    compile's own eager run of the example, so it is made again; the cached build then fails validation, is
    removed and rebuilt (the report and the log say so), and the next compile hits the new build."""
    model = ReadsTheEnvironment().eval()
    x = torch.randn(4, 16)
    try:
        key = fingerprint(model)
        _compile(model, tmp_path, samples=SAMPLES)
        os.environ[SCALE_VARIABLE] = "3"
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
        os.environ.pop(SCALE_VARIABLE, None)


def test_a_cached_build_that_fails_validation_is_never_raised_again(tmp_path):
    """Before, a cache entry that failed validation was raised on every later compile, with advice to loosen
    the tolerance; now the cached build is removed and rebuilt."""
    model = ReadsTheEnvironment().eval()
    try:
        _compile(model, tmp_path)
        os.environ[SCALE_VARIABLE] = "3"
        for _ in range(2):
            cm = _compile(model, tmp_path)
            assert cm.report.validation.passed
    finally:
        os.environ.pop(SCALE_VARIABLE, None)


class BigAttr(nn.Module):
    """Issue 32's repro: an attribute of more Python objects than the fingerprint walks, before a submodule."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a_labels = [f"label{i}" for i in range(250_000)]
        self.l = nn.Linear(16, 4)

    def forward(self, x):
        return self.l(x)


def test_every_parameter_is_hashed_whatever_the_object_budget(tmp_path):
    """Before, the modules after MAX_OBJECTS were hashed by name only: a changed weight was a stale hit
    (max error 2.49) with validate=False."""
    model = BigAttr().eval()
    x = torch.randn(4, 16)
    key = fingerprint(model)
    compilers.compile(model, "torchscript-cpu", (EXAMPLE,), cache_dir=tmp_path, validate=False)
    model.l.weight.data.mul_(-1)
    assert fingerprint(model) != key
    cm = compilers.compile(model, "torchscript-cpu", (EXAMPLE,), cache_dir=tmp_path, validate=False)
    assert cm.report.cache == "miss" and not any("cached build" in n for n in cm.report.notes)
    torch.testing.assert_close(cm(x), model(x))


class Config:
    """A user's config class: its instances and its class attributes are state the forward reads."""

    factor = 2.0

    def __init__(self, scale):
        self.scale = scale


CONFIG = Config(2.0)
NAMESPACE = types.SimpleNamespace(scale=2.0)
user_settings = types.ModuleType("user_settings")        # a module of the user's code, read as module.attribute
user_settings.SCALE = 2.0


class ReadsConfig(Scaled):
    def __init__(self):
        super().__init__(1.0)

    def forward(self, x):
        return self.l(x) * CONFIG.scale * Config.factor * NAMESPACE.scale * user_settings.SCALE


@pytest.mark.parametrize("change", ["instance", "class attribute", "namespace", "module attribute"])
def test_a_module_level_config_object_the_forward_reads_is_in_the_fingerprint(tmp_path, change):
    """Before, only plain-data globals entered the fingerprint: a changed config object was a stale hit with
    validate=False. Now an object or class of the user's code, an object that holds only data, and the
    attributes of a user's module that the code names are hashed."""
    model = ReadsConfig().eval()
    x = torch.randn(4, 16)
    key = fingerprint(model)
    compilers.compile(model, "torchscript-cpu", (EXAMPLE,), cache_dir=tmp_path, validate=False)
    try:
        if change == "instance":
            CONFIG.scale = 3.0
        elif change == "class attribute":
            Config.factor = 3.0
        elif change == "namespace":
            NAMESPACE.scale = 3.0
        else:
            user_settings.SCALE = 3.0
        assert fingerprint(model) != key
        cm = compilers.compile(model, "torchscript-cpu", (EXAMPLE,), cache_dir=tmp_path, validate=False)
        assert cm.report.cache == "miss" and not any("cached build" in n for n in cm.report.notes)
        torch.testing.assert_close(cm(x), model(x))
    finally:
        CONFIG.scale = Config.factor = NAMESPACE.scale = user_settings.SCALE = 2.0
    assert fingerprint(model) == key


def test_a_global_forward_hook_is_in_the_fingerprint(tmp_path):
    """Before, `register_module_forward_hook` changed what every module computes and no key: a stale hit."""
    model = Scaled(2.0).eval()
    key = fingerprint(model)
    compilers.compile(model, TARGET, (EXAMPLE,), cache_dir=tmp_path, validate=False)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 3 if isinstance(module, Scaled) else out)
    try:
        hooked = fingerprint(model)
        assert hooked != key
        cm = compilers.compile(model, TARGET, (EXAMPLE,), cache_dir=tmp_path, validate=False)
        assert cm.report.cache == "miss" and not any("cached build" in n for n in cm.report.notes)
    finally:
        handle.remove()
    assert fingerprint(model) == key


def test_an_unvalidated_hit_that_disagrees_with_eager_on_the_example_is_rebuilt(tmp_path, caplog):
    """Before, a hit with validate=False was returned unchecked: a change no fingerprint sees was served stale.
    Now the eager outputs on the example (which capture computes anyway) are compared with those of the model
    the entry was built from; an entry that differs is removed and rebuilt, and the report and log say so."""
    model = ReadsTheEnvironment().eval()
    x = torch.randn(4, 16)
    try:
        key = fingerprint(model)
        _compile(model, tmp_path, validate=False)
        assert _compile(model, tmp_path, validate=False).report.cache == "hit"
        os.environ[SCALE_VARIABLE] = "3"
        assert fingerprint(model) == key
        with caplog.at_level(logging.WARNING, logger="compilers"):
            cm = _compile(model, tmp_path, validate=False)
        torch.testing.assert_close(cm(x), model(x))
        assert cm.report.cache == "miss"
        assert any("cached build" in n and "eager outputs on the example differ" in n and "removed" in n
                   for n in cm.report.notes)
        assert any("eager outputs on the example differ" in r.message for r in caplog.records)
        again = _compile(model, tmp_path, validate=False)
        assert again.report.cache == "hit"
        torch.testing.assert_close(again(x), model(x))
    finally:
        os.environ.pop(SCALE_VARIABLE, None)


def test_an_unvalidated_hit_without_stored_eager_outputs_is_rebuilt(tmp_path):
    """An entry made before the eager outputs were kept with builds cannot be checked without validation: it is
    rebuilt (and keeps them); a validated hit stores them."""
    model = Scaled(2.0).eval()
    _compile(model, tmp_path, validate=False)
    stored = list((tmp_path / "example-outputs").glob("*.pt"))
    assert len(stored) == 1
    stored[0].unlink()
    assert _compile(model, tmp_path).report.cache == "hit" and stored[0].is_file()
    stored[0].unlink()
    cm = _compile(model, tmp_path, validate=False)
    assert cm.report.cache == "miss" and any("no eager outputs on the example" in n for n in cm.report.notes)
    assert stored[0].is_file() and _compile(model, tmp_path, validate=False).report.cache == "hit"
