"""The package's shape: layers import downwards only, `import compilers` and `compilers targets` load no
backend library, compile leaves process-wide state as it found it, and the Signature names the batch dim."""
from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import compilers

PACKAGE = Path(compilers.__file__).parent
# lowest first: a module may import only modules of its own or a lower layer
LAYERS = [
    {"errors", "quiet", "host", "progress", "records", "files", "roundoff", "compat"},
    {"target", "settings", "treespec"},
    {"signature"},
    {"pipeline"},
    {"state"},
    {"determinism"},
    {"capture"},
    {"calibration", "reference", "lower"},
    {"analysis"},
    {"validate", "quantize"},
    {"report"},
    {"artifact"},
    {"backends"},
    {"runtime"},
    {"cache", "request", "devices"},
    {"bench"},
    {"select"},
    {"optimize"},
    {"api"},
    {"plot"},
    {"serve"},
    {"export"},
    {"cli", "__init__"},
]
BACKEND_LIBRARIES = ("onnxruntime", "openvino", "onnxscript", "nncf", "tensorrt")


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module.split(".")[0] in names)


def _imports(path: Path, name: str) -> list[str]:
    """The package modules `path` (module `name`) imports: relative imports and absolute `compilers.*` ones."""
    package = name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            found += [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "compilers":
            inner = node.module.split(".")[1:]
            found += [".".join(inner)] if inner else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            found += [".".join(a.name.split(".")[1:]) for a in node.names
                      if a.name.split(".")[0] == "compilers" and "." in a.name]
    return found


def test_modules_import_only_lower_layers():
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        own = _layer(name)
        for t in _imports(path, name):
            assert _layer(t) <= own, f"{name} (layer {own}) imports {t} (layer {_layer(t)})"


def test_the_layering_check_reads_absolute_imports_too(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from compilers.api import compile\nimport compilers.serve.app\nfrom compilers import cli\n"
                      "from . import files\n")
    assert _imports(module, "signature") == ["api", "serve.app", "cli", "files"]


def test_import_and_targets_load_no_backend_library():
    code = f"""
import sys
import compilers
from compilers import cli
compilers.targets()
[compilers.unavailable_reason(t) for t in compilers.targets()]
cli.main(["targets"])
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({BACKEND_LIBRARIES!r})))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout
    assert "ort-cpu" in r.stdout


def test_compile_and_load_leave_process_state_alone(tmp_path):
    loggers = {n: logging.getLogger(n).level for n in ("torch.onnx", "onnxruntime.transformers", "torch._inductor")}
    streams, threads = (sys.stdout, sys.stderr), torch.get_num_threads()
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()
    for target in ("ort-cpu", "torchscript-cpu"):
        cm = compilers.compile(model, target, (torch.randn(2, 4),))
        compilers.load(cm.save(tmp_path / target))(torch.randn(3, 4))
    assert {n: logging.getLogger(n).level for n in loggers} == loggers
    assert (sys.stdout, sys.stderr) == streams and torch.get_num_threads() == threads


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.fp32_calls = 0

    def forward(self, x):
        self.fp32_calls += x.dtype == torch.float32
        return self.lin(x)


def test_eager_runs_once_per_sample():
    """Capture's eager runs (the example, and the example grown along its dynamic dims) are reused by
    validation: each sample costs one fp32 eager run (and one of the float64 twin), one with perturbed rounding
    (`compilers.roundoff`), plus one NaN/Inf probe per float input, plus the batch-independence check (4 rows
    alone, then together), plus one more run of the example (eager must repeat itself: `compilers.determinism`)."""
    model = Counted().eval()
    samples = [(torch.randn(3, 6),), (torch.randn(5, 6),)]
    cm = compilers.compile(model, "ort-cpu", (torch.randn(2, 6),), samples=samples)
    assert model.fp32_calls == 4 + 4 + 1 + (4 + 1) + 1 and cm.report.validation.samples == 4
    assert cm.report.validation.reference == "float64 eager"


def test_signature_names_the_batch_dim_of_inputs_and_outputs():
    class TwoHeads(nn.Module):
        def forward(self, tokens, table):
            h = tokens.float().unsqueeze(-1) * table.sum()          # (batch, seq, 1)
            return {"per_token": h, "pooled": h.mean(1), "fixed": table * 2}

    dyn = {"tokens": {0: "n", 1: "seq"}}
    torch.manual_seed(0)     # a float32 sum over a random table: some draws round differently in ORT
    cm = compilers.compile(TwoHeads(), "ort-cpu", (torch.randint(0, 9, (2, 5)), torch.randn(3, 4)), dynamic_shapes=dyn)
    sig = cm.signature
    assert sig.batch == "n"
    shapes = {s.name: s.shape for s in sig.outputs}
    assert shapes == {"output.per_token": ("n", "seq", 1), "output.pooled": ("n", 1), "output.fixed": (3, 4)}
    assert [sig.batch_axis(s) for s in sig.outputs] == [0, 0, None]
    assert type(sig).from_dict(sig.to_dict()) == sig


def test_backend_settings_describe_their_options():
    from compilers.backends import get_backend
    from compilers.settings import describe
    rows = {r["name"]: r for r in describe(get_backend("onnxruntime").Settings)}
    assert rows["threads"]["type"] == "int" and rows["threads"]["default"] == 0 and "cores" in rows["threads"]["doc"]
    assert rows["graph_optimization_level"]["choices"] == ("disable", "basic", "extended", "all")
    settings = get_backend("openvino").settings(compilers.load_target("openvino-cpu").with_(threads=1))
    assert (settings.threads, settings.performance_hint) == (1, "LATENCY")
