"""openvino-cpu-int8 against eager and against the raw OpenVINO + NNCF call an expert writes.

MiniLM-L6 (real weights), batch 8, sequence 128: `compilers.compile(model, "openvino-cpu-int8", ...)` calibrated on
the demo's 16 sentences and validated on held-out sentences (the accuracy loop may keep layers in float), vs
`nncf.quantize(ov.convert_model(model), model_type=TRANSFORMER)` on the same calibration data, compiled with
the same plugin config. ResNet-50 (random init), batch 8: the same comparison with the default preset.
Reports latency (median of interleaved blocks) and, for MiniLM, the worst per-sentence cosine to eager on the
held-out sentences. Targets: MiniLM int8 >= 3x eager and >= 0.9x raw NNCF; ResNet-50 within 3% of raw.

    .venv/bin/python benchmarks/int8.py [--models minilm,resnet50]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
from timing import interleaved  # noqa: E402

TARGET = "openvino-cpu-int8"


def raw_nncf(model: torch.nn.Module, example: tuple, calibration: list[tuple], cm: compilers.CompiledModel,
             transformer: bool):
    """What an expert writes: convert, nncf.quantize (transformer preset where it applies), compile with the
    same plugin config as `cm`."""
    import nncf
    import openvino as ov
    ov_model = ov.convert_model(model, example_input=example)
    data = nncf.Dataset([[t.numpy() for t in sample] for sample in calibration])
    q = nncf.quantize(ov_model, data, subset_size=len(calibration),
                      model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    config = {k: cm.engine.compiled.get_property(k) for k in
              ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")}
    return ov.Core().compile_model(q, "CPU", config)


def minilm() -> tuple[bool, list[str]]:
    import minilm as m
    parts = m.factory()
    model = parts["model"]
    cm = compilers.compile(model, TARGET, parts["example_inputs"], dynamic_shapes=parts["dynamic_shapes"],
                           calibration=parts["calibration"], samples=parts["samples"])
    calib = [(s["input_ids"], s["attention_mask"]) for s in parts["calibration"]]
    ex = (parts["example_inputs"]["input_ids"], parts["example_inputs"]["attention_mask"])
    raw = raw_nncf(model, ex, calib, cm, transformer=True)
    x = m.batch(8, 128)
    feed = [x["input_ids"].numpy(), x["attention_mask"].numpy()]
    request = raw.create_infer_request()
    with torch.inference_mode():
        t = interleaved({"eager": lambda: model(**x), TARGET: lambda: cm(**x), "raw NNCF": lambda: request.infer(feed)},
                        blocks=15, per_block=2)
        held = [s for s in parts["samples"]]
        cos = {TARGET: [], "raw NNCF": []}
        for s in held:
            ref = model(**s)
            cos[TARGET].append(torch.nn.functional.cosine_similarity(cm(**s), ref, dim=-1).min().item())
            out = torch.from_numpy(request.infer([s["input_ids"].numpy(), s["attention_mask"].numpy()])[0].copy())
            cos["raw NNCF"].append(torch.nn.functional.cosine_similarity(out, ref, dim=-1).min().item())
    kept = cm.report.quantization["kept_float"] if cm.report.quantization else []
    lines = [f"MiniLM-L6 b8 s128 ({torch.get_num_threads()} threads, median of 15 interleaved blocks; "
             f"worst per-sentence cosine on {sum(len(s['input_ids']) for s in held)} held-out sentences)"]
    for name in t:
        c = f"  worst sentence cosine {min(cos[name]):.4f}" if name in cos else ""
        lines.append(f"  {name:18s} {t[name] * 1e3:7.1f} ms  {t['eager'] / t[name]:5.2f}x eager{c}")
    lines.append(f"  {TARGET}: {len(kept)} layer(s) kept in float by the accuracy loop: "
                 + (", ".join(n.split('/')[0].removeprefix('__module.model.') for n, _ in kept) or "none"))
    speedup, vs_raw = t["eager"] / t[TARGET], t["raw NNCF"] / t[TARGET]
    ok = speedup >= 3 and vs_raw >= 0.9
    lines.append(f"  {TARGET} = {speedup:.2f}x eager (need >= 3), {vs_raw:.2f}x raw NNCF speed (need >= 0.9): "
                 f"{'OK' if ok else 'MISSED'}")
    return ok, lines


def resnet50() -> tuple[bool, list[str]]:
    from transformers import ResNetConfig, ResNetModel
    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig()).eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(1, 3, 224, 224, generator=g),) for _ in range(16)]
    samples = [(torch.randn(2, 3, 224, 224, generator=g),)]
    x = torch.randn(8, 3, 224, 224, generator=g)
    cm = compilers.compile(model, TARGET, (x[:2],), calibration=calib, samples=samples)
    raw = raw_nncf(model, (x[:2],), calib, cm, transformer=False)
    request = raw.create_infer_request()
    with torch.inference_mode():
        t = interleaved({"eager": lambda: model(x), TARGET: lambda: cm(x), "raw NNCF": lambda: request.infer([x.numpy()])},
                        blocks=10, per_block=2)
    lines = [f"ResNet-50 b8 224x224 ({torch.get_num_threads()} threads, median of 10 interleaved blocks)"]
    lines += [f"  {name:18s} {t[name] * 1e3:7.1f} ms  {t['eager'] / t[name]:5.2f}x eager" for name in t]
    ratio = t[TARGET] / t["raw NNCF"]
    ok = ratio <= 1.03
    lines.append(f"  {TARGET} / raw NNCF time = {ratio:.3f} (limit 1.03): {'OK' if ok else 'MISSED'}")
    return ok, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,resnet50")
    a = ap.parse_args()
    ok = True
    for name in a.models.split(","):
        passed, lines = {"minilm": minilm, "resnet50": resnet50}[name]()
        ok &= passed
        print("\n".join(lines), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
