"""The task heads' low-resolution conv (`head_implementation="low_resolution"`, the default) is the plain head's
function: resize, then 3x3 conv, as the reference computes it. Checked in float64 with gradients on the conv alone,
on one head in training mode (BatchNorm on batch statistics) and on a whole model's training step, at the paper's
patch grid and at sizes that are not multiples of 4 or of the patch size; and counted in FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEACHERS, nyud_labels, tiny_config, tiny_stem
from torch.utils.flop_counter import FlopCounterMode

from modeling_sak import SAKConfig, SAKForMultiTask
from modeling_sak.remote_code import fast_path_sak
from modeling_sak.remote_code.fast_path_sak import resized_conv3x3
from modeling_sak.remote_code.modeling_sak import SAKTaskHead


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Largest absolute difference over the largest expected magnitude (or over `floor`, when that is larger: a
    gradient that is zero in exact arithmetic, as a conv bias's before training-mode BatchNorm, is rounding noise)."""
    return ((actual - expected).abs().max() / max(expected.abs().max().item(), floor)).item()


def gradient_floor(gradients) -> float:
    """1e-3 of the largest gradient entry: a tensor whose gradients are all smaller is compared at that scale (1e-10
    of it is 1e-13 of the largest gradient), every other one at its own."""
    return 1e-3 * max(g.abs().max().item() for g in gradients)


def plain_resized_conv3x3(tokens, grid, weight, size, bias=None):
    """The reference arithmetic, restated: the token map resized bilinearly, then the 3x3 conv (zero padding 1)."""
    batch, _, channels = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, channels, *grid)
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return F.conv2d(resized, weight, bias, padding=1).permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    "grid, size",
    [
        ((28, 36), (112, 144)),  # 448x576, the paper's NYUD-v2 crop, at patch 16
        ((4, 6), (16, 24)),
        ((1, 1), (4, 4)),
        ((4, 5), (14, 17)),  # patch 14 (DINOv2 stems): a 3.5x resize
        ((5, 3), (17, 10)),  # not a multiple of 4 or of the grid
        ((4, 4), (2, 3)),  # down-scaling
    ],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_resized_conv3x3_equals_resize_then_conv_with_its_gradients(grid, size, with_bias):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, grid[0] * grid[1], 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    expected = plain_resized_conv3x3(tokens, grid, weight, size, bias)
    actual = resized_conv3x3(tokens, grid, weight, size, bias)
    assert actual.shape == expected.shape == (2, *size, 5)
    assert relative_error(actual, expected) < 1e-12
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = (tokens, weight, bias) if with_bias else (tokens, weight)
    for a, e in zip(
        torch.autograd.grad((actual * upstream).sum(), inputs),
        torch.autograd.grad((expected * upstream).sum(), inputs),
    ):
        assert relative_error(a, e) < 1e-10


def test_resized_conv3x3_names_mismatched_shapes():
    with pytest.raises(ValueError, match=r"tokens \(1, 6, 4\) and weight \(5, 4, 3, 3\) do not fit grid \(2, 2\)"):
        resized_conv3x3(torch.randn(1, 6, 4), (2, 2), torch.randn(5, 4, 3, 3), (8, 8))


def test_resize_matrices_made_under_inference_mode_serve_a_later_training_step():
    """The matrices are cached: one first made under `torch.inference_mode()` (predict, evaluation) must still be
    usable when autograd saves it for backward."""
    fast_path_sak._cached_tap_resize_matrix.cache_clear()
    fast_path_sak._cached_bilinear_resize_matrix.cache_clear()
    tokens = torch.randn(1, 6, 4, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with torch.inference_mode():
        resized_conv3x3(tokens, (2, 3), weight, (8, 12))
    tokens.requires_grad_()
    resized_conv3x3(tokens, (2, 3), weight, (8, 12)).sum().backward()
    assert tokens.grad is not None


def head_pair(config_overrides: dict, seed: int = 0) -> tuple[SAKTaskHead, SAKTaskHead]:
    """A plain and a low-resolution head with the same float64 weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    plain = SAKTaskHead(tiny_config(head_implementation="plain", **config_overrides), 40).double()
    with torch.no_grad():
        plain.fuse_norm.running_mean.normal_()
        plain.fuse_norm.running_var.uniform_(0.5, 1.5)
        plain.fuse_norm.weight.uniform_(0.5, 1.5)
        plain.fuse_norm.bias.normal_()
    fast = SAKTaskHead(tiny_config(**config_overrides), 40).double()
    fast.load_state_dict(plain.state_dict())
    assert not plain.low_resolution_conv and fast.low_resolution_conv
    return plain, fast


@pytest.mark.parametrize("grid, output_size", [((28, 36), (448, 576)), ((4, 6), (64, 96)), ((3, 5), (42, 70))])
@pytest.mark.parametrize("training", [True, False])
def test_a_low_resolution_head_is_the_plain_head_with_its_gradients(grid, output_size, training):
    plain, fast = head_pair({"stem_config": tiny_stem(hidden_size=64), "teachers": {}})
    plain.train(training)
    fast.train(training)
    generator = torch.Generator().manual_seed(1)
    features = [
        torch.randn(2, grid[0] * grid[1], 64, dtype=torch.float64, generator=generator, requires_grad=True)
        for _ in range(4)
    ]
    expected = plain(features, grid, output_size)
    actual = fast(features, grid, output_size)
    assert actual.shape == expected.shape == (2, 40, *output_size)
    assert relative_error(actual, expected) < 1e-12
    fast_buffers = dict(fast.named_buffers())
    assert torch.equal(fast_buffers["fuse_norm.num_batches_tracked"], plain.fuse_norm.num_batches_tracked)
    for name in ("fuse_norm.running_mean", "fuse_norm.running_var"):  # training mode updates them alike
        assert relative_error(fast_buffers[name], dict(plain.named_buffers())[name]) < 1e-12, name
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = [*features, *plain.parameters()]
    fast_inputs = [*features, *fast.parameters()]
    names = ["features"] * 4 + [name for name, _ in plain.named_parameters()]
    actual_gradients = torch.autograd.grad((actual * upstream).sum(), fast_inputs)
    expected_gradients = torch.autograd.grad((expected * upstream).sum(), inputs)
    floor = gradient_floor(expected_gradients)
    for name, a, e in zip(names, actual_gradients, expected_gradients):
        assert relative_error(a, e, floor) < 1e-10, name


def model_pair(**overrides) -> tuple[SAKForMultiTask, SAKForMultiTask]:
    torch.manual_seed(0)
    plain = SAKForMultiTask(tiny_config(head_implementation="plain", **overrides)).double().train()
    fast = SAKForMultiTask(tiny_config(**overrides)).double().train()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, (64, 96)),
        ({}, (50, 70)),  # padded to 64x80 for the patch, cropped back
        ({"stem_config": tiny_stem(model_type="dinov2", patch_size=14), "image_size": [56, 70]}, (56, 70)),
        ({"router_type": "none"}, (64, 96)),
    ],
    ids=["patch16", "not-a-patch-multiple", "patch14", "router-none"],
)
def test_a_training_step_of_the_whole_model_has_the_plain_heads_gradients(overrides, size):
    """Loss and every parameter's gradient of one stage-2 step (task losses, distillation, noisy gating, BatchNorm
    on batch statistics) are the plain heads' in float64."""
    plain, fast = model_pair(**overrides)
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, *size, dtype=torch.float64, generator=generator)
    labels = {
        key: value.double() if value.is_floating_point() else value for key, value in nyud_labels(2, *size).items()
    }
    patch = plain.config.patch_size
    grid = (-(-size[0] // patch[0]), -(-size[1] // patch[1]))
    teacher_features = {
        name: [torch.randn(2, 32, *grid, dtype=torch.float64, generator=generator) for _ in range(4)]
        for name in TEACHERS
    }
    losses = []
    for model in (plain, fast):
        torch.manual_seed(3)  # the same gating noise
        outputs = model(pixel_values, labels=labels, teacher_features=teacher_features)
        outputs.loss.backward()
        losses.append(outputs.loss)
    assert relative_error(losses[1], losses[0]) < 1e-12
    expected = dict(plain.named_parameters())
    floor = gradient_floor(p.grad for p in expected.values())
    for name, parameter in fast.named_parameters():
        assert parameter.grad is not None, name
        assert relative_error(parameter.grad, expected[name].grad, floor) < 1e-10, name


def test_checkpoints_are_the_same_under_either_implementation(tmp_path):
    plain, fast = model_pair()
    assert SAKConfig().head_implementation == "low_resolution"
    assert list(plain.state_dict()) == list(fast.state_dict())
    plain.save_pretrained(tmp_path / "plain")
    reloaded = SAKForMultiTask.from_pretrained(tmp_path / "plain", head_implementation="low_resolution").double()
    pixel_values = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = plain.eval()(pixel_values).task_outputs
        actual = reloaded.eval()(pixel_values).task_outputs
    for task, value in expected.items():
        assert relative_error(actual[task], value) < 1e-12, task
    with pytest.raises(ValueError, match=r"head_implementation='fast' is not one of \['low_resolution', 'plain'\]"):
        tiny_config(head_implementation="fast")


@pytest.mark.parametrize("size", [(224, 288), (448, 576)])
def test_a_vit_b_head_does_under_a_tenth_of_the_plain_heads_flops(size):
    """Counted on meta tensors (nothing is computed), forward and backward of one ViT-B NYUD-v2 head at batch 2."""
    config = SAKConfig(teachers={}, tasks="nyud_v2", image_size=list(size))
    grid = (size[0] // 16, size[1] // 16)
    flops = {}
    for implementation in ("plain", "low_resolution"):
        with torch.device("meta"):
            head = SAKTaskHead(SAKConfig(**{**config.to_dict(), "head_implementation": implementation}), 40)
            features = [torch.randn(2, grid[0] * grid[1], 768, requires_grad=True) for _ in range(4)]
        with FlopCounterMode(display=False) as counter:
            head(features, grid, size).sum().backward()
        flops[implementation] = counter.get_total_flops()
    assert flops["low_resolution"] < flops["plain"] / 10, flops
