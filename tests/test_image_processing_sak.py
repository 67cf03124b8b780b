"""SAKImageProcessor: reference preprocessing, padding bookkeeping and per-task post-processing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import AutoImageProcessor
from transformers.testing_utils import CaptureLogger

from modeling_sak import SAKForMultiTask, SAKImageProcessor
from modeling_sak.remote_code import image_processing_sak
from modeling_sak.remote_code.image_processing_sak import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, load_rgb_image


REAL_NYU_DEPTH = Path("/work/shared/real/nyu_frames/sync_depth_00000.png")  # not redistributable: used when present


def rgb(height, width, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_normalises_and_pads_centred_into_the_canvas():
    array = rgb(30, 40)
    processor = SAKImageProcessor(pad_size={"height": 32, "width": 48})
    inputs = processor(Image.fromarray(array))
    assert inputs["pixel_values"].shape == (1, 3, 32, 48)
    assert inputs["content_boxes"].tolist() == [[1, 4, 30, 40]]
    assert inputs["original_sizes"].tolist() == [[30, 40]]
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    expected = (torch.from_numpy(array).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(inputs["pixel_values"][0, :, 1:31, 4:44], expected)
    padding = inputs["pixel_values"].clone()
    padding[0, :, 1:31, 4:44] = 0
    assert padding.abs().sum() == 0


def test_bottom_right_padding_and_canvas_growth_to_the_patch_multiple():
    processor = SAKImageProcessor(pad_size=(32, 48), pad_mode="bottom_right")
    inputs = processor([rgb(50, 70), rgb(20, 20, seed=1)])
    assert inputs["pixel_values"].shape == (2, 3, 64, 80)  # 50x70 rounded up to multiples of 16
    assert inputs["content_boxes"].tolist() == [[0, 0, 50, 70], [0, 0, 20, 20]]


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(rgb(20, 24)[..., 0]),  # grayscale PIL
        Image.fromarray(np.dstack([rgb(20, 24), np.full((20, 24), 255, np.uint8)])),  # RGBA
        rgb(20, 24).transpose(2, 0, 1),  # CHW numpy
        torch.from_numpy(rgb(20, 24)),  # HWC tensor
    ],
)
def test_accepts_common_image_formats(image):
    inputs = SAKImageProcessor(pad_size=(32, 32))(image)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32) and inputs["original_sizes"].tolist() == [[20, 24]]


def test_bad_images_are_named():
    with pytest.raises(ValueError, match="image 1 has type str"):
        SAKImageProcessor()([rgb(8, 8), "photo.jpg"])
    with pytest.raises(ValueError, match=r"image 0 has shape \(5, 5, 5\): no 1, 2, 3 or 4 channel axis"):
        SAKImageProcessor()(np.zeros((5, 5, 5)))
    with pytest.raises(ValueError, match="pad_mode='middle'"):
        SAKImageProcessor(pad_mode="middle")


def test_post_processing_undoes_padding_and_resizing():
    processor = SAKImageProcessor(do_resize=True, size={"height": 32, "width": 32}, pad_size=(48, 48))
    inputs = processor([rgb(20, 40), rgb(64, 16, seed=1)])
    assert inputs["content_boxes"].tolist() == [[8, 8, 32, 32], [8, 8, 32, 32]]
    semseg = torch.zeros(2, 3, 48, 48)
    semseg[:, 2, 8:40, 8:40] = 1.0  # class 2 inside the content, class 0 in the padding
    outputs = {
        "semseg": semseg,
        "depth": torch.full((2, 1, 48, 48), -1.0).index_fill_(3, torch.arange(8, 40), 2.0),
        "normals": torch.randn(2, 3, 48, 48),
        "edge": torch.zeros(2, 1, 48, 48),
        "sal": torch.zeros(2, 2, 48, 48),
    }
    results = processor.post_process_multi_task(
        outputs, target_sizes=inputs["original_sizes"], content_boxes=inputs["content_boxes"]
    )
    assert [tuple(r["semseg"].shape) for r in results] == [(20, 40), (64, 16)]
    assert all((r["semseg"] == 2).all() for r in results)
    assert torch.allclose(results[0]["depth"], torch.tensor(2.0))  # padding never leaks, negatives clamp to 0
    torch.testing.assert_close(results[1]["normals"].norm(dim=0), torch.ones(64, 16))
    assert torch.allclose(results[0]["edge"], torch.tensor(0.5)) and results[0]["sal"].shape == (20, 40)
    with pytest.raises(ValueError, match="no task 'human_parts'"):
        processor.post_process_semantic_segmentation(outputs, task="human_parts")


def test_end_to_end_with_the_model_and_the_auto_class(tmp_path):
    model = SAKForMultiTask(tiny_config()).eval()
    SAKImageProcessor(pad_size=(64, 96)).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert processor.pad_size == {"height": 64, "width": 96} and processor.pad_mode == "center"
    inputs = processor([rgb(50, 90), rgb(70, 60, seed=2)])
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_multi_task(outputs, inputs["original_sizes"], inputs["content_boxes"])
    assert [tuple(r["depth"].shape) for r in results] == [(50, 90), (70, 60)]
    assert results[1]["semseg"].dtype == torch.int64 and int(results[1]["semseg"].max()) < 40
    assert (results[0]["depth"] >= 0).all() and results[0]["normals"].shape == (3, 50, 90)


def composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The documented alpha rule: round(c * a / 255 + 255 * (1 - a / 255))."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(colour.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def photo_modes(height: int = 6, width: int = 8) -> dict[str, tuple[Image.Image, np.ndarray]]:
    """A small image of every accepted PIL mode and the uint8 RGB the documented rules make of it."""
    rng = np.random.default_rng(7)
    colour, grey = rgb(height, width, seed=3), rgb(height, width, seed=4)[..., 0]
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)  # fully transparent, opaque, half
    bits = rng.random((height, width)) > 0.5
    palette = np.array([[1, 2, 3], [10, 20, 30], [200, 100, 50], [9, 9, 9]], np.uint8)
    indices = rng.integers(0, 4, (height, width)).astype(np.uint8)
    indices[0, 0] = 0
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.flatten().tolist())
    transparent = paletted.copy()
    transparent.info["transparency"] = 0  # a palette PNG's tRNS: index 0 is see-through
    # Pure cyan, pure black ink, no ink, magenta + yellow: PIL's CMYK -> RGB without colour management.
    cmyk = np.tile(
        np.array([[[255, 0, 0, 0], [0, 0, 0, 255]], [[0, 0, 0, 0], [0, 255, 255, 0]]], np.uint8),
        (height // 2, width // 2, 1),
    )
    cmyk_rgb = np.tile(
        np.array([[[0, 255, 255], [0, 0, 0]], [[255, 255, 255], [255, 0, 0]]], np.uint8), (height // 2, width // 2, 1)
    )
    neutral = np.full((height, width), 128, np.uint8)  # Cb = Cr = 128: the grey Y
    return {
        "1": (Image.fromarray(bits), np.repeat(bits[..., None].astype(np.uint8) * 255, 3, axis=-1)),
        "L": (Image.fromarray(grey), np.repeat(grey[..., None], 3, axis=-1)),
        "LA": (Image.fromarray(np.dstack([grey, alpha]), "LA"), composite_on_white(np.dstack([grey] * 3), alpha)),
        "P": (paletted, palette[indices]),
        "P+transparency": (transparent, np.where((indices == 0)[..., None], np.uint8(255), palette[indices])),
        "RGB": (Image.fromarray(colour), colour),
        "RGBA": (Image.fromarray(np.dstack([colour, alpha]), "RGBA"), composite_on_white(colour, alpha)),
        "CMYK": (Image.fromarray(cmyk, "CMYK"), cmyk_rgb),
        "YCbCr": (Image.fromarray(np.dstack([grey, neutral, neutral]), "YCbCr"), np.repeat(grey[..., None], 3, -1)),
    }


def depth_like_modes() -> dict[str, tuple[Image.Image, str]]:
    """Single-channel maps that are not photos, and the mode and values their error must name."""
    depth_mm = np.random.default_rng(5).integers(400, 6625, (6, 8)).astype(np.uint16)
    depth_mm[0, 0], depth_mm[-1, -1] = 0, 6625  # NYU sync depth: millimetres, 0 = no measurement
    disparity = np.linspace(-5, 70000, 48, dtype=np.int32).reshape(6, 8)
    metres = np.linspace(0, 9.5, 48, dtype=np.float32).reshape(6, 8)
    return {
        "I;16": (Image.fromarray(depth_mm), "mode I;16 (16-bit single channel, values 0..6625)"),
        "I": (Image.fromarray(disparity), "mode I (32-bit integer single channel, values -5..70000)"),
        "F": (Image.fromarray(metres), "mode F (32-bit float single channel, values 0..9.5)"),
    }


@pytest.mark.parametrize("mode", list(photo_modes()))
def test_every_photo_mode_becomes_the_documented_rgb(mode, tmp_path):
    image, expected = photo_modes()[mode]
    assert image.mode == mode.split("+")[0]
    processor = SAKImageProcessor(do_rescale=False, do_normalize=False, do_pad=False)  # the pixels as the model sees
    pixels = processor(image)["pixel_values"][0]
    torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1).float(), rtol=0, atol=0)
    default = SAKImageProcessor(pad_size=(16, 16))
    torch.testing.assert_close(default(image)["pixel_values"], default(expected)["pixel_values"], rtol=0, atol=0)
    # The same rules for a file, as predict and the dataset converters read it.
    path = tmp_path / ("image.tif" if mode in ("CMYK", "YCbCr") else "image.png")
    image.save(path)
    try:
        Image.open(path).load()
    except OSError as error:  # Pillow 12.3 (the newest gradio allows) cannot read its own uncompressed YCbCr TIFFs
        pytest.skip(f"this Pillow cannot read back its own {mode} TIFF ({error}); the in-memory checks passed")
    assert Image.open(path).mode == image.mode
    np.testing.assert_array_equal(load_rgb_image(path), expected)


@pytest.mark.parametrize("mode", list(depth_like_modes()))
def test_depth_like_modes_are_refused_naming_the_file_the_mode_and_the_values(mode, tmp_path):
    image, description = depth_like_modes()[mode]
    assert image.mode == mode
    with pytest.raises(ValueError) as error:
        SAKImageProcessor()([rgb(6, 8), image])
    assert str(error.value).startswith(f"image 1: {description} is not a photo")
    assert "8-bit RGB or grayscale photo" in str(error.value) and "depth or disparity map" in str(error.value)
    path = tmp_path / ("depth.png" if mode == "I;16" else "depth.tif")
    image.save(path)
    with Image.open(path) as opened, pytest.raises(ValueError, match=rf"image 0 \({path}\): {re.escape(description)}"):
        SAKImageProcessor()(opened)
    with pytest.raises(ValueError, match=rf"{path}: {re.escape(description)}"):
        load_rgb_image(path)


def test_other_modes_and_unreadable_files_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="image 0: mode La is not supported; SAK expects an 8-bit photo in one of"):
        SAKImageProcessor()(Image.new("La", (8, 6)))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken.png: cannot read the image \(UnidentifiedImageError"):
        load_rgb_image(tmp_path / "broken.png")


@pytest.mark.skipif(not REAL_NYU_DEPTH.is_file(), reason="the real NYU depth frame is not on this machine")
def test_a_real_nyu_depth_png_is_refused():
    with Image.open(REAL_NYU_DEPTH) as depth, pytest.raises(ValueError) as error:
        SAKImageProcessor()(depth)
    assert f"({REAL_NYU_DEPTH}): mode I;16 (16-bit single channel, values 0..6625) is not a photo" in str(error.value)


def test_arrays_are_checked_against_the_rescale_convention():
    processor = SAKImageProcessor(do_normalize=False, do_pad=False)
    depth_mm = np.array([[0, 6625], [900, 1200]], np.uint16)
    with pytest.raises(
        ValueError,
        match=r"image 0: uint16 values 0..6625 lie outside 0..255, which do_rescale=True "
        r"with rescale_factor=1/255 expects; this looks like a depth or disparity map",
    ):
        processor(depth_mm)
    with pytest.raises(ValueError, match=r"float32 values -2.1..2.6 lie .* normalised image\? Pass do_rescale=False"):
        processor(torch.tensor([[-2.1, 0.0], [1.0, 2.6]]))
    with pytest.raises(ValueError, match=r"float64 values 0..255.5 lie outside 0..255, .*; clip it"):
        processor(np.array([[0.0, 255.5]]))
    with pytest.raises(
        ValueError,
        match=r"uint8 values 4..248 lie outside 0..1, which do_rescale=False expects; "
        "for 0..255 photos keep do_rescale=True",
    ):
        SAKImageProcessor(do_rescale=False)(rgb(4, 4))
    with pytest.raises(ValueError, match="image 0 has dtype bool"):
        processor(np.ones((4, 4), bool))
    # Photos in range pass exactly: uint16/int64 holding 8-bit values, float16 tensors, float [0, 1] without rescale.
    colour = rgb(5, 6)
    expected = torch.from_numpy(colour).permute(2, 0, 1).float()
    for image in (colour.astype(np.uint16), torch.from_numpy(colour).long(), torch.from_numpy(colour).half()):
        torch.testing.assert_close(processor(image)["pixel_values"][0], expected * (1 / 255), rtol=0, atol=0)
    unit = SAKImageProcessor(do_rescale=False, do_normalize=False, do_pad=False)(colour / 255.0)["pixel_values"][0]
    torch.testing.assert_close(unit, (expected.double() / 255).float(), rtol=0, atol=0)
    # 65535-scaled 16-bit photos are accepted with the matching rescale_factor.
    sixteen = SAKImageProcessor(rescale_factor=1 / 65535, do_normalize=False, do_pad=False)
    torch.testing.assert_close(sixteen(colour.astype(np.uint16) * 257)["pixel_values"][0], expected * 257 / 65535)


def test_already_rescaled_floats_warn_and_alpha_arrays_composite_onto_white():
    with CaptureLogger(image_processing_sak.logger) as captured:
        SAKImageProcessor()(np.full((4, 4, 3), 0.5, np.float32))
    assert "rescale already rescaled images" in captured.out and "do_rescale=False" in captured.out
    colour, alpha = rgb(5, 6), np.random.default_rng(1).integers(0, 256, (5, 6), dtype=np.uint8)
    processor = SAKImageProcessor(do_rescale=False, do_normalize=False, do_pad=False)
    rgba = processor(np.dstack([colour, alpha]))["pixel_values"][0]  # uint8 HWC RGBA, as np.asarray(RGBA image)
    torch.testing.assert_close(rgba, torch.from_numpy(composite_on_white(colour, alpha)).permute(2, 0, 1).float())
    grey_alpha = processor(torch.from_numpy(np.stack([colour[..., 0], alpha])))["pixel_values"][0]  # CHW LA
    expected = composite_on_white(np.dstack([colour[..., 0]] * 3), alpha)
    torch.testing.assert_close(grey_alpha, torch.from_numpy(expected).permute(2, 0, 1).float())


def test_every_option_can_be_given_per_call_and_unknown_ones_are_named():
    image = rgb(30, 40)
    processor = SAKImageProcessor(pad_size=(32, 48))
    per_call = processor(image, do_resize=True, size={"height": 20, "width": 24}, pad_mode="bottom_right")
    configured = SAKImageProcessor(do_resize=True, size=(20, 24), pad_size=(32, 48), pad_mode="bottom_right")(image)
    for key in ("pixel_values", "original_sizes", "content_boxes"):
        torch.testing.assert_close(per_call[key], configured[key], rtol=0, atol=0)
    assert per_call["content_boxes"].tolist() == [[0, 0, 20, 24]]
    assert processor.do_resize is False and processor.size is None  # a call changes nothing of the processor
    # As in transformers, `size` alone sets the size a resize would use; do_resize stays as configured.
    assert processor(image, size={"height": 20, "width": 24})["content_boxes"].tolist() == [[1, 4, 30, 40]]
    assert processor(image, pad_size={"height": 64, "width": 64}, size_divisor=32)["pixel_values"].shape[-2:] == (
        64,
        64,
    )
    with pytest.raises(
        ValueError, match=r"unknown preprocessing options \['resample', 'sise'\]; SAKImageProcessor takes"
    ):
        processor(image, sise={"height": 20, "width": 24}, resample=2)
    with pytest.raises(ValueError, match=r'do_resize=True needs size=\{"height": ..., "width": ...\}'):
        processor(image, do_resize=True)
    with pytest.raises(ValueError, match="pad_mode='left' is not one of"):
        processor(image, pad_mode="left")
    with pytest.raises(ValueError, match="size_divisor=0 must be a positive int"):
        processor(image, size_divisor=0)


def test_return_tensors_none_and_np_give_what_transformers_processors_give():
    processor = SAKImageProcessor(pad_size=(32, 48))
    images = [rgb(30, 40), rgb(20, 20, seed=1)]
    tensors = processor(images, return_tensors="pt")
    lists = processor(images, return_tensors=None)
    assert isinstance(lists["pixel_values"], list) and len(lists["pixel_values"]) == 2
    assert all(isinstance(p, np.ndarray) and p.dtype == np.float32 for p in lists["pixel_values"])
    np.testing.assert_array_equal(np.stack(lists["pixel_values"]), tensors["pixel_values"].numpy())
    assert (
        lists["original_sizes"] == [[30, 40], [20, 20]] and lists["content_boxes"] == tensors["content_boxes"].tolist()
    )
    arrays = processor(images, return_tensors="np")
    assert isinstance(arrays["pixel_values"], np.ndarray) and isinstance(arrays["content_boxes"], np.ndarray)
    np.testing.assert_array_equal(arrays["pixel_values"], tensors["pixel_values"].numpy())


@pytest.mark.parametrize(
    "options",
    [
        {"pad_size": (64, 96)},  # centred: the reference NYUD-v2 padding
        {"pad_size": (64, 96), "pad_mode": "bottom_right"},
        {"pad_size": (16, 16), "size_divisor": 32},  # the canvas grows past pad_size to a multiple of 32
        {"pad_size": (64, 96), "do_resize": True, "size": (40, 56)},
        {"do_pad": False, "do_resize": True, "size": (40, 56)},
    ],
)
def test_post_processing_without_content_boxes_crops_as_the_processor_padded(options):
    """target_sizes alone (what transformers' pipelines pass) give the same per-image results as content_boxes,
    also in a batch whose canvas is set by its largest image."""
    processor = SAKImageProcessor(**options)
    images = [rgb(50, 70), rgb(33, 90, seed=1)] if options.get("do_pad", True) else [rgb(50, 70)]
    inputs = processor(images)
    generator = torch.Generator().manual_seed(0)
    canvas = inputs["pixel_values"].shape[-2:]
    outputs = {
        "semseg": torch.randn(len(images), 40, *canvas, generator=generator),
        "depth": torch.randn(len(images), 1, *canvas, generator=generator),
        "normals": torch.randn(len(images), 3, *canvas, generator=generator),
        "edge": torch.randn(len(images), 1, *canvas, generator=generator),
    }
    derived = processor.post_process_multi_task(outputs, target_sizes=inputs["original_sizes"])
    boxed = processor.post_process_multi_task(outputs, inputs["original_sizes"], inputs["content_boxes"])
    for a, b in zip(derived, boxed):
        for task in outputs:
            torch.testing.assert_close(a[task], b[task], rtol=0, atol=0)
    sizes = [tuple(s) for s in inputs["original_sizes"].tolist()]
    depth = processor.post_process_depth_estimation(outputs, target_sizes=sizes)
    assert [tuple(r["predicted_depth"].shape) for r in depth] == sizes


def test_target_sizes_that_do_not_fit_the_outputs_need_content_boxes():
    processor = SAKImageProcessor(pad_size=(32, 48))
    outputs = {"semseg": torch.zeros(1, 3, 32, 48)}
    with pytest.raises(
        ValueError, match=r"target size \(64, 96\) does not fit the 32x48 outputs: .*pass content_boxes"
    ):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(64, 96)])
    upsampled = processor.post_process_semantic_segmentation(outputs, [(64, 96)], content_boxes=[(0, 0, 32, 48)])
    assert upsampled[0].shape == (64, 96)
