"""train_accelerate.py end to end with tiny models on a small ToyRooms, in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTModel

from modeling_sak.prepare_dataset import make_toyrooms


ROOT = Path(__file__).resolve().parents[1]
STEM = "{model_type: vit, hidden_size: 32, num_hidden_layers: 4, num_attention_heads: 2, intermediate_size: 64, patch_size: 8}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 24-image ToyRooms at 32 x 48 and two tiny random ViT teachers saved like Hub models."""
    root = tmp_path_factory.mktemp("train")
    os.environ["TQDM_DISABLE"] = "1"
    make_toyrooms(root / "toy", num_train=24, num_test=6, size=(32, 48), rows_per_shard=6)
    teachers = {}
    for name, width in (("geometry", 32), ("semantics", 48)):
        torch.manual_seed(len(name))
        config = ViTConfig(hidden_size=width, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8)  # fmt: skip
        ViTModel(config, add_pooling_layer=False).save_pretrained(root / name)
        teachers[name] = str(root / name)
    return {"data": str(root / "toy"), "teachers": json.dumps(teachers), "root": root}


def run(args: list[str], launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = (launcher or [sys.executable]) + [str(ROOT / "train_accelerate.py"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def tiny_args(assets, output_dir, *extra) -> list[str]:
    return ["--dataset", assets["data"], "--teachers", assets["teachers"], "--image_size", "[32, 48]",
            "--stem", STEM, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6",
            "--baseline", "false", "--warmup_steps", "0", "--learning_rate", "1e-3", "--output_dir", str(output_dir),
            "--cache_dir", str(output_dir / "cache"), "--stage1_steps", "0", *extra]  # fmt: skip


@pytest.mark.slow
def test_stage2_run_writes_a_remote_code_loadable_model_results_pictures_and_card(assets, tmp_path):
    output = tmp_path / "run"
    result = run(
        tiny_args(
            assets,
            output,
            "--max_steps",
            "4",
            "--checkpointing_steps",
            "2",
            "--noisy_gating",
            "false",
            "--fast_path",
            "true",
        )  # fmt: skip
    )
    assert "router weights" in result.stdout and "semseg mIoU" in result.stdout
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    results = json.loads((output / "all_results.json").read_text())
    assert set(results["SAK"]) == {"semseg", "normals", "edge", "depth"} and results["SAK"]["depth"]["rmse"] > 0
    for picture in ("predictions.png", "router_weights.png", "final/router_weights.png"):
        assert (output / picture).stat().st_size > 1000
    card = (output / "final" / "README.md").read_text()
    assert "model-index" in card and "geometry" in card and "max_steps: 4" in card
    check = (
        "import sys, torch; sys.modules['modeling_sak'] = None; from transformers import AutoModel; "
        f"m = AutoModel.from_pretrained({str(output / 'final')!r}, trust_remote_code=True).eval(); "
        "assert m.config.use_aligners and list(m.config.teachers) == ['geometry', 'semantics']; "
        "print(sorted(m(torch.randn(1, 3, 32, 48)).task_outputs))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "['depth', 'edge', 'normals', 'semseg']" in loaded.stdout
    assert not any(k.startswith("aligners.") for k in load_file(output / "final" / "model.safetensors"))


@pytest.mark.slow
def test_stage1_distillation_run_on_an_image_dataset(assets, tmp_path):
    output = tmp_path / "stage1"
    run(tiny_args(assets, output, "--stage", "1", "--image_size", "[32, 32]", "--max_steps", "3", "--eval_split", ""))
    config = json.loads((output / "final" / "config.json").read_text())
    assert config["tasks"] == [] and [next(iter(t)) for t in config["teachers"]] == ["geometry", "semantics"]


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_same_parameters(assets, tmp_path):
    common = ["--max_steps", "6", "--checkpointing_steps", "3", "--eval_split", "", "--checkpoints_total_limit", "5"]
    run(tiny_args(assets, tmp_path / "straight", *common))
    interrupted = run(tiny_args(assets, tmp_path / "resumed", *common, "--stop_after_steps", "4"), check=False)
    assert interrupted.returncode == 75, interrupted.stderr[-2000:]
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = run(tiny_args(assets, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_a_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_checkpoint(assets, tmp_path):
    output = tmp_path / "nan"
    result = run(tiny_args(assets, output, "--max_steps", "50", "--checkpointing_steps", "1", "--learning_rate", "1e9",
                           "--lr_scheduler", "constant", "--max_grad_norm", "0", "--eval_split", ""), check=False)  # fmt: skip
    assert result.returncode != 0
    assert "FloatingPointError: step" in result.stderr and "non-finite terms" in result.stderr
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and not list(output.glob(".partial-*"))
    state = json.loads((checkpoints[-1] / "training_state.json").read_text())
    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert f"step {state['step'] + 1}:" in result.stderr


@pytest.mark.slow
def test_two_processes_keep_identical_replicas_and_match_one_process(assets, tmp_path):
    common = ["--max_steps", "4", "--eval_split", "", "--noisy_gating", "false", "--verify_replicas", "true"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    run(tiny_args(assets, tmp_path / "two", *common, "--per_device_train_batch_size", "2"), launcher=launcher)
    run(tiny_args(assets, tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    assert two["replicas"] == {"processes": 2, "identical": True}
    losses_two, losses_one = two["loss_history"], one["loss_history"]
    assert len(losses_two) == len(losses_one) == 4
    # Same initialisation and global batch size; different example order per process, BatchNorm per process.
    assert abs(losses_two[0] - losses_one[0]) / losses_one[0] < 0.25
    assert abs(sum(losses_two) - sum(losses_one)) / sum(losses_one) < 0.25


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(ROOT / "train_accelerate.py"), "--help"], capture_output=True,
                            text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0
    from modeling_sak.training import DEFAULT_RECIPE

    for key in DEFAULT_RECIPE:
        assert f"--{key}" in result.stdout


def test_unknown_recipe_keys_and_bad_values_fail_before_training(tmp_path):
    from modeling_sak.training import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['learning_rat'\]"):
        load_recipe(str(recipe), {})
    with pytest.raises(ValueError, match="stage=3"):
        load_recipe(None, {"stage": 3})
    with pytest.raises(ValueError, match="eval_boundary='fast'"):
        load_recipe(None, {"eval_boundary": "fast"})
