"""The deployed model (`optimize_for_inference`): the same function as the default path, checked piece by piece in
float64/float32 and end to end in bfloat16, and a one-way, inference-only step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_IMAGE_SIZE, nyud_labels, tiny_config

from modeling_sak import SAKForMultiTask
from modeling_sak.remote_code.fast_path_sak import SAKDeployedTaskHead, fold_batch_norm
from modeling_sak.remote_code.modeling_sak import SAKTaskHead, mix_experts


def make_model(**overrides) -> SAKForMultiTask:
    """A tiny model whose heads have non-trivial BatchNorm statistics (fresh ones fold to the identity) and, unless
    `overrides` say otherwise, plain heads (resize, then conv, as the reference): the deployed heads are compared
    with the reference's arithmetic."""
    overrides.setdefault("head_implementation", "plain")
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


@pytest.fixture(params=[True, False], ids=["low_resolution_conv", "resize_then_conv"])
def head_route(request):
    """`low_resolution_conv` of `optimize_for_inference`: each test runs through both routes of the deployed head."""
    return request.param


def test_folded_batch_norm_equals_conv_then_norm_in_float32():
    head = make_model().heads["semseg"]
    x = torch.randn(2, head.fuse_conv.in_channels, 8, 12)
    weight, bias = fold_batch_norm(head.fuse_conv, head.fuse_norm)
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
    actual = torch.autograd.grad((mixed * upstream).sum(), [*features, weights])
    reference = torch.autograd.grad((expected * upstream).sum(), [*features, weights])
    for a, e in zip(actual, reference):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"router_type": "none"}, {"teachers": {}}, {"noisy_gating": False}])
def test_deployed_model_in_float32_equals_the_default_path(overrides, head_route):
    model = make_model(**overrides)
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None, low_resolution_conv=head_route)
    assert all(isinstance(head, SAKDeployedTaskHead) for head in fast.heads.values())
    assert all(isinstance(head, SAKTaskHead) for head in model.heads.values())
    with torch.no_grad():
        for size in [TINY_IMAGE_SIZE, (70, 90), (17, 33), (128, 160)]:
            expected, actual = model(image(2, size)), fast(image(2, size))
            for task in expected.task_outputs:
                torch.testing.assert_close(
                    actual.task_outputs[task], expected.task_outputs[task], rtol=1e-5, atol=1e-5
                )
            if expected.router_weights is not None:
                torch.testing.assert_close(actual.router_weights, expected.router_weights, rtol=1e-6, atol=1e-6)


def test_training_under_bf16_autocast_stays_close_to_float32():
    """The in-place MoR mix is the training path too: under bf16 autocast it trains like float32."""
    model = make_model().train()
    low_precision = copy.deepcopy(model)
    x, labels = image(2), nyud_labels(2, *TINY_IMAGE_SIZE)
    torch.manual_seed(1)
    reference = model(x, labels=labels)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = low_precision(x, labels=labels)
    low.loss.backward()
    assert torch.isfinite(low.loss)
    torch.testing.assert_close(low.loss.float(), reference.loss, rtol=3e-2, atol=0)
    trainable = [p for p in low_precision.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_optimize_for_inference_in_bfloat16_stays_close_to_float32(head_route):
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference(low_resolution_conv=head_route)
    assert not fast.training and fast.dtype == torch.bfloat16
    assert fast.heads["depth"].folded_weight.dtype == torch.bfloat16
    for size in [TINY_IMAGE_SIZE, (128, 160)]:
        x = image(2, size)
        with torch.inference_mode():
            reference, low = model(x), fast(x)
        for task, value in reference.task_outputs.items():
            assert low.task_outputs[task].dtype == torch.bfloat16
            error = (low.task_outputs[task].float() - value).norm() / value.norm()
            assert error < 2e-2, (task, size, error)
        torch.testing.assert_close(low.router_weights["depth"], reference.router_weights["depth"], atol=2e-2, rtol=0)


@pytest.mark.parametrize("chunked_is_faster", [True, False], ids=["chunked-attention", "sdpa"])
def test_stem_attention_runs_chunked_where_that_is_faster_with_the_outputs_and_gradients_of_sdpa(
    chunked_is_faster, monkeypatch
):
    """With the default "sdpa" the stem attends with `chunked_attention` exactly where `chunked_attention_is_faster`
    says so (forced both ways here, as a CPU with or without AMX decides): deployed in bfloat16 with SDPA's outputs up
    to bfloat16 rounding, and in training under bf16 autocast with its loss and gradients; "eager" and float32 keep
    transformers' attention interface."""
    import modeling_sak.remote_code.modeling_sak as modeling

    calls = []
    real_chunked = modeling.chunked_attention
    monkeypatch.setattr(modeling, "chunked_attention", lambda *a, **k: calls.append(1) or real_chunked(*a, **k))
    faster = {"value": chunked_is_faster}
    monkeypatch.setattr(
        modeling, "chunked_attention_is_faster", lambda q: faster["value"] and q.dtype == torch.bfloat16
    )
    layers = tiny_config().stem_config.num_hidden_layers
    model = make_model()
    x = image(2, (128, 160))
    with torch.inference_mode():
        faster["value"] = False
        expected = copy.deepcopy(model).optimize_for_inference()(x)
        faster["value"] = chunked_is_faster
        actual = copy.deepcopy(model).optimize_for_inference()(x)
        assert len(calls) == (layers if chunked_is_faster else 0)
        calls.clear()
        copy.deepcopy(model).optimize_for_inference(dtype=None)(x)
        eager = copy.deepcopy(model).optimize_for_inference()
        eager.config._attn_implementation = "eager"
        eager(x)
        assert calls == []
    for task, value in expected.task_outputs.items():
        error = (actual.task_outputs[task].float() - value.float()).norm() / value.float().norm()
        assert error < 1e-2, (task, error)

    labels = nyud_labels(2, 128, 160)
    results = {}
    for run in ("float32", "sdpa", "chunked"):
        faster["value"] = run == "chunked" and chunked_is_faster
        student = copy.deepcopy(model).train()
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run != "float32"):
            loss = student(x, labels=labels).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.requires_grad])
        results[run] = loss.detach(), grads
    assert len(calls) == (layers if chunked_is_faster else 0)
    reference_loss, reference_grads = results["float32"]
    errors = {run: (grads - reference_grads).norm() / reference_grads.norm() for run, (_, grads) in results.items()}
    torch.testing.assert_close(results["chunked"][0], reference_loss, rtol=1e-3, atol=0)
    # bf16 gradients of this tiny random model are far from float32's (about 16 %) with SDPA too: chunked is no worse.
    assert errors["chunked"] <= 1.05 * errors["sdpa"], errors


def test_weights_changed_after_deployment_reach_the_heads_by_deploying_again(head_route):
    """Deployment is one-way: the fold is taken once; deploying again takes the changed weights."""
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None, low_resolution_conv=head_route)
    x = image(2)
    with torch.no_grad():
        fast(x)
        for candidate in (model, fast):  # in place, as an optimizer step would
            candidate.heads["depth"].fuse_norm.running_var.mul_(2.0)
            candidate.heads["depth"].fuse_conv.weight.add_(0.1)
        fast.optimize_for_inference(dtype=None, low_resolution_conv=head_route)
        torch.testing.assert_close(fast(x).task_outputs["depth"], model(x).task_outputs["depth"], rtol=1e-5, atol=1e-5)
        state = {k: v + 0.01 if k.endswith("fuse_conv.bias") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        fast.load_state_dict(state)  # the deployed model keeps the state-dict keys of the model
        fast.optimize_for_inference(dtype=None, low_resolution_conv=head_route)
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
    assert reloaded.dtype == torch.bfloat16
    assert all(isinstance(head, SAKTaskHead) for head in reloaded.heads.values())  # the deployment is not saved
    assert set(reloaded.state_dict()) == set(keys)
    with torch.inference_mode():
        expected = fast(x).task_outputs
        plain = reloaded(x).task_outputs
        again = reloaded.optimize_for_inference()(x).task_outputs
    for task, value in expected.items():
        assert ((plain[task].float() - value.float()).norm() / value.float().norm()) < 2e-2
        assert ((again[task].float() - value.float()).norm() / value.float().norm()) < 1e-2


def test_a_deployed_model_is_inference_only():
    fast = make_model().optimize_for_inference(dtype=None)
    folded = [p for head in fast.heads.values() for p in [*head.fuse_conv.parameters(), *head.fuse_norm.parameters()]]
    assert folded and not any(p.requires_grad for p in folded)
    fast.train()
    with pytest.raises(RuntimeError, match="deployed for inference by optimize_for_inference"):
        fast(image(2))


def test_eval_mode_gradients_of_a_deployed_model_equal_the_default_paths(head_route):
    """Gradients through the deployed heads (e.g. for saliency or fine-tuning the rest) are the default path's, for
    every parameter that still trains; the folded conv and norm are frozen, never served stale."""
    model = make_model()
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None, low_resolution_conv=head_route)
    x = image(2, (128, 160))
    for candidate in (model, fast):
        candidate(x).task_outputs["normals"].square().mean().backward()
    expected = dict(model.named_parameters())
    for name, parameter in fast.named_parameters():
        if ".fuse_conv." in name or ".fuse_norm." in name:
            assert parameter.grad is None and not parameter.requires_grad, name
        elif expected[name].grad is not None:
            scale = expected[name].grad.abs().max().item()
            torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=0, atol=1e-4 * scale, msg=name)
    assert fast.heads["normals"].classifier.weight.grad.abs().sum() > 0


def test_a_deployed_model_first_run_in_inference_mode_serves_gradients_for_the_input(head_route):
    model = make_model().requires_grad_(False)
    fast = copy.deepcopy(model).optimize_for_inference(dtype=None, low_resolution_conv=head_route)
    x = image(2, (128, 160))
    with torch.inference_mode():
        fast(x)
    gradients = []
    for candidate in (model, fast):
        pixels = x.clone().requires_grad_()
        candidate(pixels).task_outputs["depth"].sum().backward()
        gradients.append(pixels.grad)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-4 * gradients[0].abs().max().item())


def test_deploying_under_inference_mode_works_as_predict_does(head_route):
    model = make_model()
    x = image(2, (128, 160))
    with torch.inference_mode():
        expected = model(x).task_outputs
        fast = copy.deepcopy(model).optimize_for_inference(dtype=None, low_resolution_conv=head_route)
        actual = fast(x).task_outputs
    for task in expected:
        torch.testing.assert_close(actual[task], expected[task], rtol=1e-5, atol=1e-5)


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
