"""ONNX Runtime: the backend (fusions, CPU provider) and static int8 quantization to a QDQ model."""
from .backend import OnnxRuntimeBackend, install_clash

__all__ = ["OnnxRuntimeBackend", "install_clash"]
