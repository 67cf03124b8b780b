"""Multi-task metrics from streaming sufficient statistics (never per-pixel predictions).

Each metric keeps a few tensors (`state()`); `update(prediction, label)` adds a batch; states merge by summation, so a
multi-process evaluation reduces them (`accelerator.reduce(state, "sum")`) and gets exactly the single-process
numbers. Every definition follows the reference implementation's evaluation code:

- semseg / human_parts: confusion matrix over valid pixels (label != 255); mIoU is the mean over ALL classes of
  TP / (TP + FP + FN), a class absent from both prediction and label counting as 0 (as the reference's meters do; on
  the full NYUD-v2 / PASCAL-Context test splits every class occurs); pixel accuracy.
- Float statistics (depth errors, normal angles) are summed as int64 fixed point (2^-24 units per pixel value), so
  the totals are exact and independent of how the split was divided among processes or batches.
- depth: the prediction is clamped at 0 (then 1e-9), errors pooled over all valid pixels of the split
  (0 < gt < 80): RMSE = sqrt(sum sq / n), plus abs rel, log RMSE (natural log) and delta < 1.25^k.
- normals: the angle 2 atan2(|p - g|, |p + g|) between unit prediction and unit label (accurate for small angles,
  unlike acos of the dot product) over valid pixels (no label channel == 255), in a 0.01-degree histogram -> mean
  (exact, from the summed angles), median, % within 11.25 / 22.5 / 30 degrees.
- sal: maxF with beta^2 = 0.3 over the thresholds 0.05, 0.10, ..., 0.95 of the salient-class probability
  (`prediction >= threshold`), from counts summed over the split.
- edge: see `modeling_sak.evaluation.boundaries` (the paper's odsF: the authors' SEISM protocol, BSDS one-to-one
  matching); `BoundaryMetric` here is a quick tolerance-based F-measure for monitoring.

Logits or probabilities: the saliency and boundary metrics take `from_logits` (default True, since
`SAKForMultiTask` returns raw head outputs): True applies the sigmoid (one channel) or the softmax (two channels);
False expects probabilities in [0, 1] and rejects other values. Nothing is guessed from the values of a batch.

The base of the count-based metrics is in `counts.py`; `make_metrics` and `delta_m` (the multi-task registry) in
`registry.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .counts import CountsMetric, best_f_measure, binary_probability
from .tasks_sak import IGNORE_INDEX


FIXED_POINT_BITS = 24  # float statistics are summed as integers in units of 2^-24 (exact in any order)


class SemsegMetric:
    """Confusion matrix -> mIoU (over all classes) and pixel accuracy. `update` takes ids (B, H, W) or logits."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        if prediction.dim() == 4:
            prediction = prediction.max(1).indices  # as the reference (torch.max); 1.5x faster than argmax on CPU
        label = label[:, 0] if label.dim() == 4 else label
        valid = label != self.ignore_index
        index = label[valid].long() * self.num_classes + prediction[valid].long().to(label.device)
        self.confusion += torch.bincount(index.cpu(), minlength=self.num_classes**2).view(self.num_classes, -1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.confusion}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.confusion = state["confusion"].to(torch.int64).cpu()

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.double()
        true_positive = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        iou = true_positive / union.clamp(min=1e-8)
        total = confusion.sum()
        return {
            "mIoU": float(iou.mean() * 100) if total > 0 else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total * 100) if total > 0 else float("nan"),
        }


def fixed_point_sum(values: torch.Tensor, what: str) -> torch.Tensor:
    """Sum of float values as an int64 count of 2^-FIXED_POINT_BITS units (each value rounded first).

    Integer sums are exact in any order, so statistics summed per process and then across processes equal the
    single-process ones bit for bit (float sums would differ in the last bits with the grouping)."""
    scaled = (values.double() * 2.0**FIXED_POINT_BITS).round()
    if scaled.numel() and not bool(scaled.abs().max() < 2.0**52):
        raise ValueError(f"{what}: a per-pixel value of {float(values.abs().max()):.4g} is too large to accumulate")
    return scaled.to(torch.int64).sum()


def _add_checked(total: torch.Tensor, increment: torch.Tensor, what: str) -> torch.Tensor:
    result = total + increment
    if bool((result.abs() > 2**62).any()):
        raise OverflowError(f"{what}: the accumulated errors exceed the fixed-point range; evaluate in smaller parts")
    return result


class DepthMetric:
    """Pooled depth errors over valid pixels (0 < gt < max_depth, gt != 255), accumulated exactly."""

    def __init__(self, max_depth: float = 80.0):
        self.max_depth = max_depth
        # n, sq, abs_rel, sq_log (fixed point), delta1, delta2, delta3 (counts)
        self.sums = torch.zeros(7, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        prediction, label = prediction.reshape(label.shape).double().cpu(), label.double().cpu()
        valid = (label > 0) & (label < self.max_depth) & (label != IGNORE_INDEX)
        # As the reference: predictions clamped at 0, and non-positive ones set to 1e-9.
        pred, gt = prediction[valid].clamp(min=1e-9), label[valid]
        ratio = torch.maximum(pred / gt, gt / pred)
        increment = torch.stack(
            [
                valid.sum(),
                fixed_point_sum((pred - gt) ** 2, "depth squared error"),
                fixed_point_sum((pred - gt).abs() / gt, "depth relative error"),
                fixed_point_sum((pred.log() - gt.log()) ** 2, "depth log error"),
                (ratio < 1.25).sum(),
                (ratio < 1.25**2).sum(),
                (ratio < 1.25**3).sum(),
            ]
        )
        self.sums = _add_checked(self.sums, increment, "depth")

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sums = state["sums"].to(torch.int64).cpu()

    def compute(self) -> dict[str, float]:
        n = self.sums[0].item()
        if n == 0:
            return {k: float("nan") for k in ("rmse", "abs_rel", "log_rmse", "delta1", "delta2", "delta3")}
        s = self.sums.double() / n
        s[1:4] /= 2.0**FIXED_POINT_BITS
        return {
            "rmse": math.sqrt(s[1]),
            "abs_rel": float(s[2]),
            "log_rmse": math.sqrt(s[3]),
            "delta1": float(s[4] * 100),
            "delta2": float(s[5] * 100),
            "delta3": float(s[6] * 100),
        }


class NormalsMetric:
    """Angular error histogram (0.01-degree bins, 0..180) -> mean, median, % within 11.25 / 22.5 / 30 degrees."""

    BINS = 18000

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index
        self.histogram = torch.zeros(self.BINS, dtype=torch.int64)
        self.angle_sum = torch.zeros((), dtype=torch.int64)  # fixed point, see fixed_point_sum

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        valid = (label != self.ignore_index).all(dim=1)
        pred = F.normalize(prediction.float(), dim=1).permute(0, 2, 3, 1)[valid]
        gt = F.normalize(label.float(), dim=1).permute(0, 2, 3, 1)[valid]
        angles = torch.rad2deg(2 * torch.atan2((pred - gt).norm(dim=-1), (pred + gt).norm(dim=-1))).double()
        angles = angles.cpu()
        self.angle_sum = _add_checked(self.angle_sum, fixed_point_sum(angles, "normal angle"), "normals")
        bins = (angles * 100).long().clamp(max=self.BINS - 1)
        self.histogram += torch.bincount(bins, minlength=self.BINS)

    def state(self) -> dict[str, torch.Tensor]:
        return {"histogram": self.histogram, "angle_sum": self.angle_sum}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.histogram, self.angle_sum = state["histogram"].long().cpu(), state["angle_sum"].long().cpu()

    def compute(self) -> dict[str, float]:
        n = int(self.histogram.sum())
        if n == 0:
            return {k: float("nan") for k in ("mean", "median", "within_11.25", "within_22.5", "within_30")}
        cumulative = self.histogram.cumsum(0)
        median_bin = int(torch.searchsorted(cumulative, (n + 1) // 2))
        return {
            "mean": float(self.angle_sum.double() / 2.0**FIXED_POINT_BITS / n),
            "median": (median_bin + 0.5) / 100,
            "within_11.25": float(cumulative[1124] / n * 100),
            "within_22.5": float(cumulative[2249] / n * 100),
            "within_30": float(cumulative[2999] / n * 100),
        }


class SaliencyMetric(CountsMetric):
    """Saliency maxF (beta^2 = 0.3) over thresholds of the salient-class probability, from summed counts.

    `from_logits=True` (default): two-channel logits (B, 2, H, W) go through the softmax (channel 1 = salient),
    one-channel logits (B, [1,] H, W) through the sigmoid. `from_logits=False`: probabilities of both classes
    (B, 2, H, W) or of the salient class (B, [1,] H, W), in [0, 1].
    """

    def __init__(self, beta_squared: float = 0.3, ignore_index: int = IGNORE_INDEX, from_logits: bool = True):
        self.beta_squared, self.ignore_index, self.from_logits = beta_squared, ignore_index, from_logits
        self.thresholds = torch.arange(0.05, 1, 0.05)  # float32, as the reference: 0.05 ... 0.95
        self.counts = torch.zeros(3, len(self.thresholds), dtype=torch.int64)  # true pos, predicted pos, actual pos

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """`prediction` (B, 2, H, W) or (B, [1,] H, W), logits or probabilities as `from_logits` says."""
        if prediction.dim() == 4 and prediction.shape[1] == 2:
            if self.from_logits:
                probability = prediction.detach().float().softmax(1)[:, 1]
            else:
                probability = binary_probability(prediction, False, "SaliencyMetric")[:, 1]
        elif prediction.dim() == 3 or (prediction.dim() == 4 and prediction.shape[1] == 1):
            probability = binary_probability(prediction, self.from_logits, "SaliencyMetric")
            probability = probability.reshape(prediction.shape[0], *prediction.shape[-2:])
        else:
            raise ValueError(
                f"SaliencyMetric: prediction {tuple(prediction.shape)} is neither (B, 2, H, W) nor (B, [1,] H, W)"
            )
        label = label.reshape(probability.shape).cpu()
        valid = label != self.ignore_index
        probability, target = probability.cpu()[valid], label[valid].long()
        predicted = probability[None, :] >= self.thresholds[:, None]  # (T, n)
        self.counts += torch.stack(
            [
                (predicted & (target[None] == 1)).sum(1),
                predicted.sum(1),
                (target == 1).sum().expand(len(predicted)),
            ]
        )

    def compute(self) -> dict[str, float]:
        true_positive, predicted, actual = self.counts.double()
        precision, recall = true_positive / (predicted + 1e-8), true_positive / (actual + 1e-8)
        f = (1 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall + 1e-8)
        best = int(f.argmax())
        return {"maxF": float(f[best] * 100), "threshold": round(float(self.thresholds[best]), 4)}


class BoundaryMetric(CountsMetric):
    """Boundary F-measure at the optimal dataset-wide threshold (ODS), with a distance tolerance.

    For each threshold t in `thresholds`, a prediction pixel counts as correct when a ground-truth boundary pixel lies
    within `max_dist` (a fraction of the image diagonal: 0.011 on NYUD-v2) and a ground-truth pixel counts as recalled
    when a predicted one lies within it. Counts are summed over the split, so the state is 4 x T integers and sums
    across processes. This is a tolerance-based matching, NOT the one-to-one BSDS pixel correspondence of the
    reference's SEISM toolkit (no non-maximum suppression either); it ranks models the same way but its numbers are
    not comparable with published odsF. `from_logits` as in `BoundaryODSMetric` (default True: the sigmoid is applied).
    """

    def __init__(
        self, max_dist: float = 0.011, thresholds: int = 19, ignore_index: int = IGNORE_INDEX, from_logits: bool = True
    ):
        self.max_dist, self.ignore_index, self.from_logits = max_dist, ignore_index, from_logits
        self.thresholds = torch.linspace(0.05, 0.95, thresholds)
        self.counts = torch.zeros(4, thresholds, dtype=torch.int64)  # matched pred, pred, matched gt, gt

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        from scipy.ndimage import distance_transform_edt

        probability = binary_probability(prediction, self.from_logits, "BoundaryMetric")
        probability, label = probability.reshape(label.shape)[:, 0].cpu(), label[:, 0].cpu()
        for prob, gt in zip(probability, label):
            valid = (gt != self.ignore_index).numpy()
            gt_edges = ((gt == 1) & (gt != self.ignore_index)).numpy()
            radius = self.max_dist * (gt.shape[0] ** 2 + gt.shape[1] ** 2) ** 0.5
            near_gt = distance_transform_edt(~gt_edges) <= radius if gt_edges.any() else np.zeros_like(gt_edges)
            for k, threshold in enumerate(self.thresholds):
                pred_edges = (prob >= threshold).numpy() & valid
                near_pred = distance_transform_edt(~pred_edges) <= radius if pred_edges.any() else np.zeros_like(valid)
                self.counts[:, k] += torch.tensor(
                    [
                        int((pred_edges & near_gt).sum()),
                        int(pred_edges.sum()),
                        int((gt_edges & near_pred).sum()),
                        int(gt_edges.sum()),
                    ]
                )

    def compute(self) -> dict[str, float]:
        best, _, _, f = best_f_measure(self.counts)
        return {"odsF_tol": float(f[best] * 100), "threshold": float(self.thresholds[best])}
