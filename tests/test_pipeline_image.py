"""The image pre-processing step (compilers.pipeline.image.Image): real Pillow on small synthetic images."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from compilers.errors import InputError
from compilers.pipeline.base import BytesSpec
from compilers.pipeline.image import Image

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pixels(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height RGB pixels, with a few bytes of compressed data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def test_png_and_jpeg_give_one_float32_batch_in_either_layout():
    items = [encode(pixels(30, 40)), encode(pixels(50, 20, seed=1), "JPEG", quality=90)]
    nchw = Image(size=(16, 24))(items)
    assert list(nchw) == ["pixel_values"]
    x = nchw["pixel_values"]
    assert x.shape == (2, 3, 16, 24) and x.dtype == np.float32 and x.flags.c_contiguous
    assert 0.0 <= x.min() and x.max() <= 1.0
    nhwc = Image(size=(16, 24), layout="NHWC")(items)["pixel_values"]
    assert nhwc.shape == (2, 16, 24, 3) and nhwc.flags.c_contiguous
    np.testing.assert_array_equal(nhwc, x.transpose(0, 2, 3, 1))


def test_exact_values_for_a_lossless_png():
    a = pixels(20, 24)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    step = Image(size=(20, 24), crop=(10, 12), mean=mean, std=std)  # resizing to its own size changes nothing
    got = step([encode(a)])["pixel_values"]
    crop = a[5:15, 6:18].astype(np.float64)  # top (20 - 10) // 2, left (24 - 12) // 2
    want = ((crop * (1 / 255) - np.array(mean)) / np.array(std)).astype(np.float32).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(got, want)


def test_resize_by_the_shorter_side_keeps_the_aspect_ratio():
    landscape, portrait = encode(pixels(30, 60)), encode(pixels(60, 30))
    wide = Image(size=15, crop=(15, 40))([landscape])["pixel_values"][0, 0]
    assert (wide[:, :5] == 0).all() and (wide[:, 35:] == 0).all() and (wide[:, 5:35] != 0).any()  # 15 x 30, padded
    assert Image(size=15, crop=(15, 15))([landscape, portrait])["pixel_values"].shape == (2, 3, 15, 15)
    with pytest.raises(ValueError, match="without a crop gives each image its own height and width"):
        Image(size=15)


def test_a_crop_larger_than_the_image_pads_with_zeros():
    a = np.full((4, 4, 3), 255, np.uint8)
    x = Image(crop=(8, 6), mean=[0.5] * 3, std=[0.5] * 3)([encode(a)])["pixel_values"][0]
    assert x.shape == (3, 8, 6)
    np.testing.assert_array_equal(x[:, 2:6, 1:5], 1.0)  # top (4 - 8) // 2 = -2, left (4 - 6) // 2 = -1
    assert (x == -1.0).sum() == 3 * (8 * 6 - 16)  # the padding: 0 normalized


def test_items_of_differing_size_without_a_crop_are_refused():
    items = [encode(pixels(30, 60)), encode(pixels(30, 30))]
    with pytest.raises(InputError, match=r"item 1 .*add crop"):
        Image()(items)


def test_grayscale_mode_gives_one_channel():
    step = Image(size=(8, 8), mode="L", mean=[0.5], std=[0.5])
    x = step([encode(pixels(10, 10)), encode(pixels(12, 9, c=1))])["pixel_values"]
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="mean .*mode L.* 1 finite"):
        Image(mode="L", mean=IMAGENET_MEAN)


def test_pil_images_and_uint8_arrays_are_items_too():
    a = pixels(12, 16)
    want = Image(size=(6, 8))([encode(a)])["pixel_values"][0]
    got = Image(size=(6, 8))([PILImage.fromarray(a), a, a.copy()])["pixel_values"]
    for x in got:
        np.testing.assert_array_equal(x, want)
    gray = Image(mode="L")([pixels(5, 7, c=1), pixels(5, 7, c=1)[..., None]])["pixel_values"]
    np.testing.assert_array_equal(gray[0], gray[1])
    with pytest.raises(InputError, match=r"item 0: an array .*float32"):
        Image()([a.astype(np.float32)])
    with pytest.raises(InputError, match="item 1: expected an encoded image .* got str"):
        Image()([encode(a), "cat.png"])


def test_exif_orientation_is_applied():
    exif = PILImage.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    jpeg = encode(pixels(10, 20), "JPEG", exif=exif.tobytes())
    assert Image()([jpeg])["pixel_values"].shape == (1, 3, 20, 10)


def test_undecodable_items_are_input_errors_naming_the_item():
    good = encode(pixels(8, 8))
    with pytest.raises(InputError, match=r"item 1: cannot decode it as an image \(UnidentifiedImageError"):
        Image()([good, b"not an image"])
    with pytest.raises(InputError, match="item 0: cannot decode"):
        Image()([good[: len(good) // 2]])  # truncated
    with pytest.raises(InputError, match="no items"):
        Image(crop=(4, 4))([])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns past MAX_IMAGE_PIXELS
def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(InputError, match="item 0: cannot decode .*DecompressionBombError"):
        Image()([png_header(100_000, 100_000)])  # Pillow's own check, past twice MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=r"item 0: 20x30 image is over max_pixels \(500\).*decompression bomb"):
        Image(max_pixels=500)([encode(pixels(30, 20))])
    with pytest.raises(InputError, match="over max_pixels"):
        Image()([png_header(10_000, 10_000)])  # past max_pixels, under Pillow's error threshold


def test_the_served_input_and_the_arrays():
    step = Image(input_name="img", tensor_name="x")
    assert step.kind == "image"
    assert step.input == BytesSpec("img", ("batch",)) and step.input.datatype == "BYTES"
    assert step.tensor_names == ("x",)
    assert step.dynamic_shapes == {"x": {0: "batch"}}
    assert step.pad == {}


def test_to_dict_round_trips_through_json_and_load(tmp_path):
    step = Image(size=256, crop=[224, 224], resample="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 layout="NHWC", input_name="img", max_pixels=10**6)
    d = json.loads(json.dumps(step.to_dict()))
    assert d["kind"] == "image" and d["crop"] == [224, 224]
    assert Image.load(d, tmp_path) == step
    assert Image.load({"kind": "image", "size": [8, 9]}, tmp_path) == Image(size=(8, 9))
    with pytest.raises(ValueError, match=r"\['colour'\] unknown"):
        Image.load({**d, "colour": "blue"}, tmp_path)
    with pytest.raises(ValueError, match="kind other than 'image'"):
        Image.load({**d, "kind": "text"}, tmp_path)
    with pytest.raises(ValueError, match="size must be"):
        Image.load({**d, "size": "big"}, tmp_path)


@pytest.mark.parametrize("settings, message", [
    ({"size": 0}, "size must be a positive int"),
    ({"size": (224, 0)}, r"size must be \(height, width\)"),
    ({"crop": (1, 2, 3)}, r"crop must be \(height, width\)"),
    ({"resample": "lanczos"}, "resample must be one of nearest, bilinear, bicubic"),
    ({"mode": "RGBA"}, "mode must be one of RGB, L"),
    ({"layout": "CHW"}, "layout must be one of NCHW, NHWC"),
    ({"dtype": "float16"}, "dtype must be one of float32"),
    ({"rescale": 0}, "rescale must be a positive number"),
    ({"mean": [0.5, 0.5]}, r"mean \(mode RGB\) must be 3"),
    ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
    ({"max_pixels": -1}, "max_pixels must be a positive int"),
])
def test_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        Image(**settings)


def test_names_must_be_strings():
    with pytest.raises(TypeError, match="tensor_name must be a non-empty str"):
        Image(tensor_name="")


VIT = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}
RESNET = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True,
          "feature_extractor_type": "ConvNextFeatureExtractor",
          "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3, "size": 224}
CLIP = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "CLIPProcessor", "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 224}}


def test_from_processor_reads_preprocessor_configs():
    vit = Image.from_processor(VIT)
    assert vit == Image(size=(224, 224), mean=[0.5] * 3, std=[0.5] * 3)
    resnet = Image.from_processor(RESNET, input_name="img")  # shorter side to 224 / 0.875, then a 224 crop
    assert resnet == Image(size=256, crop=(224, 224), resample="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           input_name="img")
    assert Image.from_processor({**RESNET, "size": 384}).size == (384, 384)  # from 384 on: a warp, no crop
    clip = Image.from_processor(CLIP)
    assert (clip.size, clip.crop, clip.resample) == (224, (224, 224), "bicubic")
    assert Image.from_processor({**CLIP, "do_rescale": False, "do_normalize": False}) == Image(
        size=224, crop=(224, 224), resample="bicubic", rescale=1.0)
    assert Image.from_processor({"size": {"height": 32, "width": 48}}) == Image(size=(32, 48))


@pytest.mark.parametrize("config, message", [
    ({"size": 224}, "size 224: give .*shortest_edge"),  # a bare int with no class to read it by
    ({"size": {"shortest_edge": 800, "longest_edge": 1333}}, "cannot express .*size"),
    ({**VIT, "resample": 1}, "resample must be one of .* got 'Pillow code 1'"),
    ({**VIT, "do_pad": True, "do_flip_channel_order": True}, "do_flip_channel_order, do_pad"),
    ({**VIT, "crop_pct": 0.9}, "crop_pct"),
    ({**VIT, "image_std": None}, "do_normalize without image_mean and image_std"),
    ({**VIT, "data_format": "channels_last"}, "data_format"),
])
def test_from_processor_refuses_what_it_cannot_express(config, message):
    with pytest.raises(ValueError, match=message):
        Image.from_processor(config)


@pytest.mark.parametrize("name, config", [("ViTImageProcessorPil", {}), ("ConvNextImageProcessorPil", RESNET),
                                          ("CLIPImageProcessorPil", {})])
def test_matches_transformers_image_processors(name, config):
    transformers = pytest.importorskip("transformers")
    processor = getattr(transformers, name).from_dict(config) if config else getattr(transformers, name)()
    step = Image.from_processor(processor)
    arrays = [pixels(300, 400), pixels(256, 200, seed=1)]
    want = processor([PILImage.fromarray(a) for a in arrays], return_tensors="np")["pixel_values"]
    got = step([encode(a) for a in arrays])["pixel_values"]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_import_compilers_does_not_import_pil():
    code = "import sys, compilers, compilers.pipeline.image; assert 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_digits_classifier_pipeline_answers_labels_for_png_bytes_over_the_protocol(tmp_path):
    """The digits CNN (real labels, trained here in seconds) as an image pipeline: PNG bytes in, top-3 labels out,
    in Python and from a server (tritonclient, BYTES in binary and JSON outputs)."""
    import torch
    import tritonclient.http as triton

    import compilers
    from compilers.pipeline import Pipeline, Softmax, TopK
    from compilers.serve.server import running
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
    import digits

    splits = digits.split()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    # scikit-learn's digits are 0..16; as 8-bit PNG pixels times 15, rescaled by 1/240 they are the model's x / 16
    images = [encode((x[0].numpy() * 16).round().astype(np.uint8) * 15) for x in splits.test_x[:48]]
    pipe = Pipeline(digits.train(splits), Image(mode="L", rescale=1 / 240), post=[Softmax(), TopK(3)], labels=names)
    torch.testing.assert_close(pipe.tensors(images[:4])["pixel_values"], splits.test_x[:4], rtol=0, atol=0)
    cm = compilers.compile(pipe, "ort-cpu", images[:8], samples=[images[i:i + 8] for i in range(8, 48, 8)])
    got, want = cm(images), pipe(images)
    np.testing.assert_array_equal(got["labels"], want["labels"])
    top1 = np.mean(got["labels"][:, 0] == np.array(names)[splits.test_y[:48].numpy()])
    assert top1 >= 0.9, f"top-1 accuracy {top1:.2f}"
    cm.save(tmp_path / "repo" / "digits" / "1")
    with running(tmp_path / "repo") as server:
        c = triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
        t = triton.InferInput("image", [8], "BYTES")
        t.set_data_from_numpy(np.array(images[:8], dtype=object), binary_data=True)
        answer = c.infer("digits", [t], outputs=[triton.InferRequestedOutput("labels", binary_data=False),
                                                 triton.InferRequestedOutput("scores", binary_data=True)])
        np.testing.assert_array_equal(answer.as_numpy("labels").astype(str), want["labels"][:8].astype(str))
        np.testing.assert_allclose(answer.as_numpy("scores"), want["scores"][:8].numpy(), rtol=1e-5, atol=1e-6)
