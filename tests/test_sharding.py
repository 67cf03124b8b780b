"""FSDP2 through train_accelerate.py on 2 gloo processes (shard, checkpoint, kill, resume, gather, save, reload), the
launches that are refused instead of silently run as something else, and gradient checkpointing."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_train_accelerate import LOAD_AND_PREDICT, ROOT, run, tiny_args

from modeling_sak.training.recipe import Recipe
from modeling_sak.training.sharding import SHARDED_STATE_DIR, launch_error


def torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


COMMON = [  # 4 optimizer steps of 2 accumulated batches, 2 workers per process, LoRA: frozen + trainable per unit
    "--max_steps",
    "4",
    "--checkpointing_steps",
    "2",
    "--checkpoints_total_limit",
    "5",
    "--eval_split",
    "",
    "--noisy_gating",
    "false",
    "--gradient_accumulation_steps",
    "2",
    "--num_workers",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--lora",
    "{r: 4}",
]
FSDP2 = ["--distributed_strategy", "fsdp2", "--gradient_checkpointing", "true"]


def kill_after_checkpoint(args: list[str], launcher: list[str], checkpoint) -> None:
    """Start a run and SIGKILL its launcher and every process it started as soon as `checkpoint` is complete."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(ROOT / "train_accelerate.py"), *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (checkpoint / "training_state.json").exists():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {checkpoint.name}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # torchrun's workers run in process groups of their own: kill every descendant, as a node failure would
    processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for each in processes:
        each.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=60)


@pytest.mark.slow
def test_an_fsdp2_run_killed_and_resumed_saves_the_ddp_runs_model_loadable_without_the_package(assets, tmp_path):
    run(tiny_args(assets, tmp_path / "ddp", *COMMON), launcher=torchrun(29521))
    run(tiny_args(assets, tmp_path / "fsdp2", *COMMON, *FSDP2), launcher=torchrun(29522))

    # Checkpoints of a sharded run: each process's shards (torch.distributed.checkpoint), no whole-model file.
    checkpoint = tmp_path / "fsdp2" / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / SHARDED_STATE_DIR).iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not list(checkpoint.glob("*.safetensors"))

    # The same run killed after its step-2 checkpoint, then resumed: bit for bit the uninterrupted run.
    killed = tmp_path / "killed"
    kill_after_checkpoint(tiny_args(assets, killed, *COMMON, *FSDP2), torchrun(29523), killed / "checkpoint-2")
    assert not (killed / "final").exists()
    resumed = run(
        tiny_args(assets, killed, *COMMON, *FSDP2, "--resume_from_checkpoint", "latest"), launcher=torchrun(29524)
    )
    assert "at step 2 (epoch 0, batch 4)" in resumed.stdout
    straight, again = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("fsdp2", "killed"))
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(again[key], straight[key]), key

    # The sharded run's final folder: exactly the DDP run's files, LoRA merged, the student's own code and auto_map.
    ddp, fsdp2 = tmp_path / "ddp" / "final", tmp_path / "fsdp2" / "final"
    assert sorted(p.name for p in fsdp2.iterdir()) == sorted(p.name for p in ddp.iterdir())
    assert not list(fsdp2.glob("_fsdp*"))
    configs = [json.loads((folder / "config.json").read_text()) for folder in (ddp, fsdp2)]
    assert configs[1]["auto_map"] == configs[0]["auto_map"]
    assert configs[1]["architectures"] == configs[0]["architectures"] == ["SAKForMultiTask"]
    weights = load_file(ddp / "model.safetensors")
    assert weights.keys() == straight.keys() and not any("lora" in key for key in weights)
    results = [json.loads((tmp_path / d / "all_results.json").read_text()) for d in ("ddp", "fsdp2", "killed")]
    assert results[1]["lr_history"] == results[0]["lr_history"] == results[2]["lr_history"]
    assert results[1]["loss_history"] == pytest.approx(results[0]["loss_history"], rel=1e-5)
    assert results[2]["loss_history"] == results[1]["loss_history"]
    # DDP averages the gradients with one all-reduce, FSDP2 with a reduce-scatter: the same sums in another order.
    # AdamW divides by sqrt(v), so a parameter whose gradient is zero up to rounding (a conv bias before BatchNorm)
    # can move by up to the learning rate per step either way; everything else agrees to float rounding.
    for key, value in weights.items():
        if key.endswith("fuse_conv.bias") or "fuse_norm.running" in key:
            torch.testing.assert_close(straight[key], value, atol=4e-3, rtol=0, msg=key)
        else:
            torch.testing.assert_close(straight[key], value, atol=2e-5, rtol=1e-4, msg=key)

    # A fresh process without the package: AutoModel + remote code loads both with no missing keys, same outputs.
    pixel_values = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    outputs = {}
    for name, folder in (("ddp", ddp), ("fsdp2", fsdp2)):
        loaded = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD_AND_PREDICT,
                json.dumps({name: str(folder)}),
                str(tmp_path / "pixel_values.pt"),
            ]
            + [str(tmp_path / f"{name}.pt")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        report = json.loads(loaded.stdout.strip().splitlines()[-1])[name]
        assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == [], report
        outputs[name] = torch.load(tmp_path / f"{name}.pt")
    assert outputs["fsdp2"].keys() == outputs["ddp"].keys() == {"semseg", "normals", "edge", "depth"}
    for task, value in outputs["ddp"].items():
        torch.testing.assert_close(outputs["fsdp2"][task], value, atol=1e-3, rtol=1e-3, msg=task)


@pytest.mark.slow
def test_fsdp2_trains_a_frozen_stem_through_both_stages_and_evaluates_on_gathered_copies(assets, tmp_path):
    output = tmp_path / "frozen"
    args = [
        "--max_steps",
        "2",
        "--eval_steps",
        "1",
        "--eval_boundary",
        "tolerance",
        "--freeze_stem",
        "true",
        "--verify_replicas",
        "true",
        "--distributed_strategy",
        "fsdp2",
    ]
    run(tiny_args(assets, output, *args, "--stage1_steps", "1"), launcher=torchrun(29525))  # the last one counts
    stage1 = load_file(output / "stage1" / "final" / "model.safetensors")
    final = load_file(output / "final" / "model.safetensors")
    stem = [key for key in final if key.startswith("stem.")]
    assert stem and all(torch.equal(final[key], stage1[key]) for key in stem)  # frozen: shards unchanged in stage 2
    assert any(not torch.equal(final[key], stage1[key]) for key in final if key.startswith("teacher_paths."))
    results = json.loads((output / "all_results.json").read_text())
    assert results["replicas"] == {"processes": 2, "identical": True}
    assert set(results["SAK"]) == {"semseg", "normals", "edge", "depth"}
    assert all(value == value for metrics in results["SAK"].values() for value in metrics.values())  # no NaN


def test_resuming_a_checkpoint_of_the_other_strategy_names_the_one_to_use(tmp_path):
    from modeling_sak.training.checkpoints import resolve_checkpoint

    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / SHARDED_STATE_DIR).mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="resume it with --distributed_strategy fsdp2"):
        resolve_checkpoint(tmp_path, "latest", "ddp")
    assert resolve_checkpoint(tmp_path, "latest", "fsdp2") == checkpoint
    (checkpoint / SHARDED_STATE_DIR).rmdir()
    with pytest.raises(FileNotFoundError, match="resume it with --distributed_strategy ddp"):
        resolve_checkpoint(tmp_path, str(checkpoint), "fsdp2")


# ---- launches that would have run another engine than the one asked for stop before any work ----


def launch(tmp_path, launcher: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no accelerate config of the machine's user
    }
    output = tmp_path / "out"
    command = [*launcher, str(ROOT / "train_accelerate.py"), "--output_dir", str(output), *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0 and not output.exists(), result.stderr[-3000:]  # stopped before any work
    return result


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without GPUs")
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2"],
            "error: FSDP was asked for (accelerate launch --use_fsdp) on a machine without a GPU: Accelerate sets "
            "FSDP up only for GPUs and would have trained plain DDP over gloo instead. The same FSDP2 sharding runs on "
            "CPUs when named in the recipe: `torchrun --nproc_per_node N train_accelerate.py --distributed_strategy "
            "fsdp2 ...`",
        ),
        (  # the shipped accelerate config: its FSDP settings pass every check, up to the missing GPU
            ["--config_file", str(ROOT / "configs" / "accelerate_fsdp2.yaml"), "--num_processes", "2"],
            "error: FSDP was asked for (accelerate launch --use_fsdp) on a machine without a GPU",
        ),
        (
            ["--use_fsdp", "--num_processes", "2"],
            "error: FSDP version 1 was asked for (accelerate launch --use_fsdp without --fsdp_version 2",
        ),
        pytest.param(
            ["--use_deepspeed", "--zero_stage", "2", "--num_processes", "2"],
            "error: DeepSpeed was asked for (accelerate launch --use_deepspeed, or an accelerate config with "
            "distributed_type DEEPSPEED), but train_accelerate.py does not run DeepSpeed",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("deepspeed") is None,
                reason="accelerate's DeepSpeed launcher needs deepspeed (.ci/run installs it)",
            ),
        ),
        (
            ["--num_processes", "2"],
            "error: accelerate launch was asked for several processes (--num_processes N) but started one: without "
            "--multi_gpu (or --use_fsdp on GPUs) it runs the script once, and this run would have trained alone. "
            "Start N processes with `torchrun --nproc_per_node N train_accelerate.py ...`",
        ),
    ],
    ids=["fsdp2-without-gpu", "shipped-fsdp2-config", "fsdp1", "deepspeed", "num-processes-without-multi-gpu"],
)
def test_accelerate_launch_requests_that_would_run_as_something_else_stop_with_the_command_that_works(
    tmp_path, flags, message
):
    result = launch(tmp_path, ACCELERATE + flags)
    assert message in result.stderr


def test_fsdp2_in_the_recipe_with_one_process_or_fp16_stops(tmp_path):
    result = launch(tmp_path, [sys.executable], "--distributed_strategy", "fsdp2")
    assert result.returncode == 2
    assert "error: distributed_strategy 'fsdp2' shards the student across processes, and this run has one" in (
        result.stderr
    )
    environ = {"WORLD_SIZE": "2"}
    assert launch_error(Recipe(distributed_strategy="fsdp2"), environ) is None
    assert "use --mixed_precision bf16" in launch_error(
        Recipe(distributed_strategy="fsdp2", mixed_precision="fp16"), environ
    )
    assert "leave torch_compile off" in launch_error(Recipe(distributed_strategy="fsdp2", torch_compile=True), environ)
    gpu = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}
    assert launch_error(Recipe(distributed_strategy="fsdp2"), gpu, cuda_available=True) is None
    refused = (
        ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP"),
        ("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"),
        ("FSDP_TRANSFORMER_CLS_TO_WRAP", "ViTLayer"),
    )
    for key, value in refused:
        problem = launch_error(Recipe(distributed_strategy="fsdp2"), gpu | {key: value}, cuda_available=True)
        assert value in problem, key


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_the_stem():
    from conftest import nyud_labels, tiny_config

    from modeling_sak.training.student import build_model

    config = tiny_config(noisy_gating=False)
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    labels = nyud_labels(2, 64, 96)
    gradients, losses, stem_forwards = [], [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(config, Recipe(gradient_checkpointing=checkpointing)).train()
        calls = []
        # the block's first module: torch stops a recompute once it has every saved tensor the backward needs
        model.stem.layers[0].norm1.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        stem_forwards.append(len(calls))
    assert stem_forwards == [1, 2]  # the checkpointed block ran again in backward
    assert torch.equal(losses[0], losses[1])
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert torch.equal(gradients[1][name], gradient), name
