"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, blocks: int, per_block: int) -> dict[str, float]:
    """Median over blocks of the mean seconds per call; the functions take turns block by block."""
    for fn in fns.values():
        for _ in range(max(3, per_block // 10)):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_block):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_block)
    return {k: statistics.median(v) for k, v in samples.items()}


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
