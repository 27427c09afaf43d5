"""Image pre-processing as data: encoded images (PNG, JPEG...) decoded by Pillow, resized, center cropped,
rescaled, normalized and laid out as one float32 batch, as declared settings (no files)."""
from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import InputError, brief
from .base import BytesSpec, Pre

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # name -> Pillow's code (PIL.Image.Resampling)
_CHANNELS = {"RGB": 3, "L": 1}
# Hugging Face processor classes whose bare-int `size` is the shorter side (default_to_square=False; transformers
# 5.x); for the other classes it is a square
_SHORTEST_EDGE = frozenset("""bit bridgetower chameleon chineseclip clip coherecompass conditionaldetr convnext
    cosmos3edge deformabledetr detr efficientloftr eomt ernie45vlmoe glm46v glm4v glm5next glmga glmimage
    groundingdino hunyuanvl hyv4vl idefics2 levit lightglue llava llavanext llavaonevision mask2former maskformer
    mobilenetv1 mobilenetv2 mobilevit oneformer ovis25 paddleocrvl poolformer qwen2vl rtdetr siglip superglue
    superpoint textnet tvp videollama3 videomae vilt yolos""".split())
# processor keys that change nothing here (we always convert to `mode`)
_HARMLESS = {"processor_class", "model_input_names", "do_convert_rgb", "input_data_format", "return_tensors"}


def _positive(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2 or not all(map(_positive, value)):
        raise ValueError(f"{what} must be (height, width), two positive ints; got {value!r}")
    return int(value[0]), int(value[1])


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) * channels if isinstance(value, (int, float)) else tuple(value)
    if len(values) != channels or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be {channels} finite number(s), one per channel; got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Image(Pre):
    """Items (encoded image bytes, PIL images or HxW[xC] uint8 arrays) -> {tensor_name: float32 (N, C, H, W)}.

    size: an int resizes the shorter side to it (aspect kept), (height, width) resizes to exactly that; then
    crop center-crops to (height, width), padding with zeros where the image is smaller. Values are then
    multiplied by rescale and normalized per channel: (x - mean) / std. max_pixels refuses larger encoded images
    before decoding them (decompression bombs); its default is Pillow's MAX_IMAGE_PIXELS."""

    size: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    resample: str = "bilinear"
    mode: str = "RGB"
    rescale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"
    dtype: str = "float32"
    input_name: str = "image"
    tensor_name: str = "pixel_values"
    max_pixels: int = 89_478_485
    kind: ClassVar[str] = "image"
    max_item_bytes: ClassVar[int] = 16 << 20     # an encoded photo is a few MiB

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.size is not None and not _positive(self.size):
            if isinstance(self.size, (int, float)):
                raise ValueError(f"size must be a positive int (the shorter side) or (height, width); got {self.size}")
            set_("size", _pair(self.size, "size"))
        if self.crop is not None:
            set_("crop", _pair(self.crop, "crop"))
        elif isinstance(self.size, int):
            raise ValueError(f"size={self.size} (the shorter side) without a crop gives each image its own height and "
                             "width, which a compiled model does not take: add crop=(height, width), or give size as "
                             "(height, width)")
        for name, allowed in (("resample", _RESAMPLE), ("mode", _CHANNELS), ("layout", ("NCHW", "NHWC")),
                              ("dtype", ("float32",))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not isinstance(self.rescale, (int, float)) or not math.isfinite(self.rescale) or self.rescale <= 0:
            raise ValueError(f"rescale must be a positive number; got {self.rescale!r}")
        channels = _CHANNELS[self.mode]
        set_("mean", _per_channel(self.mean, channels, f"mean (mode {self.mode})"))
        set_("std", _per_channel(self.std, channels, f"std (mode {self.mode})"))
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive; got {self.std}")
        for name in ("input_name", "tensor_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"{name} must be a non-empty str; got {getattr(self, name)!r}")
        if not _positive(self.max_pixels):
            raise ValueError(f"max_pixels must be a positive int; got {self.max_pixels!r}")

    @classmethod
    def from_processor(cls, config: Any, **settings: Any) -> "Image":
        """The step a Hugging Face image processor (or its preprocessor_config.json as a dict) describes;
        `settings` override (input_name, say). ValueError for what these settings cannot express."""
        c = dict(config if isinstance(config, Mapping) else config.to_dict())
        name = c.pop("image_processor_type", None) or c.pop("feature_extractor_type", None) or ""
        c.pop("feature_extractor_type", None)
        kind = re.sub(r"(ImageProcessor|FeatureExtractor)(Fast|Pil)?$", "", name).replace("_", "").lower()

        def hw(value: Any, what: str, square: bool | None) -> int | tuple[int, int]:
            if isinstance(value, Mapping) and set(value) in ({"shortest_edge"}, {"height", "width"}):
                return value["shortest_edge"] if "shortest_edge" in value else (value["height"], value["width"])
            if isinstance(value, int) and square is not None:
                return (value, value) if square else value
            raise ValueError(f"cannot express the image processor's {what} {value!r}: give {{'height', 'width'}} or"
                             " {'shortest_edge'} (a bare int means either, by class: give image_processor_type)")

        size, crop = c.pop("size", None), c.pop("crop_size", None)
        out: dict[str, Any] = {"size": None, "crop": None}
        if c.pop("do_resize", size is not None):
            out["size"] = hw(size, "size", (kind not in _SHORTEST_EDGE) if kind else None)
        if c.pop("do_center_crop", crop is not None):
            out["crop"] = hw(crop, "crop_size", True)
        if kind == "convnext" and isinstance(out["size"], int) and out["crop"] is None:  # ConvNext's (ResNet's)
            edge, pct = out["size"], c.pop("crop_pct", None) or 224 / 256  # crop_pct: below 384, the shorter side to
            # edge / crop_pct and an edge x edge crop; from 384 on, a warp to edge x edge
            out.update(size=int(edge / pct), crop=(edge, edge)) if edge < 384 else out.update(size=(edge, edge))
        resample = c.pop("resample", None)
        code = getattr(resample, "value", resample)  # an int, or a PIL or torchvision enum
        if code is not None:
            names = {v: k for k, v in _RESAMPLE.items()}
            out["resample"] = code.lower() if isinstance(code, str) else names.get(code, f"Pillow code {code}")
        rescale_factor = c.pop("rescale_factor", 1 / 255)
        out["rescale"] = rescale_factor if c.pop("do_rescale", True) else 1.0
        mean, std = c.pop("image_mean", None), c.pop("image_std", None)
        if c.pop("do_normalize", mean is not None or std is not None):
            if mean is None or std is None:
                raise ValueError("cannot express do_normalize without image_mean and image_std (class defaults)")
            out.update(mean=mean, std=std)
        if c.pop("data_format", None) not in (None, "channels_first"):
            raise ValueError("cannot express the image processor's data_format: give layout='NHWC' instead")
        left = sorted(k for k, v in c.items() if k not in _HARMLESS and v is not None and v is not False)
        if left:
            raise ValueError(f"cannot express the image processor's {', '.join(left)} ({name or 'no class named'})")
        return cls(**{**out, **settings})

    @property
    def input(self) -> BytesSpec:
        return BytesSpec(self.input_name, ("batch",))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return (self.tensor_name,)

    @property
    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        return {self.tensor_name: {0: "batch"}}  # (pad: the base's {}, as only the batch varies)

    def _decode(self, index: int, item: Any):
        from PIL import Image as PILImage, ImageOps
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3) or item.shape[2:] not in ((), (1,), (3,), (4,)):
                raise InputError(f"item {index}: an array must be HxW or HxWxC (C 1, 3, 4) uint8; got {item.dtype}"
                                 f" {item.shape}")
            return PILImage.fromarray(item[..., 0] if item.shape[2:] == (1,) else item).convert(self.mode)
        if not isinstance(item, (bytes, bytearray, memoryview, PILImage.Image)):
            raise InputError(f"item {index}: expected an encoded image (bytes), a PIL image or a uint8 array; got "
                             f"{type(item).__name__}")
        try:
            if not isinstance(item, PILImage.Image):
                item = PILImage.open(io.BytesIO(item))  # reads the header only
                if item.width * item.height > self.max_pixels:
                    raise InputError(f"item {index}: {item.width}x{item.height} image is over max_pixels "
                                     f"({self.max_pixels}): refused as a possible decompression bomb")
            return ImageOps.exif_transpose(item).convert(self.mode)
        except InputError:
            raise
        except Exception as e:  # Pillow's errors vary by format: UnidentifiedImageError, OSError, DecompressionBomb...
            raise InputError(f"item {index}: cannot decode it as an image ({brief(e)})") from e

    def __call__(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        arrays = []
        for index, item in enumerate(items):
            im = self._decode(index, item)
            w, h = im.size
            if isinstance(self.size, int):
                s = self.size
                to = (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)  # (width, height)
                im = im.resize(to, _RESAMPLE[self.resample])
            elif self.size is not None:
                im = im.resize((self.size[1], self.size[0]), _RESAMPLE[self.resample])
            if self.crop is not None:
                (w, h), (ch, cw) = im.size, self.crop
                left, top = (w - cw) // 2, (h - ch) // 2
                im = im.crop((left, top, left + cw, top + ch))  # outside the image: zeros
            arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], -1))
            if arrays[-1].shape != arrays[0].shape:
                raise InputError(f"item {index} comes out {arrays[-1].shape[:2]} (height, width) but item 0 "
                                 f"{arrays[0].shape[:2]}: size={self.size} without crop keeps each image's aspect"
                                 " ratio; add crop=(height, width) so every image comes out the same size")
        if not arrays:
            raise InputError("no items: a batch takes one image or more")
        x = (np.stack(arrays) * self.rescale - np.asarray(self.mean or 0.0)) / np.asarray(self.std or 1.0)
        x = x.astype(np.float32)  # (computed in float64, rounded once)
        return {self.tensor_name: np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "NCHW" else x)}

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"kind": self.kind, **d}

    @classmethod
    def load(cls, settings: Mapping[str, Any], directory: Path) -> "Image":
        settings, known = dict(settings), [f.name for f in fields(cls)]
        if settings.pop("kind", cls.kind) != cls.kind or set(settings) - set(known):
            raise ValueError(f"not the settings of an image step: {sorted(set(settings) - set(known))} unknown, or a"
                             f" kind other than {cls.kind!r}; known: {known}")
        try:
            return cls(**settings)
        except TypeError as e:
            raise ValueError(f"malformed image settings: {e}") from e
