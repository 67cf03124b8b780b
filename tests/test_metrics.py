"""Dense metrics on small hand-made cases with known answers, and exact merging of states."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_sak.evaluation.metrics import BoundaryMetric, DepthMetric, NormalsMetric, SaliencyMetric, SemsegMetric
from modeling_sak.evaluation.registry import SINGLE_TASK_BASELINES, delta_m, make_metrics


def test_miou_and_pixel_accuracy_by_hand():
    label = torch.tensor([[[0, 0, 1, 1, 255]]])
    prediction = torch.tensor([[[0, 1, 1, 1, 2]]])
    metric = SemsegMetric(num_classes=3)
    metric.update(prediction, label)
    # class 0: TP 1, union 2 -> 0.5; class 1: TP 2, union 3 -> 2/3; class 2 absent everywhere -> 0, as the
    # reference's meters count it.
    result = metric.compute()
    assert result["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0) / 3 * 100)
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


def test_negative_depth_predictions_are_clamped_as_the_reference_does():
    metric = DepthMetric()
    metric.update(torch.tensor([[[[-3.0, 2.0]]]]), torch.tensor([[[[1.0, 2.0]]]]))
    assert metric.compute()["rmse"] == pytest.approx(math.sqrt((1 - 1e-9) ** 2 / 2))


def test_small_normal_angles_are_measured_accurately():
    angle = math.radians(0.01)  # acos of the float32 dot product returns 0 here (and 0.0198 for 0.02 degrees)
    label = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    prediction = torch.tensor([math.sin(angle), 0.0, math.cos(angle)]).view(1, 3, 1, 1)
    metric = NormalsMetric()
    metric.update(prediction, label)
    assert metric.compute()["mean"] == pytest.approx(0.01, rel=1e-3)


def test_saliency_max_f_by_hand():
    label = torch.tensor([[[1, 1, 0, 0, 255]]])
    probability = torch.tensor([[[0.9, 0.3, 0.5, 0.01, 0.99]]])
    metric = SaliencyMetric(from_logits=False)
    metric.update(probability, label)
    # t <= 0.3: P = 2/3, R = 1 -> F = 1.3 * (2/3) / (0.3 * 2/3 + 1); 0.3 < t <= 0.5: P = 1/2, R = 1/2 -> F = 1/2;
    # 0.5 < t <= 0.9: P = 1, R = 1/2 -> F = 1.3 * 0.5 / (0.3 + 0.5) = 0.8125 (the best).
    result = metric.compute()
    assert result["maxF"] == pytest.approx(81.25, abs=1e-4) and 0.5 < result["threshold"] <= 0.9
    logits = torch.stack([torch.zeros_like(probability), torch.logit(probability)], dim=1)
    from_logits = SaliencyMetric()
    from_logits.update(logits, label)
    assert torch.equal(from_logits.counts, metric.counts)
    other = SaliencyMetric(from_logits=False)
    other.update(torch.tensor([[[0.2]]]), torch.tensor([[[1]]]))
    merged = SaliencyMetric()
    merged.load_state({"counts": metric.state()["counts"] + other.state()["counts"]})
    both = SaliencyMetric(from_logits=False)
    both.update(torch.tensor([[[0.9, 0.3, 0.5, 0.01, 0.99, 0.2]]]), torch.tensor([[[1, 1, 0, 0, 255, 1]]]))
    assert torch.equal(merged.counts, both.counts)


def test_saliency_logits_inside_0_1_are_not_mistaken_for_probabilities():
    """Issue 12: `from_logits` decides, not the values of a batch (these logits all lie inside [0, 1])."""
    label = torch.tensor([[[1, 1, 0, 0, 255, 1]]])
    logits = torch.tensor([[[0.9, 0.3, 0.5, 0.01, 0.99, 0.2]]])
    on_logits, on_probabilities, misread = (
        SaliencyMetric(),
        SaliencyMetric(from_logits=False),
        SaliencyMetric(from_logits=False),
    )
    on_logits.update(logits, label)  # one channel: sigmoid
    on_probabilities.update(logits.sigmoid(), label)
    misread.update(logits, label)
    assert torch.equal(on_logits.counts, on_probabilities.counts)
    assert not torch.equal(on_logits.counts, misread.counts)
    two_class_logits = torch.stack([-logits, logits], dim=1)  # (B, 2, H, W), still inside [-1, 1]
    two_class = SaliencyMetric()
    two_class.update(two_class_logits, label)
    two_class_probabilities = SaliencyMetric(from_logits=False)
    two_class_probabilities.update(two_class_logits.softmax(1), label)
    assert torch.equal(two_class.counts, two_class_probabilities.counts)
    with pytest.raises(ValueError, match="SaliencyMetric: from_logits=False, but the predictions range over"):
        SaliencyMetric(from_logits=False).update(logits - 0.5, label)
    with pytest.raises(ValueError, match=r"neither \(B, 2, H, W\)"):
        SaliencyMetric().update(torch.zeros(1, 3, 1, 6), label)


def test_delta_m_against_the_papers_single_task_baselines():
    sak_vitb = {
        "semseg": {"mIoU": 59.93},
        "depth": {"rmse": 0.4942},
        "normals": {"mean": 17.60},
        "edge": {"odsF": 78.60},
    }
    assert delta_m(sak_vitb, "nyud_vitb") == pytest.approx(11.11, abs=0.01)  # the paper's +11.11
    assert delta_m(sak_vitb, SINGLE_TASK_BASELINES["nyud_vitb"]) == delta_m(sak_vitb, "nyud_vitb")
    assert math.isnan(delta_m({"sal": {"maxF": 80.0}}, "nyud_vitb"))
    with pytest.raises(ValueError, match="unknown baseline 'nyud_vitz'"):
        delta_m(sak_vitb, "nyud_vitz")


def test_make_metrics_picks_the_dataset_tolerance_and_rejects_unknown_choices():
    nyud = make_metrics({"semseg": 40, "edge": 1}, boundary="tolerance")
    pascal = make_metrics({"semseg": 21, "sal": 2, "edge": 1}, boundary="tolerance")
    assert isinstance(nyud["edge"], BoundaryMetric) and nyud["edge"].max_dist == 0.011
    assert pascal["edge"].max_dist == 0.0075 and isinstance(pascal["sal"], SaliencyMetric)
    probabilities = make_metrics({"edge": 1, "sal": 2}, from_logits=False, num_workers=1)
    assert probabilities["edge"].from_logits is False and probabilities["sal"].from_logits is False
    assert make_metrics({"edge": 1, "sal": 2}, num_workers=1)["edge"].from_logits is True  # the model returns logits
    with pytest.raises(ValueError, match="boundary='fast'"):
        make_metrics({"edge": 1}, boundary="fast")
    with pytest.raises(ValueError, match="no metric for task 'albedo'"):
        make_metrics({"albedo": 3})
