"""The reference transforms one by one, the schema's encoding, and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_sak.data.schema import decode_example, encode_example
from modeling_sak.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiTaskTransform,
    add_ignore_regions,
    collate_multitask,
    example_rng,
    normalize,
    pad,
    photometric_distortion,
    random_crop,
    random_flip,
    random_scale,
    stage1_transform,
)


def example(height=12, width=16, seed=0):
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(height, width, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {
        "id": "x",
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "semseg": rng.integers(0, 5, (height, width)),
        "depth": rng.uniform(0.5, 5, (height, width)).astype(np.float32),
        "normals": normals,
        "edge": (rng.random((height, width)) > 0.8).astype(np.float32),
    }


class FixedRng:
    """A generator stand-in returning scripted values, to pin one branch of a random step."""

    def __init__(self, uniform=1.0, random=0.0, integers=None):
        self._uniform, self._random, self._integers = uniform, random, list(integers or [])

    def uniform(self, *args, **kwargs):
        return self._uniform

    def random(self):
        return self._random

    def integers(self, low, high=None):
        return self._integers.pop(0) if self._integers else 0


def test_schema_round_trip_is_lossless_for_depth_and_ids():
    ex = example()
    ex["semseg"][0, 0] = 255
    row = encode_example(
        ex["id"], ex["image"], semseg=ex["semseg"], depth=ex["depth"], normals=ex["normals"], edge=ex["edge"]
    )
    decoded = decode_example(row)
    np.testing.assert_array_equal(decoded["image"], ex["image"])
    np.testing.assert_array_equal(decoded["semseg"], ex["semseg"])
    np.testing.assert_array_equal(decoded["depth"], ex["depth"])  # float32 TIFF: bit exact
    assert np.abs(decoded["normals"] - ex["normals"]).max() <= 1 / 255 + 1e-6  # 8-bit normals as the reference
    np.testing.assert_array_equal(decoded["edge"], ex["edge"])


def test_scale_divides_depth_and_resizes_labels_nearest():
    ex = example(10, 10)
    out = random_scale(ex, FixedRng(uniform=2.0))
    assert out["image"].shape == (20, 20, 3) and out["semseg"].shape == (20, 20)
    np.testing.assert_array_equal(out["semseg"][::2, ::2], ex["semseg"])  # nearest: no new label values
    np.testing.assert_allclose(out["depth"][::2, ::2], ex["depth"] / 2.0)
    np.testing.assert_array_equal(out["normals"][1::2, 1::2], ex["normals"])


def test_flip_negates_the_normal_x_component_only():
    ex = example()
    out = random_flip(ex, FixedRng(random=0.0))
    np.testing.assert_array_equal(out["image"], ex["image"][:, ::-1])
    np.testing.assert_array_equal(out["normals"][..., 0], -ex["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(out["normals"][..., 1:], ex["normals"][:, ::-1, 1:])
    np.testing.assert_array_equal(out["depth"], ex["depth"][:, ::-1])
    assert random_flip(ex, FixedRng(random=0.9)) is ex


def test_crop_is_redrawn_until_no_class_dominates():
    ex = example(20, 20)
    ex["semseg"][:] = 0
    ex["semseg"][13:, 13:] = 1  # only crops reaching the bottom-right corner hold two balanced classes
    # Scripted draws: (0, 0) is all class 0; (9, 9) has 36 % of class 1 and 64 % of class 0:
    # accepted.
    out = random_crop(ex, FixedRng(integers=[0, 0, 9, 9]), size=(10, 10))
    assert out["semseg"].shape == (10, 10) and (out["semseg"] == 1).sum() == 36
    np.testing.assert_array_equal(out["depth"], ex["depth"][9:19, 9:19])
    ex["semseg"][:] = 0
    ex["semseg"][15:, 15:] = 1  # (10, 10): 25 ones vs 75 zeros -> 75 % is not below the limit, drawn again
    out = random_crop(ex, FixedRng(integers=[10, 10, 5, 5, 10, 10] + [0, 0] * 6 + [10, 9]), size=(10, 10))
    np.testing.assert_array_equal(out["image"], ex["image"][10:20, 9:19])
    # After 10 failed draws the last one is kept.
    ex["semseg"][:] = 3
    out = random_crop(ex, FixedRng(integers=[0, 0] * 9 + [4, 6]), size=(10, 10))
    np.testing.assert_array_equal(out["image"], ex["image"][4:14, 6:16])


def test_crop_keeps_small_images_whole():
    ex = example(8, 30)
    out = random_crop(ex, np.random.default_rng(0), size=(16, 16))
    assert out["image"].shape == (8, 16, 3)


def test_normalise_pad_and_ignore_regions():
    ex = example(10, 12)
    ex["depth"][0, 0] = 0.0
    out = add_ignore_regions(pad(normalize(ex), size=(14, 16)))
    assert out["pixel_values"].shape == (3, 14, 16) and out["content_box"] == (2, 2, 10, 12)
    expected = ((ex["image"][0, 0] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    np.testing.assert_allclose(out["pixel_values"][:, 2, 2], expected, rtol=1e-6)
    assert (out["pixel_values"][:, :2] == 0).all()  # image padded with 0 after normalisation
    assert (out["semseg"][:2] == 255).all() and (out["edge"][:, :2] == 255).all()  # labels padded with 255
    assert (out["normals"][:2] == 255).all()  # padded normals are 0, then zero norm -> 255
    assert (out["depth"][:2] == 255).all() and out["depth"][2, 2] == 255  # depth 0 (pad or missing) -> 255
    assert out["depth"][2, 3] == ex["depth"][0, 1]
    bottom_right = pad(normalize(ex), size=(14, 16), mode="bottom_right")
    assert bottom_right["content_box"] == (0, 0, 10, 12) and (bottom_right["semseg"][10:] == 255).all()


def test_photometric_distortion_changes_only_the_image_within_bounds():
    ex = example(16, 16)
    out = photometric_distortion(ex, np.random.default_rng(3))
    assert out["image"].dtype == np.uint8 and out["image"].shape == ex["image"].shape
    assert out["semseg"] is ex["semseg"] and out["depth"] is ex["depth"]
    brighter = photometric_distortion(ex, FixedRng(uniform=20.0, integers=[1, 0, 0, 0, 0]))
    np.testing.assert_array_equal(brighter["image"], np.clip(ex["image"].astype(np.int64) + 20, 0, 255))


def test_pipeline_is_deterministic_per_seed_epoch_and_id():
    transform = MultiTaskTransform(train=True, size=(8, 12), seed=1)
    first, again = transform(example()), transform(example())
    torch.testing.assert_close(first["pixel_values"], again["pixel_values"])
    transform.set_epoch(1)
    assert not torch.equal(transform(example())["pixel_values"], first["pixel_values"])
    a, b = example_rng(0, 0, "a").random(), example_rng(0, 0, "b").random()
    assert a != b


def test_collate_builds_model_ready_batches():
    transform = MultiTaskTransform(train=False, size=(16, 16))
    examples = [transform(example()), transform(example(seed=1))]
    batch = collate_multitask(examples, ["semseg", "normals", "edge", "depth", "sal"])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["labels"]["semseg"].shape == (2, 16, 16) and batch["labels"]["semseg"].dtype == torch.int64
    assert batch["labels"]["normals"].shape == (2, 3, 16, 16)
    assert batch["labels"]["depth"].shape == (2, 1, 16, 16) and batch["labels"]["sal"] is None


def test_stage1_transform_sizes():
    from PIL import Image

    image = Image.fromarray(example(40, 60)["image"])
    assert stage1_transform(True, size=32)({"image": image, "id": "a"})["pixel_values"].shape == (3, 32, 32)
    assert stage1_transform(False, size=32)({"image": image})["pixel_values"].shape == (3, 32, 32)


def test_encode_rejects_bad_ids():
    ex = example()
    with pytest.raises(ValueError, match="ids must lie in 0..254"):
        encode_example("x", ex["image"], semseg=np.full((12, 16), -1))
