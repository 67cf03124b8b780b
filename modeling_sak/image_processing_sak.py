"""Image processor of SAK: the reference preprocessing (ImageNet normalisation, padding) and per-task post-processing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging


logger = logging.get_logger(__name__)

IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
PAD_MODES = ("center", "bottom_right")


def _to_chw_float(image, index: int) -> torch.Tensor:
    """One image (PIL, HWC/CHW numpy or torch, grayscale/RGB/RGBA) -> (3, H, W) float32 in its own value range."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a transformers vision dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(
            np.array(image, copy=True) if not image.flags.writeable else np.ascontiguousarray(image)
        )
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            f"image {index} has type {type(image).__name__}; give PIL images, numpy arrays or torch tensors"
        )
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        raise ValueError(f"image {index} has shape {tuple(image.shape)}; expected (H, W), (H, W, C) or (C, H, W)")
    if image.shape[0] not in (1, 3, 4) and image.shape[-1] in (1, 3, 4):
        image = image.permute(2, 0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    elif image.shape[0] != 3:
        raise ValueError(f"image {index} has shape {tuple(image.shape)}: no 1, 3 or 4 channel axis found")
    if min(image.shape[-2:]) == 0:
        raise ValueError(f"image {index} is empty: shape {tuple(image.shape)}")
    return image.float()


class SAKImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`SAKForMultiTask`] exactly as the reference evaluation does, and turns its outputs back into
    per-image predictions at the original image size.

    Preprocessing: optional resize, rescale to [0, 1], ImageNet mean/std normalisation, then zero padding (after
    normalisation) to a common canvas of at least `pad_size`, rounded up to a multiple of `size_divisor`. The
    reference pads NYUD-v2 images centred into 448 x 576 (`pad_mode="center"`).

    Args:
        do_resize (`bool`, *optional*, defaults to `False`): resize every image to `size` first.
        size (`dict`, *optional*): `{"height": int, "width": int}` for `do_resize`.
        do_rescale (`bool`, *optional*, defaults to `True`): multiply by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`).
        do_normalize (`bool`, *optional*, defaults to `True`): subtract `image_mean`, divide by `image_std`.
        image_mean, image_std (`list[float]`, *optional*): ImageNet statistics by default.
        do_pad (`bool`, *optional*, defaults to `True`): pad to the canvas described above.
        pad_size (`dict`, *optional*, defaults to `{"height": 448, "width": 576}`): minimum canvas.
        pad_mode (`str`, *optional*, defaults to `"center"`): `"center"` or `"bottom_right"`.
        size_divisor (`int`, *optional*, defaults to 16): canvas sides are rounded up to a multiple of it.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = False,
        size: dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_pad: bool = True,
        pad_size: dict[str, int] | None = None,
        pad_mode: str = "center",
        size_divisor: int = 16,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = self._check_size(size, "size") if size is not None else None
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN)
        self.image_std = list(image_std if image_std is not None else IMAGENET_DEFAULT_STD)
        self.do_pad = do_pad
        self.pad_size = self._check_size(pad_size or {"height": 448, "width": 576}, "pad_size")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r} is not one of {list(PAD_MODES)}")
        self.pad_mode = pad_mode
        if not isinstance(size_divisor, int) or size_divisor <= 0:
            raise ValueError(f"size_divisor={size_divisor!r} must be a positive int (the stem's patch size)")
        self.size_divisor = size_divisor
        if do_resize and self.size is None:
            raise ValueError('do_resize=True needs size={"height": ..., "width": ...}')

    @staticmethod
    def _check_size(size, name: str) -> dict[str, int]:
        if isinstance(size, list | tuple) and len(size) == 2:
            size = {"height": size[0], "width": size[1]}
        if not isinstance(size, dict) or set(size) != {"height", "width"} or min(size.values()) <= 0:
            raise ValueError(f'{name}={size!r} must be {{"height": int, "width": int}} with positive sides')
        return {"height": int(size["height"]), "width": int(size["width"])}

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Preprocess one image or a list of images.

        Returns a `BatchFeature` with `pixel_values` `(batch_size, 3, height, width)`, `original_sizes` `(batch_size,
        2)` (height, width of each input) and `content_boxes` `(batch_size, 4)` (top, left, height, width of each
        image inside the padded canvas), which the `post_process_*` methods use to undo padding and resizing.
        """
        unknown = sorted(set(kwargs) - set(self.to_dict()))
        if unknown:
            raise ValueError(f"unknown preprocessing options {unknown}")
        options = {**self.to_dict(), **kwargs}
        if not isinstance(images, list | tuple):
            images = (
                [images] if not (isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4) else list(images)
            )
        if not images:
            raise ValueError("no images given")
        tensors, original_sizes = [], []
        for index, image in enumerate(images):
            tensor = _to_chw_float(image, index)
            original_sizes.append(tuple(tensor.shape[-2:]))
            if options["do_resize"]:
                size = self._check_size(options["size"], "size")
                tensor = F.interpolate(
                    tensor[None],
                    size=(size["height"], size["width"]),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
            if options["do_rescale"]:
                tensor = tensor * options["rescale_factor"]
            if options["do_normalize"]:
                mean = torch.tensor(options["image_mean"], dtype=torch.float32)[:, None, None]
                std = torch.tensor(options["image_std"], dtype=torch.float32)[:, None, None]
                tensor = (tensor - mean) / std
            tensors.append(tensor)

        divisor = options["size_divisor"]
        heights, widths = [t.shape[-2] for t in tensors], [t.shape[-1] for t in tensors]
        if options["do_pad"]:
            pad = self._check_size(options["pad_size"], "pad_size")
            canvas_h = -(-max(max(heights), pad["height"]) // divisor) * divisor
            canvas_w = -(-max(max(widths), pad["width"]) // divisor) * divisor
        else:
            if len(set(heights)) > 1 or len(set(widths)) > 1:
                raise ValueError("images of different sizes need do_pad=True (or do_resize=True) to form a batch")
            canvas_h, canvas_w = heights[0], widths[0]
        pixel_values = torch.zeros(len(tensors), 3, canvas_h, canvas_w)
        boxes = []
        for i, tensor in enumerate(tensors):
            h, w = tensor.shape[-2:]
            top, left = ((canvas_h - h) // 2, (canvas_w - w) // 2) if options["pad_mode"] == "center" else (0, 0)
            pixel_values[i, :, top : top + h, left : left + w] = tensor
            boxes.append((top, left, h, w))
        data = {
            "pixel_values": pixel_values,
            "original_sizes": torch.tensor(original_sizes),
            "content_boxes": torch.tensor(boxes),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _restore(self, maps: torch.Tensor, index: int, target_sizes, content_boxes) -> torch.Tensor:
        """Crop image `index` out of the padded canvas and resize it to its target size: (C, H, W)."""
        prediction = maps[index : index + 1].float()
        if content_boxes is not None:
            top, left, height, width = (int(v) for v in content_boxes[index])
            prediction = prediction[..., top : top + height, left : left + width]
        if target_sizes is not None:
            size = tuple(int(v) for v in target_sizes[index])
            if tuple(prediction.shape[-2:]) != size:
                prediction = F.interpolate(prediction, size=size, mode="bilinear", align_corners=False)
        return prediction[0]

    def _per_image(self, outputs, task: str, target_sizes, content_boxes) -> list[torch.Tensor]:
        task_outputs = outputs.task_outputs if hasattr(outputs, "task_outputs") else outputs
        if task not in task_outputs:
            raise ValueError(f"the model outputs have no task '{task}'; they have {list(task_outputs)}")
        maps = task_outputs[task]
        for name, value in (("target_sizes", target_sizes), ("content_boxes", content_boxes)):
            if value is not None and len(value) != maps.shape[0]:
                raise ValueError(f"{name} has {len(value)} entries for a batch of {maps.shape[0]} images")
        return [self._restore(maps, i, target_sizes, content_boxes) for i in range(maps.shape[0])]

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "semseg"
    ) -> list[torch.Tensor]:
        """Class id map `(height, width)` per image (argmax over the logits; also for `human_parts`)."""
        return [m.argmax(dim=0) for m in self._per_image(outputs, task, target_sizes, content_boxes)]

    def post_process_depth_estimation(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "depth"
    ) -> list[torch.Tensor]:
        """Depth in metres `(height, width)` per image, clamped to >= 0."""
        return [m[0].clamp(min=0) for m in self._per_image(outputs, task, target_sizes, content_boxes)]

    def post_process_surface_normals(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "normals"
    ) -> list[torch.Tensor]:
        """Unit surface normals `(3, height, width)` per image (camera frame, as in the training labels)."""
        return [F.normalize(m, dim=0) for m in self._per_image(outputs, task, target_sizes, content_boxes)]

    def post_process_boundaries(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "edge"
    ) -> list[torch.Tensor]:
        """Boundary probability `(height, width)` in [0, 1] per image."""
        return [m[0].sigmoid() for m in self._per_image(outputs, task, target_sizes, content_boxes)]

    def post_process_saliency(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "sal"
    ) -> list[torch.Tensor]:
        """Saliency probability `(height, width)` per image (softmax probability of the salient class)."""
        return [m.softmax(dim=0)[1] for m in self._per_image(outputs, task, target_sizes, content_boxes)]

    def post_process_multi_task(self, outputs, target_sizes=None, content_boxes=None) -> list[dict[str, torch.Tensor]]:
        """Every task of `outputs`, one dict task -> prediction per image (see the `post_process_*` methods)."""
        per_task = {
            "semseg": self.post_process_semantic_segmentation,
            "human_parts": self.post_process_semantic_segmentation,
            "depth": self.post_process_depth_estimation,
            "normals": self.post_process_surface_normals,
            "edge": self.post_process_boundaries,
            "sal": self.post_process_saliency,
        }
        task_outputs = outputs.task_outputs if hasattr(outputs, "task_outputs") else outputs
        results = {}
        for task in task_outputs:
            if task in per_task:
                results[task] = per_task[task](outputs, target_sizes, content_boxes, task=task)
            else:
                results[task] = self._per_image(outputs, task, target_sizes, content_boxes)
        batch = next(iter(task_outputs.values())).shape[0]
        return [{task: values[i] for task, values in results.items()} for i in range(batch)]


__all__ = ["SAKImageProcessor"]
