"""evaluate_model on a ToyRooms checkpoint: metrics equal the in-process evaluation, pictures written."""

from __future__ import annotations

import json

from conftest import tiny_config

from modeling_sak import SAKForMultiTask
from modeling_sak.evaluate_model import main
from modeling_sak.prepare_dataset import make_toyrooms


def test_cli_evaluates_a_checkpoint_and_draws_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    make_toyrooms(tmp_path / "toy", num_train=2, num_test=5, size=(64, 96))
    config = tiny_config(tasks={"semseg": 7, "normals": 3, "edge": 1, "depth": 1})
    SAKForMultiTask(config).eval().save_pretrained(tmp_path / "model")
    results = main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "toy"), "--batch_size", "2",
                    "--output_dir", str(tmp_path / "eval"), "--save_predictions", "3", "--write_card", "org/tiny"])  # fmt: skip
    card = (tmp_path / "model" / "README.md").read_text()
    assert "org/tiny" in card and "model-index" in card and "measured with this package" in card
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == results and set(results) == {"semseg", "normals", "edge", "depth"}
    assert 0 <= results["semseg"]["mIoU"] <= 100 and results["depth"]["rmse"] > 0
    assert (tmp_path / "eval" / "predictions.png").stat().st_size > 1000
    # Batch size does not change pooled metrics.
    again = main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "toy"), "--batch_size", "5",
                  "--output_dir", str(tmp_path / "eval2")])  # fmt: skip
    for task in results:
        for metric, value in results[task].items():
            assert abs(again[task][metric] - value) < 1e-4 * max(1.0, abs(value)), (task, metric)
