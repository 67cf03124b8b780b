"""Configuration of the SAK ("Swiss Army Knife", ICLR 2025) multi-task student."""

from __future__ import annotations

import copy
from typing import Any, Literal, get_args

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .tasks_sak import IGNORE_INDEX, TASK_PRESETS, TASKS


logger = logging.get_logger(__name__)

# Stem families whose architecture SAK rebuilds from the embedded transformers config (see `SAKStem`).
SUPPORTED_STEM_TYPES = ("vit", "dinov2", "dinov2_with_registers")

RouterType = Literal["mor", "none"]
DistillLossType = Literal["cos+l1", "cos", "l2"]
HeadImplementation = Literal["low_resolution", "plain"]
ROUTER_TYPES = get_args(RouterType)
DISTILL_LOSS_TYPES = get_args(DistillLossType)
HEAD_IMPLEMENTATIONS = get_args(HeadImplementation)

# Task losses (DESIGN section 2); a task's default is the task table's (`tasks_sak.TASKS`) when `task_loss_types`
# names none.
TASK_LOSS_TYPES = ("cross_entropy", "normals_l1", "balanced_bce", "l1", "balanced_cross_entropy")
DEFAULT_TASK_LOSS_TYPES = {task: spec.loss for task, spec in TASKS.items()}

# ViT-B/16 as in the reference stem (timm `vit_base_patch16_384`, LayerNorm eps 1e-6).
DEFAULT_STEM_CONFIG = {
    "model_type": "vit",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "patch_size": 16,
    "image_size": 384,
}


def default_out_indices(num_layers: int) -> list[int]:
    """Four evenly spaced 0-based block indices ending at the last block (12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23])."""
    if num_layers < 4 or num_layers % 4 != 0:
        raise ValueError(
            f"no default output levels for a network of {num_layers} blocks (the depth rule needs a multiple of 4); "
            "set `out_indices` explicitly, e.g. out_indices=[...] with one 0-based block index per level"
        )
    step = num_layers // 4
    return [step * (k + 1) - 1 for k in range(4)]


def _as_hw(value: Any, name: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name}={value!r} is not a size; give an int or [height, width]")
    if min(value) <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return list(value)


def _ordered(mapping: Any, name: str) -> Any:
    """Accept the on-disk form of an ordered mapping, a list of single-entry dicts, and return a dict.

    transformers writes config.json with sorted keys, so `teachers` and `tasks` are saved as lists to keep their
    order (the teacher order is the routers' expert order).
    """
    if isinstance(mapping, list | tuple):
        if not all(isinstance(entry, dict) and len(entry) == 1 for entry in mapping):
            raise ValueError(f"{name}={mapping!r} must be a mapping or a list of single-entry mappings")
        return {key: value for entry in mapping for key, value in entry.items()}
    return mapping


def normalize_teachers(teachers: Any) -> dict[str, dict[str, Any]]:
    """Turn `{name: width}` or `{name: {"hidden_size": width, ...}}` into the stored `{name: {...}}` form."""
    teachers = _ordered(teachers, "teachers")
    if teachers is None:
        return {}
    if not isinstance(teachers, dict):
        raise ValueError(
            f"teachers={teachers!r} must be an ordered mapping name -> hidden size or name -> "
            '{"hidden_size": int, "model_id": str, "out_indices": [...]}'
        )
    normalized = {}
    for name, spec in teachers.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"teacher name {name!r} must be a Python identifier (it names modules), e.g. 'dinov2'")
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = {"hidden_size": spec}
        if not isinstance(spec, dict) or "hidden_size" not in spec:
            raise ValueError(f"teacher '{name}': {spec!r} needs at least a hidden_size, e.g. {{'hidden_size': 768}}")
        spec = copy.deepcopy(spec)
        width = spec["hidden_size"]
        if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"teacher '{name}': hidden_size={width!r} must be a positive int")
        spec.setdefault("model_id", None)
        spec.setdefault("out_indices", None)
        normalized[name] = spec
    return normalized


class SAKConfig(PreTrainedConfig):
    r"""
    Configuration of [`SAKForMultiTask`], the SAK student: a Teacher-Agnostic Stem (a plain ViT), one
    Teacher-Specific Adapter Path per teacher, Mixture-of-Representations routers per (level, task) and one light
    decoder head per task.

    Args:
        stem_config (`dict` or `PreTrainedConfig`, *optional*):
            The transformers config of the stem (`ViTConfig`, `Dinov2Config` or `Dinov2WithRegistersConfig`). It is
            embedded so that a saved SAK never fetches its stem's architecture. Defaults to ViT-B/16 with LayerNorm
            eps 1e-6 (the reference stem). The stem's own `image_size` is ignored: `image_size` below sizes the
            position embedding.
        image_size (`int` or `[height, width]`, *optional*, defaults to `[448, 576]`):
            Training resolution. The stem's absolute position embedding has one entry per patch at this size; other
            input sizes interpolate it. Must be a multiple of the stem's patch size.
        out_indices (`list[int]`, *optional*):
            0-based stem block indices of the output levels. Defaults to four evenly spaced blocks ending at the
            last one (12 blocks: `[2, 5, 8, 11]`, 24: `[5, 11, 17, 23]`).
        teachers (`dict`, *optional*):
            Ordered teachers, `name -> hidden size` or `name -> {"hidden_size": int, "model_id": str | None,
            "out_indices": list | None}`. The order fixes the expert order of the routers (the stem first, then
            the teachers). `model_id` and `out_indices` are used by training only. An empty mapping gives the
            no-teacher multi-task baseline.
        down_ratio (`int`, *optional*, defaults to 4):
            Bottleneck ratio of the adapters (hidden width = stem width // down_ratio).
        use_aligners (`bool`, *optional*, defaults to `False`):
            Add a `Linear(stem width -> teacher width)` per (level, teacher) for the distillation loss. Required
            when a teacher's width differs from the stem's. Training-only: inference checkpoints drop them.
        router_type (`str`, *optional*, defaults to `"mor"`):
            `"mor"` mixes the stem and teacher-path features with per-image softmax weights; `"none"` adds them.
        noisy_gating (`bool`, *optional*, defaults to `True`):
            Noisy top-free gating of the MoR routers: Gaussian noise on the logits in training mode only.
        tasks (`dict` or `str`, *optional*, defaults to `"nyud_v2"`):
            Ordered `task -> output channels`, or a preset name: `"nyud_v2"` (semseg 40, normals 3, edge 1, depth 1)
            or `"pascal_context"` (semseg 21, human_parts 7, normals 3, edge 1, sal 2). `{}` gives a stage-1
            (distillation-only) student without routers and heads.
        task_loss_weights (`dict`, *optional*):
            `task -> weight`. Defaults to the preset's weights, or 1.0 for a task without one.
        task_loss_types (`dict`, *optional*):
            `task -> loss` for tasks whose name does not imply one; one of `"cross_entropy"`, `"normals_l1"`,
            `"balanced_bce"`, `"l1"`, `"balanced_cross_entropy"`.
        edge_pos_weight (`float`, *optional*, defaults to 0.95):
            `w` of the balanced binary cross entropy of boundaries.
        distill_loss_type (`str`, *optional*, defaults to `"cos+l1"`):
            `"cos+l1"` (0.9 cosine + 0.1 smooth L1), `"cos"` or `"l2"`.
        distill_alpha (`float`, *optional*, defaults to 1.0):
            Weight of the distillation total in the stage-2 loss.
        head_implementation (`str`, *optional*, defaults to `"low_resolution"`):
            How the task heads compute their bilinear resize + 3x3 conv: `"low_resolution"` on the patch grid
            (`fast_path_sak.resized_conv3x3`, about 1/11 of the FLOPs at ViT-B width) or `"plain"`, resize then conv
            as the reference code does. The same function, parameters and checkpoints either way (equal up to
            floating-point rounding).
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by every task loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialiser.

    Example:

    ```python
    >>> from modeling_sak import SAKConfig, SAKForMultiTask

    >>> config = SAKConfig(teachers={"dinov2": 768, "clip": 768, "sam": 768}, tasks="nyud_v2")
    >>> model = SAKForMultiTask(config)
    ```"""

    model_type = "sak"
    sub_configs_defaults = {
        "stem_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs=DEFAULT_STEM_CONFIG)
    }

    stem_config: dict | PreTrainedConfig | None = None
    image_size: int | list[int] | tuple[int, int] = (448, 576)
    out_indices: list[int] | tuple[int, ...] | None = None
    teachers: dict[str, int | dict[str, Any]] | list[dict[str, Any]] | None = None
    down_ratio: int = 4
    use_aligners: bool = False
    router_type: RouterType = "mor"
    noisy_gating: bool = True
    tasks: dict[str, int] | list[dict[str, int]] | str | None = "nyud_v2"
    task_loss_weights: dict[str, float] | None = None
    task_loss_types: dict[str, str] | None = None
    edge_pos_weight: float = 0.95
    distill_loss_type: DistillLossType = "cos+l1"
    distill_alpha: float = 1.0
    head_implementation: HeadImplementation = "low_resolution"
    semantic_loss_ignore_index: int = IGNORE_INDEX
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if isinstance(self.stem_config, dict):
            self.stem_config = dict(self.stem_config)
            self.stem_config.setdefault("model_type", "vit")
        self.tasks = _ordered(self.tasks, "tasks")
        labels_given = self.id2label is not None or kwargs.get("id2label") is not None or "num_labels" in kwargs
        if self.tasks is None or isinstance(self.tasks, str):
            preset_name = self.tasks or "nyud_v2"
            if preset_name not in TASK_PRESETS:
                raise ValueError(
                    f"tasks={preset_name!r} is not a preset; use one of {sorted(TASK_PRESETS)} or a mapping "
                    "task -> output channels, e.g. {'semseg': 40, 'depth': 1}"
                )
            preset = TASK_PRESETS[preset_name]
            self.tasks = dict(preset["tasks"])
            if self.task_loss_weights is None:
                self.task_loss_weights = dict(preset["task_loss_weights"])
            if self.id2label is None and kwargs.get("id2label") is None:
                self.id2label = dict(enumerate(preset["classes"]))
        super().__post_init__(**kwargs)
        if self.id2label is not None and self.label2id is None:
            self.label2id = {label: idx for idx, label in self.id2label.items()}
        self.image_size = _as_hw(self.image_size, "image_size")
        self.teachers = normalize_teachers(self.teachers)
        self.tasks = dict(self.tasks)
        if not labels_given and "semseg" in self.tasks:  # one name per class: the segmentation pipeline looks them up
            self.num_labels = self.tasks["semseg"]
        self.task_loss_weights = {task: 1.0 for task in self.tasks} | dict(self.task_loss_weights or {})
        self.task_loss_types = {
            task: DEFAULT_TASK_LOSS_TYPES[task] for task in self.tasks if task in DEFAULT_TASK_LOSS_TYPES
        } | dict(self.task_loss_types or {})
        if self.out_indices is None:
            self.out_indices = default_out_indices(self.stem_config.num_hidden_layers)
        self.out_indices = list(self.out_indices)
        self.validate()

    def validate(self) -> None:
        """Check every field together; a `ValueError` names the bad value and the fix. Runs at construction and
        again in `save_pretrained`, after transformers' own checks."""
        super().validate()
        stem = self.stem_config
        if stem.model_type not in SUPPORTED_STEM_TYPES:
            raise ValueError(
                f"stem_config.model_type={stem.model_type!r} is not a supported stem; use one of "
                f"{list(SUPPORTED_STEM_TYPES)} (e.g. a ViTConfig or Dinov2Config)"
            )
        if getattr(stem, "use_swiglu_ffn", False):
            raise ValueError(
                "stem_config.use_swiglu_ffn=True (DINOv2-giant) is not supported; pick a DINOv2 ViT-S/B/L"
            )
        width, heads = stem.hidden_size, stem.num_attention_heads
        if width % heads != 0:
            raise ValueError(f"stem hidden_size {width} is not divisible by num_attention_heads {heads}")
        patch = _as_hw(stem.patch_size, "stem_config.patch_size")
        for size, p, name in zip(self.image_size, patch, ("height", "width")):
            if size % p != 0:
                raise ValueError(
                    f"image_size {name} {size} is not a multiple of the stem patch size {p}; "
                    f"use {size // p * p or p} or {(size // p + 1) * p}"
                )
        depth = stem.num_hidden_layers
        if not self.out_indices:
            raise ValueError("out_indices is empty; give at least one 0-based stem block index")
        if any(not isinstance(i, int) or not 0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices={self.out_indices} must be 0-based block indices in [0, {depth - 1}]")
        if sorted(set(self.out_indices)) != self.out_indices:
            raise ValueError(f"out_indices={self.out_indices} must be strictly increasing")
        if not isinstance(self.down_ratio, int) or self.down_ratio <= 0 or width // self.down_ratio == 0:
            raise ValueError(f"down_ratio={self.down_ratio!r} must be a positive int at most the stem width {width}")
        classes = self.tasks.get("semseg")
        if classes is not None and self.id2label is not None and len(self.id2label) != classes:
            raise ValueError(
                f"id2label has {len(self.id2label)} names but tasks['semseg'] has {classes} classes; give one name "
                "per class (0-based ids) or leave id2label out for LABEL_0 ... names"
            )
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type={self.router_type!r} is not one of {list(ROUTER_TYPES)}")
        if self.head_implementation not in HEAD_IMPLEMENTATIONS:
            raise ValueError(
                f"head_implementation={self.head_implementation!r} is not one of {list(HEAD_IMPLEMENTATIONS)}"
            )
        if self.distill_loss_type not in DISTILL_LOSS_TYPES:
            raise ValueError(f"distill_loss_type={self.distill_loss_type!r} is not one of {list(DISTILL_LOSS_TYPES)}")
        if not self.use_aligners:
            for name, spec in self.teachers.items():
                if spec["hidden_size"] != width:
                    raise ValueError(
                        f"teacher '{name}': hidden_size {spec['hidden_size']} != stem width {width}; "
                        f"set use_aligners=True or pick a teacher of width {width}"
                    )
        if not self.tasks and not self.teachers:
            raise ValueError(
                "a SAK needs tasks, teachers or both; give tasks (e.g. 'nyud_v2') and/or teachers. "
                "tasks={} alone describes a stage-1 (distillation-only) student"
            )
        for task, channels in self.tasks.items():
            if not isinstance(task, str) or not task.isidentifier():
                raise ValueError(f"task name {task!r} must be a Python identifier (it names modules)")
            if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
                raise ValueError(f"task '{task}': output channels {channels!r} must be a positive int")
            loss_type = self.task_loss_types.get(task)
            if loss_type is None:
                raise ValueError(
                    f"task '{task}' has no default loss; set task_loss_types={{'{task}': ...}} to one of "
                    f"{list(TASK_LOSS_TYPES)}"
                )
            if loss_type not in TASK_LOSS_TYPES:
                raise ValueError(f"task_loss_types['{task}']={loss_type!r} is not one of {list(TASK_LOSS_TYPES)}")
        for name, mapping in (
            ("task_loss_weights", self.task_loss_weights),
            ("task_loss_types", self.task_loss_types),
        ):
            unknown = sorted(set(mapping) - set(self.tasks))
            if unknown:
                raise ValueError(f"{name} names unknown tasks {unknown}; the tasks are {list(self.tasks)}")
        for task, weight in self.task_loss_weights.items():
            if not isinstance(weight, int | float) or weight < 0:
                raise ValueError(f"task_loss_weights['{task}']={weight!r} must be a non-negative number")
        if not 0.0 < self.edge_pos_weight < 1.0:
            raise ValueError(f"edge_pos_weight={self.edge_pos_weight} must lie strictly between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        """Serialise; `teachers` and `tasks` become lists of single-entry dicts so that their order survives JSON."""
        output = super().to_dict()
        for key in ("teachers", "tasks"):
            if isinstance(output.get(key), dict):
                output[key] = [{name: value} for name, value in output[key].items()]
        return output

    @property
    def hidden_size(self) -> int:
        """Width C of the stem (and of every adapter path and router input)."""
        return self.stem_config.hidden_size

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size (height, width) of the stem."""
        return tuple(_as_hw(self.stem_config.patch_size, "stem_config.patch_size"))

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens of the stem."""
        return 1 + getattr(self.stem_config, "num_register_tokens", 0)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (h, w) of the training resolution, the size of the position embedding."""
        patch = self.patch_size
        return (self.image_size[0] // patch[0], self.image_size[1] // patch[1])

    @property
    def teacher_names(self) -> list[str]:
        """Teachers in expert order."""
        return list(self.teachers)

    @property
    def num_experts(self) -> int:
        """Router experts: the stem feature plus one per teacher."""
        return 1 + len(self.teachers)


__all__ = ["SAKConfig"]
