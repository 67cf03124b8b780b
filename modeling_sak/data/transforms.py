"""The reference data protocol (DESIGN section 2), one function per step, each over one decoded example.

An example is a dict of numpy arrays as `schema.decode_example` returns them (image uint8 (H, W, 3); semseg and
human_parts int64 ids with 255 ignored; depth float32 metres; normals float32 (H, W, 3) in [-1, 1]; edge and sal
float32 in [0, 1]). Random steps take an explicit `numpy.random.Generator`, so a transform is reproducible from
(seed, epoch, example id) whatever process or worker runs it.

Train: random scale [0.5, 2] -> random crop (retried up to 10 times until no class covers > 75 % of the labelled
pixels) -> horizontal flip (p 0.5, normal x negated) -> photometric distortion -> normalise -> pad -> ignore regions.
Eval: normalise -> pad -> ignore regions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..remote_code.tasks_sak import IGNORE_INDEX


IMAGENET_MEAN = np.array(IMAGENET_DEFAULT_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(IMAGENET_DEFAULT_STD, dtype=np.float32)
LABEL_KEYS = ("semseg", "human_parts", "sal", "edge", "normals", "depth")
# Padding value of each key (DESIGN: image 0 after normalisation, labels 255, normals 0, depth 0).
PAD_VALUES = {
    "pixel_values": 0.0,
    "semseg": IGNORE_INDEX,
    "human_parts": IGNORE_INDEX,
    "sal": IGNORE_INDEX,
    "edge": IGNORE_INDEX,
    "normals": 0.0,
    "depth": 0.0,
}


def example_rng(seed: int, epoch: int, example_id: str) -> np.random.Generator:
    """A generator determined by (seed, epoch, example id) alone."""
    digest = int.from_bytes(hashlib.blake2b(str(example_id).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, digest])


def _labels(example: dict[str, Any]) -> list[str]:
    return [key for key in LABEL_KEYS if key in example]


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize as OpenCV's INTER_NEAREST: source index floor(dst * src / dst_size)."""
    rows = np.minimum((np.arange(height) * (array.shape[0] / height)).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (array.shape[1] / width)).astype(np.int64), array.shape[1] - 1)
    return array[rows][:, cols]


def random_scale(example: dict, rng: np.random.Generator, scale_range: Sequence[float] = (0.5, 2.0)) -> dict:
    """Rescale by a factor in `scale_range`: image bilinear, labels nearest, depth divided by the factor."""
    scale = rng.uniform(*scale_range)
    height, width = example["image"].shape[:2]
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    out = dict(example)
    out["image"] = np.asarray(Image.fromarray(example["image"]).resize((new_w, new_h), Image.BILINEAR))
    for key in _labels(example):
        out[key] = _nearest(example[key], new_h, new_w)
    if "depth" in out:
        out["depth"] = out["depth"] / scale
    return out


def random_crop(
    example: dict,
    rng: np.random.Generator,
    size: Sequence[int] = (448, 576),
    max_tries: int = 10,
    cat_max_ratio: float = 0.75,
) -> dict:
    """Crop `size` (or the whole side when smaller), re-drawn up to `max_tries` times until no single semseg class
    covers more than `cat_max_ratio` of the labelled pixels (the last draw is kept otherwise)."""
    height, width = example["image"].shape[:2]
    crop_h, crop_w = min(size[0], height), min(size[1], width)
    for _ in range(max_tries):
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        if "semseg" not in example:
            break
        window = example["semseg"][top : top + crop_h, left : left + crop_w]
        _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    out = dict(example)
    for key in ("image", *_labels(example)):
        out[key] = example[key][top : top + crop_h, left : left + crop_w]
    return out


def random_flip(example: dict, rng: np.random.Generator, p: float = 0.5) -> dict:
    """Horizontal flip with probability p; the x component of the normals is negated."""
    if rng.random() >= p:
        return example
    out = {key: (value[:, ::-1].copy() if isinstance(value, np.ndarray) else value) for key, value in example.items()}
    if "normals" in out:
        out["normals"][..., 0] *= -1.0
    return out


def photometric_distortion(example: dict, rng: np.random.Generator) -> dict:
    """Brightness +-32, contrast [0.5, 1.5] (first or last at random), saturation [0.5, 1.5], hue +-18 degrees of
    OpenCV's 180; each with probability 0.5, clipped to uint8 after every step."""
    image = example["image"].astype(np.float32)

    def clip(x):
        return np.clip(x, 0, 255)

    if rng.integers(2):
        image = clip(image + rng.uniform(-32, 32))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        image = clip(image * rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = np.asarray(Image.fromarray(image.astype(np.uint8)).convert("HSV")).astype(np.float32)
        hsv[..., 1] = clip(hsv[..., 1] * rng.uniform(0.5, 1.5))
        image = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if rng.integers(2):
        hsv = np.asarray(Image.fromarray(image.astype(np.uint8)).convert("HSV")).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 18) * 256.0 / 180.0) % 256.0  # PIL hue spans 0..255
        image = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.integers(2):
        image = clip(image * rng.uniform(0.5, 1.5))
    return dict(example, image=image.astype(np.uint8))


def normalize(example: dict, mean: np.ndarray = IMAGENET_MEAN, std: np.ndarray = IMAGENET_STD) -> dict:
    """uint8 image -> `pixel_values` float32 (3, H, W), (x / 255 - mean) / std."""
    out = {key: value for key, value in example.items() if key != "image"}
    out["pixel_values"] = ((example["image"].astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    return out


def pad(example: dict, size: Sequence[int] = (448, 576), mode: str = "center") -> dict:
    """Pad every map to at least `size` (centred as the reference, or `bottom_right`) with PAD_VALUES."""
    height, width = example["pixel_values"].shape[-2:]
    target_h, target_w = max(size[0], height), max(size[1], width)
    top = (target_h - height) // 2 if mode == "center" else 0
    left = (target_w - width) // 2 if mode == "center" else 0
    out = dict(example)
    for key, fill in PAD_VALUES.items():
        if key not in example:
            continue
        value = example[key]
        if key == "pixel_values":
            canvas = np.full((value.shape[0], target_h, target_w), fill, dtype=value.dtype)
            canvas[:, top : top + height, left : left + width] = value
        else:
            canvas = np.full((target_h, target_w, *value.shape[2:]), fill, dtype=value.dtype)
            canvas[top : top + height, left : left + width] = value
        out[key] = canvas
    out["content_box"] = (top, left, height, width)
    return out


def add_ignore_regions(example: dict) -> dict:
    """Normals of zero norm and depth 0 (no measurement, or padding) become 255."""
    out = dict(example)
    if "normals" in example:
        normals = example["normals"].copy()
        normals[np.linalg.norm(normals, axis=-1) == 0] = IGNORE_INDEX
        out["normals"] = normals
    if "depth" in example:
        out["depth"] = np.where(example["depth"] == 0, np.float32(IGNORE_INDEX), example["depth"]).astype(np.float32)
    return out


def to_tensors(example: dict) -> dict:
    """numpy -> torch in the layout `SAKForMultiTask` takes (ids (H, W); normals (3, H, W); maps (1, H, W))."""
    out = {key: value for key, value in example.items() if not isinstance(value, np.ndarray)}
    out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(example["pixel_values"]))
    for key in _labels(example):
        value = np.ascontiguousarray(example[key])
        if key in ("semseg", "human_parts"):
            out[key] = torch.from_numpy(value.astype(np.int64))
        elif key == "sal":
            out[key] = torch.from_numpy(np.where(value == IGNORE_INDEX, IGNORE_INDEX, value > 0.5).astype(np.int64))
        elif key == "normals":
            out[key] = torch.from_numpy(value.transpose(2, 0, 1).astype(np.float32))
        else:
            out[key] = torch.from_numpy(value.astype(np.float32))[None]
    return out


class MultiTaskTransform:
    """The whole train or eval pipeline as one callable over a decoded example, deterministic per (seed, epoch, id).

    Args:
        train: random scale, crop, flip and photometric distortion first (the reference training protocol).
        size: crop size in training and the minimum padded size (448 x 576 for NYUD-v2).
        seed: base seed of the per-example generators; `set_epoch` changes the draw every epoch.
        scale_range, photometric: the reference defaults; set photometric=False for data without colour semantics.
        pad_mode: "center" (reference) or "bottom_right".
    """

    def __init__(
        self,
        train: bool,
        size: Sequence[int] = (448, 576),
        seed: int = 0,
        scale_range: Sequence[float] = (0.5, 2.0),
        photometric: bool = True,
        pad_mode: str = "center",
    ):
        self.train, self.size, self.seed = train, tuple(size), seed
        self.scale_range, self.photometric, self.pad_mode = tuple(scale_range), photometric, pad_mode
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, example: dict) -> dict:
        if self.train:
            rng = example_rng(self.seed, self.epoch, example.get("id", ""))
            example = random_scale(example, rng, self.scale_range)
            example = random_crop(example, rng, self.size)
            example = random_flip(example, rng)
            if self.photometric:
                example = photometric_distortion(example, rng)
        example = pad(normalize(example), self.size, self.pad_mode)
        return to_tensors(add_ignore_regions(example))


def collate_multitask(examples: list[dict], tasks: Sequence[str]) -> dict[str, Any]:
    """Batch transformed examples into `{"pixel_values": (B, 3, H, W), "labels": {task: tensor or None}}`.

    A task missing from any example of the batch gets `None` (its loss is skipped for this batch).
    """
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    batch["labels"] = {
        task: torch.stack([e[task] for e in examples]) if all(task in e for e in examples) else None for task in tasks
    }
    batch["ids"] = [e.get("id", "") for e in examples]
    if all("content_box" in e for e in examples):  # (top, left, height, width) of each image inside the padding
        batch["content_boxes"] = torch.tensor([e["content_box"] for e in examples])
    return batch


def stage1_transform(train: bool, size: int = 384, seed: int = 0, epoch: int = 0):  # noqa: C901
    """Stage-1 (ImageNet) transform: train = random resized crop (scale 0.08-1, ratio 3/4-4/3) + flip; eval = resize
    the shorter side to size / 0.875 and centre crop; both normalised with ImageNet statistics."""

    def transform(example: dict) -> dict:
        image = example["image"]
        image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        width, height = image.size
        if train:
            rng = example_rng(seed, epoch, example.get("id", example.get("__key__", "")))
            for _ in range(10):
                area = width * height * rng.uniform(0.08, 1.0)
                ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                w, h = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
                if 0 < w <= width and 0 < h <= height:
                    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                    break
            else:
                w = h = min(width, height)
                left, top = (width - w) // 2, (height - h) // 2
            image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = round(size / 0.875)
            scale = short / min(width, height)
            image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
            left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixel_values = normalize({"image": np.asarray(image, dtype=np.uint8)})["pixel_values"]
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values))}

    return transform
