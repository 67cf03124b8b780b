"""The multi-task side of evaluation: one metric per task (`make_metrics`), the main metric per task and Delta_m
against single-task baselines (`SINGLE_TASK_BASELINES`: the paper's), and the version of the metric definitions."""

from __future__ import annotations

from typing import Any

from .boundaries import BoundaryODSMetric
from .metrics import BoundaryMetric, DepthMetric, NormalsMetric, SaliencyMetric, SemsegMetric
from .tasks_sak import IGNORE_INDEX, TASKS


METRICS_VERSION = 3  # bumped whenever a definition changes (cached results of older versions are recomputed)
# Main metric per task, and whether lower is better (the Delta_m sign): the task table's.
MAIN_METRIC = {task: spec.main_metric for task, spec in TASKS.items()}
LOWER_IS_BETTER = {task: True for task, spec in TASKS.items() if spec.lower_is_better}
# Single-task baselines reported by the SAK authors (DESIGN section 3), the default reference of Delta_m.
SINGLE_TASK_BASELINES = {
    "nyud_vitb": {
        "semseg": {"mIoU": 51.15},
        "depth": {"rmse": 0.5792},
        "normals": {"mean": 19.77},
        "edge": {"odsF": 77.35},
    },
    "nyud_vitl": {
        "semseg": {"mIoU": 54.19},
        "depth": {"rmse": 0.5560},
        "normals": {"mean": 19.22},
        "edge": {"odsF": 78.09},
    },
}


def delta_m(results: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | str) -> float:
    """Multi-task gain over `baseline` in percent: the mean over tasks of the relative change of each task's main
    metric, negated where lower is better. `baseline` is results of the same form or a SINGLE_TASK_BASELINES key;
    tasks missing from either side are left out (NaN when none is shared)."""
    if isinstance(baseline, str):
        if baseline not in SINGLE_TASK_BASELINES:
            raise ValueError(
                f"unknown baseline {baseline!r}; known: {sorted(SINGLE_TASK_BASELINES)} or a results dict"
            )
        baseline = SINGLE_TASK_BASELINES[baseline]
    terms = []
    for task, metric in MAIN_METRIC.items():
        ours, theirs = results.get(task, {}).get(metric), baseline.get(task, {}).get(metric)
        if ours is not None and theirs is not None:
            sign = -1.0 if LOWER_IS_BETTER.get(task) else 1.0
            terms.append(sign * (ours - theirs) / theirs * 100)
    return sum(terms) / len(terms) if terms else float("nan")


# "bsds": the paper's odsF, i.e. the authors' SEISM protocol (NMS, 8-bit maps, BSDS one-to-one matching; see
# boundaries.py); "tolerance": a quick tolerance-based F for monitoring.
BOUNDARY_KINDS = ("bsds", "tolerance")
# maxDist per task preset (configuration_sak.TASK_PRESETS) = boundaries.seism_max_dist of the reference's SEISM
# database names: "NYUD" 0.011, "PASCALContext" 0.0075 (SEISM's default; its 0.01 is for the 'Pascal' database).
BOUNDARY_MAX_DIST = {"nyud_v2": 0.011, "pascal_context": 0.0075}


def make_metrics(
    tasks: dict[str, int],
    ignore_index: int = IGNORE_INDEX,
    boundary: str = "bsds",
    boundary_max_dist: float | None = None,
    num_workers: int | None = None,
    from_logits: bool = True,
) -> dict[str, Any]:
    """One accumulator per task. Boundaries: "bsds" (the paper's odsF, SEISM protocol) or "tolerance" (quick);
    maxDist defaults to PASCAL-Context's 0.0075 when the tasks include human_parts or sal, else NYUD's 0.011.
    `from_logits` tells the edge and saliency metrics whether predictions are logits (default, as the model returns
    them) or probabilities."""
    if boundary not in BOUNDARY_KINDS:
        raise ValueError(f"boundary={boundary!r}: use 'bsds' (the paper's odsF) or 'tolerance' (quick monitoring)")
    if boundary_max_dist is None:
        pascal = {"human_parts", "sal"} & set(tasks)
        boundary_max_dist = BOUNDARY_MAX_DIST["pascal_context" if pascal else "nyud_v2"]
    metrics: dict[str, Any] = {}
    for task, channels in tasks.items():
        if task in ("semseg", "human_parts"):
            metrics[task] = SemsegMetric(channels, ignore_index)
        elif task == "depth":
            metrics[task] = DepthMetric()
        elif task == "normals":
            metrics[task] = NormalsMetric(ignore_index)
        elif task == "sal":
            metrics[task] = SaliencyMetric(ignore_index=ignore_index, from_logits=from_logits)
        elif task == "edge" and boundary == "bsds":
            metrics[task] = BoundaryODSMetric(
                boundary_max_dist, from_logits=from_logits, ignore_index=ignore_index, num_workers=num_workers
            )
        elif task == "edge":
            metrics[task] = BoundaryMetric(boundary_max_dist, ignore_index=ignore_index, from_logits=from_logits)
        else:
            raise ValueError(f"no metric for task {task!r}; known: semseg, human_parts, depth, normals, sal, edge")
    return metrics
