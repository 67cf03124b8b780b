"""The training step's optimizer: `make_optimizer` is AdamW over `parameter_groups`, fused where torch can, with the
per-parameter loop's updates bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import TEACHERS, TINY_IMAGE_SIZE, nyud_labels, tiny_config

from modeling_sak import SAKForMultiTask
from modeling_sak.training.optimization import make_optimizer, parameter_groups


def train(model: SAKForMultiTask, optimizer: torch.optim.Optimizer, steps: int = 3) -> list[float]:
    """`steps` stage-2 steps on fixed random data (task losses and distillation) with gradient clipping."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, *TINY_IMAGE_SIZE, generator=generator)
    labels = nyud_labels(2, *TINY_IMAGE_SIZE)
    grid = (TINY_IMAGE_SIZE[0] // 16, TINY_IMAGE_SIZE[1] // 16)
    teacher_features = {name: [torch.randn(2, 32, *grid, generator=generator) for _ in range(4)] for name in TEACHERS}
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = model(pixel_values, labels=labels, teacher_features=teacher_features).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def twin_models() -> tuple[SAKForMultiTask, SAKForMultiTask]:
    """Two tiny SAKs with equal weights and a frozen patch embedding (frozen parameters stay out of every group)."""
    torch.manual_seed(0)
    models = SAKForMultiTask(tiny_config()).train(), SAKForMultiTask(tiny_config()).train()
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.stem.embeddings.patch_embeddings.requires_grad_(False)
    return models


def group_names(model, optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def test_make_optimizer_is_fused_adamw_over_the_training_groups():
    model, reference = twin_models()
    optimizer = make_optimizer(model, learning_rate=1e-3, weight_decay=0.05)
    loop = torch.optim.AdamW(parameter_groups(reference, 0.05), lr=1e-3, foreach=False)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in optimizer.param_groups)  # torch has a fused CPU AdamW
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3]
    assert group_names(model, optimizer) == group_names(reference, loop)
    assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])


def test_a_fused_step_is_the_loops_step_to_float32_rounding():
    """From the same weights and gradients, the fused step's weights equal the per-parameter loop's to within 1e-5 of
    the update (the last bit of the weight: the fused kernel evaluates the same formula in another order); a whole
    training run stays on the loop's trajectory."""
    model, reference = twin_models()
    optimizer = make_optimizer(model, learning_rate=1e-3, weight_decay=0.05)
    loop = torch.optim.AdamW(parameter_groups(reference, 0.05), lr=1e-3, foreach=False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    for p, q in zip(model.parameters(), reference.parameters()):
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
    optimizer.step()
    loop.step()
    expected = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        update = (expected[name] - before[name]).abs().max()
        if not parameter.requires_grad:
            assert update == 0 and torch.equal(parameter, before[name]), name
            continue
        assert (parameter - expected[name]).abs().max() <= 1e-5 * update, name
    for state, reference_state in zip(optimizer.state.values(), loop.state.values()):  # the moments bit for bit
        assert torch.equal(state["exp_avg"], reference_state["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], reference_state["exp_avg_sq"])

    model, reference = twin_models()
    optimizer = make_optimizer(model, learning_rate=1e-3, weight_decay=0.05)
    loop = torch.optim.AdamW(parameter_groups(reference, 0.05), lr=1e-3, foreach=False)
    losses, expected_losses = train(model, optimizer, steps=4), train(reference, loop, steps=4)
    assert expected_losses[-1] < expected_losses[0]
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
def test_make_optimizer_falls_back_to_foreach_with_the_loops_updates_bit_for_bit():
    model, reference = twin_models()
    model.to(torch.complex64)  # no fused AdamW for complex parameters
    reference.to(torch.complex64)
    optimizer = make_optimizer(model, learning_rate=1e-3, weight_decay=0.05)
    loop = torch.optim.AdamW(parameter_groups(reference, 0.05), lr=1e-3, foreach=False)
    assert all(not group["fused"] and group["foreach"] for group in optimizer.param_groups)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, dtype=torch.complex64, generator=generator)
                q.grad = p.grad.clone()
        optimizer.step()
        loop.step()
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
