"""Dense multi-task metrics from streaming sufficient statistics (never per-pixel predictions).

Each metric keeps a few tensors (`state()`), `update(prediction, label)` adds a batch, `merge`-able by summation, so
a multi-process evaluation reduces the states (e.g. `accelerator.reduce(state, "sum")`) and gets exactly the
single-process numbers. Conventions (the multi-task literature's):

- semseg / human_parts: confusion matrix over valid pixels (label != 255) -> mIoU over classes that occur in the
  prediction or the label (torchmetrics "macro" behaviour), pixel accuracy.
- depth: pooled over all valid pixels of the split (0 < gt < max_depth and gt != 255): RMSE = sqrt(sum sq / n), abs
  rel, log10-free log RMSE (natural log), delta < 1.25^k.
- normals: angle between unit prediction and label over valid pixels (no label channel == 255), in a 0.01-degree
  histogram -> mean, median, % within 11.25 / 22.5 / 30 degrees.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


IGNORE_INDEX = 255


class SemsegMetric:
    """Confusion matrix -> mIoU and pixel accuracy. `update` takes label maps (B, H, W) or logits (B, C, H, W)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        if prediction.dim() == 4:
            prediction = prediction.argmax(1)
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
        present = union > 0
        iou = true_positive[present] / union[present]
        total = confusion.sum()
        return {
            "mIoU": float(iou.mean() * 100) if present.any() else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total * 100) if total > 0 else float("nan"),
        }


class DepthMetric:
    """Pooled depth errors over valid pixels (0 < gt < max_depth, gt != 255)."""

    def __init__(self, max_depth: float = 80.0):
        self.max_depth = max_depth
        self.sums = torch.zeros(7, dtype=torch.float64)  # n, sq, abs_rel, sq_log, delta1, delta2, delta3

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        prediction, label = prediction.reshape(label.shape).double(), label.double()
        valid = (label > 0) & (label < self.max_depth) & (label != IGNORE_INDEX)
        pred, gt = prediction[valid], label[valid]
        pred_pos = pred.clamp(min=1e-6)
        ratio = torch.maximum(pred_pos / gt, gt / pred_pos)
        self.sums += torch.stack([
            valid.sum().double(),
            ((pred - gt) ** 2).sum(),
            ((pred - gt).abs() / gt).sum(),
            ((pred_pos.log() - gt.log()) ** 2).sum(),
            (ratio < 1.25).sum().double(),
            (ratio < 1.25**2).sum().double(),
            (ratio < 1.25**3).sum().double(),
        ]).cpu()  # fmt: skip

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sums = state["sums"].double().cpu()

    def compute(self) -> dict[str, float]:
        n = self.sums[0].item()
        if n == 0:
            return {k: float("nan") for k in ("rmse", "abs_rel", "log_rmse", "delta1", "delta2", "delta3")}
        s = self.sums / n
        return {"rmse": math.sqrt(s[1]), "abs_rel": float(s[2]), "log_rmse": math.sqrt(s[3]),
                "delta1": float(s[4] * 100), "delta2": float(s[5] * 100), "delta3": float(s[6] * 100)}  # fmt: skip


class NormalsMetric:
    """Angular error histogram (0.01-degree bins, 0..180) -> mean, median, % within 11.25 / 22.5 / 30 degrees."""

    BINS = 18000

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index
        self.histogram = torch.zeros(self.BINS, dtype=torch.int64)
        self.angle_sum = torch.zeros((), dtype=torch.float64)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        valid = (label != self.ignore_index).all(dim=1)
        pred = F.normalize(prediction.float(), dim=1).permute(0, 2, 3, 1)[valid]
        gt = F.normalize(label.float(), dim=1).permute(0, 2, 3, 1)[valid]
        angles = torch.rad2deg(torch.acos((pred * gt).sum(-1).clamp(-1, 1))).double()
        self.angle_sum += angles.sum().cpu()
        bins = (angles * 100).long().clamp(max=self.BINS - 1).cpu()
        self.histogram += torch.bincount(bins, minlength=self.BINS)

    def state(self) -> dict[str, torch.Tensor]:
        return {"histogram": self.histogram, "angle_sum": self.angle_sum}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.histogram, self.angle_sum = state["histogram"].long().cpu(), state["angle_sum"].double().cpu()

    def compute(self) -> dict[str, float]:
        n = int(self.histogram.sum())
        if n == 0:
            return {k: float("nan") for k in ("mean", "median", "within_11.25", "within_22.5", "within_30")}
        cumulative = self.histogram.cumsum(0)
        median_bin = int(torch.searchsorted(cumulative, (n + 1) // 2))
        return {
            "mean": float(self.angle_sum / n),
            "median": (median_bin + 0.5) / 100,
            "within_11.25": float(cumulative[1124] / n * 100),
            "within_22.5": float(cumulative[2249] / n * 100),
            "within_30": float(cumulative[2999] / n * 100),
        }


class BoundaryMetric:
    """Boundary F-measure at the optimal dataset-wide threshold (ODS), with a distance tolerance.

    For each threshold t in `thresholds`, a prediction pixel counts as correct when a ground-truth boundary pixel lies
    within `max_dist` (a fraction of the image diagonal: 0.011 on NYUD-v2) and a ground-truth pixel counts as recalled
    when a predicted one lies within it. Counts are summed over the split, so the state is 4 x T integers and sums
    across processes. This is a tolerance-based matching, NOT the one-to-one BSDS pixel correspondence of the
    reference's SEISM toolkit (no non-maximum suppression either); it ranks models the same way but its numbers are
    not comparable with published odsF.
    """

    def __init__(self, max_dist: float = 0.011, thresholds: int = 19, ignore_index: int = IGNORE_INDEX):
        self.max_dist, self.ignore_index = max_dist, ignore_index
        self.thresholds = torch.linspace(0.05, 0.95, thresholds)
        self.counts = torch.zeros(4, thresholds, dtype=torch.int64)  # matched pred, pred, matched gt, gt

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        from scipy.ndimage import distance_transform_edt

        probability = prediction.float().sigmoid() if prediction.min() < 0 or prediction.max() > 1 else prediction
        probability, label = probability.reshape(label.shape)[:, 0].cpu(), label[:, 0].cpu()
        for prob, gt in zip(probability, label):
            valid = (gt != self.ignore_index).numpy()
            gt_edges = ((gt == 1) & (gt != self.ignore_index)).numpy()
            radius = self.max_dist * (gt.shape[0] ** 2 + gt.shape[1] ** 2) ** 0.5
            near_gt = distance_transform_edt(~gt_edges) <= radius if gt_edges.any() else np.zeros_like(gt_edges)
            for k, threshold in enumerate(self.thresholds):
                pred_edges = (prob >= threshold).numpy() & valid
                near_pred = distance_transform_edt(~pred_edges) <= radius if pred_edges.any() else np.zeros_like(valid)
                self.counts[:, k] += torch.tensor([
                    int((pred_edges & near_gt).sum()), int(pred_edges.sum()),
                    int((gt_edges & near_pred).sum()), int(gt_edges.sum()),
                ])  # fmt: skip

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].long().cpu()

    def compute(self) -> dict[str, float]:
        counts = self.counts.double()
        precision = counts[0] / counts[1].clamp(min=1)
        recall = counts[2] / counts[3].clamp(min=1)
        f = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        best = int(f.argmax())
        return {"odsF_tol": float(f[best] * 100), "threshold": float(self.thresholds[best])}
