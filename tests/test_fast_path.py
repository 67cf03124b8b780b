"""The fast path (`optimize_for_training` / `optimize_for_inference`): the same function as the default path, checked
piece by piece in float64/float32 and end to end in bfloat16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TEACHERS, TINY_IMAGE_SIZE, nyud_labels, tiny_config

from modeling_sak import SAKForMultiTask
from modeling_sak import modeling_sak as sak
from modeling_sak.modeling_sak import mix_experts, upsampled_conv3x3


def make_model(**overrides) -> SAKForMultiTask:
    """A tiny model whose heads have non-trivial BatchNorm statistics (fresh ones fold to the identity)."""
    model = SAKForMultiTask(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in model.heads.values():
            norm = head.fuse_norm
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
    return model


def image(batch=2, size=TINY_IMAGE_SIZE, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["low_resolution_conv", "resize_then_conv"])
def head_route(request, monkeypatch):
    """Run a test through both routes of the fast head: tiny grids are below the low-resolution conv's threshold."""
    if request.param == "low_resolution_conv":
        monkeypatch.setattr(sak, "LOW_RESOLUTION_CONV_MIN_POSITIONS", 0)
    return request.param


@pytest.mark.parametrize(
    "scale, size", [((4, 4), (4, 6)), ((4, 4), (1, 1)), ((2, 2), (3, 5)), ((3, 3), (2, 4)), ((4, 2), (3, 2))]
)
def test_upsampled_conv3x3_equals_resize_then_conv_with_its_gradients(scale, size):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *size, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    upsampled_size = (size[0] * scale[0], size[1] * scale[1])
    reference = F.conv2d(
        F.interpolate(x, size=upsampled_size, mode="bilinear", align_corners=False), weight, padding=1
    )
    fast = upsampled_conv3x3(x, weight, scale)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(reference.shape, dtype=torch.float64, generator=generator)
    expected = torch.autograd.grad((reference * upstream).sum(), (x, weight))
    actual = torch.autograd.grad((fast * upstream).sum(), (x, weight))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_upsampled_conv3x3_reads_100_instead_of_144_taps_per_4x4_block():
    kernels = sak.upsampled_conv3x3_kernels(torch.randn(5, 6, 3, 3), (4, 4))
    assert sum(kernel.shape[0] // 5 * kernel.shape[2] * kernel.shape[3] for *_, kernel in kernels) == 100
    assert len(kernels) == 9


def test_folded_batch_norm_equals_conv_then_norm_in_float32():
    head = make_model().heads["semseg"]
    x = torch.randn(2, head.fuse_conv.in_channels, 8, 12)
    weight, bias = head.fold_batch_norm()
    with torch.no_grad():
        expected = head.fuse_norm(head.fuse_conv(x))
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), expected, rtol=1e-5, atol=1e-5)


def test_mix_experts_equals_the_old_left_to_right_sum_and_its_gradients():
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 24, 32, generator=generator, requires_grad=True) for _ in range(4)]
    weights = torch.randn(2, 4, generator=generator).softmax(-1).requires_grad_()
    expected = features[0] * weights[:, 0, None, None]
    for index, feature in enumerate(features[1:], start=1):
        expected = expected + feature * weights[:, index, None, None]
    mixed = mix_experts(features, weights)
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(mixed.shape, generator=generator)
    for a, e in zip(torch.autograd.grad((mixed * upstream).sum(), [*features, weights]),
                    torch.autograd.grad((expected * upstream).sum(), [*features, weights])):  # fmt: skip
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"router_type": "none"}, {"teachers": {}}, {"noisy_gating": False}])
def test_fast_path_in_float32_equals_the_default_path(overrides, head_route):
    model = make_model(**overrides)
    fast = copy.deepcopy(model).optimize_for_training()
    assert fast.fast_path and not model.fast_path
    with torch.no_grad():
        for size in [TINY_IMAGE_SIZE, (70, 90), (17, 33), (128, 160)]:
            expected, actual = model(image(2, size)), fast(image(2, size))
            for task in expected.task_outputs:
                torch.testing.assert_close(
                    actual.task_outputs[task], expected.task_outputs[task], rtol=1e-5, atol=1e-5
                )
            if expected.router_weights is not None:
                torch.testing.assert_close(actual.router_weights, expected.router_weights, rtol=1e-6, atol=1e-6)


def test_fast_path_training_step_gives_the_default_losses_and_gradients():
    model = make_model().train()
    fast = copy.deepcopy(model).optimize_for_training()
    x, labels = image(2), nyud_labels(2, *TINY_IMAGE_SIZE)
    teachers = {name: [torch.randn(2, 32, 4, 6) for _ in range(4)] for name in TEACHERS}
    outputs = {}
    for name, candidate in (("default", model), ("fast", fast)):
        torch.manual_seed(1)  # the same gating noise
        outputs[name] = candidate(x, labels=labels, teacher_features=teachers)
        outputs[name].loss.backward()
    torch.testing.assert_close(outputs["fast"].loss, outputs["default"].loss, rtol=1e-5, atol=1e-5)
    expected = dict(model.named_parameters())
    for name, parameter in fast.named_parameters():
        reference = expected[name].grad
        if name.endswith("fuse_conv.bias"):  # in front of a training-mode BatchNorm: a zero gradient up to float noise
            scale = expected[name.replace(".bias", ".weight")].grad.abs().max()
            assert max(parameter.grad.abs().max(), reference.abs().max()) < 1e-3 * scale, (name, scale)
            continue
        scale = reference.abs().max().item()
        torch.testing.assert_close(parameter.grad, reference, rtol=0, atol=1e-4 * scale, msg=name)
    # Batch statistics were tracked the same way.
    for task, head in fast.heads.items():
        torch.testing.assert_close(head.fuse_norm.running_var, model.heads[task].fuse_norm.running_var)


def test_fast_path_under_bf16_autocast_trains_close_to_float32():
    model = make_model().train()
    fast = copy.deepcopy(model).optimize_for_training()
    x, labels = image(2), nyud_labels(2, *TINY_IMAGE_SIZE)
    torch.manual_seed(1)
    reference = model(x, labels=labels)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x, labels=labels)
    low.loss.backward()
    assert torch.isfinite(low.loss)
    torch.testing.assert_close(low.loss.float(), reference.loss, rtol=3e-2, atol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters() if p.requires_grad)


def test_optimize_for_inference_in_bfloat16_stays_close_to_float32(head_route):
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference()
    assert not fast.training and fast.dtype == torch.bfloat16
    for size in [TINY_IMAGE_SIZE, (128, 160)]:
        x = image(2, size)
        with torch.inference_mode():
            reference, low = model(x), fast(x)
        for task, value in reference.task_outputs.items():
            assert low.task_outputs[task].dtype == torch.bfloat16
            error = (low.task_outputs[task].float() - value).norm() / value.norm()
            assert error < 2e-2, (task, size, error)
        torch.testing.assert_close(low.router_weights["depth"], reference.router_weights["depth"], atol=2e-2, rtol=0)


def test_folded_conv_is_refolded_when_weights_change(head_route):
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None)
    x = image(2)
    with torch.no_grad():
        fast(x)
        for candidate in (model, fast):  # in place, as an optimizer step or load_state_dict would
            candidate.heads["depth"].fuse_norm.running_var.mul_(2.0)
            candidate.heads["depth"].fuse_conv.weight.add_(0.1)
        torch.testing.assert_close(fast(x).task_outputs["depth"], model(x).task_outputs["depth"], rtol=1e-5, atol=1e-5)
        state = {k: v + 0.01 if k.endswith("fuse_conv.bias") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        fast.load_state_dict(state)
        torch.testing.assert_close(fast(x).task_outputs["edge"], model(x).task_outputs["edge"], rtol=1e-5, atol=1e-5)


def test_optimizing_leaves_the_state_dict_keys_and_save_pretrained_loadable(tmp_path):
    model = make_model()
    keys = list(model.state_dict())
    x = image(2)
    fast32 = copy.deepcopy(model).optimize_for_inference(dtype=None)
    assert list(fast32.state_dict()) == keys
    for key, value in fast32.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    fast = copy.deepcopy(model).optimize_for_inference()
    assert list(fast.state_dict()) == keys
    fast.save_pretrained(tmp_path / "bf16")
    reloaded = SAKForMultiTask.from_pretrained(tmp_path / "bf16").eval()
    assert reloaded.dtype == torch.bfloat16 and not reloaded.fast_path  # the fast path is not saved
    assert set(reloaded.state_dict()) == set(keys)
    with torch.inference_mode():
        expected = fast(x).task_outputs
        plain = reloaded(x).task_outputs
        again = reloaded.optimize_for_inference()(x).task_outputs
    for task, value in expected.items():
        assert ((plain[task].float() - value.float()).norm() / value.float().norm()) < 2e-2
        assert ((again[task].float() - value.float()).norm() / value.float().norm()) < 1e-2


def test_switching_the_fast_path_off_restores_the_default_path_exactly():
    model = make_model()
    with torch.no_grad():
        expected = model(image(2)).task_outputs
        toggled = copy.deepcopy(model).optimize_for_training().optimize_for_training(enabled=False)
        actual = toggled(image(2)).task_outputs
    assert not toggled.fast_path
    for task in expected:
        torch.testing.assert_close(actual[task], expected[task], rtol=0, atol=0)


def test_eval_mode_with_gradients_keeps_the_conv_and_norm_trainable(head_route):
    """Fine-tuning in eval mode (frozen BatchNorm statistics) gets the default path's gradients, not a cached fold."""
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None)
    x = image(2, (128, 160))
    for candidate in (model, fast):
        candidate(x).task_outputs["normals"].square().mean().backward()
    expected = dict(model.named_parameters())
    for name, parameter in fast.named_parameters():
        if expected[name].grad is not None:
            scale = expected[name].grad.abs().max().item()
            torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=0, atol=1e-4 * scale, msg=name)
    assert fast.heads["normals"].fuse_conv.weight.grad.abs().sum() > 0


def test_a_fold_cached_in_inference_mode_serves_gradients_for_the_input(head_route):
    model = make_model().requires_grad_(False)
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None)
    x = image(2, (128, 160))
    with torch.inference_mode():
        fast(x)  # caches the fold (and kernels) in inference mode
    gradients = []
    for candidate in (model, fast):
        pixels = x.clone().requires_grad_()
        candidate(pixels).task_outputs["depth"].sum().backward()
        gradients.append(pixels.grad)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-4 * gradients[0].abs().max().item())


@pytest.mark.slow
def test_compiled_inference_matches_eager_fast_path():
    model = make_model()
    eager = copy.deepcopy(model).optimize_for_inference(dtype=None)
    compiled = copy.deepcopy(model).optimize_for_inference(dtype=None, compile=True)
    assert list(compiled.state_dict()) == list(model.state_dict())
    with torch.inference_mode():
        expected, actual = eager(image(2)).task_outputs, compiled(image(2)).task_outputs
    for task in expected:
        torch.testing.assert_close(actual[task], expected[task], rtol=1e-4, atol=1e-4)


def test_train_mode_frees_the_folded_conv_and_eval_refolds_it():
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None)
    assert "_folded" in fast.heads["semseg"].__dict__
    fast.train()
    assert "_folded" not in fast.heads["semseg"].__dict__
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(image(2)).task_outputs["semseg"], model(image(2)).task_outputs["semseg"],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
