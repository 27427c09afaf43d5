"""`compilers compile --prune ... --distill ...` (issue 22): the factory's `metric` judges the smaller model, the
flags are compilers.prune's and compilers.distill's keywords as KEY=VALUE, and what they lack is refused before any
work. On a small MLP whose metric is agreement with its own argmax on fixed data, with ort-cpu."""
import pytest
import torch

import compilers
from compilers import cli, optimize
from test_cli import one_paragraph, run

FACTORY = '''
import torch
from torch import nn

import compilers


def task(max_drop=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return (torch.as_tensor(m(x)).argmax(1) == reference).float().mean().item()

    return {"model": model, "example_inputs": (x[:8],), "calibration": [(b,) for b in x.split(32)],
            "metric": compilers.Metric(agreement, max_drop=max_drop, name="agreement")}


def make():
    return task()


def strict():
    return task(max_drop=0.0)


def uncalibrated():
    return {k: v for k, v in task().items() if k != "calibration"}


def plain():
    return {k: v for k, v in task().items() if k != "metric"}


def loose():
    return {**task(), "metric": lambda m: 1.0}
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "small.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def pruning():
    pytest.importorskip("torch_pruning")


def test_the_factory_metric_is_kept_by_a_plain_compile(workdir, capsys):
    code, out, _ = run(capsys, "compile", "small.py:make", "-t", "ort-cpu", "-o", "art")
    assert code == 0 and "agreement: 1.0000 compiled, 1.0000 eager, drop allowed 0.5: ok" in out
    assert "optimized" not in out


def test_prune_makes_a_smaller_model_the_artifact_and_its_report_carry(workdir, capsys, pruning):
    code, out, err = run(capsys, "compile", "small.py:make", "-t", "ort-cpu", "-o", "art",
                         "--prune", "flops=0.3,importance=magnitude")
    assert code == 0, err
    assert "pruning first" in err and out.startswith("target ")          # stdout: the report, nothing else first
    assert "optimized   pruned by magnitude" in out and "agreement: original 1.0000, pruned" in out
    loaded = compilers.load(workdir / "art")
    o = loaded.report.optimization
    assert o["prune"]["criterion"] == "magnitude" and o["prune"]["macs_after"] <= 0.7 * o["prune"]["macs_before"]
    assert "distill" not in o and o["max_drop"] == 0.5
    metric = cli.load_factory("small.py:make")["metric"]
    assert metric.fn(loaded) == o["scores"]["compiled"] >= 0.5                # the artifact is the model judged
    code, out, _ = run(capsys, "report", "art")
    assert code == 0 and "optimized   pruned by magnitude" in out


def test_distill_trains_on_the_calibration_file(workdir, capsys, pruning):
    flags = ["--prune", "flops=0.3,importance=magnitude", "--distill", "epochs=2,seed=0,progress=False"]
    code, _, err = run(capsys, "compile", "small.py:uncalibrated", "-t", "ort-cpu", "-o", "art", *flags)
    assert code == 2 and "--distill trains on calibration samples" in err and "--calibration FILE.pt" in err
    assert "compiling" not in err and one_paragraph(err) and not (workdir / "art").exists()
    torch.save([(x,) for x in torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).split(16)],
               workdir / "calibration.pt")
    code, out, err = run(capsys, "compile", "small.py:uncalibrated", "-t", "ort-cpu", "-o", "art", *flags,
                         "--calibration", "calibration.pt")
    assert code == 0, err
    assert "pruning and distilling first" in err and ", distilled" in out and "pruned" in out
    o = compilers.load(workdir / "art").report.optimization
    assert o["distill"]["steps"] > 0 and list(o["scores"]) == ["original", "pruned", "distilled", "compiled"]


def test_a_smaller_model_that_misses_the_metric_is_refused_and_not_saved(workdir, capsys, pruning):
    code, out, err = run(capsys, "compile", "small.py:strict", "-t", "ort-cpu", "-o", "art",
                         "--prune", "flops=0.8,importance=magnitude")
    assert code == 1 and one_paragraph(err)
    assert "misses metric 'agreement' (original 1.0000, pruned 0." in err and "prune less, or distill longer" in err
    assert out == "" and not (workdir / "art").exists()


KEYS = "with keys flops, ratio, heads, importance, round_to"


@pytest.mark.parametrize("factory, flags, message", [
    ("make", ["--prune", "flops0.3"], f"'flops0.3' is not KEY=VALUE. --prune takes KEY=VALUE[,KEY=VALUE...] {KEYS}"),
    ("make", ["--prune", "flops=0.3,"], "'' is not KEY=VALUE"),
    ("make", ["--prune", "flop=0.3"], f"flop is no key (did you mean flops?). --prune takes KEY=VALUE[,KEY=VALUE...] "
                                      f"{KEYS}; loss and ignore take Python objects"),
    ("make", ["--prune", "loss=ce"], "--prune: loss takes a Python object: give it in compilers.compile(..., prune="),
    ("make", ["--prune", "calibration=x"], "--prune: calibration comes from the factory or --calibration"),
    ("make", ["--prune", "flops=half"], "--prune flops=half: flops takes a number or None"),
    ("make", ["--prune", "flops=0.3,flops=0.5"], "--prune: flops is given twice"),
    ("make", ["--prune", "flops=0.3", "--distill", "labels=y"], "--distill: labels takes a Python object"),
    ("make", ["--prune", "flops=0.3", "--distill", "epochs=2.5"], "epochs=2.5: epochs takes an integer or None"),
    ("make", ["--prune", "flops=0.3", "--distill", "progress=1"], "progress takes True or False"),
    ("make", ["--distill", "epochs=1"], "--distill trains a pruned model back towards yours: give --prune too"),
    ("plain", ["--prune", "flops=0.3"], "--prune needs a task metric to judge the smaller model by: have factory "
                                        "small.py:plain return 'metric': compilers.Metric("),
    ("loose", [], "factory small.py:loose returned a 'metric' that is a function; make it compilers.Metric("),
])
def test_bad_flags_and_missing_parts_are_refused_before_any_work(workdir, capsys, factory, flags, message):
    code, _, err = run(capsys, "compile", f"small.py:{factory}", "-t", "ort-cpu", "-o", "art", *flags)
    assert code == 2 and message in err and one_paragraph(err), err
    assert "compiling" not in err and not (workdir / "art").exists()


def test_the_keys_follow_the_signatures(workdir, capsys):
    """Every keyword of prune and distill a flag can give is accepted (the data arguments excepted), and a value
    of the wrong type is refused by its annotation: no hand-kept list to fall behind a new keyword."""
    prune = cli._keywords("flops=0.5,ratio=None,heads=0,importance=taylor,round_to=16", "--prune",
                          optimize.prune)
    assert prune == {"flops": 0.5, "ratio": None, "heads": 0, "importance": "taylor", "round_to": 16}
    distill = cli._keywords("loss='kl',temperature=2,alpha=0.5,epochs=6,max_steps=None,max_seconds=1e2,batch_size=8,"
                            "lr=1e-3,seed=0,threads=1,progress=False", "--distill", optimize.distill)
    assert distill["loss"] == "kl" and distill["max_seconds"] == 100.0 and distill["progress"] is False
    assert len(distill) == 11
