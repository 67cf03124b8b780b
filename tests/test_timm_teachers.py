"""Teacher targets against the reference's timm teachers (needs the `timm` extra; skipped without timm).

Tiny timm models of the paper's teacher families get random weights and are saved the timm way; the reference's
construction (`models/backbones/timm_encoders.py`: `timm.create_model(..., img_size=input_size)`, final norm / neck
removed, `forward_intermediates(..., norm=False)`, SAM resized and padded to its native size) is rebuilt here from
those files. The same weights converted to transformers must give the same targets through our position-embedding
rule and per-teacher options; the timm path must give them exactly.
"""

from __future__ import annotations

import pytest
import torch


timm = pytest.importorskip("timm")

from timm.models import save_for_hf  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SamVisionConfig,
    SamVisionModel,
)

from modeling_sak import SAKConfig  # noqa: E402
from modeling_sak.teachers.committee import SAKTeachers, load_teacher, sam_resize_and_pad, teacher_widths  # noqa: E402
from modeling_sak.teachers.timm_teachers import TimmTeacher, is_timm_model_id  # noqa: E402


TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}
LEVELS = [0, 1, 2, 3]
SIZES = [(448, 576), (224, 288), (238, 322)]  # the paper's NYUD size, half of it, and an odd size (not /14, not /16)
SAM_SIZE = 256  # the tiny SAM's native size (samvit_*: 1024); the reference resizes and pads to the native size


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) random weights, layer scales near 0.5 (timm's init makes DINOv2 blocks almost identities)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1 or "pos" in name or "token" in name:
                parameter.copy_(0.1 * noise if "rel_pos" not in name else 0.5 * noise)
            elif name.endswith("gamma"):
                parameter.copy_(0.5 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(0.05 * noise)
    return model.eval()


def split_qkv(weight: torch.Tensor, bias: torch.Tensor, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    width = weight.shape[1]
    out = {}
    for k, name in enumerate(names):
        out[f"{name}.weight"] = weight[k * width : (k + 1) * width]
        out[f"{name}.bias"] = bias[k * width : (k + 1) * width]
    return out


def dinov2_to_transformers(model, image_size) -> Dinov2Model:
    """timm `vit_*_patch14_dinov2` -> transformers `Dinov2Model` (the same weights as facebook/dinov2-*)."""
    state = model.state_dict()
    config = Dinov2Config(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    converted = Dinov2Model(config)
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": converted.embeddings.mask_token.detach(),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv = split_qkv(state[src + "attn.qkv.weight"], state[src + "attn.qkv.bias"], ("q_proj", "k_proj", "v_proj"))
        out.update({f"{dst}attention.{k}": v for k, v in qkv.items()})
        renames = {
            "attn.proj": "attention.o_proj",
            "norm1": "norm1",
            "norm2": "norm2",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for old, new in renames.items():
            out[f"{dst}{new}.weight"], out[f"{dst}{new}.bias"] = state[f"{src}{old}.weight"], state[f"{src}{old}.bias"]
        out[f"{dst}layer_scale1.lambda1"] = state[src + "ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[src + "ls2.gamma"]
    converted.load_state_dict(out, strict=True)
    return converted


def clip_to_transformers(model, image_size: int, hidden_act: str) -> CLIPVisionModel:
    """timm `vit_*_clip_*` -> transformers `CLIPVisionModel` (the layout of openai/clip-vit-* checkpoints)."""
    state = model.state_dict()
    width = model.embed_dim
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=2,
        image_size=image_size,
        patch_size=16,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )
    converted = CLIPVisionModel(config)
    out = {
        "embeddings.class_embedding": state["cls_token"][0, 0],
        "embeddings.position_embedding.weight": state["pos_embed"][0],
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "pre_layrnorm.weight": state["norm_pre.weight"],
        "pre_layrnorm.bias": state["norm_pre.bias"],
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        qkv = split_qkv(state[src + "attn.qkv.weight"], state[src + "attn.qkv.bias"], ("q_proj", "k_proj", "v_proj"))
        out.update({f"{dst}self_attn.{k}": v for k, v in qkv.items()})
        renames = {
            "attn.proj": "self_attn.out_proj",
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for old, new in renames.items():
            out[f"{dst}{new}.weight"], out[f"{dst}{new}.bias"] = state[f"{src}{old}.weight"], state[f"{src}{old}.bias"]
    # transformers 4.x nests the tower under `vision_model.`, 5.x does not
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in converted.state_dict()) else ""
    converted.load_state_dict({prefix + k: v for k, v in out.items()}, strict=True)
    return converted


def sam_to_transformers(model) -> SamVisionModel:
    """timm `samvit_*` -> transformers `SamVisionModel` (the layout of facebook/sam-vit-*), LayerNorm eps 1e-6 as
    transformers' SAM configs say."""
    state = model.state_dict()
    width = model.embed_dim
    config = SamVisionConfig(
        hidden_size=width,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=2,
        mlp_dim=4 * width,
        image_size=SAM_SIZE,
        patch_size=16,
        window_size=4,
        global_attn_indexes=[1, 3],
        use_rel_pos=True,
        output_channels=16,
    )
    converted = SamVisionModel(config)
    out = {
        "vision_encoder.pos_embed": state["pos_embed"],
        "vision_encoder.patch_embed.projection.weight": state["patch_embed.proj.weight"],
        "vision_encoder.patch_embed.projection.bias": state["patch_embed.proj.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"vision_encoder.layers.{i}."
        renames = {
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "attn.qkv": "attn.qkv",
            "attn.proj": "attn.proj",
            "mlp.fc1": "mlp.lin1",
            "mlp.fc2": "mlp.lin2",
        }
        for old, new in renames.items():
            out[f"{dst}{new}.weight"], out[f"{dst}{new}.bias"] = state[f"{src}{old}.weight"], state[f"{src}{old}.bias"]
        out[f"{dst}attn.rel_pos_h"], out[f"{dst}attn.rel_pos_w"] = (
            state[src + "attn.rel_pos_h"],
            state[src + "attn.rel_pos_w"],
        )
    missing, unexpected = converted.load_state_dict(out, strict=False)
    assert not unexpected and all(".neck." in key for key in missing)  # the neck is not a target
    return converted


def build(kind: str):
    """(timm model, transformers model, transformers load options) of one flavour of the paper's teachers."""
    if kind == "dinov2":  # vit_base_patch14_dinov2: native 518 (37 x 37), = facebook/dinov2-base
        model = randomize(timm.create_model("vit_base_patch14_dinov2", num_classes=0, **TINY))
        return model, dinov2_to_transformers(model, 518), {}
    if kind == "dinov2_nonsquare":  # a DINOv2 saved at a non-square size (16 x 24 grid)
        model = randomize(timm.create_model("vit_base_patch14_dinov2", num_classes=0, img_size=(224, 336), **TINY))
        return model, dinov2_to_transformers(model, [224, 336]), {}
    if kind == "clip_timm":  # vit_base_patch16_clip_384 (timm's laion2b_ft_in12k_in1k, the paper's CLIP): 24 x 24
        model = randomize(timm.create_model("vit_base_patch16_clip_384", num_classes=0, **TINY))
        return model, clip_to_transformers(model, 384, "gelu"), {}
    if kind == "clip_openai":  # vit_base_patch16_clip_224.openai: timm runs OpenAI weights with exact GELU
        model = randomize(timm.create_model("vit_base_patch16_clip_224", num_classes=0, **TINY))
        # converted with the Hub's openai/clip-vit-base-patch16 config (quick_gelu); the option restores timm's GELU
        return model, clip_to_transformers(model, 224, "quick_gelu"), {"config_overrides": {"hidden_act": "gelu"}}
    if kind == "sam":  # samvit_base_patch16 (= facebook/sam-vit-base), tiny and at a small native size
        model = timm.create_model(
            "samvit_base_patch16",
            num_classes=0,
            img_size=SAM_SIZE,
            window_size=4,
            global_attn_indexes=[1, 3],
            neck_chans=16,
            **TINY,
        )
        model = randomize(model)
        return model, sam_to_transformers(model), {"config_overrides": {"layer_norm_eps": 1e-5}}
    raise ValueError(kind)


KINDS = ["dinov2", "dinov2_nonsquare", "clip_timm", "clip_openai", "sam"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (timm folder, transformers folder, options)}."""
    root = tmp_path_factory.mktemp("timm_teachers")
    folders = {}
    for kind in KINDS:
        timm_model, hf_model, options = build(kind)
        save_for_hf(timm_model, root / f"{kind}_timm", safe_serialization=True)
        hf_model.save_pretrained(root / f"{kind}_hf")
        folders[kind] = (root / f"{kind}_timm", root / f"{kind}_hf", options)
    return folders


def reference_targets(folder, size, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference's TimmEncoder on these weights: built at img_size = the input size (SAM: its native size, the
    input resized and padded to it), final norm / neck removed, block outputs without prefix tokens."""
    sam = "sam" in folder.name
    kwargs = {} if sam else {"img_size": size}
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0, global_pool="", **kwargs).eval()
    with torch.no_grad():
        if sam:
            model.neck = None
            return model.forward_intermediates(
                sam_resize_and_pad(x, SAM_SIZE), indices=LEVELS, norm=False, intermediates_only=True
            )
        model.norm = None
        return model.forward_intermediates(
            x, indices=LEVELS, return_prefix_tokens=False, norm=False, intermediates_only=True
        )


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_teachers_give_the_reference_timm_targets(kind, saved):
    timm_dir, hf_dir, options = saved[kind]
    ours = load_teacher(kind, str(hf_dir), out_indices=LEVELS, **options)
    generator = torch.Generator().manual_seed(1)
    for size in SIZES:
        x = torch.randn(2, 3, *size, generator=generator)
        reference = reference_targets(timm_dir, size, x)
        with torch.no_grad():
            targets = ours(x)
        for level, (value, expected) in enumerate(zip(targets, reference)):
            assert value.shape == expected.shape, (size, level)
            assert relative_error(value, expected) < 1e-5, (kind, size, level, relative_error(value, expected))


@pytest.mark.parametrize("kind", ["dinov2", "clip_timm", "clip_openai"])
def test_transformers_run_time_interpolation_is_not_the_reference(kind, saved):
    """What the targets were before: transformers' interpolate_pos_encoding (still available as an option)."""
    timm_dir, hf_dir, options = saved[kind]
    runtime = load_teacher(kind, str(hf_dir), out_indices=LEVELS, position_interpolation="transformers", **options)
    x = torch.randn(1, 3, 448, 576, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        errors = [relative_error(a, b) for a, b in zip(runtime(x), reference_targets(timm_dir, (448, 576), x))]
    assert min(errors) > 1e-4, errors


@pytest.mark.parametrize(("kind", "option"), [("sam", "config_overrides"), ("clip_openai", "config_overrides")])
def test_reference_quirk_options_matter(kind, option, saved):
    """Without the per-teacher option (transformers' config as on the Hub) the targets differ from the reference."""
    timm_dir, hf_dir, _ = saved[kind]
    plain = load_teacher(kind, str(hf_dir), out_indices=LEVELS)
    x = torch.randn(1, 3, 224, 288, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        errors = [relative_error(a, b) for a, b in zip(plain(x), reference_targets(timm_dir, (224, 288), x))]
    assert max(errors) > 1e-5, errors


@pytest.mark.parametrize("kind", KINDS)
def test_timm_path_equals_the_reference_construction_exactly(kind, saved):
    timm_dir, _, _ = saved[kind]
    for model_id in (str(timm_dir), f"local-dir:{timm_dir}"):
        assert is_timm_model_id(model_id)
        teacher = load_teacher(kind, model_id, out_indices=LEVELS)
        assert isinstance(teacher, TimmTeacher) and teacher.backend == "timm"
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.family == ("sam" if kind == "sam" else kind.split("_")[0])
    generator = torch.Generator().manual_seed(4)
    for size in SIZES:
        x = torch.randn(2, 3, *size, generator=generator)
        with torch.no_grad():
            targets = teacher(x)
        for value, expected in zip(targets, reference_targets(timm_dir, size, x)):
            assert value.dtype == torch.float32
            assert torch.equal(value, expected), (kind, size)


@pytest.mark.parametrize("kind", KINDS)
def test_timm_teacher_blocks_read_row_major_tokens(kind, saved):
    """timm's SAM hands its blocks a channels-last view of the patch convolution's output, a layout the residual adds
    keep (every norm then copies and every add strides); the teacher makes it row-major once, for every family."""
    teacher = load_teacher(kind, str(saved[kind][0]), out_indices=LEVELS)
    layouts = []
    for block in teacher.model.blocks:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    with torch.no_grad():
        teacher(torch.randn(1, 3, *SIZES[0]))
    assert layouts and all(layouts)


def test_timm_committee_from_config_dtypes_fingerprint_and_widths(saved):
    folders = {"dinov2": saved["dinov2"][0], "clip": saved["clip_timm"][0], "sam": saved["sam"][0]}
    specs = teacher_widths({name: str(path) for name, path in folders.items()})
    assert {s["hidden_size"] for s in specs.values()} == {32} and specs["sam"]["num_hidden_layers"] == 4
    teachers = {
        name: {"hidden_size": 32, "model_id": str(path), "out_indices": LEVELS} for name, path in folders.items()
    }
    config = SAKConfig(
        stem_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        teachers=teachers,
    )
    x = torch.randn(1, 3, 224, 288)
    fp32 = SAKTeachers.from_config(config)(x)
    assert [tuple(m.shape) for m in fp32["dinov2"]] == [(1, 32, 16, 20)] * 4
    assert [tuple(m.shape) for m in fp32["sam"]] == [(1, 32, 16, 16)] * 4
    for dtype, tolerance in ((torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
        committee = SAKTeachers.from_config(config, dtype=dtype)
        assert next(committee.teachers["clip"].parameters()).dtype == dtype
        low = committee(x)
        for name in fp32:
            for a, b in zip(fp32[name], low[name]):
                assert b.dtype == torch.float32 and torch.isfinite(b).all()
                assert relative_error(b, a) < tolerance, (name, dtype)
    fingerprint = committee.fingerprint((224, 288))
    assert [t["backend"] for t in fingerprint["teachers"]] == ["timm"] * 3
    assert fingerprint["teachers"][0]["dtype"] == "torch.float16"


def test_timm_teachers_refuse_transformers_options_and_unknown_models(saved, tmp_path, monkeypatch):
    timm_dir = str(saved["dinov2"][0])
    with pytest.raises(ValueError, match=r"teacher 'd' .* is a timm model.*transformers teachers only"):
        load_teacher("d", timm_dir, config_overrides={"layer_norm_eps": 1e-5})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"teacher 'x': timm cannot build 'timm:not_a_timm_model'"):
        load_teacher("x", "timm:not_a_timm_model")
