"""torchscript artifacts on Triton's PyTorch backend (platform `pytorch_libtorch`): `model.pt` as is, its tensors
named by position (`<name>__<index>`), and `forward`'s schema checked against what that backend passes and takes."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from ...errors import ArtifactError
from ...signature import Signature
from ...target import Target
from .base import ALL_TYPES, Export, TritonBackend


def _tensor_name(name: str, index: int) -> str:
    """The PyTorch backend finds TorchScript tensors by position: `<name>__<index>`, the part after the first `__`
    being the index (so the name keeps no `__` of its own)."""
    base = re.sub("_{2,}", "_", name).rstrip("_") or "tensor"
    return f"{base}__{index}"


def _configure(export: Export) -> None:
    # pytorch_backend README "Parameters": INFERENCE_MODE (torch.inference_mode: Triton serializes the outputs,
    # so unlike a CompiledModel's, nobody can update them in place)
    export.param("INFERENCE_MODE", "true")
    _check_torchscript(export.path / TRITON.files[0], export.signature, export.target)


def _check_torchscript(file: Path, signature: Signature, target: Target) -> None:
    """What the Triton PyTorch backend needs of `forward`: one Tensor argument per config input, and a Tensor or a
    tuple of Tensors back (its model_instance_state.cc)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = torch.jit.load(str(file), map_location="cpu").forward.schema
    args = [a for a in schema.arguments if a.name != "self"]
    returns = [r.type for r in schema.returns]
    tensor = torch._C.TensorType.get()
    outs = returns[0].elements() if len(returns) == 1 and isinstance(returns[0], torch._C.TupleType) else returns
    if len(args) != len(signature.inputs) or any(a.type.kind() != "TensorType" for a in args) or \
            len(outs) != len(signature.outputs) or any(not t.isSubtypeOf(tensor) for t in outs):
        mode = target.options.get("mode", "trace")
        raise ArtifactError(f"{file}: forward({', '.join(f'{a.name}: {a.type}' for a in args)})"
                            f" -> {', '.join(map(str, returns))} does not map onto the Signature's "
                            f"{len(signature.inputs)} tensor input(s) and {len(signature.outputs)} tensor output(s); "
                            f"Triton's PyTorch backend passes one Tensor per input and takes a Tensor or a tuple of "
                            f"Tensors back. " + ("Compile with mode = \"trace\" (the default), whose model.pt takes "
                                                 "and returns flat tensors" if mode != "trace" else "Recompile it"))


# the tensor types of the PyTorch backend's data type table
TRITON = TritonBackend("pytorch", platform="pytorch_libtorch", files=("model.pt",),
                       types=ALL_TYPES - {"TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_BF16"},
                       configure=_configure, tensor_name=_tensor_name)
