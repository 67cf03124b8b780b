"""The `evaluate` module: loaded by path offline, equal to the package's own metrics, nothing stored per pixel."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import evaluate
import pytest
import torch
from conftest import nyud_labels

import modeling_sak
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


def batches_file(tmp_path: Path, count: int = 4) -> Path:
    """`count` batches of NYUD-v2 labels and predictions, saved for the processes of a test."""
    batches = []
    for seed in range(count):
        labels = nyud_labels(2, 24, 32, seed=seed)
        batches.append({"predictions": predictions_for(labels, seed), "references": labels})
    path = tmp_path / "batches.pt"
    torch.save(batches, path)
    return path


def single_process_results(path: Path) -> dict[str, float]:
    metric = evaluate.load(metric_module_path(), "nyud_v2")
    for batch in torch.load(path):
        metric.add_batch(**batch)
    return metric.compute(baseline="nyud_vitb")


def assert_same_numbers(got: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), (key, got[key], value)


def run_python(script: str, tmp_path: Path, *args: str, package: bool = True) -> subprocess.Popen:
    """A fresh interpreter on `script`; `package=False` leaves the checkout off its path."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    if package:
        env["PYTHONPATH"] = str(Path(modeling_sak.__file__).parents[1])
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_copy_of_the_folder_loads_and_computes_without_the_package(tmp_path, monkeypatch):
    """evaluate.load copies the metric and the files it imports; with `modeling_sak` unimportable the copy of the
    folder must still run, and give the package's numbers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = batches_file(tmp_path)
    package_table = Path(modeling_sak.__file__).parent / "remote_code" / "tasks_sak.py"
    assert Path(metric_module_path()).with_name("tasks_sak.py").read_bytes() == package_table.read_bytes()
    folder = tmp_path / "sak_multitask"
    shutil.copytree(Path(metric_module_path()).parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    script = """
        import json, sys
        sys.modules["modeling_sak"] = None  # the package must not be importable: the code comes from the folder
        import evaluate, torch
        metric = evaluate.load(sys.argv[1], "nyud_v2")
        assert type(metric).__module__.startswith("evaluate_modules."), type(metric).__module__
        for batch in torch.load(sys.argv[2]):
            metric.add_batch(**batch)
        print(json.dumps(metric.compute(baseline="nyud_vitb")))
        assert not [name for name in sys.modules if name.startswith("modeling_sak.")]
    """
    process = run_python(script, tmp_path, str(folder), str(path), package=False)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert_same_numbers(json.loads(stdout.strip().splitlines()[-1]), single_process_results(path))


@pytest.mark.slow
def test_num_process_2_gathers_both_processes(tmp_path, monkeypatch):
    """evaluate's multi-process path: two real processes each add half of the batches; process 0 returns the numbers
    of all of them (exactly the single-process ones), process 1 returns None; mismatched settings are refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = batches_file(tmp_path)
    script = """
        import json, sys
        import evaluate, torch
        from modeling_sak.evaluation import metric_module_path

        rank, experiment, cache, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
        metric = evaluate.load(
            metric_module_path(), "nyud_v2", num_process=2, process_id=rank, experiment_id=experiment,
            cache_dir=cache, timeout=120,
        )
        for batch in torch.load(path)[rank::2]:
            metric.add_batch(**batch)
        print(json.dumps(metric.compute(baseline="nyud_vitb")))
        # the same metric loaded with other settings in process 1: process 0 refuses to sum the statistics
        other = evaluate.load(
            metric_module_path(), "nyud_v2", num_process=2, process_id=rank, experiment_id=experiment + "-b",
            cache_dir=cache, timeout=120, from_logits=rank == 0,
        )
        try:
            print(json.dumps(other.compute()))
        except ValueError as error:
            print("refused:", error)
    """
    experiment, cache = uuid.uuid4().hex, str(tmp_path / "metrics_cache")
    processes = [run_python(script, tmp_path, str(rank), experiment, cache, str(path)) for rank in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    (first, refused), (second, none) = (out.strip().splitlines()[-2:] for out, _ in outputs)
    assert second == "null" and none == "null"
    assert_same_numbers(json.loads(first), single_process_results(path))
    assert refused.startswith("refused: the 2 processes loaded the metric with different settings"), refused
    assert not list((tmp_path / "metrics_cache").rglob(f"{experiment}-2-*.arrow"))  # process 0 removed them
