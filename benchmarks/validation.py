"""Correct compiles of real-size networks must pass validation with the default descriptors.

ResNet-50, ViT-Base and GPT-2 (random init from `transformers` configs; nothing is downloaded) and the real
pretrained all-MiniLM-L6-v2, each compiled for every fp32 target with its built-in descriptor. Prints
each output's measured error against a float64 eager run, eager fp32's own error (the noise), what the
target allowed, and the verdict. Exits non-zero if any correct compile is refused.

    .venv/bin/python benchmarks/validation.py [--targets a,b] [--models resnet50,vit,gpt2,minilm]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import compilers  # noqa: E402

FP32_TARGETS = ["ort-cpu", "openvino-cpu", "torchscript-cpu", "inductor-cpu"]
SEQ = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq // 2:] = 0
    return {"input_ids": torch.randint(0, 50257, (batch, seq), generator=g), "attention_mask": mask}


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def resnet50():
    from transformers import ResNetConfig, ResNetModel
    return ResNetModel(ResNetConfig()), (images(2, 0),), None, [(images(3, 1),), (images(1, 2),)]


def vit():
    from transformers import ViTConfig, ViTModel
    return ViTModel(ViTConfig()), {"pixel_values": images(2, 0)}, None, [{"pixel_values": images(3, 1)}]


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return (GPT2LMHeadModel(GPT2Config(use_cache=False)), tokens(2, 32, 0), SEQ, [tokens(3, 20, 1), tokens(1, 48, 2)])


def minilm():
    import minilm as m
    parts = m.factory()
    return parts["model"], parts["example_inputs"], parts["dynamic_shapes"], parts["samples"]


MODELS = {"resnet50": resnet50, "vit": vit, "gpt2": gpt2, "minilm": minilm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(FP32_TARGETS))
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    refused = 0
    print(f"{'model':9s} {'target':16s} {'output':26s} {'rel err':>9s} {'noise':>9s} {'allowed':>9s} "
          f"{'max err':>9s} {'allowed':>9s}  verdict   compile", flush=True)
    for name in a.models.split(","):
        torch.manual_seed(0)
        model, example, dynamic, samples = MODELS[name]()
        model.eval()
        for target in a.targets.split(","):
            t0 = time.perf_counter()
            try:
                cm = compilers.compile(model, target, example, dynamic_shapes=dynamic, samples=samples)
            except compilers.CompilerError as e:
                refused += 1
                print(f"{name:9s} {target:16s} REFUSED: {type(e).__name__}: {e}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            result = cm.report.validation
            for o in result.outputs:
                print(f"{name:9s} {target:16s} {o.name[:26]:26s} {o.error:9.2e} {o.noise or 0:9.2e} {o.allowed:9.2e} "
                      f"{o.max_error:9.2e} {o.max_allowed:9.2e}  {'ok' if o.passed else 'FAIL'}  {seconds:7.1f}s "
                      f"({result.samples} samples, {result.reference})", flush=True)
    print(f"\n{'all correct compiles passed' if not refused else f'{refused} correct compile(s) refused'}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
