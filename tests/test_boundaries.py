"""BSDS-style boundary odsF: hand-made cases with known answers, a brute-force check of the matcher, NMS, merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.optimize import linear_sum_assignment
from skimage.morphology import thin as skimage_thin

from modeling_sak.evaluation.boundaries import (
    OUTLIER_COST,
    SEISM_THRESHOLDS,
    BoundaryODSMetric,
    boundary_counts,
    correspond_pixels,
    edge_nms,
    edge_orientation,
    match_edge_pixels,
    thin,
)
from modeling_sak.evaluation.metrics import BoundaryMetric


def square_outline(size: int = 64, top: int = 16, side: int = 32) -> np.ndarray:
    """A 1-pixel-wide square outline without its corner pixels (so thinning keeps it as is), uint8: 1 = edge."""
    gt = np.zeros((size, size), dtype=np.uint8)
    gt[top, top + 1 : top + side - 1] = gt[top + side - 1, top + 1 : top + side - 1] = 1
    gt[top + 1 : top + side - 1, top] = gt[top + 1 : top + side - 1, top + side - 1] = 1
    assert (thin(gt) == gt).all()
    return gt


def f_measure(counts: np.ndarray) -> np.ndarray:
    precision = counts[0] / np.maximum(counts[1], 1)
    recall = counts[2] / np.maximum(counts[3], 1)
    return 2 * precision * recall / np.maximum(precision + recall, 1e-12)


def test_seism_thresholds():
    assert len(SEISM_THRESHOLDS) == 101
    assert SEISM_THRESHOLDS[:3] == (0.001, 0.01, 0.02) and SEISM_THRESHOLDS[-2:] == (0.99, 0.999)
    assert all(a < b for a, b in zip(SEISM_THRESHOLDS, SEISM_THRESHOLDS[1:]))


def test_exact_match_scores_one_wherever_present():
    gt = square_outline()
    probability = gt * 0.5
    counts = boundary_counts(probability, gt, nms=False)
    present = np.array(SEISM_THRESHOLDS) < 0.5  # strict ">" as SEISM
    assert (counts[3] == gt.sum()).all()
    np.testing.assert_array_equal(counts[0, present], gt.sum())
    np.testing.assert_array_equal(counts[1, present], gt.sum())
    np.testing.assert_allclose(f_measure(counts)[present], 1.0)
    assert (counts[:3, ~present] == 0).all()
    np.testing.assert_array_equal(boundary_counts(probability, gt), counts)  # NMS keeps a 1-pixel outline
    # ">=" (BSDS) also keeps the map at the threshold equal to its value
    at_half = SEISM_THRESHOLDS.index(0.5)
    assert boundary_counts(probability, gt, nms=False, strict=False)[1, at_half] == gt.sum()


def test_one_pixel_shift_is_matched_and_a_far_shift_is_not():
    gt = np.zeros((64, 64), dtype=np.uint8)
    gt[30, 10:50] = 1  # a 40-pixel horizontal segment
    fraction = 1.5 / math.hypot(*gt.shape)  # max_dist = 1.5 pixels on this image
    for shift, expected in [(0, 40), (1, 40), (-1, 40), (2, 0), (3, 0)]:
        moved = np.roll(gt, shift, axis=0).astype(bool)
        assert correspond_pixels(moved, gt.astype(bool), 1.5) == (expected, 40, expected, 40)
        counts = boundary_counts(moved * 0.9, gt, max_dist_fraction=fraction, nms=False)
        np.testing.assert_array_equal(counts[:, 0], [expected, 40, expected, 40])
    # moved one pixel down and right: every pixel 1 px from a ground-truth pixel, except the last (sqrt(2) from the end)
    diagonal = np.roll(np.roll(gt, 1, axis=0), 1, axis=1).astype(bool)
    assert correspond_pixels(diagonal, gt.astype(bool), 1.5) == (40, 40, 40, 40)
    assert correspond_pixels(diagonal, gt.astype(bool), 1.2) == (39, 40, 39, 40)


def test_spurious_edges_lower_precision_by_their_count():
    gt = square_outline(96, 20, 40)
    prediction = gt.astype(bool).copy()
    prediction[80, 10:60] = True  # 50 spurious pixels far from the ground truth
    assert correspond_pixels(prediction, gt.astype(bool), 2.0) == (gt.sum(), gt.sum() + 50, gt.sum(), gt.sum())
    counts = boundary_counts(prediction * 0.7, gt, nms=False)
    assert counts[0, 0] == gt.sum() and counts[1, 0] == gt.sum() + 50


def test_matching_is_one_to_one_unlike_tolerance_matching():
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    prediction = np.zeros_like(gt)
    prediction[4, 3] = prediction[4, 5] = True  # both within 1 px of the single ground-truth pixel
    assert correspond_pixels(prediction, gt, 1.5) == (1, 2, 1, 1)
    tolerance = BoundaryMetric(max_dist=1.5 / math.hypot(9, 9), thresholds=1)
    tolerance.update(torch.from_numpy(prediction).float()[None, None], torch.from_numpy(gt)[None, None])
    assert tolerance.counts[0, 0] == 2  # the tolerance metric counts both predicted pixels as correct
    # optimal, not greedy: pixel a is nearest to g1, but matching a-g2 and b-g1 matches both
    gt, prediction = np.zeros((9, 9), dtype=bool), np.zeros((9, 9), dtype=bool)
    gt[4, 4] = gt[5, 6] = True  # g1, g2
    prediction[4, 5] = prediction[4, 3] = True  # a: 1 px from g1, 1.41 px from g2; b: 1 px from g1 only
    assert correspond_pixels(prediction, gt, 1.5) == (2, 2, 2, 2)


def test_degenerate_inputs():
    empty, gt = np.zeros((8, 8), dtype=bool), square_outline(8, 2, 4).astype(bool)
    assert correspond_pixels(empty, gt, 2.0) == (0, 0, 0, gt.sum())
    assert correspond_pixels(gt, empty, 2.0) == (0, gt.sum(), 0, 0)
    top_left, bottom_right = np.zeros((40, 40), dtype=bool), np.zeros((40, 40), dtype=bool)
    top_left[0, 0] = bottom_right[39, 39] = True
    assert correspond_pixels(top_left, bottom_right, 2.0) == (0, 1, 0, 1)  # no candidate pair at all
    pred_coords, gt_coords = match_edge_pixels(empty, gt, 2.0)
    assert pred_coords.shape == gt_coords.shape == (0, 2)
    line = np.zeros((1, 12), dtype=np.uint8)
    line[0, 3:9] = 1
    assert boundary_counts(line * 0.8, line)[:, 0].tolist() == [6, 6, 6, 6]  # a 1-pixel-tall image
    # everything ignored -> all zeros
    assert not boundary_counts(np.ones((8, 8)), np.full((8, 8), 255, dtype=np.uint8)).any()


def brute_force_cost(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> float:
    """BSDS objective by dense assignment: pairs within max_dist cost their distance, unmatched pixels cost outlier."""
    p, g = np.argwhere(pred).astype(float), np.argwhere(gt).astype(float)
    n, m, outlier, forbidden = len(p), len(g), OUTLIER_COST * max_dist, 1e9
    cost = np.full((n + m, m + n), forbidden)
    distance = np.linalg.norm(p[:, None] - g[None], axis=-1)
    cost[:n, :m] = np.where(distance <= max_dist, distance, forbidden)
    cost[np.arange(n), m + np.arange(n)] = outlier  # predicted pixel unmatched
    cost[n + np.arange(m), np.arange(m)] = outlier  # ground-truth pixel unmatched
    cost[n:, m:] = 0.0  # dummies pair up freely
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


@pytest.mark.parametrize("seed", range(12))
def test_matcher_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 14)
    pred, gt = rng.random(shape) < rng.uniform(0.05, 0.3), rng.random(shape) < rng.uniform(0.05, 0.3)
    max_dist = float(rng.uniform(1.0, 3.0))
    pred_coords, gt_coords = match_edge_pixels(pred, gt, max_dist)
    # a valid one-to-one matching within max_dist
    assert len({tuple(c) for c in pred_coords}) == len(pred_coords) == len({tuple(c) for c in gt_coords})
    assert pred[tuple(pred_coords.T)].all() and gt[tuple(gt_coords.T)].all()
    distance = np.linalg.norm(pred_coords - gt_coords, axis=1)
    assert (distance <= max_dist).all()
    unmatched = pred.sum() + gt.sum() - 2 * len(pred_coords)
    cost = distance.sum() + OUTLIER_COST * max_dist * unmatched
    assert cost == pytest.approx(brute_force_cost(pred, gt, max_dist), rel=1e-9, abs=1e-9)
    matched, total_pred, matched_gt, total_gt = correspond_pixels(pred, gt, max_dist)
    assert (matched, total_pred, matched_gt, total_gt) == (len(pred_coords), pred.sum(), len(gt_coords), gt.sum())


def reference_nms(edges: np.ndarray, orientation: np.ndarray, radius=1, suppression=5, multiplier=1.01) -> np.ndarray:
    """Per-pixel loop transcription of the NMS rule, to check the vectorised version."""
    height, width = edges.shape
    result = np.zeros_like(edges)

    def sample(x, y):
        x, y = min(max(x, 0), width - 1.001), min(max(y, 0), height - 1.001)
        x0, y0 = int(x), int(y)
        dx, dy = x - x0, y - y0
        return (
            edges[y0, x0] * (1 - dx) * (1 - dy)
            + edges[y0, x0 + 1] * dx * (1 - dy)
            + edges[y0 + 1, x0] * (1 - dx) * dy
            + edges[y0 + 1, x0 + 1] * dx * dy
        )

    for y in range(height):
        for x in range(width):
            value = edges[y, x]
            if value == 0:
                continue
            c, s = math.cos(orientation[y, x]), math.sin(orientation[y, x])
            steps = [d for d in range(-radius, radius + 1) if d]
            if all(value * multiplier >= sample(x + d * c, y + d * s) for d in steps):
                result[y, x] = value
    s = min(suppression, width // 2, height // 2)
    for k in range(s):
        result[:, [k, width - 1 - k]] *= k / s
        result[[k, height - 1 - k], :] *= k / s
    return result


@pytest.mark.parametrize("radius", [1, 2])
def test_vectorised_nms_matches_a_per_pixel_loop(radius):
    rng = np.random.default_rng(radius)
    edges = gaussian_filter(rng.random((23, 31)), 1.0)
    edges[rng.random(edges.shape) < 0.1] = 0.0
    orientation = edge_orientation(edges)
    np.testing.assert_allclose(edge_nms(edges, radius=radius), reference_nms(edges, orientation, radius), atol=1e-12)


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal", "antidiagonal"])
def test_nms_thins_a_blurred_line_to_its_ridge(direction):
    line = np.zeros((48, 56), dtype=bool)
    index = np.arange(48)
    if direction == "horizontal":
        line[24, :] = True
    elif direction == "vertical":
        line[:, 28] = True
    elif direction == "diagonal":
        line[index, index + 4] = True
    else:
        line[index, 51 - index] = True
    ridge = gaussian_filter(line.astype(float), 2.0)
    ridge /= ridge.max()
    assert (ridge > 0.3).sum() > 3 * line.sum()  # several pixels thick before NMS
    suppressed = edge_nms(ridge)
    interior = np.zeros_like(line)
    interior[8:-8, 8:-8] = True
    kept = (suppressed > 1e-3) & interior
    np.testing.assert_array_equal(kept, line & interior)  # exactly the 1-pixel ridge
    assert (suppressed[:, 0] == 0).all() and (suppressed[0, :] == 0).all()  # border suppression


def test_thin_restricted_to_bounding_box_equals_skimage():
    rng = np.random.default_rng(0)
    for _ in range(5):
        binary = gaussian_filter(rng.random((40, 50)), 1.5) > 0.52
        binary[:3], binary[:, -2:] = True, True  # touches the image border
        np.testing.assert_array_equal(thin(binary), skimage_thin(binary))
    assert not thin(np.zeros((5, 5), dtype=bool)).any()


def test_ignore_padding_is_cropped_and_ignored_pixels_dropped():
    core = square_outline(48, 10, 24)
    rng = np.random.default_rng(0)
    core_probability = gaussian_filter(core.astype(float), 1.0) + 0.05 * rng.random(core.shape)
    label = np.full((70, 80), 255, dtype=np.uint8)
    label[5:53, 20:68] = core
    probability = rng.random(label.shape)  # garbage in the padding
    probability[5:53, 20:68] = core_probability
    expected = boundary_counts(core_probability, core)
    np.testing.assert_array_equal(boundary_counts(probability, label), expected)
    # ignored pixels inside the labelled box: their predictions are dropped
    no_edges = np.zeros((20, 20), dtype=np.uint8)
    no_edges[5:8, 5:8] = 255
    ones = np.zeros((20, 20))
    ones[6, 6] = 1.0
    assert boundary_counts(ones, no_edges, nms=False)[1].max() == 0
    ones[10, 10] = 1.0
    assert boundary_counts(ones, no_edges, nms=False)[1, 0] == 1


def random_batch(seed: int, batch: int = 2, size: tuple[int, int] = (40, 48)) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, 1, *size), dtype=np.uint8)
    logits = np.zeros((batch, 1, *size), dtype=np.float32)
    for b in range(batch):
        top, left = rng.integers(4, 12, size=2)
        labels[b, 0] = np.pad(square_outline(24, 2, 20), ((top, size[0] - 24 - top), (left, size[1] - 24 - left)))
        labels[b, 0, -3:] = 255  # padding rows
        blurred = gaussian_filter(np.roll(labels[b, 0] == 1, b, axis=1).astype(float), 1.0)
        logits[b, 0] = 8 * blurred + rng.normal(0, 0.5, size) - 2
    return torch.from_numpy(logits), torch.from_numpy(labels)


def test_metric_merges_over_halves_and_logits_equal_probabilities():
    batches = [random_batch(seed) for seed in range(4)]
    whole, first, second = (
        BoundaryODSMetric(num_workers=1),
        BoundaryODSMetric(num_workers=1),
        BoundaryODSMetric(num_workers=1),
    )
    for index, (logits, labels) in enumerate(batches):
        whole.update(logits, labels)
        (first if index < 2 else second).update(logits, labels)
    merged = BoundaryODSMetric(num_workers=1)
    merged.load_state({"counts": first.state()["counts"] + second.state()["counts"]})
    assert torch.equal(merged.state()["counts"], whole.state()["counts"])
    assert merged.compute() == whole.compute()
    from_probabilities = BoundaryODSMetric(num_workers=1)
    for logits, labels in batches:
        from_probabilities.update(logits.sigmoid(), labels)
    assert torch.equal(from_probabilities.counts, whole.counts)
    result = whole.compute()
    assert set(result) == {"odsF", "threshold", "precision", "recall"}
    assert 0 < result["odsF"] <= 100 and result["threshold"] in SEISM_THRESHOLDS
    counts = whole.counts.double()
    best = SEISM_THRESHOLDS.index(result["threshold"])
    assert result["precision"] == pytest.approx(float(counts[0, best] / counts[1, best] * 100))
    assert result["recall"] == pytest.approx(float(counts[2, best] / counts[3, best] * 100))


def test_perfect_prediction_scores_100_and_no_ground_truth_is_nan():
    labels = torch.from_numpy(square_outline())[None, None]
    metric = BoundaryODSMetric(num_workers=1, nms=False)
    metric.update(labels.float(), labels)
    assert metric.compute()["odsF"] == pytest.approx(100.0)
    empty = BoundaryODSMetric(num_workers=1)
    empty.update(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    assert math.isnan(empty.compute()["odsF"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_two_workers_equal_one(context):
    batches = [random_batch(seed, batch=3 if seed else 1) for seed in range(2)]  # a single image too
    serial, parallel = BoundaryODSMetric(num_workers=1), BoundaryODSMetric(num_workers=2, mp_context=context)
    try:
        for logits, labels in batches:
            serial.update(logits, labels)
            parallel.update(logits, labels)
    finally:
        parallel.close()
    assert torch.equal(serial.counts, parallel.counts)
    assert serial.counts[3].min() > 0
