"""Image processor of SAK: the reference preprocessing (ImageNet normalisation, padding) and per-task post-processing."""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import ModelOutput, TensorType, logging

from .image_io_sak import load_rgb_image as load_rgb_image  # re-exported: `image_processing_sak.load_rgb_image`
from .image_io_sak import to_rgb_array, value_range
from .tasks_sak import TASKS


try:
    from PIL import Image as PILImage
except ImportError:  # pragma: no cover - PIL is a transformers vision dependency
    PILImage = None


logger = logging.get_logger(__name__)

PAD_MODES = ("center", "bottom_right")


def _format_factor(factor: float) -> str:
    inverse = 1 / factor
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{factor:g}"


def _to_chw_float(image, index: int, full_scale: float | None, rescale_rule: str) -> torch.Tensor:
    """One image (PIL, HWC/CHW numpy or torch, 1-4 channels) -> (3, H, W) float32 in its own value range.

    PIL images follow `to_rgb_array`. Arrays carry no mode, so they are taken as photos on the scale the options
    expect (`full_scale`: 255 with the default rescale, 1 with `do_rescale=False`, unchecked when neither rescaling
    nor normalising): 1 channel is grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA, with alpha composited onto white.
    """
    name = f"image {index}"
    if PILImage is not None and isinstance(image, PILImage.Image):
        filename = getattr(image, "filename", "")
        image = to_rgb_array(image, f"{name} ({filename})" if filename else name)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype in (torch.bfloat16, torch.float16) else image).numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} has type {type(image).__name__}; give PIL images, numpy arrays or torch tensors")
    if image.dtype.kind not in "uif":
        raise ValueError(f"{name} has dtype {image.dtype}; give uint8 photos (or float ones, see do_rescale)")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(image.shape)}; expected (H, W), (H, W, C) or (C, H, W)")
    if image.shape[0] not in (1, 2, 3, 4) and image.shape[-1] in (1, 2, 3, 4):
        image = np.moveaxis(image, -1, 0)
    elif image.shape[0] in (1, 2, 3, 4) and image.shape[-1] in (1, 2, 3, 4):
        logger.warning(f"{name} has shape {tuple(image.shape)}: the channel axis is ambiguous; taken as (C, H, W)")
    if image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"{name} has shape {tuple(image.shape)}: no 1, 2, 3 or 4 channel axis found")
    if min(image.shape[-2:]) == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    is_float = image.dtype.kind == "f"
    if full_scale is not None:
        if is_float and not np.isfinite(image).all():
            raise ValueError(f"{name} has NaN or infinite values")
        low, high = image.min(), image.max()
        if low < 0 or high > full_scale:
            slightly_out = is_float and low >= -0.05 * full_scale and high <= 1.05 * full_scale
            if is_float and low < 0 and (not slightly_out or high <= 0.05 * full_scale):
                hint = "negative values: an already normalised image? Pass do_rescale=False, do_normalize=False"
            elif slightly_out:
                hint = f"clip it to 0..{full_scale:g} (resampling can overshoot a photo's range slightly)"
            elif full_scale <= 1 and high <= 255:
                hint = "for 0..255 photos keep do_rescale=True"
            else:
                hint = (
                    "this looks like a depth or disparity map, not a photo; give an 8-bit RGB or grayscale photo (a "
                    "photo of another range needs rescale_factor = 1 / its maximum)"
                )
            raise ValueError(
                f"{name}: {image.dtype} values {value_range(image)} lie outside 0..{full_scale:g}, which "
                f"{rescale_rule} expects; {hint}"
            )
        if is_float and full_scale > 1 and 0 < high <= 1:
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images (float values in [0, 1] with "
                "do_rescale=True). If the input images have pixel values between 0 and 1, set do_rescale=False to "
                "avoid rescaling them again."
            )
    tensor = torch.from_numpy(np.array(image, dtype=np.float32))
    if tensor.shape[0] in (2, 4):  # composite the alpha channel onto white, as for PIL images
        white = full_scale if full_scale is not None else (1.0 if is_float else 255.0)
        alpha = tensor[-1:] / white
        tensor = tensor[:-1] * alpha + white * (1 - alpha)
        if not is_float:
            tensor = tensor.round()
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor


class SAKImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`SAKForMultiTask`] exactly as the reference evaluation does, and turns its outputs back into
    per-image predictions at the original image size.

    Preprocessing: optional resize, rescale to [0, 1], ImageNet mean/std normalisation, then zero padding (after
    normalisation) to a common canvas of at least `pad_size`, rounded up to a multiple of `size_divisor`. The
    reference pads NYUD-v2 images centred into 448 x 576 (`pad_mode="center"`).

    Inputs are checked at the door. PIL images follow `to_rgb_array`: 8-bit photos of any common mode become RGB
    (grayscale replicated, palettes looked up, CMYK/YCbCr converted, transparency composited onto white), while 16-bit,
    32-bit and float single-channel images (modes `I;16`, `I`, `F`: depth and disparity maps) raise a `ValueError`
    naming the image (and its file), its mode and its values. Numpy arrays and torch tensors, `(H, W)`, `(H, W, C)` or
    `(C, H, W)` with 1 (grayscale), 2 (grayscale + alpha), 3 (RGB) or 4 (RGBA) channels, must hold values in 0..255
    with the default `do_rescale=True, rescale_factor=1/255` (0..1/`rescale_factor` in general) and in 0..1 with
    `do_rescale=False`; anything else (a uint16 depth map, an already normalised
    image) raises a `ValueError` with the fix, and float values all within [0, 1] with `do_rescale=True` log the
    transformers "already rescaled" warning. With `do_rescale=False, do_normalize=False` arrays are taken as given.

    As transformers' processors, every option below may also be given to one call (`processor(image, pad_size=...)`,
    an unknown name raises a `ValueError` naming it), and `return_tensors=None` gives lists of numpy arrays. The
    `post_process_*` methods take the processor's `content_boxes`, or derive them from `target_sizes` (the original
    image sizes, what transformers' pipelines pass) by this processor's own padding rule.

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
        self.size = size
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN)
        self.image_std = list(image_std if image_std is not None else IMAGENET_DEFAULT_STD)
        self.do_pad = do_pad
        self.pad_size = pad_size or {"height": 448, "width": 576}
        self.pad_mode = pad_mode
        self.size_divisor = size_divisor
        checked = self._call_options({})  # one rule set for the saved options and the per-call ones
        self.size, self.pad_size = checked["size"], checked["pad_size"]

    @staticmethod
    def _check_size(size, name: str) -> dict[str, int]:
        if isinstance(size, list | tuple) and len(size) == 2:
            size = {"height": size[0], "width": size[1]}
        if not isinstance(size, dict) or set(size) != {"height", "width"} or min(size.values()) <= 0:
            raise ValueError(f'{name}={size!r} must be {{"height": int, "width": int}} with positive sides')
        return {"height": int(size["height"]), "width": int(size["width"])}

    @classmethod
    def preprocessing_options(cls) -> tuple[str, ...]:
        """The options `preprocess` takes per call: the parameters of `__init__`."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)

    def _call_options(self, kwargs: dict) -> dict:
        """This processor's options with the per-call `kwargs` applied, checked as `__init__` checks them."""
        names = self.preprocessing_options()
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"unknown preprocessing options {unknown}; {type(self).__name__} takes {list(names)} (and "
                "return_tensors)"
            )
        options = {name: kwargs[name] if name in kwargs else getattr(self, name) for name in names}
        if options["size"] is not None:
            options["size"] = self._check_size(options["size"], "size")
        if options["do_resize"] and options["size"] is None:
            raise ValueError('do_resize=True needs size={"height": ..., "width": ...}')
        options["pad_size"] = self._check_size(options["pad_size"], "pad_size")
        if options["pad_mode"] not in PAD_MODES:
            raise ValueError(f"pad_mode={options['pad_mode']!r} is not one of {list(PAD_MODES)}")
        divisor = options["size_divisor"]
        if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor <= 0:
            raise ValueError(f"size_divisor={divisor!r} must be a positive int (the stem's patch size)")
        return options

    def preprocess(self, images, return_tensors: str | TensorType | None = "pt", **kwargs) -> BatchFeature:
        """Preprocess one image or a list of images.

        Every `__init__` option (`do_resize`, `size`, `pad_size`, `pad_mode`, ...) may be overridden for one call;
        an unknown option raises a `ValueError` naming it. Returns a `BatchFeature` with `pixel_values`
        `(batch_size, 3, height, width)`, `original_sizes` `(batch_size, 2)` (height, width of each input) and
        `content_boxes` `(batch_size, 4)` (top, left, height, width of each image inside the padded canvas), which the
        `post_process_*` methods use to undo padding and resizing. `return_tensors="pt"` (the default) gives torch
        tensors, `"np"` numpy arrays, and `None` what transformers' PIL-backend processors give: `pixel_values` a list
        of `(3, height, width)` float32 numpy arrays, the sizes and boxes lists of ints.
        """
        options = self._call_options(kwargs)
        if not isinstance(images, list | tuple):
            images = (
                [images] if not (isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4) else list(images)
            )
        if not images:
            raise ValueError("no images given")
        if options["do_rescale"]:
            if not options["rescale_factor"] or options["rescale_factor"] <= 0:
                raise ValueError(f"rescale_factor={options['rescale_factor']!r} must be positive (1/255 for 8-bit)")
            full_scale = 1 / options["rescale_factor"]
            rescale_rule = f"do_rescale=True with rescale_factor={_format_factor(options['rescale_factor'])}"
        else:
            full_scale = 1.0 if options["do_normalize"] else None
            rescale_rule = "do_rescale=False"
        tensors, original_sizes = [], []
        for index, image in enumerate(images):
            tensor = _to_chw_float(image, index, full_scale, rescale_rule)
            original_sizes.append(tuple(tensor.shape[-2:]))
            if options["do_resize"]:
                # Bilinear with antialiasing, as transformers' torchvision backend resizes.
                size = options["size"]
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

        heights, widths = [t.shape[-2] for t in tensors], [t.shape[-1] for t in tensors]
        if not options["do_pad"] and (len(set(heights)) > 1 or len(set(widths)) > 1):
            raise ValueError("images of different sizes need do_pad=True (or do_resize=True) to form a batch")
        canvas_h, canvas_w = _canvas_size(max(heights), max(widths), options)
        pixel_values = torch.zeros(len(tensors), 3, canvas_h, canvas_w)
        boxes = []
        for i, tensor in enumerate(tensors):
            top, left, h, w = _content_box(canvas_h, canvas_w, *tensor.shape[-2:], options)
            pixel_values[i, :, top : top + h, left : left + w] = tensor
            boxes.append((top, left, h, w))
        if return_tensors is None:
            data = {
                "pixel_values": list(pixel_values.numpy()),
                "original_sizes": [list(size) for size in original_sizes],
                "content_boxes": [list(box) for box in boxes],
            }
            return BatchFeature(data=data)
        data = {
            "pixel_values": pixel_values,
            "original_sizes": torch.tensor(original_sizes),
            "content_boxes": torch.tensor(boxes),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _task_maps(self, outputs, task: str, accepted: str | None = None) -> torch.Tensor:
        """The `(batch_size, channels, height, width)` map of `task` in `outputs`, whatever form they take."""
        task_outputs = getattr(outputs, "task_outputs", None)
        if task_outputs is None and accepted == "logits" and getattr(outputs, "logits", None) is not None:
            task_outputs = {task: outputs.logits}  # SemanticSegmenterOutput of SAKForSemanticSegmentation
        if task_outputs is None and accepted == "predicted_depth":
            if getattr(outputs, "predicted_depth", None) is not None:  # DepthEstimatorOutput of SAKForDepthEstimation
                task_outputs = {task: outputs.predicted_depth[:, None]}
        if task_outputs is None and isinstance(outputs, dict) and not isinstance(outputs, ModelOutput):
            task_outputs = outputs
        if task_outputs is None:
            forms = "SAKForMultiTask outputs, a dict task -> (batch_size, channels, height, width) tensor" + {
                "logits": " or a SemanticSegmenterOutput",
                "predicted_depth": " or a DepthEstimatorOutput",
            }.get(accepted, "")
            raise ValueError(f"cannot read task '{task}' from a {type(outputs).__name__}; give {forms}")
        if task not in task_outputs:
            raise ValueError(f"the model outputs have no task '{task}'; they have {list(task_outputs)}")
        return task_outputs[task]

    def _derived_content_box(self, canvas: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where `preprocess` put an image of `target_size` (its original size) on `canvas`, by this processor's
        options: the resized size with `do_resize`, placed centred or top-left by `pad_mode` when `do_pad`."""
        options = self._call_options({})
        if not options["do_pad"]:
            return 0, 0, *canvas
        height, width = (options["size"]["height"], options["size"]["width"]) if options["do_resize"] else target_size
        if height > canvas[0] or width > canvas[1]:
            raise ValueError(
                f"target size {tuple(target_size)} does not fit the {canvas[0]}x{canvas[1]} outputs: without "
                "content_boxes, target_sizes must be the original image sizes (the processor's `original_sizes`); "
                "pass content_boxes to crop and resize to other sizes"
            )
        return _content_box(*canvas, height, width, options)

    def _restore(self, maps: torch.Tensor, index: int, target_sizes, content_boxes) -> torch.Tensor:
        """Crop image `index` out of the padded canvas and resize it to its target size: (C, H, W)."""
        prediction = maps[index : index + 1].float()
        target = tuple(int(v) for v in target_sizes[index]) if target_sizes is not None else None
        if content_boxes is not None:
            box = tuple(int(v) for v in content_boxes[index])
        elif target is not None:
            box = self._derived_content_box(tuple(prediction.shape[-2:]), target)
        else:
            box = None
        if box is not None:
            top, left, height, width = box
            prediction = prediction[..., top : top + height, left : left + width]
        if target is not None and tuple(prediction.shape[-2:]) != target:
            prediction = F.interpolate(prediction, size=target, mode="bilinear", align_corners=False)
        return prediction[0]

    def _per_image(
        self, outputs, task: str, target_sizes, content_boxes, accepted: str | None = None
    ) -> list[torch.Tensor]:
        maps = self._task_maps(outputs, task, accepted)
        for name, value in (("target_sizes", target_sizes), ("content_boxes", content_boxes)):
            if value is not None and len(value) != maps.shape[0]:
                raise ValueError(f"{name} has {len(value)} entries for a batch of {maps.shape[0]} images")
        return [self._restore(maps, i, target_sizes, content_boxes) for i in range(maps.shape[0])]

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "semseg"
    ) -> list[torch.Tensor]:
        """Class id map `(height, width)` (int64) per image: argmax over the logits (also for `human_parts`).

        Args:
            outputs: [`SAKForMultiTask`] outputs (or their `task_outputs` dict), or the `SemanticSegmenterOutput` of
                [`SAKForSemanticSegmentation`].
            target_sizes (`torch.Tensor` `(batch_size, 2)` or list of `(height, width)`, *optional*): the original
                image sizes (the processor's `original_sizes`); predictions come back at these sizes. None keeps the
                padded canvas.
            content_boxes (`torch.Tensor` `(batch_size, 4)`, *optional*): the processor's `content_boxes` (top, left,
                height, width). Without them the boxes are derived from `target_sizes` by this processor's padding
                rule (`pad_mode`, `pad_size`, `size_divisor`, `do_resize`/`size`), which gives the same result for
                images preprocessed with this processor's own options.
            task (`str`, *optional*, defaults to `"semseg"`): the task of a multi-task output.
        """
        maps = self._per_image(outputs, task, target_sizes, content_boxes, accepted="logits")
        return [m.argmax(dim=0) for m in maps]

    def post_process_depth_estimation(
        self, outputs, target_sizes=None, content_boxes=None, task: str = "depth"
    ) -> list[dict[str, torch.Tensor]]:
        """`{"predicted_depth": (height, width)}` per image, as transformers' depth processors: depth in metres,
        clamped to >= 0. Takes [`SAKForMultiTask`] outputs or the `DepthEstimatorOutput` of
        [`SAKForDepthEstimation`]; `target_sizes` and `content_boxes` as in `post_process_semantic_segmentation`."""
        maps = self._per_image(outputs, task, target_sizes, content_boxes, accepted="predicted_depth")
        return [{"predicted_depth": m[0].clamp(min=0)} for m in maps]

    def _depth_maps(self, *args, **kwargs) -> list[torch.Tensor]:
        return [result["predicted_depth"] for result in self.post_process_depth_estimation(*args, **kwargs)]

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
        """Every task of `outputs`, one dict task -> tensor per image: class ids `(H, W)`, depth `(H, W)` in metres,
        unit normals `(3, H, W)`, probabilities `(H, W)` (see the `post_process_*` methods; depth is the tensor of
        `post_process_depth_estimation`'s `"predicted_depth"`). A task outside the task table keeps its raw map."""
        by_post_processing = {  # the task table's (tasks_sak.TASKS) post-processing names
            "class_ids": self.post_process_semantic_segmentation,
            "depth": self._depth_maps,
            "unit_normals": self.post_process_surface_normals,
            "sigmoid": self.post_process_boundaries,
            "softmax": self.post_process_saliency,
        }
        task_outputs = getattr(outputs, "task_outputs", None)
        if task_outputs is None:
            task_outputs = outputs
        results = {}
        for task in task_outputs:
            if task in TASKS:
                post_process = by_post_processing[TASKS[task].post_processing]
                results[task] = post_process(task_outputs, target_sizes, content_boxes, task=task)
            else:
                results[task] = self._per_image(task_outputs, task, target_sizes, content_boxes)
        batch = next(iter(task_outputs.values())).shape[0]
        return [{task: values[i] for task, values in results.items()} for i in range(batch)]


def _canvas_size(height: int, width: int, options: dict) -> tuple[int, int]:
    """The padded canvas of a batch whose largest image is `height` x `width` (after resizing): at least
    `pad_size`, rounded up to a multiple of `size_divisor`; the images' own size without `do_pad`."""
    if not options["do_pad"]:
        return height, width
    divisor, pad = options["size_divisor"], options["pad_size"]
    return -(-max(height, pad["height"]) // divisor) * divisor, -(-max(width, pad["width"]) // divisor) * divisor


def _content_box(canvas_h: int, canvas_w: int, height: int, width: int, options: dict) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a `height` x `width` image on the canvas: centred or top-left by `pad_mode`."""
    if options["do_pad"] and options["pad_mode"] == "center":
        return (canvas_h - height) // 2, (canvas_w - width) // 2, height, width
    return 0, 0, height, width


__all__ = ["SAKImageProcessor"]
