"""The task table of SAK: each task's default loss, post-processing, main metric and its direction, and the paper's
task presets (output channels, loss weights, class names).

Every part of the package reads its task facts here and nowhere else: the config (presets, default losses), the image
processor (post-processing), the metrics (main metric, direction of Delta_m), the model card, the pictures and the
dataset schema. It imports only the standard library.

The file exists twice, byte for byte: `remote_code/tasks_sak.py`, which a checkpoint carries (the config and the
processor import it), and `evaluation/tasks_sak.py`, which the stand-alone `evaluate` module carries (evaluate copies
only files beside the module). Edit the first and copy it over the second: tests/test_architecture.py compares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


IGNORE_INDEX = 255  # the label value of unlabelled pixels, in every task (the reference's convention)


@dataclass(frozen=True)
class TaskSpec:
    """What the package knows of one task.

    Attributes:
        loss: default task loss (`configuration_sak.TASK_LOSS_TYPES`), when `task_loss_types` names none.
        post_processing: how a head's logits become a prediction (`SAKImageProcessor.post_process_multi_task`, the
            pictures): "class_ids" (argmax over channels), "depth" (clamped at 0), "unit_normals" (L2-normalised),
            "sigmoid" (probability of a one-channel map) or "softmax" (probability of class 1 of two channels).
        main_metric: the metric Delta_m and the results tables mark (a key of the task's metric).
        lower_is_better: the direction of `main_metric` (the sign of its Delta_m term).
        metric_name: how a model card names `main_metric`.
        hub_task_type: `task.type` of the task's model-index entry (one entry per task): the Hub pipeline task where
            one fits (image-segmentation, depth-estimation), otherwise the task's Papers-with-Code style name.
    """

    loss: str
    post_processing: str
    main_metric: str
    lower_is_better: bool
    metric_name: str
    hub_task_type: str


POST_PROCESSINGS = ("class_ids", "depth", "unit_normals", "sigmoid", "softmax")
TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec(
        loss="cross_entropy",
        post_processing="class_ids",
        main_metric="mIoU",
        lower_is_better=False,
        metric_name="mIoU",
        hub_task_type="image-segmentation",
    ),
    "human_parts": TaskSpec(
        loss="cross_entropy",
        post_processing="class_ids",
        main_metric="mIoU",
        lower_is_better=False,
        metric_name="mIoU",
        hub_task_type="human-part-segmentation",
    ),
    "depth": TaskSpec(
        loss="l1",
        post_processing="depth",
        main_metric="rmse",
        lower_is_better=True,
        metric_name="RMSE",
        hub_task_type="depth-estimation",
    ),
    "normals": TaskSpec(
        loss="normals_l1",
        post_processing="unit_normals",
        main_metric="mean",
        lower_is_better=True,
        metric_name="mean angular error",
        hub_task_type="surface-normal-estimation",
    ),
    "edge": TaskSpec(
        loss="balanced_bce",
        post_processing="sigmoid",
        main_metric="odsF",
        lower_is_better=False,
        metric_name="boundary odsF",
        hub_task_type="boundary-detection",
    ),
    "sal": TaskSpec(
        loss="balanced_cross_entropy",
        post_processing="softmax",
        main_metric="maxF",
        lower_is_better=False,
        metric_name="maxF",
        hub_task_type="saliency-detection",
    ),
}

NYUD_V2_CLASSES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)
PASCAL_CONTEXT_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# Task presets of the paper: output channels, loss weights and semantic class names, in the reference task order.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "nyud_v2": {
        "tasks": {"semseg": 40, "normals": 3, "edge": 1, "depth": 1},
        "task_loss_weights": {"semseg": 1.0, "normals": 10.0, "edge": 50.0, "depth": 1.0},
        "classes": NYUD_V2_CLASSES,
    },
    "pascal_context": {
        "tasks": {"semseg": 21, "human_parts": 7, "normals": 3, "edge": 1, "sal": 2},
        "task_loss_weights": {"semseg": 1.0, "human_parts": 2.0, "normals": 10.0, "edge": 50.0, "sal": 5.0},
        "classes": PASCAL_CONTEXT_CLASSES,
    },
}
