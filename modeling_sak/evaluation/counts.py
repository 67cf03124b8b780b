"""The shared base of the count-based metrics (saliency maxF, boundary F-measures): summed int64 counts, the best
F-measure over thresholds, and logits or probabilities made one-channel probabilities."""

from __future__ import annotations

import torch


class CountsMetric:
    """Base of the metrics whose whole state is one int64 `counts` tensor (summed across processes)."""

    counts: torch.Tensor

    def state(self) -> dict[str, torch.Tensor]:
        """The summed counts."""
        return {"counts": self.counts}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the counts (e.g. by the sum of the states of several processes)."""
        self.counts = state["counts"].long().cpu()


def best_f_measure(counts: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index of the best F (the first, as MATLAB's max), and precision, recall and F per threshold, of boundary
    counts (4, T): cntP (matched predicted), sumP (predicted), cntR (matched ground-truth), sumR (ground-truth pixels).

    Zero sums follow SEISM's `gather_measure.m`: where sumR = 0 (and cntP = 0) R = 1, P = 0; where sumP = 0 (and
    cntR = 0) R = 0, P = 1, which wins when both are 0; where sumP and cntR are non-zero R = cntR / sumR and
    P = cntP / sumP; elsewhere P = R = 0. F = 2PR / (P + R), 0 where P + R = 0.
    """
    cnt_p, sum_p, cnt_r, sum_r = counts.double()
    precision, recall = torch.zeros_like(cnt_p), torch.zeros_like(cnt_p)
    no_truth, no_prediction = (sum_r == 0) & (cnt_p == 0), (sum_p == 0) & (cnt_r == 0)
    recall[no_truth], precision[no_truth] = 1.0, 0.0
    recall[no_prediction], precision[no_prediction] = 0.0, 1.0
    regular = (sum_p != 0) & (cnt_r != 0)
    recall[regular], precision[regular] = cnt_r[regular] / sum_r[regular], cnt_p[regular] / sum_p[regular]
    total = precision + recall
    f = torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-300), torch.zeros_like(total))
    return int(f.argmax()), precision, recall, f


def binary_probability(prediction: torch.Tensor, from_logits: bool, what: str) -> torch.Tensor:
    """float32 probabilities of a one-channel prediction: the sigmoid of logits, or checked probabilities."""
    prediction = prediction.detach().float()
    if from_logits:
        return prediction.sigmoid()
    if prediction.numel() and not bool(((prediction >= 0) & (prediction <= 1)).all()):
        raise ValueError(
            f"{what}: from_logits=False, but the predictions range over {float(prediction.min()):.4g} ... "
            f"{float(prediction.max()):.4g}, outside [0, 1]; pass logits with from_logits=True (the default) or "
            "probabilities"
        )
    return prediction
