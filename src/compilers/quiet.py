"""Keep exporters' and compilers' chatter out of the user's console while compile runs.

Scoped: every change (logger levels, warning filters, the redirected streams) is undone when the block
ends, and nothing here runs at import or load time.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._inductor", "torch.fx", "onnxscript",
                 "onnxruntime", "onnxruntime.transformers", "nncf", "openvino")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the noisy libraries' loggers, warnings and prints for the block.

    stdout/stderr are redirected only inside the block; they are the process's streams, so call this
    around compile stages, never around inference."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [l.level for l in loggers]
    for l in loggers:
        l.setLevel(logging.ERROR)
    root = logging.getLogger()
    root.addFilter(_library_warnings)     # onnxruntime.quantization logs its advice on the root logger
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(_library_warnings)
        for l, level in zip(loggers, levels):
            l.setLevel(level)


def _library_warnings(record: logging.LogRecord) -> bool:
    """False (drop) for below-error records that a noisy library logs on the root logger."""
    return record.levelno >= logging.ERROR or not any(f"{n.replace('.', '/')}/" in record.pathname
                                                      for n in NOISY_LOGGERS)
