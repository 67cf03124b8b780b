"""Each loss of DESIGN section 2 on small hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from modeling_sak.remote_code import losses
from modeling_sak.remote_code.losses import (
    balanced_bce_loss,
    cross_entropy_loss,
    distillation_loss,
    l1_loss,
    match_feature_grids,
    normals_l1_loss,
    sak_loss,
    task_loss,
    upsampled_distillation_loss,
)


def test_cross_entropy_sums_over_valid_pixels_and_divides_by_their_number():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy_loss(logits, labels[:, None]).item() == pytest.approx(expected, rel=1e-6)  # (B, 1, H, W)


def test_balanced_cross_entropy_weights_classes_by_the_batch_balance():
    logits = torch.tensor([[[[1.0, 0.0, 0.5, 3.0]], [[0.0, 2.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[1, 0, 0, 255]]])
    w = 2 / 3  # fraction of valid background pixels
    log_p = torch.log_softmax(logits[0, :, 0, :3], dim=0)
    expected = -(w * log_p[1, 0] + (1 - w) * log_p[0, 1] + (1 - w) * log_p[0, 2]) / 3
    assert task_loss("balanced_cross_entropy", logits, labels, "sal").item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_normals_loss_normalises_the_prediction_and_skips_pixels_with_255():
    prediction = torch.tensor([[[[3.0, 1.0]], [[0.0, 1.0]], [[4.0, 1.0]]]])  # pixel 0 -> (0.6, 0, 0.8)
    labels = torch.tensor([[[[1.0, 255.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # pixel 1 ignored (one channel is 255)
    assert normals_l1_loss(prediction, labels).item() == pytest.approx(0.4 + 0.8, rel=1e-6)


def test_depth_l1_ignores_255():
    prediction = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    labels = torch.tensor([[[[1.5, 255.0, 2.0]]]])
    assert l1_loss(prediction, labels).item() == pytest.approx((0.5 + 1.0) / 2)
    assert l1_loss(prediction, labels[:, 0]).item() == pytest.approx(0.75)  # (B, H, W) labels too


def test_balanced_bce_is_hed_style():
    logits = torch.tensor([[[[0.0, 2.0, -5.0]]]])
    labels = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    w = 0.95
    expected = (w / (1 - w) * math.log(2) + math.log(1 + math.exp(2))) / 2 * (1 - w)
    assert balanced_bce_loss(logits, labels, pos_weight=w).item() == pytest.approx(expected, rel=1e-6)


def test_all_ignored_gives_zero_not_nan():
    labels = torch.full((1, 1, 2, 2), 255.0)
    assert l1_loss(torch.ones(1, 1, 2, 2), labels).item() == 0.0
    assert cross_entropy_loss(torch.zeros(1, 3, 2, 2), labels[:, 0].long()).item() == 0.0


def test_distillation_cos_l1_and_l2_variants():
    student = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    teacher = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    # cos = 0 -> 1 - cos = 1; smooth L1 with |d| = 1 per element -> 0.5 each, mean 0.5.
    assert distillation_loss(student, teacher, "cos+l1").item() == pytest.approx(0.9 * 1 + 0.1 * 0.5)
    assert distillation_loss(student, teacher, "cos").item() == pytest.approx(1.0)
    assert distillation_loss(student, teacher, "l2").item() == pytest.approx(1.0)
    # The cosine is taken over each sample's whole flattened map, then averaged over the batch.
    s = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 2, 1, 2)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, -1.0, -1.0]]).reshape(2, 2, 1, 2)
    assert distillation_loss(s, t, "cos").item() == pytest.approx((0.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="distill_loss_type"):
        distillation_loss(s, t, "kl")


@pytest.mark.parametrize("teacher_grid", [(16, 16), (4, 6), (3, 4)])
@pytest.mark.parametrize("teacher_layout", ["row-major", "channels-last"])
def test_distillation_loss_is_torchs_composition_in_any_memory_layout(teacher_grid, teacher_layout):
    """The loss equals 0.9 * F.cosine_embedding_loss of the flattened maps + 0.1 * F.smooth_l1_loss after the grid
    rule (the reference's composition), with its gradient, for student maps seen from tokens (channels-last strides,
    as the model makes them) and teacher maps of either layout, at a larger, equal and smaller teacher grid."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4 * 6, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    student = tokens.transpose(1, 2).reshape(2, 8, 4, 6)  # as SAKForMultiTask._student_features makes it
    teacher = torch.randn(2, 8, *teacher_grid, dtype=torch.float64, generator=generator)
    if teacher_layout == "channels-last":
        teacher = teacher.contiguous(memory_format=torch.channels_last)
    s, t = match_feature_grids(student, teacher)
    cosine = F.cosine_embedding_loss(s.flatten(1), t.flatten(1), torch.ones(2, dtype=torch.float64))
    expected = 0.9 * cosine + 0.1 * F.smooth_l1_loss(s, t, beta=1.0)
    actual = distillation_loss(student, teacher, "cos+l1")
    assert actual.dtype == torch.float32  # losses are computed in float32 (module docstring)
    actual = distillation_loss(student, teacher.float(), "cos+l1")
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=0)
    (expected_gradient,) = torch.autograd.grad(expected, tokens)
    (gradient,) = torch.autograd.grad(actual, tokens)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-5, atol=1e-9)


def _composed_distillation(student: torch.Tensor, teacher: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The reference's composition: the student resized to the (taller) teacher grid, then torch's losses."""
    resized = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    if loss_type == "l2":
        return F.mse_loss(resized, teacher)
    ones = torch.ones(student.shape[0], dtype=student.dtype)
    cosine = F.cosine_embedding_loss(resized.flatten(1), teacher.flatten(1), ones)
    return cosine if loss_type == "cos" else 0.9 * cosine + 0.1 * F.smooth_l1_loss(resized, teacher, beta=1.0)


@pytest.mark.parametrize("loss_type", ["cos+l1", "cos", "l2"])
@pytest.mark.parametrize(
    ("student_grid", "teacher_grid"), [((14, 18), (64, 64)), ((4, 6), (9, 13)), ((3, 5), (7, 4)), ((2, 2), (3, 2))]
)
@pytest.mark.parametrize("chunk_elements", [1 << 20, 1])
@pytest.mark.parametrize("teacher_layout", ["row-major", "channels-last"])
def test_upsampled_distillation_is_the_composition_in_float64(
    loss_type, student_grid, teacher_grid, chunk_elements, teacher_layout, monkeypatch
):
    """Value and gradient of the chunked loss equal the resize-then-loss composition (float64, relative 1e-12 and
    1e-10) at SAM's grid against ViT-B/16's at 224 x 288, at grids that are not multiples of each other, a narrower
    teacher (the width is downsampled), in one chunk and in one-row chunks, for both teacher layouts."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(1)
    channels = 8
    tokens = torch.randn(2, math.prod(student_grid), channels, dtype=torch.float64, generator=generator)
    tokens.requires_grad_(True)
    student = tokens.transpose(1, 2).reshape(2, channels, *student_grid)  # as SAKForMultiTask._student_features
    teacher = 1.5 * torch.randn(2, channels, *teacher_grid, dtype=torch.float64, generator=generator)
    if teacher_layout == "channels-last":
        teacher = teacher.contiguous(memory_format=torch.channels_last)
    expected = _composed_distillation(student, teacher, loss_type)
    (expected_gradient,) = torch.autograd.grad(expected, tokens)
    actual = upsampled_distillation_loss(student, teacher, loss_type)
    assert actual.dtype == torch.float64
    (gradient,) = torch.autograd.grad(actual, tokens)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-10 * expected_gradient.abs().max())


def test_upsampled_distillation_under_autocast_reads_a_bf16_teacher_in_float32():
    """Under bf16 autocast (training) the loss and its gradient are bit-identical to the float32 computation on the
    same bf16 teacher values, and a no-grad evaluation gives the same value."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 14 * 18, 16, generator=generator, requires_grad=True)
    student = tokens.transpose(1, 2).reshape(2, 16, 14, 18)
    teacher = torch.randn(2, 64, 64, 16, generator=generator).to(torch.bfloat16).permute(0, 3, 1, 2)  # as SAM's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = distillation_loss(student, teacher)
    (autocast_gradient,) = torch.autograd.grad(under_autocast, tokens)
    plain = distillation_loss(student, teacher.float())
    (plain_gradient,) = torch.autograd.grad(plain, tokens)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain) and torch.equal(autocast_gradient, plain_gradient)
    with torch.no_grad():
        assert torch.equal(distillation_loss(student, teacher), plain)
    expected = _composed_distillation(student.double(), teacher.double(), "cos+l1")
    torch.testing.assert_close(plain.double(), expected, rtol=1e-6, atol=0)


def test_distillation_maps_of_different_width_are_named():
    with pytest.raises(ValueError, match=r"same batch size and channels.*\(2, 8, 4, 4\).*\(2, 6, 8, 8\)"):
        distillation_loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 6, 8, 8))


def test_grid_rule_resizes_the_student_only_when_the_teacher_is_taller():
    student = torch.randn(1, 4, 2, 3)
    s, t = match_feature_grids(student, torch.randn(1, 4, 4, 4))  # taller teacher (SAM 64x64 vs 28x36)
    assert s.shape[-2:] == (4, 4) and t.shape[-2:] == (4, 4)
    s, t = match_feature_grids(student, torch.randn(1, 4, 2, 8))  # same height, wider teacher -> teacher resized
    assert s.shape[-2:] == (2, 3) and t.shape[-2:] == (2, 3)
    s, t = match_feature_grids(student, torch.randn(1, 4, 1, 9))  # shorter teacher -> teacher resized
    assert s is student and t.shape[-2:] == (2, 3)
    expected = torch.nn.functional.interpolate(student, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(match_feature_grids(student, torch.randn(1, 4, 4, 4))[0], expected)


def test_label_shape_errors_name_the_task():
    with pytest.raises(ValueError, match=r"labels\['depth'\] has spatial size"):
        task_loss("l1", torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2), "depth")
    with pytest.raises(ValueError, match=r"labels\['normals'\] must be \(batch_size, 3"):
        task_loss("normals_l1", torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), "normals")


def test_sak_loss_weights_the_tasks_and_adds_alpha_times_the_distillation_total():
    weights = {"depth": 2.0, "edge": 50.0}
    config = tiny_config(
        tasks={"depth": 1, "edge": 1}, task_loss_weights=weights, teachers={"clip": 32}, distill_alpha=0.5
    )
    outputs = {"depth": torch.rand(1, 1, 4, 6), "edge": torch.randn(1, 1, 4, 6)}
    labels = {"depth": torch.rand(1, 1, 4, 6), "edge": (torch.rand(1, 1, 4, 6) > 0.5).float()}
    student = {"clip": tuple(torch.randn(1, 32, 2, 3) for _ in range(4))}
    teacher = {"clip": [torch.randn(1, 32, 2, 3) for _ in range(4)]}
    loss, task_losses, distill_losses = sak_loss(config, outputs, labels, student, teacher)
    assert task_losses["depth"] == task_loss("l1", outputs["depth"], labels["depth"], "depth")
    assert list(distill_losses) == ["clip_level1", "clip_level2", "clip_level3", "clip_level4"]
    expected = 2.0 * task_losses["depth"] + 50.0 * task_losses["edge"] + 0.5 * sum(distill_losses.values())
    torch.testing.assert_close(loss, expected)
    assert sak_loss(config, outputs, labels)[2] is None  # no teacher features: no distillation part
    assert sak_loss(config, outputs, None, student, teacher)[1] is None  # no labels: no task part
    with pytest.raises(ValueError, match="labels lack the tasks"):
        sak_loss(config, outputs, {"depth": labels["depth"]})
