"""openvino-cpu-int8 against eager and against the raw OpenVINO + NNCF call an expert writes.

MiniLM-L6 (real weights), batch 8, sequence 128: `compilers.compile(model, "openvino-cpu-int8", ...)` calibrated on
the 96 sentences of calibration/sentences.txt and validated on the 32 held-out ones (the accuracy loop may keep
layers in float), vs `nncf.quantize(ov.convert_model(model), model_type=TRANSFORMER)` on the same calibration
data, compiled with the same plugin config and with OpenVINO's defaults (bf16 for what stays float on this CPU).
Also compiled calibrated on 16 sentences only, where plain int8 misses the contract and the loop steps in.
ResNet-50 (random init), batch 8: the same comparison with the default preset.
Reports latency (p50 per call, compilers.benchmark: interleaved) and, for MiniLM, the worst per-sentence cosine to eager on the
held-out sentences. Targets: MiniLM int8 >= 3x eager, >= 0.9x the faster raw NNCF, worst sentence >= 0.99;
ResNet-50 within 3% of raw.

    .venv/bin/python benchmarks/int8.py [--models minilm,resnet50]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compilers  # noqa: E402
from timing import resnet50_setup, run_checks  # noqa: E402

TARGET = "openvino-cpu-int8"


def raw_nncf(model: torch.nn.Module, example: tuple, calibration: list[tuple], transformer: bool):
    """What an expert writes: convert, nncf.quantize (transformer preset where it applies)."""
    import nncf
    import openvino as ov
    ov_model = ov.convert_model(model, example_input=example)
    data = nncf.Dataset([[t.numpy() for t in sample] for sample in calibration])
    return nncf.quantize(ov_model, data, subset_size=len(calibration),
                         model_type=nncf.ModelType.TRANSFORMER if transformer else None)


def same_config(quantized, cm: compilers.CompiledModel):
    """`quantized` compiled with the plugin config of `cm` (f32 for what stays float, same threads and hint)."""
    import openvino as ov
    return ov.Core().compile_model(quantized, "CPU", cm.engine.describe()["config"])


def called_like_the_model(request):
    """An OpenVINO infer request called like the encoder: (input_ids, attention_mask) -> outputs."""
    return lambda input_ids, attention_mask: request.infer([input_ids.numpy(), attention_mask.numpy()])


def minilm() -> tuple[bool, list[str]]:
    import openvino as ov
    import minilm as m
    parts = m.factory()
    model = parts["model"]
    dyn = dict(dynamic_shapes=parts["dynamic_shapes"], samples=parts["samples"])
    cm = compilers.compile(model, TARGET, parts["example_inputs"], calibration=parts["calibration"], **dyn)
    # the accuracy loop at work: calibrated on 16 sentences only, plain int8 misses the contract
    few = compilers.compile(model, TARGET, parts["example_inputs"], calibration=parts["calibration"][:16], **dyn)
    calib = [(s["input_ids"], s["attention_mask"]) for s in parts["calibration"]]
    ex = (parts["example_inputs"]["input_ids"], parts["example_inputs"]["attention_mask"])
    quantized = raw_nncf(model, ex, calib, transformer=True)
    requests = {"raw NNCF": same_config(quantized, cm).create_infer_request(),
                "raw NNCF, defaults": ov.Core().compile_model(quantized, "CPU").create_infer_request()}
    x = m.batch(8, 128)
    held = parts["samples"]
    runs = {TARGET: cm, f"{TARGET} (16 sentences)": few}
    runs.update({name: called_like_the_model(r) for name, r in requests.items()})
    timed = compilers.benchmark(runs, x, baseline=model, min_time=2.0)
    t = {name: timed.get(name).p50_ms / 1e3 for name in timed.names}
    with torch.inference_mode():
        refs = [model(**s) for s in held]

        def worst(fn) -> float:
            return min(torch.nn.functional.cosine_similarity(fn(s), ref, dim=-1).min().item() for s, ref in zip(held, refs))
        cos = {TARGET: worst(lambda s: cm(**s)), f"{TARGET} (16 sentences)": worst(lambda s: few(**s))}
        for name, r in requests.items():
            cos[name] = worst(lambda s, r=r: torch.from_numpy(
                r.infer([s["input_ids"].numpy(), s["attention_mask"].numpy()])[0].copy()))
    lines = [f"MiniLM-L6 b8 s128 (p50 per call, compilers.benchmark, {timed.threads} threads; calibrated on "
             f"{len(calib)} sentences; worst per-sentence cosine on {sum(len(s['input_ids']) for s in held)} held-out sentences)"]
    for name in t:
        c = f"  worst sentence cosine {cos[name]:.4f}" if name in cos else ""
        lines.append(f"  {name:34s} {t[name] * 1e3:7.1f} ms  {t['eager'] / t[name]:5.2f}x eager{c}")
    for name, c in ((TARGET, cm), (f"{TARGET} (16 sentences)", few)):
        loop = c.report.quantization
        kept = [n.split('/')[0].removeprefix('__module.model.') for n, _ in loop["kept_float"]] if loop else []
        lines.append(f"  {name}: accuracy loop kept {len(kept)} layer(s) in float" + (
            f" ({', '.join(kept)}; contract margin {loop['margin_before']:+.4f} -> {loop['margin_after']:+.4f})"
            if loop else " (plain int8 met the contract)"))
    speedup = t["eager"] / t[TARGET]
    vs_raw = min(t["raw NNCF"], t["raw NNCF, defaults"]) / t[TARGET]
    ok = speedup >= 3 and vs_raw >= 0.9 and cos[TARGET] >= 0.99
    lines.append(f"  {TARGET} = {speedup:.2f}x eager (need >= 3), {vs_raw:.2f}x the faster raw NNCF (need >= 0.9), "
                 f"worst sentence {cos[TARGET]:.4f} (need >= 0.99): {'OK' if ok else 'MISSED'}")
    return ok, lines


def resnet50() -> tuple[bool, list[str]]:
    model, calib, samples, x = resnet50_setup()
    cm = compilers.compile(model, TARGET, (x[:2],), calibration=calib, samples=samples)
    request = same_config(raw_nncf(model, (x[:2],), calib, transformer=False), cm).create_infer_request()
    timed = compilers.benchmark({TARGET: cm, "raw NNCF": lambda x: request.infer([x.numpy()])}, (x,), baseline=model,
                                min_time=2.0)
    t = {name: timed.get(name).p50_ms / 1e3 for name in timed.names}
    lines = [f"ResNet-50 b8 224x224 (p50 per call, compilers.benchmark, {timed.threads} threads)"]
    lines += [f"  {name:18s} {t[name] * 1e3:7.1f} ms  {t['eager'] / t[name]:5.2f}x eager" for name in t]
    ratio = t[TARGET] / t["raw NNCF"]
    ok = ratio <= 1.03
    lines.append(f"  {TARGET} / raw NNCF time = {ratio:.3f} (limit 1.03): {'OK' if ok else 'MISSED'}")
    return ok, lines


if __name__ == "__main__":
    sys.exit(run_checks(__doc__, {"minilm": minilm, "resnet50": resnet50}))
