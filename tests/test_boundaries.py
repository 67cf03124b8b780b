"""The paper's boundary odsF (the authors' SEISM protocol): each step against a hand-computed answer, a brute-force check
of the matcher, the NMS against a per-pixel loop, cropping, merging, logits vs probabilities and worker pools."""

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
    ground_truth_boundaries,
    match_edge_pixels,
    matlab_uint8,
    prediction_png,
    seg2bmap,
    seism_max_dist,
    seism_nms,
    thin,
    threshold_levels,
)
from modeling_sak.evaluation.counts import best_f_measure
from modeling_sak.evaluation.metrics import BoundaryMetric
from modeling_sak.evaluation.registry import BOUNDARY_MAX_DIST, make_metrics


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


# ----------------------------------------------------------------------------------------------------------------------
# Step by step, hand-computed


def test_thresholds_are_those_of_parameters_txt():
    assert len(SEISM_THRESHOLDS) == 99 and SEISM_THRESHOLDS[0] == 0.01 and SEISM_THRESHOLDS[-1] == 0.99
    assert SEISM_THRESHOLDS == tuple(float(f"0.{k:02d}") for k in range(1, 100))  # str2double of "0.01" ... "0.99"
    # lowest 8-bit level q with q / 255 >= t: 0.01 * 255 = 2.55 -> 3; 0.2 * 255 = 51 exactly (a tie) -> 51;
    # 0.5 * 255 = 127.5 -> 128; 0.99 * 255 = 252.45 -> 253. Thresholds above 1 keep nothing (256), 0 keeps level >= 1.
    assert threshold_levels([0.01, 0.2, 0.5, 0.99, 1.5, 0.0]).tolist() == [3, 51, 128, 253, 256, 1]


def test_prediction_png_truncates_as_the_reference_writes_it():
    # np.uint8(sigmoid * 255) on float32: 0.999 * 255 = 254.745 -> 254 (rounding would give 255); 51.9 -> 51
    probability = np.array([0.999, 51.9 / 255, 1.0, 0.0, 0.2], dtype=np.float32)
    assert prediction_png(probability).tolist() == [254, 51, 255, 0, 51]


def test_nms_png_rounds_half_away_from_zero_as_matlab_uint8():
    assert np.round(50.5) == 50  # numpy rounds half to even; MATLAB's uint8 rounds half away from zero
    values = np.array([50.5, 51.5, 127.5, 0.49, -0.5, 300.0, np.nan])
    assert matlab_uint8(values).tolist() == [51, 52, 128, 0, 0, 255, 0]


def vertical_line_label(height: int = 24, width: int = 20, column: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A full-height 1-pixel vertical boundary label and its SEISM ground truth (hand-computed, see the test below)."""
    label = np.zeros((height, width), dtype=np.uint8)
    label[:, column] = 1
    expected = np.zeros((height, width), dtype=bool)
    expected[1:, column - 1] = True
    return label, expected


def test_rounding_tie_at_a_threshold_makes_an_edge():
    label, gt_edges = vertical_line_label()
    assert (50.5 / 255) * 255 == 50.5  # an exact tie after the NMS: E * 255 = 50.5
    prediction = gt_edges * (50.5 / 255)
    counts = boundary_counts(prediction, label, thresholds=(0.2, 0.21), nms=False)
    n = int(gt_edges.sum())
    # uint8(50.5) = 51 and 51 / 255 >= 0.2: every pixel is an edge at 0.20, none at 0.21 (round-half-even: 50, none)
    assert counts.tolist() == [[n, 0], [n, 0], [n, 0], [n, n]]


def test_an_edge_is_a_value_greater_or_equal_to_the_threshold():
    label, gt_edges = vertical_line_label()
    assert 51 / 255 == 0.2  # level 51 lies exactly at the threshold 0.20
    counts = boundary_counts(gt_edges * (51 / 255), label, thresholds=(0.19, 0.2, 0.21), nms=False)
    assert counts[1].tolist() == [gt_edges.sum(), gt_edges.sum(), 0]  # ">" would drop it at 0.20 too


def test_nms_input_is_smoothed_with_a_radius_1_triangle():
    # convTri(x, 1) is the separable [1 2 1] / 4 filter: an isolated pixel keeps (2/4)^2 = 1/4 of its value,
    # 200 -> 50, and stays the maximum of the NMS output (it is the peak in every direction).
    impulse = np.zeros((21, 21), dtype=np.uint8)
    impulse[10, 10] = 200
    out = seism_nms(impulse)
    assert out[10, 10] == 50 and out.max() == 50
    # A vertical line keeps 2/4: 204 / 255 = 0.8 -> 0.4 -> 102; its side columns (0.2) are suppressed. Rows 0-4 are
    # scaled by the border suppression 0, 1/5, ..., 4/5 (row 3: 0.4 * 3/5 * 255 = 61.2 -> 61; row 4: 81.6 -> 82).
    line = np.zeros((16, 44), dtype=np.uint8)
    line[:, 20] = 204
    out = seism_nms(line)
    assert (out[5:-5, 20] == 102).all() and out[3, 20] == 61 and out[4, 20] == 82 and out[0, 20] == 0
    assert np.count_nonzero(out[:, :20]) == np.count_nonzero(out[:, 21:]) == 0


def test_radius_4_nms_suppresses_a_weaker_parallel_ridge_3_pixels_away():
    png = np.zeros((16, 44), dtype=np.uint8)
    png[:, 20], png[:, 23] = 255, 102  # after convTri(., 1): columns 20 -> 0.5, 23 -> 0.2, 19/21 -> 0.25, 22/24 -> 0.1
    # The map is constant along y, so Oxy = Oyy = 0 and the normal is horizontal (O = 0).
    assert (edge_orientation(png / 255.0) == 0).all()
    interior = np.s_[5:-5]
    radius_1, radius_4 = seism_nms(png, radius=1), seism_nms(png, radius=4)
    # radius 1: column 23 (0.2) only sees 0.1 on either side and is kept: 0.2 * 255 = 51
    assert (radius_1[interior, 20] == 128).all() and (radius_1[interior, 23] == 51).all()  # 127.5 -> 128
    # radius 4: column 23 also sees column 20 (0.5 > 0.2 * 1.01) three pixels away and is suppressed
    assert (radius_4[interior, 20] == 128).all() and not radius_4[:, 21:].any()
    assert np.count_nonzero(radius_1[interior]) == 2 * radius_1[interior].shape[0]


def test_seg2bmap_marks_label_changes_with_the_last_row_and_column_rules():
    seg = np.array(
        [
            [1, 1, 2, 2, 2],
            [1, 1, 2, 2, 2],
            [1, 1, 1, 1, 3],
            [4, 4, 1, 1, 3],
        ]
    )
    # Inside: marked where the right, lower or lower-right neighbour differs. Last row: right neighbour only
    # ((3, 0) is not marked although its upper neighbour differs, (3, 1) and (3, 3) are); last column: lower neighbour
    # only ((1, 4): 2 above 3); the bottom-right pixel never.
    expected = np.array(
        [
            [0, 1, 0, 0, 0],
            [0, 1, 1, 1, 1],
            [1, 1, 0, 1, 0],
            [0, 1, 0, 1, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(seg2bmap(seg), expected)


def test_ground_truth_is_the_thinned_seg2bmap_of_the_label():
    # A 1-pixel vertical boundary at column 8 is a segmentation for seg2bmap: columns 7 (differs from its right
    # neighbour) and 8 are marked, a 2-pixel band. bwmorph thin's first sub-iteration deletes the right column (its
    # east neighbour is 0) and the top pixel of the left column (its north-east neighbour lies outside the image);
    # the rest of column 7 is a line and stays.
    label, expected = vertical_line_label()
    band = np.zeros(label.shape, dtype=bool)
    band[:, 7:9] = True
    np.testing.assert_array_equal(seg2bmap(label), band)
    np.testing.assert_array_equal(ground_truth_boundaries(label), expected)
    # A horizontal boundary at row 3: rows 2 and 3 are marked except in the last column of row 3; thinning keeps the
    # lower row (its east and north-east neighbours are set), whose last pixel goes with the upper row.
    label = np.zeros((8, 12), dtype=np.uint8)
    label[3, :] = 1
    expected = np.zeros(label.shape, dtype=bool)
    expected[3, :-1] = True
    np.testing.assert_array_equal(ground_truth_boundaries(label), expected)
    # boundary_counts scores against exactly that ground truth
    assert boundary_counts(np.zeros(label.shape), label)[3, 0] == expected.sum()


def test_max_dist_per_database():
    assert seism_max_dist("NYUD") == 0.011 and seism_max_dist("Pascal") == 0.01
    assert seism_max_dist("PASCALContext") == seism_max_dist("BSDS500") == 0.0075  # every other database
    assert BOUNDARY_MAX_DIST == {"nyud_v2": seism_max_dist("NYUD"), "pascal_context": seism_max_dist("PASCALContext")}
    assert make_metrics({"edge": 1}, num_workers=1)["edge"].max_dist == 0.011
    assert make_metrics({"edge": 1, "sal": 2}, num_workers=1)["edge"].max_dist == 0.0075
    # A 390 x 520 image has a 650-pixel diagonal: maxDist 7.15 (NYUD), 6.5 (Pascal), 4.875 (PASCAL-Context) pixels.
    label, gt_edges = vertical_line_label(390, 520, 100)  # ground truth on column 99
    for shift, matched in [(4, (True, True, True)), (5, (True, True, False)), (7, (True, False, False))]:
        prediction = np.roll(gt_edges, shift, axis=1).astype(float)
        for database, expected in zip(("NYUD", "Pascal", "PASCALContext"), matched):
            counts = boundary_counts(prediction, label, seism_max_dist(database), thresholds=(0.5,), nms=False)
            assert counts[0, 0] == (gt_edges.sum() if expected else 0), (shift, database)


def test_zero_count_conventions_of_gather_measure():
    # columns: a regular threshold, no predicted pixel, no ground-truth pixel, nothing at all, no match
    counts = torch.tensor(
        [
            [3, 0, 0, 0, 0],  # cntP
            [4, 0, 4, 0, 5],  # sumP
            [3, 0, 0, 0, 0],  # cntR
            [6, 5, 0, 0, 6],  # sumR
        ]
    )
    best, precision, recall, f = best_f_measure(counts)
    torch.testing.assert_close(precision, torch.tensor([0.75, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(recall, torch.tensor([0.5, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(f, torch.tensor([0.6, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert best == 0
    # no predicted pixel at any threshold: F = 0 everywhere, the first threshold is reported with P = 1, R = 0
    metric = BoundaryODSMetric(num_workers=1, thresholds=(0.5, 0.6))
    metric.load_state({"counts": torch.tensor([[0, 0], [0, 0], [0, 0], [5, 5]])})
    assert metric.compute() == {"odsF": 0.0, "threshold": 0.5, "precision": 100.0, "recall": 0.0}
    # equal best F at two thresholds: the first (MATLAB's max)
    assert best_f_measure(torch.tensor([[1, 1], [2, 2], [1, 1], [2, 2]]))[0] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Matching, counts and the metric


def test_exact_match_scores_one_wherever_present():
    gt = square_outline()
    gt_edges = ground_truth_boundaries(gt)
    counts = boundary_counts(gt_edges * 0.5, gt, nms=False)  # 0.5 * 255 = 127.5 -> 128: an edge up to t = 0.50
    present = np.array(SEISM_THRESHOLDS) <= 0.5
    assert (counts[3] == gt_edges.sum()).all()
    np.testing.assert_array_equal(counts[0, present], gt_edges.sum())
    np.testing.assert_array_equal(counts[1, present], gt_edges.sum())
    np.testing.assert_allclose(f_measure(counts)[present], 1.0)
    assert (counts[:3, ~present] == 0).all()


def test_one_pixel_shift_is_matched_and_a_far_shift_is_not():
    gt = np.zeros((64, 64), dtype=np.uint8)
    gt[30, 10:50] = 1  # a 40-pixel horizontal segment
    fraction = 1.5 / math.hypot(*gt.shape)  # max_dist = 1.5 pixels on this image
    gt_edges = ground_truth_boundaries(gt)
    n = int(gt_edges.sum())
    for shift, expected in [(0, 40), (1, 40), (-1, 40), (2, 0), (3, 0)]:
        moved = np.roll(gt, shift, axis=0).astype(bool)
        assert correspond_pixels(moved, gt.astype(bool), 1.5) == (expected, 40, expected, 40)
        counts = boundary_counts(np.roll(gt_edges, shift, axis=0) * 0.9, gt, max_dist_fraction=fraction, nms=False)
        np.testing.assert_array_equal(counts[:, 0], [n if expected else 0, n, n if expected else 0, n])
    # moved one pixel down and right: every pixel 1 px from a ground-truth pixel, except the last (sqrt(2) from the end)
    diagonal = np.roll(np.roll(gt, 1, axis=0), 1, axis=1).astype(bool)
    assert correspond_pixels(diagonal, gt.astype(bool), 1.5) == (40, 40, 40, 40)
    assert correspond_pixels(diagonal, gt.astype(bool), 1.2) == (39, 40, 39, 40)


def test_spurious_edges_lower_precision_by_their_count():
    gt = square_outline(96, 20, 40)
    prediction = gt.astype(bool).copy()
    prediction[80, 10:60] = True  # 50 spurious pixels far from the ground truth
    assert correspond_pixels(prediction, gt.astype(bool), 2.0) == (gt.sum(), gt.sum() + 50, gt.sum(), gt.sum())
    gt_edges = ground_truth_boundaries(gt)
    spurious = gt_edges.copy()
    spurious[80, 10:60] = True
    counts = boundary_counts(spurious * 0.7, gt, nms=False)
    assert counts[0, 0] == gt_edges.sum() and counts[1, 0] == gt_edges.sum() + 50


def test_matching_is_one_to_one_unlike_tolerance_matching():
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    prediction = np.zeros_like(gt)
    prediction[4, 3] = prediction[4, 5] = True  # both within 1 px of the single ground-truth pixel
    assert correspond_pixels(prediction, gt, 1.5) == (1, 2, 1, 1)
    tolerance = BoundaryMetric(max_dist=1.5 / math.hypot(9, 9), thresholds=1, from_logits=False)
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
    # A 1-pixel-tall image (no NMS possible): seg2bmap marks columns 2 and 8 (the last row compares with the right
    # neighbour only); the smoothed prediction (0.8 -> 0.6 at the ends, 0.2 beside them) is an edge on columns 2..9 at
    # t = 0.01, and maxDist (0.15 px) only matches pixels in place.
    line = np.zeros((1, 12), dtype=np.uint8)
    line[0, 3:9] = 1
    assert boundary_counts(line * 0.8, line)[:, 0].tolist() == [2, 8, 2, 2]
    # everything ignored -> all zeros
    assert not boundary_counts(np.ones((8, 8)), np.full((8, 8), 255, dtype=np.uint8)).any()
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        boundary_counts(np.full((8, 8), 2.0), np.zeros((8, 8), dtype=np.uint8))


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


def test_a_component_whose_optimal_matching_is_not_a_largest_one_is_solved_exactly():
    # 400 predicted pixels in a row, one pixel left of 400 ground-truth pixels; maxDist 1.5, so an unmatched pixel costs
    # 150. Matching all 400 (distance 1 each) costs 400; matching the 399 pixel pairs that coincide costs 0 plus two
    # unmatched pixels, 300: the optimum matches 399. The counts must not be taken from a largest matching here.
    pred, gt = np.zeros((3, 410), dtype=bool), np.zeros((3, 410), dtype=bool)
    pred[1, 0:400], gt[1, 1:401] = True, True
    assert correspond_pixels(pred, gt, 1.5) == (399, 400, 399, 400)
    assert len(match_edge_pixels(pred, gt, 1.5)[0]) == 399
    # 150 pixels: matching all (150) beats the 149 coinciding pairs (300), so every pixel is matched
    pred[1, 150:], gt[1, 151:] = False, False
    assert correspond_pixels(pred, gt, 1.5) == (150, 150, 150, 150)


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


@pytest.mark.parametrize("radius", [1, 2, 4])
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
    if direction == "horizontal":
        # Exactly horizontal: Oxy is exactly 0, MATLAB's sign(0) = 0 makes the orientation 0, so pixels are compared
        # along the ridge and all survive (as in the authors' pipeline; each binary map is thinned afterwards).
        np.testing.assert_array_equal(kept, (ridge > 1e-3) & interior)
    else:
        np.testing.assert_array_equal(kept, line & interior)  # exactly the 1-pixel ridge
    assert (suppressed[:, 0] == 0).all() and (suppressed[0, :] == 0).all()  # border suppression


def test_thin_equals_skimage():
    """Our sparse evaluation of the thinning gives exactly skimage's (MATLAB bwmorph thin) result."""
    rng = np.random.default_rng(0)
    for k in range(12):
        binary = gaussian_filter(rng.random((40, 50)), rng.uniform(0.5, 2.0)) > rng.uniform(0.45, 0.55)
        if k % 2:
            binary[:3], binary[:, -2:] = True, True  # thick parts touching the image border
        np.testing.assert_array_equal(thin(binary), skimage_thin(binary))
    noise = rng.random((60, 70)) < 0.3
    np.testing.assert_array_equal(thin(noise), skimage_thin(noise))
    assert not thin(np.zeros((5, 5), dtype=bool)).any()
    assert thin(np.ones((1, 1), dtype=bool)).all()


def test_ignore_padding_is_cropped_and_ignored_pixels_dropped():
    core = square_outline(48, 10, 24)
    rng = np.random.default_rng(0)
    core_probability = np.clip(gaussian_filter(core.astype(float), 1.0) + 0.05 * rng.random(core.shape), 0, 1)
    label = np.full((70, 80), 255, dtype=np.uint8)
    label[5:53, 20:68] = core
    probability = rng.random(label.shape)  # garbage in the padding
    probability[5:53, 20:68] = core_probability
    expected = boundary_counts(core_probability, core)
    assert expected[0].max() > 0
    np.testing.assert_array_equal(boundary_counts(probability, label), expected)
    # ignored pixels inside the labelled box: their predictions are dropped
    no_edges = np.zeros((20, 20), dtype=np.uint8)
    no_edges[5:8, 5:8] = 255
    ones = np.zeros((20, 20))
    ones[6, 6] = 1.0
    assert boundary_counts(ones, no_edges, nms=False)[1].max() == 0
    ones[10, 10] = 1.0
    assert boundary_counts(ones, no_edges, nms=False)[1, 0] == 1
    # ground-truth marks on ignored pixels are dropped before thinning: the band's left column lies in the ignored
    # column 7, so the right column (8) is what remains
    label, _ = vertical_line_label()
    label[:, 7] = 255
    counts = boundary_counts(np.zeros(label.shape), label)
    assert counts[3, 0] == label.shape[0]  # all of column 8 (each pixel differs from its right neighbour), a line


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
    from_probabilities = BoundaryODSMetric(num_workers=1, from_logits=False)
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


@pytest.mark.parametrize("kind", ["odsF", "tolerance"])
def test_logits_inside_0_1_are_not_mistaken_for_probabilities(kind):
    """Issue 12: logits that all lie inside [0, 1] scored as probabilities. Now `from_logits` says which they are."""
    logits, labels = random_batch(0)
    logits = (logits - logits.min()) / (logits.max() - logits.min())  # logits, every value inside [0, 1]

    def make(from_logits):
        if kind == "odsF":
            return BoundaryODSMetric(num_workers=1, from_logits=from_logits)
        return BoundaryMetric(from_logits=from_logits)

    on_logits, on_probabilities, misread = make(True), make(False), make(False)
    on_logits.update(logits, labels)
    on_probabilities.update(logits.sigmoid(), labels)
    misread.update(logits, labels)  # what the old per-batch guess did with these logits
    assert torch.equal(on_logits.counts, on_probabilities.counts)
    assert not torch.equal(on_logits.counts, misread.counts)
    with pytest.raises(ValueError, match="from_logits=False, but the predictions range over"):
        make(False).update(logits * 4 - 2, labels)


def test_perfect_prediction_scores_100_and_no_ground_truth_is_nan():
    label = square_outline()
    metric = BoundaryODSMetric(num_workers=1, nms=False, from_logits=False)
    metric.update(
        torch.from_numpy(ground_truth_boundaries(label)).float()[None, None], torch.from_numpy(label)[None, None]
    )
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
