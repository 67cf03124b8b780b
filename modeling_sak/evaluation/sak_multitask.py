"""SAK's multi-task metrics as an `evaluate` module, for anyone's predictions.

    import evaluate
    from modeling_sak.evaluation import metric_module_path

    metric = evaluate.load(metric_module_path(), "nyud_v2")  # or "pascal_context"; works offline
    for batch in loader:
        outputs = model(pixel_values=batch["pixel_values"])
        metric.add_batch(predictions=outputs.task_outputs, references=batch["labels"])
    print(metric.compute(baseline="nyud_vitb"))  # {"semseg/mIoU": ..., "edge/odsF": ..., "delta_m": ...}

`predictions` and `references` are dicts task -> tensor or array in this package's conventions: raw task outputs
(B, C, H, W) as `SAKForMultiTask` returns them (semseg/human_parts logits, sal logits with 2 channels, normals, edge
logits, depth in metres), and labels as `collate_multitask` makes them (255 = ignore). For edge and sal probabilities
instead of logits, load the metric with `from_logits=False` (`evaluate.load(path, "nyud_v2", from_logits=False)`);
nothing is guessed from the values. The edge odsF is the paper's (the authors' SEISM protocol, see `boundaries.py`).
Unlike a stock `evaluate` metric, nothing is stored per pixel: each batch goes straight into the sufficient
statistics of `metrics.py` (a confusion matrix, histograms, count arrays), so a whole test split costs kilobytes.

Several processes, either way (the statistics are integer sums, so both give the single-process numbers exactly):
- evaluate's own: `evaluate.load(path, "nyud_v2", num_process=N, process_id=rank, experiment_id="run-1")`, each
  process adds its share, every process calls `compute()`: each writes its statistics (one row, kilobytes) to the
  cache folder (`cache_dir`, shared by the processes), process 0 sums them and returns the results, the others
  return None (evaluate's convention).
- without files: reduce `metric.state()` yourself (`accelerator.reduce(state, "sum")`), `load_state` the sum and
  `compute()` in every process.

Stand-alone: the folder of this file holds everything the metric runs on (`counts`, `metrics`, `boundaries`,
`registry` and `tasks_sak`, a copy of the package's task table) and the files import each other relatively, so
`evaluate.load` of this file or of a copy of its folder works without the package installed.
"""

from __future__ import annotations

import io
import json
from typing import Any

import datasets
import evaluate
import numpy as np
import torch

# `evaluate.load` copies this file and the files it imports relatively (not those files' own imports) into its
# modules cache, so every file of the folder the metric runs on is imported here. No comment may end these lines:
# evaluate would read it as a "# From: URL" of the file.
from .boundaries import (
    BoundaryODSMetric,  # noqa: F401
)
from .counts import (
    CountsMetric,  # noqa: F401
)
from .metrics import (
    SemsegMetric,  # noqa: F401
)
from .registry import BOUNDARY_MAX_DIST, delta_m, make_metrics
from .tasks_sak import TASK_PRESETS


_CITATION = """@inproceedings{lu2025sak,
  title={Swiss Army Knife: Synergizing Biases in Knowledge from Vision Foundation Models for Multi-Task Learning},
  author={Lu, Yuxiang and Cao, Shengcao and Wang, Yu-Xiong}, booktitle={ICLR}, year={2025}
}"""

_INPUTS = """
Args:
    predictions: dict task -> (batch, channels, height, width) raw task outputs (tensor or array).
    references: dict task -> labels in the package convention, 255 = ignore.
    from_logits (load only): True (default) when edge / sal predictions are logits, False for probabilities.
    baseline (compute only): a results dict {task: {metric: value}} or a SINGLE_TASK_BASELINES key ("nyud_vitb",
        "nyud_vitl") to add "delta_m".
Returns:
    dict "task/metric" -> float: semseg/mIoU, depth/rmse, normals/mean, edge/odsF, sal/maxF, ... and delta_m.
"""


def _tensor(value: Any) -> torch.Tensor:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


class SakMultitask(evaluate.Metric):
    """Semseg / human parts mIoU, depth RMSE, normal angles, saliency maxF and the paper's boundary odsF, as in SAK."""

    def __init__(
        self,
        *args,
        tasks: dict[str, int] | None = None,
        boundary: str = "bsds",
        from_logits: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if tasks is None and self.config_name not in TASK_PRESETS:
            raise ValueError(
                f"unknown configuration {self.config_name!r}: use one of {sorted(TASK_PRESETS)} or pass tasks={{...}}"
            )
        self.tasks = dict(tasks or TASK_PRESETS[self.config_name]["tasks"])
        self.boundary, self.max_dist = boundary, BOUNDARY_MAX_DIST.get(self.config_name)
        self.from_logits = from_logits
        self._reset()

    def _reset(self) -> None:
        self._metrics = self._new_metrics()

    def _new_metrics(self) -> dict[str, Any]:
        return make_metrics(
            self.tasks, boundary=self.boundary, boundary_max_dist=self.max_dist, from_logits=self.from_logits
        )

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_INPUTS,
            # What evaluate's cache files hold with num_process > 1: one row per process, its sufficient statistics
            # (an .npz archive) and the metric's settings (JSON, checked equal across processes). Batches themselves
            # never go to Arrow (see the module docstring).
            features=datasets.Features(
                {"predictions": datasets.Value("binary"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/innovator-zero/SAK"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add one batch to the statistics (nothing is stored)."""
        if not isinstance(predictions, dict) or not isinstance(references, dict):
            raise TypeError("predictions and references must be dicts task -> (batch, ...) tensors or arrays")
        unknown = sorted(set(references) - set(self.tasks))
        if unknown:
            raise ValueError(f"references name tasks {unknown} this metric does not know (tasks: {list(self.tasks)})")
        for task, label in references.items():
            if label is None:
                continue
            if task not in predictions:
                raise ValueError(f"references have {task!r} but predictions do not")
            prediction, label = _tensor(predictions[task]), _tensor(label)
            if prediction.shape[0] != label.shape[0] or prediction.shape[-2:] != label.shape[-2:]:
                raise ValueError(
                    f"{task}: prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in batch or size"
                )
            self._metrics[task].update(prediction, label)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one example (dicts task -> unbatched tensor or array)."""
        self.add_batch(
            predictions={k: _tensor(v)[None] for k, v in prediction.items()},
            references={k: _tensor(v)[None] for k, v in reference.items()},
        )

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sufficient statistics per task (sum them across processes)."""
        return {task: metric.state() for task, metric in self._metrics.items()}

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replace the statistics, e.g. by the sum of every process's `state()`."""
        for task, values in state.items():
            self._metrics[task].load_state(values)

    def compute(self, *, predictions=None, references=None, baseline=None, **kwargs) -> dict[str, float] | None:
        """The metrics of everything added so far (plus an optional last batch), then a fresh start.

        With `num_process > 1` every process must call it: process 0 returns the metrics of all processes' data,
        the others None (evaluate's cache-file gathering, see the module docstring)."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        if self.num_process == 1:
            results = _results(self._metrics, baseline)
        else:
            # evaluate's own multi-process path (rendezvous, file locks, process 0 reads every file, then
            # `_compute`) with one row per process instead of every prediction.
            super().add_batch(predictions=[_state_bytes(self.state())], references=[self._settings()])
            results = super().compute(baseline=baseline)
        self._reset()  # like evaluate's metrics: compute() starts a new evaluation
        return results

    def _compute(self, predictions: list[bytes], references: list[str], baseline=None) -> dict[str, float]:
        """Process 0 of a multi-process evaluation: the metrics of the summed statistics of every process's row."""
        if any(settings != self._settings() for settings in references):
            raise ValueError(
                f"the {len(references)} processes loaded the metric with different settings: {sorted(set(references))};"
                " load it with the same configuration, tasks, boundary and from_logits everywhere"
            )
        metrics = self._new_metrics()
        states = [_state_from_bytes(row) for row in predictions]
        for task, metric in metrics.items():
            metric.load_state({name: sum(state[task][name] for state in states) for name in metric.state()})
        return _results(metrics, baseline)

    def _settings(self) -> str:
        return json.dumps(
            {
                "tasks": self.tasks,
                "boundary": self.boundary,
                "max_dist": self.max_dist,
                "from_logits": self.from_logits,
            },
            sort_keys=True,
        )


def _results(metrics: dict[str, Any], baseline) -> dict[str, float]:
    results = {task: metric.compute() for task, metric in metrics.items() if _has_data(metric)}
    flat = {f"{task}/{name}": value for task, values in results.items() for name, value in values.items()}
    if baseline is not None:
        flat["delta_m"] = delta_m(results, baseline)
    return flat


def _has_data(metric) -> bool:
    return any(bool(value.abs().sum() > 0) for value in metric.state().values())


def _state_bytes(state: dict[str, dict[str, torch.Tensor]]) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer, **{f"{task}/{name}": value.numpy() for task, values in state.items() for name, value in values.items()}
    )
    return buffer.getvalue()


def _state_from_bytes(data: bytes) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        for key in archive.files:
            task, name = key.split("/", 1)
            state.setdefault(task, {})[name] = torch.from_numpy(archive[key])
    return state
