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
nothing is guessed from the values. The edge odsF is the paper's (the authors' SEISM protocol, see
`modeling_sak.evaluation.boundaries`). Unlike a stock `evaluate` metric, nothing is stored: each batch goes
straight into the sufficient statistics of `modeling_sak.evaluation.metrics` (a confusion matrix, histograms, count
arrays), so a whole test split costs kilobytes. For several processes, reduce `metric.state()` (e.g.
`accelerator.reduce(state, "sum")`) and call `metric.load_state(...)` before `compute()`; evaluate's own file-based
`num_process` mechanism is not used.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np
import torch

from modeling_sak.evaluation.registry import BOUNDARY_MAX_DIST, delta_m, make_metrics
from modeling_sak.tasks_sak import TASK_PRESETS


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
        self._metrics = make_metrics(
            self.tasks, boundary=self.boundary, boundary_max_dist=self.max_dist, from_logits=self.from_logits
        )

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_INPUTS,
            # Declared for the Hub viewer only: batches bypass evaluate's Arrow storage (see the module docstring).
            features=datasets.Features(
                {"predictions": datasets.Value("float32"), "references": datasets.Value("float32")}
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
        for task, values in state.items():
            self._metrics[task].load_state(values)

    def compute(self, *, predictions=None, references=None, baseline=None, **kwargs) -> dict[str, float]:
        """The metrics of everything added so far (plus an optional last batch), then a fresh start."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        results = {task: metric.compute() for task, metric in self._metrics.items() if _has_data(metric)}
        flat = {f"{task}/{name}": value for task, values in results.items() for name, value in values.items()}
        if baseline is not None:
            flat["delta_m"] = delta_m(results, baseline)
        self._reset()  # like evaluate's metrics: compute() starts a new evaluation
        return flat

    def _compute(self, predictions=None, references=None):  # required by evaluate; compute() above does the work
        raise NotImplementedError


def _has_data(metric) -> bool:
    return any(bool(value.abs().sum() > 0) for value in metric.state().values())
