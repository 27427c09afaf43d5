"""compilers: one call in front of the inference compilers.

    cm = compilers.compile(model, "ort-cpu", example_inputs=(x,))
    y = cm(x)                     # returns what model(x) returns
    cm.save("out/"); cm2 = compilers.load("out/")
"""
from .api import compile, targets, unavailable_reason, validate
from .bench import Benchmark, Timing, benchmark
from .errors import (ArtifactError, BackendUnavailable, CompilerError, EngineError, ExportError, InputError,
                     TargetError, ValidationError)
from .optimize import distill, drop_layers, prune
from .report import Report
from .runtime import CompiledModel, load
from .target import Auto, DimRange, Target, Tolerance, load_descriptor, load_target
from .validate import Metric, ValidationReport

__version__ = "0.1.0"
__all__ = ["compile", "load", "validate", "benchmark", "targets", "unavailable_reason", "prune", "drop_layers", "distill",
           "Target", "Tolerance", "DimRange", "Auto", "load_target", "load_descriptor",
           "CompiledModel", "Report", "ValidationReport", "Metric", "Benchmark", "Timing",
           "CompilerError", "TargetError", "BackendUnavailable", "ExportError", "ValidationError", "InputError",
           "ArtifactError", "EngineError"]
