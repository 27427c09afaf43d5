"""Malformed manifests and misplaced paths are typed errors (issue 11, item 15): an artifact's manifest is
input like any other, so every field of it, damaged in any way, gives an ArtifactError that says what to do
(or, where the damage is harmless, a model that still works), never a raw KeyError/TypeError at load or
later when the model or its report is used."""
from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import compilers
from compilers import artifact, cli

WRONG = (None, 3, "x", [], {}, True, [3], [{}], [{"name": 3}])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    path = tmp_path_factory.mktemp("manifests") / "base"
    compilers.compile(model, "ort-cpu", (torch.randn(4, 6),)).save(path)
    return path


def _damaged(good: dict):
    """The manifest with one part missing or replaced by a value of the wrong type, part by part."""
    for key in good:
        m = copy.deepcopy(good)
        del m[key]
        yield f"no {key}", m
        for bad in WRONG:
            m = copy.deepcopy(good)
            m[key] = bad
            yield f"{key}={bad!r}", m
    for part in ("target", "signature", "report"):
        for key in good[part]:
            m = copy.deepcopy(good)
            del m[part][key]
            yield f"no {part}.{key}", m
            for bad in WRONG:
                m = copy.deepcopy(good)
                m[part][key] = bad
                yield f"{part}.{key}={bad!r}", m


def _write(path: Path, base: Path, manifest) -> None:
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    (path / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())


@pytest.mark.parametrize("raw, message", [
    (b"[]", r"format \[\] is not readable"),
    (b'"x"', "format x is not readable"),
    (b"{", "is corrupt"),
    (b"\xff\xfe{}", "is corrupt"),
    (b"{}", "is not readable by this compilers"),
])
def test_a_manifest_that_is_no_json_object_is_an_artifact_error(saved, tmp_path, raw, message):
    _write(tmp_path / "a", saved, raw)
    with pytest.raises(compilers.ArtifactError, match=message):
        compilers.load(tmp_path / "a")


def test_named_malformations_say_what_is_wrong_and_what_to_do(saved, tmp_path):
    good = json.loads((saved / "manifest.json").read_text())
    cases = {
        "format_version": ("1", "not readable by this compilers"),
        "files": (None, "'files' must list every file"),
    }
    for key, (value, message) in cases.items():
        _write(tmp_path / "a", saved, {**good, key: value})
        with pytest.raises(compilers.ArtifactError, match=message):
            compilers.load(tmp_path / "a")
    m = copy.deepcopy(good)
    m["signature"]["outputs"][0]["dtype"] = "nn"           # getattr(torch, "nn") is a module, not a dtype
    _write(tmp_path / "a", saved, m)
    with pytest.raises(compilers.ArtifactError, match=r"signature.outputs\[0\].dtype: 'nn' is not a torch dtype.*Re-save"):
        compilers.load(tmp_path / "a")
    m = copy.deepcopy(good)
    m["report"]["validation"]["outputs"][0]["error"] = "x"
    _write(tmp_path / "a", saved, m)
    with pytest.raises(compilers.ArtifactError, match=r"report.validation.outputs\[0\].error: expected a number, got 'x'"):
        compilers.load(tmp_path / "a")


def test_every_damaged_field_is_a_typed_error_or_harmless(saved, tmp_path, capsys):
    """Each field of the manifest (and of its target, signature and report) removed, or replaced by a value of
    each wrong type: load raises ArtifactError (or, for a target naming a backend or device that is not
    here, TargetError / BackendUnavailable), or the model it returns runs and its report prints. The stored
    digest is dropped (a pinned digest would refuse them all before parsing)."""
    good = json.loads((saved / "manifest.json").read_text())
    good.pop("digest")
    x = torch.randn(2, 6)
    untyped, refused, harmless = {}, 0, 0
    for name, manifest in _damaged(good):
        _write(tmp_path / "a", saved, manifest)
        try:
            cm = compilers.load(tmp_path / "a")
            cm(x)
            str(cm.report)
            harmless += 1
        except compilers.ArtifactError:
            refused += 1
        except compilers.CompilerError as e:
            if "target.backend" not in name and "target.device" not in name:
                untyped[name] = f"{type(e).__name__}: {e}"
        except Exception as e:       # anything else escaped the library's types
            untyped[name] = f"{type(e).__name__}: {e}"
        code = cli.main(["report", str(tmp_path / "a")])
        if code not in (0, 2) or "unexpected" in capsys.readouterr().err:
            untyped[f"report, {name}"] = f"exit {code}"
    assert not untyped, untyped
    assert refused > 200 and harmless > 0        # most damage is refused; a report's wrong cache field is not


def test_load_and_save_on_a_file_are_artifact_errors(saved, tmp_path):
    (tmp_path / "file").write_text("not an artifact")
    with pytest.raises(compilers.ArtifactError, match="manifest.json is missing"):
        compilers.load(tmp_path / "file")
    with pytest.raises(compilers.ArtifactError, match="manifest.json is missing"):
        compilers.load(tmp_path / "absent")
    cm = compilers.load(saved)
    with pytest.raises(compilers.ArtifactError, match="is not a directory"):
        cm.save(tmp_path / "file")
    with pytest.raises(compilers.ArtifactError, match="file is a file, not a directory"):
        cm.save(tmp_path / "file" / "below")
    assert (tmp_path / "file").read_text() == "not an artifact"
    with pytest.raises(compilers.ArtifactError):
        artifact.read_manifest(tmp_path / "file")


def _odd_manifest(path: Path, base: Path, kind: str) -> None:
    """`path` a copy of `base` whose manifest.json is a FIFO, a directory, a character device or nested JSON."""
    _write(path, base, b"{}")
    manifest = path / "manifest.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "directory":
        manifest.mkdir()
        (manifest / "manifest.json").write_text("{}")
    elif kind == "device":
        try:
            os.mknod(manifest, 0o600 | stat.S_IFCHR, os.makedev(1, 5))     # like /dev/zero: endless bytes
        except PermissionError:
            pytest.skip("this process may not create device nodes")
    else:
        manifest.write_text("[" * 200_000 + "]" * 200_000)


def _within(seconds: float, call) -> BaseException | None:
    """What `call()` raised, failing the test if it is still running after `seconds` (a read that hangs)."""
    done: list[BaseException | None] = []

    def run():
        try:
            call()
            done.append(None)
        except BaseException as e:      # noqa: BLE001 - handed back to the test
            done.append(e)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert done, f"still running after {seconds} s: a manifest that is no regular file was waited on"
    return done[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "nested"])
def test_a_manifest_of_an_odd_file_type_is_an_artifact_error_before_anything_is_read(saved, tmp_path, kind):
    """A FIFO used to hang load and save, a directory was an IsADirectoryError, a character device a
    MemoryError and deep nesting a RecursionError: each is a short ArtifactError, and save leaves it alone."""
    path = tmp_path / "odd"
    _odd_manifest(path, saved, kind)
    cm = compilers.load(saved)
    for call in (lambda: compilers.load(path), lambda: artifact.verify(path), lambda: cm.save(path),
                 lambda: artifact.read_manifest(path)):
        error = _within(10, call)
        assert isinstance(error, compilers.ArtifactError), repr(error)
        assert len(str(error)) < 600, str(error)[:2000]
    assert os.path.lexists(path / "manifest.json") and (path / "model.onnx").is_file()   # nothing deleted


def test_an_artifact_error_about_many_files_stays_short(saved, tmp_path):
    path = tmp_path / "many"
    _write(path, saved, (saved / "manifest.json").read_bytes())
    stray = path / "stray"
    stray.mkdir()
    for i in range(20_000):
        (stray / f"file-{i:06d}-{'x' * 30}").write_bytes(b"")
    with pytest.raises(compilers.ArtifactError, match="not listed") as caught:
        compilers.load(path)
    assert len(str(caught.value)) < 2000 and "more" in str(caught.value)
