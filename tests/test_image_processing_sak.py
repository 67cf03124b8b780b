"""SAKImageProcessor: reference preprocessing, padding bookkeeping and per-task post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import AutoImageProcessor

from modeling_sak import SAKForMultiTask, SAKImageProcessor
from modeling_sak.image_processing_sak import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


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
    with pytest.raises(ValueError, match=r"image 0 has shape \(2, 5, 5, 5\)|no 1, 3 or 4 channel"):
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
