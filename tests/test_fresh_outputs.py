"""No output aliases memory that a later call changes (issue 32, item 5).

torchscript-cpu returned constants folded by freezing by reference: `cm(x)[0].add_(100)` changed every later
answer. Every target's outputs are memory of this call's own, or share memory exactly where eager's do: an
output eager returns as an input itself, or as an earlier output itself, is that object; a view of an input is
that view on torch engines, and a copy on numpy engines (ONNX Runtime, OpenVINO). An output that is the
module's own buffer is a copy taken at compile time: editing it changes neither the module nor later answers.

Each test edits every output in place, as a caller may, and calls again."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import compilers

TARGETS = [t.name for t in compilers.targets()
           if not t.name.startswith("auto") and compilers.unavailable_reason(t) is None]
LOSSY_ATOL = 0.25          # int8 / bf16 against eager; an edit that leaks shows as 100


class Outputs(nn.Module):
    """One output of each kind an engine might hand out by reference, and two that eager shares."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(16, 4)
        self.register_buffer("table", torch.arange(4.0))

    def forward(self, x, z):
        y = self.l(x)
        twice = y * 2
        return {"buffer_plus_zero": self.table + 0, "computed": y, "constant": torch.ones(3) * 2,
                "twice": (twice, twice), "input": z}


class Views(nn.Module):
    """Outputs in memory eager does not give a fresh tensor: the module's own buffer, views of it and of an input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(16, 4)
        self.register_buffer("table", torch.arange(6.0))

    def forward(self, x, z):
        return self.l(x), self.table, self.table[2:], z[0], z.t()


def _examples() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, generator=g), torch.randn(2, 3, generator=g)


def _compile(model: nn.Module, target: str) -> compilers.CompiledModel:
    kw = {}
    if "int8" in target:
        g = torch.Generator().manual_seed(2)
        kw["calibration"] = [(torch.randn(2, 16, generator=g), torch.randn(2, 3, generator=g)) for _ in range(8)]
    return compilers.compile(model, target, _examples(), **kw)


@pytest.fixture(scope="module", params=TARGETS)
def compiled(request, tmp_path_factory):
    """(target, {Outputs: {"model": ..., "compiled": cm, "loaded": cm saved and loaded}, Views: {...}})."""
    target = request.param
    out = {}
    for make in (Outputs, Views):
        model = make().eval()
        cm = _compile(model, target)
        path = cm.save(tmp_path_factory.mktemp(f"{make.__name__}-{target}") / "m")
        out[make] = {"model": model, "compiled": cm, "loaded": compilers.load(path)}
    return target, out


def _edit(answer) -> None:
    """Add 100 to every tensor/array leaf in place (a leaf that appears twice is edited twice)."""
    for leaf in pytree.tree_leaves(answer):
        if isinstance(leaf, torch.Tensor):
            leaf.add_(100)
        else:
            leaf += 100


def _close(got, want, atol: float) -> None:
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64),
                                   atol=atol, rtol=1e-3, err_msg=f"leaf {i}")


def _atol(target: str) -> float:
    return 1e-4 if target in ("ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu") else LOSSY_ATOL


@pytest.mark.parametrize("which", ["compiled", "loaded"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_edited_outputs_change_no_later_answer_and_alias_as_eagers_do(compiled, which, kind):
    """The issue's repro and its siblings: a buffer + 0 and a constant folded into the engine, a computed output,
    one tensor returned twice (eager: editing one edits the other), an input returned (eager: it is the caller's
    tensor). Eager and the compiled model get the same edits; every answer, and the inputs, must agree."""
    target, cms = compiled
    cm, model = cms[Outputs][which], Outputs().eval()
    x, z = _examples()
    convert = (lambda t: t) if kind == "torch" else (lambda t: t.numpy())
    xe, ze = x.clone(), z.clone()
    xc, zc = convert(x.clone()), convert(z.clone())
    with torch.no_grad():
        eager_first = model(xe, ze)
    first = cm(xc, zc)
    _edit(eager_first)
    _edit(first)
    atol = _atol(target)
    _close(first, eager_first, atol)            # one tensor twice: both leaves saw both edits
    _close((xc, zc), (xe, ze), 0)               # the edited input is the caller's own, as in eager
    with torch.no_grad():
        eager_second = model(xe, ze)
    second = cm(xc, zc)
    _close(second, eager_second, atol)
    assert second["input"] is zc and second["twice"][0] is second["twice"][1]


@pytest.mark.parametrize("which", ["compiled", "loaded"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_outputs_in_module_or_input_memory_leave_later_answers_alone(compiled, which, kind):
    """The module's own buffer, a view of it, views of an input: whatever an edit of them reaches (the caller's
    input on torch engines, as in eager), a later call on the same input values answers as eager does, and the
    module is not changed."""
    target, cms = compiled
    cm, model = cms[Views][which], cms[Views]["model"]
    before = Views().state_dict()
    x, z = _examples()
    convert = (lambda t: t) if kind == "torch" else (lambda t: t.numpy())
    xc, zc = convert(x.clone()), convert(z.clone())
    _edit(cm(xc, zc))
    again = cm(convert(torch.as_tensor(xc).clone()), convert(torch.as_tensor(zc).clone()))
    with torch.no_grad():
        want = model(torch.as_tensor(xc).clone(), torch.as_tensor(zc).clone())
    _close(again, want, _atol(target))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Scriptable(nn.Module):
    """Outputs's kinds, as TorchScript can script them, and the module's own buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(16, 4)
        self.register_buffer("table", torch.arange(4.0))

    def forward(self, x, z):
        y = self.l(x)
        twice = y * 2
        return self.table + 0, y, torch.ones(3) * 2, twice, twice, z, self.table


@pytest.mark.parametrize("options", [{"mode": "script"}, {"freeze": False, "optimize_for_inference": False},
                                     {"mode": "script", "freeze": False, "optimize_for_inference": False}],
                         ids=["script", "trace-unfrozen", "script-unfrozen"])
def test_torchscript_outputs_are_fresh_in_every_mode(options):
    """Unfrozen, the module's buffer is an attribute the graph reads, and the JIT executor folds `ones(3) * 2` into
    a constant of its own after its profiling runs: several calls, each answer edited, each next one eager's."""
    model = Scriptable().eval()
    cm = compilers.compile(model, compilers.load_target("torchscript-cpu").with_(**options), _examples())
    x, z = _examples()
    xe, ze, xc, zc = x.clone(), z.clone(), x.clone(), z.clone()
    for _ in range(4):
        with torch.no_grad():
            want = model(xe, ze)
        got = cm(xc, zc)
        _close(got, want, 1e-4)
        _close((xc, zc), (xe, ze), 0)
        assert got[3] is got[4] and got[5] is zc
        _edit(want[:-1])            # not eager's last output: that is the module's own buffer
        _edit(got)
    assert torch.equal(model.table, torch.arange(4.0))


def test_eagers_shared_memory_is_recorded_and_survives_save_and_old_manifests():
    from compilers.capture import capture
    from compilers.signature import Alias, Signature
    sig = capture(Outputs().eval(), _examples(), None, {}).signature
    # flat outputs: buffer_plus_zero, computed, constant, twice, twice, input
    assert set(sig.aliases) == {Alias(4, "output", 3, True), Alias(5, "input", 1, True)}
    views = capture(Views().eval(), _examples(), None, {}).signature
    # the module's buffer is no input: only its view shares with an output; z[0] and z.t() are views of input z
    assert set(views.aliases) == {Alias(2, "output", 1, False), Alias(3, "input", 1, False),
                                  Alias(4, "input", 1, False)}
    d = sig.to_dict()
    assert Signature.from_dict(d) == sig
    del d["aliases"]             # an artifact saved before they were recorded: every output is the call's own
    assert Signature.from_dict(d).aliases == ()
    d["aliases"] = [{"output": 5, "of": "output", "index": 5, "whole": True}]
    with pytest.raises(ValueError, match="names no input or earlier output"):
        Signature.from_dict(d)


EDITS_ITS_OUTPUTS = '''
def postprocess(outputs, context):
    for array in outputs.values():
        array += 100          # a handler's own arrays: editing them in place must not reach the next request
    return outputs
'''


def test_a_server_handler_that_edits_its_outputs_changes_no_later_answer(tmp_path):
    """A served model's outputs leave the process as bytes (JSON or binary: copies), but a custom handler's
    postprocess gets them as arrays first: before the fix, torchscript-cpu handed it its folded constant."""
    import hashlib
    import json
    import urllib.request

    from compilers.serve.repository import Repository, publish
    from compilers.serve.server import running
    from compilers.serve.service import ModelService

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l = nn.Linear(6, 3)
            self.register_buffer("table", torch.arange(4.0))

        def forward(self, x):
            return self.l(x), self.table + 0

    model = WithTable().eval()
    cm = compilers.compile(model, "torchscript-cpu", (torch.randn(2, 6),))
    repo = tmp_path / "repo"
    publish(cm.save(tmp_path / "art"), repo / "m")
    (repo / "m" / "handler.py").write_text(EDITS_ITS_OUTPUTS)
    (repo / "m" / "serving.toml").write_text(f'[handler]\nfile = "handler.py"\n'
                                             f'sha256 = "{hashlib.sha256(EDITS_ITS_OUTPUTS.encode()).hexdigest()}"\n'
                                             "[batching]\nmax_batch_size = 1\n")
    x = np.random.default_rng(0).standard_normal((1, 6)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 6], "data": x.ravel().tolist()}]})
    with running(ModelService(Repository(repo), handlers=True)) as server:
        answers = [{o["name"]: o["data"] for o in json.load(urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/v2/models/m/infer", body.encode())))["outputs"]} for _ in range(3)]
    with torch.no_grad():
        y, table = model(torch.from_numpy(x))
    for answer in answers:
        np.testing.assert_allclose(answer["output.0"], (y + 100).ravel(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(answer["output.1"], (table + 100).ravel())


EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")


@pytest.mark.parametrize("target", ["torchscript-cpu", "inductor-cpu"])
def test_a_model_whose_graph_proves_its_outputs_fresh_checks_nothing_per_call(target, tmp_path, monkeypatch):
    """The 64-wide MLP of examples/mlp.py (what benchmarks/overhead.py times): every output is memory its last
    op allocated, so no call looks at any output's memory, compiled or loaded."""
    sys.path.insert(0, EXAMPLES)
    try:
        import mlp
    finally:
        sys.path.remove(EXAMPLES)
    parts = mlp.factory()
    cm = compilers.compile(parts["model"], target, parts["example_inputs"])
    loaded = compilers.load(cm.save(tmp_path / "m"))

    def looked(self, outs, inputs):
        raise AssertionError("an output's memory was checked")
    monkeypatch.setattr(compilers.CompiledModel, "_own_memory", looked)
    for m in (cm, loaded):
        m(parts["example_inputs"][0])
        assert m.engine.may_share() == frozenset()


class Shares(nn.Module):
    """An output of each origin: fresh (`y.relu()`), one tensor twice (`y`), a view of an input, the module's
    buffer, a constant freezing folds (`ones(3) * 2`), and buffers through ops whose schema says their result is
    fresh but that return their argument (`type_as` to its own dtype, `sum_to_size` to its own size)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0))
        self.register_buffer("b", torch.arange(4.0) + 10)
        self.register_buffer("c", torch.arange(4.0) + 20)

    def forward(self, x):
        y = self.l(x)
        return (y, x.view(-1), self.table, torch.ones(3) * 2, self.b.type_as(x), self.c.sum_to_size([x.shape[-1]]),
                y.relu(), y)


#: what each engine's graph may return in memory not its call's own. TorchScript returns its constants by
#: reference; AOTInductor copies them, and `type_as(b, x)` counts as x's memory too (any argument's)
SHARES = {"trace": {0, 1, 2, 3, 4, 5, 7}, "script": {0, 1, 2, 3, 4, 5, 7}, "inductor": {0, 1, 4, 7}}


@pytest.mark.parametrize("how", list(SHARES))
def test_outputs_the_graph_may_return_in_shared_memory_are_found_and_copied(how, tmp_path):
    """The engine's graph names exactly the outputs that may share memory (compiled and loaded), and those are
    copied where they do: an edit of any answer leaves later answers eager's (the module's buffer unedited)."""
    target = "inductor-cpu" if how == "inductor" else compilers.load_target("torchscript-cpu").with_(mode=how)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, generator=g)
    cm = compilers.compile(Shares().eval(), target, (x,))
    loaded = compilers.load(cm.save(tmp_path / "m"))
    with torch.no_grad():
        want = Shares().eval()(x.clone())
    for m in (cm, loaded):
        assert m.engine.may_share() == frozenset(SHARES[how])
        for _ in range(3):
            xc = x.clone()
            got = m(xc)
            assert got[0] is got[7]
            _close(got, want, 1e-5)
            _edit(got)
            _close(xc.view(-1), got[1], 0)        # the view of the input is a view of the caller's input


def test_the_analysis_follows_loops_branches_and_refuses_lists_written_in_place():
    """An output a loop or a branch may carry an input into may share; a list appended to is not followed."""
    from compilers.analysis.aliasing import script_outputs

    class Flow(nn.Module):
        def forward(self, x):
            acc = x * 3
            for _ in range(3):
                acc = acc + 1         # fresh on every path
            w = x * 4
            for _ in range(2):
                w = x                 # x after the first pass
            if bool(x.sum() > 0):
                z = x
            else:
                z = x * 2
            return z, acc, w, (x + 1, [x * 5])

    class Appends(nn.Module):
        def forward(self, x):
            out = [x * 2]
            out.append(x)
            return out

    flow = torch.jit.freeze(torch.jit.script(Flow().eval()))
    assert script_outputs(flow.inlined_graph, 5) == frozenset({0, 2})
    assert script_outputs(flow.inlined_graph, 4) is None        # not the outputs the signature has
    appends = torch.jit.freeze(torch.jit.script(Appends().eval()))
    assert script_outputs(appends.inlined_graph, 2) is None


def test_unfrozen_torchscript_and_older_inductor_packages_check_every_output(tmp_path):
    """Unfrozen, the JIT executor folds constants no graph shows; an inductor package saved before `may_share`
    was recorded in aoti.json has no answer: both check every output."""
    import json

    from compilers.backends.inductor import META_FILE, MODEL_FILE, InductorEngine
    cm = compilers.compile(Scriptable().eval(), compilers.load_target("torchscript-cpu").with_(
        freeze=False, optimize_for_inference=False), _examples())
    assert cm.engine.may_share() is None and cm._checked == tuple(range(7))
    path = compilers.compile(Scriptable().eval(), "inductor-cpu", _examples()).save(tmp_path / "m")
    meta = json.loads((path / META_FILE).read_text())
    assert meta["may_share"] == [3, 4, 5]
    del meta["may_share"]
    assert InductorEngine(path / MODEL_FILE, meta).may_share() is None
