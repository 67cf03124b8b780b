"""Boundary odsF exactly as the SAK paper computed it: the authors' SEISM fork, in plain numpy / scipy / scikit-image.

The paper's boundary numbers come from the MATLAB toolkit SEISM as forked by the SAK authors (innovator-zero/seism,
called by the reference repository's `evaluation/edge_evaluation.py`). This module restates each of its steps from
those files' behaviour (no MATLAB, BSDS or Dollar source is copied or bundled). Per image (`boundary_counts`):

0. Crop prediction and label to the bounding box of the labelled pixels (label != 255), so that the padding goes
   away and maxDist and the border suppression refer to the real image. This step is ours: SEISM has no ignore label;
   the reference crops its padding before writing the prediction PNG.
1. Prediction PNG (reference `evaluation/save_img.py` via `utils.get_output`): `np.uint8(sigmoid(logits) * 255)`,
   i.e. the float32 probability times 255, truncated (`prediction_png`).
2. NMS (`nms_process.m`, `seism_nms`): E = convTri(png / 255, 1), the [1 2 1] / 4 triangle filter with symmetric
   padding; orientation O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi) from the second derivatives of
   convTri(E, 4) (`edge_orientation`, MATLAB's sign(0) = 0); Dollar's NMS with radius 4, border suppression 5 and
   multiplier 1.01 (`edge_nms`): a pixel is kept when its value times 1.01 is not below the bilinearly interpolated
   values 1..4 pixels away on either side along the normal, and values within 5 pixels of the image border are scaled
   down linearly (0, 1/5, ..., 4/5).
3. The NMS output is written as `uint8(E * 255)`, MATLAB's rounding (half away from zero, saturating:
   `matlab_uint8`), and read back / 255. Predictions at ignored pixels inside the crop are zeroed here (ours).
4. Thresholds: the 99 values 0.01 ... 0.99 of `parameters.txt` (`SEISM_THRESHOLDS`); a pixel is an edge where
   png / 255 >= t (`src/io/read_one_png.m`; the comparison is made in float64 on the 256 levels, as MATLAB does); the
   binary map is thinned (`src/piotr_edges/edgesEvalImg.m`, thin = 1: `bwmorph(.., 'thin', inf)`, `thin`).
5. Ground truth (`edgesEvalImg.m`): `bwmorph(seg2bmap(G), 'thin', inf)`. The label is treated as a segmentation
   (`seg2bmap`, `src/misc/seg2bmap.m`): a pixel is marked where its value differs from its right, lower or
   lower-right neighbour; the last row compares only with the right neighbour, the last column only with the lower
   one, the bottom-right pixel is never marked. On NYUD-v2 SEISM's G is the binary boundary map itself, so a 1-pixel
   boundary becomes a 2-pixel band that thinning brings back to one pixel. Here G = (label > 0) with ignored pixels
   as 0, and marks on ignored pixels are dropped before thinning (ours).
6. maxDist (`src/scripts/eval_method.m`, `seism_max_dist`): NYUD 0.011, 'Pascal' 0.01, any other database (the
   reference passes 'PASCALContext') 0.0075, times the diagonal of the (cropped) image.
7. Matching (BSDS `correspondPixels`, `correspond_pixels`): a minimum-cost one-to-one matching in which a pair costs
   its Euclidean distance when at most maxDist apart and every unmatched pixel costs 100 x maxDist. The image's counts
   are a 4 x T int64 array: cntP (matched predicted pixels), sumP (predicted pixels), cntR (matched ground-truth
   pixels), sumR (ground-truth pixels); with one ground truth per image cntP = cntR.

`BoundaryODSMetric` sums the counts over the split (and processes); per threshold P, R and F follow
`src/scripts/gather_measure.m` (`metrics.best_f_measure`: sumR = 0 gives R = 1, P = 0; sumP = 0 gives R = 0, P = 1;
F = 0 where P + R = 0), and odsF is the maximum F over the thresholds, with no interpolation (`general_ods`). A split
without any ground-truth boundary pixel reports NaN (SEISM would report 0).

Known differences from the MATLAB code:

- The matching is solved exactly and deterministically: LAPJVsp (scipy's `min_weight_full_bipartite_matching`) on
  the candidate pairs from a KD-tree, with one private "unmatched" column per pixel of the smaller side. BSDS's CSA
  solver uses integer costs and a randomly sampled sparse outlier graph: it is randomised and finds slightly fewer
  matches. This formulation was measured within about 1e-4 ODS of BSDS `correspondPixels` on 5 images (about 0.002
  higher on near-perfect maps). The counts need only the matching's size: components too small for a smaller
  matching to cost less are counted by one Hopcroft-Karp run (`_matched_count`), the same numbers 5x faster.
- Filtering, orientation and NMS run in float64 (MATLAB: single, in Dollar's SSE code); results can differ only
  where E * 255 lies within float rounding of a .5 tie of the 8-bit rounding.
- Several ground-truth annotations per image (BSDS500) are not supported. On PASCAL-Context SEISM's G is the
  PASCAL-Context label map; here it is the boundary label the metric receives.
- Images smaller than 2 pixels in either direction skip the NMS (MATLAB's would read outside the image).

Over 500 lines on purpose: it is one protocol, its steps in the order SEISM runs them, each a function tested alone;
split across files they would read out of order.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from scipy.ndimage import correlate1d, distance_transform_edt
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import (
    connected_components,
    maximum_bipartite_matching,
    min_weight_full_bipartite_matching,
)
from scipy.spatial import cKDTree

from .counts import CountsMetric, best_f_measure, binary_probability
from .tasks_sak import IGNORE_INDEX


# parameters.txt of the authors' SEISM fork: the strings "0.01" ... "0.99", read with str2double
SEISM_THRESHOLDS: tuple[float, ...] = tuple(float(f"0.{k:02d}") for k in range(1, 100))
# eval_method.m: maxDist per SEISM database name; every other name gets SEISM_DEFAULT_MAX_DIST
SEISM_MAX_DIST: dict[str, float] = {"NYUD": 0.011, "Pascal": 0.01}
SEISM_DEFAULT_MAX_DIST = 0.0075
OUTLIER_COST = 100.0  # BSDS correspondPixels: an unmatched pixel costs 100 x maxDist
# nms_process.m: E = convTri(x, 1); O from convTri(E, 4); edgesNmsMex(E, O, 4, 5, 1.01, ...)
PRESMOOTH_RADIUS, ORIENTATION_RADIUS = 1, 4
NMS_RADIUS, NMS_BORDER, NMS_MULTIPLIER = 4, 5, 1.01


def seism_max_dist(database: str) -> float:
    """SEISM's maxDist (a fraction of the image diagonal) for a database name as `eval_method.m` chooses it."""
    return SEISM_MAX_DIST.get(database, SEISM_DEFAULT_MAX_DIST)


# ----------------------------------------------------------------------------------------------------------------------
# 8-bit images as the reference writes them


def prediction_png(probability: np.ndarray) -> np.ndarray:
    """The reference's edge PNG: `np.uint8(probability * 255)` on float32 values, i.e. truncated (not rounded)."""
    scaled = np.asarray(probability, dtype=np.float32) * np.float32(255)
    return np.floor(np.clip(np.nan_to_num(scaled), 0, 255)).astype(np.uint8)


def matlab_uint8(values: np.ndarray) -> np.ndarray:
    """MATLAB's `uint8(x)`: round half away from zero, saturate to [0, 255], NaN -> 0 (numpy rounds half to even)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    return np.clip(np.sign(values) * np.floor(np.abs(values) + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Non-maximum suppression


def conv_tri(image: np.ndarray, radius: float) -> np.ndarray:
    """Separable triangle filter of the given radius with symmetric padding (Dollar's convTri)."""
    if radius <= 0:
        return np.asarray(image, dtype=np.float64)
    if radius <= 1:
        # fractional radius: the [1 p 1] kernel whose variance matches a triangle of that radius ([1 2 1] / 4 at 1)
        p = 12 / radius / (radius + 2) - 2
        kernel = np.array([1.0, p, 1.0]) / (2 + p)
    else:
        r = int(radius)
        kernel = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float64) / (r + 1) ** 2
    # scipy's "reflect" repeats the edge pixel (d c b a | a b c d), i.e. MATLAB's "symmetric"
    smoothed = correlate1d(np.asarray(image, dtype=np.float64), kernel, axis=0, mode="reflect")
    return correlate1d(smoothed, kernel, axis=1, mode="reflect")


def edge_orientation(edges: np.ndarray, smoothing_radius: float = ORIENTATION_RADIUS) -> np.ndarray:
    """Normal orientation in [0, pi) (angle of the (column, row) direction) from second derivatives of a smoothed copy.

    O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi) with MATLAB's sign (sign(0) = 0): where Oxy is exactly 0 the
    orientation is 0, so an exactly horizontal ridge is compared along itself and not thinned by the NMS (the
    thinning of each binary map still makes it one pixel wide).
    """
    if min(np.shape(edges)) < 2:
        return np.zeros(np.shape(edges))
    smoothed = conv_tri(edges, smoothing_radius)
    # np.gradient: central differences inside, one-sided at the border, like MATLAB's gradient / Dollar's gradient2
    grad_y, grad_x = np.gradient(smoothed)
    grad_xx = np.gradient(grad_x, axis=1)
    grad_xy, grad_yy = np.gradient(grad_y, axis=1), np.gradient(grad_y, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        orientation = np.mod(np.arctan(grad_yy * np.sign(-grad_xy) / (grad_xx + 1e-5)), np.pi)
    return np.nan_to_num(orientation, nan=0.0)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear sample of image at (column x, row y), coordinates clamped inside as in Dollar's interp."""
    height, width = image.shape
    x = np.clip(x, 0, width - 1.001)
    y = np.clip(y, 0, height - 1.001)
    x0, y0 = x.astype(np.intp), y.astype(np.intp)
    dx, dy = x - x0, y - y0
    return (
        image[y0, x0] * (1 - dx) * (1 - dy)
        + image[y0, x0 + 1] * dx * (1 - dy)
        + image[y0 + 1, x0] * (1 - dx) * dy
        + image[y0 + 1, x0 + 1] * dx * dy
    )


def edge_nms(
    edges: np.ndarray,
    radius: int = NMS_RADIUS,
    suppression: int = NMS_BORDER,
    multiplier: float = NMS_MULTIPLIER,
    orientation: np.ndarray | None = None,
) -> np.ndarray:
    """Dollar-style non-maximum suppression of an (H, W) boundary map; returns a float64 map of the same shape.

    A non-zero pixel survives when `multiplier` x its value is not below the map bilinearly sampled at 1..`radius`
    pixels on either side along the normal (`orientation`, default `edge_orientation(edges)`); comparisons use the
    input map. Then values within `suppression` pixels of the border are scaled by 0, 1/s, ..., (s-1)/s.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 2:
        raise ValueError(f"edge_nms expects an (H, W) map, got shape {edges.shape}; squeeze batch/channel dims first")
    height, width = edges.shape
    if min(height, width) < 2:
        return edges.copy()  # no neighbourhood to compare with, no border to suppress
    if orientation is None:
        orientation = edge_orientation(edges)
    rows, cols = np.nonzero(edges)
    values = edges[rows, cols] * multiplier
    cos, sin = np.cos(orientation[rows, cols]), np.sin(orientation[rows, cols])
    keep = np.ones(rows.shape, dtype=bool)
    for step in range(1, radius + 1):
        for signed in (step, -step):
            candidates = np.flatnonzero(keep)  # pixels already suppressed need no more samples
            sampled = _bilinear(
                edges, cols[candidates] + signed * cos[candidates], rows[candidates] + signed * sin[candidates]
            )
            keep[candidates[values[candidates] < sampled]] = False
    result = np.zeros_like(edges)
    result[rows[keep], cols[keep]] = edges[rows[keep], cols[keep]]
    # noisy estimates near the image border are scaled down linearly: 0, 1/s, ..., (s-1)/s
    s = min(suppression, width // 2, height // 2)
    if s > 0:
        ramp = np.arange(s) / s
        col_weight, row_weight = np.ones(width), np.ones(height)
        col_weight[:s], col_weight[width - s :] = ramp, ramp[::-1]
        row_weight[:s], row_weight[height - s :] = ramp, ramp[::-1]
        result *= row_weight[:, None] * col_weight[None, :]
    return result


def seism_nms(png: np.ndarray, radius: int = NMS_RADIUS) -> np.ndarray:
    """`nms_process.m` on one prediction PNG (uint8): smooth, orient, suppress, and write the uint8 NMS PNG."""
    png = np.asarray(png)
    if png.dtype != np.uint8:
        raise TypeError(
            f"seism_nms expects the uint8 prediction PNG, got {png.dtype}; use prediction_png(probability)"
        )
    edges = conv_tri(png / 255.0, PRESMOOTH_RADIUS)
    suppressed = edge_nms(edges, radius, NMS_BORDER, NMS_MULTIPLIER, edge_orientation(edges, ORIENTATION_RADIUS))
    return matlab_uint8(suppressed * 255)


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth


def seg2bmap(segmentation: np.ndarray) -> np.ndarray:
    """Boundary map of a label map as SEISM's `seg2bmap.m` draws it (bool, same shape).

    A pixel is marked where its label differs from the right, lower or lower-right neighbour; in the last row only
    the right neighbour counts, in the last column only the lower one, and the bottom-right pixel is never marked.
    """
    seg = np.asarray(segmentation)
    if seg.ndim != 2:
        raise ValueError(f"seg2bmap expects an (H, W) label map, got shape {seg.shape}")
    bmap = np.zeros(seg.shape, dtype=bool)
    differs_right = seg[:, :-1] != seg[:, 1:]
    differs_below = seg[:-1, :] != seg[1:, :]
    bmap[:-1, :-1] = differs_right[:-1] | differs_below[:, :-1] | (seg[:-1, :-1] != seg[1:, 1:])
    bmap[-1, :-1] = differs_right[-1]
    bmap[:-1, -1] = differs_below[:, -1]
    bmap[-1, -1] = False
    return bmap


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Lam, Lee and Suen's thinning (1992, sec. 3; MATLAB's
    `bwmorph thin`), indexed by the 8-neighbourhood code sum(x_i << (i - 1)), x_1 = east, counter-clockwise."""
    codes = np.arange(256)
    x = [None] + [(codes >> (i - 1)) & 1 for i in range(1, 9)]
    x.append(x[1])  # x_9 = x_1
    crossings = sum((x[2 * i - 1] == 0) & ((x[2 * i] == 1) | (x[2 * i + 1] == 1)) for i in range(1, 5))
    n1 = sum(x[2 * k - 1] | x[2 * k] for k in range(1, 5))
    n2 = sum(x[2 * k] | x[2 * k + 1] for k in range(1, 5))
    g12 = (crossings == 1) & (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    first = g12 & (((x[2] | x[3] | (1 - x[8])) & x[1]) == 0)
    second = g12 & (((x[6] | x[7] | (1 - x[4])) & x[5]) == 0)
    return first.astype(bool), second.astype(bool)


_THINNING_TABLES = _thinning_tables()


def thin(binary: np.ndarray) -> np.ndarray:
    """Morphological thinning to 1-pixel-wide curves until convergence (MATLAB bwmorph(.., 'thin', inf)).

    The algorithm of `skimage.morphology.thin` (tests compare the two), evaluated on the set pixels only: the maps
    thinned here are sparse, and this is 10-50x faster than filtering the whole image in every sub-iteration.
    """
    binary = np.asarray(binary, dtype=bool)
    rows, cols = np.nonzero(binary)
    if rows.size == 0:
        return binary.copy()
    # a canvas over the bounding box plus a 1-pixel frame of zeros (outside the image counts as 0)
    top, left = rows.min() - 1, cols.min() - 1
    width = cols.max() - left + 2
    canvas = np.zeros((rows.max() - top + 2) * width, dtype=np.uint8)
    alive = (rows - top) * width + (cols - left)
    canvas[alive] = 1
    offsets = (1, 1 - width, -width, -1 - width, -1, width - 1, width, width + 1)  # E, NE, N, NW, W, SW, S, SE
    while True:
        before = alive.size
        for table in _THINNING_TABLES:  # each sub-iteration deletes in parallel
            code = np.zeros(alive.size, dtype=np.uint8)
            for bit, offset in enumerate(offsets):
                code |= canvas[alive + offset] << bit
            delete = table[code]
            canvas[alive[delete]] = 0
            alive = alive[~delete]
        if alive.size == before:
            break
    result = np.zeros_like(binary)
    result[alive // width + top, alive % width + left] = True
    return result


def ground_truth_boundaries(segmentation: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """SEISM's ground truth: `bwmorph(seg2bmap(G), 'thin', inf)`, marks on pixels outside `valid` dropped first."""
    bmap = seg2bmap(segmentation)
    if valid is not None:
        bmap &= np.asarray(valid, dtype=bool)
    return thin(bmap)


# ----------------------------------------------------------------------------------------------------------------------
# One-to-one pixel correspondence


def _candidate_pairs(
    pred_points: np.ndarray, gt_points: np.ndarray, max_dist: float, gt_tree: cKDTree | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred index, gt index, distance) for every pair at most max_dist apart."""
    if gt_tree is None:
        gt_tree = cKDTree(gt_points)
    records = cKDTree(pred_points).sparse_distance_matrix(gt_tree, max_dist, output_type="ndarray")
    return records["i"].astype(np.intp), records["j"].astype(np.intp), records["v"].astype(np.float64)


def _compact(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a non-negative index array (sorted) and each entry's position among them (no sort)."""
    present = np.zeros(int(index.max()) + 1, dtype=bool)
    present[index] = True
    return np.flatnonzero(present), (np.cumsum(present) - 1)[index]


def _assignment(
    pred_local: np.ndarray, gt_local: np.ndarray, distance: np.ndarray, outlier_cost: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum-cost matching of one group of candidate pairs (LAPJVsp); returns the matched (pred, gt) ids."""
    p_nodes, p = _compact(pred_local)
    g_nodes, g = _compact(gt_local)
    # Rectangular assignment: rows are the pixels of the smaller side, columns the pixels of the other side plus one
    # private "unmatched" column per row. A row left unmatched costs 2 x outlier_cost, which is the cost of the two
    # outliers a matched pair would have saved; so the total is the BSDS objective up to a constant. Weights are
    # shifted by +1 (the same for every full matching) because LAPJVsp needs non-zero weights.
    swap = g_nodes.size < p_nodes.size
    row_nodes, col_nodes, r, c = (g, p, g_nodes.size, p_nodes.size) if swap else (p, g, p_nodes.size, g_nodes.size)
    rows = np.concatenate([row_nodes, np.arange(r)])
    cols = np.concatenate([col_nodes, c + np.arange(r)])
    weights = np.concatenate([distance, np.full(r, 2 * outlier_cost)]) + 1.0
    row_index, col_index = min_weight_full_bipartite_matching(csr_matrix((weights, (rows, cols)), shape=(r, r + c)))
    real = col_index < c
    row_index, col_index = row_index[real], col_index[real]
    pred_matched, gt_matched = (col_index, row_index) if swap else (row_index, col_index)
    return p_nodes[pred_matched], g_nodes[gt_matched]


def _candidate_components(pred_index: np.ndarray, gt_index: np.ndarray) -> tuple:
    """The candidate pairs' graph split into connected components (independent matching problems): `(preds, gts,
    pred_local, gt_local, pair_component, pred_per_component, gt_per_component)`, with pixels renumbered 0.. per side
    (`preds[pred_local]` is `pred_index`) and each pair's component."""
    preds, pred_local = _compact(pred_index)
    gts, gt_local = _compact(gt_index)
    n_pred, n_gt = preds.size, gts.size
    graph = coo_matrix((np.ones(pred_local.size), (pred_local, n_pred + gt_local)), shape=(n_pred + n_gt,) * 2)
    n_components, labels = connected_components(graph, directed=False)
    pred_per_component = np.bincount(labels[:n_pred], minlength=n_components)
    gt_per_component = np.bincount(labels[n_pred:], minlength=n_components)
    return preds, gts, pred_local, gt_local, labels[pred_local], pred_per_component, gt_per_component


def _optimal_matching(
    pred_index: np.ndarray, gt_index: np.ndarray, distance: np.ndarray, outlier_cost: float
) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching over candidate pairs; unmatched pixels cost outlier_cost each.

    Returns the matched (pred index, gt index) arrays, sorted by pred index.
    """
    if pred_index.size == 0:
        return pred_index, gt_index
    # Components are independent problems: a component with a single pixel on one side is solved by its shortest pair
    # (matching it always beats two outlier costs); the others are solved one by one, since scipy's LAPJVsp costs
    # about rows x columns per call on rectangular problems.
    preds, gts, pred_local, gt_local, pair_component, pred_per_component, gt_per_component = _candidate_components(
        pred_index, gt_index
    )
    trivial = (pred_per_component[pair_component] == 1) | (gt_per_component[pair_component] == 1)

    matched_pred, matched_gt = [np.zeros(0, dtype=np.intp)], [np.zeros(0, dtype=np.intp)]
    if trivial.any():
        order = np.lexsort((gt_local[trivial], pred_local[trivial], distance[trivial], pair_component[trivial]))
        component = pair_component[trivial][order]
        first = np.r_[True, component[1:] != component[:-1]]
        matched_pred.append(pred_local[trivial][order][first])
        matched_gt.append(gt_local[trivial][order][first])
    hard = np.flatnonzero(~trivial)
    if hard.size:
        hard = hard[np.argsort(pair_component[hard], kind="stable")]
        component = pair_component[hard]
        bounds = np.flatnonzero(np.r_[True, component[1:] != component[:-1], True])
        for start, stop in zip(bounds[:-1], bounds[1:]):
            pairs = hard[start:stop]
            pred_matched, gt_matched = _assignment(pred_local[pairs], gt_local[pairs], distance[pairs], outlier_cost)
            matched_pred.append(pred_matched)
            matched_gt.append(gt_matched)
    pred_out, gt_out = preds[np.concatenate(matched_pred)], gts[np.concatenate(matched_gt)]
    order = np.argsort(pred_out, kind="stable")
    return pred_out[order], gt_out[order]


def _matched_count(pred_index: np.ndarray, gt_index: np.ndarray, distance: np.ndarray, outlier_cost: float) -> int:
    """How many pairs a minimum-cost one-to-one matching of the candidate pairs has (`_optimal_matching`'s size).

    The count alone is cheaper than the matching. Matching m pairs costs the sum of their distances minus 2 x
    outlier_cost x m (plus a constant), so in a connected component whose smaller side has k pixels, every matching of
    fewer than the most pairs m* <= k costs more than a largest one whenever k x (largest distance) < 2 x outlier_cost
    (with BSDS' outlier cost of 100 x maxDist: k < 200): every optimal matching is then a maximum-cardinality one, whose
    size one Hopcroft-Karp run over all such components gives. Larger components are solved exactly as before.
    """
    if pred_index.size == 0:
        return 0
    preds, gts, pred_local, gt_local, pair_component, pred_per_component, gt_per_component = _candidate_components(
        pred_index, gt_index
    )
    n_pred, n_gt = preds.size, gts.size
    smaller_side = np.minimum(pred_per_component, gt_per_component)
    # a relative margin far above float64 rounding of the assignment solver's sums
    by_cardinality = (smaller_side * float(distance.max()) < 2 * outlier_cost * (1 - 1e-9))[pair_component]
    count = 0
    if by_cardinality.any():
        weights = np.ones(int(by_cardinality.sum()), dtype=np.int8)
        biadjacency = csr_matrix(
            (weights, (pred_local[by_cardinality], gt_local[by_cardinality])), shape=(n_pred, n_gt)
        )
        count += int(np.count_nonzero(maximum_bipartite_matching(biadjacency, perm_type="column") >= 0))
    if not by_cardinality.all():
        hard = np.flatnonzero(~by_cardinality)
        count += _optimal_matching(pred_local[hard], gt_local[hard], distance[hard], outlier_cost)[0].size
    return count


def match_edge_pixels(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of edge pixels within max_dist pixels; returns matched (K, 2) row/col coordinates.

    Rows k of the two arrays are matched to each other: `pred_coords[k]` <-> `gt_coords[k]`.
    """
    pred_points, gt_points = np.argwhere(pred), np.argwhere(gt)
    if pred_points.size == 0 or gt_points.size == 0:
        empty = np.zeros((0, 2), dtype=np.intp)
        return empty, empty.copy()
    pred_index, gt_index, distance = _candidate_pairs(pred_points, gt_points, max_dist)
    pred_index, gt_index = _optimal_matching(pred_index, gt_index, distance, OUTLIER_COST * max_dist)
    return pred_points[pred_index], gt_points[gt_index]


def correspond_pixels(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[int, int, int, int]:
    """BSDS correspondPixels counts: (matched_pred, total_pred, matched_gt, total_gt) for one-to-one matching (the
    size of `match_edge_pixels`' matching, counted as `boundary_counts` counts it)."""
    pred_points, gt_points = np.argwhere(pred), np.argwhere(gt)
    matched = 0
    if pred_points.size and gt_points.size:
        pred_index, gt_index, distance = _candidate_pairs(pred_points, gt_points, max_dist)
        matched = _matched_count(pred_index, gt_index, distance, OUTLIER_COST * max_dist)
    return matched, len(pred_points), matched, len(gt_points)


# ----------------------------------------------------------------------------------------------------------------------
# Per-image counts


def _check_probability(prediction: np.ndarray) -> None:
    if prediction.size and not bool(((prediction >= 0) & (prediction <= 1)).all()):
        raise ValueError(
            f"boundary map values must lie in [0, 1] (got {np.nanmin(prediction):.4g} ... "
            f"{np.nanmax(prediction):.4g}): pass probabilities (apply the sigmoid to logits first) or a uint8 PNG"
        )


def _prepare(
    prediction: np.ndarray,
    gt: np.ndarray,
    max_dist_fraction: float,
    nms: bool,
    ignore_index: int,
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Crop to the labelled box, the NMS PNG with ignored pixels zeroed, the thinned ground truth and maxDist in
    pixels; None when nothing is labelled."""
    prediction, gt = np.asarray(prediction), np.asarray(gt)
    if prediction.shape != gt.shape or prediction.ndim != 2:
        raise ValueError(f"prediction {prediction.shape} and gt {gt.shape} must be the same (H, W) shape")
    if prediction.dtype != np.uint8:
        _check_probability(prediction)
    valid = gt != ignore_index
    rows, cols = np.nonzero(valid.any(axis=1))[0], np.nonzero(valid.any(axis=0))[0]
    if rows.size == 0:
        return None
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    prediction, gt, valid = prediction[box], gt[box], valid[box]
    start = time.perf_counter()
    if nms:
        edges = seism_nms(prediction if prediction.dtype == np.uint8 else prediction_png(prediction))
    else:  # the map is taken as the NMS output, written to 8 bits the way nms_process.m writes it
        edges = prediction if prediction.dtype == np.uint8 else matlab_uint8(prediction * 255.0)
    edges = np.where(valid, edges, np.uint8(0))
    middle = time.perf_counter()
    gt_edges = ground_truth_boundaries(valid & (gt > 0), valid)
    if timings is not None:
        timings["nms"] = timings.get("nms", 0.0) + middle - start
        timings["thin"] = timings.get("thin", 0.0) + time.perf_counter() - middle
    return edges, gt_edges, max_dist_fraction * math.hypot(*gt.shape)


def threshold_levels(thresholds: Sequence[float]) -> np.ndarray:
    """Per threshold t the lowest 8-bit level q with q / 255 >= t (float64, as MATLAB compares), at least 1: a
    zero pixel is never an edge (edgesEvalImg thresholds at max(eps, t)); 256 where no level reaches t."""
    levels = np.arange(256) / 255.0
    return np.maximum(np.searchsorted(levels, np.asarray(thresholds, dtype=np.float64), side="left"), 1)


def _counts_at_thresholds(
    edges: np.ndarray,
    gt_edges: np.ndarray,
    max_dist: float,
    thresholds: Sequence[float],
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """4 x T counts of a cropped uint8 NMS map against thinned ground truth; equal binary maps are evaluated once."""
    levels = threshold_levels(thresholds)
    counts = np.zeros((4, levels.size), dtype=np.int64)
    gt_points = np.argwhere(gt_edges)
    counts[3] = gt_points.shape[0]
    gt_tree = cKDTree(gt_points) if gt_points.size else None
    # Only predicted pixels within max_dist of some ground-truth pixel can be matched (small slack: the KD-tree decides)
    near_gt = distance_transform_edt(~gt_edges) <= max_dist + 1e-6 if gt_points.size else None
    # The binary maps are nested, so two thresholds give the same map exactly when they keep as many pixels.
    at_or_above = np.append(np.cumsum(np.bincount(edges.ravel(), minlength=256)[::-1])[::-1], 0)
    cache: dict[int, tuple[int, int]] = {}
    timings = {} if timings is None else timings
    for k, level in enumerate(levels):
        kept = int(at_or_above[level])
        if kept not in cache:
            start = time.perf_counter()
            binary = thin(edges >= level) if kept else np.zeros(edges.shape, dtype=bool)
            middle = time.perf_counter()
            total = int(np.count_nonzero(binary))
            matched = 0
            if total and gt_tree is not None:
                pred_points = np.argwhere(binary & near_gt)
                if pred_points.size:
                    pred_index, gt_index, distance = _candidate_pairs(pred_points, gt_points, max_dist, gt_tree)
                    matched = _matched_count(pred_index, gt_index, distance, OUTLIER_COST * max_dist)
            timings["thin"] = timings.get("thin", 0.0) + middle - start
            timings["match"] = timings.get("match", 0.0) + time.perf_counter() - middle
            cache[kept] = (matched, total)
        counts[0, k], counts[1, k] = cache[kept]
        counts[2, k] = counts[0, k]
    return counts


def boundary_counts(
    prediction: np.ndarray,
    gt: np.ndarray,
    max_dist_fraction: float = 0.011,
    thresholds: Sequence[float] = SEISM_THRESHOLDS,
    nms: bool = True,
    ignore_index: int = IGNORE_INDEX,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Counts (cntP, sumP, cntR, sumR) x thresholds, int64 (4, T), for one (H, W) map (module docstring, steps 0-7).

    `prediction`: boundary probabilities in [0, 1] (written to 8 bits as the reference does) or that uint8 PNG.
    `gt`: > 0 = boundary, 0 = none, `ignore_index` = ignored / padding. `nms=False` skips steps 1-2 and takes the map
    as the NMS output (probabilities are then rounded to 8 bits as `nms_process.m` writes them). If `timings` is a
    dict, seconds spent in "nms", "thin" and "match" are added to it.
    """
    prepared = _prepare(prediction, gt, max_dist_fraction, nms, ignore_index, timings)
    if prepared is None:
        return np.zeros((4, len(thresholds)), dtype=np.int64)
    return _counts_at_thresholds(*prepared, thresholds, timings)


def _image_task(
    png: np.ndarray,
    gt: np.ndarray,
    max_dist_fraction: float,
    thresholds: tuple[float, ...],
    nms: bool,
    ignore_index: int,
) -> np.ndarray:
    """Process-pool entry point (module level so that it pickles under spawn)."""
    return boundary_counts(png, gt, max_dist_fraction, thresholds, nms, ignore_index)


# ----------------------------------------------------------------------------------------------------------------------
# Streaming metric


def _available_cpus() -> int:
    """CPUs this process may run on (the affinity mask in containers), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _shutdown(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


class BoundaryODSMetric(CountsMetric):
    """The paper's boundary odsF (SEISM protocol) from 4 x T summed counts; the module docstring says what is computed.

    `update` takes boundary predictions (B, 1, H, W) and labels (B, 1, H, W) with 1 = edge, 0 = background,
    `ignore_index` = ignored. `from_logits=True` (the default: `SAKForMultiTask` returns logits) applies the sigmoid;
    with `from_logits=False` the predictions must be probabilities in [0, 1]. Nothing is guessed from the values.
    `max_dist` is the fraction of the diagonal (`seism_max_dist`: 0.011 for NYUD-v2, 0.0075 for PASCAL-Context).
    Images (and, for batches smaller than the pool, threshold subsets) are evaluated in a process pool when
    `num_workers > 1`; the counts are integers, so the result does not depend on the pool.
    """

    def __init__(
        self,
        max_dist: float = 0.011,
        *,
        from_logits: bool = True,
        thresholds: Sequence[float] | None = None,
        nms: bool = True,
        ignore_index: int = IGNORE_INDEX,
        num_workers: int | None = None,
        mp_context: str | None = None,
    ):
        self.max_dist, self.from_logits, self.nms, self.ignore_index = max_dist, from_logits, nms, ignore_index
        self.thresholds = tuple(float(t) for t in (SEISM_THRESHOLDS if thresholds is None else thresholds))
        self.num_workers = min(_available_cpus(), 8) if num_workers is None else max(1, int(num_workers))
        self.mp_context = mp_context
        self.counts = torch.zeros(4, len(self.thresholds), dtype=torch.int64)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context(self.mp_context)
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=context)
            weakref.finalize(self, _shutdown, self._pool)
        return self._pool

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # a copy or pickle starts its own pool when it needs one

    def close(self) -> None:
        """Shut the worker pool down (it is restarted by the next parallel `update`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch: prediction (B, 1, H, W) logits (`from_logits=True`) or probabilities, label (B, 1, H, W)."""
        probability = binary_probability(prediction, self.from_logits, "BoundaryODSMetric")
        label = label.detach()
        # the reference's 8-bit prediction PNGs (also 8x less to send to the workers)
        pngs = prediction_png(probability.reshape(label.shape)[:, 0].cpu().numpy())
        gt = label[:, 0].cpu().numpy()
        if self.num_workers <= 1:
            for png, target in zip(pngs, gt):
                counts = boundary_counts(png, target, self.max_dist, self.thresholds, self.nms, self.ignore_index)
                self.counts += torch.from_numpy(counts)
            return
        # Fewer images than workers: each image's thresholds are split into interleaved subsets as well (interleaved
        # because the low thresholds cost the most).
        splits = max(1, min(len(self.thresholds), math.ceil(self.num_workers / max(1, len(gt)))))
        subsets = [self.thresholds[s::splits] for s in range(splits)]
        tasks = [(png, target, subset) for png, target in zip(pngs, gt) for subset in subsets]
        results = self._executor().map(
            _image_task,
            [task[0] for task in tasks],
            [task[1] for task in tasks],
            [self.max_dist] * len(tasks),
            [task[2] for task in tasks],
            [self.nms] * len(tasks),
            [self.ignore_index] * len(tasks),
        )
        counts = np.zeros((4, len(self.thresholds)), dtype=np.int64)
        for index, result in enumerate(results):
            counts[:, index % splits :: splits] += result
        self.counts += torch.from_numpy(counts)

    def compute(self) -> dict[str, float]:
        """odsF, its threshold, precision and recall (in %) from the summed counts (NaN without ground truth)."""
        if self.counts[3].max() <= 0:
            return {"odsF": float("nan"), "threshold": float("nan"), "precision": float("nan"), "recall": float("nan")}
        best, precision, recall, f = best_f_measure(self.counts)
        return {
            "odsF": float(f[best] * 100),
            "threshold": self.thresholds[best],
            "precision": float(precision[best] * 100),
            "recall": float(recall[best] * 100),
        }
