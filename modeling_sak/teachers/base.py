"""What every teacher backend shares (transformers teachers in `committee.py`, timm teachers in `timm_teachers.py`):
the levels, the input (re-normalisation, SAM's resize and pad, dtype) and the description the feature cache keys on.
Training code only, like both backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from transformers.image_utils import IMAGENET_DEFAULT_STD as IMAGENET_STD

from ..remote_code.configuration_sak import default_out_indices


# Normalisation each family was pretrained with, for the optional per-teacher re-normalisation.
FAMILY_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def sam_resize_and_pad(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """SAM's input: resize the longer side to `size` (bicubic), pad right/bottom with zeros to `size` x `size`."""
    height, width = pixel_values.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    resized = F.interpolate(pixel_values, size=(new_h, new_w), mode="bicubic", align_corners=False)
    return F.pad(resized, (0, size - new_w, 0, size - new_h))


def check_out_indices(name: str, out_indices: Sequence[int] | None, depth: int) -> list[int]:
    """The teacher's 0-based block indices (default: the depth rule), checked against its depth."""
    indices = list(out_indices) if out_indices is not None else default_out_indices(depth)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"teacher '{name}': layer indices {bad} are out of range for a {depth}-layer model; "
            f"use 0-based indices in [0, {depth - 1}] (or leave out_indices unset for the depth rule)"
        )
    return indices


class FrozenTeacher(nn.Module):
    """What every teacher backend shares: its levels, its input (re-normalisation, SAM's resize and pad, dtype) and
    the description the feature cache keys on. Subclasses set `model`, `sam_size` and implement `forward`."""

    backend = "transformers"

    def __init__(
        self,
        name: str,
        model: nn.Module,
        family: str,
        hidden_size: int,
        depth: int,
        out_indices: Sequence[int] | None,
        renormalize: bool,
        mean_std: tuple[Sequence[float], Sequence[float]] | None,
        model_id: str | None,
    ):
        super().__init__()
        self.name, self.model, self.family, self.model_id = name, model, family, model_id
        self.hidden_size = hidden_size
        self.out_indices = check_out_indices(name, out_indices, depth)
        self.renormalize = renormalize
        self.sam_size: int | None = None
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
            pixel_values = sam_resize_and_pad(pixel_values, self.sam_size)
        return pixel_values.to(next(self.model.parameters()).dtype)

    def describe(self) -> dict[str, Any]:
        """What this teacher's features depend on (for `SAKTeachers.fingerprint`)."""
        return {
            "name": self.name,
            "model": self.model_id or "",
            "backend": self.backend,
            "out_indices": self.out_indices,
            "hidden_size": self.hidden_size,
            "dtype": str(next(self.model.parameters()).dtype),
            "renormalize": self.renormalize,
        }
