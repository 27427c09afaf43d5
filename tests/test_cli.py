"""The CLI as a new user meets it (issue 11): every failure is exit 2 with one paragraph and no traceback,
--out is checked before compiling, overwriting an artifact needs --force, a mistyped target gets a
suggestion, validate takes samples and a tolerance, and `targets` lists the user's descriptors."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import compilers
from compilers import cli

FACTORY = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))

def make():
    return model(), (torch.randn(4, 6),)

def nudged():
    m = model()
    with torch.no_grad():
        m[2].bias.add_(1e-3)        # small, but far beyond fp32 noise
    return m, (torch.randn(4, 6),)

def raises():
    raise ValueError("the weights file is missing")
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_paragraph(err: str) -> bool:
    """No traceback, and the error is the last line of stderr, one paragraph starting "compilers:"."""
    lines = err.strip().splitlines()
    return "Traceback" not in err and lines[-1].startswith("compilers: ") and \
        sum(line.startswith("compilers: ") for line in lines) == 1


def test_a_factory_that_cannot_be_imported_or_raises_is_exit_2_in_one_paragraph(workdir, capsys):
    (workdir / "broken.py").write_text("import torch\nraise RuntimeError('no GPU here')\n")
    (workdir / "syntax.py").write_text("def make(:\n")
    cases = {
        "broken.py:make": "importing factory module broken.py failed: RuntimeError: no GPU here",
        "syntax.py:make": "importing factory module syntax.py failed: SyntaxError",
        "no_such_package.mod:make": "factory module 'no_such_package.mod' cannot be imported",
        "factory.py:raises": "factory factory.py:raises raised ValueError: the weights file is missing",
    }
    for factory, message in cases.items():
        code, out, err = run(capsys, "compile", factory, "-t", "ort-cpu", "-o", "art")
        assert code == 2 and message in err and one_paragraph(err), (factory, err)
    assert not (workdir / "art").exists()
    code, _, err = run(capsys, "--traceback", "compile", "broken.py:make", "-t", "ort-cpu", "-o", "art")
    assert code == 2 and "Traceback" in err and 'broken.py", line 2' in err     # where the user's module failed


def test_out_is_checked_before_compiling(workdir, capsys):
    (workdir / "a_file").write_text("keep me")
    (workdir / "notes").mkdir()
    (workdir / "notes" / "todo.txt").write_text("keep me too")
    for out, message in [("a_file", "not a directory"), ("a_file/art", "a_file is a file"),
                         ("notes", "not a compilers artifact")]:
        code, _, err = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", out)
        assert code == 2 and message in err and one_paragraph(err), (out, err)
        assert "compiling" not in err          # refused before the factory ran or anything was lowered
    assert (workdir / "a_file").read_text() == "keep me"
    assert (workdir / "notes" / "todo.txt").read_text() == "keep me too"


def test_overwriting_an_artifact_needs_force(workdir, capsys):
    code, out, _ = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art")
    assert code == 0
    digest = json.loads((workdir / "art" / "manifest.json").read_text())["generation"]
    code, _, err = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art")
    assert code == 2 and "pass --force" in err and "compiling" not in err
    assert json.loads((workdir / "art" / "manifest.json").read_text())["generation"] == digest
    code, _, _ = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art", "--force")
    assert code == 0
    assert json.loads((workdir / "art" / "manifest.json").read_text())["generation"] != digest


def test_artifact_directories_get_the_umask_permissions(workdir, capsys):
    old = os.umask(0o027)
    try:
        assert run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((workdir / "art").stat().st_mode) == 0o750


def test_a_mistyped_target_gets_a_suggestion(workdir, capsys):
    code, _, err = run(capsys, "compile", "factory.py:make", "-t", "ort-cup", "-o", "art")
    assert code == 2 and "did you mean ort-cpu" in err and one_paragraph(err)
    with pytest.raises(compilers.TargetError, match="did you mean openvino-cpu"):
        compilers.load_target("openvino-cpu-fp32")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"compilers {compilers.__version__}"


def test_validate_takes_samples_and_a_tolerance(workdir, capsys):
    assert run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art")[0] == 0
    torch.manual_seed(5)
    torch.save([(torch.randn(2, 6),), (torch.randn(7, 6),)], workdir / "samples.pt")
    code, out, _ = run(capsys, "validate", "art", "factory.py:make", "--samples", "samples.pt")
    assert code == 0 and "PASSED" in out and "3 sample(s)" in out     # the example and the two saved samples

    code, out, _ = run(capsys, "validate", "art", "factory.py:nudged", "--samples", "samples.pt")
    assert code == 1 and "FAIL" in out                                # 1e-3 is far beyond fp32 noise
    code, out, _ = run(capsys, "validate", "art", "factory.py:nudged", "--samples", "samples.pt", "--noise", "1e6")
    assert code == 0 and "PASSED" in out

    torch.save([(torch.randn(2, 5),)], workdir / "wrong.pt")
    code, _, err = run(capsys, "validate", "art", "factory.py:make", "--samples", "wrong.pt")
    assert code == 2 and "InputError" in err and one_paragraph(err)
    torch.save({"not": "a list"}, workdir / "dict.pt")
    code, _, err = run(capsys, "validate", "art", "factory.py:make", "--samples", "dict.pt")
    assert code == 2 and "save a list of samples" in err
    code, _, err = run(capsys, "validate", "art", "factory.py:make", "--noise", "-1")
    assert code == 2 and "noise = -1.0 must be a number >= 0" in err


def test_compile_reads_calibration_samples_from_a_file(workdir, capsys):
    torch.manual_seed(6)
    torch.save([(torch.randn(4, 6),) for _ in range(5)], workdir / "calibration.pt")
    code, out, _ = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu-int8", "-o", "art", "--no-fail",
                       "--calibration", "calibration.pt")
    assert code in (0, 1) and "calibrated on 5 sample(s)" in out
    code, _, err = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu-int8", "-o", "art2",
                       "--calibration", "missing.pt")
    assert code == 2 and "--calibration missing.pt does not exist" in err and one_paragraph(err)


def test_targets_lists_the_descriptors_on_compilers_targets(workdir, capsys, monkeypatch):
    mine = workdir / "mine"
    mine.mkdir()
    (mine / "ort-cpu-1t.toml").write_text('extends = "ort-cpu"\nname = "ort-cpu-1t"\n[options]\nthreads = 1\n')
    (mine / "broken.toml").write_text('name = "broken"\nbackend = "onnxruntime"\n[options]\nthreads = "x"\n')
    monkeypatch.setenv("COMPILERS_TARGETS", str(mine))
    code, out, _ = run(capsys, "targets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "from " + str(mine / "ort-cpu-1t.toml") in lines["ort-cpu-1t"] and " yes" in lines["ort-cpu-1t"]
    assert "no: TargetError" in lines["broken"] and "threads" in lines["broken"]
    assert "from" not in lines["ort-cpu"]           # built-ins say nothing of where they come from
    code, out, _ = run(capsys, "targets", "--json")
    listed = {t["name"]: t for t in json.loads(out)}
    assert listed["ort-cpu-1t"]["source"] == str(mine / "ort-cpu-1t.toml") and listed["ort-cpu-1t"]["available"]
    assert listed["ort-cpu"]["source"] == "built-in" and listed["auto-cpu"]["backend"] == "auto"


def test_an_unexpected_error_is_exit_2_in_one_paragraph_and_traceback_shows_it(workdir, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")    # stands for a bug in compilers or a backend
    monkeypatch.setattr(compilers.api, "compile", bug)
    code, _, err = run(capsys, "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art")
    assert code == 2 and one_paragraph(err)
    assert "unexpected ZeroDivisionError: division by zero" in err and "--traceback" in err
    code, _, err = run(capsys, "--traceback", "compile", "factory.py:make", "-t", "ort-cpu", "-o", "art")
    assert code == 2 and "Traceback" in err and "in bug" in err


def test_the_installed_command_exits_2_without_a_traceback(workdir):
    r = subprocess.run([sys.executable, "-m", "compilers.cli", "compile", "factory.py:raises", "-t", "ort-cpu",
                        "-o", "art"], capture_output=True, text=True, cwd=workdir)
    assert r.returncode == 2 and one_paragraph(r.stderr) and "raised ValueError" in r.stderr


def test_serve_limits_are_checked_and_not_silently_dropped_on_ray(tmp_path, capsys):
    """The connection and body limits of `compilers serve`: a bad value names its flag; with --ray, where Ray
    Serve's proxy holds the connections, a limit given is an error rather than ignored."""
    for flags, words in ((["--body-timeout", "0"], "--body-timeout: must be positive"),
                         (["--max-connections", "0"], "--max-connections: must be at least 1"),
                         (["--max-body-mb", "-1"], "--max-body-mb must be positive"),
                         (["--ray", "--max-body-mb", "8"], "--max-body-mb sets a limit of compilers serve's own"),
                         (["--ray", "--grpc-port", "0", "--grpc-max-rpcs", "8"],
                          "--grpc-max-rpcs sets a limit of compilers serve's own")):
        code, _, err = run(capsys, "serve", str(tmp_path), *flags)
        assert code == 2 and words in err and one_paragraph(err), err


@pytest.fixture
def started(monkeypatch):
    """Where `compilers serve` would start its server: recorded instead, so that a check that lets a malformed
    address through fails the test rather than serving until killed."""
    import compilers.serve.server
    calls = []
    monkeypatch.setattr(compilers.serve.server, "serve", lambda repository, host, port, **kw: calls.append((host, port)))
    return calls


@pytest.mark.parametrize("flags, words", [
    (["--port", "99999"], "--port must be a port number (0-65535; 0 picks a free one), not 99999"),
    (["--port", "-1"], "--port must be a port number (0-65535; 0 picks a free one), not -1"),
    (["--host", ""], "--host is empty; expected an IP address of this machine or a name for one"),
    (["--host", "[::1]"], "--host '[::1]' is neither an IP address nor a name; expected"),
    (["--host", "127.0.0.1:8000"], "--host '127.0.0.1:8000' is neither an IP address nor a name"),
    (["--host", "http://127.0.0.1"], "--host 'http://127.0.0.1' is neither an IP address nor a name"),
    (["--host", "nosuchhost.invalid"], "--host 'nosuchhost.invalid' does not resolve")])
def test_serve_refuses_a_malformed_listen_address(tmp_path, capsys, started, flags, words):
    """uvicorn bound port 99999 as 34463 (modulo 65536) while logging 99999, listened on every interface for an
    empty --host, and ended the others in its own log lines with exit 3."""
    code, _, err = run(capsys, "serve", str(tmp_path), *flags)
    assert code == 2 and words in err and one_paragraph(err) and len(err.splitlines()) == 1, err
    assert not started


@pytest.mark.parametrize("host, port", [("127.0.0.1", "0"), ("localhost", "8000"), ("::1", "65535"), ("0.0.0.0", "1")])
def test_serve_takes_the_usual_listen_addresses(tmp_path, capsys, started, host, port):
    assert run(capsys, "serve", str(tmp_path), "--host", host, "--port", port)[0] == 0
    assert started == [(host, int(port))]
