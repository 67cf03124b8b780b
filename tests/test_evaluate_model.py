"""evaluate_model on a ToyRooms checkpoint: metrics equal the in-process evaluation, pictures written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from PIL import Image

from modeling_sak import SAKForMultiTask
from modeling_sak.evaluate_model import main
from modeling_sak.prepare_dataset import make_toyrooms


def test_cli_evaluates_a_checkpoint_and_draws_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    make_toyrooms(tmp_path / "toy", num_train=2, num_test=5, size=(64, 96))
    config = tiny_config(tasks={"semseg": 7, "normals": 3, "edge": 1, "depth": 1})
    SAKForMultiTask(config).eval().save_pretrained(tmp_path / "model")
    results = main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "toy"), "--batch_size", "2",
                    "--output_dir", str(tmp_path / "eval"), "--save_predictions", "3", "--write_card", "org/tiny",
                    "--baseline", "nyud_vitb"])  # fmt: skip
    card = (tmp_path / "model" / "README.md").read_text()
    assert "org/tiny" in card and "model-index" in card and "measured with this package" in card
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == results and set(results) == {"semseg", "normals", "edge", "depth", "Delta_m"}
    assert 0 <= results["semseg"]["mIoU"] <= 100 and results["depth"]["rmse"] > 0 and "odsF" in results["edge"]
    assert results["Delta_m"]["percent"] < 0  # an untrained model is far below the paper's single-task ViT-B
    assert (tmp_path / "eval" / "predictions.png").stat().st_size > 1000
    pictures = tmp_path / "eval" / "predictions"
    for task in ("semseg", "normals", "edge", "depth", "grid"):
        assert Image.open(pictures / f"toyrooms-0-1000000_{task}.png").size[0] >= 96, task
    assert Image.open(pictures / "toyrooms-0-1000000_semseg.png").size == (96, 64)  # cropped to the image
    # Batch size does not change pooled metrics.
    again = main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "toy"), "--batch_size", "5",
                  "--output_dir", str(tmp_path / "eval2")])  # fmt: skip
    for task in again:
        for metric, value in results[task].items():
            assert abs(again[task][metric] - value) < 1e-4 * max(1.0, abs(value)), (task, metric)


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_metrics(tmp_path):
    make_toyrooms(tmp_path / "toy", num_train=2, num_test=7, size=(64, 96))  # 7 images: 4 + 3 over two processes
    config = tiny_config(tasks={"semseg": 7, "normals": 3, "edge": 1, "depth": 1})
    SAKForMultiTask(config).eval().save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "modeling_sak.evaluate_model", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "toy"),
            "--batch_size", "2"]  # fmt: skip
    launchers = {"one": [sys.executable],
                 "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]}  # fmt: skip
    metrics = {}
    for name, launcher in launchers.items():
        command = [*launcher, *args, "--output_dir", str(tmp_path / name)]
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent
        )
        assert result.returncode == 0, result.stderr[-4000:]
        saved = json.loads((tmp_path / name / "metrics.json").read_text())
        assert saved["processes"] == {"one": 1, "two": 2}[name]
        metrics[name] = saved["metrics"]
    assert metrics["two"] == metrics["one"]  # bit for bit: every statistic is an integer sum
