"""The frozen teacher committee of SAK: vision foundation models producing the distillation targets.

    model = from_stem_and_teachers("google/vit-base-patch16-384", {"dinov2": "facebook/dinov2-base", ...})
    teachers = SAKTeachers.from_config(model.config, dtype=torch.bfloat16)
    teacher_features = teachers(pixel_values)   # {teacher: [4 maps (B, C_t, h_t, w_t)]}
    loss = model(pixel_values, labels=labels, teacher_features=teacher_features).loss

Training code only: the student never imports this module, and teachers are never part of its state dict.

A teacher is a transformers model (Hub id or folder) or, with the optional `timm` extra, a timm model
(`timm/NAME.TAG`, `timm:NAME.TAG`, `hf-hub:ORG/NAME`, `local-dir:PATH` or a folder saved by timm; see
`modeling_sak.teachers.timm_teachers`). Both give the targets the reference's teachers give (docs/teachers.md).

Over 500 lines on purpose: one concept, the committee (resolving teacher specs and the student config they imply,
each family's input, position and output rules, the committee itself and its feature cache), kept in one place.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers.utils import logging

from ..remote_code.configuration_sak import DEFAULT_STEM_CONFIG, SAKConfig
from ..remote_code.modeling_sak import SAKForMultiTask
from .base import FrozenTeacher, sam_resize_and_pad
from .fast_path import FAST_PATH_FAMILIES, block_outputs


logger = logging.get_logger(__name__)

# Families with a dedicated vision tower: model types of full and vision-only configs -> family.
FAMILIES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "sam": "sam",
    "sam_vision_model": "sam",
    "vit": "vit",
}
# How a teacher's absolute position embedding goes from its saved grid to the input's grid:
# - "bicubic_antialias": timm's `resample_abs_pos_embed` (bicubic, antialias=True, in float32), what timm does when
#   the reference builds a timm teacher at its `img_size`;
# - "bicubic": the same without antialias (timm's `resize_pos_embed`, transformers' own SigLIP/DeiT rule);
# - "transformers": the model's own run-time `interpolate_pos_encoding` (square saved grids only).
POSITION_INTERPOLATIONS = ("bicubic_antialias", "bicubic", "transformers")
# The reference's rule per family (models/backbones/timm_encoders.py and hf_encoders.py): DINOv2, CLIP (OpenAI and
# timm's) and ViT teachers are timm models built at the input size; SigLIP is transformers' SiglipVisionModel with
# interpolate_pos_encoding=True; SAM runs at its native size. Other models: the bicubic rule from their true grid.
FAMILY_POSITION_INTERPOLATION = {
    "dinov2": "bicubic_antialias",
    "clip": "bicubic_antialias",
    "vit": "bicubic_antialias",
    "siglip": "bicubic",
    "auto": "bicubic",
}
# Families whose transformers vision embeddings can only be built for a square image_size.
SQUARE_ONLY_FAMILIES = ("clip", "siglip", "sam")
# Per-teacher options a config / recipe may give besides model_id and hidden_size.
TEACHER_OPTIONS = ("out_indices", "position_interpolation", "config_overrides")


def vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision tower's config of a full CLIP/SigLIP/SAM config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def teacher_family(config: PreTrainedConfig) -> str:
    """`dinov2`, `clip`, `siglip`, `sam`, `vit`, or `auto` for any other model returning hidden states."""
    return FAMILIES.get(config.model_type, "auto")


def is_timm_model_id(model_id: str) -> bool:
    """True for the ids the timm path takes (see `modeling_sak.teachers.timm_teachers`), checked without importing timm."""
    from .timm_teachers import is_timm_model_id as check

    return check(model_id)


def load_teacher_config(name: str, model_id: str, **hub_kwargs) -> PreTrainedConfig:
    """Read a teacher's config (no weights); a clear error when it is neither cached nor reachable."""
    try:
        return AutoConfig.from_pretrained(model_id, **hub_kwargs)
    except (OSError, ValueError) as error:
        raise OSError(
            f"teacher '{name}': cannot load the config of {model_id!r} ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0]}). Offline (HF_HUB_OFFLINE=1) only cached or local models load: download it "
            f"once with `hf download {model_id}` or set the teacher's model_id to a local folder"
        ) from error


def teacher_spec(name: str, spec: str | dict[str, Any]) -> dict[str, Any]:
    """A recipe's teacher entry (`"ORG/NAME"` or `{"model_id": ..., **options}`) as a checked dict."""
    if isinstance(spec, str | Path):
        spec = {"model_id": str(spec)}
    if not isinstance(spec, dict) or not spec.get("model_id"):
        raise ValueError(
            f"teacher '{name}': {spec!r} must be a Hub id / folder or a mapping with a model_id, e.g. "
            "{'model_id': 'facebook/sam-vit-base', 'config_overrides': {'layer_norm_eps': 1e-5}}"
        )
    unknown = sorted(set(spec) - {"model_id", "hidden_size", *TEACHER_OPTIONS})
    if unknown:
        raise ValueError(f"teacher '{name}': unknown options {unknown}; known: model_id, {', '.join(TEACHER_OPTIONS)}")
    return dict(spec)


def teacher_widths(model_ids: dict[str, str | dict[str, Any]], **hub_kwargs) -> dict[str, dict[str, Any]]:
    """`{name: {"hidden_size", "num_hidden_layers", "model_id", **options}}` from the teachers' configs, no weights.

    `model_ids` maps each name to a Hub id / folder or to `{"model_id": ..., **options}` (`TEACHER_OPTIONS`).
    """
    specs = {}
    for name, entry in model_ids.items():
        spec = teacher_spec(name, entry)
        if is_timm_model_id(spec["model_id"]):
            from .timm_teachers import timm_teacher_shape

            shape = timm_teacher_shape(name, spec["model_id"], **hub_kwargs)
        else:
            vision = vision_config_of(load_teacher_config(name, spec["model_id"], **hub_kwargs))
            shape = {"hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_hidden_layers}
        specs[name] = {**spec, **shape}
    return specs


def teacher_specs(model_ids: dict[str, str | dict[str, Any]], **hub_kwargs) -> dict[str, dict[str, Any]]:
    """`SAKConfig.teachers` entries `{name: {"hidden_size", "model_id", **options}}` for recipe teacher entries."""
    return {
        name: {key: value for key, value in spec.items() if key != "num_hidden_layers"}
        for name, spec in teacher_widths(model_ids, **hub_kwargs).items()
    }


def student_config(
    stem_config: PreTrainedConfig | dict[str, Any] | None,
    teachers: dict[str, str | dict[str, Any]] | None,
    hub_kwargs: dict[str, Any] | None = None,
    **config_kwargs,
) -> SAKConfig:
    """The `SAKConfig` of a new student of `stem_config` distilling `teachers`.

    `teachers` maps each name to a Hub id / folder or to `{"model_id": ..., **options}` (`TEACHER_OPTIONS`); their
    widths come from their configs (no weights are read, `hub_kwargs` go to those reads) and the specs keep each
    teacher's options; None or `{}` gives the no-teacher baseline. Aligners are switched on when a teacher's width
    differs from the stem's (default stem: ViT-B/16). `config_kwargs` are the other `SAKConfig` fields (image_size,
    tasks, router_type, ...).
    """
    stem = stem_config.to_dict() if isinstance(stem_config, PreTrainedConfig) else dict(stem_config or {})
    stem = stem or dict(DEFAULT_STEM_CONFIG)
    specs = teacher_specs(teachers, **(hub_kwargs or {})) if teachers else {}
    width = stem.get("hidden_size", DEFAULT_STEM_CONFIG["hidden_size"])
    wider = [name for name, spec in specs.items() if spec["hidden_size"] != width]
    if wider and not config_kwargs.get("use_aligners", False):
        logger.info(f"teachers {wider} are not {width} wide like the stem: switching aligners on")
        config_kwargs["use_aligners"] = True
    return SAKConfig(stem_config=stem, teachers=specs, **config_kwargs)


def from_stem_and_teachers(
    stem_name_or_path: str, teachers: dict[str, str | dict[str, Any]], **config_kwargs
) -> SAKForMultiTask:
    """A NEW student whose stem starts from a transformers ViT / DINOv2 checkpoint, configured for `teachers` by
    [`student_config`], e.g. `from_stem_and_teachers("google/vit-base-patch16-384", {"dinov2": "facebook/dinov2-base",
    "clip": "openai/clip-vit-base-patch16", "sam": "facebook/sam-vit-base"})`. `revision`, `cache_dir` and `token`
    apply to every config and weight read; the other `config_kwargs` are `SAKConfig` fields. Load the committee with
    `SAKTeachers.from_config(model.config)`.
    """
    hub_kwargs = {k: config_kwargs.pop(k) for k in ("revision", "cache_dir", "token") if k in config_kwargs}
    stem = AutoConfig.from_pretrained(stem_name_or_path, **hub_kwargs)
    config = student_config(stem, teachers, hub_kwargs=hub_kwargs, **config_kwargs)
    return SAKForMultiTask.from_stem_pretrained(stem_name_or_path, config=config, **hub_kwargs)


def resample_position_embeddings(
    table: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int, antialias: bool
) -> torch.Tensor:
    """A `(1, prefix + h * w, C)` position table resampled from `old_grid` to `new_grid` (bicubic, in float32).

    The arithmetic of timm's `resample_abs_pos_embed` (with `antialias`) and `resize_pos_embed` (without): prefix
    (class) positions kept, grid positions resized as an image, the result cast back to the table's dtype.
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dim = table.shape[-1]
    grid = grid.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(table.dtype)
    return torch.cat([prefix, grid], dim=1)


def _embeddings_module(model: nn.Module) -> nn.Module | None:
    """The patch + position embeddings module of a transformers ViT-like model (`embeddings` or
    `vision_model.embeddings`), if it has a run-time `interpolate_pos_encoding` we can stand in for."""
    embeddings = getattr(getattr(model, "vision_model", model), "embeddings", None)
    return embeddings if callable(getattr(embeddings, "interpolate_pos_encoding", None)) else None


def _position_table(embeddings: nn.Module) -> torch.Tensor | None:
    """The learned absolute position table as `(1, tokens, C)`: DINOv2/ViT/DeiT's `position_embeddings` parameter or
    CLIP/SigLIP's `position_embedding` nn.Embedding; None for any other layout."""
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, nn.Parameter) and table.dim() == 3:
        return table
    table = getattr(embeddings, "position_embedding", None)
    if isinstance(table, nn.Embedding):
        return table.weight.unsqueeze(0)
    return None


class ResampledPositionEmbeddings:
    """Stands in for a transformers embeddings module's `interpolate_pos_encoding(embeddings, height, width)`: the
    position table resampled from the SAVED grid (which may be non-square) to the input's grid with one rule, computed
    once per input grid and cached (teachers are frozen; the cache is keyed by grid, device and dtype)."""

    MAX_CACHED = 16

    def __init__(self, embeddings: nn.Module, saved_grid: tuple[int, int], patch_size: tuple[int, int], rule: str):
        self.embeddings, self.saved_grid, self.patch_size = embeddings, saved_grid, patch_size
        self.antialias = rule == "bicubic_antialias"
        table = _position_table(embeddings)
        self.num_prefix_tokens = table.shape[1] - saved_grid[0] * saved_grid[1]
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        table = _position_table(self.embeddings)
        grid = (int(height) // self.patch_size[0], int(width) // self.patch_size[1])
        key = (grid, table.device, table.dtype)
        if key not in self.cache:
            if len(self.cache) >= self.MAX_CACHED:
                self.cache.clear()
            # An ordinary tensor even when first asked under inference_mode, so it can be reused anywhere.
            with torch.inference_mode(False), torch.no_grad():
                self.cache[key] = resample_position_embeddings(
                    table.detach(), self.saved_grid, grid, self.num_prefix_tokens, self.antialias
                ).clone()
        return self.cache[key]


class SAKTeacher(FrozenTeacher):
    """One frozen transformers teacher: its model plus the input and output handling of its family.

    Position embeddings follow `position_interpolation` (default: the reference's rule for the family, see
    `FAMILY_POSITION_INTERPOLATION`), resampled from the saved grid, square or not, and cached per input grid.

    With `fast_path=True` (the default; an attribute that may be switched at any time) a DINOv2, CLIP, SigLIP, ViT
    or SAM teacher runs only the blocks its levels need, SAM's attention without materialising its relative-position
    bias (`modeling_sak.teachers.fast_path`); the maps equal transformers' own forward (`fast_path=False`) up to float
    rounding. Other models always run transformers' forward.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        family: str,
        out_indices: Sequence[int] | None,
        renormalize: bool = False,
        mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
        position_interpolation: str | None = None,
        model_id: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        fast_path: bool = True,
    ):
        vision = vision_config_of(model.config)
        model_id = model_id or getattr(model.config, "_name_or_path", "") or None
        super().__init__(
            name,
            model,
            family,
            vision.hidden_size,
            vision.num_hidden_layers,
            out_indices,
            renormalize,
            mean_std,
            model_id,
        )
        self.config_overrides = dict(config_overrides or {})
        self.fast_path = fast_path
        patch = getattr(vision, "patch_size", None)
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch) if patch else None
        image_size = getattr(vision, "image_size", None)
        self.image_size = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size or ()) or None
        if family == "sam":
            self.sam_size = self.image_size[0]
        self.position_interpolation = self._set_up_positions(position_interpolation)

    def _set_up_positions(self, requested: str | None) -> str | None:
        """Install the position rule; returns it (None for SAM, which always runs at its native size)."""
        if requested is not None and requested not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"teacher '{self.name}': position_interpolation={requested!r} is not one of {POSITION_INTERPOLATIONS}"
            )
        accepts = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self._interpolate_kwargs = {"interpolate_pos_encoding": True} if accepts else {}
        if self.family == "sam":
            return None  # the input is resized and padded to the native size: no resampling
        rule = requested or FAMILY_POSITION_INTERPOLATION[self.family]
        embeddings = _embeddings_module(self.model)
        table = _position_table(embeddings) if embeddings is not None else None
        grid = None
        if self.image_size and self.patch_size:
            grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        usable = table is not None and grid is not None and table.shape[1] >= grid[0] * grid[1]
        if rule != "transformers" and not usable:
            if requested is not None:
                raise ValueError(
                    f"teacher '{self.name}' ({type(self.model).__name__}): position_interpolation={rule!r} needs a "
                    "learned absolute position table and a patch grid; use 'transformers' for this model"
                )
            rule = "transformers"
        if rule != "transformers":
            embeddings.interpolate_pos_encoding = ResampledPositionEmbeddings(embeddings, grid, self.patch_size, rule)
        elif requested == "transformers" and self.image_size and self.image_size[0] != self.image_size[1]:
            raise ValueError(self._square_grid_message())
        return rule

    def _square_grid_message(self) -> str:
        return (
            f"teacher '{self.name}': transformers' run-time interpolate_pos_encoding assumes a square saved grid, but "
            f"this model was saved with image_size {list(self.image_size)}; use position_interpolation "
            "'bicubic_antialias' or 'bicubic' (resampled from the true grid) or save it with a square image_size"
        )

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states at `out_indices` as float32 `(B, C_t, h_t, w_t)` maps, prefix/register tokens removed."""
        inputs = self.prepare_inputs(pixel_values)
        kwargs = self._interpolate_kwargs
        if self.position_interpolation == "transformers":
            kwargs = kwargs if tuple(inputs.shape[-2:]) != self.image_size else {}  # transformers asks only off size
            if kwargs and self.image_size and self.image_size[0] != self.image_size[1]:
                raise ValueError(self._square_grid_message())
        if self.uses_fast_path:
            levels = block_outputs(self.model, self.family, inputs, self.out_indices, **kwargs)
            return [self._to_map(hidden, inputs.shape[-2:]) for hidden in levels]
        outputs = self.model(pixel_values=inputs, output_hidden_states=True, **kwargs)
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(
                f"teacher '{self.name}' ({type(self.model).__name__}) returned no hidden_states; pick a model that "
                "supports output_hidden_states=True (DINOv2, CLIP, SigLIP, SAM, ViT, ...)"
            )
        return [self._to_map(hidden_states[i + 1], inputs.shape[-2:]) for i in self.out_indices]

    @property
    def uses_fast_path(self) -> bool:
        """Whether `forward` takes the fast path: `fast_path` is on and the family is one it knows."""
        return bool(self.fast_path) and self.family in FAST_PATH_FAMILIES

    def _to_map(self, hidden: torch.Tensor, input_size: torch.Size) -> torch.Tensor:
        if hidden.dim() == 4:  # SAM: (B, h, w, C); convolutional models: (B, C, h, w)
            return (hidden.permute(0, 3, 1, 2) if hidden.shape[-1] == self.hidden_size else hidden).float()
        if self.patch_size is None:
            raise ValueError(
                f"teacher '{self.name}': cannot tell its patch grid (no patch_size in its config); "
                "use a ViT-family model"
            )
        grid = (input_size[0] // self.patch_size[0], input_size[1] // self.patch_size[1])
        prefix = hidden.shape[1] - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"teacher '{self.name}': {hidden.shape[1]} tokens do not cover a {grid} patch grid")
        patches = hidden[:, prefix:]
        return patches.transpose(1, 2).reshape(hidden.shape[0], -1, *grid).float()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "position_interpolation": self.position_interpolation,
            "config_overrides": self.config_overrides,
            "fast_path": self.uses_fast_path,
        }


def _model_class(family: str):
    if family == "clip":
        from transformers import CLIPVisionModel

        return CLIPVisionModel
    if family == "siglip":
        from transformers import SiglipVisionModel

        return SiglipVisionModel
    if family == "sam":
        from transformers import SamVisionModel

        return SamVisionModel
    return AutoModel


def _check_saved_grid(name: str, model_id: str, family: str, vision: PreTrainedConfig) -> None:
    """transformers builds CLIP, SigLIP and SAM vision towers for a square int image_size only: a square list is
    turned into its int, a non-square one refused here, by name, instead of failing inside transformers."""
    size = getattr(vision, "image_size", None)
    if family not in SQUARE_ONLY_FAMILIES or not isinstance(size, list | tuple):
        return
    if len(size) == 2 and size[0] == size[1]:
        vision.image_size = int(size[0])
        return
    raise ValueError(
        f"teacher '{name}' ({model_id}): transformers builds {family.upper()} vision models for a square image_size "
        f"only, but its config says image_size {list(size)}; save the teacher with a square image_size (inputs of any "
        "size are still accepted: the position embedding is resampled to each input's grid)"
    )


def _apply_config_overrides(name: str, vision: PreTrainedConfig, overrides: dict[str, Any] | None) -> None:
    for key, value in (overrides or {}).items():
        if not hasattr(vision, key):
            raise ValueError(
                f"teacher '{name}': config_overrides key {key!r} is not a field of {type(vision).__name__}; "
                "use e.g. {'layer_norm_eps': 1e-5} (timm's SAM) or {'hidden_act': 'gelu'} (timm's OpenAI CLIP)"
            )
        setattr(vision, key, value)


def load_teacher(
    name: str,
    model_id: str,
    out_indices: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    renormalize: bool = False,
    position_interpolation: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    fast_path: bool = True,
    **hub_kwargs,
) -> FrozenTeacher:
    """Load one frozen teacher by Hub id or local path: a transformers model with the right class for its family, or
    a timm model (`is_timm_model_id`) built as the reference builds it.

    `position_interpolation` overrides the family's position-embedding rule (`POSITION_INTERPOLATIONS`);
    `config_overrides` sets fields of the (vision) config before the weights load, e.g. `{"layer_norm_eps": 1e-5}`
    for SAM or `{"hidden_act": "gelu"}` for OpenAI CLIP weights, to match the reference's timm teachers exactly.
    `fast_path` (see `SAKTeacher`) applies to transformers teachers, which load with SDPA attention; timm teachers
    always run timm's own pruned, early-stopping `forward_intermediates`.
    """
    if is_timm_model_id(model_id):
        if position_interpolation is not None or config_overrides:
            raise ValueError(
                f"teacher '{name}' ({model_id}) is a timm model, built as the reference builds it: "
                "position_interpolation and config_overrides apply to transformers teachers only"
            )
        from .timm_teachers import load_timm_teacher

        return load_timm_teacher(name, model_id, out_indices, dtype, renormalize, **hub_kwargs)
    config = load_teacher_config(name, model_id, **hub_kwargs)
    family = teacher_family(config)
    vision = vision_config_of(config)
    _check_saved_grid(name, model_id, family, vision)
    _apply_config_overrides(name, vision, config_overrides)
    model_class = _model_class(family)
    extra = {"add_pooling_layer": False} if family == "vit" else {}
    if family in FAST_PATH_FAMILIES:
        extra["attn_implementation"] = "sdpa"  # transformers' default for these families; asked for explicitly
    load_config = config if model_class is AutoModel else vision
    try:
        model = model_class.from_pretrained(
            model_id, config=load_config, dtype=dtype or torch.float32, **extra, **hub_kwargs
        )
    except (OSError, ValueError) as error:
        raise OSError(
            f"teacher '{name}': cannot load the weights of {model_id!r} ({str(error).splitlines()[0]}); download it "
            f"once with `hf download {model_id}` or set the teacher's model_id to a local folder"
        ) from error
    teacher = SAKTeacher(
        name,
        model,
        family,
        out_indices,
        renormalize,
        position_interpolation=position_interpolation,
        model_id=model_id,
        config_overrides=config_overrides,
        fast_path=fast_path,
    )
    teacher.requires_grad_(False)
    return teacher.eval()


class SAKTeachers:
    """A frozen committee `{name: teacher}` in the student's teacher order.

    Not an `nn.Module` on purpose: attached to a student it stays out of its parameters, state dict and optimizer.
    Calling it runs every teacher under `torch.inference_mode()` and returns ordinary float32 tensors, ready for the
    distillation loss.
    """

    def __init__(self, teachers: dict[str, FrozenTeacher]):
        self.teachers = nn.ModuleDict(teachers)
        for teacher in self.teachers.values():
            teacher.requires_grad_(False)
            teacher.eval()

    @classmethod
    def from_config(
        cls,
        config: SAKConfig,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        renormalize: bool = False,
        fast_path: bool = True,
        **hub_kwargs,
    ) -> SAKTeachers:
        """Load the teachers a `SAKConfig` names: `teachers[name]["model_id"]` plus the optional `TEACHER_OPTIONS`
        (`out_indices`, `position_interpolation`, `config_overrides`); `fast_path` as in `load_teacher`."""
        teachers = {}
        for name, spec in config.teachers.items():
            if not spec.get("model_id"):
                raise ValueError(
                    f"teacher '{name}' has no model_id; set config.teachers['{name}']['model_id'] to a Hub id or "
                    "local folder (e.g. 'facebook/dinov2-base')"
                )
            teacher = load_teacher(
                name,
                spec["model_id"],
                spec.get("out_indices"),
                dtype,
                renormalize,
                position_interpolation=spec.get("position_interpolation"),
                config_overrides=spec.get("config_overrides"),
                fast_path=fast_path,
                **hub_kwargs,
            )
            if teacher.hidden_size != spec["hidden_size"]:
                raise ValueError(
                    f"teacher '{name}' ({spec['model_id']}) has width {teacher.hidden_size} but the config says "
                    f"{spec['hidden_size']}; fix config.teachers['{name}']['hidden_size']"
                )
            if len(teacher.out_indices) != len(config.out_indices):
                raise ValueError(
                    f"teacher '{name}' gives {len(teacher.out_indices)} levels but the student has "
                    f"{len(config.out_indices)}; give out_indices with {len(config.out_indices)} entries"
                )
            teachers[name] = teacher
        committee = cls(teachers)
        return committee.to(device) if device is not None else committee

    def to(self, device: torch.device | str) -> SAKTeachers:
        self.teachers.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.teachers.parameters()).device

    def fingerprint(self, input_size: Sequence[int]) -> dict[str, Any]:
        """What the features depend on: teachers, their sources, backends, levels, dtypes, position rule and options,
        and the input size."""
        return {"teachers": [t.describe() for t in self.teachers.values()], "input_size": list(input_size)}

    def __call__(self, pixel_values: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """`{teacher: [one (B, C_t, h_t, w_t) float32 map per level]}` for normalised `pixel_values`.

        float32 teachers follow the caller's autocast (the training loop runs them under the Accelerator's); teachers
        stored in bfloat16 or float16 compute in their own dtype with autocast off, so that, e.g., bf16 teachers
        under fp16 mixed precision do not mix the two half types (autocast refuses `torch.cat` of bf16 and fp16)."""
        if self.device != pixel_values.device:
            self.to(pixel_values.device)
        features = {}
        with torch.inference_mode():
            for name, teacher in self.teachers.items():
                own_dtype = next(teacher.parameters()).dtype != torch.float32
                with torch.autocast(pixel_values.device.type, enabled=False) if own_dtype else nullcontext():
                    features[name] = teacher(pixel_values)
        # Inference tensors cannot enter autograd graphs; the clone is an ordinary tensor.
        return {name: [level.clone() for level in levels] for name, levels in features.items()}

    def features(
        self, pixel_values: torch.Tensor, example_ids: Sequence[str], cache: TeacherFeatureCache | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """Like calling the committee, but served from / stored into an on-disk `cache` by example id."""
        if cache is None:
            return self(pixel_values)
        cached = cache.get(example_ids)
        if cached is not None:
            return {name: [level.to(pixel_values.device) for level in levels] for name, levels in cached.items()}
        features = self(pixel_values)
        cache.put(example_ids, features)
        return features


class TeacherFeatureCache:
    """Teacher features stored once as float16 safetensors shards keyed by example id (for runs without random
    augmentation, e.g. stage-1 distillation). A cache made for other teachers, levels or input size is refused."""

    META = "cache_meta.json"

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / self.META
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())
            if stored != fingerprint:
                differences = [key for key in fingerprint if stored.get(key) != fingerprint[key]]
                raise ValueError(
                    f"teacher feature cache {self.directory} was built for other {', '.join(differences)} "
                    f"(cached: {[stored.get(k) for k in differences]}, now: {[fingerprint[k] for k in differences]}); "
                    "delete the folder or point the cache to a new one"
                )
        else:
            meta_path.write_text(json.dumps(fingerprint, indent=2))
        self.fingerprint = fingerprint
        self.names = [t["name"] for t in fingerprint["teachers"]]
        self.num_levels = {t["name"]: len(t["out_indices"]) for t in fingerprint["teachers"]}
        self.index: dict[str, Path] = {}
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(shard, "pt") as handle:
                for key in handle.keys():
                    self.index.setdefault(key.split("/", 1)[0], shard)
        self.hits = self.misses = 0

    def get(self, example_ids: Sequence[str]) -> dict[str, list[torch.Tensor]] | None:
        """The cached batch (float32), or None when any example is missing."""
        from safetensors import safe_open

        if not all(str(i) in self.index for i in example_ids):
            self.misses += 1
            return None
        self.hits += 1
        per_example = []
        for example in map(str, example_ids):
            with safe_open(self.index[example], "pt") as handle:
                per_example.append(
                    {
                        name: [
                            handle.get_tensor(f"{example}/{name}/{level}") for level in range(self.num_levels[name])
                        ]
                        for name in self.names
                    }
                )
        return {
            name: [
                torch.stack([e[name][level] for e in per_example]).float() for level in range(self.num_levels[name])
            ]
            for name in self.names
        }

    def put(self, example_ids: Sequence[str], features: dict[str, list[torch.Tensor]]) -> None:
        """Store one batch as a new shard (written to a temporary name, then renamed)."""
        from safetensors.torch import save_file

        tensors = {
            f"{example}/{name}/{level}": features[name][level][row].to(torch.float16).contiguous().cpu()
            for row, example in enumerate(map(str, example_ids))
            for name in self.names
            for level in range(self.num_levels[name])
        }
        shard = self.directory / f"shard-{len(list(self.directory.glob('shard-*.safetensors'))):06d}.safetensors"
        partial = shard.with_suffix(".tmp")
        save_file(tensors, str(partial))
        partial.rename(shard)
        for example in map(str, example_ids):
            self.index[example] = shard


__all__ = [
    "FrozenTeacher",
    "SAKTeacher",
    "SAKTeachers",
    "TeacherFeatureCache",
    "from_stem_and_teachers",
    "load_teacher",
    "resample_position_embeddings",
    "sam_resize_and_pad",
    "student_config",
    "teacher_specs",
    "teacher_widths",
]
