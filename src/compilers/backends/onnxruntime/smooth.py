"""SmoothQuant (Xiao et al. 2023) on a float ONNX model, before it is quantized: a transformer's activations
have a few outlier channels that one int8 scale per tensor cannot resolve alongside the rest; dividing
them per channel, and multiplying the weights that read them by the same factors, moves the outliers into
the weights (quantized per output channel) and leaves the product unchanged."""
from __future__ import annotations

import collections
from typing import Any, Sequence

from ...quantize import CalibrationPlan
from .qdq import prune
from .quantize import CalibrationReader


def smooth(model: Any, plan: CalibrationPlan, input_names: Sequence[str], alpha: float) -> int:
    """SmoothQuant (Xiao et al. 2023), in place: every activation that MatMuls with a constant 2-D weight read
    is divided, channel by channel, by s = max|x|^alpha / max|w|^(1-alpha) (a Mul before its quantizer) and
    the weights' rows are multiplied by s. The product is unchanged; the few outlier channels of a transformer's
    activations shrink, so that one int8 scale per tensor still resolves the others, and the weights, quantized
    per output channel, take the outliers over. The float graph changes, the QDQ placement does not.
    Returns how many activations were smoothed."""
    import numpy as np
    from onnx import helper, numpy_helper
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = collections.defaultdict(list)
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[0] not in inits and len(getattr(inits.get(n.input[1]), "dims", ())) == 2:
            readers[n.input[0]].append(n)
    if not readers:
        return 0
    peaks = _channel_peaks(model, list(readers), plan, input_names)
    muls = {}
    for k, (tensor, nodes) in enumerate(readers.items()):
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x_peak = peaks[tensor]
        s = np.where((x_peak > 0) & (w_peak > 0),
                     np.maximum(x_peak, 1e-12) ** alpha / np.maximum(w_peak, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        scale = numpy_helper.from_array((1 / s).astype(np.float32), f"smooth{k}/inverse_scale")
        graph.initializer.append(scale)
        muls[tensor] = helper.make_node("Mul", [tensor, scale.name], [f"smooth{k}/output"], name=f"smooth{k}")
        for j, (n, w) in enumerate(zip(nodes, weights)):
            smoothed = numpy_helper.from_array((w * s[:, None]).astype(w.dtype), f"smooth{k}/weight{j}")
            graph.initializer.append(smoothed)
            n.input[0], n.input[1] = muls[tensor].output[0], smoothed.name
    ordered = [muls[i.name] for i in graph.input if i.name in muls]
    for n in graph.node:
        ordered.append(n)
        ordered += [muls[o] for o in n.output if o in muls]
    del graph.node[:]
    graph.node.extend(ordered)
    prune(model)
    return len(muls)


def _channel_peaks(model: Any, tensors: list[str], plan: CalibrationPlan, input_names: Sequence[str]) -> dict:
    """The largest |value| of each channel (last axis) of `tensors` over the calibration samples."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    peaks: dict = {}
    reader = CalibrationReader(plan, input_names, "SmoothQuant statistics")
    while (feed := reader.get_next()) is not None:
        for name, value in zip(tensors, session.run(tensors, feed)):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            peaks[name] = np.maximum(peaks.get(name, 0), peak)
    return peaks
