"""Pre- and post-processing carried in an artifact as data: texts and images in, named answers out.

    from compilers.pipeline import Pipeline, Text, MeanPool, Normalize
    pipe = Pipeline(bert, Text.from_file("tokenizer.json"), post=[MeanPool(), Normalize()])
    cm = compilers.compile(pipe, "ort-cpu", example_inputs=["a sentence", "another"])
    cm(["a sentence"])["embedding"]

Text needs Hugging Face `tokenizers`, Image needs Pillow (`pip install 'compilers[pipeline]'`); each is imported
when its step is first used.
"""
from __future__ import annotations

from typing import Any

from .base import BytesSpec, Pre
from .pipeline import FOLDER, CompiledPipeline, Pipeline, Steps
from .post import CLS, MeanPool, Normalize, Softmax, Step, TopK

__all__ = ["Pipeline", "CompiledPipeline", "Steps", "Pre", "BytesSpec", "Text", "Image", "Step", "MeanPool", "CLS",
           "Normalize", "Softmax", "TopK", "FOLDER"]


def __getattr__(name: str) -> Any:
    if name == "Text":
        from .text import Text
        return Text
    if name == "Image":
        from .image import Image
        return Image
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
