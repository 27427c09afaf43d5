"""Set-up shared by the benchmark scripts (all timing is compilers.benchmark's: interleaved, per call)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def resnet50_setup():
    """ResNet-50 (random init, seeded) with 16 calibration images, one validation batch of 2, and a batch of 8."""
    import torch
    from transformers import ResNetConfig, ResNetModel
    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig()).eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(1, 3, 224, 224, generator=g),) for _ in range(16)]
    samples = [(torch.randn(2, 3, 224, 224, generator=g),)]
    return model, calib, samples, torch.randn(8, 3, 224, 224, generator=g)


def run_checks(doc: str, checks: dict) -> int:
    """The benchmark scripts' main: run the checks named by --models (each returns (passed, lines)), print
    their lines; exit status 1 when one missed its target."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(checks))
    ok = True
    for name in ap.parse_args().models.split(","):
        passed, lines = checks[name]()
        ok &= passed
        print("\n".join(lines), flush=True)
    return 0 if ok else 1


def alternating(script: str, args: list[str], rev: str, rounds: int = 3) -> dict[str, list[dict]]:
    """Run `script args` in alternating processes, with PYTHONPATH on this tree's src/ and on git revision `rev`'s
    (a temporary worktree), `rounds` times each, the order flipped each round; the JSON object each run prints last,
    per tree ("this tree", rev). On a host whose timings drift, a change's cost is the difference between the two
    trees of one run."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(other), rev], check=True,
                       capture_output=True)
        try:
            trees = {"this tree": root / "src", rev: other / "src"}
            got: dict[str, list[dict]] = {name: [] for name in trees}
            for r in range(rounds):     # the order flips each round: the first process of a pair runs slower here
                for name, src in (list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]):
                    run = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                                         env={**os.environ, "PYTHONPATH": str(src)}, check=True)
                    got[name].append(json.loads(run.stdout.splitlines()[-1]))
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(other)], capture_output=True)
    return got
