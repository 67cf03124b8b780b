"""The "sak-multi-task" pipeline: every task of a SAK checkpoint from one call, in transformers' output formats.

Every checkpoint saved by `SAKForMultiTask.save_pretrained` carries this file and names it in its config's
`custom_pipelines`, so `pipeline("sak-multi-task", model=path_or_repo, trust_remote_code=True)` (or `pipeline(model=...,
trust_remote_code=True)`, the checkpoint's only custom pipeline) builds it where this package is not installed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.utils import requires_backends

from .tasks_sak import TASKS


try:
    from PIL import Image, ImageOps
except ImportError:  # pragma: no cover - PIL is a transformers vision dependency
    Image = ImageOps = None


PIPELINE_TASK = "sak-multi-task"
# What a task's result is called in the pipeline's output: `predicted_{name}` (a tensor) and `{name}` (a PIL image).
MAP_NAMES = {"depth": "depth", "normals": "normals", "edge": "boundaries", "sal": "saliency"}
TASK_PREFIX = "task_outputs."  # the keys of the task outputs between `_forward` and `postprocess`
ROUTER_PREFIX = "router_weights."  # the MoR router weights, likewise


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of a SAK config: what `Pipeline.save_pretrained` writes for this pipeline once
    registered with `PIPELINE_REGISTRY` (task -> implementation `module.Class`, model auto classes, input type)."""
    module = __name__.rsplit(".", 1)[-1]
    return {PIPELINE_TASK: {"impl": f"{module}.SAKMultiTaskPipeline", "pt": ["AutoModel"], "type": "image"}}


def _probability_image(probability: torch.Tensor) -> Image.Image:
    return Image.fromarray((probability.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")


def _depth_image(depth: torch.Tensor) -> Image.Image:
    """Depth scaled to 0..255 over its own range, as transformers' "depth-estimation" pipeline draws it."""
    depth = depth.detach().cpu().numpy()
    span = depth.max() - depth.min()
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    return Image.fromarray((scaled * 255).astype("uint8"))


class SAKMultiTaskPipeline(Pipeline):
    r"""
    Predicts every task of a SAK model for each image in one forward pass, and returns per image a dict task ->
    result, each in the format of the matching transformers pipeline, at the image's original size:

    - `semseg`, `human_parts`: a list of `{"score": None, "label": str, "mask": PIL.Image}`, one binary mask (mode
      `L`, 0/255) per class present, as the "image-segmentation" pipeline gives (semseg labels from
      `model.config.id2label`, other class ids as strings).
    - `depth`: `{"predicted_depth": torch.Tensor (height, width) in metres, "depth": PIL.Image}`, as the
      "depth-estimation" pipeline gives (the picture is the depth scaled over its own range).
    - `normals`: `{"predicted_normals": torch.Tensor (3, height, width) unit normals, "normals": PIL.Image}` (RGB =
      (normal + 1) / 2).
    - `edge`: `{"predicted_boundaries": torch.Tensor (height, width), "boundaries": PIL.Image}` (boundary
      probability); `sal`: `{"predicted_saliency": ..., "saliency": ...}` (saliency probability).

    The tensors are exactly the image processor's `post_process_multi_task` on the model's outputs. The images are
    normalised and padded by the checkpoint's [`SAKImageProcessor`], one image per forward pass.

    Example:

    ```python
    >>> from transformers import pipeline

    >>> sak = pipeline("sak-multi-task", model="org/sak-vitb-nyud", trust_remote_code=True)
    >>> result = sak("room.jpg")
    >>> result["depth"]["predicted_depth"].shape, [segment["label"] for segment in result["semseg"]][:3]
    ```

    Call arguments: `tasks` (a list of task names, default all of the model's), `timeout` (for image URLs),
    `return_router_weights` (default False: adds `"router_weights"`, task -> `(levels, 1 + teachers)` tensor of the
    MoR routers' weights, the stem's path first, then `config.teachers` in order; absent for a model without routers).
    Raises a `ValueError` for a model without task heads (a stage-1 student: use "image-feature-extraction").
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        requires_backends(self, "vision")
        if not getattr(self.model.config, "tasks", None):
            raise ValueError(
                f"the {PIPELINE_TASK} pipeline needs a SAK model with task heads; this one has none (a stage-1, "
                'distillation-only student): use pipeline("image-feature-extraction", ...) for its features'
            )

    def _sanitize_parameters(
        self,
        tasks: list[str] | None = None,
        timeout: float | None = None,
        return_router_weights: bool | None = None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"unknown {PIPELINE_TASK} pipeline arguments {sorted(kwargs)}; it takes tasks, timeout, "
                "return_router_weights"
            )
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        postprocess_params = {}
        if return_router_weights is not None:
            postprocess_params["return_router_weights"] = bool(return_router_weights)
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else list(tasks)
            unknown = [task for task in tasks if task not in self.model.config.tasks]
            if unknown:
                raise ValueError(
                    f"tasks {unknown} are not tasks of this model; it has {list(self.model.config.tasks)}"
                )
            postprocess_params["tasks"] = tasks
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout: float | None = None) -> dict[str, torch.Tensor]:
        # transformers' load_image converts every image to RGB, which would turn a 16-bit depth map into a clipped
        # photo: PIL images and local files reach the processor as they are, so its photo rules apply
        # (image_io_sak); URLs and base64 strings go through load_image.
        if isinstance(image, str) and os.path.isfile(image):
            opened = Image.open(image)
            image = ImageOps.exif_transpose(opened) or opened
        elif not isinstance(image, Image.Image):
            image = load_image(image, timeout=timeout)
        return self.image_processor(images=[image], return_tensors="pt").to(self.dtype)

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        if getattr(outputs, "task_outputs", None) is None:
            raise ValueError(
                f"the {PIPELINE_TASK} pipeline needs SAKForMultiTask outputs, got a {type(outputs).__name__} from "
                f"{type(self.model).__name__}; load the model with AutoModel"
            )
        # A flat dict of batched tensors: what the pipeline's iterator splits into single images with batch_size > 1.
        return {
            **{f"{TASK_PREFIX}{task}": value for task, value in outputs.task_outputs.items()},
            **{f"{ROUTER_PREFIX}{task}": value for task, value in (outputs.router_weights or {}).items()},
            "original_sizes": model_inputs["original_sizes"],
            "content_boxes": model_inputs["content_boxes"],
        }

    def postprocess(
        self, model_outputs: dict[str, Any], tasks: list[str] | None = None, return_router_weights: bool = False
    ) -> dict[str, Any]:
        task_outputs = {
            key.removeprefix(TASK_PREFIX): value.float()
            for key, value in model_outputs.items()
            if key.startswith(TASK_PREFIX)
        }
        predictions = self.image_processor.post_process_multi_task(
            task_outputs, model_outputs["original_sizes"], model_outputs["content_boxes"]
        )[0]
        result = {task: self._format(task, predictions[task]) for task in (tasks or predictions)}
        routers = {
            key.removeprefix(ROUTER_PREFIX): value[0].float()
            for key, value in model_outputs.items()
            if return_router_weights and key.startswith(ROUTER_PREFIX)
        }
        if routers:
            result["router_weights"] = {task: routers[task] for task in (tasks or routers)}
        return result

    def _format(self, task: str, prediction: torch.Tensor) -> Any:
        kind = TASKS[task].post_processing if task in TASKS else None
        if kind == "class_ids":
            return self._segments(task, prediction)
        name = MAP_NAMES.get(task, task)
        if kind == "depth":
            picture = _depth_image(prediction)
        elif kind == "unit_normals":
            picture = Image.fromarray(
                ((prediction + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            )
        elif kind in ("sigmoid", "softmax"):
            picture = _probability_image(prediction)
        else:  # a task outside the task table: its raw map
            return {f"predicted_{name}": prediction}
        return {f"predicted_{name}": prediction, name: picture}

    def _segments(self, task: str, class_ids: torch.Tensor) -> list[dict[str, Any]]:
        """One binary mask per class present, as transformers' "image-segmentation" pipeline (semantic subtask)."""
        id2label = self.model.config.id2label if task == "semseg" else {}
        segmentation = class_ids.numpy()
        segments = []
        for class_id in np.unique(segmentation):
            mask = Image.fromarray(((segmentation == class_id) * 255).astype(np.uint8), mode="L")
            segments.append({"score": None, "label": id2label.get(int(class_id), str(class_id)), "mask": mask})
        return segments


__all__ = ["PIPELINE_TASK", "SAKMultiTaskPipeline", "custom_pipelines"]
