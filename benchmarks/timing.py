"""Set-up shared by the benchmark scripts (all timing is compilers.benchmark's: interleaved, per call)."""
from __future__ import annotations


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
