"""Export a saved artifact to a Triton Inference Server model repository.

`export_triton(artifact, "REPO/<model>/<version>")` writes `REPO/<model>/<version>/` with the backend's model
file(s) and `REPO/<model>/config.pbtxt` for the Triton backend that runs them:

| artifact backend | Triton backend | version directory |
|---|---|---|
| onnxruntime | `onnxruntime` | `model.onnx` (byte-identical) |
| openvino | `openvino` | `model.xml` + `model.bin` (the .bin byte-identical; see `openvino` for the .xml) |
| torchscript | `pytorch` (platform `pytorch_libtorch`) | `model.pt` (byte-identical) |

AOTInductor `.pt2` artifacts are refused (see `inductor`). The config is built as Triton's own
`ModelConfig` protobuf message (from `tritonclient`) and written with `text_format`, so it always parses; a
`#` comment header says where each setting came from and what Triton cannot express.

What the config holds, and from where:
- `max_batch_size`: serving.toml `[batching] max_batch_size` when the Signature's batch dim leads every input and
  output (then `dims` leave it out); otherwise 0 and `dims` list every dim. Dynamic dims are -1.
- `dynamic_batching` (when max_batch_size > 1): `max_queue_delay_ms`, `preferred_batch_sizes`, and `queue_size` as
  the queue policy's `max_queue_size`. `instance_group`: `instances` CPU instances. `version_policy`: `[versions]`.
- Backend settings: the artifact's runtime options under serving.toml `[engine]`, in the parameters each Triton
  backend reads (names checked against the backends' sources: onnxruntime_backend `src/onnxruntime.cc`,
  openvino_backend `src/openvino.cc`, pytorch_backend `src/pt/model_instance_state.cc`).

Outputs are the Signature's flat tensors, named as `compilers serve` names them (`output`, `output.0`,
`output.hidden`): Triton has no output trees, so a model returning a tuple or dict is served as its tensor leaves
(constant leaves are dropped) and the header records the structure. TorchScript tensors are named
`<name>__<index>`, the PyTorch backend's positional convention; the header maps them to the Signature's names.

Layout: `model` builds and writes the config for any backend; each artifact backend has a module here (`onnxruntime`,
`openvino`, `torchscript`, `inductor`) whose `TRITON` (a `base.TritonBackend`) says how its artifacts become a
Triton model, registered in `model.BACKENDS`.
"""
from .model import CONFIG_FILE, TritonModel, export_triton, triton_model

__all__ = ["CONFIG_FILE", "TritonModel", "export_triton", "triton_model"]
