"""train_accelerate.py end to end with tiny models on a small ToyRooms, in real processes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import carried_files
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEM = "{model_type: vit, hidden_size: 32, num_hidden_layers: 4, num_attention_heads: 2, intermediate_size: 64, patch_size: 8}"


def run(
    args: list[str], launcher: list[str] | None = None, check: bool = True, progress: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    if progress:
        env.pop("TQDM_DISABLE")
    command = (launcher or [sys.executable]) + [str(ROOT / "train_accelerate.py"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def tiny_args(assets, output_dir, *extra) -> list[str]:
    return [
        "--dataset",
        assets["data"],
        "--teachers",
        assets["teachers"],
        "--image_size",
        "32",
        "48",
        "--stem",
        STEM,
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "6",
        "--baseline",
        "false",
        "--warmup_steps",
        "0",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(output_dir),
        "--cache_dir",
        str(output_dir / "cache"),
        "--stage1_steps",
        "0",
        *extra,
    ]


def test_progress_bar_writes_a_few_lines_to_a_redirected_log(assets, tmp_path):
    # stderr is a pipe here, as in `... 2> train.log`: the bar must not redraw on every step (tqdm's set_postfix
    # redraws by default, whatever mininterval says).
    result = run(tiny_args(assets, tmp_path / "run", "--max_steps", "12", "--eval_split", ""), progress=True)
    draws = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("training SAK")]
    assert 1 <= len(draws) <= 3, draws
    assert "12/12" in draws[-1] and "loss=" in draws[-1]


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
        )
    )
    assert "router weights" in result.stdout and "semseg mIoU" in result.stdout
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    results = json.loads((output / "all_results.json").read_text())
    assert set(results["SAK"]) == {"semseg", "normals", "edge", "depth"} and results["SAK"]["depth"]["rmse"] > 0
    for picture in ("predictions.png", "router_weights.png", "final/router_weights.png"):
        assert (output / picture).stat().st_size > 1000
    card = (output / "final" / "README.md").read_text()
    assert "model-index" in card and "geometry" in card and "max_steps: 4" in card
    assert {path.name for path in (output / "final").glob("*.py")} == carried_files()
    check = (
        "import sys, torch; sys.modules['modeling_sak'] = None; from transformers import AutoModel; "
        f"m = AutoModel.from_pretrained({str(output / 'final')!r}, trust_remote_code=True).eval(); "
        "assert m.config.use_aligners and list(m.config.teachers) == ['geometry', 'semantics']; "
        "print(sorted(m(torch.randn(1, 3, 32, 48)).task_outputs))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "['depth', 'edge', 'normals', 'semseg']" in loaded.stdout
    assert not any(k.startswith("aligners.") for k in load_file(output / "final" / "model.safetensors"))


@pytest.mark.slow
def test_stage1_distillation_run_on_an_image_dataset(assets, tmp_path):
    output = tmp_path / "stage1"
    # A teacher with options (the recipe's mapping form): they reach the student's config.
    teachers = json.loads(assets["teachers"])
    teachers["geometry"] = {"model_id": teachers["geometry"], "position_interpolation": "bicubic"}
    run(
        tiny_args(
            assets,
            output,
            "--stage",
            "1",
            "--image_size",
            "[32, 32]",
            "--max_steps",
            "3",
            "--eval_split",
            "",
            "--teachers",
            json.dumps(teachers),
        )
    )
    config = json.loads((output / "final" / "config.json").read_text())
    assert config["tasks"] == [] and [next(iter(t)) for t in config["teachers"]] == ["geometry", "semantics"]
    assert config["teachers"][0]["geometry"]["position_interpolation"] == "bicubic"


@pytest.mark.slow
def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_parameters(assets, tmp_path):
    common = [
        "--max_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--eval_split",
        "",
        "--checkpoints_total_limit",
        "5",
        "--num_workers",
        "2",
        "--per_device_train_batch_size",
        "5",
    ]
    run(tiny_args(assets, tmp_path / "straight", *common))
    # A run stopped after step 3 (its later state gone, as after a kill) resumes mid-epoch from checkpoint-3:
    # 24 rows in batches of 5 are 5 batches an epoch, so step 4 is the 4th batch of the first epoch.
    run(tiny_args(assets, tmp_path / "resumed", *common))
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-6")
    shutil.rmtree(tmp_path / "resumed" / "final")
    (tmp_path / "resumed" / "all_results.json").unlink()
    resumed = run(tiny_args(assets, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in resumed.stdout and "at step 3 (epoch 0, batch 3)" in resumed.stdout
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(again[key], straight[key]), key  # bit for bit
    histories = [json.loads((tmp_path / d / "all_results.json").read_text()) for d in ("straight", "resumed")]
    assert histories[0]["loss_history"] == histories[1]["loss_history"]
    assert histories[0]["lr_history"] == histories[1]["lr_history"]


@pytest.mark.slow
def test_a_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_checkpoint(assets, tmp_path):
    output = tmp_path / "nan"
    result = run(
        tiny_args(
            assets,
            output,
            "--max_steps",
            "50",
            "--checkpointing_steps",
            "1",
            "--learning_rate",
            "1e9",
            "--lr_scheduler",
            "constant",
            "--max_grad_norm",
            "0",
            "--eval_split",
            "",
        ),
        check=False,
    )
    assert result.returncode != 0
    assert "FloatingPointError: step" in result.stderr and "non-finite terms" in result.stderr
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and not list(output.glob(".partial-*"))
    state = json.loads((checkpoints[-1] / "training_state.json").read_text())
    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert f"step {state['step'] + 1}:" in result.stderr


def expected_learning_rates(kind: str, peak: float, steps: int, warmup: int, power: float = 0.9) -> list[float]:
    """The rate of every optimizer step, restated from DESIGN (poly per iteration; cosine with linear warm-up)."""
    rates = []
    for k in range(steps):
        if k < warmup:
            rates.append(peak * (k + 1) / warmup)
            continue
        progress = (k - warmup) / (steps - warmup)
        rates.append(peak * ((1 - progress) ** power if kind == "poly" else 0.5 * (1 + math.cos(math.pi * progress))))
    return rates


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]


@pytest.mark.slow
def test_two_processes_keep_identical_replicas_and_match_one_process(assets, tmp_path):
    # Poly with warm-up, 2 batches accumulated per optimizer step, 2 DataLoader workers per process.
    common = [
        "--max_steps",
        "4",
        "--eval_split",
        "",
        "--noisy_gating",
        "false",
        "--verify_replicas",
        "true",
        "--lr_scheduler",
        "poly",
        "--warmup_steps",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--num_workers",
        "2",
        "--checkpointing_steps",
        "2",
    ]
    run(tiny_args(assets, tmp_path / "two", *common, "--per_device_train_batch_size", "2"), launcher=TORCHRUN)
    run(tiny_args(assets, tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    assert two["replicas"] == {"processes": 2, "identical": True}
    expected = expected_learning_rates("poly", 1e-3, 4, 1)
    assert two["lr_history"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert one["lr_history"] == two["lr_history"]
    for output in ("one", "two"):  # the scheduler saved at step 2 is 2 optimizer steps in, whatever the processes
        scheduler = torch.load(tmp_path / output / "checkpoint-2" / "scheduler.bin", weights_only=False)
        assert scheduler["_step_count"] == 3 and scheduler["_last_lr"][0] == pytest.approx(expected[2], rel=1e-12)
    losses_two, losses_one = two["loss_history"], one["loss_history"]
    assert len(losses_two) == len(losses_one) == 4
    # The same 8 rows per optimizer step on both; BatchNorm statistics and loss normalisation are per process batch.
    assert abs(losses_two[0] - losses_one[0]) / losses_one[0] < 0.25
    assert abs(sum(losses_two) - sum(losses_one)) / sum(losses_one) < 0.25


@pytest.mark.slow
def test_cosine_warm_up_follows_optimizer_steps_on_two_processes(assets, tmp_path):
    run(
        tiny_args(
            assets,
            tmp_path / "cos",
            "--max_steps",
            "5",
            "--eval_split",
            "",
            "--lr_scheduler",
            "cosine",
            "--warmup_steps",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "0.002",
        ),
        launcher=TORCHRUN,
    )
    results = json.loads((tmp_path / "cos" / "all_results.json").read_text())
    assert results["lr_history"] == pytest.approx(expected_learning_rates("cosine", 2e-3, 5, 2), rel=1e-12, abs=0)


def test_help_explains_every_flag():
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_accelerate.py"), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0
    from modeling_sak.training.recipe import Recipe

    for item in dataclasses.fields(Recipe):
        assert f"--{item.name}" in result.stdout


@pytest.mark.parametrize(
    ("argv", "key", "value"),
    [
        (["--image_size", "448", "576"], "image_size", [448, 576]),  # the form --help gives
        (["--image_size", "[448, 576]"], "image_size", [448, 576]),  # a YAML list, as in recipes
        (["--scale_range", "0.5", "2"], "scale_range", [0.5, 2.0]),
        (["--tasks", "semseg=40", "depth=1"], "tasks", {"semseg": 40, "depth": 1}),
        (["--tasks", "{semseg: 40, depth: 1}"], "tasks", {"semseg": 40, "depth": 1}),
        (  # the weights named; the other tasks keep theirs
            ["--task_loss_weights", "semseg=1", "depth=0.5"],
            "task_loss_weights",
            {"semseg": 1, "normals": 10, "edge": 50, "depth": 0.5},
        ),
        (["--stem", "hidden_size=384", "num_hidden_layers=12"], "stem", {"hidden_size": 384, "num_hidden_layers": 12}),
        (  # the settings named; the others keep their defaults
            ["--toyrooms", "num_train=20", "num_test=4"],
            "toyrooms",
            {
                "num_train": 20,
                "num_test": 4,
                "seed": 0,
                "teacher_steps": {"geometry": 800, "semantics": 300},
                "teacher_learning_rate": {"geometry": 1e-3, "semantics": 2e-3},
            },
        ),
        (["--lora", "r=4", "alpha=8"], "lora", {"r": 4, "alpha": 8}),
        (["--lora", "{r: 4}"], "lora", {"r": 4}),
        (
            ["--teachers", "dinov2=facebook/dinov2-base", "sam=./sam"],
            "teachers",
            {"dinov2": "facebook/dinov2-base", "sam": "./sam"},
        ),
        (
            ["--teachers", '{"clip": "openai/clip-vit-base-patch16"}'],
            "teachers",
            {"clip": "openai/clip-vit-base-patch16"},
        ),
        (["--teachers", "none"], "teachers", "none"),
        (["--teachers", "toyrooms_specialists"], "teachers", "toyrooms_specialists"),
        (["--noisy_gating", "false"], "noisy_gating", False),
        (["--streaming", "True"], "streaming", True),
        (["--train_limit", "12"], "train_limit", 12),
        (["--train_limit", "none"], "train_limit", None),
        (["--learning_rate", "2e-5"], "learning_rate", 2e-5),
        (["--report_to", "tensorboard,wandb"], "report_to", "tensorboard,wandb"),
    ],
)
def test_every_flag_form_that_help_documents_parses(argv, key, value):
    from train_accelerate import parse_args

    _, recipe = parse_args(argv)
    assert getattr(recipe, key) == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image_size", "448"], "--image_size 448: expected two numbers, e.g. --image_size 448 576"),
        (["--image_size", "448.5", "576"], "expected two integers"),
        (["--tasks", "semseg"], "expected KEY=VALUE pairs or a YAML/JSON mapping, e.g. --tasks semseg=40 depth=1"),
        (["--noisy_gating", "maybe"], "'maybe' is not a boolean; write true or false"),
    ],
)
def test_bad_flag_values_are_named_with_the_form_to_use(argv, message, capsys):
    from train_accelerate import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_recipe_keys_and_bad_values_fail_before_training(tmp_path):
    from modeling_sak.training.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['learning_rat'\]"):
        load_recipe(str(recipe), {})
    with pytest.raises(ValueError, match="stage=3"):
        load_recipe(None, {"stage": 3})
    with pytest.raises(ValueError, match="eval_boundary='fast'"):
        load_recipe(None, {"eval_boundary": "fast"})


LOAD_AND_PREDICT = """
import json, sys, torch
sys.modules["modeling_sak"] = None  # the checkpoint's own code, as on a machine without this package
from transformers import AutoModel
report = {}
for name, folder in json.loads(sys.argv[1]).items():
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    report[name] = {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    report[name]["parameters"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aligners."))
    if model.config.tasks:
        with torch.inference_mode():
            torch.save(model.eval()(pixel_values=torch.load(sys.argv[2])).task_outputs, sys.argv[3])
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_lora_run_saves_merged_weights_that_reload_with_no_missing_keys_and_the_trained_outputs(assets, tmp_path):
    from peft import get_peft_model_state_dict

    from modeling_sak import SAKConfig, SAKForMultiTask
    from modeling_sak.training.lora import apply_lora

    output = tmp_path / "lora"
    common = ["--lora", "{r: 4}", "--stage1_steps", "2", "--checkpointing_steps", "2", "--eval_split", ""]
    run(tiny_args(assets, output, *common, "--max_steps", "3"))

    # The trained model as training left it: LoRA layers, the last checkpoint's weights, eval mode. The checkpoint
    # holds the stage-2 model alone (stage 1 shared the Accelerator and was let go of).
    assert sorted(p.name for p in (output / "checkpoint-3").glob("model*.safetensors")) == ["model.safetensors"]
    trained = apply_lora(SAKForMultiTask(SAKConfig.from_pretrained(output / "final")), {"r": 4})
    state = load_file(output / "checkpoint-3" / "model.safetensors")
    trained.load_state_dict(state)  # strict: the checkpoint keeps the LoRA keys, so resume rebuilds the same model
    trained.eval()
    assert any(value.abs().sum() > 0 for key, value in state.items() if "lora_B" in key)  # LoRA was trained

    pixel_values = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    folders = {"stage1": str(output / "stage1" / "final"), "final": str(output / "final")}
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_PREDICT,
            json.dumps(folders),
            str(tmp_path / "pixel_values.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    for name in folders:
        assert report[name]["missing_keys"] == report[name]["unexpected_keys"] == [], (name, report[name])
        assert report[name]["mismatched_keys"] == [], name
    saved = load_file(output / "final" / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in saved)
    qkv = "stem.layers.0.attention.qkv"
    assert not torch.equal(saved[f"{qkv}.weight"], state[f"{qkv}.base_layer.weight"])  # the merged weight

    with torch.inference_mode():
        expected = trained(pixel_values=pixel_values).task_outputs
    reloaded = torch.load(tmp_path / "outputs.pt")
    assert reloaded.keys() == expected.keys()
    for task, value in expected.items():
        torch.testing.assert_close(reloaded[task], value, atol=1e-5, rtol=1e-5, msg=task)

    # The adapter alone, peft's way, and the card's parameter count of the merged model.
    adapter = output / "lora_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    stored, trained_adapter = load_file(adapter / "adapter_model.safetensors"), get_peft_model_state_dict(trained.stem)
    assert stored.keys() == trained_adapter.keys() and all(torch.equal(stored[k], trained_adapter[k]) for k in stored)
    assert f"Parameters: {report['final']['parameters'] / 1e6:.2f}M" in (output / "final" / "README.md").read_text()

    resumed = run(tiny_args(assets, output, *common, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert "at step 3" in resumed.stdout
    assert load_file(output / "final" / "model.safetensors").keys() == saved.keys()


@pytest.mark.slow
def test_the_head_implementation_key_trains_the_same_function_and_torch_compile_trains_too(assets, tmp_path):
    """`--head_implementation plain` reaches the saved config and trains the same parameters as the default (within
    float32 rounding over a few steps); `--torch_compile true` compiles the student through Accelerate and trains
    the same parameters."""
    finals = {}
    for name, extra in {
        "default": [],
        "plain": ["--head_implementation", "plain"],
        "compiled": ["--torch_compile", "true"],
    }.items():
        # No gating noise: compiled code draws its random numbers from another generator.
        run(
            tiny_args(
                assets, tmp_path / name, "--max_steps", "3", "--eval_split", "", "--noisy_gating", "false", *extra
            )
        )
        final = tmp_path / name / "final"
        config = json.loads((final / "config.json").read_text())
        assert config["head_implementation"] == ("plain" if name == "plain" else "low_resolution"), name
        finals[name] = load_file(final / "model.safetensors")
    # Adam divides by the gradient's magnitude, so rounding differences move weights by up to a fraction of the
    # learning rate (1e-3): compared to 1e-4. A conv bias before training-mode BatchNorm has an exact-zero gradient,
    # rounding noise that Adam scales to whole steps of the learning rate, and the running mean follows that bias:
    # both are left out.
    noise = ("fuse_conv.bias", "fuse_norm.running_mean")
    for name in ("plain", "compiled"):
        assert finals[name].keys() == finals["default"].keys()
        different = {
            key: (finals[name][key].float() - value.float()).abs().max().item()
            for key, value in finals["default"].items()
            if not key.endswith(noise) and not torch.allclose(finals[name][key], value, rtol=1e-4, atol=1e-4)
        }
        assert not different, (name, len(different), sorted({k.rsplit(".", 2)[0] for k in different}))
    moved = sum(not torch.equal(v, finals["plain"][k]) for k, v in finals["default"].items())
    assert moved > 0  # the two head implementations round differently: they did run different code
