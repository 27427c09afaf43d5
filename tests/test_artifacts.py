"""Artifact hardening (issue 11, items 7-12): load imports nothing a manifest names, every file is listed and
verified inside the directory, a content digest pins an artifact, ONNX external data never leaves it,
TorchScript's code runs only once its digest matched, save deletes only artifacts, and readers of a path
that save replaces see the old or the new artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import nn

import compilers
from compilers import artifact, files

MANIFEST = "manifest.json"
MODEL_FILES = {"ort-cpu": "model.onnx", "openvino-cpu": "model.bin", "torchscript-cpu": "model.pt"}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


@pytest.fixture(scope="module")
def compiled():
    """The small MLP compiled for each target, once per module (compiled on first use)."""
    built: dict[str, compilers.CompiledModel] = {}

    def get(target: str) -> compilers.CompiledModel:
        if target not in built:
            built[target] = compilers.compile(_mlp(), target, (torch.randn(4, 6),))
        return built[target]
    return get


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))


def _answers_like(loaded: compilers.CompiledModel, cm: compilers.CompiledModel) -> None:
    """`loaded` is a working model that gives `cm`'s answers."""
    assert isinstance(loaded, compilers.CompiledModel) and loaded.target.name == cm.target.name
    torch.testing.assert_close(loaded(X), cm(X), rtol=0, atol=0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _forge(path: Path, files: dict[str, str] | None = None, edit=None) -> None:
    """Rewrite the manifest as someone who altered the artifact would: the listed sha256 made to match the
    files now in it (or set to `files`), the stored digest dropped, then `edit(manifest)`."""
    manifest = json.loads((path / MANIFEST).read_text())
    if files is None:
        files = {p.relative_to(path).as_posix(): _sha256(p) for p in sorted(path.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
    manifest["files"] = files
    manifest.pop("digest", None)
    if edit is not None:
        edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _tamper(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


# -- 7: load imports no module a manifest names ----------------------------------------------------------
_EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nclass X(tuple):\n    _fields = ('a',)\n"


@pytest.mark.parametrize("where", ["output type", "namedtuple context"])
def test_load_never_imports_a_module_named_in_the_manifest(mlp, tmp_path, monkeypatch, where):
    path = mlp.save(tmp_path / "art")
    marker = tmp_path / "ran.txt"
    (path / "evilmod.py").write_text(_EVIL.format(marker=str(marker)))   # shipped in the artifact, on sys.path
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.chdir(path)

    _forge(path, edit=lambda m: _set_output_spec(m, where))
    with pytest.raises(compilers.ArtifactError, match="evilmod.X.*never imports"):
        compilers.load(path)
    assert not marker.exists() and "evilmod" not in sys.modules


def _set_output_spec(manifest, where):
    """Wrap the saved output structure in a container named `evilmod.X`."""
    spec = manifest["signature"]["output"]["spec"]
    if where == "output type":
        spec[1] = {"type": "evilmod.X", "context": "null", "children_spec": [spec[1]]}
    else:
        spec[1] = {"type": "collections.namedtuple", "context": "evilmod.X", "children_spec": [spec[1]]}


def test_output_types_of_already_imported_code_are_rebuilt_without_importing(tmp_path):
    """A structseq (torch.return_types) is found in its imported module; the registry entry is not needed."""
    from torch.utils import _pytree as pytree

    class TopK(nn.Module):
        def forward(self, x):
            return torch.topk(x, 2)

    cm = compilers.compile(TopK().eval(), "ort-cpu", (torch.randn(4, 6),))
    path = cm.save(tmp_path / "art")
    name = "torch.return_types.topk"
    pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.pop(name, None)
    pytree.SUPPORTED_SERIALIZED_TYPES.pop(torch.return_types.topk, None)
    out = compilers.load(path)(torch.randn(3, 6))
    assert type(out) is torch.return_types.topk


# -- 8: integrity cannot be switched off; paths stay inside; content digest -------------------------------
@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "torchscript-cpu"])
def test_an_empty_file_list_does_not_switch_off_integrity(compiled, tmp_path, target):
    path = compiled(target).save(tmp_path / "art")
    _tamper(path / MODEL_FILES[target])
    _forge(path, files={})
    with pytest.raises(compilers.ArtifactError, match="files"):
        compilers.load(path)


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "torchscript-cpu"])
def test_every_file_must_be_listed_and_match(compiled, tmp_path, target):
    path = compiled(target).save(tmp_path / "art")
    manifest = json.loads((path / MANIFEST).read_text())
    victim = MODEL_FILES[target]
    _forge(path, files={k: v for k, v in manifest["files"].items() if k != victim})   # the model file unlisted
    with pytest.raises(compilers.ArtifactError, match=f"{victim} is not listed"):
        compilers.load(path)
    (path / MANIFEST).write_text(json.dumps(manifest))
    _answers_like(compilers.load(path), compiled(target))
    (path / "extra.py").write_text("print('hi')\n")
    with pytest.raises(compilers.ArtifactError, match="extra.py is not listed"):
        compilers.load(path)


def test_listed_paths_outside_the_artifact_are_never_read_and_reveal_nothing(mlp, tmp_path):
    path = mlp.save(tmp_path / "art")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    original = json.loads((path / MANIFEST).read_text())["files"]
    errors = {}
    for name in ["../secret.txt", "../nothing.txt", str(secret), "/nonexistent/nothing.txt"]:
        _forge(path, files={**original, name: _sha256(secret)})   # the sha256 of the outside file is right
        with pytest.raises(compilers.ArtifactError) as e:
            compilers.load(path)
        errors[name] = str(e.value).replace(name, "NAME")
    assert len(set(errors.values())) == 1, errors       # existing or not, outside files look the same: absent


def test_links_inside_the_artifact_are_refused(mlp, tmp_path):
    path = mlp.save(tmp_path / "art")
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(path / "model.onnx", outside)
    (path / "model.onnx").symlink_to(outside)
    with pytest.raises(compilers.ArtifactError, match="model.onnx is a link"):
        compilers.load(path)


def test_the_content_digest_pins_an_artifact(mlp, tmp_path):
    path = mlp.save(tmp_path / "art")
    pinned = mlp.digest
    assert pinned.startswith("sha256:") and len(pinned) == len("sha256:") + 64
    assert json.loads((path / MANIFEST).read_text())["digest"] == pinned
    assert artifact.digest(path) == pinned == artifact.verify(path)["digest"]
    assert mlp.save(tmp_path / "again") == tmp_path / "again" and mlp.digest == pinned   # of content, not place
    _answers_like(compilers.load(tmp_path / "again"), mlp)
    assert compilers.load(path, digest=pinned).digest == pinned

    other = compilers.compile(_mlp(seed=1), "ort-cpu", (torch.randn(4, 6),))
    shutil.copyfile(other.save(tmp_path / "other") / "model.onnx", path / "model.onnx")
    _forge(path)       # the manifest rewritten together with the model: consistent, so only a pin sees it
    _answers_like(compilers.load(path), other)
    with pytest.raises(compilers.ArtifactError, match="not the artifact you pinned"):
        compilers.load(path, digest=pinned)
    with pytest.raises(compilers.ArtifactError, match="sha256:"):
        compilers.load(path, digest="abc")

    _forge(path, edit=lambda m: m.update(digest=pinned))    # a stored digest is description: only a pin counts
    assert compilers.load(path).digest != pinned


# -- 9: ONNX external data never resolves outside the artifact ------------------------------------------------
@pytest.mark.parametrize("level", ["all", "disable"])
def test_onnx_external_data_is_not_read_from_the_current_directory(tmp_path, monkeypatch, level):
    """A model.onnx naming `secret.bin` as external data: ORT, given the model's bytes, reads it from the current
    directory (with graph optimizations off it loads it: the secret becomes the weights). load refuses it."""
    import onnx
    from compilers.target import load_target
    model = _mlp()
    cm = compilers.compile(model, load_target("ort-cpu").with_(graph_optimization_level=level), (torch.randn(4, 6),))
    path = cm.save(tmp_path / "art")
    staging, cwd = tmp_path / "staging", tmp_path / "cwd"
    staging.mkdir()
    cwd.mkdir()
    onnx.save_model(onnx.load(str(path / "model.onnx")), str(staging / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="secret.bin", size_threshold=0)
    shutil.move(staging / "secret.bin", cwd / "secret.bin")
    shutil.copyfile(staging / "model.onnx", path / "model.onnx")
    _forge(path)
    monkeypatch.chdir(cwd)
    with pytest.raises(compilers.ArtifactError, match="external data.*secret.bin"):
        compilers.load(path)
    shutil.copyfile(cwd / "secret.bin", path / "secret.bin")   # inside and listed: still refused (whole models only)
    _forge(path)
    with pytest.raises(compilers.ArtifactError, match="external data"):
        compilers.load(path)


# -- 10: TorchScript runs code at load: a pinned digest refuses a swapped file before it is read -------------
class _Evil(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        print("EVIL __setstate__ ran")
        self.w = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] + self.w


def test_pinned_digest_refuses_a_swapped_torchscript_file_before_it_runs(compiled, tmp_path, capfd):
    cm = compiled("torchscript-cpu")
    path = cm.save(tmp_path / "art")
    pinned = cm.digest
    torch.jit.save(torch.jit.script(_Evil()), str(path / "model.pt"))
    _forge(path)
    capfd.readouterr()
    with pytest.raises(compilers.ArtifactError, match="not the artifact you pinned"):
        compilers.load(path, digest=pinned)
    assert "EVIL" not in capfd.readouterr().out
    try:                       # unpinned, the swapped file's code runs while it is deserialized: the format
        compilers.load(path)
    except compilers.CompilerError:
        pass
    assert "EVIL __setstate__ ran" in capfd.readouterr().out


# -- 11: save replaces only an artifact of this library ---------------------------------------------------------
def test_save_never_deletes_a_directory_that_is_not_an_artifact(mlp, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("{}")
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(compilers.ArtifactError, match="not a compilers artifact.*nothing was deleted"):
        mlp.save(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "thesis.tex"]

    art = mlp.save(tmp_path / "art")
    (art / "notes.txt").write_text("mine")            # an artifact with a file of the user's in it
    with pytest.raises(compilers.ArtifactError, match="nothing was deleted"):
        mlp.save(art)
    assert (art / "notes.txt").read_text() == "mine"
    (art / "notes.txt").unlink()
    _tamper(art / "model.onnx")                       # a damaged artifact is still an artifact: replaced
    _answers_like(compilers.load(mlp.save(art)), mlp)
    empty = tmp_path / "empty"
    empty.mkdir()
    _answers_like(compilers.load(mlp.save(empty)), mlp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "empty", "mine"]


# -- 12: readers see the old or the new artifact while save replaces it ------------------------------------------
def _race(path: Path, models: list[compilers.CompiledModel], saves: int, seconds: float) -> tuple[list[str], list[int]]:
    """One thread saves the models over `path` in turn `saves` times while two threads load it in a loop;
    every load must give one of the models whole (outputs matching one model's, and its digest that model's)."""
    x = torch.randn(2, 6)
    expected = [cm(x) for cm in models]
    digests = [getattr(cm, "digest", None) for cm in models]
    failures: list[str] = []
    loads = [0, 0]
    done = threading.Event()
    deadline = time.monotonic() + seconds

    def saver():
        try:
            for i in range(saves):
                models[i % len(models)].save(path)
                if time.monotonic() > deadline:
                    break
        except BaseException as e:            # noqa: BLE001 -- every failure is collected
            failures.append(f"save: {e!r}")
        finally:
            done.set()

    def loader(k: int):
        while not done.is_set():
            try:
                cm = compilers.load(path)
                y = cm(x)
                which = [i for i, e in enumerate(expected) if torch.allclose(y, e)]
                assert which, "the loaded model computes neither model's outputs"
                assert getattr(cm, "digest", None) == digests[which[0]], "digest of the other model"
                loads[k] += 1
            except BaseException as e:        # noqa: BLE001
                failures.append(f"load: {type(e).__name__}: {e}"[:300])

    threads = [threading.Thread(target=saver)] + [threading.Thread(target=loader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return failures, loads


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    models = [compilers.compile(_mlp(seed), "ort-cpu", (torch.randn(4, 6),)) for seed in (0, 1)]
    for i, cm in enumerate(models):
        cm.save(base / str(i))                 # sets cm.digest
    return models


def test_readers_see_the_old_or_the_new_artifact_while_save_replaces_it(two_models, tmp_path):
    path = two_models[0].save(tmp_path / "art")
    failures, loads = _race(path, two_models, saves=100, seconds=60)
    assert failures == [], f"{len(failures)} failures, first: {failures[:3]}"
    assert min(loads) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["art"]           # no staging or old directory left


def test_readers_ride_out_the_rename_fallback(two_models, tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, save renames the old artifact aside and the new one in; a
    reader that finds no manifest while a save is under way tries again."""
    monkeypatch.setattr(files, "_rename2", lambda a, b, flags: False)
    path = two_models[0].save(tmp_path / "art")
    failures, loads = _race(path, two_models, saves=60, seconds=60)
    assert failures == [], f"{len(failures)} failures, first: {failures[:3]}"
    assert min(loads) > 0


def test_an_interrupt_between_the_renames_keeps_the_old_artifact(two_models, tmp_path, monkeypatch):
    old, new = two_models
    path = old.save(tmp_path / "art")
    monkeypatch.setattr(files, "_rename2", lambda a, b, flags: False)
    rename = os.rename

    def interrupted(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".art.tmp-") and Path(dst) == path:
            raise KeyboardInterrupt
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.setattr(os, "rename", rename)
    assert compilers.load(path).digest == artifact.digest(tmp_path / "art") and artifact.digest(path) == old.digest
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_an_engine_file_that_cannot_be_read_is_an_artifact_error(mlp, tmp_path):
    """A model file whose listed sha256 matches but that the backend cannot parse is a typed error, not the
    backend's own exception (ORT's InvalidProtobuf)."""
    path = mlp.save(tmp_path / "art")
    (path / "model.onnx").write_bytes(b"not a protobuf at all")
    _forge(path)
    with pytest.raises(compilers.ArtifactError, match="cannot be loaded.*re-save"):
        compilers.load(path)
