"""The `evaluate` module: loaded by path offline, equal to the package's own metrics, nothing stored per pixel."""

from __future__ import annotations

import evaluate
import pytest
import torch
from conftest import nyud_labels

from modeling_sak.evaluation import metric_module_path
from modeling_sak.evaluation.registry import delta_m, make_metrics


def predictions_for(labels: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch, height, width = labels["semseg"].shape
    return {
        "semseg": torch.randn(batch, 40, height, width, generator=generator),
        "normals": torch.randn(batch, 3, height, width, generator=generator),
        "edge": torch.randn(batch, 1, height, width, generator=generator),
        "depth": torch.rand(batch, 1, height, width, generator=generator) * 6,
    }


def test_loaded_by_path_it_equals_the_package_metrics_batch_by_batch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(metric_module_path(), "nyud_v2")
    reference = make_metrics({"semseg": 40, "normals": 3, "edge": 1, "depth": 1})
    for seed in range(3):
        labels = nyud_labels(2, 24, 32, seed=seed)
        predictions = predictions_for(labels, seed)
        metric.add_batch(predictions=predictions, references=labels)
        for task, accumulator in reference.items():
            accumulator.update(predictions[task], labels[task])
    state_bytes = sum(v.numel() * v.element_size() for s in metric.state().values() for v in s.values())
    assert state_bytes < 300_000  # sufficient statistics only, whatever the number of images
    results = metric.compute(baseline="nyud_vitb")
    expected = {task: accumulator.compute() for task, accumulator in reference.items()}
    for task, values in expected.items():
        for name, value in values.items():
            assert results[f"{task}/{name}"] == pytest.approx(value, rel=1e-12), (task, name)
    assert "edge/odsF" in results and results["delta_m"] == pytest.approx(delta_m(expected, "nyud_vitb"))
    assert metric.compute() == {}  # compute() starts a new evaluation


def test_from_logits_false_takes_probabilities(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    on_logits = evaluate.load(metric_module_path(), "nyud_v2")
    on_probabilities = evaluate.load(metric_module_path(), "nyud_v2", from_logits=False)
    labels = nyud_labels(2, 24, 32, seed=0)
    logits = torch.rand(2, 1, 24, 32, generator=torch.Generator().manual_seed(0))  # logits inside [0, 1]
    on_logits.add_batch(predictions={"edge": logits}, references={"edge": labels["edge"]})
    on_probabilities.add_batch(predictions={"edge": logits.sigmoid()}, references={"edge": labels["edge"]})
    assert on_logits.compute() == on_probabilities.compute()


def test_bad_inputs_are_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(metric_module_path(), "nyud_v2", boundary="tolerance")
    labels = nyud_labels(1, 8, 8)
    with pytest.raises(ValueError, match="references have 'depth' but predictions do not"):
        metric.add_batch(predictions={"semseg": torch.randn(1, 40, 8, 8)}, references={"depth": labels["depth"]})
    with pytest.raises(ValueError, match=r"semseg: prediction \(1, 40, 4, 4\) and label \(1, 8, 8\)"):
        metric.add_batch(predictions={"semseg": torch.randn(1, 40, 4, 4)}, references={"semseg": labels["semseg"]})
    with pytest.raises(ValueError, match=r"tasks \['albedo'\]"):
        metric.add_batch(predictions={}, references={"albedo": labels["depth"]})
    with pytest.raises(ValueError, match="unknown configuration 'kitti'"):
        evaluate.load(metric_module_path(), "kitti")
    pascal = evaluate.load(metric_module_path(), "pascal_context", boundary="tolerance")
    assert set(pascal.tasks) == {"semseg", "human_parts", "normals", "edge", "sal"} and pascal.max_dist == 0.0075
