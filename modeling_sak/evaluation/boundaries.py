"""BSDS-style boundary odsF (the SEISM protocol of the multi-task literature), in plain numpy / scipy / scikit-image.

What is computed, per image (`boundary_counts`):

1. Crop prediction and label to the bounding box of the labelled pixels (label != 255: the padding goes away), so
   the maximal distance and the border suppression refer to the real image.
2. Non-maximum suppression of the boundary probability (`edge_nms`, Dollar's edgesNms recipe as used before SEISM):
   orientation from the second derivatives of a triangle-smoothed copy (radius 4), a pixel is kept when its value times
   1.01 is not below the bilinearly interpolated values 1..radius pixels away along the normal, and values are scaled
   down linearly within 5 pixels of the image border. Predictions at ignored pixels inside the crop are then zeroed.
3. Ground truth: label pixels > 0 (and != 255) are edges, thinned (`thin`, MATLAB `bwmorph(.., 'thin', inf)`).
4. For each of the 101 SEISM thresholds (0.001, 0.01, 0.02, ..., 0.99, 0.999) the map is binarised with `>` (SEISM reads
   its maps with `im2double(png) > threshold`; `strict=False` gives BSDS / Dollar's `>=`), thinned, and matched one to
   one with the ground-truth pixels (`correspond_pixels`): a minimum-cost bipartite matching in which a pair costs its
   Euclidean distance when at most `max_dist_fraction` x the diagonal of the cropped image apart, and every unmatched
   pixel costs 100 x that distance (BSDS `correspondPixels`' outlier cost).
5. The image's counts are a 4 x T int64 array: matched predicted pixels, predicted pixels, matched ground-truth pixels,
   ground-truth pixels. They sum over images and processes; `BoundaryODSMetric` turns the summed counts into
   precision = matched / predicted and recall = matched / ground truth per threshold, and odsF = the maximum F over the
   thresholds (no interpolation between thresholds; 0 / 0 counts as 0 as in BSDS's `collect_eval_bdry`).

With a single ground truth per image (NYUD-v2, PASCAL-Context) matched predicted and matched ground-truth pixels are
the same number; the two rows are kept for BSDS's format.

Known differences from the MATLAB SEISM / BSDS code (own code, licence-clean: no BSDS or Dollar source is used):

- The matching is solved exactly and deterministically: LAPJVsp (scipy's `min_weight_full_bipartite_matching`) on
  the candidate pairs from a KD-tree, with one private "unmatched" column per pixel of the smaller side.
  BSDS's CSA solver uses integer costs and a randomly sampled sparse outlier graph: it is randomised and finds slightly
  fewer matches. The same formulation was measured on this project's machines within 1e-4 ODS of the MATLAB output
  on 5 images, about 0.002 higher on near-perfect maps.
- In the NMS orientation `atan(Oyy * sign(-Oxy) / (Oxx + 1e-5))`, sign(0) is taken as +1 (MATLAB: 0). This only
  matters where Oxy is exactly 0 with Oyy != 0, i.e. exactly horizontal ridges, which Dollar's formula orients along
  the ridge and so never thins (a blurred horizontal line keeps its full width).
- Everything is float64 (Dollar's mex: float32) and nothing is quantised to 8 bits, whereas SEISM pipelines save the
  prediction and the NMS output as 8-bit PNGs (ties, and slightly different extreme thresholds).
- SEISM has no ignore label: cropping to the labelled box and zeroing predictions at ignored pixels inside it is this
  package's handling of 255. Several ground-truth annotations per image (BSDS500) are not supported.
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
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree
from skimage.morphology import thin as _skimage_thin

from .metrics import CountsMetric, best_f_measure


IGNORE_INDEX = 255
SEISM_THRESHOLDS: tuple[float, ...] = (0.001, *(round(k / 100, 2) for k in range(1, 100)), 0.999)
OUTLIER_COST = 100.0  # BSDS correspondPixels: an unmatched pixel costs 100 x maxDist


# ----------------------------------------------------------------------------------------------------------------------
# Non-maximum suppression


def conv_tri(image: np.ndarray, radius: float) -> np.ndarray:
    """Separable triangle filter of the given radius with symmetric padding (Dollar's convTri)."""
    if radius <= 0:
        return np.asarray(image, dtype=np.float64)
    if radius <= 1:
        # fractional radius: the [1 p 1] kernel whose variance matches a triangle of that radius
        p = 12 / radius / (radius + 2) - 2
        kernel = np.array([1.0, p, 1.0]) / (2 + p)
    else:
        r = int(radius)
        kernel = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float64) / (r + 1) ** 2
    # scipy's "reflect" repeats the edge pixel (d c b a | a b c d), i.e. MATLAB's "symmetric"
    smoothed = correlate1d(np.asarray(image, dtype=np.float64), kernel, axis=0, mode="reflect")
    return correlate1d(smoothed, kernel, axis=1, mode="reflect")


def edge_orientation(probability: np.ndarray, smoothing_radius: float = 4) -> np.ndarray:
    """Normal orientation in [0, pi) (angle of (column, row) direction) from second derivatives of the smoothed map."""
    if min(np.shape(probability)) < 2:
        return np.zeros(np.shape(probability))
    smoothed = conv_tri(probability, smoothing_radius)
    # np.gradient: central differences inside, one-sided at the border, like MATLAB's gradient
    grad_y, grad_x = np.gradient(smoothed)
    grad_xx = np.gradient(grad_x, axis=1)
    grad_xy, grad_yy = np.gradient(grad_y, axis=1), np.gradient(grad_y, axis=0)
    sign = np.where(grad_xy > 0, -1.0, 1.0)  # sign(-Oxy) with sign(0) = +1, see the module docstring
    with np.errstate(divide="ignore", invalid="ignore"):
        orientation = np.mod(np.arctan(grad_yy * sign / (grad_xx + 1e-5)), np.pi)
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
    probability: np.ndarray,
    radius: int = 1,
    suppression: int = 5,
    multiplier: float = 1.01,
    orientation: np.ndarray | None = None,
) -> np.ndarray:
    """Dollar-style non-maximum suppression of an (H, W) boundary map; returns a float64 map of the same shape."""
    edges = np.asarray(probability, dtype=np.float64)
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
    for step in range(-radius, radius + 1):
        if step:
            keep &= values >= _bilinear(edges, cols + step * cos, rows + step * sin)
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


def thin(binary: np.ndarray) -> np.ndarray:
    """Morphological thinning to 1-pixel-wide curves until convergence (MATLAB bwmorph(.., 'thin', inf))."""
    binary = np.asarray(binary, dtype=bool)
    rows, cols = np.nonzero(binary)
    if rows.size == 0:
        return binary.copy()
    # thin only the bounding box (plus a 1-pixel frame): same result, less work on sparse maps
    top, bottom = max(rows.min() - 1, 0), min(rows.max() + 2, binary.shape[0])
    left, right = max(cols.min() - 1, 0), min(cols.max() + 2, binary.shape[1])
    result = np.zeros_like(binary)
    result[top:bottom, left:right] = _skimage_thin(binary[top:bottom, left:right])
    return result


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


def _optimal_matching(
    pred_index: np.ndarray, gt_index: np.ndarray, distance: np.ndarray, outlier_cost: float
) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching over candidate pairs; unmatched pixels cost outlier_cost each.

    Returns the matched (pred index, gt index) arrays, sorted by pred index.
    """
    if pred_index.size == 0:
        return pred_index, gt_index
    preds, pred_local = _compact(pred_index)
    gts, gt_local = _compact(gt_index)
    n_pred, n_gt = preds.size, gts.size
    # Split the candidate graph into connected components: a component with a single pixel on one side is solved by
    # its shortest pair (matching it always beats two outlier costs), the rest go to one sparse assignment problem.
    graph = coo_matrix((np.ones(pred_local.size), (pred_local, n_pred + gt_local)), shape=(n_pred + n_gt,) * 2)
    n_components, labels = connected_components(graph, directed=False)
    pair_component = labels[pred_local]
    pred_per_component = np.bincount(labels[:n_pred], minlength=n_components)
    gt_per_component = np.bincount(labels[n_pred:], minlength=n_components)
    trivial = (pred_per_component[pair_component] == 1) | (gt_per_component[pair_component] == 1)

    matched_pred, matched_gt = [], []
    if trivial.any():
        order = np.lexsort((gt_local[trivial], pred_local[trivial], distance[trivial], pair_component[trivial]))
        component = pair_component[trivial][order]
        first = np.r_[True, component[1:] != component[:-1]]
        matched_pred.append(pred_local[trivial][order][first])
        matched_gt.append(gt_local[trivial][order][first])
    hard = ~trivial
    if hard.any():
        p_nodes, p = _compact(pred_local[hard])
        g_nodes, g = _compact(gt_local[hard])
        # Rectangular assignment: rows are the pixels of the smaller side, columns the pixels of the other side plus
        # one private "unmatched" column per row. A row left unmatched costs 2 x outlier_cost, which is the cost of
        # the two outliers a matched pair would have saved; so the total is the BSDS objective up to a constant.
        # Weights are shifted by +1 (the same for every full matching) because LAPJVsp needs non-zero weights.
        swap = g_nodes.size < p_nodes.size
        row_nodes, col_nodes, r, c = (g, p, g_nodes.size, p_nodes.size) if swap else (p, g, p_nodes.size, g_nodes.size)
        rows = np.concatenate([row_nodes, np.arange(r)])
        cols = np.concatenate([col_nodes, c + np.arange(r)])
        weights = np.concatenate([distance[hard], np.full(r, 2 * outlier_cost)]) + 1.0
        row_index, col_index = min_weight_full_bipartite_matching(
            csr_matrix((weights, (rows, cols)), shape=(r, r + c))
        )
        real = col_index < c
        row_index, col_index = row_index[real], col_index[real]
        pred_hard, gt_hard = (col_index, row_index) if swap else (row_index, col_index)
        matched_pred.append(p_nodes[pred_hard])
        matched_gt.append(g_nodes[gt_hard])
    pred_out, gt_out = preds[np.concatenate(matched_pred)], gts[np.concatenate(matched_gt)]
    order = np.argsort(pred_out, kind="stable")
    return pred_out[order], gt_out[order]


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
    """BSDS correspondPixels counts: (matched_pred, total_pred, matched_gt, total_gt) for one-to-one matching."""
    pred_coords, _ = match_edge_pixels(pred, gt, max_dist)
    matched = len(pred_coords)
    return matched, int(np.count_nonzero(pred)), matched, int(np.count_nonzero(gt))


# ----------------------------------------------------------------------------------------------------------------------
# Per-image counts


def _prepare(
    probability: np.ndarray,
    gt: np.ndarray,
    max_dist_fraction: float,
    nms: bool,
    ignore_index: int,
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Crop to the labelled box, NMS, drop ignored pixels, thin the ground truth; None when nothing is labelled."""
    probability, gt = np.asarray(probability, dtype=np.float64), np.asarray(gt)
    if probability.shape != gt.shape or probability.ndim != 2:
        raise ValueError(f"probability {probability.shape} and gt {gt.shape} must be the same (H, W) shape")
    valid = gt != ignore_index
    rows, cols = np.nonzero(valid.any(axis=1))[0], np.nonzero(valid.any(axis=0))[0]
    if rows.size == 0:
        return None
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    probability, gt, valid = probability[box], gt[box], valid[box]
    start = time.perf_counter()
    if nms:
        probability = edge_nms(probability)
    probability = np.where(valid, probability, 0.0)
    middle = time.perf_counter()
    gt_edges = thin((gt > 0) & valid)
    if timings is not None:
        timings["nms"] = timings.get("nms", 0.0) + middle - start
        timings["thin"] = timings.get("thin", 0.0) + time.perf_counter() - middle
    max_dist = max_dist_fraction * math.hypot(*gt.shape)
    return probability, gt_edges, max_dist


def _counts_at_thresholds(
    probability: np.ndarray,
    gt_edges: np.ndarray,
    max_dist: float,
    thresholds: Sequence[float],
    strict: bool,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """4 x T counts of an NMS-ed, cropped map against thinned ground truth; equal binary maps are evaluated once."""
    # Zero-valued pixels are never edges (Dollar's edgesEvalImg thresholds at max(eps, t) for the same reason).
    thresholds = np.maximum(np.asarray(thresholds, dtype=np.float64), np.finfo(np.float64).tiny)
    counts = np.zeros((4, thresholds.size), dtype=np.int64)
    gt_points = np.argwhere(gt_edges)
    counts[3] = gt_points.shape[0]
    gt_tree = cKDTree(gt_points) if gt_points.size else None
    # Only predicted pixels within max_dist of some ground-truth pixel can be matched (small slack: the KD-tree decides)
    near_gt = distance_transform_edt(~gt_edges) <= max_dist + 1e-6 if gt_points.size else None
    # The binary maps are nested, so two thresholds give the same map exactly when they keep as many pixels.
    values = np.sort(probability[probability > 0], kind="stable")
    side = "right" if strict else "left"
    kept = values.size - np.searchsorted(values, thresholds, side=side)
    cache: dict[int, tuple[int, int]] = {}
    timings = {} if timings is None else timings
    for k, threshold in enumerate(thresholds):
        if kept[k] in cache:
            counts[0, k], counts[1, k] = cache[kept[k]]
            counts[2, k] = counts[0, k]
            continue
        start = time.perf_counter()
        binary = thin(probability > threshold if strict else probability >= threshold)
        middle = time.perf_counter()
        total = int(np.count_nonzero(binary))
        matched = 0
        if total and gt_tree is not None:
            pred_points = np.argwhere(binary & near_gt)
            if pred_points.size:
                pred_index, gt_index, distance = _candidate_pairs(pred_points, gt_points, max_dist, gt_tree)
                matched = _optimal_matching(pred_index, gt_index, distance, OUTLIER_COST * max_dist)[0].size
        end = time.perf_counter()
        timings["thin"] = timings.get("thin", 0.0) + middle - start
        timings["match"] = timings.get("match", 0.0) + end - middle
        cache[kept[k]] = (matched, total)
        counts[:3, k] = matched, total, matched
    return counts


def boundary_counts(
    probability: np.ndarray,
    gt: np.ndarray,
    max_dist_fraction: float = 0.011,
    thresholds: Sequence[float] = SEISM_THRESHOLDS,
    nms: bool = True,
    strict: bool = True,
    ignore_index: int = IGNORE_INDEX,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Counts (matched_pred, total_pred, matched_gt, total_gt) x thresholds, int64 (4, T), for one (H, W) map.

    `probability` in [0, 1]; `gt` 1 = edge, 0 = no edge, `ignore_index` = ignored / padding. `strict` binarises with
    `>` (SEISM) instead of `>=` (BSDS). If `timings` is a dict, seconds spent in "nms", "thin" and "match" are added.
    """
    prepared = _prepare(probability, gt, max_dist_fraction, nms, ignore_index, timings)
    if prepared is None:
        return np.zeros((4, len(thresholds)), dtype=np.int64)
    return _counts_at_thresholds(*prepared, thresholds, strict, timings)


def _image_task(
    probability: np.ndarray,
    gt: np.ndarray,
    max_dist_fraction: float,
    thresholds: tuple[float, ...],
    nms: bool,
    strict: bool,
    ignore_index: int,
) -> np.ndarray:
    """Process-pool entry point (module level so that it pickles under spawn)."""
    return boundary_counts(probability, gt, max_dist_fraction, thresholds, nms, strict, ignore_index)


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
    """BSDS / SEISM boundary odsF from 4 x T summed counts (see the module docstring for exactly what is computed).

    `update` takes boundary logits or probabilities (B, 1, H, W) and labels (B, 1, H, W) with 1 = edge, 0 = background,
    `ignore_index` = ignored. Images (and, for batches smaller than the pool, threshold subsets) are evaluated in a
    process pool when `num_workers > 1`; the counts are integers, so the result does not depend on the pool.
    """

    def __init__(
        self,
        max_dist: float = 0.011,
        thresholds: Sequence[float] | None = None,
        nms: bool = True,
        ignore_index: int = IGNORE_INDEX,
        num_workers: int | None = None,
        strict: bool = True,
        mp_context: str | None = None,
    ):
        self.max_dist, self.nms, self.ignore_index, self.strict = max_dist, nms, ignore_index, strict
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
        """Add a batch: prediction (B, 1, H, W) logits or probabilities, label (B, 1, H, W)."""
        prediction = prediction.detach().float()
        if prediction.numel() and (prediction.min() < 0 or prediction.max() > 1):
            prediction = prediction.sigmoid()
        label = label.detach()
        probability = prediction.reshape(label.shape)[:, 0].cpu().double().numpy()
        gt = label[:, 0].cpu().numpy()
        if self.num_workers <= 1:
            for prob, target in zip(probability, gt):
                counts = boundary_counts(
                    prob, target, self.max_dist, self.thresholds, self.nms, self.strict, self.ignore_index
                )
                self.counts += torch.from_numpy(counts)
            return
        # Fewer images than workers: each image's thresholds are split into interleaved subsets as well (interleaved
        # because the low thresholds cost the most).
        splits = max(1, min(len(self.thresholds), math.ceil(self.num_workers / max(1, len(gt)))))
        subsets = [self.thresholds[s::splits] for s in range(splits)]
        tasks = [(prob, target, subset) for prob, target in zip(probability, gt) for subset in subsets]
        results = self._executor().map(
            _image_task,
            [task[0] for task in tasks],
            [task[1] for task in tasks],
            [self.max_dist] * len(tasks),
            [task[2] for task in tasks],
            [self.nms] * len(tasks),
            [self.strict] * len(tasks),
            [self.ignore_index] * len(tasks),
        )
        counts = np.zeros((4, len(self.thresholds)), dtype=np.int64)
        for index, result in enumerate(results):
            counts[:, index % splits :: splits] += result
        self.counts += torch.from_numpy(counts)

    def compute(self) -> dict[str, float]:
        """odsF, its threshold, precision and recall (in %) from the summed counts."""
        if self.counts[3].max() <= 0:
            return {"odsF": float("nan"), "threshold": float("nan"), "precision": float("nan"), "recall": float("nan")}
        best, precision, recall, f = best_f_measure(self.counts)
        return {
            "odsF": float(f[best] * 100),
            "threshold": self.thresholds[best],
            "precision": float(precision[best] * 100),
            "recall": float(recall[best] * 100),
        }
