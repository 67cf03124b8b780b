"""Dense metrics on small hand-made cases with known answers, and exact merging of states."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_sak.evaluation.metrics import DepthMetric, NormalsMetric, SemsegMetric


def test_miou_and_pixel_accuracy_by_hand():
    label = torch.tensor([[[0, 0, 1, 1, 255]]])
    prediction = torch.tensor([[[0, 1, 1, 1, 2]]])
    metric = SemsegMetric(num_classes=3)
    metric.update(prediction, label)
    # class 0: TP 1, union 2 -> 0.5; class 1: TP 2, union 3 -> 2/3; class 2 absent everywhere -> skipped.
    result = metric.compute()
    assert result["mIoU"] == pytest.approx((0.5 + 2 / 3) / 2 * 100)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4 * 100)
    logits = torch.nn.functional.one_hot(prediction.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    from_logits = SemsegMetric(3)
    from_logits.update(logits, label)
    assert torch.equal(from_logits.confusion, metric.confusion)


def test_depth_is_pooled_over_valid_pixels():
    label = torch.tensor([[[[1.0, 2.0, 255.0, 0.0]]]])
    first, second = DepthMetric(), DepthMetric()
    first.update(torch.tensor([[[[2.0, 2.0, 9.0, 9.0]]]]), label)
    second.update(torch.tensor([[[[1.0]]]]), torch.tensor([[[[4.0]]]]))
    merged = DepthMetric()
    merged.load_state({"sums": first.state()["sums"] + second.state()["sums"]})
    result = merged.compute()
    assert result["rmse"] == pytest.approx(math.sqrt((1 + 0 + 9) / 3))  # pooled, not the mean of per-image RMSEs
    assert result["abs_rel"] == pytest.approx((1 + 0 + 0.75) / 3)
    assert result["delta1"] == pytest.approx(100 / 3)


def test_normal_angles_mean_median_and_within():
    label = torch.zeros(1, 3, 1, 4)
    label[:, 2] = 1.0  # +z
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 20.0, 40.0]))
    prediction = torch.stack([torch.sin(angles), torch.zeros(4), torch.cos(angles)]).view(1, 3, 1, 4) * 3.0
    metric = NormalsMetric()
    metric.update(prediction, label)
    ignored = torch.full((1, 3, 1, 1), 255.0)
    metric.update(torch.ones(1, 3, 1, 1), ignored)  # fully ignored pixel
    result = metric.compute()
    assert result["mean"] == pytest.approx(17.5, abs=1e-3)
    assert result["median"] == pytest.approx(10.0, abs=0.02)
    assert result["within_11.25"] == pytest.approx(50.0) and result["within_30"] == pytest.approx(75.0)
