"""The frozen teacher committee of SAK: vision foundation models from the Hub producing the distillation targets.

    teachers = SAKTeachers.from_config(model.config, dtype=torch.bfloat16)
    teacher_features = teachers(pixel_values)   # {teacher: [4 maps (B, C_t, h_t, w_t)]}
    loss = model(pixel_values, labels=labels, teacher_features=teacher_features).loss

or attach them to the student (`model.load_teachers()`), after which a training-mode forward with no
`teacher_features` computes them itself. Teachers are never part of the student's state dict.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers.utils import logging

from .configuration_sak import SAKConfig, default_out_indices
from .image_processing_sak import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from .image_processing_sak import IMAGENET_DEFAULT_STD as IMAGENET_STD


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
# Normalisation each family was pretrained with, for the optional per-teacher re-normalisation.
FAMILY_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision tower's config of a full CLIP/SigLIP/SAM config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def teacher_family(config: PreTrainedConfig) -> str:
    """`dinov2`, `clip`, `siglip`, `sam`, `vit`, or `auto` for any other model returning hidden states."""
    return FAMILIES.get(config.model_type, "auto")


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


def teacher_widths(model_ids: dict[str, str], **hub_kwargs) -> dict[str, dict[str, Any]]:
    """`{name: {"hidden_size", "num_hidden_layers", "model_id"}}` from the teachers' configs, without weights."""
    specs = {}
    for name, model_id in model_ids.items():
        vision = vision_config_of(load_teacher_config(name, model_id, **hub_kwargs))
        specs[name] = {
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "model_id": model_id,
        }
    return specs


def sam_resize_and_pad(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """SAM's input: resize the longer side to `size` (bicubic), pad right/bottom with zeros to `size` x `size`."""
    height, width = pixel_values.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    resized = F.interpolate(pixel_values, size=(new_h, new_w), mode="bicubic", align_corners=False)
    return F.pad(resized, (0, size - new_w, 0, size - new_h))


class SAKTeacher(nn.Module):
    """One frozen teacher: its transformers model plus the input and output handling of its family."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        family: str,
        out_indices: Sequence[int],
        renormalize: bool = False,
        mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        super().__init__()
        self.name, self.model, self.family = name, model, family
        vision = vision_config_of(model.config)
        self.hidden_size = vision.hidden_size
        depth = vision.num_hidden_layers
        self.out_indices = list(out_indices) if out_indices is not None else default_out_indices(depth)
        bad = [i for i in self.out_indices if not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"teacher '{name}': layer indices {bad} are out of range for a {depth}-layer model; "
                f"use 0-based indices in [0, {depth - 1}] (or leave out_indices unset for the depth rule)"
            )
        patch = getattr(vision, "patch_size", None)
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch) if patch else None
        self.image_size = getattr(vision, "image_size", None)
        self.num_prefix_tokens = {"dinov2": 1 + getattr(vision, "num_register_tokens", 0), "clip": 1, "vit": 1}.get(
            family, 0
        )
        # Models that can interpolate their position embedding to the input grid are asked to.
        accepts = inspect.signature(model.forward).parameters
        self._forward_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
        self.renormalize = renormalize
        mean, std = mean_std or FAMILY_MEAN_STD.get(family, (IMAGENET_MEAN, IMAGENET_STD))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The student's ImageNet-normalised images -> this teacher's input."""
        if self.renormalize:
            imagenet_mean = pixel_values.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            imagenet_std = pixel_values.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            pixel_values = (pixel_values * imagenet_std + imagenet_mean - self.mean) / self.std
        if self.family == "sam":
            pixel_values = sam_resize_and_pad(pixel_values, self.image_size)
        return pixel_values.to(next(self.model.parameters()).dtype)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states at `out_indices` as float32 `(B, C_t, h_t, w_t)` maps, prefix/register tokens removed."""
        inputs = self.prepare_inputs(pixel_values)
        native = self.image_size if isinstance(self.image_size, list | tuple) else (self.image_size,) * 2
        # transformers interpolates position embeddings assuming a square grid: ask only when the size differs.
        kwargs = self._forward_kwargs if tuple(inputs.shape[-2:]) != tuple(native) else {}
        if kwargs and native[0] != native[1] and self.family in ("vit", "clip", "siglip"):
            raise ValueError(
                f"teacher '{self.name}': transformers interpolates this model's position embeddings only from a square "
                f"grid, but it was saved with image_size {list(native)}; feed {list(native)} inputs or save the "
                "teacher with a square image_size"
            )
        outputs = self.model(pixel_values=inputs, output_hidden_states=True, **kwargs)
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(
                f"teacher '{self.name}' ({type(self.model).__name__}) returned no hidden_states; pick a model that "
                "supports output_hidden_states=True (DINOv2, CLIP, SigLIP, SAM, ViT, ...)"
            )
        return [self._to_map(hidden_states[i + 1], inputs.shape[-2:]) for i in self.out_indices]

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


def load_teacher(
    name: str,
    model_id: str,
    out_indices: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    renormalize: bool = False,
    **hub_kwargs,
) -> SAKTeacher:
    """Load one frozen teacher by Hub id or local path with the right transformers class for its family."""
    config = load_teacher_config(name, model_id, **hub_kwargs)
    family = teacher_family(config)
    extra = {"add_pooling_layer": False} if family == "vit" else {}
    try:
        model = _model_class(family).from_pretrained(model_id, dtype=dtype or torch.float32, **extra, **hub_kwargs)
    except (OSError, ValueError) as error:
        raise OSError(
            f"teacher '{name}': cannot load the weights of {model_id!r} ({str(error).splitlines()[0]}); download it "
            f"once with `hf download {model_id}` or set the teacher's model_id to a local folder"
        ) from error
    teacher = SAKTeacher(name, model, family, out_indices, renormalize)
    teacher.requires_grad_(False)
    return teacher.eval()


class SAKTeachers:
    """A frozen committee `{name: SAKTeacher}` in the student's teacher order.

    Not an `nn.Module` on purpose: attached to a student it stays out of its parameters, state dict and optimizer.
    Calling it runs every teacher under `torch.inference_mode()` and returns ordinary float32 tensors, ready for the
    distillation loss.
    """

    def __init__(self, teachers: dict[str, SAKTeacher]):
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
        **hub_kwargs,
    ) -> SAKTeachers:
        """Load the teachers a `SAKConfig` names (`teachers[name]["model_id"]`, optional `out_indices`)."""
        teachers = {}
        for name, spec in config.teachers.items():
            if not spec.get("model_id"):
                raise ValueError(
                    f"teacher '{name}' has no model_id; set config.teachers['{name}']['model_id'] to a Hub id or "
                    "local folder (e.g. 'facebook/dinov2-base')"
                )
            teacher = load_teacher(name, spec["model_id"], spec.get("out_indices"), dtype, renormalize, **hub_kwargs)
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
        """What the features depend on: teachers, their sources, levels, dtypes and the input size."""
        return {
            "teachers": [
                {
                    "name": name,
                    "model": getattr(t.model.config, "_name_or_path", ""),
                    "out_indices": t.out_indices,
                    "hidden_size": t.hidden_size,
                    "dtype": str(next(t.model.parameters()).dtype),
                    "renormalize": t.renormalize,
                }
                for name, t in self.teachers.items()
            ],
            "input_size": list(input_size),
        }

    def __call__(self, pixel_values: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """`{teacher: [one (B, C_t, h_t, w_t) float32 map per level]}` for normalised `pixel_values`."""
        if self.device != pixel_values.device:
            self.to(pixel_values.device)
        with torch.inference_mode():
            features = {name: teacher(pixel_values) for name, teacher in self.teachers.items()}
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


__all__ = ["SAKTeacher", "SAKTeachers", "TeacherFeatureCache", "load_teacher", "teacher_widths", "sam_resize_and_pad"]
