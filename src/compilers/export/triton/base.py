"""What each backend module of the Triton export provides (a `TritonBackend`), and what its `configure` works on
(an `Export`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ...signature import Signature
from ...target import Target

# Triton's tensor types; each backend converts the ones its sources' data type tables list.
ALL_TYPES = frozenset({"TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
                       "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_BF16"})


@dataclass
class Export:
    """One artifact on its way to Triton, as a backend's `configure` sees it: the config built so far (names,
    dims, batching), which it completes with the backend's parameters, the version directory's files, which it may
    replace, and the notes for the header (caveats: notes that change what the model computes, also warned)."""

    path: Path                            # the artifact directory
    target: Target
    signature: Signature
    settings: Any                         # the backend's Settings, as a server would load them
    config: Any                           # tritonclient.grpc.model_config_pb2.ModelConfig
    max_batch: int
    files: dict[str, Path | bytes]        # version directory file -> source file, or the bytes to write
    notes: list[str]
    caveats: list[str]

    def param(self, key: str, value: Any) -> None:
        """Set the config parameter `key` (Triton parameters are strings)."""
        self.config.parameters[key].string_value = str(value)


@dataclass(frozen=True)
class TritonBackend:
    """How the artifacts of one backend become a Triton model: the Triton backend that runs them, or, with
    `refusal`, why none can."""

    name: str = ""                        # the Triton backend
    platform: str = ""                    # the Triton platform, "" for none
    files: tuple[str, ...] = ()           # a version directory's files, the first being default_model_filename
    types: frozenset[str] = frozenset()   # the tensor types the Triton backend converts
    configure: Callable[[Export], None] | None = None       # parameters and notes; checks of the files
    tensor_name: Callable[[str, int], str] | None = None    # Triton's name of input (or output) number i; default
                                                            # the Signature's name
    refusal: Callable[[Path, Target, Mapping[str, Any]], str] | None = None   # (path, target, manifest) -> why not
