"""The teachers' fast path: the same maps as transformers' own forward, less work (modeling_sak.teachers.fast_path).

Teachers are tiny random models of every family saved and loaded by path like Hub teachers. Weights are drawn at a
realistic scale: transformers' `SamVisionConfig` defaults to `initializer_range=1e-10` (near-zero weights, subnormal
float32 activations), so SAM is built with `initializer_range=0.02`, and its relative-position tables and absolute
position embedding (zero-initialised by transformers) are drawn at random so that the bias really shapes attention.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SamConfig,
    SamModel,
    SamVisionConfig,
    SamVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from modeling_sak import SAKConfig
from modeling_sak.remote_code.fast_path_sak import chunked_attention, chunked_attention_is_faster
from modeling_sak.teachers.committee import SAKTeacher, SAKTeachers, load_teacher, sam_resize_and_pad
from modeling_sak.teachers.fast_path import (
    SAM_ATTENTION_METHODS,
    default_sam_attention_method,
    sam_attention,
    transformer_blocks,
)


TOWER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
# A small SAM with SAM-B's structure: a 16 x 16 patch grid, windows (5 x 5: the grid is padded to 20 x 20, as SAM-B's
# 64 x 64 grid is padded to 70 x 70 for its 14 x 14 windows) and global layers.
SAM_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "mlp_dim": 64,
    "image_size": 256,
    "patch_size": 16,
    "window_size": 5,
    "global_attn_indexes": [1, 3],
    "initializer_range": 0.02,  # SamVisionConfig's default 1e-10 gives near-zero weights
}
KINDS = ["dinov2", "dinov2_registers", "clip", "clip_full", "siglip", "siglip_full", "vit", "sam", "sam_full"]
SIZES = [(448, 576), (238, 322)]  # the paper's student input and an odd one (sides not multiples of any patch)


def randomise_sam_positions(model) -> None:
    encoder = model.vision_encoder
    with torch.no_grad():
        encoder.pos_embed.normal_(0.0, 1.0)
        for layer in encoder.layers:
            layer.attn.rel_pos_h.normal_(0.0, 1.0)
            layer.attn.rel_pos_w.normal_(0.0, 1.0)


def build(kind: str):
    """A tiny random teacher of one family (default transformers initialisation, std 0.02)."""
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**TOWER, image_size=56, patch_size=14))
    if kind == "dinov2_registers":
        return Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**TOWER, image_size=56, patch_size=14, num_register_tokens=4)
        )
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**TOWER, image_size=64, patch_size=16))
    if kind == "clip_full":
        return CLIPModel(CLIPConfig(vision_config={**TOWER, "image_size": 64, "patch_size": 16}, text_config=TEXT))
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**TOWER, image_size=64, patch_size=16))
    if kind == "siglip_full":
        return SiglipModel(SiglipConfig(vision_config={**TOWER, "image_size": 64, "patch_size": 16}, text_config=TEXT))
    if kind == "vit":
        return ViTModel(ViTConfig(**TOWER, image_size=64, patch_size=16), add_pooling_layer=False)
    if kind == "sam":
        model = SamVisionModel(SamVisionConfig(**SAM_VISION))
    elif kind == "sam_full":
        model = SamModel(SamConfig(vision_config=SAM_VISION))
    else:
        raise ValueError(kind)
    randomise_sam_positions(model)
    return model


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_teachers")
    torch.manual_seed(0)
    for kind in KINDS:
        build(kind).save_pretrained(root / kind)
    return root


def assert_same_maps(actual: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    """Equal shapes and max |actual - expected| <= tolerance * max |expected| on every level."""
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        error = ((a.float() - e.float()).abs().max() / e.float().abs().max()).item()
        assert error <= tolerance, f"relative error {error:.3g} > {tolerance}"


def both_paths(teacher, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with torch.inference_mode():
        teacher.fast_path = True
        fast = teacher(x)
        teacher.fast_path = False
        reference = teacher(x)
    teacher.fast_path = True
    return fast, reference


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_maps_equal_transformers_forward_in_float32(kind, size, teacher_dirs):
    teacher = load_teacher(kind, str(teacher_dirs / kind))
    assert teacher.fast_path and teacher.uses_fast_path and teacher.describe()["fast_path"] is True
    assert teacher.model.config._attn_implementation == "sdpa"
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    fast, reference = both_paths(teacher, x)
    assert_same_maps(fast, reference, 1e-5)


def test_sam_fast_path_keeps_the_relative_position_bias_of_eager_attention(teacher_dirs):
    """Against transformers' eager SAM (the bias added to explicit attention weights); and the bias matters here:
    without the relative-position tables the blocks compute something else."""
    teacher = load_teacher("sam", str(teacher_dirs / "sam"), out_indices=[0, 1, 2, 3])
    eager = SamVisionModel.from_pretrained(teacher_dirs / "sam", attn_implementation="eager").eval()
    x = torch.randn(1, 3, 200, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fast = teacher(x)
        hidden = eager(sam_resize_and_pad(x, 256), output_hidden_states=True).hidden_states
        for layer in transformer_blocks(eager, "sam"):
            layer.attn.rel_pos_h.zero_()
            layer.attn.rel_pos_w.zero_()
        no_bias = eager(sam_resize_and_pad(x, 256), output_hidden_states=True).hidden_states
    assert_same_maps(fast, [hidden[i + 1].permute(0, 3, 1, 2) for i in range(4)], 1e-5)
    # What the blocks add to the embeddings changes by over 10% of its size when the bias is left out.
    added = (hidden[4] - hidden[0]).abs().max()
    assert (hidden[4] - no_bias[4]).abs().max() > 0.1 * added


@pytest.mark.parametrize(
    ("shape", "window_size"),
    [((3, 5, 5, 32), 5), ((2, 6, 9, 32), 0), ((1, 16, 16, 32), 0)],
    ids=["windows", "non-square-global", "square-global"],
)
@pytest.mark.parametrize("method", [*SAM_ATTENTION_METHODS, None])
def test_sam_attention_equals_transformers_attention_module(shape, window_size, method):
    config = SamVisionConfig(**SAM_VISION)
    config.window_size = window_size or config.window_size
    torch.manual_seed(3)
    for implementation in ("eager", "sdpa"):
        config._attn_implementation = implementation
        model = SamVisionModel(config).eval()
        randomise_sam_positions(model)
        attention = model.vision_encoder.layers[0 if window_size else 1].attn
        hidden = torch.randn(*shape)
        with torch.no_grad():
            expected = attention(hidden)[0]
            actual = sam_attention(attention, hidden, method)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    ("shape", "window_size"),
    [((3, 5, 5, 32), 5), ((2, 6, 9, 32), 0), ((1, 16, 16, 32), 0)],
    ids=["windows", "non-square-global", "square-global"],
)
def test_sam_attention_in_bfloat16_is_transformers_eager_attention_up_to_one_rounding(shape, window_size):
    """In bfloat16 (the teachers' dtype on the fast path) the default method on CPU (chunked where there is no AMX)
    follows transformers' eager order of operations: it differs from transformers' eager module by at most one
    bfloat16 rounding of the output (softmax rounds its bfloat16 output once instead of going through float32)."""
    config = SamVisionConfig(**SAM_VISION)
    config.window_size = window_size or config.window_size
    config._attn_implementation = "eager"
    torch.manual_seed(4)
    model = SamVisionModel(config).eval()
    randomise_sam_positions(model)
    model = model.to(torch.bfloat16)
    attention = model.vision_encoder.layers[0 if window_size else 1].attn
    hidden = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = attention(hidden)[0]
        # None is the default, "chunked" only where chunked_attention_is_faster (no AMX); elsewhere the default's
        # bf16 rounding is SDPA's, checked against float32 by the tests above.
        for method in ("chunked", None) if chunked_attention_is_faster(hidden) else ("chunked",):
            actual = sam_attention(attention, hidden, method)
            assert actual.dtype == torch.bfloat16
            torch.testing.assert_close(actual, expected, rtol=0, atol=2**-8 * expected.abs().max().item())
    assert default_sam_attention_method(hidden) == ("chunked" if chunked_attention_is_faster(hidden) else "augmented")
    assert default_sam_attention_method(hidden.float()) == "bias_by_head"


@pytest.mark.parametrize("max_logits", [1, 7 * 20, 3 * 20 * 20, 1 << 21])
def test_chunked_attention_is_the_biased_softmax_attention_for_any_slicing(max_logits):
    """Slices of one row, of 7 rows (a ragged last block), of several heads at once and the whole: all give
    `softmax(scale * q k^T + rel_h[q, kr] + rel_w[q, kc]) v`, written out in float64 with the bias as a full tensor."""
    batch, heads, height, width, head_dim = 2, 3, 4, 5, 8
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(batch, heads, height * width, head_dim, generator=generator) for _ in range(3))
    rel_h = torch.randn(batch, heads, height * width, height, generator=generator)
    rel_w = torch.randn(batch, heads, height * width, width, generator=generator)
    query, key, value, rel_h, rel_w = (t.double() for t in (query, key, value, rel_h, rel_w))
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # (batch, heads, tokens, tokens)
    logits = 0.3 * query @ key.transpose(-1, -2)
    expected = torch.softmax(logits + bias, dim=-1) @ value
    actual = chunked_attention(query, key, value, 0.3, rel_h, rel_w, max_logits=max_logits)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    unbiased = chunked_attention(query, key, value, 0.3, max_logits=max_logits)
    torch.testing.assert_close(unbiased, torch.softmax(logits, dim=-1) @ value, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="both rel_h and rel_w"):
        chunked_attention(query, key, value, 0.3, rel_h)


@pytest.mark.parametrize("kind", ["dinov2", "clip", "siglip_full", "vit", "sam"])
def test_fast_path_runs_nothing_after_the_last_level(kind, teacher_dirs):
    """Blocks after the last level, SAM's neck, CLIP's post-layernorm, SigLIP's head, DINOv2's and ViT's final
    layernorm: run by transformers' forward, not by the fast path."""
    teacher = load_teacher(kind, str(teacher_dirs / kind), out_indices=[0, 1, 2, 2])
    tower = getattr(teacher.model, "vision_model", teacher.model)
    family = teacher.family
    unused = [transformer_blocks(teacher.model, family)[3]]
    unused += [getattr(tower, name) for name in ("layernorm", "post_layernorm", "head") if hasattr(tower, name)]
    if family == "sam":
        unused.append(tower.vision_encoder.neck)
    calls = []
    for module in unused:
        module.register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    x = torch.randn(1, 3, 64, 96)
    fast, reference = both_paths(teacher, x)
    assert len(calls) == len(unused)  # all of them ran once: in transformers' forward
    assert_same_maps(fast, reference, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_blocks_read_row_major_tokens(kind, teacher_dirs):
    """SAM's and SigLIP's patch embeddings are a permuted view of a convolution's output; carried through the residual
    stream, that layout made every layernorm copy and every add read strided memory (SAM-B bfloat16 on 2 CPU cores:
    3.4 s instead of 1.6 s). Every block of the fast path receives row-major tokens."""
    teacher = load_teacher(kind, str(teacher_dirs / kind), out_indices=[0, 1, 2, 3])
    layouts = []
    for block in transformer_blocks(teacher.model, teacher.family):
        first = block.layer_norm1 if teacher.family == "sam" else block  # the fast path runs SAM's blocks piecewise
        first.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    with torch.inference_mode():
        teacher(torch.randn(1, 3, 64, 96))
    assert layouts == [True] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["dinov2_registers", "clip", "siglip", "sam"])
def test_fast_path_in_half_precision_is_finite_and_close(kind, dtype, teacher_dirs):
    fp32 = load_teacher(kind, str(teacher_dirs / kind), fast_path=False)
    half = load_teacher(kind, str(teacher_dirs / kind), dtype=dtype)
    x = torch.randn(1, 3, 238, 322, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = fp32(x)
    fast, reference = both_paths(half, x)
    assert all(level.dtype == torch.float32 for level in fast)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-2
    assert_same_maps(fast, expected, tolerance)
    assert_same_maps(fast, reference, tolerance)


def test_fast_path_is_an_option_of_every_entry_point_and_of_the_cache_fingerprint(teacher_dirs):
    specs = {kind: {"hidden_size": 32, "model_id": str(teacher_dirs / kind)} for kind in ("dinov2", "sam")}
    config = SAKConfig(stem_config={"model_type": "vit", **TOWER}, teachers=specs)
    fast = SAKTeachers.from_config(config)
    slow = SAKTeachers.from_config(config, fast_path=False)
    assert all(t.fast_path for t in fast.teachers.values())
    assert not any(t.fast_path for t in slow.teachers.values())
    assert fast.fingerprint((64, 96)) != slow.fingerprint((64, 96))
    assert not load_teacher("sam", str(teacher_dirs / "sam"), fast_path=False).describe()["fast_path"]

    # Built directly from a transformers model (random weights from a config), switched at run time.
    torch.manual_seed(5)
    teacher = SAKTeacher("sam", build("sam").eval(), "sam", out_indices=[0, 1, 2, 3])
    assert teacher.fast_path and teacher.describe()["fast_path"] is True
    neck_calls = []
    teacher.model.vision_encoder.neck.register_forward_hook(lambda *_: neck_calls.append(1))
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        fast_maps = teacher(x)
        assert not neck_calls
        teacher.fast_path = False
        slow_maps = teacher(x)
    assert neck_calls and teacher.describe()["fast_path"] is False
    assert_same_maps(fast_maps, slow_maps, 1e-5)


def test_models_without_a_fast_path_run_transformers_forward(teacher_dirs, tmp_path):
    from transformers import DeiTConfig, DeiTModel

    DeiTModel(DeiTConfig(**TOWER, image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path)
    teacher = load_teacher("deit", str(tmp_path))
    assert teacher.family == "auto" and teacher.fast_path and not teacher.uses_fast_path
    assert teacher.describe()["fast_path"] is False
    with torch.inference_mode():
        assert [m.shape for m in teacher(torch.randn(1, 3, 64, 96))] == [(1, 32, 4, 6)] * 4


def test_sam_initializer_range_drives_its_weights_and_the_benchmark_refuses_near_zero_ones():
    """transformers' SamVisionConfig defaults to initializer_range=1e-10; 0.02 gives realistic weights, and
    bench/teachers_forward.py refuses a model built with the default."""
    config = {key: value for key, value in SAM_VISION.items() if key != "initializer_range"}
    default = SamVisionModel(SamVisionConfig(**config))
    realistic = SamVisionModel(SamVisionConfig(**config, initializer_range=0.02))
    assert default.vision_encoder.layers[0].attn.qkv.weight.abs().max() < 1e-8
    assert 0.015 < realistic.vision_encoder.layers[0].attn.qkv.weight.std() < 0.025

    path = Path(__file__).parents[1] / "bench" / "teachers_forward.py"
    spec = importlib.util.spec_from_file_location("teachers_forward_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.check_realistic_weights("sam", realistic)
    with pytest.raises(SystemExit, match="teacher 'sam' .*near-zero weights.*initializer_range=0.02"):
        bench.check_realistic_weights("sam", default)
    assert [bench.attention_heads(width) for width in (768, 1024, 100, 96, 192)] == [12, 16, 1, 1, 3]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "transformers"])
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_teachers_compute_in_their_own_dtype_under_any_mixed_precision(
    autocast_dtype, teacher_dtype, fast_path, teacher_dirs
):
    # train_accelerate.py runs the committee under the Accelerator's autocast: bf16 teachers under fp16 mixed
    # precision crashed ("Unexpected floating ScalarType in at::autocast::prioritize": torch.cat of a bf16 class token
    # and fp16 patches). Half-precision teachers now give exactly their autocast-free features, in every family.
    kinds = ["dinov2_registers", "clip", "siglip", "vit", "sam"]
    committee = SAKTeachers(
        {
            kind: load_teacher(kind, str(teacher_dirs / kind), dtype=teacher_dtype, fast_path=fast_path)
            for kind in kinds
        }
    )
    x = torch.randn(1, 3, 238, 322, generator=torch.Generator().manual_seed(5))
    expected = committee(x)
    with torch.autocast("cpu", dtype=autocast_dtype):
        mixed = committee(x)
    for kind in kinds:
        for got, want in zip(mixed[kind], expected[kind]):
            assert torch.equal(got, want), kind


def test_float32_teachers_follow_the_callers_autocast(teacher_dirs):
    committee = SAKTeachers({"dinov2": load_teacher("dinov2", str(teacher_dirs / "dinov2"))})
    x = torch.randn(1, 3, 238, 322, generator=torch.Generator().manual_seed(6))
    plain = committee(x)["dinov2"][-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = committee(x)["dinov2"][-1]
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, plain)
    torch.testing.assert_close(mixed, plain, rtol=5e-2, atol=5e-2)
