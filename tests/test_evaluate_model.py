"""evaluate_model on a ToyRooms checkpoint: metrics equal the in-process evaluation, pictures written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_IMAGE_SIZE, nyud_labels, tiny_config
from huggingface_hub import ModelCard
from PIL import Image

from modeling_sak import SAKForMultiTask
from modeling_sak.commands import evaluate_model as evaluate_model_module
from modeling_sak.commands.evaluate_model import main
from modeling_sak.commands.prepare_dataset import make_toyrooms
from modeling_sak.evaluation.loop import evaluate


def test_cli_evaluates_a_checkpoint_and_draws_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    make_toyrooms(tmp_path / "toy", num_train=2, num_test=5, size=(64, 96))
    config = tiny_config(tasks={"semseg": 7, "normals": 3, "edge": 1, "depth": 1})
    SAKForMultiTask(config).eval().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("---\nbase_model: google/vit-base-patch16-224\n---\nold card\n")
    results = main(
        [
            "--model",
            str(tmp_path / "model"),
            "--dataset",
            str(tmp_path / "toy"),
            "--batch_size",
            "2",
            "--output_dir",
            str(tmp_path / "eval"),
            "--save_predictions",
            "3",
            "--write_card",
            "org/tiny",
            "--baseline",
            "nyud_vitb",
        ]
    )
    card = (tmp_path / "model" / "README.md").read_text()
    assert "org/tiny" in card and "model-index" in card and "measured with this package" in card
    metadata = ModelCard.load(tmp_path / "model" / "README.md").data  # the base_model of the replaced card is kept
    assert metadata.base_model == "google/vit-base-patch16-224" and str(tmp_path) not in str(metadata.to_dict())
    assert {result["dataset"]["split"] for result in metadata.to_dict()["model-index"][0]["results"]} == {"test"}
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
    again = main(
        [
            "--model",
            str(tmp_path / "model"),
            "--dataset",
            str(tmp_path / "toy"),
            "--batch_size",
            "5",
            "--output_dir",
            str(tmp_path / "eval2"),
        ]
    )
    for task in again:
        for metric, value in results[task].items():
            assert abs(again[task][metric] - value) < 1e-4 * max(1.0, abs(value)), (task, metric)


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_metrics(tmp_path):
    make_toyrooms(tmp_path / "toy", num_train=2, num_test=7, size=(64, 96))  # 7 images: 4 + 3 over two processes
    config = tiny_config(tasks={"semseg": 7, "normals": 3, "edge": 1, "depth": 1})
    SAKForMultiTask(config).eval().save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    args = [
        "-m",
        "modeling_sak.commands.evaluate_model",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        str(tmp_path / "toy"),
        "--batch_size",
        "2",
    ]
    launchers = {
        "one": [sys.executable],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
    }
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


def model_where_train_mode_shows(**config) -> SAKForMultiTask:
    """A tiny model whose train-mode outputs differ from its eval-mode ones: noisy gating, and BatchNorm running
    statistics far from any batch's."""
    torch.manual_seed(0)
    model = SAKForMultiTask(tiny_config(noisy_gating=True, **config))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(100)
    return model.eval()


def parameters_and_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


def test_save_predictions_leaves_every_parameter_and_buffer_bit_identical_and_draws_eval_mode_outputs(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    make_toyrooms(tmp_path / "toy", num_train=2, num_test=3, size=(64, 96))
    model_where_train_mode_shows(tasks={"semseg": 7, "normals": 3, "edge": 1, "depth": 1}).save_pretrained(
        tmp_path / "model"
    )
    seen, drawn = {}, {}
    load, draw = evaluate_model_module.AutoModel.from_pretrained, evaluate_model_module.prediction_grid

    def recording_load(*args, **kwargs):  # the model the command loads, and its parameters and buffers as loaded
        seen["model"] = load(*args, **kwargs)
        seen["loaded"] = parameters_and_buffers(seen["model"])
        return seen["model"]

    def recording_draw(pixel_values, labels, task_outputs, *args, **kwargs):
        drawn.update(pixel_values=pixel_values, task_outputs=task_outputs)
        return draw(pixel_values, labels, task_outputs, *args, **kwargs)

    monkeypatch.setattr(evaluate_model_module.AutoModel, "from_pretrained", recording_load)
    monkeypatch.setattr(evaluate_model_module, "prediction_grid", recording_draw)
    main(
        [
            "--model",
            str(tmp_path / "model"),
            "--dataset",
            str(tmp_path / "toy"),
            "--batch_size",
            "2",
            "--boundary",
            "tolerance",
            "--output_dir",
            str(tmp_path / "eval"),
            "--save_predictions",
            "3",
        ]
    )

    after = parameters_and_buffers(seen["model"])
    assert after.keys() == seen["loaded"].keys()
    changed = [name for name, tensor in after.items() if not torch.equal(tensor, seen["loaded"][name])]
    assert not changed, f"evaluation changed {changed}"
    assert not any(module.training for module in seen["model"].modules())  # loaded in eval mode, still in eval mode
    # The pictures show what the model predicts in eval mode (running statistics, no router noise).
    reference = SAKForMultiTask.from_pretrained(tmp_path / "model").eval()
    with torch.inference_mode():
        expected = reference(pixel_values=drawn["pixel_values"]).task_outputs
    assert drawn["task_outputs"].keys() == expected.keys() and drawn["pixel_values"].shape[0] == 3
    for task, value in expected.items():
        torch.testing.assert_close(drawn["task_outputs"][task], value, atol=1e-6, rtol=1e-5, msg=task)


def test_evaluate_restores_the_mode_it_found_and_changes_nothing():
    model = model_where_train_mode_shows()
    height, width = TINY_IMAGE_SIZE
    loader = [
        {
            "pixel_values": torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(i)),
            "labels": nyud_labels(2, height, width, seed=i),
        }
        for i in range(2)
    ]
    accelerator = Accelerator()
    frozen_statistics = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    setups = {
        "eval": lambda: model.eval(),
        "train": lambda: model.train(),
        "train, one BatchNorm frozen": lambda: (model.train(), frozen_statistics.eval()),
    }
    results = {}
    for name, setup in setups.items():
        setup()
        modes = {module_name: module.training for module_name, module in model.named_modules()}
        before = parameters_and_buffers(model)
        results[name] = evaluate(model, loader, accelerator, model.config, boundary="tolerance")
        assert {module_name: module.training for module_name, module in model.named_modules()} == modes, name
        after = parameters_and_buffers(model)
        assert [key for key in before if not torch.equal(before[key], after[key])] == [], name
    # The mode found does not change the metrics: evaluation always runs in eval mode.
    assert results["train"] == results["eval"] == results["train, one BatchNorm frozen"]
