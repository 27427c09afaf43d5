"""OpenVINO: the backend (direct import or ONNX, CPU plugin) and NNCF int8 quantization."""
from .backend import OpenVinoBackend

__all__ = ["OpenVinoBackend"]
