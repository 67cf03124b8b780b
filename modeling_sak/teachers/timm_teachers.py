"""Teachers built by timm exactly as the SAK reference builds its committee (optional: `pip install "sak-hf[timm]"`).

The reference (`models/backbones/timm_encoders.py`) creates each teacher with
`timm.create_model(name, img_size=input_size, num_classes=0, global_pool="", pretrained=True)`, drops the final norm
(SAM: the neck) and takes `forward_intermediates(x, indices, norm=False, intermediates_only=True)`; SAM gets its input
resized (longer side to 1024, bicubic) and zero-padded to 1024 x 1024. Here a teacher is created at its native size
with `dynamic_img_size=True`, so timm resamples the position embedding from the native grid to each input's grid with
the same `resample_abs_pos_embed` (bicubic, antialiased) its checkpoint loader applies at `img_size`: the targets
equal the reference's bit for bit at every input size (tested), with one model for all sizes. Inputs whose sides are
not multiples of the patch are cropped to them first, which is what the reference's fixed-size patch embedding does
implicitly. SAM (fixed-size in timm) runs at its native size like the reference.

Model ids taken by this path:
- `timm/NAME.TAG` (a repository of the timm organisation on the Hub), e.g.
  `timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k`;
- `timm:NAME.TAG`, a timm registry name, e.g. `timm:vit_base_patch14_dinov2.lvd142m`;
- timm's own prefixes `hf-hub:ORG/NAME` and `local-dir:PATH`;
- a local folder saved by timm (`timm.models.save_for_hf`: a config.json with an `architecture`, no `model_type`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import FrozenTeacher


TIMM_PREFIXES = ("timm/", "timm:", "hf-hub:", "local-dir:")


def is_timm_model_id(model_id: str) -> bool:
    """Whether `model_id` names a timm model (see the module docstring); reads no weights and never imports timm."""
    model_id = str(model_id)
    if model_id.startswith(TIMM_PREFIXES):
        return True
    config = Path(model_id) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "architecture" in data and "model_type" not in data


def timm_model_name(model_id: str) -> str:
    """The name `timm.create_model` takes for a teacher id."""
    model_id = str(model_id)
    if model_id.startswith("timm:"):
        return model_id[len("timm:") :]
    if model_id.startswith(("hf-hub:", "local-dir:")):
        return model_id
    if model_id.startswith("timm/"):
        return f"hf-hub:{model_id}"
    return f"local-dir:{model_id}"


def _import_timm(name: str, model_id: str):
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"teacher '{name}' ({model_id}) is a timm model, but timm is not installed: `pip install \"sak-hf[timm]\"` "
            "(timm needs torchvision built for your torch), or name a transformers teacher instead"
        ) from error
    return timm


def create_timm_model(name: str, model_id: str, pretrained: bool, cache_dir: str | None = None) -> nn.Module:
    """`timm.create_model` as the reference calls it (no head, no pooling), at the native size, dynamic where timm
    supports it; errors name the teacher and the fix."""
    timm = _import_timm(name, model_id)
    kwargs = {"pretrained": pretrained, "num_classes": 0, "global_pool": ""}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    try:
        try:
            return timm.create_model(timm_model_name(model_id), dynamic_img_size=True, **kwargs)
        except TypeError as error:
            if "dynamic_img_size" not in str(error):
                raise
            return timm.create_model(timm_model_name(model_id), **kwargs)  # fixed-size models (SAM)
    except (OSError, RuntimeError, ValueError) as error:
        repo = model_id.removeprefix("hf-hub:") if model_id.startswith(("timm/", "hf-hub:")) else "timm/NAME.TAG"
        raise OSError(
            f"teacher '{name}': timm cannot build {model_id!r} ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Offline (HF_HUB_OFFLINE=1) only cached or local "
            f"models load: download it once (`hf download {repo}`), or give a folder saved by timm"
        ) from error


def _timm_family(model: nn.Module) -> str:
    if type(model).__name__ == "VisionTransformerSAM":
        return "sam"
    architecture = str(getattr(model, "pretrained_cfg", {}).get("architecture", "")).lower()
    for family in ("dinov2", "siglip", "clip", "eva", "sam"):
        if family in architecture:
            return family
    return "vit"


def _depth(name: str, model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not callable(getattr(model, "forward_intermediates", None)):
        raise ValueError(
            f"teacher '{name}' ({type(model).__name__}) is not a timm ViT-like model with blocks and "
            "forward_intermediates; use a ViT, DINOv2, CLIP, SigLIP, SAM or EVA model"
        )
    return len(blocks)


def timm_teacher_shape(name: str, model_id: str, cache_dir: str | None = None, **_) -> dict[str, int]:
    """`{"hidden_size", "num_hidden_layers"}` of a timm teacher, built on the meta device: no weights are read."""
    with torch.device("meta"):
        model = create_timm_model(name, model_id, pretrained=False, cache_dir=cache_dir)
    return {"hidden_size": model.embed_dim, "num_hidden_layers": _depth(name, model)}


def _row_major(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output copied to the row-major layout (same values)."""
    return output.contiguous()


class TimmTeacher(FrozenTeacher):
    """One frozen timm teacher: the model with final norm / head / neck and unused blocks pruned, its
    `forward_intermediates` at `out_indices` (no norm, no prefix tokens), float32 `(B, C_t, h_t, w_t)` maps."""

    backend = "timm"

    def __init__(
        self,
        name: str,
        model: nn.Module,
        out_indices: Sequence[int] | None = None,
        renormalize: bool = False,
        model_id: str | None = None,
    ):
        config = getattr(model, "pretrained_cfg", {}) or {}
        mean_std = (config["mean"], config["std"]) if "mean" in config and "std" in config else None
        family = _timm_family(model)
        super().__init__(
            name, model, family, model.embed_dim, _depth(name, model), out_indices, renormalize, mean_std, model_id
        )
        # What the reference removes (norm=None / neck=None), plus the blocks past the last level: same outputs.
        if callable(getattr(model, "prune_intermediate_layers", None)):
            model.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        # timm's SAM (NHWC) and ViTs without a class token (SigLIP) pass the blocks a permuted view of the patch
        # convolution's output, a layout every residual add keeps, so that every norm copies it and every add strides
        # (as in transformers, see teacher_fast_path.block_outputs). Made row-major once: the same values, less time.
        model.patch_embed.register_forward_hook(_row_major)
        self.patch_size = tuple(model.patch_embed.patch_size)
        self.dynamic = bool(getattr(model, "dynamic_img_size", False))
        self.native_size = tuple(model.patch_embed.img_size)
        if family == "sam":
            if self.native_size[0] != self.native_size[1]:
                raise ValueError(f"teacher '{name}': SAM's native size {self.native_size} is not square")
            self.sam_size = self.native_size[0]
        parameters = inspect.signature(model.forward_intermediates).parameters
        self._intermediate_kwargs = {"indices": self.out_indices, "norm": False, "intermediates_only": True}
        self._intermediate_kwargs.update(
            {
                k: v
                for k, v in (("return_prefix_tokens", False), ("stop_early", True), ("output_fmt", "NCHW"))
                if k in parameters
            }
        )

    def prepare_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        inputs = super().prepare_inputs(pixel_values)
        height, width = inputs.shape[-2:]
        if self.dynamic:  # a fixed-size patch embedding drops the remainder rows / columns the same way
            rows, columns = (
                height // self.patch_size[0] * self.patch_size[0],
                width // self.patch_size[1] * self.patch_size[1],
            )
            return inputs[..., :rows, :columns]
        if (height, width) != self.native_size:
            raise ValueError(
                f"teacher '{self.name}' ({self.model_id}) runs at its native size {list(self.native_size)} only "
                f"(timm builds it with a fixed size), got {[height, width]}"
            )
        return inputs

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Block outputs at `out_indices` as float32 `(B, C_t, h_t, w_t)` maps, prefix tokens removed."""
        features = self.model.forward_intermediates(self.prepare_inputs(pixel_values), **self._intermediate_kwargs)
        return [feature.float() for feature in features]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "position_interpolation": "timm" if self.dynamic else None}


def load_timm_teacher(
    name: str,
    model_id: str,
    out_indices: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    renormalize: bool = False,
    cache_dir: str | None = None,
    **_,
) -> TimmTeacher:
    """Load one frozen timm teacher with its pretrained weights (see the module docstring for the ids it takes)."""
    model = create_timm_model(name, model_id, pretrained=True, cache_dir=cache_dir)
    teacher = TimmTeacher(name, model.to(dtype or torch.float32), out_indices, renormalize, model_id)
    teacher.requires_grad_(False)
    return teacher.eval()


__all__ = ["TimmTeacher", "create_timm_model", "is_timm_model_id", "load_timm_teacher", "timm_teacher_shape"]
